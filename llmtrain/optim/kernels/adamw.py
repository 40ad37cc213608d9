"""Fused multi-tensor AdamW in Triton: one launch per dtype combination, one pass over memory.

Per parameter it reads p, g, m, v and writes p, m, v (fp32: 28 bytes), the minimum AdamW can move.
With ``master_params`` the fp32 master weight is read and written instead, and the low-precision
parameter is written from it in the same pass. Arithmetic matches ``twins.fused_adamw_reference``
(and ``torch.optim.AdamW``): decoupled weight decay, bias corrections from the step tensor on the
device, so a step never waits for the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmtrain.optim.kernels._launch import (
    LaunchTables, LazyKernel, block_sizes, check_writable, contiguous_grad, device_step, group_by,
    interpret_mode, local_tensor, scalar_operand,
)
from llmtrain.optim.kernels.twins import fused_adamw_reference, log_beta  # noqa: F401  (oracle re-exported)

_NCOL = 7  # param, grad, exp_avg, exp_avg_sq, master (0 if none), step, numel
_TABLES = LaunchTables()

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _adamw_kernel(tensor_table, chunk_table, lr_ptr, lr, beta1, one_minus_beta1, beta2, one_minus_beta2,
                  log_beta1, log_beta2, eps, weight_decay,
                  P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, HAS_MASTER: tl.constexpr,
                  LR_ON_DEVICE: tl.constexpr, MAXIMIZE: tl.constexpr, SOFT_BF16: tl.constexpr,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    tensor = tl.load(chunk_table + 2 * pid)
    start = tl.load(chunk_table + 2 * pid + 1)
    row = tensor_table + tensor * 7
    p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(M_DTYPE))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(M_DTYPE))
    w_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    step_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    numel = tl.load(row + 6)

    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr)
    # Bias corrections in fp64: 1 - beta2**t cancels badly in fp32 for small t.
    step = tl.load(step_ptr).to(tl.float64)
    bias_correction1 = 1.0 - tl.exp(step * log_beta1)
    bias_correction2 = 1.0 - tl.exp(step * log_beta2)
    step_size = (lr / bias_correction1).to(tl.float32)
    inv_sqrt_bc2 = (1.0 / tl.sqrt(bias_correction2)).to(tl.float32)
    decay = 1.0 - lr * weight_decay

    for offset in range(0, CHUNK, BLOCK):
        offs = start + offset + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MAXIMIZE:
            g = -g
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_MASTER:
            w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        else:
            w = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = m + one_minus_beta1 * (g - m)
        v = v * beta2 + one_minus_beta2 * g * g
        w = w * decay
        w = w - step_size * (m / (tl.sqrt(v) * inv_sqrt_bc2 + eps))
        m_out = m.to(M_DTYPE)
        if SOFT_BF16:  # the interpreter truncates fp32->bf16; GPUs round to nearest even
            if M_DTYPE == tl.bfloat16:
                m_bits = m.to(tl.uint32, bitcast=True)
                m_bits = (m_bits + 0x7FFF + ((m_bits >> 16) & 1)) >> 16
                m_out = m_bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        v_out = v.to(M_DTYPE)
        if SOFT_BF16:  # the interpreter truncates fp32->bf16; GPUs round to nearest even
            if M_DTYPE == tl.bfloat16:
                v_bits = v.to(tl.uint32, bitcast=True)
                v_bits = (v_bits + 0x7FFF + ((v_bits >> 16) & 1)) >> 16
                v_out = v_bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        w_out = w.to(P_DTYPE)
        if SOFT_BF16:  # the interpreter truncates fp32->bf16; GPUs round to nearest even
            if P_DTYPE == tl.bfloat16:
                w_bits = w.to(tl.uint32, bitcast=True)
                w_bits = (w_bits + 0x7FFF + ((w_bits >> 16) & 1)) >> 16
                w_out = w_bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(m_ptr + offs, m_out, mask=mask)
        tl.store(v_ptr + offs, v_out, mask=mask)
        if HAS_MASTER:
            tl.store(w_ptr + offs, w, mask=mask)
        tl.store(p_ptr + offs, w_out, mask=mask)


_KERNEL = LazyKernel(_adamw_kernel)


@torch.no_grad()
def fused_adamw_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                 exp_avg_sqs: list[torch.Tensor], step: torch.Tensor | list[torch.Tensor], *,
                 lr: float | torch.Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
                 maximize: bool = False, master_params: list[torch.Tensor] | None = None) -> None:
    """One AdamW step for every tensor in the lists, in as few launches as there are dtype combinations.

    ``step`` is a 0-dim float32 device tensor already incremented for this step (or one per tensor).
    ``lr`` may be a 0-dim device tensor. DTensors are updated through their local shards.
    """
    n = len(params)
    if n == 0:
        return
    steps = list(step) if isinstance(step, (list, tuple)) else [step] * n
    ps = [local_tensor(t) for t in params]
    gs = [contiguous_grad(local_tensor(t)) for t in grads]
    ms = [local_tensor(t) for t in exp_avgs]
    vs = [local_tensor(t) for t in exp_avg_sqs]
    ws = [local_tensor(t) for t in master_params] if master_params is not None else None
    check_writable("param", ps)
    check_writable("state", ms + vs + (ws or []))
    if ws is not None and any(w.dtype != torch.float32 for w in ws):
        raise ValueError("master_params must be float32")
    steps = [device_step(s, p.device) for s, p in zip(steps, ps)]

    keys = ((p.device, p.dtype, g.dtype, m.dtype) for p, g, m in zip(ps, gs, ms))
    for (device, p_dtype, g_dtype, m_dtype), idx in group_by(keys, n).items():
        idx = [i for i in idx if ps[i].numel() > 0]
        if not idx:
            continue
        rows = [(ps[i].data_ptr(), gs[i].data_ptr(), ms[i].data_ptr(), vs[i].data_ptr(),
                 ws[i].data_ptr() if ws is not None else 0, steps[i].data_ptr(), ps[i].numel()) for i in idx]
        block, chunk = block_sizes(1024, 8192, 4096, 4096)
        tensor_table = _TABLES.tensor_table(rows, device)
        chunk_table = _TABLES.chunk_table([ps[i].numel() for i in idx], chunk, device)
        lr_value, lr_tensor = scalar_operand(lr, device)
        _KERNEL[(chunk_table.shape[0],)](
            tensor_table, chunk_table, lr_tensor if lr_tensor is not None else tensor_table, lr_value,
            beta1, 1.0 - beta1, beta2, 1.0 - beta2, log_beta(beta1), log_beta(beta2), eps, weight_decay,
            P_DTYPE=_TL_DTYPES[p_dtype], G_DTYPE=_TL_DTYPES[g_dtype], M_DTYPE=_TL_DTYPES[m_dtype],
            HAS_MASTER=ws is not None, LR_ON_DEVICE=lr_tensor is not None, MAXIMIZE=bool(maximize),
            SOFT_BF16=interpret_mode(),
            CHUNK=chunk, BLOCK=block,
        )
