"""Adan: adaptive Nesterov momentum via gradient differences."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from llmtrain.errors import ConfigError


def adan_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_diff: Tensor, exp_avg_sq: Tensor,
                prev_grad: Tensor, *, lr: float, beta1: float, beta2: float, beta3: float,
                bias_correction1: float, bias_correction2: float, bias_correction3: float, eps: float,
                weight_decay: float, no_prox: bool) -> None:
    """One Adan step on one tensor. ``prev_grad`` holds the previous (clipped) gradient and is
    overwritten with this one."""
    diff = grad - prev_grad
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_diff.lerp_(diff, 1 - beta2)
    # The second moment tracks the Nesterov-corrected gradient g_k + beta2 * (g_k - g_{k-1}).
    nesterov = diff.mul_(beta2).add_(grad)
    exp_avg_sq.mul_(beta3).addcmul_(nesterov, nesterov, value=1 - beta3)
    denom = exp_avg_sq.sqrt().div_(math.sqrt(bias_correction3)).add_(eps)
    if no_prox:
        param.mul_(1 - lr * weight_decay)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    param.addcdiv_(exp_avg_diff, denom, value=-lr * beta2 / bias_correction2)
    if not no_prox:
        # Proximal weight decay: the paper's Algorithm 1 divides instead of shrinking first.
        param.div_(1 + lr * weight_decay)
    prev_grad.copy_(grad)


def adan(params: list[Tensor], grads: list[Tensor], states: list[dict], *, lr: float,
         betas: tuple[float, float, float], eps: float, weight_decay: float, no_prox: bool,
         clip_coef: float | Tensor = 1.0) -> None:
    """Functional Adan: one step over matching lists of parameters, gradients and states."""
    beta1, beta2, beta3 = betas
    for p, g, s in zip(params, grads, states):
        g = g * clip_coef if not (isinstance(clip_coef, float) and clip_coef == 1.0) else g
        if "prev_grad" not in s:
            # First step: no previous gradient, so the difference term starts at zero.
            s["prev_grad"] = g.clone()
        s["step"] += 1
        step = s["step"].item()
        adan_update(p, g, s["exp_avg"], s["exp_avg_diff"], s["exp_avg_sq"], s["prev_grad"], lr=lr,
                    beta1=beta1, beta2=beta2, beta3=beta3, bias_correction1=1 - beta1 ** step,
                    bias_correction2=1 - beta2 ** step, bias_correction3=1 - beta3 ** step, eps=eps,
                    weight_decay=weight_decay, no_prox=no_prox)


class Adan(torch.optim.Optimizer):
    """Adan.

    Paper: Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep
    Models" (TPAMI 2024, arXiv:2208.06677).
    Reference: sail-sg/Adan (``adan.py``), as packaged by ``pytorch_optimizer.Adan`` (tested against).
    The reference writes ``betas`` as EMA keep-rates (0.98, 0.92, 0.99); the paper writes the
    complementary (0.02, 0.08, 0.01). ``no_prox=False`` is the paper's proximal weight decay
    (divide by 1 + lr*wd); ``no_prox=True`` is AdamW-style decoupled decay. ``max_grad_norm`` > 0
    clips by the global norm inside the optimizer, as the reference does (off by default: the
    trainer already clips). For every parameter; one more fp32 buffer than AdamW plus the
    previous gradient.
    """

    state_bytes_per_param: float = 16.0  # exp_avg, exp_avg_diff, exp_avg_sq, prev_grad

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
                 eps: float = 1e-8, weight_decay: float = 0.0, max_grad_norm: float = 0.0,
                 no_prox: bool = False):
        if lr < 0:
            raise ConfigError("optim.lr", f"got {lr}, expected >= 0")
        if len(betas) != 3 or not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError("optim.betas", f"got {list(betas)}, expected three numbers in [0, 1)")
        if eps < 0 or weight_decay < 0 or max_grad_norm < 0:
            bad = "eps" if eps < 0 else "weight_decay" if weight_decay < 0 else "max_grad_norm"
            raise ConfigError(f"optim.{bad}", "expected >= 0")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      max_grad_norm=max_grad_norm, no_prox=no_prox))

    def refuse(self, strategy: str, grad_accum_steps: int) -> Optional[str]:
        # The in-optimizer clip needs the global gradient norm; on shards or owner-rank subsets
        # each rank would see only part of it.
        if self.defaults["max_grad_norm"] > 0 and strategy in ("zero1", "zero2", "fsdp", "hsdp"):
            return (f"adan's max_grad_norm clips by a norm no rank holds under {strategy}; "
                    "set optim.max_grad_norm=0 and use train.grad_clip")
        return None

    def _clip_coef(self) -> float | Tensor:
        max_norm = self.defaults["max_grad_norm"]
        if max_norm == 0:
            return 1.0
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        return torch.clamp(max_norm / (norm + self.defaults["eps"]), max=1.0)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clip_coef = self._clip_coef()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    for key in ("exp_avg", "exp_avg_diff", "exp_avg_sq"):
                        state[key] = torch.zeros_like(p)
                states.append(state)
            adan(params, [p.grad for p in params], states, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                 weight_decay=group["weight_decay"], no_prox=group["no_prox"], clip_coef=clip_coef)
        return loss
