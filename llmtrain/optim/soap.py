"""SOAP: ShampoO with Adam in the Preconditioner's eigenbasis.

Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam" (ICLR 2025). Reference
implementation: github.com/nikhilvyas/SOAP (``SOAP``), as ported in ``pytorch_optimizer.SOAP``,
matched to 1e-6 (tests/test_optim_matrix.py).

For each dimension of a tensor (up to ``max_precond_dim``) it keeps Shampoo's statistic
GGᵀ (EMA with ``shampoo_beta``) and its eigenbasis Q, refreshed every ``precondition_frequency``
steps by one power-iteration + QR step; Adam runs on the gradient rotated into that basis and the
update is rotated back. As in the reference, the first step only initialises the basis. Meant for
2-D hidden matrices (``use_soap`` groups); embeddings, head, norms and biases go to AdamW.
State: m and v (8 B/param) plus d² per dimension of size d.
"""

from __future__ import annotations

import math
from itertools import chain
from typing import Optional

import torch

from llmtrain.cpu_matmul import mm
from llmtrain.optim._common import RefreshTimer, check_betas, check_positive
from llmtrain.optim.adam import adamw_group_step


def project(x: torch.Tensor, Q: list, back: bool = False) -> torch.Tensor:
    """Rotate every dimension of ``x`` into its eigenbasis (Qᵀ·) or back (Q·); [] = identity.

    A matrix with both bases is Q_Lᵀ·X·Q_R (or Q_L·X·Q_Rᵀ) as two ``mm``: oneDNN on CPU, 1.9x the
    BLAS on the README's machine; other shapes go through ``tensordot`` one dimension at a time."""
    if x.ndim == 2 and len(Q) == 2 and len(Q[0]) > 0 and len(Q[1]) > 0:
        left, right = Q
        return mm(mm(left, x), right.t()) if back else mm(mm(left.t(), x), right)
    for mat in Q:
        if len(mat) > 0:
            x = torch.tensordot(x, mat, dims=[[0], [1 if back else 0]])
        else:
            x = x.permute([*range(1, x.ndim), 0])
    return x


def eigenbasis(GG: list) -> list:
    """Eigenvectors of each statistic, largest eigenvalue first."""
    out = []
    for m in GG:
        if len(m) == 0:
            out.append([])
            continue
        _, q = torch.linalg.eigh(m + 1e-30 * torch.eye(m.shape[0], device=m.device, dtype=m.dtype))
        out.append(torch.flip(q, dims=[1]))
    return out


def refresh_eigenbasis_qr(GG: list, Q: list, exp_avg_sq: torch.Tensor) -> tuple[list, torch.Tensor]:
    """One power-iteration step per statistic, re-sorting v's coordinates to follow the new basis."""
    new_q = []
    for dim, (m, o) in enumerate(zip(GG, Q)):
        if len(m) == 0:
            new_q.append([])
            continue
        product = mm(m, o)
        order = torch.argsort((o * product).sum(dim=0), descending=True)
        exp_avg_sq = exp_avg_sq.index_select(dim, order)
        q, _ = torch.linalg.qr(product.index_select(1, order).float())
        new_q.append(q.to(product.dtype))
    return new_q, exp_avg_sq


def accumulate_statistics_(GG: list, grad: torch.Tensor, shampoo_beta: float) -> None:
    """GG[i] ← β·GG[i] + (1-β)·G_(i)·G_(i)ᵀ, contracting every dimension but i."""
    for idx, m in enumerate(GG):
        if len(m) > 0:
            if grad.ndim == 2:
                product = mm(grad, grad.t()) if idx == 0 else mm(grad.t(), grad)
            else:
                others = [*chain(range(idx), range(idx + 1, grad.ndim))]
                product = torch.tensordot(grad, grad, dims=[others, others])
            m.lerp_(product.to(m.dtype), 1.0 - shampoo_beta)


class SOAP(torch.optim.Optimizer):
    """Adam in Shampoo's eigenbasis for ``use_soap`` groups (default: every parameter), AdamW elsewhere."""

    hybrid_flag = "use_soap"
    state_bytes_per_param: float = 8.0  # m, v; the d×d statistics and bases add 8·d² per dimension

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: Optional[float] = None,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        correct_bias: bool = True,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
    ):
        check_positive("learning rate", lr)
        check_positive("epsilon value", eps)
        check_positive("weight_decay value", weight_decay)
        check_positive("precondition_frequency", precondition_frequency, allow_zero=False)
        check_positive("max_precond_dim", max_precond_dim, allow_zero=False)
        check_betas(betas)
        if shampoo_beta is not None and not 0.0 <= shampoo_beta < 1.0:
            raise ValueError(f"Invalid shampoo_beta: {shampoo_beta}")
        defaults = dict(lr=lr, betas=tuple(betas), shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                        precondition_frequency=int(precondition_frequency), max_precond_dim=int(max_precond_dim),
                        precondition_1d=precondition_1d, normalize_grads=normalize_grads, correct_bias=correct_bias,
                        adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps, use_soap=True)
        super().__init__(params, defaults)
        self.precondition_timer = RefreshTimer()  # cost of the eigenbasis refreshes, amortised (bench_optim_registry)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        grad = p.grad
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)
        dims = grad.shape if grad.ndim > 1 or group["precondition_1d"] else []
        state["GG"] = [
            torch.zeros(d, d, device=grad.device, dtype=grad.dtype) if d <= group["max_precond_dim"] else []
            for d in dims
        ] or [[]]
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not group["use_soap"]:
                adamw_group_step(self, group)
                continue
            beta1, beta2 = group["betas"]
            shampoo_beta = group["shampoo_beta"] if group["shampoo_beta"] is not None else beta2
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if "GG" not in state:
                    # First step: statistics and basis from the first gradient, no update (reference).
                    state = self._init_state(p, group)
                    accumulate_statistics_(state["GG"], grad, shampoo_beta)
                    state["Q"] = self.precondition_timer.time(eigenbasis, state["GG"])
                    continue
                state["step"] += 1
                t = state["step"]
                step_size = float(group["lr"])
                if group["correct_bias"]:
                    step_size *= math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                grad_projected = project(grad, state["Q"])
                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.lerp_(grad_projected.square(), 1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                update = project(project(exp_avg, state["Q"]) / denom, state["Q"], back=True)
                if group["normalize_grads"]:
                    update.div_(torch.mean(update.square()).sqrt_().add_(group["eps"]))
                p.add_(update, alpha=-step_size)
                if group["weight_decay"] != 0.0:
                    p.mul_(1.0 - float(group["lr"]) * group["weight_decay"])
                accumulate_statistics_(state["GG"], grad, shampoo_beta)
                if t % group["precondition_frequency"] == 0:
                    state["Q"], state["exp_avg_sq"] = self.precondition_timer.time(
                        refresh_eigenbasis_qr, state["GG"], state["Q"], state["exp_avg_sq"])
        self.precondition_timer.end_step()
        return loss
