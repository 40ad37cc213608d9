"""Fused multi-tensor 8-bit blockwise AdamW in Triton (Dettmers et al. 2022, bitsandbytes ``AdamW8bit``).

Both moments are stored as one byte per element: an index into a 256-entry dynamic code map,
scaled by the absmax of its block of 256 elements. A program loads the codes, dequantises them in
registers, updates the moments and the parameter, takes the new absmax of each block and writes
the nearest codes back: 2 bytes of state traffic per moment instead of 8 for fp32 AdamW
(fp32 param: read p, g, m, v and write p, m, v = 4+4+1+1+4+1+1 = 16 bytes, plus 16 bytes of
absmax per 256 elements).

Nearest-code search is a branch-free binary search over the 255 midpoints between code values
(padded with +inf to 256), 8 gathers from a 1 KiB table that stays in L1.
Arithmetic matches ``twins.fused_adamw8bit_reference``.
"""

from __future__ import annotations

import torch
import triton  # noqa: F401  (kernels below are compiled by triton.jit on first launch)
import triton.language as tl

from llmtrain.optim.kernels._launch import (
    LaunchTables, LazyKernel, check_writable, contiguous_grad, device_step, group_by, interpret_mode,
    local_tensor, scalar_operand,
)
from llmtrain.optim.kernels.twins import (  # noqa: F401  (the oracle, re-exported)
    QUANT_BLOCK, code_bounds, create_dynamic_map, fused_adamw8bit_reference, log_beta,
)

_TABLES = LaunchTables()
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_MAPS: dict[torch.device, tuple[torch.Tensor, ...]] = {}


