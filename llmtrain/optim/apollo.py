"""APOLLO and APOLLO-Mini: SGD-like memory, AdamW-like updates.

AdamW's moments are kept only for a random projection of each matrix gradient (rank r, or 1 for
Mini). The ratio between the projected Adam update and the projected gradient gives a scaling
per channel (or per tensor), which is applied to the full-rank raw gradient. The projection is a
Gaussian matrix regenerated from a seed every ``update_proj_gap`` steps, so it costs no SVD and
is reproducible from the seed alone.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from llmtrain.errors import ConfigError, choices


def stable_randn(shape: tuple[int, ...], seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def next_seed(seed: int, advance: int = 0xF) -> int:
    """The reference's seed chain: the last of ``advance`` int64 draws seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, torch.iinfo(torch.int64).max, (advance,), generator=generator).tolist()[-1]


def projection_side(shape: torch.Size, proj_type: str) -> str:
    """Which side the Gaussian multiplies: 'right' projects rows ([m, n] -> [m, r]), 'left' columns."""
    tall = shape[0] >= shape[1]
    if proj_type == "std":
        return "right" if tall else "left"
    if proj_type == "reverse_std":
        return "left" if tall else "right"
    return proj_type


def random_projection(grad: Tensor, rank: int, side: str, seed: int) -> Tensor:
    """The reference's projection matrix: N(0, 1/rank) entries, [r, n] (right) or [m, r] (left)."""
    shape = (rank, grad.shape[1]) if side == "right" else (grad.shape[0], rank)
    return stable_randn(shape, seed, grad.device, torch.float32).div_(math.sqrt(rank)).to(grad.dtype)


def project(grad: Tensor, proj: Tensor, side: str) -> Tensor:
    return grad @ proj.t() if side == "right" else proj.t() @ grad


def apollo_scaling(adam_update: Tensor, low_rank_grad: Tensor, *, scale_type: str, side: str) -> Tensor:
    """Per-channel (or per-tensor) ratio |projected Adam update| / |projected gradient|.

    Channels are the rows of a 'right'-projected gradient and the columns of a 'left' one.
    """
    if scale_type == "tensor":
        return torch.norm(adam_update) / (torch.norm(low_rank_grad) + 1e-8)
    dim = 1 if side == "right" else 0
    factor = torch.norm(adam_update, dim=dim) / (torch.norm(low_rank_grad, dim=dim) + 1e-8)
    return factor.unsqueeze(1) if dim == 1 else factor


def limit_norm_growth(update: Tensor, state: dict, max_growth: float = 1.01) -> Tensor:
    """Norm-growth limiter: the update's norm may grow at most 1% per step (from Fira)."""
    norm = torch.norm(update)
    if "scaled_grad" in state:
        limiter = max(norm / (state["scaled_grad"] + 1e-8), max_growth) / max_growth
        update = update / limiter
        state["scaled_grad"] = norm / limiter
    else:
        state["scaled_grad"] = norm
    return update


