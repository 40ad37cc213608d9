"""Adam and AdamW.

Adam: Kingma & Ba, "Adam: A Method for Stochastic Optimization" (ICLR 2015); AMSGrad: Reddi et
al., "On the Convergence of Adam and Beyond" (ICLR 2018). AdamW: Loshchilov & Hutter, "Decoupled
Weight Decay Regularization" (ICLR 2019). Reference implementation: ``torch.optim.Adam`` /
``torch.optim.AdamW``, which these match to 1e-6 on every ``impl`` (tests/test_optim_adam.py).

Three layers (STYLE.md example 5): ``adam_update_`` is the update maths on one tensor,
``adam_step`` runs one step over lists of tensors on the chosen ``impl``, and the classes validate
hyperparameters and hold state. Meant for every parameter of a transformer.
"""

from __future__ import annotations

import importlib
import math
from typing import Optional

import torch

from llmtrain.errors import ConfigError
from llmtrain.optim._common import check_betas, check_positive, load_kernel, resolve_impl, step_tensor

_torch_adam = importlib.import_module("torch.optim.adam")


def adam_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: Optional[torch.Tensor],
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool = False,
) -> None:
    """One Adam(W) update of ``param`` in place; ``step`` counts this update (1 on the first).

    m ← β1·m + (1-β1)·g;  v ← β2·v + (1-β2)·g²;  θ ← θ - lr·(m/(1-β1ᵗ)) / (√(v/(1-β2ᵗ)) + ε).
    AdamW shrinks θ by (1 - lr·λ) first; Adam adds λ·θ to the gradient (L2). AMSGrad uses the
    running maximum of v in the denominator.
    """
    if maximize:
        grad = -grad
    if weight_decay != 0.0:
        if decoupled:
            param.mul_(1.0 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    second = exp_avg_sq
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second = max_exp_avg_sq
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    denom = (second.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def adam_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    impl: str,
    amsgrad: bool,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
) -> None:
    """One step over a parameter group; ``steps`` are already incremented for this step."""
    if impl == "eager":
        for i, p in enumerate(params):
            adam_update_(
                p, grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else None,
                int(steps[i].item()), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, decoupled=decoupled, maximize=maximize,
            )
    elif impl == "triton":
        load_kernel("adamw", "fused_adamw_")(
            params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, maximize=maximize,
        )
    else:
        # torch's functional Adam: the same maths, multi-tensor (foreach) or one fused kernel.
        # It increments the step counters itself, so hand it the pre-increment values.
        for s in steps:
            s.sub_(1)
        _torch_adam.adam(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
            foreach=impl == "foreach", fused=impl == "fused", decoupled_weight_decay=decoupled,
            amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps,
            maximize=maximize,
        )


class Adam(torch.optim.Optimizer):
    """Adam with L2 weight decay (``weight_decay`` is added to the gradient); see ``AdamW``."""

    decoupled_weight_decay = False
    state_bytes_per_param: float = 8.0  # exp_avg + exp_avg_sq in fp32 (12 with amsgrad)

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        maximize: bool = False,
        impl: str = "auto",
    ):
        check_positive("learning rate", lr)
        check_positive("epsilon value", eps)
        check_positive("weight_decay value", weight_decay)
        check_betas(betas)
        name = type(self).__name__.lower()
        self.impl = resolve_impl(impl, name=name, has_fused=hasattr(torch, "_fused_adamw_"), has_triton=True)
        if self.impl == "triton":
            if amsgrad:
                raise ConfigError("optim.impl", f"the triton {name} kernel has no amsgrad; use impl=auto")
            if not self.decoupled_weight_decay and weight_decay != 0.0:
                raise ConfigError("optim.impl", "the triton kernel is AdamW's; use optim=adamw or weight_decay=0")
            load_kernel("adamw", "fused_adamw_")  # fail at start-up, not at the first step
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                step = step_tensor(state, p)
                step.add_(1)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                if group["amsgrad"]:
                    max_sqs.append(state["max_exp_avg_sq"])
                steps.append(step)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            adam_step(
                params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, impl=self.impl, amsgrad=group["amsgrad"],
                lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], decoupled=self.decoupled_weight_decay, maximize=group["maximize"],
            )
        return loss


class AdamW(Adam):
    """AdamW: weight decay shrinks the weights directly, decoupled from the adaptive step."""

    decoupled_weight_decay = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
        impl: str = "auto",
    ):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize, impl)


def adamw_group_step(optimizer: torch.optim.Optimizer, group: dict, *, betas_key: str = "adamw_betas", eps_key: str = "adamw_eps") -> None:
    """The AdamW side of a hybrid matrix optimizer (Muon, Shampoo, SOAP, GaLore): eager AdamW on
    the group's parameters with its ``lr``, ``weight_decay`` and ``adamw_betas`` / ``adamw_eps``."""
    beta1, beta2 = group[betas_key]
    for p in group["params"]:
        if p.grad is None:
            continue
        state = optimizer.state[p]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        adam_update_(
            p, p.grad, state["exp_avg"], state["exp_avg_sq"], None, state["step"], lr=float(group["lr"]),
            beta1=beta1, beta2=beta2, eps=group[eps_key], weight_decay=group["weight_decay"], decoupled=True,
        )


def adamw_group_step_multi(optimizer: torch.optim.Optimizer, group: dict, *, impl: str,
                           betas_key: str = "adamw_betas", eps_key: str = "adamw_eps") -> None:
    """``adamw_group_step`` on torch's multi-tensor kernels (``impl`` fused or foreach): the same
    rule and the same state (an int ``step``, as the eager side keeps it), so impls can be switched."""
    beta1, beta2 = group[betas_key]
    params, exp_avgs, exp_avg_sqs, steps = [], [], [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        state = optimizer.state[p]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        params.append(p)
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        steps.append(torch.tensor(float(state["step"]), device=p.device))
    if params:
        adam_step(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps, impl=impl, amsgrad=False,
                  lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group[eps_key],
                  weight_decay=group["weight_decay"], decoupled=True, maximize=False)
