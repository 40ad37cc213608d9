"""LOMO and AdaLomo: the update happens inside the backward pass.

Each parameter is updated by a post-accumulate-grad hook as soon as its gradient is complete, and
the gradient is freed right away, so at most one parameter's gradient exists at a time (plus
what autograd holds in flight). By the time a parameter's gradient has been accumulated, every
node that uses it has run, so updating it in place cannot corrupt the rest of the backward.

Gradient-norm clipping needs the global norm before any update, so, as in the paper, it costs a
second backward: the first (with ``retain_graph``) only measures per-parameter norms, the second
applies the clipped update. Without ``clip_grad_norm`` there is a single backward.

Protocol (llmtrain.optim.protocol): ``owns_backward = True``; the trainer calls
``optimizer.backward(loss)`` instead of ``loss.backward()`` and never ``step()``. Gradient
accumulation is impossible by construction (there is no gradient to accumulate into), and
data-parallel strategies would need the update to wait for the all-reduce, so both are refused.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from llmtrain.errors import ConfigError


def lomo_update(param: Tensor, grad: Tensor, *, lr: float, weight_decay: float) -> None:
    """Plain SGD on an fp32 copy, written back in the parameter's dtype (the reference's order)."""
    p32 = param.detach().to(torch.float32)
    if weight_decay > 0:
        p32.mul_(1.0 - lr * weight_decay)
    p32.add_(grad, alpha=-lr)
    param.detach().copy_(p32)


def _rms(x: Tensor) -> Tensor:
    return x.norm(2) / (x.numel() ** 0.5)


def adalomo_update(param: Tensor, grad: Tensor, state: dict, step: int, *, lr: float, eps: tuple[float, float],
                   clip_threshold: float, decay_rate: float, weight_decay: float) -> None:
    """One AdaLomo step: Adafactor's factored second moment without momentum, update RMS-clipped,
    lr scaled by the parameter's RMS (at least eps[1])."""
    beta2t = 1.0 - math.pow(step, decay_rate)
    sq = grad ** 2 + eps[0]
    if grad.ndim >= 2:
        state["exp_avg_sq_row"].mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
        state["exp_avg_sq_col"].mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        update = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1) * col.unsqueeze(-2).rsqrt()
        update.mul_(grad)
    else:
        state["exp_avg_sq"].mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
        update = state["exp_avg_sq"].rsqrt().mul_(grad)
    update.div_((_rms(update) / clip_threshold).clamp_(min=1.0))
    p32 = param.detach().to(torch.float32)
    scaled_lr = lr * max(eps[1], float(torch.norm(p32, 2.0) / math.sqrt(param.numel())))
    if weight_decay > 0:
        p32.mul_(1.0 - scaled_lr * weight_decay)
    p32.add_(update, alpha=-scaled_lr)
    param.detach().copy_(p32)


class _FusedBackwardOptimizer(torch.optim.Optimizer):
    """Hooks, the norm pass and the protocol shared by LOMO and AdaLomo."""

    owns_backward = True

    def __init__(self, params, defaults: dict, clip_grad_norm: Optional[float], clip_grad_value: Optional[float],
                 loss_scale: float):
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ConfigError("optim.clip_grad_norm", f"got {clip_grad_norm}, expected a positive number or null")
        if clip_grad_value is not None and clip_grad_value <= 0:
            raise ConfigError("optim.clip_grad_value", f"got {clip_grad_value}, expected a positive number or null")
        super().__init__(params, dict(defaults, clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value))
        self.param_groups[0].setdefault("fused_steps", 0)
        self.loss_scale = loss_scale
        # The trainer logs this as grad_norm; it is only measured when the norm pass runs.
        self.last_grad_norm: float = float("nan")
        self._mode: Optional[str] = None  # None: hooks inactive; "norm": measure; "update": apply
        self._sq_norms: list[Tensor] = []
        self._clip_coef: Optional[Tensor] = None
        self._group_of: dict[int, dict] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def refuse(self, strategy: str, grad_accum_steps: int) -> Optional[str]:
        name = type(self).__name__.lower()
        if grad_accum_steps > 1:
            return (f"{name} updates each parameter during backward, so gradients cannot be accumulated over "
                    f"{grad_accum_steps} micro-batches; set train.global_batch_size = train.micro_batch_size")
        if strategy not in ("none", "auto"):
            return (f"{name} updates parameters inside backward, before a {strategy} all-reduce could run; "
                    "use distributed.strategy=none")
        return None

    def step(self, closure=None):  # noqa: D401 - protocol: the trainer calls backward(), never step()
        raise RuntimeError(f"{type(self).__name__} updates parameters in backward(loss); do not call step()")

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=True)

    def backward(self, loss: Tensor) -> None:
        """Backward pass(es) that leave every parameter updated and no gradient stored."""
        self._group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        self.param_groups[0]["fused_steps"] += 1
        scaled = loss * self.loss_scale if self.loss_scale != 1 else loss
        clip = self.param_groups[0]["clip_grad_norm"]
        self._clip_coef = None
        try:
            if clip is not None:
                self._mode, self._sq_norms = "norm", []
                scaled.backward(retain_graph=True)
                total = torch.norm(torch.stack(self._sq_norms), 2.0) if self._sq_norms else torch.tensor(0.0)
                self.last_grad_norm = float(total)
                self._clip_coef = torch.clamp(float(clip) / (total + 1e-6), max=1.0)
            self._mode = "update"
            scaled.backward()
        finally:
            self._mode = None

    @torch.no_grad()
    def _on_grad_ready(self, p: Tensor) -> None:
        if self._mode is None:
            return  # an ordinary loss.backward() outside our protocol: leave .grad alone
        grad = p.grad.to(torch.float32)
        p.grad = None
        if self.loss_scale != 1:
            grad.div_(self.loss_scale)
        if self._mode == "norm":
            self._sq_norms.append(torch.norm(grad, 2.0))
            return
        group = self._group_of[id(p)]
        if group["clip_grad_value"] is not None:
            grad.clamp_(min=-group["clip_grad_value"], max=group["clip_grad_value"])
        if self._clip_coef is not None:
            grad.mul_(self._clip_coef)
        self._update(p, grad, group)

    def _update(self, p: Tensor, grad: Tensor, group: dict) -> None:
        raise NotImplementedError


