"""Process group, device, and wrapping a model for a data-parallel strategy.

The trainer asks only for: ``init_distributed`` (who am I, which device), ``parallelize`` (wrap
the model), ``grad_sync`` (skip gradient reduction on accumulation micro-steps), ``unwrap`` (the
plain model for generation and export) and ``all_reduce_mean`` (a global loss for logging).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from llmtrain.errors import ConfigError


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    strategy: str = "none"

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
    """Join the torchrun process group if launched by torchrun; NCCL on GPU, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    strategy = resolve_strategy(strategy, world_size)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(rank, local_rank, world_size, device, strategy)


def parallelize(model: torch.nn.Module, env: DistEnv, compile: bool = False) -> torch.nn.Module:
    """Wrap the model for the strategy, then compile. Activation checkpointing lives in the model."""
    if env.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [env.device.index] if env.device.type == "cuda" else None
        model = DDP(model, device_ids=device_ids)
    elif env.strategy != "none":
        raise ConfigError("distributed.strategy", f"{env.strategy} is not available in this build; expected none or ddp")
    if compile:
        model = torch.compile(model)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)       # DDP


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients only on the last micro-step of an accumulation window."""
    inner = getattr(model, "_orig_mod", model)
    if not enabled and hasattr(inner, "no_sync"):
        with inner.no_sync():
            yield
    else:
        yield


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
