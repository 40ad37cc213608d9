"""Adam-mini: one second-moment value per parameter block instead of per coordinate.

Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain More" (ICLR 2025). Reference
implementation: github.com/zyushun/Adam-mini (``Adam_mini``). Checked against the paper's update
written out by hand (tests/test_optim_matrix.py), and with one-coordinate blocks against
torch.optim.AdamW (1e-6).

Blocks follow the Hessian structure the paper reports for transformers: embeddings and the output
head keep Adam's per-coordinate v; query and key projections share one v per attention head; every
other matrix one v per output neuron (row); vectors (norms, biases) one v per tensor. Given the
model (``build_optimizer`` passes it), these are found by module type (``nn.Embedding``, the
output head, attention modules exposing ``head_dim`` with ``q_proj`` / ``k_proj``); without it,
matrices are blocked by row and vectors per tensor. Memory: m plus a few floats per block,
≈ 4 B/param + ε (embeddings and head add 4 more on their parameters).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from llmtrain.optim._common import check_betas, check_positive, group_impl, resolve_compiled_impl
from llmtrain.optim.compiled import apply_updates

FULL = 0  # block_rows value meaning "per coordinate" (plain Adam)


def block_mean_sq(grad: torch.Tensor, block_rows: int) -> torch.Tensor:
    """Mean of g² over each block: [rows/block_rows, 1] for matrices, [1] for a whole tensor (-1)."""
    if block_rows == FULL:
        return grad * grad
    if block_rows < 0 or grad.ndim < 2:
        return (grad * grad).mean().reshape(1)
    return (grad * grad).reshape(grad.shape[0] // block_rows, -1).mean(dim=1, keepdim=True)


def adam_mini_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    v: torch.Tensor,
    step_size: float | torch.Tensor,
    inv_bias_correction2_sqrt: float | torch.Tensor,
    *,
    block_rows: int,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> Optional[torch.Tensor]:
    """m ← β1·m + (1-β1)·g;  v_b ← β2·v_b + (1-β2)·mean_b(g²);  θ ← θ(1-lr·λ) - lr·m̂/(√v̂_b + ε).

    ``step_size`` = lr/(1-β1ᵗ) and ``inv_bias_correction2_sqrt`` = 1/√(1-β2ᵗ) are computed on the host
    (a power of a 0-dim tensor in a compiled graph is recomputed per element, and a product is
    cheaper than a vector divide); they and ``lr`` may be 0-dim tensors (the compiled path,
    ``llmtrain.optim.compiled``)."""
    param.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(grad, 1.0 - beta1)
    v.mul_(beta2).add_(block_mean_sq(grad, block_rows), alpha=1.0 - beta2)
    denom = (v.sqrt() * inv_bias_correction2_sqrt).add_(eps)
    if block_rows > 0 and param.ndim >= 2:
        # one step size per block, returned so a compiled graph stores it instead of dividing per element
        block_step = denom.reciprocal().mul_(step_size)
        param.sub_((exp_avg.reshape(denom.shape[0], -1) * block_step).reshape(param.shape))
        return block_step
    param.sub_(exp_avg.div(denom).mul_(step_size))
    return None


def block_layout(model: nn.Module) -> dict[int, int]:
    """``{id(param): block_rows}`` from the model's structure (see the module docstring)."""
    from llmtrain.optim.param_groups import classify_parameters

    layout: dict[int, int] = {}
    for module in model.modules():
        head_dim = getattr(module, "head_dim", None)
        if isinstance(head_dim, int):
            for name in ("q_proj", "k_proj"):
                proj = getattr(module, name, None)
                if isinstance(proj, nn.Linear):
                    layout[id(proj.weight)] = head_dim
    for kind, p in classify_parameters(model).values():
        if kind in ("embedding", "head"):
            layout[id(p)] = FULL
    return layout


def _split_by_block(params, layout: dict[int, int]) -> list[dict]:
    """Split each parameter group by block size, recorded as the group key ``block_rows``.

    Keeping the layout in the groups (not keyed by tensor identity) lets it survive wrappers that
    substitute parameters, such as owner-rank sharding's whole-tensor copies.
    """
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    out = []
    for group in groups:
        by_rows: dict = {}
        for p in group["params"]:
            rows = layout.get(id(p), AdamMini.default_block_rows(p))
            if rows > 0 and p.ndim >= 2 and p.shape[0] % rows:
                rows = 1
            by_rows.setdefault(rows, []).append(p)
        out.extend(dict(group, params=ps, block_rows=rows) for rows, ps in by_rows.items())
    return out


class AdamMini(torch.optim.Optimizer):
    """Adam with block-shared second moments (≈ half of AdamW's optimizer memory)."""

    state_bytes_per_param: float = 4.0

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        model: Optional[nn.Module] = None,
        impl: str = "auto",
    ):
        check_positive("learning rate", lr)
        check_positive("epsilon value", eps)
        check_positive("weight_decay value", weight_decay)
        check_betas(betas)
        self.impl = resolve_compiled_impl(impl, name="adam_mini")
        if model is not None:
            params = _split_by_block(params, block_layout(model))
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, block_rows=None))

    @staticmethod
    def default_block_rows(p: torch.Tensor) -> int:
        return 1 if p.ndim >= 2 else -1

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            live = [p for p in group["params"] if p.grad is not None]
            fused = bool(live) and group_impl(self.impl, live, "eager") == "fused"
            hyper = dict(beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
            by_rows: dict[int, list] = {}  # block_rows shapes the graph, so it is static
            for p in live:
                state = self.state[p]
                if "exp_avg" not in state:
                    state["step"] = 0
                    rows = group["block_rows"]
                    state["block_rows"] = self.default_block_rows(p) if rows is None else rows
                    state["exp_avg"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(block_mean_sq(p.grad, state["block_rows"]))
                state["step"] += 1
                t = state["step"]
                by_rows.setdefault(state["block_rows"], []).append(
                    ((p, p.grad, state["exp_avg"], state["v"]),
                     (float(group["lr"]) / (1.0 - beta1**t), 1.0 / math.sqrt(1.0 - beta2**t))))
            for rows, entries in by_rows.items():  # tensors keep their shapes (blocks are rows)
                apply_updates(adam_mini_update_, entries, fused=fused, static=dict(block_rows=rows, **hyper),
                              shared=dict(lr=float(group["lr"])), flatten=False)
        return loss
