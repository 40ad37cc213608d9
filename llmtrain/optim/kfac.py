"""K-FAC: Kronecker-factored approximate curvature for Linear layers.

For a Linear layer with inputs a (bias folded in as a constant 1) and output gradients g, the
Fisher block is approximated by A (x) G with A = E[a a^T] and G = E[g g^T]. With eigenvectors
A = Qa diag(da) Qa^T, G = Qg diag(dg) Qg^T, the damped natural gradient of the [out, in+1]
gradient matrix V is

    Qg [ (Qg^T V Qa) / (dg da^T + damping) ] Qa^T  =  (A (x) G + damping I)^-1 vec(V),

computed every step; the factors are refreshed from forward/backward hooks every ``TCov`` steps
and their eigendecompositions every ``TInv`` steps. The natural gradients are scaled so that the
predicted KL change stays under ``kl_clip``, then applied by SGD with momentum. Parameters that
are not in a preconditioned Linear (embeddings, norms, a head larger than ``max_factor_dim``)
take the same SGD step on their raw gradient.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from llmtrain.errors import ConfigError


def linear_input_covariance(a: Tensor, has_bias: bool) -> Tensor:
    """A = a^T a / N over every token of the batch, with a column of ones for the bias."""
    a = a.reshape(-1, a.shape[-1]).float()
    if has_bias:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    return a.t() @ (a / a.shape[0])


def linear_grad_covariance(g: Tensor, batch_averaged: bool) -> Tensor:
    """G = g^T g / N; with a loss averaged over the N tokens, g is first rescaled by N."""
    g = g.reshape(-1, g.shape[-1]).float()
    n = g.shape[0]
    return g.t() @ (g * n) if batch_averaged else g.t() @ (g / n)


def eigen_factor(m: Tensor, eps: float = 1e-10) -> tuple[Tensor, Tensor]:
    """Eigenvalues (tiny ones zeroed, as the reference does) and eigenvectors of a factor."""
    d, q = torch.linalg.eigh(m)
    return d * (d > eps), q


def natural_gradient(grad_mat: Tensor, qa: Tensor, da: Tensor, qg: Tensor, dg: Tensor, damping: float) -> Tensor:
    """(A (x) G + damping I)^-1 applied to the [out, in(+1)] gradient matrix."""
    v = qg.t() @ grad_mat @ qa
    v = v / (dg.unsqueeze(1) * da.unsqueeze(0) + damping)
    return qg @ v @ qa.t()


class KFAC(torch.optim.Optimizer):
    """K-FAC for the Linear layers of ``model``, SGD with momentum for everything else.

    Paper: Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate
    Curvature" (ICML 2015). Reference: alecwangcq/KFAC-Pytorch (``KFACOptimizer``; same
    hyperparameter names and defaults; not on PyPI, so the tests check the update against an
    explicit (A (x) G + damping I)^-1 on a small layer). Followed from the reference: factors
    start at the identity and are EMAs with ``stat_decay``; eigen-based damping; the KL clip
    nu = min(1, sqrt(kl_clip / sum(v . g * lr^2))); weight decay is added to the gradient only
    after 20 * TCov steps; momentum is heavy-ball (buf = m * buf + d_p).
    Differences: Linear inputs of shape [batch, seq, in] count every token as a sample; layers
    with a side larger than ``max_factor_dim`` and Linear weights tied to an Embedding fall back to
    SGD; stats are taken in fp32. Needs ``model`` (``build_optimizer`` passes it); its forward
    hooks stay on the model, so build a fresh model rather than deep-copying a hooked one, and
    with activation checkpointing the recomputed forward counts a second sample. Single process
    only. State per preconditioned [out, in] layer: (in+1)^2 + out^2 floats x 2 (factors and
    eigenvectors) plus the momentum (4 bytes/param).
    """

    state_bytes_per_param: float = 4.0  # momentum; factors add 8 (in^2 + out^2) / (in * out) per layer

    def __init__(self, params, lr: float = 1e-3, model: Optional[nn.Module] = None, momentum: float = 0.9,
                 stat_decay: float = 0.95, damping: float = 1e-3, kl_clip: float = 1e-3, weight_decay: float = 0.0,
                 TCov: int = 10, TInv: int = 100, batch_averaged: bool = True, max_factor_dim: int = 8192):
        if model is None:
            raise ConfigError("optim.name", "kfac needs the model for its layer hooks; build it with "
                              "llmtrain.optim.build_optimizer(cfg, model)")
        if lr < 0:
            raise ConfigError("optim.lr", f"got {lr}, expected >= 0")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError("optim.momentum", f"got {momentum}, expected a number in [0, 1)")
        if not 0.0 <= stat_decay < 1.0:
            raise ConfigError("optim.stat_decay", f"got {stat_decay}, expected a number in [0, 1)")
        for key, value in (("damping", damping), ("kl_clip", kl_clip), ("weight_decay", weight_decay)):
            if value < 0:
                raise ConfigError(f"optim.{key}", f"got {value}, expected >= 0")
        for key, value in (("TCov", TCov), ("TInv", TInv), ("max_factor_dim", max_factor_dim)):
            if value < 1:
                raise ConfigError(f"optim.{key}", f"got {value}, expected >= 1")
        super().__init__(params, dict(lr=lr, momentum=momentum, stat_decay=stat_decay, damping=damping,
                                      kl_clip=kl_clip, weight_decay=weight_decay))
        self.TCov, self.TInv, self.batch_averaged = TCov, TInv, batch_averaged
        self.param_groups[0].setdefault("kfac_steps", 0)
        self.layers = self._preconditioned_layers(model, max_factor_dim)
        self._handles = []
        for layer in self.layers:
            self._handles.append(layer.register_forward_hook(self._on_forward))

    def _preconditioned_layers(self, model: nn.Module, max_dim: int) -> list[nn.Linear]:
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        layers = []
        for m in model.modules():
            if not isinstance(m, nn.Linear) or id(m.weight) not in owned or id(m.weight) in embedded:
                continue
            if m.bias is not None and id(m.bias) not in owned:
                continue
            if max(m.in_features + (m.bias is not None), m.out_features) <= max_dim:
                layers.append(m)
        return layers

    def refuse(self, strategy: str, grad_accum_steps: int) -> Optional[str]:
        if strategy not in ("none", "auto"):
            return f"kfac keeps per-process curvature factors (not all-reduced), so it runs single-process, not {strategy}"
        return None

    @property
    def _steps(self) -> int:
        return self.param_groups[0]["kfac_steps"]

    def _collecting(self) -> bool:
        return torch.is_grad_enabled() and self._steps % self.TCov == 0

    def _running_update(self, key: str, layer: nn.Linear, cov: Tensor) -> None:
        state = self.state[layer.weight]
        decay = self.param_groups[0]["stat_decay"]
        if key not in state:
            state[key] = torch.eye(cov.shape[0], device=cov.device)
        state[key].mul_(decay).add_(cov, alpha=1 - decay)

    def _on_forward(self, layer: nn.Linear, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        """Input statistics now; output-gradient statistics when backward reaches this output.

        A tensor hook on the output (rather than a module backward hook) tolerates in-place ops
        downstream and inputs that need no gradient.
        """
        if not self._collecting() or not output.requires_grad:
            return
        self._running_update("A", layer, linear_input_covariance(inputs[0].detach(), layer.bias is not None))

        def save_grad(grad: Tensor) -> None:
            self._running_update("G", layer, linear_grad_covariance(grad.detach(), self.batch_averaged))

        output.register_hook(save_grad)

    def _group_of(self) -> dict[int, dict]:
        return {id(p): g for g in self.param_groups for p in g["params"]}

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group_of = self._group_of()
        damping = self.param_groups[0]["damping"]
        updates: dict[nn.Linear, Tensor] = {}
        for layer in self.layers:
            if layer.weight.grad is None:
                continue
            state = self.state[layer.weight]
            if "A" not in state or "G" not in state:
                continue  # no statistics yet (e.g. the layer was unused on the first step)
            if self._steps % self.TInv == 0 or "QA" not in state:
                state["dA"], state["QA"] = eigen_factor(state["A"])
                state["dG"], state["QG"] = eigen_factor(state["G"])
            grad = layer.weight.grad.float()
            if layer.bias is not None:
                grad = torch.cat([grad, layer.bias.grad.float().unsqueeze(1)], dim=1)
            updates[layer] = natural_gradient(grad, state["QA"], state["dA"], state["QG"], state["dG"], damping)
        self._kl_clip(updates, group_of)
        self._sgd_step()
        self.param_groups[0]["kfac_steps"] += 1
        return loss

    def _kl_clip(self, updates: dict[nn.Linear, Tensor], group_of: dict[int, dict]) -> None:
        """Replace the layers' gradients by their natural gradients, scaled by the KL clip nu."""
        vg_sum = 0.0
        for layer, v in updates.items():
            lr = group_of[id(layer.weight)]["lr"]
            vg_sum += float((v[:, :layer.in_features] * layer.weight.grad).sum()) * lr ** 2
            if layer.bias is not None:
                vg_sum += float((v[:, -1] * layer.bias.grad).sum()) * lr ** 2
        kl_clip = self.param_groups[0]["kl_clip"]
        nu = min(1.0, math.sqrt(kl_clip / vg_sum)) if vg_sum > 0 else 1.0
        for layer, v in updates.items():
            layer.weight.grad.copy_(v[:, :layer.in_features]).mul_(nu)
            if layer.bias is not None:
                layer.bias.grad.copy_(v[:, -1]).mul_(nu)

    def _sgd_step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if group["weight_decay"] != 0 and self._steps >= 20 * self.TCov:
                    d_p = d_p.add(p, alpha=group["weight_decay"])
                if group["momentum"] != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    d_p = state["momentum_buffer"].mul_(group["momentum"]).add_(d_p)
                p.add_(d_p, alpha=-group["lr"])
