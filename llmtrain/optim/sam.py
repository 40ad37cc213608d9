"""SAM: Sharpness-Aware Minimization, wrapping any registered optimizer.

Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization" (ICLR 2021);
adaptive SAM: Kwon et al., "ASAM" (ICML 2021). Reference implementation: github.com/davda54/sam
(``SAM``), reproduced in tests/test_optim_sam.py and matched to 1e-6.

``optim=sam optim.base=adamw optim.rho=0.05`` (plus the base's own hyperparameters). Each step
climbs to θ + ρ·g/‖g‖ (elementwise |θ|²-scaled for ``adaptive``), takes the gradient there via the
trainer's closure (a second forward/backward over the step's micro-batches, so ~2x compute), then
returns to θ and lets the base optimizer step with that gradient. State is the base's; the
perturbation is transient (+4 B/param peak).
"""

from __future__ import annotations

import torch

from llmtrain.optim._common import check_positive


class SAM(torch.optim.Optimizer):
    """Two-pass sharpness-aware step around a base optimizer from ``OPTIMIZERS``."""

    requires_closure = True
    state_bytes_per_param: float = 8.0  # the base's; this is AdamW's, replaced per instance

    def __init__(self, params, base: str = "adamw", rho: float = 0.05, adaptive: bool = False, **base_kwargs):
        from llmtrain.optim.registry import OPTIMIZERS

        check_positive("rho", rho)
        if base not in OPTIMIZERS or OPTIMIZERS[base] is SAM:
            raise ValueError(f"Invalid base: {base!r} (a registered optimizer other than sam)")
        super().__init__(params, dict(rho=rho, adaptive=adaptive))
        self.base_optimizer: torch.optim.Optimizer = OPTIMIZERS[base](self.param_groups, **base_kwargs)
        self.base_name = base
        self.state_bytes_per_param = getattr(self.base_optimizer, "state_bytes_per_param", 0.0)
        self._link()
        self._old: dict[torch.Tensor, torch.Tensor] = {}

    def _link(self) -> None:
        # One set of groups and state, owned by the base optimizer; SAM's rho/adaptive ride along.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)

    def _grad_norm(self) -> torch.Tensor:
        norms = [
            ((p.abs() if group["adaptive"] else 1.0) * p.grad).norm(p=2)
            for group in self.param_groups for p in group["params"] if p.grad is not None
        ]
        return torch.norm(torch.stack(norms), p=2)

    @torch.no_grad()
    def first_step(self) -> None:
        """θ ← θ + e(θ), e = ρ·(|θ|²)·g/‖(|θ|)·g‖ (adaptive) or ρ·g/‖g‖."""
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._old[p] = p.detach().clone()
                p.add_((torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p))

    @torch.no_grad()
    def second_step(self) -> None:
        """Back to θ, then the base optimizer's step with the gradient taken at θ + e."""
        for p, old in self._old.items():
            p.copy_(old)
        self._old.clear()
        self.base_optimizer.step()

    @torch.no_grad()
    def step(self, closure=None):
        if closure is None:
            raise RuntimeError("SAM needs a closure that recomputes the loss and gradients (requires_closure=True)")
        self.first_step()
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self._link()

    def __getattr__(self, name):
        # Protocol hooks of the base (e.g. Sophia's after_step) stay visible through the wrapper.
        if name in ("after_step", "before_step", "train", "eval", "refuse") and "base_optimizer" in self.__dict__:
            return getattr(self.base_optimizer, name)
        raise AttributeError(name)