class LOMO(_FusedBackwardOptimizer):
    """LOMO: LOw-Memory Optimization, SGD fused into backward.

    Paper: Lv et al., "Full Parameter Fine-tuning for Large Language Models with Limited
    Resources" (ACL 2024, arXiv:2306.09782). Reference: OpenLMLab/LOMO, PyPI ``lomo-optim``
    0.1.1 (``Lomo``; tested against). The reference takes ``model`` and gets lr per call of
    ``fused_backward(loss, lr)``; here lr is the param group's (the trainer's schedule) and the
    norm pass runs inside ``backward`` whenever ``clip_grad_norm`` is set. The reference's fp16
    dynamic loss scaler is not reproduced: train in bf16 or fp32. No optimizer state (0 bytes/param).
    """

    state_bytes_per_param: float = 0.0

    def __init__(self, params, lr: float = 1e-3, clip_grad_norm: Optional[float] = None,
                 clip_grad_value: Optional[float] = None, weight_decay: float = 0.0):
        if lr < 0:
            raise ConfigError("optim.lr", f"got {lr}, expected >= 0")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), clip_grad_norm, clip_grad_value, 1.0)

    def _update(self, p: Tensor, grad: Tensor, group: dict) -> None:
        lomo_update(p, grad, lr=group["lr"], weight_decay=group["weight_decay"])


class AdaLomo(_FusedBackwardOptimizer):
    """AdaLomo: LOMO with an Adafactor-style factored second moment and parameter-scaled lr.

    Paper: Lv et al., "AdaLomo: Low-memory Optimization with Adaptive Learning Rate" (ACL Findings
    2024, arXiv:2310.10195). Reference: PyPI ``lomo-optim`` 0.1.1 (``AdaLomo``; tested against).
    As in the reference: beta2_t = 1 - t^decay_rate, the loss is multiplied by ``loss_scale``
    (1024) and gradients divided by it, the update is RMS-clipped to ``clip_threshold``, lr is
    multiplied by max(eps[1], RMS(param)), weight decay is decoupled with that lr. State: row and
    column statistics for matrices (~0 bytes/param), a full second moment for vectors.
    """

    state_bytes_per_param: float = 0.0  # O(m + n) per matrix

    def __init__(self, params, lr: float = 1e-3, loss_scale: float = 2 ** 10, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, clip_grad_norm: Optional[float] = None,
                 clip_grad_value: Optional[float] = None, weight_decay: float = 0.0):
        if lr < 0:
            raise ConfigError("optim.lr", f"got {lr}, expected >= 0")
        if len(eps) != 2 or min(eps) < 0:
            raise ConfigError("optim.eps", f"got {list(eps)}, expected two numbers >= 0")
        if decay_rate >= 0:
            raise ConfigError("optim.decay_rate", f"got {decay_rate}, expected < 0 (beta2_t = 1 - t^decay_rate)")
        if loss_scale <= 0:
            raise ConfigError("optim.loss_scale", f"got {loss_scale}, expected > 0")
        super().__init__(params, dict(lr=lr, eps=tuple(eps), clip_threshold=clip_threshold, decay_rate=decay_rate,
                                      weight_decay=weight_decay), clip_grad_norm, clip_grad_value, loss_scale)

    def _update(self, p: Tensor, grad: Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            if p.ndim >= 2:
                state["exp_avg_sq_row"] = torch.zeros(p.shape[:-1], dtype=torch.float32, device=p.device)
                state["exp_avg_sq_col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=torch.float32,
                                                      device=p.device)
            else:
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        adalomo_update(p, grad, state, self.param_groups[0]["fused_steps"], lr=group["lr"], eps=group["eps"],
                       clip_threshold=group["clip_threshold"], decay_rate=group["decay_rate"],
                       weight_decay=group["weight_decay"])
