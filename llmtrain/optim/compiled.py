"""Compiled optimizer updates: the ``impl="fused"`` path of optimizers torch has no kernel for.

Why: on a CPU an optimizer step is memory traffic. The foreach path makes one pass over memory per
operation (an Adam-like step is about ten passes); inductor fuses a whole update into one loop
that reads each operand once and writes each result once - what torch's hand-written
``_fused_adamw_`` does. On CUDA inductor emits the same fusion as a Triton kernel.

An update is the optimizer's own per-tensor function (``lion_update_``, ...), so eager and fused
run one rule. ``apply_updates(fn, entries, fused=..., static=..., shared=...)`` runs it over a
parameter group with three kinds of arguments:

* static keywords (betas, eps, flags) are fixed for a run and baked into the graph;
* tensors: the parameter and its states, flattened to 1-D where the rule is elementwise;
* floats a schedule changes - lr, bias corrections of each tensor's step - enter as 0-dim
  float64 tensors, so a new lr is new data for the same graph, never a recompile.

A rule may return tensors: a graph's outputs are stored, where an intermediate is inlined into
every loop that uses it. Rules return their per-tensor scalars and per-row/column factors (LAMB's
trust ratio, Adafactor's factors) so that they are computed once, not per element.

Tensors of the same layout are updated together, a chunk of up to ``CHUNK`` per call of one
graph, compiled with static shapes once per (rule, static values, layout, chunk length). A model
has a handful of distinct shapes, so a run compiles a handful of small graphs (seconds each on a
2-core CPU, paid at the first step, which is why ``impl="auto"`` compiles only big groups). Each
graph gets its own copy of the function's code object: dynamo keeps graphs and counts recompiles
per code object, so graphs never exhaust one shared recompile budget and fall back to eager.
"""

from __future__ import annotations

import os
import shutil
import types
from typing import Callable

import torch

# ``impl="auto"`` compiles a group's update only when the group is big enough for the faster
# steps to repay the one-off compile (~5-20 s on a 2-core CPU): below ~4M elements a step takes
# a few ms either way, so eager wins over any run a user would make at that size.
AUTO_MIN_NUMEL = 1 << 22


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
    """``fn`` with its own code object (see the module docstring: one dynamo cache per graph)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def scalar(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A 0-dim float64 tensor: schedule-driven values enter compiled graphs as data."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float64)
    return torch.tensor(float(value), dtype=torch.float64, device=device)


# Same-layout tensors of a group are updated by one compiled graph per chunk of at most this many:
# one call instead of eight (each call of a compiled function costs ~30 us of guards and
# wrappers, which for a 75-tensor model was a fifth of an AdaBelief step), while a graph stays
# small enough to compile in a few seconds (inductor's scheduler is superlinear in graph size).
CHUNK = 8

_CHUNK_GRAPHS: dict[tuple, Callable] = {}


def _chunk_runner(fn: Callable, static: dict) -> Callable:
    def run_chunk(entries, per_tensor, shared):
        return [fn(*tensors, *(() if per_tensor is None else per_tensor[i].unbind()), **shared, **static)
                for i, tensors in enumerate(entries)]
    return run_chunk


def _layout(tensors: tuple) -> tuple:
    return tuple(None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)


def _views_and_layout(tensors: tuple, flatten: bool) -> tuple[tuple, tuple]:
    """The tensors a graph receives and the key of their layout: 1-D views when ``flatten`` and all
    are contiguous (one graph serves every shape of an elementwise rule), else the tensors as they are.

    Plain loops, and (numel, dtype, device) as the layout of a 1-D view instead of its shape and
    strides, because this runs for every tensor at every step (7.5 -> 6.2 us per entry of three
    tensors)."""
    if flatten:
        for t in tensors:
            if t is not None and not t.is_contiguous():
                break
        else:
            views, layout = [], []
            for t in tensors:
                if t is None:
                    views.append(None)
                    layout.append(None)
                else:
                    views.append(t.view(-1))
                    layout.append((t.numel(), t.dtype, t.device))
            return tuple(views), tuple(layout)
    return tuple(tensors), _layout(tensors)


def apply_updates(
    fn: Callable,
    entries: list[tuple[tuple, tuple]],
    *,
    fused: bool,
    static: dict,
    shared: dict | None = None,
    flatten: bool = True,
) -> list:
    """Run the per-tensor rule ``fn`` over one parameter group; returns its results in order.

    ``entries`` are ``(tensors, per_tensor)`` pairs: the tensors ``fn`` updates (``None`` for an
    absent state) and the floats that differ per tensor (bias corrections of its own step count).
    ``shared`` holds the floats every tensor uses (lr), ``static`` the hyperparameters fixed for
    the run. Eager: ``fn(*tensors, *per_tensor, **shared, **static)`` per entry. Fused: entries of
    the same layout (shapes, strides, dtypes; 1-D views when ``flatten`` and the rule is
    elementwise) are run in chunks of ``CHUNK`` by a graph compiled once per (rule, static values,
    layout, chunk length), with every float passed as 0-dim float64 tensor data, so a schedule
    never recompiles. Shapes are static in these graphs: inductor sizes each loop for its tensor.
    """
    shared = shared or {}
    if not fused:
        return [fn(*tensors, *per_tensor, **shared, **static) for tensors, per_tensor in entries]
    device = next(t for t in entries[0][0] if t is not None).device
    shared_t = {key: scalar(value, device) for key, value in shared.items()}
    buckets: dict[tuple, list[int]] = {}
    views = []
    for i, (tensors, per_tensor) in enumerate(entries):
        view, layout = _views_and_layout(tensors, flatten)
        views.append(view)
        buckets.setdefault((layout, len(per_tensor)), []).append(i)
    static_key = tuple(sorted(static.items()))
    results: list = [None] * len(entries)
    for (layout, n_per), indices in buckets.items():
        for start in range(0, len(indices), CHUNK):
            chunk = indices[start:start + CHUNK]
            key = (fn, static_key, layout, n_per, len(chunk))
            graph = _CHUNK_GRAPHS.get(key)
            if graph is None:
                graph = _CHUNK_GRAPHS[key] = torch.compile(_fresh_copy(_chunk_runner(fn, static)), fullgraph=True,
                                                            dynamic=False)
            per_tensor = None
            if n_per:
                per_tensor = torch.tensor([entries[i][1] for i in chunk], dtype=torch.float64, device=device)
            out = graph([views[i] for i in chunk], per_tensor, shared_t)
            for i, value in zip(chunk, out):
                results[i] = value
    return results


def cached_graphs(fn: Callable | None = None) -> int:
    """How many compiled graphs exist (for the rule ``fn``, or in all)."""
    return sum(1 for key in _CHUNK_GRAPHS if fn is None or key[0] is fn)
