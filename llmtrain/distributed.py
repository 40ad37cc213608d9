"""Process group, device, and wrapping a model for a data-parallel strategy.

The trainer asks only for: ``init_distributed`` (who am I, which device), ``parallelize`` (wrap
the model), ``grad_sync`` (skip gradient reduction on accumulation micro-steps), ``unwrap`` (the
plain model for generation and export) and the collective helpers (``all_reduce_mean``,
``any_rank``, ``barrier`` ...), the only place llmtrain calls ``torch.distributed`` collectives.

What each strategy shards (N data-parallel ranks):

=========  ==================  ===================  =============================================
strategy   parameters          gradients            optimizer state
=========  ==================  ===================  =============================================
none       one process         -                    -
ddp        replicated          all-reduced          replicated
zero1      replicated          all-reduced          1/N: each tensor owned by one rank
zero2      1/N between steps,  reduce-scattered     1/N (local shards; FSDP2, no reshard after
           whole in fwd/bwd                         forward)
fsdp       1/N (ZeRO-3)        reduce-scattered     1/N (FSDP2 per block + root)
hsdp       1/S within a node,  reduce-scattered in  1/S (S = ranks per node); replicated across
           replicated across   a node, all-reduced  nodes
           nodes               across nodes
=========  ==================  ===================  =============================================

Zero1 and matrix optimizers on sharded parameters go through ``llmtrain.optim.sharded``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from llmtrain.errors import ConfigError, UserError

SHARDED_PARAM_STRATEGIES = ("zero2", "fsdp", "hsdp")  # parameters are DTensor shards


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    strategy: str = "none"
    mesh: Any = None  # the DeviceMesh the parameters are sharded over (zero2/fsdp/hsdp), set by parallelize

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", f"got {name!r} but no CUDA GPU is visible; use auto or cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def resolve_strategy(strategy: str, world_size: int) -> str:
    if strategy == "auto":
        return "none" if world_size == 1 else "fsdp"
    if world_size == 1 and strategy != "none":
        return "none"  # one process: every strategy degenerates to plain training
    if strategy == "none" and world_size > 1:
        raise ConfigError("distributed.strategy", f"none cannot run on {world_size} processes; expected ddp, zero1, zero2, fsdp, hsdp or auto")
    return strategy


def init_distributed(device_name: str, strategy: str, timeout_s: int = 600) -> DistEnv:
    """Join the torchrun process group if launched by torchrun; NCCL on GPU, gloo on CPU.

    ``timeout_s`` bounds every collective, so a rank that dies leaves the others waiting at most
    that long (torchrun also tears the whole job down as soon as one worker exits non-zero).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    strategy = resolve_strategy(strategy, world_size)
    if device.type == "cuda":  # object collectives and NCCL's barrier use the current device
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(rank, local_rank, world_size, device, strategy)


def hsdp_shape(world_size: int, gpus_per_node: int, local_world_size: Optional[int] = None) -> tuple[int, int]:
    """(replicas, shard size) of the HSDP mesh: shard within a node, replicate across nodes.

    The shard size is the number of ranks on a node (torchrun's LOCAL_WORLD_SIZE), capped by
    ``distributed.gpus_per_node`` so a smaller shard group can be asked for explicitly.
    """
    shard = min(gpus_per_node, local_world_size or gpus_per_node)
    if shard <= 0 or world_size % shard:
        raise ConfigError("distributed.gpus_per_node",
                          f"hsdp shards over {shard} ranks per node, which does not divide the world size {world_size}")
    return world_size // shard, shard


def device_mesh(env: DistEnv, gpus_per_node: int = 8):
    """1-D mesh over all ranks (zero2/fsdp) or 2-D (replicate, shard) mesh (hsdp)."""
    from torch.distributed.device_mesh import init_device_mesh

    if env.strategy == "hsdp":
        local = os.environ.get("LOCAL_WORLD_SIZE")
        shape = hsdp_shape(env.world_size, gpus_per_node, int(local) if local else None)
        return init_device_mesh(env.device.type, shape, mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("shard",))


