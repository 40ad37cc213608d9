"""``Linear``: ``nn.Linear`` whose fp32 CPU matmuls go through oneDNN instead of the BLAS.

Why: torch's CPU build sends fp32 ``mm`` to MKL, and MKL picks its AVX2 kernels on AMD CPUs; oneDNN
(shipped inside torch as ``torch.ops.mkldnn``) uses AVX-512 wherever the CPU has it. Measured on the
2-core AMD EPYC (AVX-512) of the README, ``llama_tiny`` shapes: the forward matmul 4.67 → 1.76 ms,
the input gradient 3.92 → 1.86 ms, the weight gradient 4.06 → 2.95 ms; the whole training step
1.3-1.4x faster (``scripts/bench_train.py``: 410 -> 308 ms). It is the same fp32 arithmetic in
another summation order (differences ~1e-6 relative), not a reduced-precision mode.

The backend is a process-wide switch like ``torch.backends`` flags (``set_cpu_matmul``, set by the
trainer from ``train.cpu_matmul``). oneDNN is used only where it computes what ``F.linear`` would:
fp32 tensors on CPU, no autocast, plain tensors (FSDP's DTensors and anything else go to
``F.linear``). Parameter names and types are ``nn.Linear``'s, so checkpoints, ``to_hf`` and FSDP
see no difference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.errors import ConfigError, choices

CPU_MATMULS = ("auto", "onednn", "aten")

_backend = "auto"

# Read once: torch.compile refuses to trace torch.backends.mkldnn.is_available().
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_available() -> bool:
    return _ONEDNN


def check_cpu_matmul(backend: str) -> None:
    """``train.cpu_matmul`` is one of ``CPU_MATMULS``, and ``onednn`` only where torch has oneDNN."""
    if backend not in CPU_MATMULS:
        raise ConfigError("train.cpu_matmul", f"got {backend!r}, expected {choices(CPU_MATMULS)}")
    if backend == "onednn" and not onednn_available():
        raise ConfigError("train.cpu_matmul", "onednn: this torch build has no oneDNN (mkldnn); use auto or aten")


def set_cpu_matmul(backend: str) -> None:
    """``auto``: fp32 CPU linears through oneDNN when torch has it, else ``F.linear``; ``onednn``: the
    same, but a torch built without oneDNN is an error; ``aten``: always ``F.linear``."""
    global _backend
    check_cpu_matmul(backend)
    _backend = backend


def cpu_matmul() -> str:
    """The backend fp32 CPU linears use now: ``onednn`` or ``aten``."""
    return "onednn" if _backend != "aten" and onednn_available() else "aten"


@torch.library.custom_op("llmtrain::onednn_mm_t", mutates_args=())
def onednn_mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for 2-D a (m, k) and b (n, k), strided inputs allowed, by oneDNN.

    A custom op so that ``torch.compile`` keeps it as one opaque call: inductor's own lowering of
    ``mkldnn._linear_pointwise`` is for frozen inference weights and rejects trainable ones."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


@onednn_mm_t.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[0])


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: torch.Tensor):
    a, b = ctx.saved_tensors
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = onednn_mm_t(grad, b.t())
    if ctx.needs_input_grad[1]:
        # (a^T grad)^T computed as (a^T) @ (grad^T)^T: oneDNN is 2x faster with the long dimension
        # (tokens) as the reduction of its second operand (11.8 vs 32.9 ms for a 4096-row head).
        grad_b = onednn_mm_t(a.t(), grad.t()).t().contiguous()
    return grad_a, grad_b


onednn_mm_t.register_autograd(_backward, setup_context=_setup)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear``, through oneDNN for fp32 CPU tensors when the backend allows it."""
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and type(weight) in (torch.Tensor, nn.Parameter)
        and type(x) is torch.Tensor
        and not torch.is_autocast_enabled("cpu")
        and cpu_matmul() == "onednn"
    ):
        out = onednn_mm_t(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` computed by ``linear`` (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
