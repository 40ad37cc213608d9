"""Optimizers on sharded data parallelism: owner-rank updates for ZeRO-1 and for whole-tensor optimizers.

Two situations need more than running ``optimizer.step()`` on every rank:

* **zero1** keeps parameters and gradients replicated (DDP) but shards optimizer state. Each
  parameter is owned by one rank (greedy by expected state bytes, so ranks hold about equal
  state); the owner's inner optimizer holds only its parameters, updates them, and broadcasts the
  new values. When whole tensors cannot be balanced (a tied embedding larger than a rank's share),
  an elementwise group is split instead: every rank updates its row block of each tensor (a
  Shard(0) DTensor, as FSDP holds it) and broadcasts that block.
* **zero2 / fsdp / hsdp** keep each parameter as a DTensor shard. An elementwise optimizer (AdamW,
  Lion, ...) is exact on shards and runs unchanged. An optimizer that needs the whole tensor
  (Muon's orthogonalisation, Shampoo/SOAP preconditioners, GaLore projections, LAMB/LARS trust
  ratios, Adafactor/CAME/SM3 factored statistics) would silently compute a different update on a
  shard, so each such parameter gets an owner rank: every rank all-gathers the clipped gradient
  and the parameter, the owner runs the optimizer's own step on a whole-tensor copy (its state
  lives only there), broadcasts the result, and every rank keeps its own slice. The update is the
  one single-process training computes, at the price of an all-gather and a broadcast per tensor.

Optimizers whose step cannot be moved onto a copy (a closure that re-runs the model, hooks that
read the model's gradients, updates inside backward) are refused under these strategies with a
one-line reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from llmtrain.distributed import broadcast_
from llmtrain.errors import ConfigError
from llmtrain.optim.protocol import default_state_bytes

# Registry names whose update of an element depends only on that element's gradient and state
# (plus the step count and group hyperparameters), so they are exact on any shard. adamw8bit is
# not among them: its absmax blocks of 256 would be cut differently by each shard boundary, so an
# owner rank quantises the whole tensor and the result equals one process's.
ELEMENTWISE = {
    "sgd", "adam", "adamw", "nadam", "radam", "adamax", "adagrad", "rmsprop", "adabelief", "adan",
    "lion", "signsgd", "signum", "schedulefree_adamw",
}


def is_dtensor(t: Any) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


def whole_tensor_groups(optimizer: torch.optim.Optimizer, name: Optional[str]) -> list[bool]:
    """Per parameter group: does its update need whole tensors?

    Hybrid matrix optimizers (a ``hybrid_flag`` such as Muon's ``use_muon``) need them only for
    the flagged groups; their AdamW side is elementwise. Otherwise a class may declare
    ``elementwise = True/False``; unknown optimizers are treated as whole-tensor (always correct).
    """
    cls = type(optimizer)
    flag = getattr(cls, "hybrid_flag", None)
    if flag is not None:
        return [bool(g.get(flag, False)) for g in optimizer.param_groups]
    elementwise = getattr(cls, "elementwise", None)
    if elementwise is None:
        elementwise = (name or "").lower() in ELEMENTWISE or cls.__name__.lower() in ELEMENTWISE
    return [not elementwise] * len(optimizer.param_groups)


def assign_owners(sizes: list[float], world_size: int) -> list[int]:
    """Owner rank per tensor: largest first to the least-loaded rank (deterministic)."""
    load = [0.0] * world_size
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += sizes[i]
    return owners


SPLIT = -1  # the "owner" of a tensor whose row blocks are updated by every rank, one block each
BALANCE_TOLERANCE = 1.05  # most-loaded rank / even share above which a group is split
AUX_ADAMW_STATE_BYTES = 8.0  # the AdamW side of a hybrid matrix optimizer: two fp32 moments


def group_state_weights(optimizer: torch.optim.Optimizer) -> list[float]:
    """Expected state bytes per element of each parameter group, so owners balance bytes, not counts
    (Muon keeps 4 on its matrices and AdamW's 8 on the embedding)."""
    per_param = float(getattr(optimizer, "state_bytes_per_param", 0.0) or 0.0)
    flag = getattr(type(optimizer), "hybrid_flag", None)
    weights = []
    for g in optimizer.param_groups:
        weight = per_param if flag is None or g.get(flag) else AUX_ADAMW_STATE_BYTES
        weights.append(weight if weight > 0 else 1.0)
    return weights


def plan_owners(costs: list[float], groups: list[int], splittable: set[int], world_size: int,
                tolerance: float = BALANCE_TOLERANCE) -> list[int]:
    """Owner rank per tensor, or SPLIT for every tensor of a group split across all ranks.

    Whole tensors go largest first to the least-loaded rank. While the most-loaded rank would hold
    more than ``tolerance`` times an even share, the splittable group holding the largest whole
    tensor (a tied embedding) is split: each rank then holds 1/world_size of its state.
    """
    split: set[int] = set()
    total = sum(costs)
    while True:
        whole = [i for i in range(len(costs)) if groups[i] not in split]
        owners = assign_owners([costs[i] for i in whole], world_size)
        load = [(total - sum(costs[i] for i in whole)) / world_size] * world_size
        for i, owner in zip(whole, owners):
            load[owner] += costs[i]
        candidates = [i for i in whole if groups[i] in splittable]
        if max(load, default=0.0) <= tolerance * total / world_size or not candidates:
            break
        split.add(groups[min(candidates, key=lambda i: (-costs[i], i))])
    plan = [SPLIT] * len(costs)
    for i, owner in zip(whole, owners):
        plan[i] = owner
    return plan


def row_blocks(rows: int, world_size: int) -> list[tuple[int, int]]:
    """[start, end) of each rank's rows: DTensor's Shard(0) layout (torch.chunk; trailing blocks may be empty)."""
    size = -(-rows // world_size)
    return [(min(r * size, rows), min((r + 1) * size, rows)) for r in range(world_size)]


@dataclass
class Owned:
    """A parameter updated by one rank, or by every rank on its own rows (``owner == SPLIT``).

    ``shadow`` is what the inner optimizer holds in its place: the owner's whole-tensor copy of a
    DTensor, or each rank's row block of a split tensor as a Shard(0) DTensor (a copy, so DCP saves
    its state as shards of the whole tensor). ``rows`` are the blocks of a split tensor.
    """

    param: torch.nn.Parameter
    owner: int
    shadow: Optional[torch.nn.Parameter] = None
    rows: Optional[list[tuple[int, int]]] = None


def _splittable(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> bool:
    """Replicated, contiguous tensors with rows and no state yet (state made in __init__ is whole)."""
    return all(not is_dtensor(p) and p.ndim >= 1 and p.is_contiguous() and not optimizer.state.get(p) for p in params)


class OwnerShardedOptimizer:
    """Wraps a built optimizer so that ``managed`` parameters are updated by one owner rank each,
    or, in ``splittable`` groups (elementwise updates of replicated parameters, zero1), by every
    rank on its row block when whole-tensor owners would leave the state unbalanced.

    Behaves like the wrapped optimizer for the trainer (``param_groups``, ``step``,
    ``zero_grad``, the hook protocol) while its ``inner`` optimizer holds only this rank's share.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, managed_groups: list[bool], env: Any,
                 splittable_groups: Optional[list[bool]] = None, group=None):
        self.inner = optimizer
        self.env, self.rank, self.world_size, self.group = env, env.rank, env.world_size, group
        self.all_params = [p for g in optimizer.param_groups for p in g["params"]]
        splittable = {i for i, (g, ok) in enumerate(zip(optimizer.param_groups, splittable_groups or []))
                      if ok and _splittable(optimizer, g["params"])}
        weights = group_state_weights(optimizer)
        candidates = [(i, p) for i, (g, managed) in enumerate(zip(optimizer.param_groups, managed_groups))
                      if managed for p in g["params"]]
        owners = plan_owners([p.numel() * weights[i] for i, p in candidates], [i for i, _ in candidates],
                             splittable, self.world_size)
        self.mesh = None
        if SPLIT in owners:
            from llmtrain.distributed import device_mesh

            self.mesh = device_mesh(env)
        self.owned: dict[int, Owned] = {}
        for (_, p), owner in zip(candidates, owners):
            entry = Owned(p, owner)
            if owner == SPLIT:
                entry.rows = row_blocks(p.shape[0], self.world_size)
                start, end = entry.rows[self.rank]
                entry.shadow = torch.nn.Parameter(self._row_dtensor(p.detach()[start:end].clone(), p))
            elif is_dtensor(p) and owner == self.rank:  # values are gathered into it before each step
                entry.shadow = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=p.to_local().device))
            self.owned[id(p)] = entry
        # The inner optimizer keeps unmanaged parameters and this rank's managed ones (the
        # whole-tensor shadow in place of a DTensor shard, its rows of a split tensor); state of
        # the rest is never created.
        for g in optimizer.param_groups:
            kept = []
            for p in g["params"]:
                entry = self.owned.get(id(p))
                if entry is None:
                    kept.append(p)
                elif entry.owner in (self.rank, SPLIT):
                    kept.append(entry.shadow if entry.shadow is not None else p)
                    if entry.shadow is not None and p in optimizer.state:  # state made in __init__ (seeds)
                        optimizer.state[entry.shadow] = optimizer.state.pop(p)
                else:
                    optimizer.state.pop(p, None)
            g["params"] = kept
        self._shadow_of = {id(e.shadow): e for e in self.owned.values() if e.shadow is not None}

    @property
    def splits(self) -> bool:
        """Whether some group is split into row blocks (its inner parameters are DTensors)."""
        return self.mesh is not None

    def _row_dtensor(self, local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False, shape=like.shape, stride=like.stride())

    # ------------------------------------------------------------------ what the trainer calls
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    @property
    def defaults(self):
        return self.inner.defaults

    def __getattr__(self, name: str):
        # Protocol hooks and attributes (train/eval handled below) come from the wrapped optimizer.
        if name in ("inner", "owned"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.all_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_().zero_()
        for e in self.owned.values():
            if e.shadow is not None:
                e.shadow.grad = None

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        if closure is not None:
            raise RuntimeError("closure optimizers are refused under owner-rank sharding")
        self._gather_to_owners()
        loss = self.inner.step()
        self._push_from_owners()
        return loss

    def train(self) -> None:
        fn = getattr(self.inner, "train", None)
        if callable(fn):
            self._gather_params_only()
            fn()
            self._push_from_owners()

    def eval(self) -> None:
        fn = getattr(self.inner, "eval", None)
        if callable(fn):
            self._gather_params_only()
            fn()
            self._push_from_owners()

    def state_bytes(self) -> int:
        fn = getattr(self.inner, "state_bytes", None)
        return int(fn()) if callable(fn) else default_state_bytes(self.inner)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def param_for(self, inner_param: torch.Tensor) -> torch.Tensor:
        """The model parameter an inner-optimizer tensor stands for (a shadow maps to its DTensor)."""
        entry = self._shadow_of.get(id(inner_param))
        return entry.param if entry is not None else inner_param

    def shadow_for(self, param: torch.Tensor) -> Optional[torch.Tensor]:
        entry = self.owned.get(id(param))
        return entry.shadow if entry is not None else None

    # ------------------------------------------------------------------ communication
    def _gather_to_owners(self) -> None:
        """Whole gradient and parameter onto the owner's shadow (every rank joins each all-gather);
        this rank's rows of a split tensor and of its gradient into its block."""
        for e in self.owned.values():
            if e.owner == SPLIT:
                self._rows_in(e, with_grad=True)
            elif is_dtensor(e.param):
                full_param = e.param.detach().full_tensor()
                full_grad = e.param.grad.full_tensor() if e.param.grad is not None else None
                if e.owner == self.rank:
                    e.shadow.data.copy_(full_param)
                    e.shadow.grad = full_grad
            # else a replicated parameter and gradient (zero1): the owner updates it in place

    def _gather_params_only(self) -> None:
        for e in self.owned.values():
            if e.owner == SPLIT:
                self._rows_in(e, with_grad=False)
            elif is_dtensor(e.param):
                full_param = e.param.detach().full_tensor()
                if e.owner == self.rank:
                    e.shadow.data.copy_(full_param)

    @torch.no_grad()
    def _rows_in(self, e: Owned, with_grad: bool) -> None:
        start, end = e.rows[self.rank]
        e.shadow.to_local().copy_(e.param.detach()[start:end])
        if with_grad:
            grad = e.param.grad
            e.shadow.grad = None if grad is None else self._row_dtensor(grad[start:end], e.param)

    @torch.no_grad()
    def _push_from_owners(self) -> None:
        """Broadcast each updated tensor from its owner (each block of a split tensor from its
        rank); a DTensor keeps only its own slice."""
        from torch.distributed.tensor import distribute_tensor

        pending = []
        for e in self.owned.values():
            if e.owner == SPLIT:
                start, end = e.rows[self.rank]
                e.param.data[start:end].copy_(e.shadow.to_local())
                pending += [broadcast_(e.param.data[a:b], r, self.env, group=self.group, async_op=True)
                            for r, (a, b) in enumerate(e.rows) if b > a]
            elif not is_dtensor(e.param):
                pending.append(broadcast_(e.param.data, e.owner, self.env, group=self.group, async_op=True))
        for work in pending:
            if work is not None:
                work.wait()
        for e in self.owned.values():
            if e.owner == SPLIT or not is_dtensor(e.param):
                continue
            local = e.param.to_local()
            full = e.shadow.data if e.owner == self.rank else torch.empty(e.param.shape, dtype=e.param.dtype, device=local.device)
            broadcast_(full, e.owner, self.env, group=self.group)
            mine = distribute_tensor(full, e.param.device_mesh, e.param.placements, src_data_rank=None).to_local()
            local.copy_(mine)


def fused_kernel_takes_dtensors(optimizer: torch.optim.Optimizer) -> bool:
    """Whether torch's fused kernel for this optimizer class (``aten._fused_<name>_``) has a
    DTensor sharding rule; in torch 2.13 Adam's and AdamW's do, SGD's and Adagrad's do not."""
    op = getattr(torch.ops.aten, f"_fused_{type(optimizer).__name__.lower()}_", None)
    if op is None:
        return True  # not a torch fused op: the optimizer's own path, checked by its tests
    try:
        from torch.distributed.tensor._ops._pointwise_ops import pointwise_ops
    except ImportError:  # private module moved: assume no rule, foreach is always safe
        return False
    return any(getattr(op, name) in pointwise_ops for name in op.overloads())


def refusal(optimizer: torch.optim.Optimizer, strategy: str, managed: bool) -> Optional[str]:
    """Why ``optimizer`` cannot run under owner-rank sharding, or None."""
    name = type(optimizer).__name__
    if getattr(optimizer, "owns_backward", False):
        return f"{name} updates parameters inside backward, which {strategy} cannot shard; use distributed.strategy=ddp"
    if getattr(optimizer, "requires_closure", False):
        return f"{name} re-evaluates the model in a closure, which {strategy}'s owner-rank updates cannot replay; use distributed.strategy=ddp"
    if managed and strategy != "zero1" and any(callable(getattr(optimizer, h, None)) for h in ("before_step", "after_step")):
        return f"{name}'s step hooks read the model's sharded gradients, which need whole tensors under {strategy}; use distributed.strategy=ddp or zero1"
    return None


def shard_optimizer(optimizer: torch.optim.Optimizer, env: Any, name: Optional[str] = None,
                    loss_scaling: bool = False):
    """The optimizer the trainer should use for ``env.strategy`` (see the module docstring).

    ``loss_scaling`` (fp16's GradScaler) is refused under sharding: each rank would check only its
    own shard for overflow, and ranks that disagree skip different steps.
    Raises ConfigError with a one-line reason for a combination that cannot be computed exactly.
    """
    strategy = env.strategy
    if env.world_size <= 1 or strategy in ("none", "ddp"):
        return optimizer
    if loss_scaling:
        raise ConfigError("train.precision", f"fp16 loss scaling checks overflow per shard under {strategy}, so ranks could "
                                             f"skip different steps; use train.precision=bf16 (or distributed.strategy=ddp)")
    fused_without_dtensors = getattr(optimizer, "impl", None) == "fused" and not fused_kernel_takes_dtensors(optimizer)
    if strategy == "zero1":
        managed = [True] * len(optimizer.param_groups)
        splittable = [not whole for whole in whole_tensor_groups(optimizer, name)]  # elementwise: exact on rows
    else:
        managed, splittable = whole_tensor_groups(optimizer, name), None
        if fused_without_dtensors:
            optimizer.impl = "foreach"  # the same update as torch's multi-tensor kernels, which take DTensor shards
    if getattr(optimizer, "owns_backward", False) or any(managed):
        reason = refusal(optimizer, strategy, any(managed))
        if reason:
            raise ConfigError("optim.name", reason)
    if not any(managed):
        return optimizer  # elementwise: exact on local shards
    wrapped = OwnerShardedOptimizer(optimizer, managed, env, splittable)
    if wrapped.splits and fused_without_dtensors:
        optimizer.impl = "foreach"  # split groups hold DTensor row blocks
    return wrapped
