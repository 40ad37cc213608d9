"""Multi-tensor launch machinery shared by the fused optimizer kernels.

One launch updates every tensor of a group: each Triton program handles one fixed-size chunk of
one tensor. Two small int64 tables on the device tell a program where to work:

* the *tensor table* ``[T, NCOL]`` holds, per tensor, the raw addresses of its operands
  (param, grad, states, ...) and its element count; it changes only when a tensor is reallocated
  (``zero_grad(set_to_none=True)`` may hand out new grad buffers), so it is cached by address;
* the *chunk table* ``[C, 2]`` holds ``(tensor index, first element)`` per program and depends
  only on the sizes, so it is built once per set of shapes.

Kernels are kept as plain Python functions and handed to ``triton.jit`` on first launch, not at
import: triton decides between compiling and its CPU interpreter (``TRITON_INTERPRET=1``) when a
function is decorated, and tests switch the interpreter on after this package is imported.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Callable, Iterable, Sequence

import torch

_TABLE_CACHE_SIZE = 16


def interpret_mode() -> bool:
    """True when triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).

    Read through triton's own knob so we agree with it on which spellings count as true.
    """
    try:
        from triton import knobs
    except ImportError:
        return False
    return bool(knobs.runtime.interpret)


class LazyKernel:
    """A kernel function compiled (or interpreted) on first launch, per interpreter setting."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self._compiled: dict[bool, object] = {}

    def __getitem__(self, grid):
        import triton

        mode = interpret_mode()
        kernel = self._compiled.get(mode)
        if kernel is None:
            kernel = self._compiled[mode] = triton.jit(self.fn)
        return kernel[grid]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds: FSDP2 parameters and their states are DTensors."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def block_sizes(gpu_block: int, gpu_chunk: int, interp_block: int, interp_chunk: int) -> tuple[int, int]:
    """(BLOCK, CHUNK): elements per inner iteration and per program.

    The interpreter pays per operation, not per element (numpy runs each op on the whole tile),
    so it gets large tiles and few programs.
    """
    return (interp_block, interp_chunk) if interpret_mode() else (gpu_block, gpu_chunk)


class LaunchTables:
    """Device-side tensor and chunk tables, cached by the addresses and sizes they describe.

    A table built from the same addresses and sizes is byte-identical, so reusing it is correct
    even if a buffer was freed and another one landed at the same address.
    """

    def __init__(self):
        self._tensor_tables: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._chunk_tables: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def tensor_table(self, rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
        key = (device, tuple(tuple(r) for r in rows))
        table = self._tensor_tables.get(key)
        if table is None:
            host = torch.tensor(key[1], dtype=torch.int64)
            if device.type == "cuda":
                host = host.pin_memory()
            table = host.to(device, non_blocking=True)
            _remember(self._tensor_tables, key, table)
        else:
            self._tensor_tables.move_to_end(key)
        return table

    def chunk_table(self, numels: Sequence[int], chunk: int, device: torch.device) -> torch.Tensor:
        key = (device, tuple(numels), chunk)
        table = self._chunk_tables.get(key)
        if table is None:
            counts = torch.tensor([(n + chunk - 1) // chunk for n in numels], dtype=torch.int64)
            tensor_idx = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
            first_chunk = torch.cumsum(counts, 0) - counts
            starts = (torch.arange(int(counts.sum()), dtype=torch.int64) - first_chunk[tensor_idx]) * chunk
            table = torch.stack([tensor_idx, starts], dim=1).contiguous().to(device)
            _remember(self._chunk_tables, key, table)
        else:
            self._chunk_tables.move_to_end(key)
        return table


def _remember(cache: OrderedDict, key, value) -> None:
    cache[key] = value
    while len(cache) > _TABLE_CACHE_SIZE:
        cache.popitem(last=False)


def group_by(keys: Iterable[tuple], n: int) -> dict[tuple, list[int]]:
    """Indices 0..n-1 grouped by their key (dtype/device combination), in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, key in zip(range(n), keys):
        groups.setdefault(key, []).append(i)
    return groups


def contiguous_grad(g: torch.Tensor) -> torch.Tensor:
    """Kernels index flat memory; a strided gradient (rare: expanded or transposed) is copied."""
    return g if g.is_contiguous() else g.contiguous()


def check_writable(name: str, tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError(f"fused optimizer kernels need contiguous {name} tensors; got strides {t.stride()}")


def scalar_operand(value: float | torch.Tensor, device: torch.device) -> tuple[float, torch.Tensor | None]:
    """(host value, device tensor or None) for an lr that may live on the device.

    A device lr lets schedules change it without recompiling CUDA graphs or syncing the host.
    """
    if isinstance(value, torch.Tensor):
        t = local_tensor(value)
        if t.device != device:
            t = t.to(device)
        return 0.0, t.to(torch.float32).reshape(())
    return struct.unpack("f", struct.pack("f", float(value)))[0], None


def device_step(step: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The step count as the 0-dim float32 tensor on ``device`` that kernels read."""
    step = local_tensor(step)
    if step.device != device or step.dtype != torch.float32:
        step = step.to(device=device, dtype=torch.float32)
    return step