class APOLLO(torch.optim.Optimizer):
    """APOLLO: approximated gradient scaling for memory-efficient LLM optimisation.

    Paper: Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance" (MLSys 2025,
    arXiv:2412.05270). Reference: zhuhanqing/APOLLO, PyPI ``apollo-torch`` 1.0.3
    (``APOLLOAdamW``, tested against step for step). As in the reference: bias correction folds
    into the step size (lr * sqrt(1-b2^t) / (1-b1^t)), eps is outside the square root (1e-6),
    weight decay is applied after the update as p -= lr*wd*p, the update is multiplied by
    sqrt(scale), and the norm-growth limiter is on unless ``disable_nl``.

    Groups with ``use_apollo=True`` (``build_optimizer``: the hidden attention/MLP matrices) are
    projected; the others (embeddings, head, norms, biases) get the reference's AdamW at
    ``adamw_lr`` (the reference uses one lr for all; set ``adamw_lr`` equal to ``lr`` for that, as
    configs/optim/apollo.yaml does). Each parameter's projection seed is its 1-based position
    among all parameters at construction, as in the reference. State for a projected [m, n]
    matrix with m >= n: two [m, r] moments and the [r, n] projection, i.e. 8r/n + 4r/m bytes per
    parameter (0.75 at r=256, n=m=4096); APOLLO-Mini (r=1) is nearly stateless.
    """

    hybrid_flag = "use_apollo"
    state_bytes_per_param: float = 0.75  # projected matrices at rank 256 of 4096 (see docstring)

    def __init__(self, params, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, rank: int = 256, scale: float = 1.0, scale_type: str = "channel",
                 update_proj_gap: int = 200, proj_type: str = "std", scale_front: bool = False,
                 disable_nl: bool = False, correct_bias: bool = True, adamw_betas: tuple[float, float] = (0.9, 0.999),
                 adamw_eps: float = 1e-6):
        if lr < 0:
            raise ConfigError("optim.lr", f"got {lr}, expected >= 0")
        for key, b in (("betas", betas), ("adamw_betas", adamw_betas)):
            if len(b) != 2 or not all(0.0 <= x < 1.0 for x in b):
                raise ConfigError(f"optim.{key}", f"got {list(b)}, expected two numbers in [0, 1)")
        if rank < 1:
            raise ConfigError("optim.rank", f"got {rank}, expected >= 1")
        if update_proj_gap < 1:
            raise ConfigError("optim.update_proj_gap", f"got {update_proj_gap}, expected >= 1")
        if scale_type not in ("channel", "tensor"):
            raise ConfigError("optim.scale_type", f"got {scale_type!r}, expected {choices(['channel', 'tensor'])}")
        if proj_type not in ("std", "reverse_std", "left", "right"):
            raise ConfigError("optim.proj_type",
                              f"got {proj_type!r}, expected {choices(['std', 'reverse_std', 'left', 'right'])}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank,
                                      scale=scale, scale_type=scale_type, update_proj_gap=update_proj_gap,
                                      proj_type=proj_type, correct_bias=correct_bias,
                                      adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps, use_apollo=None))
        self.scale_front = scale_front
        self.disable_nl = disable_nl
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if group["use_apollo"] and p.ndim != 2:
                    raise ConfigError("optim.name", "apollo projects matrices; give 0-D/1-D parameters to a "
                                      "use_apollo=False group")
                if p.requires_grad:
                    self.state[p]["seed"] = index

    def _projected(self, group: dict, p: Tensor) -> bool:
        return group["use_apollo"] if group["use_apollo"] is not None else p.ndim == 2

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_param(group, p)
        return loss

    def _step_param(self, group: dict, p: Tensor) -> None:
        state = self.state[p]
        state.setdefault("step", 0)
        projected = self._projected(group, p)
        grad = p.grad
        beta1, beta2 = group["betas"] if projected else group["adamw_betas"]
        eps = group["eps"] if projected else group["adamw_eps"]
        if projected:
            side = projection_side(grad.shape, group["proj_type"])
            if "proj" not in state or state["step"] % group["update_proj_gap"] == 0:
                state["proj"] = random_projection(grad, group["rank"], side, state["seed"])
                state["seed"] = next_seed(state["seed"])
            grad = project(grad, state["proj"], side)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        step_size = group["lr"]
        if group["correct_bias"]:
            step_size *= math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
        update = exp_avg / exp_avg_sq.sqrt().add_(eps)
        if projected:
            update = p.grad * apollo_scaling(update, grad, scale_type=group["scale_type"], side=side)
            if self.scale_front:
                update *= math.sqrt(group["scale"])
            if not self.disable_nl:
                update = limit_norm_growth(update, state)
            if not self.scale_front:
                update *= math.sqrt(group["scale"])
        p.add_(update, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])


class APOLLOMini(APOLLO):
    """APOLLO-Mini: rank-1 projection with one scaling factor per tensor, scaled by sqrt(128).

    Paper: Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance" (MLSys 2025).
    Reference: ``apollo-torch`` 1.0.3 ``APOLLOAdamW`` with its README's Mini settings (rank 1,
    scale_type "tensor", scale 128); tested against. State per projected matrix is two length-m vectors and one length-n
    projection: about 12/n bytes per parameter.
    """

    state_bytes_per_param: float = 0.003  # 8/n + 4/m at n=m=4096

    def __init__(self, params, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, rank: int = 1, scale: float = 128.0, scale_type: str = "tensor",
                 update_proj_gap: int = 200, proj_type: str = "std", scale_front: bool = False,
                 disable_nl: bool = False, correct_bias: bool = True, adamw_betas: tuple[float, float] = (0.9, 0.999),
                 adamw_eps: float = 1e-6):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, scale=scale,
                         scale_type=scale_type, update_proj_gap=update_proj_gap, proj_type=proj_type,
                         scale_front=scale_front, disable_nl=disable_nl, correct_bias=correct_bias,
                         adamw_betas=adamw_betas, adamw_eps=adamw_eps)
