"""Adafactor: factored second moments, relative step sizes, update clipping.

Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost" (ICML 2018).
Reference implementation: ``transformers.optimization.Adafactor`` (itself fairseq's), matched to
1e-6 in every mode (tests/test_optim_adafactor.py).

For a matrix the second moment is stored as its row and column means (R + C numbers instead of
R·C), so state is ≪ 4 B/param without a first moment. ``scale_parameter`` makes the step relative
to the parameter's RMS; ``clip_threshold`` caps the RMS of each update. With
``relative_step=true`` the optimizer owns its schedule (step size min(1e-2, 1/√t), as in T5) and the
configured lr and the trainer's schedule are ignored; the default (false) uses ``lr`` and the
schedule, as in PaLM.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from llmtrain.optim._common import check_positive, group_impl, resolve_compiled_impl
from llmtrain.optim.compiled import apply_updates


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.norm(2) / (t.numel() ** 0.5)


# Column sums of a row-major matrix in blocks of this many rows: the loop then reads each row
# block while it is in L1 (inductor's plain column reduction strides over every row and measured
# at half the bandwidth of a row reduction: 16384 x 384, 2.8 vs 1.1 ms; in 64-row blocks 1.4 ms).
COLUMN_BLOCK = 64


def _mean_over_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.mean(dim=-2)``, summed per block of ``COLUMN_BLOCK`` rows, then over the blocks."""
    rows = x.shape[-2]
    block = next((b for b in (COLUMN_BLOCK, 32, 16) if rows % b == 0 and rows > b), rows)
    if block == rows:
        return x.mean(dim=-2)
    blocks = x.reshape(*x.shape[:-2], rows // block, block, x.shape[-1])
    return blocks.sum(dim=-2).sum(dim=-2) / rows


def adafactor_core_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg_sq_row: Optional[torch.Tensor],
    exp_avg_sq_col: Optional[torch.Tensor],
    exp_avg_sq: Optional[torch.Tensor],
    exp_avg: Optional[torch.Tensor],
    lr: float | torch.Tensor,
    beta2t: float | torch.Tensor,
    *,
    eps: tuple[float, float],
    clip_threshold: float,
    beta1: Optional[float],
    weight_decay: float,
    scale_parameter: bool,
) -> tuple[torch.Tensor, ...]:
    """The tensor part of one step, given this step's ``lr`` (relative or not) and β2ₜ.

    Row/col statistics for a matrix (``exp_avg_sq`` None), the full one otherwise. ``lr`` and
    ``beta2t`` may be 0-dim tensors (the compiled path, ``llmtrain.optim.compiled``). Returns RMS(θ)
    first; a matrix's per-column and per-row factors follow. They are returned so that a compiled
    graph stores them (R + C numbers) instead of recomputing them, a square root and two divides
    per element, inside its loops over the matrix (measured 15% of the step on a 16384 x 384 matrix).
    """
    if exp_avg_sq is None:
        # Factored: the update g·r·c (r per row, c per column) is never stored. Its RMS is
        # sqrt(Σᵢ rᵢ² Σⱼ g²ᵢⱼ cⱼ² / n), and RMS(θ) comes from row sums, so the compiled kernel makes
        # four passes over the matrix (row sums of g² and θ², column sums, the weighted row sums,
        # the update) - less memory traffic than AdamW - instead of six plus a stored update.
        grad_sq = grad * grad
        rms = ((param * param).sum(dim=-1).sum() / param.numel()).sqrt()
        exp_avg_sq_row.mul_(beta2t).add_((grad_sq + eps[0]).mean(dim=-1) * (1.0 - beta2t))
        exp_avg_sq_col.mul_(beta2t).add_(_mean_over_rows(grad_sq + eps[0]) * (1.0 - beta2t))
        col_factor_sq = exp_avg_sq_col.reciprocal()
        row_factor = (exp_avg_sq_row / exp_avg_sq_row.mean(dim=-1, keepdim=True)).rsqrt()
        update_sq_sum = ((grad_sq * col_factor_sq.unsqueeze(-2)).sum(dim=-1) * row_factor.square()).sum()
        clip = ((update_sq_sum / grad.numel()).sqrt() / clip_threshold).clamp(min=1.0)
    else:
        rms = _rms(param)
        exp_avg_sq.mul_(beta2t).add_((grad**2 + eps[0]) * (1.0 - beta2t))
        full = exp_avg_sq.rsqrt().mul_(grad)
        clip = (_rms(full) / clip_threshold).clamp_(min=1.0)
    step_size = rms.clamp(min=eps[1]) * lr if scale_parameter else lr  # max(ε2, RMS(θ))·lr
    scale = step_size / clip
    factors: tuple[torch.Tensor, ...] = ()
    if exp_avg_sq is None:
        col_scale = col_factor_sq.sqrt() * scale
        factors = (col_factor_sq, row_factor, col_scale)
        update = grad * row_factor.unsqueeze(-1) * col_scale.unsqueeze(-2)
    else:
        update = full.mul_(scale)
    if beta1 is not None:
        update = exp_avg.mul_(beta1).add_(update, alpha=1.0 - beta1)
    if weight_decay != 0.0:
        param.sub_(param * (weight_decay * step_size))
    param.sub_(update)
    return (rms, *factors)