def fsdp_mixed_precision(param_dtype: Optional[torch.dtype]):
    """FSDP2's policy for the training precision: bf16/fp16 compute on gathered parameters,
    gradients reduced and master weights (so optimizer state) kept in fp32; fp32 changes nothing."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if param_dtype in (torch.bfloat16, torch.float16):
        return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _fully_shard(model: torch.nn.Module, env: DistEnv, mesh, param_dtype: Optional[torch.dtype],
                 compile: bool) -> torch.nn.Module:
    """FSDP2 per transformer block, then at the root (torchtitan's order: compile, then shard)."""
    from torch.distributed.fsdp import fully_shard

    mp = fsdp_mixed_precision(param_dtype)
    # zero2 keeps whole parameters from forward to backward (no second all-gather); zero3 frees them.
    reshard = env.strategy != "zero2"
    blocks = getattr(model, "layers", None)
    if blocks is None:
        raise ConfigError("distributed.strategy", f"{env.strategy} shards per transformer block, but {type(model).__name__} has no .layers")
    for i, block in enumerate(blocks):
        if compile:
            block.compile()
        # The last block's parameters are needed again right away by backward: keep them.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard and i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return model


def parallelize(model: torch.nn.Module, env: DistEnv, compile: bool = False,
                param_dtype: Optional[torch.dtype] = None, options: Any = None) -> torch.nn.Module:
    """Wrap the model for ``env.strategy``, with compile applied in the order each wrapper needs.

    ``param_dtype`` is the training precision (bf16 selects FSDP's bf16-compute / fp32-reduce
    policy); ``options`` is the ``distributed`` config (gpus_per_node, grad_compression).
    Activation checkpointing lives in the model, so it composes with every strategy.
    """
    gpus_per_node = getattr(options, "gpus_per_node", 8)
    compression = getattr(options, "grad_compression", "none")
    if compression != "none" and env.strategy != "ddp" and env.world_size > 1:
        raise ConfigError("distributed.grad_compression", f"{compression} compresses DDP's all-reduce; use distributed.strategy=ddp or grad_compression=none")
    if env.strategy in ("ddp", "zero1"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [env.device.index] if env.device.type == "cuda" else None
        model = DDP(model, device_ids=device_ids)
        if compression == "powersgd":
            register_powersgd(model, getattr(options, "powersgd_rank", 4))
    elif env.strategy in SHARDED_PARAM_STRATEGIES:
        env.mesh = device_mesh(env, gpus_per_node)
        model = _fully_shard(model, env, env.mesh, param_dtype, compile)
        return model
    elif env.strategy != "none":
        raise ConfigError("distributed.strategy", f"got {env.strategy!r}, expected none, ddp, zero1, zero2, fsdp, hsdp or auto")
    if compile:
        model = torch.compile(model)
    return model


class CommCounter:
    """Bytes of gradient this rank handed to all-reduce since the last ``comm_bytes`` read."""

    def __init__(self, powersgd_state=None):
        self.powersgd_state = powersgd_state
        self.bytes = 0


def _counting_powersgd_hook(counter: CommCounter, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

    state, buffer = counter.powersgd_state, bucket.buffer()
    if state.iter < state.start_powerSGD_iter:  # warm-up steps: a plain all-reduce of the bucket
        counter.bytes += buffer.numel() * buffer.element_size()
        return powersgd.powerSGD_hook(state, bucket)
    before = state.total_numel_after_compression  # the hook adds P, Q and uncompressed sizes
    fut = powersgd.powerSGD_hook(state, bucket)
    counter.bytes += (state.total_numel_after_compression - before) * buffer.element_size()
    return fut


def register_powersgd(model: torch.nn.Module, rank: int) -> None:
    """Low-rank gradient compression for DDP (Vogels et al. 2019; torch's powerSGD_hook) with
    error feedback; ``comm_bytes(model)`` reports what each step all-reduced."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

    if rank <= 0:
        raise ConfigError("distributed.powersgd_rank", f"got {rank}, expected a positive integer")
    state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=2,
                                   min_compression_rate=1.0, use_error_feedback=True, warm_start=True)
    model.comm_counter = CommCounter(state)
    model.register_comm_hook(model.comm_counter, _counting_powersgd_hook)


def comm_bytes(model: torch.nn.Module) -> Optional[int]:
    """Gradient bytes all-reduced since the last call (None when the strategy does not count)."""
    counter = getattr(getattr(model, "_orig_mod", model), "comm_counter", None)
    if counter is None:
        return None
    sent, counter.bytes = counter.bytes, 0
    return sent


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model without compile/DDP wrappers (FSDP2 shards in place: the same object)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)       # DDP


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients only on the last micro-step of an accumulation window."""
    inner = getattr(model, "_orig_mod", model)
    if enabled:
        yield
    elif hasattr(inner, "no_sync"):  # DDP
        with inner.no_sync():
            yield
    elif hasattr(inner, "set_requires_gradient_sync"):  # FSDP2: gradients accumulate unsharded
        inner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)
    else:
        yield


# ------------------------------------------------------------------ collectives
# Every collective in llmtrain goes through these helpers. Each puts its tensors on ``env.device``
# first: gloo takes CPU tensors, NCCL refuses them, so a tensor made without ``device=`` would pass
# every CPU test and break the first multi-GPU step. Object collectives pickle through a tensor on
# the device too: torch.cuda.set_device in init_distributed makes that the run's GPU.


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean of ``value`` over ranks, on ``env.device`` (``value`` itself is left as it is)."""
    if env.world_size > 1:
        value = value.detach().to(env.device, copy=True)
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


def all_reduce_max(value: float, env: DistEnv) -> float:
    """The largest ``value`` over ranks (reduced in a tensor on the run's device: NCCL takes no CPU tensor)."""
    if env.world_size <= 1:
        return value
    t = torch.tensor(float(value), device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when ``flag`` is true on any rank (a signal that reached only one)."""
    return all_reduce_max(float(flag), env) > 0


def broadcast_(tensor: torch.Tensor, src: int, env: DistEnv, group=None, async_op: bool = False):
    """Overwrite ``tensor`` in place with global rank ``src``'s; the work handle when ``async_op``.

    In place means the tensor must already be on ``env.device``: refused here with both devices
    named, rather than by NCCL on the first GPU run.
    """
    if tensor.device != env.device:
        raise ValueError(f"broadcast_ got a tensor on {tensor.device}; the run's device is {env.device}")
    return dist.broadcast(tensor, src=src, group=group, async_op=async_op)


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled through a tensor on ``env.device``)."""
    if env.world_size <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=env.device)
    return box[0]


def all_gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj``, in rank order (pickled through the current device: see init_distributed)."""
    if env.world_size <= 1:
        return [obj]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def on_main(fn: Callable[[], Any], env: DistEnv) -> Any:
    """``fn()`` on rank 0 only (its result there, None elsewhere); a UserError it raises is raised on
    every rank, so all ranks stop with the same one-line error instead of waiting in a collective."""
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except UserError as err:
            error = err
    error = broadcast_object(error, env)
    if error is not None:
        raise error
    return result


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        if env.device.type == "cuda":  # NCCL's barrier all-reduces a tensor; unnamed, it guesses the GPU
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.world_size > 1 and dist.is_initialized():
        # Ranks reach the end at different times (rank 0 writes the summary and prints the sample):
        # no rank tears its process groups down while a peer may still be in a collective. (The
        # occasional SIGABRT at exit seen in CI came from interpreter teardown; see
        # exit_torchrun_worker.)
        barrier(env)
        dist.destroy_process_group()


def exit_torchrun_worker(code: int = 0) -> None:
    """In a torchrun worker (WORLD_SIZE > 1) whose work is done, exit now with ``code``, skipping
    interpreter teardown; elsewhere do nothing.

    Call it last: after checkpoints, metrics and summary are written, W&B is closed and the process
    groups are destroyed. Under load, letting Python finalise a process that used gloo now and then
    aborted it from C++ static destructors ("terminate called without an active exception",
    SIGABRT, about once in 20 two-rank runs in CI), which torchrun reports as a failed job.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
