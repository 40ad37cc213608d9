"""SAM against the published two-step update (davda54/sam), around several base optimizers."""

from __future__ import annotations

import pytest
import torch

from llmtrain.errors import ConfigError
from llmtrain.models import build_model
from llmtrain.optim import build_optimizer
from llmtrain.optim.adam import AdamW
from llmtrain.optim.sam import SAM
from llmtrain.optim.sgd import SGD
from optim_parity import assert_state_dict_round_trip, max_trajectory_diff, moved


# ---- reference: github.com/davda54/sam sam.py ----
class RefSAM(torch.optim.Optimizer):
    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        closure()
        self.second_step()

    def _grad_norm(self):
        shared_device = self.param_groups[0]["params"][0].device
        return torch.norm(torch.stack([
            ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2).to(shared_device)
            for group in self.param_groups for p in group["params"] if p.grad is not None
        ]), p=2)
# ---- end of reference ----


@pytest.mark.parametrize("base,ref_base,kw", [
    ("sgd", SGD, dict(lr=0.05, momentum=0.9)),
    ("adamw", AdamW, dict(lr=1e-2, weight_decay=0.1)),
])
@pytest.mark.parametrize("adaptive", [False, True])
def test_matches_reference(base, ref_base, kw, adaptive):
    ours = lambda p: SAM(p, base=base, rho=0.1, adaptive=adaptive, **kw)  # noqa: E731
    ref = lambda p: RefSAM(p, ref_base, rho=0.1, adaptive=adaptive, **kw)  # noqa: E731
    assert max_trajectory_diff(ours, ref, steps=20, closure=True) < 1e-6
    assert moved(ours, closure=True) > 0.05
    # and SAM is not the base optimizer alone
    assert max_trajectory_diff(ours, lambda p: ref_base(p, **kw), steps=5, closure=True) > 1e-4


def test_round_trip_and_protocol():
    assert_state_dict_round_trip(lambda p: SAM(p, base="adamw", lr=1e-2), closure=True)
    opt = SAM([torch.nn.Parameter(torch.zeros(2))], base="lion")
    assert opt.requires_closure and opt.state_bytes_per_param == 4.0
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_build_optimizer_passes_base_hyperparameters():
    model = build_model(dict(name="t", family="llama", n_layers=1, d_model=16, n_heads=2, vocab_size=32, max_seq_len=8))
    opt = build_optimizer({"name": "sam", "lr": 1e-3, "base": "adamw", "rho": 0.05, "betas": [0.8, 0.9], "weight_decay": 0.1}, model)
    assert isinstance(opt.base_optimizer, AdamW)
    assert all(g["betas"] == (0.8, 0.9) and g["rho"] == 0.05 for g in opt.param_groups)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.1}
    fused = build_optimizer({"name": "sam", "lr": 1e-3, "base": "adamw", "impl": "foreach"}, model)
    assert fused.base_optimizer.impl == "foreach"
    with pytest.raises(ConfigError, match="optim.impl"):
        build_optimizer({"name": "sam", "lr": 1e-3, "base": "nadam", "impl": "fused"}, model)
