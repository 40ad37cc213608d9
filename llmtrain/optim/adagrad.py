"""Adagrad.

Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and Stochastic
Optimization" (JMLR 2011). Reference implementation: ``torch.optim.Adagrad`` (matched to 1e-6,
tests/test_optim_classic.py). The accumulated squared gradient only grows, so the effective step
shrinks over a long run; mostly of historical and baseline interest for LLMs.
"""

from __future__ import annotations

import importlib

import torch

from llmtrain.optim._common import check_positive, is_sharded, resolve_impl, step_tensor

_torch_adagrad = importlib.import_module("torch.optim.adagrad")


def adagrad_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    state_sum: torch.Tensor,
    step: int,
    *,
    lr: float,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool = False,
) -> None:
    """G ← G + g²;  θ ← θ - lr_t·g/(√G + ε) with lr_t = lr/(1 + (t-1)·lr_decay)."""
    if maximize:
        grad = -grad
    if weight_decay != 0.0:
        grad = grad.add(param, alpha=weight_decay)
    clr = lr / (1.0 + (step - 1) * lr_decay)
    state_sum.addcmul_(grad, grad, value=1.0)
    param.addcdiv_(grad, state_sum.sqrt().add_(eps), value=-clr)


class Adagrad(torch.optim.Optimizer):
    """Per-coordinate step sizes from the running sum of squared gradients."""

    state_bytes_per_param: float = 4.0

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        maximize: bool = False,
        impl: str = "auto",
    ):
        for name, value in (("learning rate", lr), ("lr_decay", lr_decay), ("weight_decay value", weight_decay),
                            ("initial_accumulator_value", initial_accumulator_value), ("epsilon value", eps)):
            check_positive(name, value)
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize)
        # fused/foreach: torch's own kernels for this same rule (torch.optim.adagrad.adagrad)
        self.impl = resolve_impl(impl, name="adagrad", has_fused=hasattr(torch, "_fused_adagrad_"), has_triton=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, sums, steps = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.full_like(p, group["initial_accumulator_value"])
                params.append(p)
                sums.append(state["sum"])
                steps.append(step_tensor(state, p))  # a float32 tensor, as torch's kernels want
            # torch's fused Adagrad has no DTensor sharding rule: FSDP shards take foreach
            impl = "foreach" if self.impl == "fused" and is_sharded(params) else self.impl
            if params and impl != "eager":  # torch increments the step counters itself
                _torch_adagrad.adagrad(
                    params, [p.grad for p in params], sums, steps, fused=impl == "fused",
                    foreach=impl == "foreach", lr=float(group["lr"]), weight_decay=group["weight_decay"],
                    lr_decay=group["lr_decay"], eps=group["eps"], maximize=group["maximize"],
                )
                continue
            for p, state_sum, step in zip(params, sums, steps):
                step.add_(1)
                adagrad_update_(
                    p, p.grad, state_sum, int(step.item()), lr=float(group["lr"]), lr_decay=group["lr_decay"],
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                )
        return loss
