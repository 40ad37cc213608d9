"""APOLLO / APOLLO-Mini: step-for-step parity with apollo-torch's APOLLOAdamW."""

from __future__ import annotations

import copy

import pytest
import torch

from llmtrain.optim import OPTIMIZERS, build_optimizer

from test_optim_extra_parity import loss_fn, make_params  # noqa: E402  (same random problem)

apollo_torch = pytest.importorskip("apollo_torch")


def run(make_opt, steps: int = 25):
    params = make_params()
    opt = make_opt(params)
    for step in range(steps):
        opt.zero_grad()
        loss_fn(params, step).backward()
        opt.step()
    return [p.detach().clone() for p in params]


def split(params):
    w1, b1, w2, b2, t = params
    return [w1, w2], [b1, b2, t]


CASES = {
    # APOLLO: channel-wise scaling, rank 2 of the 8x5 / 3x8 matrices, projection refreshed twice.
    "apollo": (dict(rank=2, scale=1.0, scale_type="channel"), dict(lr=1e-2, weight_decay=0.1)),
    "apollo_mini": (dict(rank=1, scale=128.0, scale_type="tensor"), dict(lr=1e-3)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_with_apollo_torch(name):
    proj, kw = CASES[name]

    def ours(params):
        mats, rest = split(params)
        return OPTIMIZERS[name]([{"params": mats, "use_apollo": True}, {"params": rest, "use_apollo": False}],
                                update_proj_gap=10, **proj, **kw)

    def ref(params):
        mats, rest = split(params)
        return apollo_torch.APOLLOAdamW([{"params": mats, "proj": "random", "update_proj_gap": 10, "proj_type": "std",
                                          **proj}, {"params": rest}], **kw)

    a, b = run(ours), run(ref)
    assert max((x - s).abs().max().item() for x, s in zip(a, make_params())) > 1e-3
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_state_dict_round_trip_and_memory():
    params = make_params()
    mats, rest = split(params)
    opt = OPTIMIZERS["apollo"]([{"params": mats, "use_apollo": True}, {"params": rest, "use_apollo": False}],
                               rank=2, update_proj_gap=3)
    for step in range(4):
        opt.zero_grad()
        loss_fn(params, step).backward()
        opt.step()
    # Projected moments are [8, 2] and [2, 8]-shaped (rows of the 8x5 weight, columns of the 3x8).
    assert opt.state[mats[0]]["exp_avg"].shape == (8, 2) and opt.state[mats[1]]["exp_avg"].shape == (2, 8)
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    cm, cr = split(clone)
    opt2 = OPTIMIZERS["apollo"]([{"params": cm, "use_apollo": True}, {"params": cr, "use_apollo": False}],
                                rank=2, update_proj_gap=3)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for o, ps in ((opt, params), (opt2, clone)):
        for step in range(4, 8):
            o.zero_grad()
            loss_fn(ps, step).backward()
            o.step()
    for x, y in zip(params, clone):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_build_optimizer_projects_only_hidden_matrices():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    opt = build_optimizer({"name": "apollo_mini", "lr": 1e-2, "adamw_lr": 1e-2}, model)
    projected = [p for g in opt.param_groups if g["use_apollo"] for p in g["params"]]
    assert len(projected) == 1 and projected[0] is model[1].weight
