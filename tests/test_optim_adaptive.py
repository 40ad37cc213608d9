"""AdaBelief, LAMB, LARS against pytorch-optimizer step for step."""

from __future__ import annotations

import pytest
import pytorch_optimizer as po
import torch

from llmtrain.optim.adabelief import AdaBelief
from llmtrain.optim.lamb import Lamb
from llmtrain.optim.lars import LARS
from optim_parity import assert_state_dict_round_trip, max_trajectory_diff, moved


@pytest.mark.parametrize("kw", [dict(lr=1e-2), dict(lr=1e-2, weight_decay=0.1), dict(lr=1e-2, weight_decay=0.1, weight_decouple=False)])
def test_adabelief_matches_pytorch_optimizer(kw):
    ref = lambda p: po.AdaBelief(p, rectify=False, foreach=False, **kw)  # noqa: E731
    assert max_trajectory_diff(lambda p: AdaBelief(p, **kw), ref, steps=25) < 1e-6
    assert moved(lambda p: AdaBelief(p, **kw)) > 0.05


def test_lamb_without_bias_correction_matches_pytorch_optimizer():
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    ref = lambda p: po.Lamb(p, weight_decouple=False, adam_debias=True, max_grad_norm=0.0, foreach=False, **kw)  # noqa: E731
    assert max_trajectory_diff(lambda p: Lamb(p, bias_correction=False, **kw), ref, steps=25) < 1e-6
    assert moved(lambda p: Lamb(p, bias_correction=False, **kw)) > 0.05


def test_lamb_bias_correction_cancels_in_the_trust_ratio_without_decay():
    kw = dict(lr=1e-2, eps=1e-12)
    ref = lambda p: po.Lamb(p, adam_debias=True, max_grad_norm=0.0, foreach=False, **kw)  # noqa: E731
    assert max_trajectory_diff(lambda p: Lamb(p, **kw), ref, steps=25) < 1e-6


def test_lamb_step_norm_is_lr_times_weight_norm():
    p = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    opt = Lamb([p], lr=0.1, eps=0.0)
    p.grad = torch.tensor([[1.0, -2.0]])
    opt.step()
    # first step: m̂/√v̂ = sign(g) = [1, -1]; ‖θ‖ = 5, ‖r‖ = √2 → Δθ = -0.1·5/√2·[1, -1]
    step = 0.5 / 2**0.5
    assert torch.allclose(p.detach(), torch.tensor([[3.0 - step, 4.0 + step]]))


@pytest.mark.parametrize("kw", [dict(lr=0.5), dict(lr=0.5, weight_decay=0.01, nesterov=True), dict(lr=0.5, momentum=0.0), dict(lr=0.5, dampening=0.1, trust_coefficient=0.01)])
def test_lars_matches_pytorch_optimizer(kw):
    ref = lambda p: po.LARS(p, foreach=False, **kw)  # noqa: E731
    assert max_trajectory_diff(lambda p: LARS(p, **kw), ref, steps=25) < 1e-6
    assert moved(lambda p: LARS(p, **kw)) > 1e-3


@pytest.mark.parametrize("factory", [
    lambda p: AdaBelief(p, lr=1e-2, weight_decay=0.1),
    lambda p: Lamb(p, lr=1e-2, weight_decay=0.1),
    lambda p: LARS(p, lr=0.5, weight_decay=0.01),
])
def test_state_dict_round_trip(factory):
    assert_state_dict_round_trip(factory)
