"""NAdam, RAdam and Adamax: the Adam variants users ask for by name.

Each follows ``torch.optim`` (the reference implementation) step for step, including its
defaults, so a run with ``optim=nadam`` reproduces ``torch.optim.NAdam``. The three layers are
the same for all of them: the class validates hyperparameters and holds per-parameter state, a
functional entry (``nadam`` / ``radam`` / ``adamax``) does one step over lists of tensors, and
a pure tensor function (``*_update``) holds the maths for one tensor.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from llmtrain.errors import ConfigError


def check_adam_hparams(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """Shared validation for the Adam family: one ConfigError naming the bad key."""
    if lr < 0:
        raise ConfigError("optim.lr", f"got {lr}, expected >= 0")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError("optim.betas", f"got {list(betas)}, expected two numbers in [0, 1)")
    if eps < 0:
        raise ConfigError("optim.eps", f"got {eps}, expected >= 0")
    if weight_decay < 0:
        raise ConfigError("optim.weight_decay", f"got {weight_decay}, expected >= 0")


def _init_state(opt: torch.optim.Optimizer, p: Tensor, names: tuple[str, ...], **scalars: float) -> dict:
    state = opt.state[p]
    if not state:
        # Step counters are float32 tensors like torch.optim's, so the scalar maths (and hence
        # the parameters) agree with the reference to float32 rounding.
        state["step"] = torch.tensor(0.0)
        for key, value in scalars.items():
            state[key] = torch.tensor(value)
        for name in names:
            state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


# ----------------------------------------------------------------------------------- NAdam


def nadam_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, mu_product: Tensor,
                 step: float, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 momentum_decay: float, decoupled_weight_decay: bool) -> None:
    """One NAdam step on one tensor (Dozat 2016, with torch's momentum-decay schedule)."""
    if weight_decay != 0:
        if decoupled_weight_decay:
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    # Momentum warms up: mu_t = beta1 * (1 - 0.5 * 0.96^(t * psi)), Dozat's schedule.
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    mu_product *= mu
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = exp_avg_sq.div(1 - beta2 ** step).sqrt().add_(eps)
    prod = mu_product.item()
    param.addcdiv_(grad, denom, value=-lr * (1.0 - mu) / (1.0 - prod))
    param.addcdiv_(exp_avg, denom, value=-lr * mu_next / (1.0 - prod * mu_next))


def nadam(params: list[Tensor], grads: list[Tensor], states: list[dict], *, lr: float,
          betas: tuple[float, float], eps: float, weight_decay: float, momentum_decay: float,
          decoupled_weight_decay: bool) -> None:
    """Functional NAdam: one step over matching lists of parameters, gradients and states."""
    for p, g, s in zip(params, grads, states):
        s["step"] += 1
        nadam_update(p, g, s["exp_avg"], s["exp_avg_sq"], s["mu_product"], s["step"].item(), lr=lr,
                     beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay,
                     momentum_decay=momentum_decay, decoupled_weight_decay=decoupled_weight_decay)


class NAdam(torch.optim.Optimizer):
    """Adam with Nesterov momentum.

    Paper: Dozat, "Incorporating Nesterov Momentum into Adam" (ICLR 2016 workshop).
    Reference: ``torch.optim.NAdam`` (momentum-decay schedule psi=4e-3 and the mu-product bias
    correction come from it). For every parameter; same memory as AdamW.
    """

    state_bytes_per_param: float = 8.0  # exp_avg + exp_avg_sq in fp32

    def __init__(self, params, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum_decay: float = 4e-3,
                 decoupled_weight_decay: bool = False):
        check_adam_hparams(lr, betas, eps, weight_decay)
        if momentum_decay < 0:
            raise ConfigError("optim.momentum_decay", f"got {momentum_decay}, expected >= 0")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      momentum_decay=momentum_decay,
                                      decoupled_weight_decay=decoupled_weight_decay))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            states = [_init_state(self, p, ("exp_avg", "exp_avg_sq"), mu_product=1.0) for p in params]
            nadam(params, [p.grad for p in params], states, lr=group["lr"], betas=group["betas"],
                  eps=group["eps"], weight_decay=group["weight_decay"],
                  momentum_decay=group["momentum_decay"],
                  decoupled_weight_decay=group["decoupled_weight_decay"])
        return loss


