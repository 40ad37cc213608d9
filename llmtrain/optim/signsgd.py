"""signSGD and Signum: step along the sign of the gradient (or of its momentum).

The 1-bit view: each coordinate's update is one bit times the learning rate, which is why
signSGD is also a gradient-compression scheme (majority vote across workers in the paper).
Here the sign is taken after the data-parallel all-reduce, i.e. the single-worker algorithm.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from llmtrain.errors import ConfigError


def sign_update(param: Tensor, grad: Tensor, momentum_buffer: Optional[Tensor], *, lr: float,
                momentum: float, weight_decay: float, weight_decouple: bool) -> None:
    """One signSGD (``momentum_buffer is None``) or Signum step on one tensor."""
    if weight_decay != 0:
        if weight_decouple:
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    if momentum_buffer is not None:
        # Signum keeps an EMA (not a heavy-ball sum) of gradients: m <- beta*m + (1-beta)*g.
        momentum_buffer.lerp_(grad, 1 - momentum)
        grad = momentum_buffer
    param.add_(torch.sign(grad), alpha=-lr)


def sign_sgd(params: list[Tensor], grads: list[Tensor], states: list[dict], *, lr: float, momentum: float,
             weight_decay: float, weight_decouple: bool) -> None:
    """Functional signSGD / Signum: one step over matching lists."""
    for p, g, s in zip(params, grads, states):
        sign_update(p, g, s.get("momentum_buffer"), lr=lr, momentum=momentum,
                    weight_decay=weight_decay, weight_decouple=weight_decouple)


class SignSGD(torch.optim.Optimizer):
    """signSGD (``momentum=0``, no state) and, with ``momentum`` > 0, Signum.

    Paper: Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex Problems"
    (ICML 2018), Algorithms 1 (signSGD) and 3 (Signum).
    Reference: ``pytorch_optimizer.SignSGD`` (tested against); ``weight_decouple=True`` applies
    decay to the weights (as the reference's default), False adds it to the gradient.
    For every parameter; lr plays the role of Lion's (1e-4..1e-3 for LMs).
    """

    state_bytes_per_param: float = 0.0  # with momentum > 0: 4.0, like Signum

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0,
                 weight_decay: float = 0.0, weight_decouple: bool = True):
        if lr < 0:
            raise ConfigError("optim.lr", f"got {lr}, expected >= 0")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError("optim.momentum", f"got {momentum}, expected a number in [0, 1)")
        if weight_decay < 0:
            raise ConfigError("optim.weight_decay", f"got {weight_decay}, expected >= 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      weight_decouple=weight_decouple))

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
                if group["momentum"] > 0 and "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                states.append(state)
            sign_sgd(params, [p.grad for p in params], states, lr=group["lr"], momentum=group["momentum"],
                     weight_decay=group["weight_decay"], weight_decouple=group["weight_decouple"])
        return loss


class Signum(SignSGD):
    """Signum: signSGD on an EMA of gradients (``momentum=0.9`` by default).

    Paper: Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex Problems" (ICML 2018),
    Algorithm 3. Reference: ``pytorch_optimizer.SignSGD`` with momentum (tested against). See ``SignSGD``.
    """

    state_bytes_per_param: float = 4.0  # momentum buffer in fp32

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 weight_decouple: bool = True):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         weight_decouple=weight_decouple)
