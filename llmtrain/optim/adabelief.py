"""AdaBelief.

Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients"
(NeurIPS 2020). Reference implementation: ``adabelief-pytorch`` (juntang-zhuang) as packaged in
``pytorch_optimizer.AdaBelief`` (rectify=False), matched to 1e-6 (tests/test_optim_adaptive.py).
Adam with the second moment of the *surprise* g - m instead of g: large steps where the gradient
agrees with its prediction. Same memory as AdamW.
"""

from __future__ import annotations

import math

import torch

from llmtrain.optim._common import check_betas, check_positive, group_impl, resolve_compiled_impl
from llmtrain.optim.compiled import apply_updates


def adabelief_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_var: torch.Tensor,
    step_size: float | torch.Tensor,
    inv_bias_correction2_sqrt: float | torch.Tensor,
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    weight_decouple: bool,
) -> None:
    """m ← β1·m + (1-β1)·g;  s ← β2·s + (1-β2)·(g-m)² + ε;  θ ← θ - lr·m̂/(√ŝ + ε).

    ``step_size`` = lr/(1-β1ᵗ) and ``inv_bias_correction2_sqrt`` = 1/√(1-β2ᵗ) come from
    ``bias_corrections``; they and ``lr`` may be 0-dim tensors (the compiled path,
    ``llmtrain.optim.compiled``). A product with a host-side reciprocal rather than a division:
    a vector divide costs several multiplies, and this loop is close to compute-bound on AVX-512."""
    if weight_decay != 0.0:
        if weight_decouple:
            param.mul_(1.0 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, 1.0 - beta1)
    residual = grad - exp_avg
    exp_avg_var.mul_(beta2).addcmul_(residual, residual, value=1.0 - beta2).add_(eps)
    denom = (exp_avg_var.sqrt() * inv_bias_correction2_sqrt).add_(eps)
    param.sub_(exp_avg.div(denom).mul_(step_size))


def bias_corrections(lr: float, beta1: float, beta2: float, step: int) -> tuple[float, float]:
    """(lr/(1-β1ᵗ), 1/√(1-β2ᵗ)), on the host in float64: kept out of compiled graphs, where a power
    of a 0-dim tensor would be recomputed for every element."""
    return lr / (1.0 - beta1**step), 1.0 / math.sqrt(1.0 - beta2**step)


class AdaBelief(torch.optim.Optimizer):
    """Adam whose denominator tracks the variance of g around its EMA."""

    state_bytes_per_param: float = 8.0

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: float = 0.0,
        weight_decouple: bool = True,
        impl: str = "auto",
    ):
        check_positive("learning rate", lr)
        check_positive("epsilon value", eps)
        check_positive("weight_decay value", weight_decay)
        check_betas(betas)
        self.impl = resolve_compiled_impl(impl, name="adabelief")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      weight_decouple=weight_decouple))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            live = [p for p in group["params"] if p.grad is not None]
            fused = bool(live) and group_impl(self.impl, live, "eager") == "fused"
            hyper = dict(beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                         weight_decouple=group["weight_decouple"])
            entries = []
            for p in live:
                state = self.state[p]
                if "exp_avg" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_var"] = torch.zeros_like(p)
                state["step"] += 1
                entries.append(((p, p.grad, state["exp_avg"], state["exp_avg_var"]),
                                bias_corrections(float(group["lr"]), beta1, beta2, state["step"])))
            if entries:
                apply_updates(adabelief_update_, entries, fused=fused, static=hyper, shared=dict(lr=float(group["lr"])))
        return loss
