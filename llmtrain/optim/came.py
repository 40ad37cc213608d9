"""CAME: confidence-guided Adafactor (factored second moment, factored instability)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from llmtrain.errors import ConfigError


def _rms(x: Tensor) -> Tensor:
    return x.norm(2) / (x.numel() ** 0.5)


def _factored_rsqrt(row: Tensor, col: Tensor) -> Tensor:
    """Adafactor's rank-1 reconstruction of 1/sqrt(V) from its row and column means."""
    r = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    return r * col.unsqueeze(-2).rsqrt()


def came_update(param: Tensor, grad: Tensor, state: dict, *, lr: float, eps: tuple[float, float],
                clip_threshold: float, betas: tuple[float, float, float], weight_decay: float) -> None:
    """One CAME step on one tensor (state holds exp_avg and the row/col or full moments)."""
    beta1, beta2, beta3 = betas
    factored = grad.ndim >= 2
    sq = grad ** 2 + eps[0]
    if factored:
        state["exp_avg_sq_row"].mul_(beta2).add_(sq.mean(dim=-1), alpha=1 - beta2)
        state["exp_avg_sq_col"].mul_(beta2).add_(sq.mean(dim=-2), alpha=1 - beta2)
        update = _factored_rsqrt(state["exp_avg_sq_row"], state["exp_avg_sq_col"]).mul_(grad)
    else:
        state["exp_avg_sq"].mul_(beta2).add_(sq, alpha=1 - beta2)
        update = state["exp_avg_sq"].rsqrt().mul_(grad)
    update.div_((_rms(update) / clip_threshold).clamp_(min=1.0))
    exp_avg = state["exp_avg"]
    exp_avg.mul_(beta1).add_(update, alpha=1 - beta1)
    if factored:
        # Confidence: the (factored) EMA of (u - m)^2 scales the momentum down where the
        # update disagrees with its own average.
        instability = (update - exp_avg) ** 2 + eps[1]
        state["exp_avg_res_row"].mul_(beta3).add_(instability.mean(dim=-1), alpha=1 - beta3)
        state["exp_avg_res_col"].mul_(beta3).add_(instability.mean(dim=-2), alpha=1 - beta3)
        update = _factored_rsqrt(state["exp_avg_res_row"], state["exp_avg_res_col"]).mul_(exp_avg)
    else:
        update = exp_avg.clone()
    if weight_decay != 0:
        param.add_(param, alpha=-weight_decay * lr)
    param.sub_(update.mul_(lr))  # scale then subtract, in the reference's rounding order


def came(params: list[Tensor], grads: list[Tensor], states: list[dict], *, lr: float, eps: tuple[float, float],
         clip_threshold: float, betas: tuple[float, float, float], weight_decay: float) -> None:
    """Functional CAME: one step over matching lists."""
    for p, g, s in zip(params, grads, states):
        s["step"] += 1
        came_update(p, g.float() if g.dtype in (torch.float16, torch.bfloat16) else g, s, lr=lr, eps=eps,
                    clip_threshold=clip_threshold, betas=betas, weight_decay=weight_decay)


class CAME(torch.optim.Optimizer):
    """CAME.

    Paper: Luo et al., "CAME: Confidence-guided Adaptive Memory Efficient Optimization" (ACL 2023).
    Reference: yangluo7/CAME, PyPI ``came-pytorch`` 0.1.3 (tested against). Like the reference,
    weight decay is decoupled (``p -= lr * wd * p``) and there is no bias correction. Meant for
    every parameter of large models: matrices keep only row/column statistics, so the state is
    one fp32 momentum buffer per parameter (vectors also keep a full second moment).
    """

    state_bytes_per_param: float = 4.0  # exp_avg; factored moments are O(m + n)

    def __init__(self, params, lr: float = 2e-4, eps: tuple[float, float] = (1e-30, 1e-16),
                 clip_threshold: float = 1.0, betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
                 weight_decay: float = 0.0):
        if lr <= 0:
            raise ConfigError("optim.lr", f"got {lr}, expected > 0")
        if len(betas) != 3 or not all(0.0 <= b <= 1.0 for b in betas):
            raise ConfigError("optim.betas", f"got {list(betas)}, expected three numbers in [0, 1]")
        if len(eps) != 2 or min(eps) < 0:
            raise ConfigError("optim.eps", f"got {list(eps)}, expected two numbers >= 0")
        if clip_threshold <= 0:
            raise ConfigError("optim.clip_threshold", f"got {clip_threshold}, expected > 0")
        if weight_decay < 0:
            raise ConfigError("optim.weight_decay", f"got {weight_decay}, expected >= 0")
        super().__init__(params, dict(lr=lr, eps=tuple(eps), clip_threshold=clip_threshold,
                                      betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            states = []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    if p.ndim >= 2:
                        row, col = p.shape[:-1], p.shape[:-2] + p.shape[-1:]
                        for key, shape in (("sq_row", row), ("sq_col", col), ("res_row", row), ("res_col", col)):
                            state[f"exp_avg_{key}"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                states.append(state)
            came(params, [p.grad for p in params], states, lr=group["lr"], eps=group["eps"],
                 clip_threshold=group["clip_threshold"], betas=group["betas"],
                 weight_decay=group["weight_decay"])
        return loss
