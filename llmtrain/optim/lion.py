"""Lion (EvoLved Sign Momentum).

Chen et al., "Symbolic Discovery of Optimization Algorithms" (NeurIPS 2023). Reference
implementation: lucidrains' ``lion-pytorch`` (``lion_pytorch.Lion``), matched to 1e-6 on every
``impl`` (tests/test_optim_lion.py). One momentum buffer (4 B/param, half of AdamW); the sign
update has unit magnitude per coordinate, so use an lr 3-10x smaller than AdamW's and a
weight decay 3-10x larger to keep lr·λ similar.
"""

from __future__ import annotations

import torch

from llmtrain.optim._common import check_betas, check_positive, group_impl, load_kernel, resolve_compiled_impl
from llmtrain.optim.compiled import apply_updates
from llmtrain.optim.kernels import triton_usable


def lion_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool = False,
) -> None:
    """θ ← θ(1 - lr·λ) - lr·sign(β1·m + (1-β1)·g);  m ← β2·m + (1-β2)·g.

    ``lr`` may be a 0-dim tensor (the compiled path, ``llmtrain.optim.compiled``).
    """
    if maximize:
        grad = -grad
    param.mul_(1.0 - lr * weight_decay)
    param.sub_(exp_avg.mul(beta1).add_(grad, alpha=1.0 - beta1).sign_().mul_(lr))
    exp_avg.mul_(beta2).add_(grad, alpha=1.0 - beta2)


def lion_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    *,
    impl: str,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    if impl == "eager":
        for p, g, m in zip(params, grads, exp_avgs):
            lion_update_(p, g, m, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize)
    elif impl == "fused":  # inductor-fused loops, a graph per chunk of same-shape tensors (llmtrain.optim.compiled)
        apply_updates(lion_update_, [((p, g, m), ()) for p, g, m in zip(params, grads, exp_avgs)], fused=True,
                      static=dict(beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize),
                      shared=dict(lr=lr))
    elif impl == "triton":
        load_kernel("lion", "fused_lion_")(
            params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize
        )
    else:  # foreach: the same maths, one multi-tensor kernel per operation
        if maximize:
            grads = torch._foreach_neg(grads)
        if weight_decay != 0.0:
            torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        update = torch._foreach_mul(exp_avgs, beta1)
        torch._foreach_add_(update, grads, alpha=1.0 - beta1)
        torch._foreach_sign_(update)
        torch._foreach_add_(params, update, alpha=-lr)
        torch._foreach_mul_(exp_avgs, beta2)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta2)


class Lion(torch.optim.Optimizer):
    """Sign of an interpolated momentum; decoupled weight decay as in AdamW."""

    state_bytes_per_param: float = 4.0

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        maximize: bool = False,
        impl: str = "auto",
    ):
        check_positive("learning rate", lr)
        check_positive("weight_decay value", weight_decay)
        check_betas(betas)
        self.impl = resolve_compiled_impl(impl, name="lion", has_foreach=True, has_triton=True)
        if self.impl == "triton":
            load_kernel("lion", "fused_lion_")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
            if params:
                beta1, beta2 = group["betas"]
                impl = group_impl(self.impl, params, "foreach")
                if impl == "fused" and self.impl == "auto" and triton_usable(params[0].device):
                    impl = "triton"  # on CUDA auto takes the hand-written kernel
                lion_step(params, grads, exp_avgs, impl=impl, lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                          weight_decay=group["weight_decay"], maximize=group["maximize"])
        return loss
