"""LARS (Layer-wise Adaptive Rate Scaling).

You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks" (2017). Reference
implementation: ``pytorch_optimizer.LARS`` (kozistr), matched to 1e-6 (tests/test_optim_adaptive.py).
SGD with momentum whose per-tensor local lr is η·‖θ‖/(‖g‖ + λ‖θ‖); as in the reference (and the
SimCLR / Barlow Twins recipes), 1-D parameters (biases, norms) skip both the scaling and the weight
decay. Meant for very large batches; one momentum buffer.
"""

from __future__ import annotations

from typing import Optional

import torch

from llmtrain.optim._common import check_positive, group_impl, norm, resolve_compiled_impl
from llmtrain.optim.compiled import apply_updates


def lars_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: Optional[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    trust_coefficient: float,
) -> Optional[torch.Tensor]:
    """d = (g + λθ)·η‖θ‖/(‖g‖ + λ‖θ‖) for matrices (d = g for vectors); b ← μb + (1-τ)d;
    θ ← θ - lr·(d + μb if nesterov else b).

    ``lr`` may be a 0-dim tensor (the compiled path, ``llmtrain.optim.compiled``). Returns the trust
    ratio of a matrix: as a graph output it is computed once, not per 16 elements of the update loop
    (two square roots and a divide each)."""
    d, trust_ratio = grad, None
    if param.ndim > 1:
        param_norm = norm(param)
        denominator = norm(grad) + weight_decay * param_norm
        one = torch.ones_like(param_norm)
        trust_ratio = torch.where(
            param_norm > 0, torch.where(denominator > 0, trust_coefficient * param_norm / denominator, one), one
        )
        d = grad.add(param, alpha=weight_decay).mul_(trust_ratio)
    if momentum_buffer is not None:
        momentum_buffer.mul_(momentum).add_(d, alpha=1.0 - dampening)
        d = d.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    param.sub_(d * lr)
    return trust_ratio


class LARS(torch.optim.Optimizer):
    """Momentum SGD with a per-tensor trust ratio."""

    state_bytes_per_param: float = 4.0

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        nesterov: bool = False,
        impl: str = "auto",
    ):
        for name, value in (("learning rate", lr), ("momentum value", momentum), ("dampening", dampening),
                            ("weight_decay value", weight_decay), ("trust_coefficient", trust_coefficient)):
            check_positive(name, value)
        self.impl = resolve_compiled_impl(impl, name="lars")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            fused = bool(live) and group_impl(self.impl, live, "eager") == "fused"
            hyper = dict(momentum=group["momentum"], dampening=group["dampening"], nesterov=group["nesterov"],
                         weight_decay=group["weight_decay"], trust_coefficient=group["trust_coefficient"])
            entries = []
            for p in live:
                state = self.state[p]
                if group["momentum"] > 0 and "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                entries.append(((p, p.grad, state.get("momentum_buffer")), ()))
            if entries:  # not flattened: matrices and vectors follow different rules
                apply_updates(lars_update_, entries, fused=fused, static=hyper, shared=dict(lr=float(group["lr"])),
                              flatten=False)
        return loss
