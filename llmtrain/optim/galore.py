"""GaLore-AdamW: AdamW on a low-rank projection of each matrix gradient.

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection" (ICML 2024).
Reference implementation: github.com/jiaweizzhao/GaLore (``GaLoreAdamW`` + ``GaLoreProjector``,
``proj_type="std"``), as ported in ``pytorch_optimizer.GaLore``; matched to 1e-6
(tests/test_optim_matrix.py). Like the original (and unlike the port, which refreshes one step
late), the projection is recomputed from the current gradient's SVD at steps 0, gap, 2·gap, ...

For an m×n weight the gradient is projected to rank r on its smaller side (r×n if m < n, else m×r),
Adam's moments live there (2·r·max(m, n) floats instead of 2·m·n), and the normalised update is
projected back and scaled by ``scale``. For 2-D hidden matrices (``use_galore`` groups);
embeddings, head, norms and biases go to plain AdamW.
"""

from __future__ import annotations

import math

import torch

from llmtrain.optim._common import RefreshTimer, check_betas, check_positive
from llmtrain.optim.adam import adamw_group_step


def galore_basis(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` singular vectors on the smaller side: Vhᵣ (r×n) if m >= n, else Uᵣ (m×r)."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    basis = vh[:rank, :] if grad.shape[0] >= grad.shape[1] else u[:, :rank]
    return basis.to(grad.dtype)


def project_down(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return grad @ basis.T if grad.shape[0] >= grad.shape[1] else basis.T @ grad


def project_up(low_rank: torch.Tensor, basis: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return low_rank @ basis if shape[0] >= shape[1] else basis @ low_rank


class GaLoreAdamW(torch.optim.Optimizer):
    """Low-rank projected AdamW for ``use_galore`` groups (default: 2-D parameters), AdamW for the rest."""

    hybrid_flag = "use_galore"
    state_bytes_per_param: float = 2.0  # at rank ≈ d/4: 8·r·n + 4·r·n for the basis, over m·n

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-6,
    ):
        check_positive("learning rate", lr)
        check_positive("epsilon value", eps)
        check_positive("weight_decay value", weight_decay)
        check_positive("rank", rank, allow_zero=False)
        check_positive("update_proj_gap", update_proj_gap, allow_zero=False)
        check_betas(betas)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=int(rank),
                        update_proj_gap=int(update_proj_gap), scale=scale, adamw_betas=tuple(adamw_betas),
                        adamw_eps=adamw_eps, use_galore=None)
        super().__init__(params, defaults)
        self.precondition_timer = RefreshTimer()  # cost of the SVD projection refreshes, amortised (bench_optim_registry)
        for group in self.param_groups:
            if group["use_galore"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Invalid use_galore group: only 2-D matrices; give other parameters to AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_galore"] is False:
                adamw_group_step(self, group)
                continue
            if group["use_galore"] is None:  # plain parameter list: vectors get AdamW with this group's betas/eps
                adamw_group_step(self, dict(group, params=[p for p in group["params"] if p.ndim != 2]),
                                 betas_key="betas", eps_key="eps")
            self._galore_step(group)
        self.precondition_timer.end_step()
        return loss

    def _galore_step(self, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        for p in group["params"]:
            if p.grad is None or p.ndim != 2:
                continue
            grad = p.grad
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
            if state["step"] % group["update_proj_gap"] == 0:
                state["basis"] = self.precondition_timer.time(galore_basis, grad, group["rank"])
            low_rank = project_down(grad, state["basis"])
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(low_rank)
                state["exp_avg_sq"] = torch.zeros_like(low_rank)
            state["step"] += 1
            t = state["step"]
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(low_rank, 1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(low_rank, low_rank, value=1.0 - beta2)
            normalized = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
            update = project_up(normalized, state["basis"], p.shape).mul_(group["scale"])
            p.add_(update, alpha=-lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t))
            if group["weight_decay"] != 0.0:
                p.mul_(1.0 - lr * group["weight_decay"])
