"""Helpers shared by the optimizer modules: ``impl`` resolution, lazy kernels, state initialisation."""

from __future__ import annotations

import importlib
import os
import time
from typing import Callable, Iterable

import torch

from llmtrain.config import IMPLS
from llmtrain.errors import ConfigError, choices


def triton_runnable() -> bool:
    """Triton kernels run on CUDA, or on CPU under the interpreter (TRITON_INTERPRET=1)."""
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_impl(impl: str, *, name: str, has_fused: bool, has_triton: bool) -> str:
    """Turn the user's ``impl`` into the path ``step()`` takes; ``auto`` picks fused, else foreach.

    ``fused`` means torch's own fused kernel (``torch._fused_adamw_``), available on CPU and CUDA;
    ``triton`` means llmtrain's kernel in ``llmtrain.optim.kernels``.
    """
    allowed = [i for i in IMPLS if (i != "fused" or has_fused) and (i != "triton" or has_triton)]
    if impl not in allowed:
        raise ConfigError("optim.impl", f"got {impl!r} for {name}, expected {choices(allowed)}")
    if impl == "triton" and not triton_runnable():
        raise ConfigError("optim.impl", "triton needs a CUDA GPU (or TRITON_INTERPRET=1 to run the kernel on CPU)")
    if impl == "auto":
        return "fused" if has_fused else "foreach"
    return impl


def load_kernel(module: str, function: str) -> Callable:
    """Import ``llmtrain.optim.kernels.<module>.<function>`` lazily (Triton is optional)."""
    try:
        return getattr(importlib.import_module(f"llmtrain.optim.kernels.{module}"), function)
    except (ImportError, AttributeError) as err:
        if isinstance(err, ImportError) and (err.name or "").split(".")[0] == "triton":
            from llmtrain.optim.kernels import TRITON_MISSING

            raise ConfigError("optim.impl", f"{TRITON_MISSING}; use impl=auto") from None
        raise ConfigError(
            "optim.impl", f"triton kernel llmtrain.optim.kernels.{module}.{function} is unavailable ({err}); use impl=auto"
        ) from None


# Inductor's CPU float32 sums over more than 4096 elements keep a cascade-sum helper per vector
# lane (for accuracy), which measured 2x slower than the loads they reduce (6.3M elements: 0.87 vs
# 0.45 ms); a float64 accumulator is as accurate, as fast as the loads, and still fuses into one
# loop with the elementwise work that produces the summand.
def sum_sq(x: torch.Tensor) -> torch.Tensor:
    """Σ x² over all elements as a 0-dim tensor of ``x``'s dtype, accumulated in float64 on CPU."""
    acc = torch.float64 if x.device.type == "cpu" else torch.float32
    return (x * x).sum(dtype=acc).to(x.dtype)


def norm(x: torch.Tensor) -> torch.Tensor:
    """‖x‖₂ over all elements (``sum_sq``)."""
    return sum_sq(x).sqrt()


def check_positive(name: str, value: float, *, allow_zero: bool = True) -> None:
    """torch.optim convention: invalid hyperparameters raise ValueError("Invalid <name>: <value>")."""
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"Invalid {name}: {value}")


def check_betas(betas: Iterable[float], count: int = 2) -> None:
    betas = tuple(betas)
    if len(betas) != count or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Invalid betas: {betas} (expected {count} values in [0, 1))")


def step_tensor(state: dict, param: torch.Tensor) -> torch.Tensor:
    """The per-parameter step counter as a float32 0-dim tensor on the parameter's device.

    Fused kernels (torch's and ours) read the step from the device; a checkpoint loaded onto
    another device may bring it back on the CPU, so it is moved here when needed.
    """
    step = state.get("step")
    if step is None:
        step = state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
    elif not isinstance(step, torch.Tensor):
        step = state["step"] = torch.tensor(float(step), dtype=torch.float32, device=param.device)
    elif step.device != param.device:
        step = state["step"] = step.to(param.device, torch.float32)
    return step


def resolve_compiled_impl(impl: str, *, name: str, has_foreach: bool = False, has_triton: bool = False) -> str:
    """``impl`` for an optimizer whose ``fused`` path is a compiled update (``llmtrain.optim.compiled``).

    ``auto`` is kept: it is decided per parameter group at the first step, by size (``group_impl``).
    """
    from llmtrain.optim.compiled import compile_available

    allowed = [i for i in IMPLS if (i != "foreach" or has_foreach) and (i != "triton" or has_triton)]
    if impl not in allowed:
        raise ConfigError("optim.impl", f"got {impl!r} for {name}, expected {choices(allowed)}")
    if impl == "fused" and not compile_available():
        raise ConfigError("optim.impl", f"fused {name} is a torch.compile'd update and needs a C++ compiler; use impl=auto")
    if impl == "triton" and not triton_runnable():
        raise ConfigError("optim.impl", "triton needs a CUDA GPU (or TRITON_INTERPRET=1 to run the kernel on CPU)")
    return impl


def is_sharded(params: list[torch.Tensor]) -> bool:
    """Whether the group holds DTensors (FSDP2 shards), which torch's fused kernels do not all support."""
    return any(callable(getattr(p, "to_local", None)) for p in params)


def group_impl(impl: str, params: list[torch.Tensor], fallback: str) -> str:
    """The path one group takes: ``auto`` compiles big groups (the compile pays for itself), else ``fallback``."""
    if impl != "auto":
        return impl
    if is_sharded(params):  # FSDP's DTensors: stay on the eager ops every sharding rule covers
        return fallback
    from llmtrain.optim.compiled import auto_compiles

    return "fused" if auto_compiles(sum(p.numel() for p in params)) else fallback


class RefreshTimer:
    """Wall time a matrix optimizer spends refreshing its preconditioners (Shampoo's roots, SOAP's
    eigenbases, GaLore's projections), which happens every k steps: ``last_refresh_ms`` is the
    cost of the latest step that refreshed, ``amortised_ms`` that cost spread over all steps.
    Host time; on CUDA it counts launches unless the caller synchronises.
    """

    def __init__(self) -> None:
        self.last_refresh_ms = 0.0
        self.total_ms = 0.0
        self.steps = 0
        self._current = 0.0

    def time(self, fn: Callable, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self._current += (time.perf_counter() - start) * 1e3
        return out

    def end_step(self) -> None:
        if self._current > 0.0:
            self.last_refresh_ms = self._current
        self.total_ms += self._current
        self.steps += 1
        self._current = 0.0

    @property
    def amortised_ms(self) -> float:
        return self.total_ms / max(self.steps, 1)
