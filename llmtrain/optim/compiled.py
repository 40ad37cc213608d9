"""Compiled per-tensor optimizer updates: the ``impl="fused"`` path of optimizers torch has no kernel for.

Why: on a CPU an optimizer step is memory traffic. The foreach path makes one pass over memory per
operation (an Adam-like step is about ten passes); inductor fuses a whole update into one loop
that reads each operand once and writes each result once - what torch's hand-written
``_fused_adamw_`` does. On CUDA inductor emits the same fusion as a Triton kernel.

An update is the optimizer's own per-tensor function (``lion_update_``, ...), so eager and fused
run one rule. ``compiled(fn, **static)`` returns it compiled with two kinds of arguments:

* static keywords (betas, eps, flags) are fixed for a run and baked into the graph;
* everything else is a tensor: the parameter and its states, flattened to 1-D where the rule is
  elementwise, and 0-dim float64 tensors (``scalar``) for what a schedule changes - lr, the step
  count, bias corrections - so a new lr is new data for the same graph, never a recompile.

Shapes are dynamic, so one graph serves every tensor of a model: the compile cost (seconds) is
paid once per (rule, static values, tensor rank), not per parameter shape, which is what lets
``impl="auto"`` choose it. Each cache key gets its own copy of the function's code object:
dynamo keeps graphs and counts recompiles per code object, so two optimizers (or two groups with
different betas) never exhaust one shared recompile budget and fall back to eager silently.
"""

from __future__ import annotations

import os
import shutil
import types
from typing import Any, Callable

import torch

# ``impl="auto"`` compiles a group's update only when the group is big enough for the faster
# steps to repay the one-off compile (~5-20 s on a 2-core CPU): below ~4M elements a step takes
# a few ms either way, so eager wins over any run a user would make at that size.
AUTO_MIN_NUMEL = 1 << 22

# Tensors at least this big get their own graph, traced on a large tensor (see ``compiled``).
PARALLEL_MIN_NUMEL = 1 << 16

_CACHE: dict[tuple, Callable] = {}


def compile_available() -> bool:
    """Inductor needs a C++ compiler on CPU; ``LLMTRAIN_NO_COMPILE=1`` turns the path off."""
    if os.environ.get("LLMTRAIN_NO_COMPILE") == "1":
        return False
    if torch.cuda.is_available():
        return True
    return any(shutil.which(cc) for cc in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


def auto_compiles(numel: int) -> bool:
    """Whether ``impl="auto"`` should take the compiled path for a group of ``numel`` elements."""
    return numel >= AUTO_MIN_NUMEL and compile_available()


def _fresh_copy(fn: Callable) -> Callable:
    """``fn`` with its own code object (see the module docstring: one dynamo cache per key)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def compiled(fn: Callable, **static: Any) -> Callable:
    """``fn`` compiled once for these static keyword values; call it with tensors only.

    Inductor sizes a dynamic-shape kernel's parallel loops by the shape it first sees, so a graph
    first traced on a 256-element norm weight runs a 10M-element matrix on one thread. Small and
    large tensors therefore get separate graphs, and the on-disk FX graph cache is off for these
    updates: it cannot tell those variants apart, and a cached small-tensor kernel made AdaBelief's
    step 3x slower (64 ms instead of 22 ms on the 26.7M-parameter bench set).
    """
    key = (fn, tuple(sorted(static.items())))
    out = _CACHE.get(key)
    if out is None:
        graphs: dict[bool, Callable] = {}

        def out(*tensors, **tensor_kwargs):
            large = tensors[0].numel() >= PARALLEL_MIN_NUMEL
            graph = graphs.get(large)
            if graph is None:
                graph = graphs[large] = torch.compile(_fresh_copy(fn), fullgraph=True, dynamic=True,
                                                      options={"fx_graph_cache": False})
            return graph(*tensors, **tensor_kwargs, **static)

        out.graphs = graphs  # type: ignore[attr-defined]  (tests look at which variants exist)
        _CACHE[key] = out
    return out


def scalar(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A 0-dim float64 tensor: schedule-driven values enter compiled graphs as data."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float64)
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def flat(*tensors: torch.Tensor | None) -> tuple:
    """1-D views for an elementwise rule (one graph for every shape), or the tensors unchanged
    when one of them is not contiguous (they must keep matching shapes)."""
    if all(t is None or t.is_contiguous() for t in tensors):
        return tuple(None if t is None else t.view(-1) for t in tensors)
    return tensors


def cached_graphs(fn: Callable | None = None) -> int:
    """How many (rule, static values) keys hold a compiled graph (for ``fn``, or in all)."""
    return sum(1 for key in _CACHE if fn is None or key[0] is fn)