def adafactor_scalars(step: int, *, lr: float, decay_rate: float, relative_step: bool, warmup_init: bool
                      ) -> tuple[float, float]:
    """(this step's lr, β2ₜ): the relative step min(1e-2 or 1e-6·t, 1/√t) when ``relative_step``, and
    the increasing decay β2ₜ = 1 - t^decay_rate (1 - t^-0.8)."""
    step_size = lr
    if relative_step:
        step_size = min(1e-6 * step if warmup_init else 1e-2, 1.0 / math.sqrt(step))
    return step_size, 1.0 - math.pow(step, decay_rate)


class Adafactor(torch.optim.Optimizer):
    """Adafactor for every parameter; factored statistics for tensors with ndim >= 2."""

    state_bytes_per_param: float = 0.05  # row+col sums; ~4 more with beta1 (first moment)

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: Optional[float] = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = False,
        warmup_init: bool = False,
        impl: str = "auto",
    ):
        check_positive("learning rate", lr)
        check_positive("clip_threshold", clip_threshold, allow_zero=False)
        check_positive("weight_decay value", weight_decay)
        if warmup_init and not relative_step:
            raise ValueError("Invalid warmup_init: it requires relative_step=true")
        if decay_rate >= 0:
            raise ValueError(f"Invalid decay_rate: {decay_rate} (expected < 0, e.g. -0.8)")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Invalid beta1: {beta1}")
        defaults = dict(lr=lr, eps=tuple(eps), clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                        weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
                        warmup_init=warmup_init)
        self.impl = resolve_compiled_impl(impl, name="adafactor")
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            fused = bool(live) and group_impl(self.impl, live, "eager") == "fused"
            static = dict(eps=tuple(group["eps"]), clip_threshold=group["clip_threshold"], beta1=group["beta1"],
                          weight_decay=group["weight_decay"], scale_parameter=group["scale_parameter"])
            entries, states, masters = [], [], []
            for p in live:
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                grad = p.grad.float()
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    if group["beta1"] is not None:
                        state["exp_avg"] = torch.zeros_like(grad)
                    if grad.ndim >= 2:
                        state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
                        state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(grad)
                state["step"] += 1
                master = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
                entries.append(((master, grad, state.get("exp_avg_sq_row"), state.get("exp_avg_sq_col"),
                                 state.get("exp_avg_sq"), state.get("exp_avg")),
                                adafactor_scalars(state["step"], lr=float(group["lr"]), decay_rate=group["decay_rate"],
                                                  relative_step=group["relative_step"],
                                                  warmup_init=group["warmup_init"])))
                states.append(state)
                masters.append((p, master))
            if not entries:
                continue
            # tensors keep their shapes: a matrix's statistics are its row and column means
            for state, out in zip(states, apply_updates(adafactor_core_, entries, fused=fused, static=static,
                                                        flatten=False)):
                state["RMS"] = out[0]
            for p, master in masters:
                if master is not p:
                    p.copy_(master)
        return loss
