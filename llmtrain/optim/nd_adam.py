"""ND-Adam: Adam that preserves the direction of each hidden unit's weight vector.

Adam's per-coordinate scaling changes the direction of a weight vector differently from SGD's
update and lets its norm drift, which (the paper argues) hurts generalisation. ND-Adam keeps each
input weight vector w_i (a row of a Linear weight) on the unit sphere, projects its gradient onto
the sphere's tangent space and adapts one learning rate per vector instead of per coordinate.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from llmtrain.errors import ConfigError


def nd_adam_update(weight: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: float, *, lr: float,
                   beta1: float, beta2: float, eps: float) -> None:
    """One ND-Adam step on the rows of a [n_vectors, dim] view (Algorithm 1 of the paper).

    ``exp_avg`` has the weight's shape; ``exp_avg_sq`` holds one scalar per row.
    """
    # Tangent-space gradient: g - (g . w) w, for unit-norm rows w.
    radial = (grad * weight).sum(dim=1, keepdim=True)
    tangent = grad - radial * weight
    exp_avg.mul_(beta1).add_(tangent, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).add_(tangent.pow(2).sum(dim=1, keepdim=True), alpha=1 - beta2)
    m_hat = exp_avg / (1 - beta1 ** step)
    v_hat = exp_avg_sq / (1 - beta2 ** step)
    weight.sub_(lr * m_hat / (v_hat.sqrt() + eps))
    weight.div_(weight.norm(dim=1, keepdim=True))


def adam_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: float, *, lr: float,
                beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """Plain AdamW step for the parameters that are not hidden weight vectors."""
    if weight_decay:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq / (1 - beta2 ** step)).sqrt_().add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))


def as_vectors(p: Tensor) -> Tensor:
    """The [n_units, fan_in] view of a weight: row i is the input weight vector of unit i."""
    return p.view(p.shape[0], -1)


class NDAdam(torch.optim.Optimizer):
    """ND-Adam for hidden weight vectors, AdamW for everything else.

    Paper: Zhang, Wang, Chen & Xu, "Normalized Direction-preserving Adam" (arXiv:1709.04546),
    Algorithm 1. Reference: zj10/ND-Adam (TensorFlow; not installable here), so the tests check
    the paper's equations on a hand-derived 2x2 example.

    Groups with ``use_nd=True`` (``build_optimizer`` puts the hidden matrices there: attention and
    MLP weights) have every row normalised to unit norm on the first step and kept there, as the
    paper initialises them; weight decay is meaningless for unit vectors and is ignored there.
    Other groups (embeddings, head, norms, biases) use AdamW with ``adamw_betas`` / ``adamw_eps``,
    at ``adamw_lr`` as ``build_optimizer`` sets it. The paper pairs ND-Adam with a normalisation
    layer after each projection; in a pre-norm transformer the residual-stream writers (output
    and down projections) are not followed by one, so their scale becomes fixed by the unit norm.
    State: one fp32 first moment per parameter plus a scalar per row (~4 bytes/param), 8 for the
    AdamW part.
    """

    hybrid_flag = "use_nd"
    state_bytes_per_param: float = 4.0

    def __init__(self, params, lr: float = 0.05, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, adamw_betas: tuple[float, float] = (0.9, 0.999),
                 adamw_eps: float = 1e-8):
        if lr < 0:
            raise ConfigError("optim.lr", f"got {lr}, expected >= 0")
        for key, b in (("betas", betas), ("adamw_betas", adamw_betas)):
            if len(b) != 2 or not all(0.0 <= x < 1.0 for x in b):
                raise ConfigError(f"optim.{key}", f"got {list(b)}, expected two numbers in [0, 1)")
        if eps < 0 or adamw_eps < 0 or weight_decay < 0:
            raise ConfigError("optim.eps" if eps < 0 else "optim.adamw_eps" if adamw_eps < 0 else "optim.weight_decay",
                              "expected >= 0")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps, use_nd=None))
        for group in self.param_groups:
            if group["use_nd"] and any(p.ndim < 2 for p in group["params"]):
                raise ConfigError("optim.name", "nd_adam normalises weight vectors (rows of matrices); "
                                  "give 0-D/1-D parameters to a use_nd=False group")

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                # A plain parameter list (no build_optimizer): matrices are hidden weight vectors.
                nd = group["use_nd"] if group["use_nd"] is not None else p.ndim >= 2
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    if nd:
                        as_vectors(p).div_(as_vectors(p).norm(dim=1, keepdim=True))
                        state["exp_avg_sq"] = torch.zeros(p.shape[0], 1, dtype=p.dtype, device=p.device)
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step = state["step"].item()
                if nd:
                    nd_adam_update(as_vectors(p), p.grad.reshape(p.shape[0], -1), as_vectors(state["exp_avg"]),
                                   state["exp_avg_sq"], step, lr=group["lr"], beta1=group["betas"][0],
                                   beta2=group["betas"][1], eps=group["eps"])
                else:
                    adam_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], step, lr=group["lr"],
                                beta1=group["adamw_betas"][0], beta2=group["adamw_betas"][1],
                                eps=group["adamw_eps"], weight_decay=group["weight_decay"])
        return loss
