"""Muon: MomentUm Orthogonalized by Newton–Schulz.

Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024, kellerjordan.github.io/
posts/muon); reference implementation github.com/KellerJordan/Muon (``MuonWithAuxAdam``), whose
``zeropower_via_newtonschulz5`` / ``muon_update`` tests/test_optim_muon.py reproduces verbatim and
matches to 1e-6.

Muon is for 2-D hidden weight matrices only: the momentum (Nesterov by default) is replaced by the
nearest semi-orthogonal matrix, computed with 5 steps of a quintic Newton–Schulz iteration in bf16,
and scaled by √max(1, rows/cols). Embeddings, the output head, norms and biases belong to AdamW
(``use_muon=False`` groups with ``adamw_betas`` / ``adamw_eps``, built by ``build_optimizer``).
"""

from __future__ import annotations

import time

import torch

from llmtrain.optim._common import check_positive, resolve_impl
from llmtrain.optim.adam import adamw_group_step, adamw_group_step_multi

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U·Vᵀ for G = U·S·Vᵀ (orthogonalise G) by a quintic Newton–Schulz iteration.

    The coefficients maximise the slope at zero, so singular values land in roughly [0.7, 1.2]
    rather than exactly 1, which does not hurt training and converges in 5 steps. Runs in bf16.
    """
    a, b, c = NS_COEFFICIENTS
    X = G.bfloat16()
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # a contiguous copy: the same values, and 1.4x faster matmuls on CPU than a strided view
        X = X.mT.contiguous()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X


def muon_update(grad: torch.Tensor, momentum_buffer: torch.Tensor, *, beta: float, nesterov: bool, ns_steps: int) -> torch.Tensor:
    """Update the momentum in place and return the orthogonalised, shape-scaled step direction."""
    momentum_buffer.lerp_(grad, 1.0 - beta)
    update = grad.lerp(momentum_buffer, beta) if nesterov else momentum_buffer
    if update.ndim > 2:  # conv filters: orthogonalise the [out, in·k·k] matrix
        update = update.reshape(len(update), -1)
    update = zeropower_via_newtonschulz5(update, steps=ns_steps)
    return update * max(1.0, grad.size(-2) / grad.size(-1)) ** 0.5


def muon_update_batched(grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor], *, beta: float,
                        nesterov: bool, ns_steps: int) -> list[torch.Tensor]:
    """``muon_update`` over same-shape matrices at once (foreach momentum, one Newton–Schulz chain).

    On a GPU the matrices are stacked into one batched Newton–Schulz: ``len(grads)`` chains of small
    launches become one. Each matrix is normalised by its own Frobenius norm, so stacking changes no
    value. On a CPU there are no launches to save, and oneDNN's bf16 batched matmul is slower than
    its per-matrix one (``scripts/bench_optim_registry.py`` shapes, 2-core AVX-512 EPYC: 32×384²
    118 vs 100 ms, 24×1024×384 181 vs 135 ms), so there the chain runs per matrix.
    """
    torch._foreach_lerp_(momentum_buffers, grads, 1.0 - beta)
    updates = torch._foreach_lerp(grads, momentum_buffers, beta) if nesterov else momentum_buffers
    shape = grads[0].shape
    scale = max(1.0, shape[-2] / shape[-1]) ** 0.5
    matrices = [u.reshape(len(u), -1) for u in updates]
    if grads[0].device.type == "cpu":
        return [zeropower_via_newtonschulz5(m, steps=ns_steps) * scale for m in matrices]
    orthogonal = zeropower_via_newtonschulz5(torch.stack(matrices), steps=ns_steps)
    return list((orthogonal * scale).unbind(0))


class Muon(torch.optim.Optimizer):
    """Muon for ``use_muon`` groups (default: parameters with ndim >= 2), AdamW for the others."""

    hybrid_flag = "use_muon"
    default_adamw_lr = 3e-4  # the reference's lr for embeddings, head and vectors
    state_bytes_per_param: float = 4.0  # momentum only on matrices; AdamW parameters keep 8

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        impl: str = "auto",
    ):
        check_positive("learning rate", lr)
        check_positive("momentum value", momentum)
        check_positive("weight_decay value", weight_decay)
        check_positive("ns_steps", ns_steps, allow_zero=False)
        # eager: the reference's loop, one matrix at a time. fused/foreach: Newton–Schulz batched
        # over same-shape matrices, and the AdamW half on torch's fused (or foreach) Adam kernel.
        self.impl = resolve_impl(impl, name="muon", has_fused=hasattr(torch, "_fused_adamw_"), has_triton=False)
        self.last_step_ms = {"muon": 0.0, "adamw": 0.0}  # where the last step's time went (bench_optim_registry)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=int(ns_steps), weight_decay=weight_decay,
                        adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps, use_muon=None)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"] is None:
                continue
            if group["use_muon"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Invalid use_muon group: Muon is for matrices; give 0-D/1-D parameters to AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        timings = {"muon": 0.0, "adamw": 0.0}
        for group in self.param_groups:
            if group["use_muon"] is None:  # plain parameter list: matrices to Muon, the rest to AdamW
                matrices = [p for p in group["params"] if p.ndim >= 2]
                others = [p for p in group["params"] if p.ndim < 2]
                self._timed(timings, "muon", self._muon_step, dict(group, params=matrices))
                self._timed(timings, "adamw", self._adamw_step, dict(group, params=others))
            elif group["use_muon"]:
                self._timed(timings, "muon", self._muon_step, group)
            else:
                self._timed(timings, "adamw", self._adamw_step, group)
        self.last_step_ms = timings
        return loss

    @staticmethod
    def _timed(timings: dict, key: str, fn, group: dict) -> None:
        start = time.perf_counter()
        fn(group)
        timings[key] += (time.perf_counter() - start) * 1e3

    def _adamw_step(self, group: dict) -> None:
        if self.impl == "eager":
            adamw_group_step(self, group)
        else:
            adamw_group_step_multi(self, group, impl=self.impl)

    def _muon_step(self, group: dict) -> None:
        if self.impl != "eager":
            return self._muon_step_batched(group)
        lr, wd = float(group["lr"]), group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            update = muon_update(p.grad, state["momentum_buffer"], beta=group["momentum"],
                                 nesterov=group["nesterov"], ns_steps=group["ns_steps"])
            p.mul_(1.0 - lr * wd)
            p.add_(update.reshape(p.shape).to(p.dtype), alpha=-lr)

    def _muon_step_batched(self, group: dict) -> None:
        lr, wd = float(group["lr"]), group["weight_decay"]
        by_shape: dict[tuple, list[torch.Tensor]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            by_shape.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
        for params in by_shape.values():
            updates = muon_update_batched([p.grad for p in params], [self.state[p]["momentum_buffer"] for p in params],
                                          beta=group["momentum"], nesterov=group["nesterov"], ns_steps=group["ns_steps"])
            if wd != 0.0:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            torch._foreach_add_(params, [u.reshape(p.shape).to(p.dtype) for u, p in zip(updates, params)], alpha=-lr)
