"""Catch tensors that reach a collective without having been put on the run's device.

On CPU every tensor is on the run's device, so gloo accepts a ``torch.tensor(x)`` that NCCL would
refuse ("No backend type associated with device type cpu"). This guard makes that mistake visible
on CPU: while it is active,

* a tensor made by a factory function (``torch.tensor``, ``zeros``, ``ones``, ``empty``, ``full``,
  ``arange`` ...) called from a frame in the ``llmtrain`` package without ``device=`` is tagged
  with where it was made (on a GPU run it would be a CPU tensor);
* an op whose tensor inputs are all tagged tags its new outputs (it would run on the CPU too);
* an explicit move clears the tag: ``.to(device)``, ``.to(other_tensor)`` (takes other's tag),
  ``.cuda()``, ``factory(..., device=...)``; ``.cpu()`` from llmtrain tags; ``t.data = x`` takes x's;
* a tagged tensor given to a ``torch.distributed`` collective raises ``UntargetedCollective``.

Use it in-process (``with DeviceGuard(): ...``) or as a launcher that runs the llmtrain CLI under
the guard in every rank and writes ``<report_dir>/rank<N>.json`` (collectives seen, violations):

    LLMTRAIN_DEVICE_GUARD_DIR=/tmp/r torchrun --nproc_per_node=2 tests/device_guard.py train.max_steps=3 ...
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parent.parent
LLMTRAIN_DIR = str(REPO / "llmtrain") + os.sep
TORCH_OVERRIDES = str(Path(torch.overrides.__file__))
THIS_FILE = str(Path(__file__).resolve())
TAG = "_made_without_device"  # attribute holding "file:line" of the factory call

FACTORIES = {getattr(torch, name) for name in (
    "tensor", "as_tensor", "asarray", "scalar_tensor", "zeros", "ones", "empty", "full", "empty_strided",
    "arange", "range", "linspace", "logspace", "eye", "rand", "randn", "randint", "randperm",
    "tril_indices", "triu_indices",
)}
COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "broadcast", "all_gather", "all_gather_into_tensor", "_all_gather_base",
    "all_gather_coalesced", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all",
    "all_to_all_single", "reduce", "gather", "scatter", "send", "recv", "isend", "irecv", "batch_isend_irecv",
    "_broadcast_coalesced", "barrier", "monitored_barrier", "broadcast_object_list", "all_gather_object",
    "gather_object", "scatter_object_list",
)


class UntargetedCollective(RuntimeError):
    """A tensor made without ``device=`` reached a collective (NCCL would refuse a CPU tensor)."""


def tag_of(t: Any) -> Optional[str]:
    return getattr(t, TAG, None) if isinstance(t, torch.Tensor) else None


def _set_tag(t: torch.Tensor, origin: Optional[str]) -> None:
    try:
        setattr(t, TAG, origin)
    except (AttributeError, RuntimeError):  # a tensor type that takes no attributes
        pass


def _llmtrain_caller() -> Optional[str]:
    """"file:line" of the code that called the torch function, when that code is in llmtrain."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename in (THIS_FILE, TORCH_OVERRIDES):
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(LLMTRAIN_DIR):
        return None
    return f"{os.path.relpath(frame.f_code.co_filename, REPO)}:{frame.f_lineno}"


def _is_data_setter(func) -> bool:
    return getattr(func, "__name__", "") == "__set__" and getattr(func, "__self__", None) is torch._C.TensorBase.data


def _to_target(args: tuple, kwargs: dict) -> tuple[bool, Optional[torch.Tensor]]:
    """(names a device, the tensor it copies placement from) for ``Tensor.to(*args, **kwargs)``."""
    if kwargs.get("device") is not None:
        return True, None
    for a in args[1:]:
        if isinstance(a, torch.Tensor):
            return False, a
        if isinstance(a, (torch.device, str, int)) and not isinstance(a, bool):
            return True, None
    return False, None


