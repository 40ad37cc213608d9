"""L-BFGS: limited-memory quasi-Newton, driven by a closure that re-evaluates the loss.

For small full-batch problems and for probing (e.g. how far a few curvature-aware steps get from
a checkpoint), not for stochastic pretraining: the curvature pairs assume the same objective at
every evaluation, so use ``train.global_batch_size`` as the whole problem or a fixed batch. The
trainer calls ``step(closure)`` (``requires_closure``); each step may evaluate the closure up to
``max_eval`` times, each evaluation being a full forward+backward over the step's micro-batches.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch.optim.lbfgs import _strong_wolfe  # the reference's line search, reused unchanged

from llmtrain.errors import ConfigError


def two_loop_direction(flat_grad: Tensor, old_dirs: list[Tensor], old_stps: list[Tensor], ro: list[Tensor],
                       h_diag: float | Tensor) -> Tensor:
    """The L-BFGS search direction -H g by the two-loop recursion (Nocedal & Wright, Alg. 7.4).

    ``old_dirs`` are gradient differences y_i, ``old_stps`` step differences s_i, ``ro`` 1/(y_i.s_i),
    ``h_diag`` the initial inverse-Hessian scale (y.s / y.y of the newest pair).
    """
    q = flat_grad.neg()
    alphas = [None] * len(old_dirs)
    for i in range(len(old_dirs) - 1, -1, -1):
        alphas[i] = old_stps[i].dot(q) * ro[i]
        q.add_(old_dirs[i], alpha=-alphas[i])
    r = torch.mul(q, h_diag)
    for i in range(len(old_dirs)):
        beta = old_dirs[i].dot(r) * ro[i]
        r.add_(old_stps[i], alpha=alphas[i] - beta)
    return r


def push_curvature_pair(y: Tensor, s: Tensor, old_dirs: list[Tensor], old_stps: list[Tensor], ro: list[Tensor],
                        history_size: int) -> Optional[Tensor]:
    """Store (y, s) when it keeps the approximation positive definite; return the new h_diag."""
    ys = y.dot(s)
    if ys <= 1e-10:
        return None
    if len(old_dirs) == history_size:
        old_dirs.pop(0)
        old_stps.pop(0)
        ro.pop(0)
    old_dirs.append(y)
    old_stps.append(s)
    ro.append(1.0 / ys)
    return ys / y.dot(y)


class LBFGS(torch.optim.Optimizer):
    """L-BFGS with optional strong-Wolfe line search.

    Paper: Liu & Nocedal, "On the limited memory BFGS method for large scale optimization"
    (Math. Programming 1989). Reference: ``torch.optim.LBFGS`` (tested against step for step;
    same defaults, same first-step scaling min(1, 1/|g|_1) * lr, same stopping rules).
    Unlike the reference it accepts several parameter groups (those ``build_optimizer`` makes),
    treated as one flat vector: they must share one lr and carry no weight decay. State is the
    history of ``2 * history_size`` flat vectors plus a few more, so per parameter it costs
    ``4 * (2 * history_size + 3)`` bytes (812 at the default history of 100). Single process
    only: refuses every multi-process strategy, and gradient accumulation is handled by the closure itself.
    """

    requires_closure = True
    state_bytes_per_param: float = 4.0 * (2 * 100 + 3)

    def __init__(self, params, lr: float = 1.0, max_iter: int = 20, max_eval: Optional[int] = None,
                 tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9, history_size: int = 100,
                 line_search_fn: Optional[str] = None):
        if lr <= 0:
            raise ConfigError("optim.lr", f"got {lr}, expected > 0")
        if max_iter < 1:
            raise ConfigError("optim.max_iter", f"got {max_iter}, expected >= 1")
        if history_size < 1:
            raise ConfigError("optim.history_size", f"got {history_size}, expected >= 1")
        if line_search_fn not in (None, "strong_wolfe"):
            raise ConfigError("optim.line_search_fn", f"got {line_search_fn!r}, expected one of: null, strong_wolfe")
        max_eval = max_iter * 5 // 4 if max_eval is None else max_eval
        super().__init__(params, dict(lr=lr, max_iter=max_iter, max_eval=max_eval, tolerance_grad=tolerance_grad,
                                      tolerance_change=tolerance_change, history_size=history_size,
                                      line_search_fn=line_search_fn))
        for group in self.param_groups:
            if group.get("weight_decay", 0.0):
                raise ConfigError("optim.weight_decay", "lbfgs applies no weight decay; expected 0")
        self._params = [p for g in self.param_groups for p in g["params"]]

    def refuse(self, strategy: str, grad_accum_steps: int) -> Optional[str]:
        if strategy not in ("none", "auto"):
            return f"lbfgs keeps a flat history of the full parameter vector and runs on one process, not {strategy}"
        return None

    def _lr(self) -> float:
        lrs = {float(g["lr"]) for g in self.param_groups}
        if len(lrs) != 1:
            raise ConfigError("optim.lr_multipliers", "lbfgs uses one lr for all parameters; remove lr_multipliers")
        return lrs.pop()

    def _flat_grad(self) -> Tensor:
        return torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self._params
        ])

    @torch.no_grad()
    def _add_direction(self, t: float, d: Tensor) -> None:
        offset = 0
        for p in self._params:
            n = p.numel()
            p.add_(d[offset:offset + n].view_as(p), alpha=t)
            offset += n

    @torch.no_grad()
    def _evaluate_at(self, closure, x: list[Tensor], t: float, d: Tensor) -> tuple[float, Tensor]:
        """Loss and flat gradient at x + t*d (then back to x): the line search's objective."""
        self._add_direction(t, d)
        loss = float(closure())
        flat_grad = self._flat_grad()
        for p, saved in zip(self._params, x):
            p.copy_(saved)
        return loss, flat_grad

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]):  # type: ignore[override]
        if closure is None:
            raise ConfigError("optim.name", "lbfgs needs a closure (the trainer passes one: requires_closure)")
        closure = torch.enable_grad()(closure)
        group = self.param_groups[0]
        lr = self._lr()
        max_iter, max_eval = group["max_iter"], group["max_eval"]
        tol_grad, tol_change = group["tolerance_grad"], group["tolerance_change"]
        state = self.state[self._params[0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)

        orig_loss = closure()
        loss = float(orig_loss)
        evals = 1
        state["func_evals"] += 1
        flat_grad = self._flat_grad()
        if flat_grad.abs().max() <= tol_grad:
            return orig_loss

        d, t = state.get("d"), state.get("t")
        old_dirs, old_stps, ro = state.get("old_dirs"), state.get("old_stps"), state.get("ro")
        h_diag, prev_flat_grad = state.get("H_diag"), state.get("prev_flat_grad")
        prev_loss = state.get("prev_loss")
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1
            if state["n_iter"] == 1:
                d = flat_grad.neg()
                old_dirs, old_stps, ro, h_diag = [], [], [], 1
            else:
                new_h = push_curvature_pair(flat_grad.sub(prev_flat_grad), d.mul(t), old_dirs, old_stps, ro,
                                            group["history_size"])
                h_diag = h_diag if new_h is None else new_h
                d = two_loop_direction(flat_grad, old_dirs, old_stps, ro, h_diag)
            if prev_flat_grad is None:
                prev_flat_grad = flat_grad.clone(memory_format=torch.contiguous_format)
            else:
                prev_flat_grad.copy_(flat_grad)
            prev_loss = loss
            # The first step is normalised by |g|_1 so its size is at most lr in every direction.
            t = min(1.0, 1.0 / flat_grad.abs().sum()) * lr if state["n_iter"] == 1 else lr
            gtd = flat_grad.dot(d)
            if gtd > -tol_change:  # not a descent direction
                break

            ls_evals = 0
            if group["line_search_fn"] == "strong_wolfe":
                x_init = [p.clone(memory_format=torch.contiguous_format) for p in self._params]
                loss, flat_grad, t, ls_evals = _strong_wolfe(
                    lambda x, step, direction: self._evaluate_at(closure, x, step, direction),
                    x_init, t, d, loss, flat_grad, gtd, max_ls=max_eval - evals)
                self._add_direction(t, d)
                converged = flat_grad.abs().max() <= tol_grad
            else:
                self._add_direction(t, d)
                converged = False
                if n_iter != max_iter:
                    loss = float(closure())
                    flat_grad = self._flat_grad()
                    converged = flat_grad.abs().max() <= tol_grad
                    ls_evals = 1
            evals += ls_evals
            state["func_evals"] += ls_evals
            if n_iter == max_iter or evals >= max_eval or converged:
                break
            if d.mul(t).abs().max() <= tol_change or abs(loss - prev_loss) < tol_change:
                break

        state.update(d=d, t=t, old_dirs=old_dirs, old_stps=old_stps, ro=ro, H_diag=h_diag,
                     prev_flat_grad=prev_flat_grad, prev_loss=prev_loss)
        return orig_loss