# ----------------------------------------------------------------------------------- RAdam


def radam_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: float, *,
                 lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 decoupled_weight_decay: bool) -> None:
    """One RAdam step on one tensor: Adam whose adaptive term is switched on (and rescaled)
    only once the variance of the adaptive learning rate is tractable (rho_t > 5)."""
    if weight_decay != 0:
        if decoupled_weight_decay:
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    corrected = exp_avg / bias_correction1
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2 ** step) / bias_correction2
    if rho_t > 5.0:
        rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        adaptive = (bias_correction2 ** 0.5) / exp_avg_sq.sqrt().add(eps)
        param.add_(corrected * lr * adaptive * rect, alpha=-1.0)
    else:
        param.add_(corrected * lr, alpha=-1.0)


def radam(params: list[Tensor], grads: list[Tensor], states: list[dict], *, lr: float,
          betas: tuple[float, float], eps: float, weight_decay: float,
          decoupled_weight_decay: bool) -> None:
    """Functional RAdam: one step over matching lists of parameters, gradients and states."""
    for p, g, s in zip(params, grads, states):
        s["step"] += 1
        radam_update(p, g, s["exp_avg"], s["exp_avg_sq"], s["step"].item(), lr=lr, beta1=betas[0],
                     beta2=betas[1], eps=eps, weight_decay=weight_decay,
                     decoupled_weight_decay=decoupled_weight_decay)


class RAdam(torch.optim.Optimizer):
    """Rectified Adam.

    Paper: Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond" (ICLR 2020).
    Reference: ``torch.optim.RAdam`` (SGD-with-momentum steps while rho_t <= 5, as the paper).
    For every parameter; a warmup-free alternative to AdamW with the same memory.
    """

    state_bytes_per_param: float = 8.0

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled_weight_decay: bool = False):
        check_adam_hparams(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=decoupled_weight_decay))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            states = [_init_state(self, p, ("exp_avg", "exp_avg_sq")) for p in params]
            radam(params, [p.grad for p in params], states, lr=group["lr"], betas=group["betas"],
                  eps=group["eps"], weight_decay=group["weight_decay"],
                  decoupled_weight_decay=group["decoupled_weight_decay"])
        return loss


# ---------------------------------------------------------------------------------- Adamax


def adamax_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_inf: Tensor, step: float, *,
                  lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One Adamax step on one tensor: Adam with the second moment replaced by an
    exponentially weighted infinity norm (no bias correction needed for it)."""
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
    param.addcdiv_(exp_avg, exp_inf, value=-lr / (1 - beta1 ** step))


def adamax(params: list[Tensor], grads: list[Tensor], states: list[dict], *, lr: float,
           betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """Functional Adamax: one step over matching lists of parameters, gradients and states."""
    for p, g, s in zip(params, grads, states):
        s["step"] += 1
        adamax_update(p, g, s["exp_avg"], s["exp_inf"], s["step"].item(), lr=lr, beta1=betas[0],
                      beta2=betas[1], eps=eps, weight_decay=weight_decay)


class Adamax(torch.optim.Optimizer):
    """Adam with the infinity norm.

    Paper: Kingma & Ba, "Adam: A Method for Stochastic Optimization" (ICLR 2015), section 7.1.
    Reference: ``torch.optim.Adamax`` (eps is added inside the max, as torch does; the paper has
    no eps). For every parameter; same memory as AdamW.
    """

    state_bytes_per_param: float = 8.0  # exp_avg + exp_inf in fp32

    def __init__(self, params, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        check_adam_hparams(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            states = [_init_state(self, p, ("exp_avg", "exp_inf")) for p in params]
            adamax(params, [p.grad for p in params], states, lr=group["lr"], betas=group["betas"],
                   eps=group["eps"], weight_decay=group["weight_decay"])
        return loss
