"""SM3: memory-efficient adaptive optimisation with one accumulator per row/column (per slice)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from llmtrain.errors import ConfigError


def _max_except(x: Tensor, dim: int) -> Tensor:
    dims = tuple(d for d in range(x.ndim) if d != dim)
    return x.amax(dim=dims, keepdim=True) if dims else x


def sm3_update(param: Tensor, grad: Tensor, accumulators: list[Tensor], momentum_buffer: Optional[Tensor], *,
               lr: float, momentum: float, beta: float, eps: float) -> None:
    """One SM3-II step on one tensor.

    ``accumulators[i]`` has the parameter's shape with every dimension but ``i`` set to 1: the
    cover of a k-dim tensor is its k families of slices. nu = min_i acc_i (broadcast) + g^2, each
    accumulator keeps the max of nu over its slice, and the step is g / sqrt(nu).
    """
    nu = accumulators[0].clone()
    for acc in accumulators[1:]:
        nu = torch.min(nu, acc)
    if beta > 0:
        nu.mul_(beta)
    nu.addcmul_(grad, grad, value=1.0 - beta)
    for i, acc in enumerate(accumulators):
        slice_max = _max_except(nu, i) if param.ndim > 0 else nu
        if beta > 0:
            torch.max(acc, slice_max, out=acc)
        else:
            acc.copy_(slice_max)
    update = nu.add_(eps).rsqrt_().mul_(grad)
    if momentum_buffer is not None:
        momentum_buffer.lerp_(update, 1.0 - momentum)
        update = momentum_buffer
    param.add_(update, alpha=-lr)


def sm3(params: list[Tensor], grads: list[Tensor], states: list[dict], *, lr: float, momentum: float,
        beta: float, eps: float) -> None:
    """Functional SM3: one step over matching lists."""
    for p, g, s in zip(params, grads, states):
        accs = [s[f"accumulator_{i}"] for i in range(max(p.ndim, 1))]
        sm3_update(p, g, accs, s.get("momentum_buffer"), lr=lr, momentum=momentum, beta=beta, eps=eps)


class SM3(torch.optim.Optimizer):
    """SM3-II.

    Paper: Anil, Gupta, Koren & Singer, "Memory-Efficient Adaptive Optimization" (NeurIPS 2019).
    Reference: the authors' TF implementation as ported to PyTorch in ``pytorch_optimizer.SM3``
    (tested against; defaults lr=0.1, momentum=0, beta=0, eps=1e-30). ``beta`` > 0 turns the
    accumulators into an exponential moving max (the reference's extension; the paper is beta=0).
    For every parameter: a [m, n] matrix keeps m + n accumulators instead of m*n, so the state
    is about zero bytes per parameter (4 more with momentum). Dense gradients only.
    """

    state_bytes_per_param: float = 0.0  # O(m + n) per matrix; +4.0 when momentum > 0

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.0, beta: float = 0.0, eps: float = 1e-30):
        if lr < 0:
            raise ConfigError("optim.lr", f"got {lr}, expected >= 0")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError("optim.momentum", f"got {momentum}, expected a number in [0, 1)")
        if not 0.0 <= beta <= 1.0:
            raise ConfigError("optim.beta", f"got {beta}, expected a number in [0, 1]")
        if eps < 0:
            raise ConfigError("optim.eps", f"got {eps}, expected >= 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, beta=beta, eps=eps))

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
                if p.grad.is_sparse:
                    raise ConfigError("optim.name", "sm3 here supports dense gradients only")
                state = self.state[p]
                if not state:
                    if p.ndim == 0:
                        state["accumulator_0"] = torch.zeros_like(p)
                    for i in range(p.ndim):
                        shape = [1] * p.ndim
                        shape[i] = p.shape[i]
                        state[f"accumulator_{i}"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
                    if group["momentum"] > 0:
                        state["momentum_buffer"] = torch.zeros_like(p)
                states.append(state)
            sm3(params, [p.grad for p in params], states, lr=group["lr"], momentum=group["momentum"],
                beta=group["beta"], eps=group["eps"])
        return loss
