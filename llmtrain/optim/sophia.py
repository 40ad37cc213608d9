"""Sophia-G: second-order clipped stochastic optimization with a Gauss–Newton–Bartlett Hessian.

Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training" (ICLR 2024). Reference implementation: github.com/Liuhong99/Sophia (``SophiaG`` in
sophia.py and its training loop), reproduced in tests/test_optim_sophia.py and matched to 1e-6.

Every ``hess_interval`` steps ``after_step`` re-runs the step's micro-batches with labels *sampled
from the model's own softmax*; the squared gradient of that loss, times the tokens per step, is an
unbiased estimate of the Gauss–Newton diagonal (the GNB estimator), kept as an EMA. The update is
sign(m)·min(|m| / (ρ·bs·h), 1): a Newton step where the curvature is trusted, a clipped sign step
where it is not. 8 B/param (momentum + Hessian EMA).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from llmtrain.optim._common import check_betas, check_positive, group_impl, resolve_compiled_impl
from llmtrain.optim.compiled import apply_updates
from llmtrain.optim.protocol import StepContext


def sophiag_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    hessian: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    beta1: float,
    rho: float,
    bs: int | torch.Tensor,
    weight_decay: float,
    maximize: bool = False,
) -> None:
    """m ← β1·m + (1-β1)·g;  θ ← θ(1 - lr·λ) - lr·sign(m)·min(|m|/(ρ·bs·h + 1e-15), 1).

    ``lr`` and ``bs`` may be 0-dim tensors (the compiled path, ``llmtrain.optim.compiled``)."""
    if maximize:
        grad = -grad
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    param.mul_(1.0 - lr * weight_decay)
    ratio = (exp_avg.abs() / (rho * bs * hessian + 1e-15)).clamp(None, 1)
    param.sub_(exp_avg.sign().mul_(ratio).mul_(lr))


class SophiaG(torch.optim.Optimizer):
    """Sophia with the Gauss–Newton–Bartlett diagonal Hessian estimate, refreshed by ``after_step``."""

    state_bytes_per_param: float = 8.0
    elementwise = True  # exact on FSDP shards (llmtrain.optim.sharded); the Hessian EMA is per element

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 1e-1,
        hess_interval: int = 10,
        bs: Optional[int] = None,
        maximize: bool = False,
        impl: str = "auto",
    ):
        check_positive("learning rate", lr)
        check_positive("rho", rho)
        check_positive("weight_decay value", weight_decay)
        check_positive("hess_interval", hess_interval, allow_zero=False)
        check_betas(betas)
        # bs (tokens per step) scales the Hessian estimate; None = measured from the micro-batches
        # the trainer hands to after_step (the reference uses batch_size * block_size).
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, hess_interval=int(hess_interval),
                        bs=bs if bs is not None else 5120, maximize=maximize)
        self._measure_bs = bs is None
        self.impl = resolve_compiled_impl(impl, name="sophia")
        super().__init__(params, defaults)

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["hessian"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def update_hessian(self) -> None:
        """h ← β2·h + (1-β2)·ĝ⊙ĝ, where ``.grad`` holds the gradient of the sampled-label loss."""
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is not None:
                    self._state(p)["hessian"].mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            fused = bool(live) and group_impl(self.impl, live, "eager") == "fused"
            hyper = dict(beta1=group["betas"][0], rho=group["rho"], weight_decay=group["weight_decay"],
                         maximize=group["maximize"])
            entries = []
            for p in live:
                state = self._state(p)
                state["step"] += 1
                entries.append(((p, p.grad, state["exp_avg"], state["hessian"]), ()))
            if entries:  # bs is data too: it is measured after the first Hessian refresh
                apply_updates(sophiag_update_, entries, fused=fused, static=hyper,
                              shared=dict(lr=float(group["lr"]), bs=float(group["bs"])))
        return loss

    def after_step(self, ctx: StepContext) -> None:
        """Every ``hess_interval`` steps: GNB Hessian estimate from labels sampled from the model.

        As in the reference loop (``iter_num % hess_interval == hess_interval - 1``), the refresh
        follows steps k-1, 2k-1, ... (0-based), so the first k steps are clipped sign steps.
        """
        interval = self.param_groups[0]["hess_interval"]
        if (ctx.step + 1) % interval != 0:
            return
        params = [p for g in self.param_groups for p in g["params"]]
        for p in params:
            p.grad = None
        tokens = 0
        n = len(ctx.micro_batches)
        for inputs, _ in ctx.micro_batches:
            logits = ctx.forward(inputs)
            flat = logits.reshape(-1, logits.size(-1)).float()
            with torch.no_grad():
                sampled = torch.multinomial(F.softmax(flat, dim=-1), 1).squeeze(-1)
            (F.cross_entropy(flat, sampled) / n).backward()
            tokens += sampled.numel()
        if self._measure_bs:
            for group in self.param_groups:
                group["bs"] = tokens
        self.update_hessian()
        for p in params:
            p.grad = None
