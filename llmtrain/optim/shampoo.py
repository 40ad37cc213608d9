"""Shampoo with Adam grafting.

Gupta, Koren & Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization" (ICML 2018);
grafting and EMA statistics as in Anil et al., "Scalable Second Order Optimization for Deep
Learning" (2020) and Shi et al., "A Distributed Data-Parallel PyTorch Implementation of the
Distributed Shampoo Optimizer" (2023, reference implementation github.com/facebookresearch/
optimizers, ``DistributedShampoo`` with ``AdamGraftingConfig``). This is the single-device core of
that algorithm; tests/test_optim_matrix.py checks it against the paper's equations written out
independently in float64 on small matrices (1e-5 asserted; 1.7e-6 measured).

For a matrix G (m×n): L ← β2·L + (1-β2)·GGᵀ, R ← β2·R + (1-β2)·GᵀG; every
``precondition_frequency`` steps the inverse 4th roots (L̂ + εI)^-¼, (R̂ + εI)^-¼ of the
bias-corrected statistics are recomputed by eigendecomposition. The direction
S = L^-¼·M̂·R^-¼ (M̂ the bias-corrected momentum) is rescaled to the norm of Adam's step
M̂/(√V̂ + ε) ("grafting"), so the lr and schedule of AdamW carry over; before
``start_preconditioning_step`` the Adam step itself is used. For 2-D hidden matrices
(``use_shampoo`` groups); embeddings, head, norms and biases go to AdamW. Dimensions above
``max_precond_dim`` are left unpreconditioned.
"""

from __future__ import annotations


import torch

from llmtrain.cpu_matmul import mm
from llmtrain.optim._common import RefreshTimer, check_betas, check_positive
from llmtrain.optim.adam import adamw_group_step


def inverse_root(mat: torch.Tensor, root: int, epsilon: float) -> torch.Tensor:
    """(A + εI)^(-1/root) of a symmetric PSD matrix, through its eigendecomposition in float64."""
    a = mat.double() + epsilon * torch.eye(mat.shape[0], dtype=torch.float64, device=mat.device)
    evals, evecs = torch.linalg.eigh(a)
    evals = evals.clamp(min=epsilon)
    return ((evecs * evals.pow(-1.0 / root)) @ evecs.T).to(mat.dtype)


def shampoo_direction(momentum: torch.Tensor, roots: list) -> torch.Tensor:
    """L^-¼·M·R^-¼, skipping a side whose root is [] (too large to precondition); ``mm`` is oneDNN's
    fp32 product on CPU (1.9x the BLAS on the README's machine)."""
    left, right = roots
    out = momentum
    if len(left) > 0:
        out = mm(left, out)
    if len(right) > 0:
        out = mm(out, right)
    return out


class Shampoo(torch.optim.Optimizer):
    """Kronecker-factored preconditioning with Adam grafting for ``use_shampoo`` groups."""

    hybrid_flag = "use_shampoo"
    state_bytes_per_param: float = 8.0  # momentum + grafting v; plus 4·(m²+n²) statistics and 4·(m²+n²) roots per matrix

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        epsilon: float = 1e-12,
        grafting_epsilon: float = 1e-8,
        weight_decay: float = 0.0,
        precondition_frequency: int = 10,
        start_preconditioning_step: int = 10,
        max_precond_dim: int = 4096,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
    ):
        check_positive("learning rate", lr)
        check_positive("epsilon", epsilon, allow_zero=False)
        check_positive("grafting_epsilon", grafting_epsilon)
        check_positive("weight_decay value", weight_decay)
        check_positive("precondition_frequency", precondition_frequency, allow_zero=False)
        check_positive("start_preconditioning_step", start_preconditioning_step)
        check_betas(betas)
        defaults = dict(lr=lr, betas=tuple(betas), epsilon=epsilon, grafting_epsilon=grafting_epsilon,
                        weight_decay=weight_decay, precondition_frequency=int(precondition_frequency),
                        start_preconditioning_step=int(start_preconditioning_step),
                        max_precond_dim=int(max_precond_dim), adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps,
                        use_shampoo=None)
        super().__init__(params, defaults)
        self.precondition_timer = RefreshTimer()  # cost of the root recomputations, amortised (bench_optim_registry)
        for group in self.param_groups:
            if group["use_shampoo"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Invalid use_shampoo group: only 2-D matrices; give other parameters to AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_shampoo"] is False:
                adamw_group_step(self, group)
                continue
            if group["use_shampoo"] is None:  # plain parameter list: vectors get AdamW with this group's betas
                adamw_group_step(self, dict(group, params=[p for p in group["params"] if p.ndim != 2]),
                                 betas_key="betas", eps_key="grafting_epsilon")
            for p in group["params"]:
                if p.grad is not None and p.ndim == 2:
                    self._shampoo_update(p, group)
        self.precondition_timer.end_step()
        return loss

    def _shampoo_update(self, p: torch.Tensor, group: dict) -> None:
        grad = p.grad
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            state["stats"] = [torch.zeros(d, d, dtype=p.dtype, device=p.device) if d <= group["max_precond_dim"] else []
                              for d in p.shape]
            state["roots"] = [[], []]
        state["step"] += 1
        t = state["step"]
        bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
        state["exp_avg"].lerp_(grad, 1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        left, right = state["stats"]
        if len(left) > 0:
            left.mul_(beta2).add_(mm(grad, grad.T), alpha=1.0 - beta2)
        if len(right) > 0:
            right.mul_(beta2).add_(mm(grad.T, grad), alpha=1.0 - beta2)
        if (t - 1) % group["precondition_frequency"] == 0 or t == group["start_preconditioning_step"]:
            state["roots"] = self.precondition_timer.time(
                lambda: [inverse_root(s / bc2, 4, group["epsilon"]) if len(s) > 0 else [] for s in state["stats"]])

        momentum = state["exp_avg"] / bc1
        adam = momentum / (state["exp_avg_sq"] / bc2).sqrt().add_(group["grafting_epsilon"])
        if t >= group["start_preconditioning_step"] and any(len(r) > 0 for r in state["roots"]):
            direction = shampoo_direction(momentum, state["roots"])
            direction.mul_(adam.norm() / direction.norm().clamp(min=1e-30))
        else:
            direction = adam
        lr = float(group["lr"])
        p.mul_(1.0 - lr * group["weight_decay"])
        p.add_(direction, alpha=-lr)
