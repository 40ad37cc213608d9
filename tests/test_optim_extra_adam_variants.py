"""NAdam / RAdam / Adamax: step-for-step parity with torch.optim, state_dict round trip."""

from __future__ import annotations

import copy

import pytest
import torch

from llmtrain.errors import ConfigError
from llmtrain.optim import OPTIMIZERS


def make_problem(seed: int = 0) -> tuple[list[torch.nn.Parameter], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(6, 5, generator=g)), torch.nn.Parameter(torch.randn(6, generator=g))]
    x = torch.randn(32, 5, generator=g)
    y = torch.randn(32, 6, generator=g)
    return params, x, y


def loss_fn(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w, b = params
    return ((torch.tanh(x @ w.T + b) - y) ** 2).mean()


def run(opt_cls, params, x, y, steps: int, **kw) -> list[torch.Tensor]:
    opt = opt_cls(params, **kw)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(params, x, y).backward()
        opt.step()
    return [p.detach().clone() for p in params]


CASES = [
    ("nadam", torch.optim.NAdam, dict(lr=2e-2)),
    ("nadam", torch.optim.NAdam, dict(lr=2e-2, weight_decay=0.1)),
    ("nadam", torch.optim.NAdam, dict(lr=2e-2, weight_decay=0.1, decoupled_weight_decay=True, momentum_decay=1e-2)),
    ("radam", torch.optim.RAdam, dict(lr=1e-2)),
    ("radam", torch.optim.RAdam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, betas=(0.8, 0.9))),
    ("adamax", torch.optim.Adamax, dict(lr=2e-2)),
    ("adamax", torch.optim.Adamax, dict(lr=2e-2, weight_decay=0.1, betas=(0.8, 0.95))),
]


@pytest.mark.parametrize("name,ref_cls,kw", CASES)
def test_parity_with_torch_optim_over_30_steps(name, ref_cls, kw):
    params, x, y = make_problem()
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = run(OPTIMIZERS[name], params, x, y, 30, **kw)
    theirs = run(ref_cls, ref_params, x, y, 30, foreach=False, **kw)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # The parameters really moved, so the comparison is not between two unchanged tensors.
    assert (ours[0] - make_problem()[0][0]).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["nadam", "radam", "adamax"])
def test_state_dict_round_trip_continues_identically(name):
    params, x, y = make_problem(1)
    opt = OPTIMIZERS[name](params, lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        loss_fn(params, x, y).backward()
        opt.step()
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = OPTIMIZERS[name](clone, lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for o, ps in ((opt, params), (opt2, clone)):
        for _ in range(5):
            o.zero_grad()
            loss_fn(ps, x, y).backward()
            o.step()
    for a, b in zip(params, clone):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_hyperparameter_names_the_key():
    params, _, _ = make_problem()
    with pytest.raises(ConfigError, match="optim.betas"):
        OPTIMIZERS["nadam"](params, betas=(0.9, 1.5))
