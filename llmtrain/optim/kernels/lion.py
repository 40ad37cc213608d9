"""Fused multi-tensor Lion in Triton: reads p, g, m and writes p, m (fp32: 20 bytes per parameter).

Arithmetic matches ``twins.fused_lion_reference`` and ``lion_pytorch.Lion``: decoupled weight decay,
the sign of the beta1-interpolated momentum as the update, then the beta2 momentum update.
"""

from __future__ import annotations

import torch
import triton  # noqa: F401  (kernels below are compiled by triton.jit on first launch)
import triton.language as tl

from llmtrain.optim.kernels._launch import (
    LaunchTables, LazyKernel, block_sizes, check_writable, contiguous_grad, group_by, interpret_mode,
    local_tensor, scalar_operand,
)
from llmtrain.optim.kernels.twins import fused_lion_reference  # noqa: F401  (the oracle, re-exported)

_TABLES = LaunchTables()
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _lion_kernel(tensor_table, chunk_table, lr_ptr, lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
                 weight_decay, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr,
                 LR_ON_DEVICE: tl.constexpr, MAXIMIZE: tl.constexpr, SOFT_BF16: tl.constexpr,
                 CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    tensor = tl.load(chunk_table + 2 * pid)
    start = tl.load(chunk_table + 2 * pid + 1)
    row = tensor_table + tensor * 4
    p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(M_DTYPE))
    numel = tl.load(row + 3)
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr)
    decay = 1.0 - lr * weight_decay

    for offset in range(0, CHUNK, BLOCK):
        offs = start + offset + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MAXIMIZE:
            g = -g
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c = beta1 * m + one_minus_beta1 * g
        update = tl.where(c > 0.0, 1.0, tl.where(c < 0.0, -1.0, 0.0))
        p = p * decay - lr * update
        m = beta2 * m + one_minus_beta2 * g
        p_out = p.to(P_DTYPE)
        if SOFT_BF16:  # the interpreter truncates fp32->bf16; GPUs round to nearest even
            if P_DTYPE == tl.bfloat16:
                p_bits = p.to(tl.uint32, bitcast=True)
                p_bits = (p_bits + 0x7FFF + ((p_bits >> 16) & 1)) >> 16
                p_out = p_bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        m_out = m.to(M_DTYPE)
        if SOFT_BF16:  # the interpreter truncates fp32->bf16; GPUs round to nearest even
            if M_DTYPE == tl.bfloat16:
                m_bits = m.to(tl.uint32, bitcast=True)
                m_bits = (m_bits + 0x7FFF + ((m_bits >> 16) & 1)) >> 16
                m_out = m_bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(p_ptr + offs, p_out, mask=mask)
        tl.store(m_ptr + offs, m_out, mask=mask)


_KERNEL = LazyKernel(_lion_kernel)


@torch.no_grad()
def fused_lion_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor], *,
                lr: float | torch.Tensor, beta1: float, beta2: float, weight_decay: float,
                maximize: bool = False) -> None:
    """One Lion step for every tensor in the lists, one launch per dtype combination."""
    n = len(params)
    if n == 0:
        return
    ps = [local_tensor(t) for t in params]
    gs = [contiguous_grad(local_tensor(t)) for t in grads]
    ms = [local_tensor(t) for t in exp_avgs]
    check_writable("param", ps)
    check_writable("state", ms)
    keys = ((p.device, p.dtype, g.dtype, m.dtype) for p, g, m in zip(ps, gs, ms))
    for (device, p_dtype, g_dtype, m_dtype), idx in group_by(keys, n).items():
        idx = [i for i in idx if ps[i].numel() > 0]
        if not idx:
            continue
        rows = [(ps[i].data_ptr(), gs[i].data_ptr(), ms[i].data_ptr(), ps[i].numel()) for i in idx]
        block, chunk = block_sizes(1024, 8192, 4096, 4096)
        tensor_table = _TABLES.tensor_table(rows, device)
        chunk_table = _TABLES.chunk_table([ps[i].numel() for i in idx], chunk, device)
        lr_value, lr_tensor = scalar_operand(lr, device)
        _KERNEL[(chunk_table.shape[0],)](
            tensor_table, chunk_table, lr_tensor if lr_tensor is not None else tensor_table, lr_value,
            beta1, 1.0 - beta1, beta2, 1.0 - beta2, weight_decay,
            P_DTYPE=_TL_DTYPES[p_dtype], G_DTYPE=_TL_DTYPES[g_dtype], M_DTYPE=_TL_DTYPES[m_dtype],
            LR_ON_DEVICE=lr_tensor is not None, MAXIMIZE=bool(maximize), SOFT_BF16=interpret_mode(),
            CHUNK=chunk, BLOCK=block,
        )