class _TaggingMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES:
            out = func(*args, **kwargs)
            if kwargs.get("device") is None and isinstance(out, torch.Tensor):
                origin = _llmtrain_caller()
                if origin:
                    _set_tag(out, origin)
            return out
        if _is_data_setter(func):
            result = func(*args, **kwargs)
            _set_tag(args[0], tag_of(args[1]))
            return result
        if func is torch.Tensor.to:
            return self._to(func, args, kwargs)
        if func is torch.Tensor.cuda:
            out = func(*args, **kwargs)
            return self._retagged(out, args[0], None)
        if func is torch.Tensor.cpu:
            out = func(*args, **kwargs)
            origin = _llmtrain_caller()
            return self._retagged(out, args[0], origin) if origin else out
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        tags = [tag_of(t) for t in inputs]
        if inputs and all(tags) and kwargs.get("device") is None:
            known = {id(t) for t in inputs}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and id(t) not in known:
                    _set_tag(t, tags[0])
        return out

    @staticmethod
    def _retagged(out, source: torch.Tensor, origin: Optional[str]):
        """``out`` with tag ``origin``; a new alias when a no-op move returned ``source`` itself
        (on a GPU run the move makes a new tensor, and ``source`` keeps its placement)."""
        if out is source and tag_of(source) != origin:
            out = out.view_as(out)
        if isinstance(out, torch.Tensor):
            _set_tag(out, origin)
        return out

    def _to(self, func, args, kwargs):
        out = func(*args, **kwargs)
        moves, like = _to_target(args, kwargs)
        if moves:
            return self._retagged(out, args[0], None)
        if like is not None:
            return self._retagged(out, args[0], tag_of(like))
        if out is not args[0] and tag_of(args[0]):
            _set_tag(out, tag_of(args[0]))
        return out


class DeviceGuard:
    """Context manager: the tagging mode plus checks on every ``torch.distributed`` collective."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.violations: list[str] = []
        self._saved: list[tuple[Any, str, Any]] = []
        self._inside = False
        self._mode = _TaggingMode()

    def _checked(self, name: str, fn):
        def collective(*args, **kwargs):
            if self._inside:  # c10d re-dispatches through torch-function modes to the public name: this
                return fn(*args, **kwargs)
            self.calls[name] += 1
            for t in tree_flatten((args, kwargs))[0]:
                origin = tag_of(t)
                if origin:
                    message = (f"{name} got a tensor made without device= at {origin}: on a GPU run it is a "
                               f"CPU tensor, which NCCL refuses")
                    self.violations.append(message)
                    raise UntargetedCollective(message)
            self._inside = True
            try:
                return fn(*args, **kwargs)
            finally:
                self._inside = False

        collective.__wrapped__ = fn
        return collective

    def __enter__(self) -> "DeviceGuard":
        for name in COLLECTIVES:
            fn = getattr(c10d, name, None) or getattr(dist, name, None)
            if fn is None:
                continue
            wrapped = self._checked(name, fn)
            for module in (dist, c10d):
                if getattr(module, name, None) is fn:
                    self._saved.append((module, name, fn))
                    setattr(module, name, wrapped)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)
        self._saved.clear()

    def report(self) -> dict[str, Any]:
        return {"collectives": dict(self.calls), "violations": self.violations}


def _run_cli_under_guard() -> None:
    """Run ``llmtrain`` with this process's arguments; write the rank's report before the trainer
    destroys the process group (the worker then exits without interpreter teardown)."""
    report_dir = Path(os.environ["LLMTRAIN_DEVICE_GUARD_DIR"])
    report_dir.mkdir(parents=True, exist_ok=True)
    rank = os.environ.get("RANK", "0")
    guard = DeviceGuard()
    destroy = dist.destroy_process_group

    def write_report() -> None:
        (report_dir / f"rank{rank}.json").write_text(json.dumps(guard.report()))

    def destroy_and_report(*args, **kwargs):
        write_report()
        return destroy(*args, **kwargs)

    dist.destroy_process_group = destroy_and_report
    from llmtrain.cli import main

    try:
        with guard:
            main()
    finally:
        write_report()


if __name__ == "__main__":
    _run_cli_under_guard()
