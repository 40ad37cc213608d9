"""Pure-PyTorch twins of the fused kernels: same signatures, same arithmetic, one tensor at a time.

They are the test oracle for the Triton kernels and the ``impl="eager"`` path of the optimizers
that use them, so they spell out the maths in the kernels' order of operations (fp32 compute,
bias corrections from the on-device step) rather than calling ``torch.optim``.
"""

from __future__ import annotations

import math
import struct

import torch

from llmtrain.optim.kernels._launch import local_tensor

QUANT_BLOCK = 256  # elements per absmax scale, as in bitsandbytes' blockwise optimizers


def log_beta(beta: float) -> float:
    """log(beta) as the kernels receive it (a float32 argument); beta == 0 gives beta**t == 0."""
    return as_f32(math.log(beta)) if beta > 0.0 else -1e30


def as_f32(x: float) -> float:
    """x rounded to float32: compiled kernels see float arguments as float32, the interpreter as
    Python floats; rounding on the host makes both (and the twins) use the same value."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _bias_correction(step: torch.Tensor, beta: float) -> torch.Tensor:
    # 1 - beta**t as 1 - exp(t * log beta) in float64 from the device step, as the kernels do:
    # in float32 the subtraction cancels badly for small t (beta2 = 0.999 loses 4 digits).
    return 1.0 - torch.exp(step.double() * log_beta(beta))


def _step_factors(lr_t: torch.Tensor, step: torch.Tensor, beta1: float, beta2: float):
    """(lr / bias_correction1, 1 / sqrt(bias_correction2)) in float32, computed in float64."""
    step_size = (lr_t.double() / _bias_correction(step, beta1)).float()
    inv_sqrt_bc2 = (1.0 / torch.sqrt(_bias_correction(step, beta2))).float()
    return step_size, inv_sqrt_bc2


def _as_f32_scalar(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return local_tensor(value).to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def _steps(step: torch.Tensor | list[torch.Tensor], n: int) -> list[torch.Tensor]:
    return list(step) if isinstance(step, (list, tuple)) else [step] * n


@torch.no_grad()
def fused_adamw_reference(params, grads, exp_avgs, exp_avg_sqs, step, *, lr, beta1: float, beta2: float,
                          eps: float, weight_decay: float, maximize: bool = False,
                          master_params=None) -> None:
    """AdamW (Loshchilov & Hutter) exactly as ``torch.optim.AdamW``: decoupled decay, bias-corrected."""
    steps = _steps(step, len(params))
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        p, g, m, v = (local_tensor(t) for t in (p, g, m, v))
        w = local_tensor(master_params[i]) if master_params is not None else p
        t = steps[i].to(device=p.device, dtype=torch.float32)
        lr_t = _as_f32_scalar(lr, p.device)
        g32 = g.float()
        if maximize:
            g32 = -g32
        m32 = m.float() + (1.0 - beta1) * (g32 - m.float())
        v32 = v.float() * beta2 + (1.0 - beta2) * g32 * g32
        step_size, inv_sqrt_bc2 = _step_factors(lr_t, t, beta1, beta2)
        w32 = w.float() * (1.0 - lr_t * weight_decay)
        w32 = w32 - step_size * (m32 / (torch.sqrt(v32) * inv_sqrt_bc2 + eps))
        m.copy_(m32)
        v.copy_(v32)
        w.copy_(w32)
        if w is not p:
            p.copy_(w32)


@torch.no_grad()
def fused_lion_reference(params, grads, exp_avgs, *, lr, beta1: float, beta2: float, weight_decay: float,
                         maximize: bool = False) -> None:
    """Lion (Chen et al. 2023) as ``lion_pytorch.Lion``: sign of the interpolated momentum."""
    for p, g, m in zip(params, grads, exp_avgs):
        p, g, m = (local_tensor(t) for t in (p, g, m))
        lr_t = _as_f32_scalar(lr, p.device)
        g32 = g.float()
        if maximize:
            g32 = -g32
        m32 = m.float()
        update = torch.sign(beta1 * m32 + (1.0 - beta1) * g32)
        p32 = p.float() * (1.0 - lr_t * weight_decay) - lr_t * update
        m.copy_(beta2 * m32 + (1.0 - beta2) * g32)
        p.copy_(p32)


# --- 8-bit blockwise quantisation (Dettmers et al., "8-bit Optimizers via Block-wise Quantization") ---

def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic tree quantisation code: a decimal exponent then a linear fraction.

    Each extra leading zero bit buys a factor of 10 of range and costs one bit of fraction, so
    small moments keep relative precision. Same 256 values as ``bitsandbytes.functional.create_dynamic_map``;
    the unsigned variant (for the second moment) spends the sign bit on fraction.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        bits = i + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        boundaries = torch.linspace(0.1, 1, 2 ** bits + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def code_bounds(code: torch.Tensor) -> torch.Tensor:
    """Midpoints between neighbouring code values, padded with +inf to 256 entries.

    The nearest code to x is the number of midpoints below x; the padding lets a branch-free
    8-step binary search in the kernel run over a power-of-two table.
    """
    mids = (code[:-1] + code[1:]) / 2
    return torch.cat([mids, torch.full((1,), float("inf"), dtype=code.dtype, device=code.device)])


def num_quant_blocks(numel: int) -> int:
    return (numel + QUANT_BLOCK - 1) // QUANT_BLOCK


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes shaped like x, fp32 absmax per block of 256): nearest code of x / absmax."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, num_quant_blocks(n) * QUANT_BLOCK - n))
    absmax = padded.reshape(-1, QUANT_BLOCK).abs().amax(dim=1)
    scale = torch.clamp(absmax, min=1e-38).repeat_interleave(QUANT_BLOCK)[:n]
    normed = torch.clamp(flat / scale, -1.0, 1.0)
    q = torch.bucketize(normed, code_bounds(code.to(flat.device))[:-1]).to(torch.uint8)
    return q.reshape(x.shape), absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """fp32 values ``code[q] * absmax[block]`` shaped like q."""
    flat = q.reshape(-1).long()
    scale = absmax.repeat_interleave(QUANT_BLOCK)[: flat.numel()]
    return (code.to(q.device)[flat] * scale).reshape(q.shape)


@torch.no_grad()
def fused_adamw8bit_reference(params, grads, exp_avg_qs, exp_avg_absmaxes, exp_avg_sq_qs, exp_avg_sq_absmaxes,
                              step, *, lr, beta1: float, beta2: float, eps: float, weight_decay: float,
                              maximize: bool = False) -> None:
    """AdamW with both moments stored as 8-bit blockwise-quantised codes (bitsandbytes ``AdamW8bit``).

    Dequantise, update, step the parameter with the unquantised new moments, requantise with a
    fresh absmax per block: the order bitsandbytes' blockwise kernel uses.
    """
    steps = _steps(step, len(params))
    signed = create_dynamic_map(signed=True)
    unsigned = create_dynamic_map(signed=False)
    for i, (p, g) in enumerate(zip(params, grads)):
        p, g = local_tensor(p), local_tensor(g)
        mq, ma = local_tensor(exp_avg_qs[i]), local_tensor(exp_avg_absmaxes[i])
        vq, va = local_tensor(exp_avg_sq_qs[i]), local_tensor(exp_avg_sq_absmaxes[i])
        t = steps[i].to(device=p.device, dtype=torch.float32)
        lr_t = _as_f32_scalar(lr, p.device)
        g32 = g.float().reshape(-1)
        if maximize:
            g32 = -g32
        m32 = dequantize_blockwise(mq.reshape(-1), ma, signed)
        v32 = dequantize_blockwise(vq.reshape(-1), va, unsigned)
        m32 = m32 + (1.0 - beta1) * (g32 - m32)
        v32 = v32 * beta2 + (1.0 - beta2) * g32 * g32
        step_size, inv_sqrt_bc2 = _step_factors(lr_t, t, beta1, beta2)
        p32 = p.float().reshape(-1) * (1.0 - lr_t * weight_decay)
        p32 = p32 - step_size * (m32 / (torch.sqrt(v32) * inv_sqrt_bc2 + eps))
        p.copy_(p32.reshape(p.shape))
        new_mq, new_ma = quantize_blockwise(m32, signed)
        new_vq, new_va = quantize_blockwise(v32, unsigned)
        mq.copy_(new_mq.reshape(mq.shape))
        ma.copy_(new_ma)
        vq.copy_(new_vq.reshape(vq.shape))
        va.copy_(new_va)