def quant_maps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(signed code, its midpoints, unsigned code, its midpoints) on ``device``, built once."""
    maps = _MAPS.get(device)
    if maps is None:
        signed, unsigned = create_dynamic_map(signed=True), create_dynamic_map(signed=False)
        maps = tuple(t.to(device) for t in (signed, code_bounds(signed), unsigned, code_bounds(unsigned)))
        _MAPS[device] = maps
    return maps  # type: ignore[return-value]


def _adamw8bit_kernel(tensor_table, chunk_table, code_m, bounds_m, code_v, bounds_v, lr_ptr, lr,
                      beta1, one_minus_beta1, beta2, one_minus_beta2, log_beta1, log_beta2, eps, weight_decay,
                      P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, LR_ON_DEVICE: tl.constexpr,
                      MAXIMIZE: tl.constexpr, SOFT_BF16: tl.constexpr, QBLOCK: tl.constexpr, ROWS: tl.constexpr,
                      CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    tensor = tl.load(chunk_table + 2 * pid)
    start = tl.load(chunk_table + 2 * pid + 1)  # a multiple of QBLOCK
    row = tensor_table + tensor * 8
    p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE))
    mq_ptr = tl.load(row + 2).to(tl.pointer_type(tl.uint8))
    ma_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    vq_ptr = tl.load(row + 4).to(tl.pointer_type(tl.uint8))
    va_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    step_ptr = tl.load(row + 6).to(tl.pointer_type(tl.float32))
    numel = tl.load(row + 7)
    n_blocks = (numel + QBLOCK - 1) // QBLOCK

    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr)
    step = tl.load(step_ptr).to(tl.float64)
    bias_correction1 = 1.0 - tl.exp(step * log_beta1)
    bias_correction2 = 1.0 - tl.exp(step * log_beta2)
    step_size = (lr / bias_correction1).to(tl.float32)
    inv_sqrt_bc2 = (1.0 / tl.sqrt(bias_correction2)).to(tl.float32)
    decay = 1.0 - lr * weight_decay

    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, QBLOCK)
    for offset in range(0, CHUNK, ROWS * QBLOCK):
        block = (start + offset) // QBLOCK + rows                  # [ROWS] quantisation blocks
        offs = block[:, None] * QBLOCK + cols[None, :]               # [ROWS, QBLOCK] elements
        mask = offs < numel
        block_mask = block < n_blocks
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MAXIMIZE:
            g = -g
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mq = tl.load(mq_ptr + offs, mask=mask, other=0).to(tl.int32)
        vq = tl.load(vq_ptr + offs, mask=mask, other=0).to(tl.int32)
        ma = tl.load(ma_ptr + block, mask=block_mask, other=0.0)
        va = tl.load(va_ptr + block, mask=block_mask, other=0.0)
        m = tl.load(code_m + mq) * ma[:, None]
        v = tl.load(code_v + vq) * va[:, None]

        m = m + one_minus_beta1 * (g - m)
        v = v * beta2 + one_minus_beta2 * g * g
        m = tl.where(mask, m, 0.0)
        v = tl.where(mask, v, 0.0)
        p = p * decay
        p = p - step_size * (m / (tl.sqrt(v) * inv_sqrt_bc2 + eps))
        p_out = p.to(P_DTYPE)
        if SOFT_BF16:  # the interpreter truncates fp32->bf16; GPUs round to nearest even
            if P_DTYPE == tl.bfloat16:
                p_bits = p.to(tl.uint32, bitcast=True)
                p_bits = (p_bits + 0x7FFF + ((p_bits >> 16) & 1)) >> 16
                p_out = p_bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(p_ptr + offs, p_out, mask=mask)

        # tl.reduce with the standard max combiner rather than tl.max: tl.max is itself a jitted
        # helper, which the interpreter cannot call unless TRITON_INTERPRET was set before triton
        # was imported; the reduce builtin works either way (and takes numpy's fast path there).
        new_ma = tl.reduce(tl.abs(m), 1, tl.standard._elementwise_max)
        new_va = tl.reduce(v, 1, tl.standard._elementwise_max)
        xm = tl.minimum(tl.maximum(m / tl.maximum(new_ma, 1e-38)[:, None], -1.0), 1.0)
        xv = tl.minimum(v / tl.maximum(new_va, 1e-38)[:, None], 1.0)
        # index of the nearest code = number of midpoints strictly below x (torch.bucketize)
        im = tl.full([ROWS, QBLOCK], 0, tl.int32)
        iv = tl.full([ROWS, QBLOCK], 0, tl.int32)
        for s in tl.static_range(7, -1, -1):
            half = 1 << s
            im = tl.where(tl.load(bounds_m + im + (half - 1)) < xm, im + half, im)
            iv = tl.where(tl.load(bounds_v + iv + (half - 1)) < xv, iv + half, iv)
        tl.store(mq_ptr + offs, im.to(tl.uint8), mask=mask)
        tl.store(vq_ptr + offs, iv.to(tl.uint8), mask=mask)
        tl.store(ma_ptr + block, new_ma, mask=block_mask)
        tl.store(va_ptr + block, new_va, mask=block_mask)


_KERNEL = LazyKernel(_adamw8bit_kernel)


@torch.no_grad()
def fused_adamw8bit_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avg_qs: list[torch.Tensor],
                     exp_avg_absmaxes: list[torch.Tensor], exp_avg_sq_qs: list[torch.Tensor],
                     exp_avg_sq_absmaxes: list[torch.Tensor], step: torch.Tensor | list[torch.Tensor], *,
                     lr: float | torch.Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
                     maximize: bool = False) -> None:
    """One 8-bit AdamW step for every tensor in the lists (uint8 codes shaped like the params,
    fp32 absmax of length ceil(numel / 256)), one launch per dtype combination."""
    n = len(params)
    if n == 0:
        return
    steps = list(step) if isinstance(step, (list, tuple)) else [step] * n
    ps = [local_tensor(t) for t in params]
    gs = [contiguous_grad(local_tensor(t)) for t in grads]
    mqs, mas = [local_tensor(t) for t in exp_avg_qs], [local_tensor(t) for t in exp_avg_absmaxes]
    vqs, vas = [local_tensor(t) for t in exp_avg_sq_qs], [local_tensor(t) for t in exp_avg_sq_absmaxes]
    check_writable("param", ps)
    check_writable("state", mqs + mas + vqs + vas)
    steps = [device_step(s, p.device) for s, p in zip(steps, ps)]

    keys = ((p.device, p.dtype, g.dtype) for p, g in zip(ps, gs))
    for (device, p_dtype, g_dtype), idx in group_by(keys, n).items():
        idx = [i for i in idx if ps[i].numel() > 0]
        if not idx:
            continue
        rows = [(ps[i].data_ptr(), gs[i].data_ptr(), mqs[i].data_ptr(), mas[i].data_ptr(), vqs[i].data_ptr(),
                 vas[i].data_ptr(), steps[i].data_ptr(), ps[i].numel()) for i in idx]
        tile_rows, chunk = (16, 16 * QUANT_BLOCK) if interpret_mode() else (4, 32 * QUANT_BLOCK)
        tensor_table = _TABLES.tensor_table(rows, device)
        chunk_table = _TABLES.chunk_table([ps[i].numel() for i in idx], chunk, device)
        lr_value, lr_tensor = scalar_operand(lr, device)
        code_m, bounds_m, code_v, bounds_v = quant_maps(device)
        _KERNEL[(chunk_table.shape[0],)](
            tensor_table, chunk_table, code_m, bounds_m, code_v, bounds_v,
            lr_tensor if lr_tensor is not None else tensor_table, lr_value,
            beta1, 1.0 - beta1, beta2, 1.0 - beta2, log_beta(beta1), log_beta(beta2), eps, weight_decay,
            P_DTYPE=_TL_DTYPES[p_dtype], G_DTYPE=_TL_DTYPES[g_dtype], LR_ON_DEVICE=lr_tensor is not None,
            MAXIMIZE=bool(maximize), SOFT_BF16=interpret_mode(), QBLOCK=QUANT_BLOCK, ROWS=tile_rows, CHUNK=chunk,
        )
