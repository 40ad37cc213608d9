"""Schedule-Free AdamW.

Defazio et al., "The Road Less Scheduled" (NeurIPS 2024). Reference implementation:
github.com/facebookresearch/schedule_free, ``schedulefree.AdamWScheduleFree`` (matched to 1e-6,
tests/test_optim_schedulefree.py).

No lr decay schedule is needed (use ``schedule=constant``; the optimizer warms up itself over
``warmup_steps``). It keeps two sequences: z (the SGD-like base iterate, in the state) and the
averaged x; the model's parameters hold the interpolation y = (1-β1)·z + β1·x during training.
``eval()`` swaps the parameters to x (what to evaluate, sample from and checkpoint) and
``train()`` swaps back; the trainer calls both (see protocol.py). 4 B/param beyond AdamW's z-free
memory: z and v, 8 B/param in all.
"""

from __future__ import annotations

import torch

from llmtrain.optim._common import check_betas, check_positive, group_impl, resolve_compiled_impl
from llmtrain.optim.compiled import apply_updates


def schedulefree_adamw_update_(
    y: torch.Tensor,
    grad: torch.Tensor,
    z: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    ckp1: float | torch.Tensor,
    beta1: float,
    beta2: float,
    inv_bias_correction2: float | torch.Tensor,
    eps: float,
    weight_decay: float,
) -> None:
    """ĝ = g/(√(v/(1-β2ᵗ)) + ε) + λy;  x_{t+1} = (1-c)x_t + c·z_{t+1}, z_{t+1} = z_t - lr·ĝ,
    written directly on y = (1-β1)z + β1x so x never needs its own buffer.

    ``inv_bias_correction2`` is 1/(1-β2ᵗ) (a product is cheaper than a vector divide); it, ``lr``
    and ``ckp1`` may be 0-dim tensors (the compiled path)."""
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.mul(inv_bias_correction2).sqrt_().add_(eps)
    normalized = grad.div(denom)
    if weight_decay != 0.0:
        normalized.add_(y, alpha=weight_decay)
    y.lerp_(end=z, weight=ckp1.to(y.dtype) if isinstance(ckp1, torch.Tensor) else ckp1)
    y.add_(normalized * (lr * (beta1 * (1.0 - ckp1) - 1.0)))
    z.sub_(normalized * lr)


class ScheduleFreeAdamW(torch.optim.Optimizer):
    """AdamW without a schedule: Polyak-style averaging with lr-weighted coefficients."""

    state_bytes_per_param: float = 8.0

    def __init__(
        self,
        params,
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        impl: str = "auto",
    ):
        check_positive("learning rate", lr)
        check_positive("epsilon value", eps)
        check_positive("weight_decay value", weight_decay)
        check_positive("warmup_steps", warmup_steps)
        check_betas(betas)
        if betas[0] == 0:
            raise ValueError("Invalid betas: beta1 must be > 0 (x is recovered from y by dividing by beta1)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps,
                        r=r, weight_lr_power=weight_lr_power, k=0, train_mode=True, weight_sum=0.0, lr_max=-1.0)
        self.impl = resolve_compiled_impl(impl, name="schedulefree_adamw")
        super().__init__(params, defaults)

    @torch.no_grad()
    def eval(self) -> None:
        """Parameters ← x (the averaged iterate)."""
        for group in self.param_groups:
            if group["train_mode"]:
                beta1 = group["betas"][0]
                for p in group["params"]:
                    if "z" in self.state[p]:
                        p.lerp_(end=self.state[p]["z"].to(p.device), weight=1.0 - 1.0 / beta1)
                group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Parameters ← y (where gradients are taken)."""
        for group in self.param_groups:
            if not group["train_mode"]:
                beta1 = group["betas"][0]
                for p in group["params"]:
                    if "z" in self.state[p]:
                        p.lerp_(end=self.state[p]["z"].to(p.device), weight=1.0 - beta1)
                group["train_mode"] = True

    @torch.no_grad()
    def step(self, closure=None):
        if not all(group["train_mode"] for group in self.param_groups):
            raise RuntimeError("ScheduleFreeAdamW.step() called in eval mode; call optimizer.train() first")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            k = group["k"]
            beta1, beta2 = group["betas"]
            warmup = group["warmup_steps"]
            lr = float(group["lr"]) * ((k + 1) / warmup if k < warmup else 1.0)
            lr_max = group["lr_max"] = max(lr, group["lr_max"])
            weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
            group["weight_sum"] = group["weight_sum"] + weight
            ckp1 = weight / group["weight_sum"] if group["weight_sum"] else 0.0
            live = [p for p in group["params"] if p.grad is not None]
            hyper = dict(beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
            fused = bool(live) and group_impl(self.impl, live, "eager") == "fused"
            entries = []
            for p in live:
                state = self.state[p]
                if "z" not in state:
                    state["z"] = torch.clone(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                entries.append(((p, p.grad, state["z"], state["exp_avg_sq"]), ()))
            if entries:
                apply_updates(schedulefree_adamw_update_, entries, fused=fused, static=hyper,
                              shared=dict(lr=lr, ckp1=ckp1, inv_bias_correction2=1.0 / (1.0 - beta2 ** (k + 1))))
            group["k"] = k + 1
        return loss
