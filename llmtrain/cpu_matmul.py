"""The CPU matmul backend: fp32 products through oneDNN instead of the BLAS (``train.cpu_matmul``).

Why: torch's CPU build sends fp32 ``mm`` to MKL, and MKL picks its AVX2 kernels on AMD CPUs; oneDNN
(shipped inside torch as ``torch.ops.mkldnn``) uses AVX-512 wherever the CPU has it. Measured on the
2-core AMD EPYC (AVX-512) of the README: 1.9-2.4x faster fp32 matmuls, the same fp32 arithmetic in
another summation order (differences ~1e-6 relative), not a reduced-precision mode.

The backend is a process-wide switch like the ``torch.backends`` flags (``set_cpu_matmul``, set by
the trainer from ``train.cpu_matmul``). Two users: the model's linears (``llmtrain.models.linear``)
and the preconditioner products of the matrix optimizers (``mm``: SOAP's rotations and statistics,
Shampoo's). oneDNN is used only where it computes what ``torch.matmul`` would: fp32 plain tensors
on CPU, no autocast; everything else (CUDA, bf16, FSDP's DTensors) takes the usual path.
"""

from __future__ import annotations

import torch
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
    """``auto``: fp32 CPU products (``linear``, ``mm``) through oneDNN when torch has it, else torch's
    own ops; ``onednn``: the same, but a torch built without oneDNN is an error; ``aten``: always
    torch's own ops (``F.linear``, ``torch.matmul``)."""
    global _backend
    check_cpu_matmul(backend)
    _backend = backend


def cpu_matmul() -> str:
    """The backend fp32 CPU products use now: ``onednn`` or ``aten``."""
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


def uses_onednn(*tensors: torch.Tensor) -> bool:
    """Whether a product of these tensors goes through oneDNN: fp32 plain CPU tensors, no autocast,
    and the backend allows it."""
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 and type(t) in (torch.Tensor, nn.Parameter)
            for t in tensors)
        and not torch.is_autocast_enabled("cpu")
        and cpu_matmul() == "onednn"
    )


def _dense(t: torch.Tensor) -> bool:
    """A whole 2-D matrix in row- or column-major order: oneDNN's fast kernels take exactly these
    (the first rows of a column-major matrix, e.g. the top singular vectors ``vh[:r]`` of an SVD,
    took 550 ms per product through oneDNN against 7 through the BLAS)."""
    return t.is_contiguous() or t.t().is_contiguous()


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D ``a`` and ``b``, through oneDNN where ``uses_onednn`` and both are whole
    row- or column-major matrices, else ``torch.matmul``."""
    if uses_onednn(a, b) and _dense(a) and _dense(b):
        return onednn_mm_t(a, b.t())
    return a @ b
