"""SGD with momentum (heavy ball), dampening and Nesterov momentum.

Robbins & Monro (1951); momentum: Polyak (1964); Nesterov momentum in the form of Sutskever et al.,
"On the importance of initialization and momentum in deep learning" (ICML 2013). Reference
implementation: ``torch.optim.SGD`` (matched to 1e-6, tests/test_optim_classic.py). A baseline;
transformers train poorly with it without careful tuning.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from llmtrain.optim._common import check_positive, resolve_impl

_torch_sgd = importlib.import_module("torch.optim.sgd")


def sgd_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: Optional[torch.Tensor],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool = False,
) -> Optional[torch.Tensor]:
    """θ ← θ - lr·d with d = g + λθ, or with momentum b ← μb + (1-τ)d (b₁ = d), d = b or d + μb.

    Returns the (possibly new) momentum buffer.
    """
    d = -grad if maximize else grad
    if weight_decay != 0.0:
        d = d.add(param, alpha=weight_decay)
    if momentum != 0.0:
        if momentum_buffer is None:
            momentum_buffer = torch.clone(d).detach()
        else:
            momentum_buffer.mul_(momentum).add_(d, alpha=1.0 - dampening)
        d = d.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    param.add_(d, alpha=-lr)
    return momentum_buffer


class SGD(torch.optim.Optimizer):
    """Stochastic gradient descent; ``momentum=0`` keeps no state."""

    state_bytes_per_param: float = 4.0  # the momentum buffer (0 without momentum)

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        impl: str = "auto",
    ):
        check_positive("learning rate", lr)
        check_positive("momentum value", momentum)
        check_positive("weight_decay value", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Invalid nesterov: it requires momentum > 0 and dampening = 0")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        # fused/foreach: torch's own multi-tensor kernels for this same rule (torch.optim.sgd.sgd)
        self.impl = resolve_impl(impl, name="sgd", has_fused=hasattr(torch, "_fused_sgd_"), has_triton=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if self.impl != "eager":
                self._torch_step(group)
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                buf = sgd_update_(
                    p, p.grad, state.get("momentum_buffer"), lr=float(group["lr"]), momentum=group["momentum"],
                    dampening=group["dampening"], nesterov=group["nesterov"], weight_decay=group["weight_decay"],
                    maximize=group["maximize"],
                )
                if buf is not None:
                    state["momentum_buffer"] = buf
        return loss

    def _torch_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        _torch_sgd.sgd(
            params, [p.grad for p in params], buffers, foreach=self.impl == "foreach", fused=self.impl == "fused",
            weight_decay=group["weight_decay"], momentum=group["momentum"], lr=float(group["lr"]),
            dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
        )
        if group["momentum"] != 0.0:  # torch fills in the buffers it created on the first step
            for p, buf in zip(params, buffers):
                self.state[p]["momentum_buffer"] = buf
