"""RMSprop (optionally centered, with momentum).

Tieleman & Hinton, Coursera lecture 6.5 (2012); the centered variant is Graves, "Generating
Sequences With Recurrent Neural Networks" (2013). Reference implementation:
``torch.optim.RMSprop`` (matched to 1e-6, tests/test_optim_classic.py). Adam without bias
correction or first moment; a baseline for LLM pretraining.
"""

from __future__ import annotations

from typing import Optional

import torch

from llmtrain.optim._common import check_positive, group_impl, resolve_compiled_impl
from llmtrain.optim.compiled import apply_updates


def rmsprop_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    grad_avg: Optional[torch.Tensor],
    momentum_buffer: Optional[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    maximize: bool = False,
) -> None:
    """v ← αv + (1-α)g²;  denominator √(v - ḡ²) + ε if centered (ḡ the running mean of g), else √v + ε;
    θ ← θ - lr·g/denominator, or through a momentum buffer b ← μb + g/denominator.

    ``lr`` may be a 0-dim tensor (the compiled path, ``llmtrain.optim.compiled``)."""
    if maximize:
        grad = -grad
    if weight_decay != 0.0:
        grad = grad.add(param, alpha=weight_decay)
    square_avg.mul_(alpha).addcmul_(grad, grad, value=1.0 - alpha)
    if grad_avg is not None:
        grad_avg.lerp_(grad, 1.0 - alpha)
        avg = square_avg.addcmul(grad_avg, grad_avg, value=-1.0).sqrt_().add_(eps)
    else:
        avg = square_avg.sqrt().add_(eps)
    if momentum_buffer is not None:
        momentum_buffer.mul_(momentum).addcdiv_(grad, avg)
        param.sub_(momentum_buffer * lr)
    else:
        param.sub_(grad.div(avg).mul_(lr))


class RMSprop(torch.optim.Optimizer):
    """Divide the gradient by a running RMS of recent gradients."""

    state_bytes_per_param: float = 4.0  # square_avg (+4 centered, +4 momentum)

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        maximize: bool = False,
        impl: str = "auto",
    ):
        for name, value in (("learning rate", lr), ("alpha value", alpha), ("epsilon value", eps),
                            ("weight_decay value", weight_decay), ("momentum value", momentum)):
            check_positive(name, value)
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        centered=centered, maximize=maximize)
        self.impl = resolve_compiled_impl(impl, name="rmsprop")
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
            hyper = dict(alpha=group["alpha"], eps=group["eps"], weight_decay=group["weight_decay"],
                         momentum=group["momentum"], maximize=group["maximize"])
            entries = []
            for p in live:
                state = self.state[p]
                if "square_avg" not in state:
                    state["step"] = 0
                    state["square_avg"] = torch.zeros_like(p)
                    if group["momentum"] > 0:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    if group["centered"]:
                        state["grad_avg"] = torch.zeros_like(p)
                state["step"] += 1
                entries.append(((p, p.grad, state["square_avg"], state.get("grad_avg"), state.get("momentum_buffer")), ()))
            if entries:
                apply_updates(rmsprop_update_, entries, fused=fused, static=hyper, shared=dict(lr=float(group["lr"])))
        return loss
