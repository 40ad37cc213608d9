"""Optimizers on sharded data parallelism: owner-rank updates for ZeRO-1 and for whole-tensor optimizers.

Two situations need more than running ``optimizer.step()`` on every rank:

* **zero1** keeps parameters and gradients replicated (DDP) but shards optimizer state. Each
  parameter is owned by one rank (greedy by size, so ranks hold about equal state); the owner's
  inner optimizer holds only its parameters, updates them, and broadcasts the new values.
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


def assign_owners(sizes: list[int], world_size: int) -> list[int]:
    """Owner rank per tensor: largest first to the least-loaded rank (deterministic)."""
    load = [0] * world_size
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += sizes[i]
    return owners


@dataclass
class Owned:
    """A parameter updated by one rank. ``shadow`` is the owner's whole-tensor copy of a DTensor."""

    param: torch.nn.Parameter
    owner: int
    shadow: Optional[torch.nn.Parameter] = None


class OwnerShardedOptimizer:
    """Wraps a built optimizer so that ``managed`` parameters are updated by one owner rank each.

    Behaves like the wrapped optimizer for the trainer (``param_groups``, ``step``,
    ``zero_grad``, the hook protocol) while its ``inner`` optimizer holds only this rank's share.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, managed_groups: list[bool], env: Any, group=None):
        self.inner = optimizer
        self.env, self.rank, self.world_size, self.group = env, env.rank, env.world_size, group
        self.all_params = [p for g in optimizer.param_groups for p in g["params"]]
        candidates = [p for g, m in zip(optimizer.param_groups, managed_groups) if m for p in g["params"]]
        owners = assign_owners([p.numel() for p in candidates], self.world_size)
        self.owned: dict[int, Owned] = {}
        for p, owner in zip(candidates, owners):
            entry = Owned(p, owner)
            if is_dtensor(p) and owner == self.rank:  # values are gathered into it before each step
                entry.shadow = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=p.to_local().device))
            self.owned[id(p)] = entry
        # The inner optimizer keeps unmanaged parameters and this rank's managed ones (the
        # whole-tensor shadow in place of a DTensor shard); state of the rest is never created.
        for g in optimizer.param_groups:
            kept = []
            for p in g["params"]:
                entry = self.owned.get(id(p))
                if entry is None:
                    kept.append(p)
                elif entry.owner == self.rank:
                    kept.append(entry.shadow if entry.shadow is not None else p)
                    if entry.shadow is not None and p in optimizer.state:  # state made in __init__ (seeds)
                        optimizer.state[entry.shadow] = optimizer.state.pop(p)
                else:
                    optimizer.state.pop(p, None)
            g["params"] = kept
        self._shadow_of = {id(e.shadow): e for e in self.owned.values() if e.shadow is not None}

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
        """Whole gradient and parameter onto the owner's shadow (every rank joins each all-gather)."""
        for e in self.owned.values():
            if not is_dtensor(e.param):
                continue  # replicated parameter and gradient (zero1): the owner updates it in place
            full_param = e.param.detach().full_tensor()
            full_grad = e.param.grad.full_tensor() if e.param.grad is not None else None
            if e.owner == self.rank:
                e.shadow.data.copy_(full_param)
                e.shadow.grad = full_grad

    def _gather_params_only(self) -> None:
        for e in self.owned.values():
            if is_dtensor(e.param):
                full_param = e.param.detach().full_tensor()
                if e.owner == self.rank:
                    e.shadow.data.copy_(full_param)

    @torch.no_grad()
    def _push_from_owners(self) -> None:
        """Broadcast each updated tensor from its owner; a DTensor keeps only its own slice."""
        from torch.distributed.tensor import distribute_tensor

        pending = []
        for e in self.owned.values():
            if not is_dtensor(e.param):
                pending.append(broadcast_(e.param.data, e.owner, self.env, group=self.group, async_op=True))
        for work in pending:
            if work is not None:
                work.wait()
        for e in self.owned.values():
            if not is_dtensor(e.param):
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
    if strategy == "zero1":
        managed = [True] * len(optimizer.param_groups)
    else:
        managed = whole_tensor_groups(optimizer, name)
        if getattr(optimizer, "impl", None) == "fused" and not fused_kernel_takes_dtensors(optimizer):
            optimizer.impl = "foreach"  # the same update as torch's multi-tensor kernels, which take DTensor shards
    if getattr(optimizer, "owns_backward", False) or any(managed):
        reason = refusal(optimizer, strategy, any(managed))
        if reason:
            raise ConfigError("optim.name", reason)
    if not any(managed):
        return optimizer  # elementwise: exact on local shards
    return OwnerShardedOptimizer(optimizer, managed, env)
