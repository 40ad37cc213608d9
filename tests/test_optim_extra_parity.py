"""Step-for-step parity of the issue-11 optimizers with their reference packages.

Each case runs our class and the reference on identical copies of a small random problem
(a 2-layer tanh regression with matrix, vector and 3-D parameters) for 25 steps and compares
every parameter. The tolerance is the one achieved, recorded per case.
"""

from __future__ import annotations

import copy

import pytest
import torch

from llmtrain.optim import OPTIMIZERS

STEPS = 25


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 5), (8,), (3, 8), (3,), (2, 3, 4)]
    return [torch.nn.Parameter(torch.randn(*s, generator=g) * 0.5) for s in shapes]


def loss_fn(params: list[torch.Tensor], seed: int) -> torch.Tensor:
    # A fresh mini-batch per step (seeded by the step) so gradients change direction.
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(16, 5, generator=g)
    y = torch.randn(16, 3, generator=g)
    w1, b1, w2, b2, t = params
    h = torch.tanh(x @ w1.T + b1)
    return ((h @ w2.T + b2 - y) ** 2).mean() + (t ** 2).sum() * 0.1 + (t.sum(-1) ** 3).mean() * 0.01


def trajectory(make_opt, steps: int = STEPS, seed: int = 0) -> list[torch.Tensor]:
    params = make_params(seed)
    opt = make_opt(params)
    for step in range(steps):
        opt.zero_grad()
        loss_fn(params, step).backward()
        opt.step()
    return [p.detach().clone() for p in params]


def assert_parity(ours, theirs, atol: float) -> None:
    start = make_params()
    moved = max((a - s).abs().max().item() for a, s in zip(ours, start))
    assert moved > 1e-3, "parameters did not move; the comparison would be vacuous"
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


def _pto():
    return pytest.importorskip("pytorch_optimizer")


# (our name, our kwargs, reference factory, achieved tolerance)
def _cases():
    return [
        ("adan", dict(lr=1e-2), lambda ps: _pto().Adan(ps, lr=1e-2, foreach=False), 1e-6),
        ("adan", dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.9, 0.95)),
         lambda ps: _pto().Adan(ps, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.9, 0.95), foreach=False), 1e-6),
        ("adan", dict(lr=1e-2, weight_decay=0.1, no_prox=True, max_grad_norm=0.5),
         lambda ps: _pto().Adan(ps, lr=1e-2, weight_decay=0.1, weight_decouple=True, max_grad_norm=0.5,
                                foreach=False), 1e-6),
        ("signsgd", dict(lr=1e-2), lambda ps: _pto().SignSGD(ps, lr=1e-2, momentum=0.0, foreach=False), 0.0),
        ("signum", dict(lr=1e-2, weight_decay=0.1),
         lambda ps: _pto().SignSGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1, foreach=False), 0.0),
        ("signum", dict(lr=1e-2, weight_decay=0.1, weight_decouple=False, momentum=0.5),
         lambda ps: _pto().SignSGD(ps, lr=1e-2, momentum=0.5, weight_decay=0.1, weight_decouple=False,
                                   foreach=False), 0.0),
        ("sm3", dict(lr=0.1), lambda ps: _pto().SM3(ps, lr=0.1, foreach=False), 1e-6),
        ("sm3", dict(lr=0.05, momentum=0.9, beta=0.9),
         lambda ps: _pto().SM3(ps, lr=0.05, momentum=0.9, beta=0.9, foreach=False), 1e-6),
        ("came", dict(lr=1e-2), lambda ps: pytest.importorskip("came_pytorch").CAME(ps, lr=1e-2), 1e-6),
        ("came", dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.9, 0.95)),
         lambda ps: pytest.importorskip("came_pytorch").CAME(ps, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.9, 0.95)),
         1e-6),
    ]


@pytest.mark.parametrize("case", range(len(_cases())))
def test_parity_with_reference(case):
    name, kw, make_ref, atol = _cases()[case]
    ours = trajectory(lambda ps: OPTIMIZERS[name](ps, **kw))
    theirs = trajectory(make_ref)
    assert_parity(ours, theirs, atol)


@pytest.mark.parametrize("name,kw", [("adan", {}), ("signum", {}), ("sm3", dict(momentum=0.9)), ("came", {})])
def test_state_dict_round_trip(name, kw):
    params = make_params()
    opt = OPTIMIZERS[name](params, lr=1e-2, **kw)
    for step in range(4):
        opt.zero_grad()
        loss_fn(params, step).backward()
        opt.step()
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = OPTIMIZERS[name](clone, lr=1e-2, **kw)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for o, ps in ((opt, params), (opt2, clone)):
        for step in range(4, 8):
            o.zero_grad()
            loss_fn(ps, step).backward()
            o.step()
    for a, b in zip(params, clone):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_adan_in_optimizer_clipping_is_refused_on_sharded_strategies():
    opt = OPTIMIZERS["adan"](make_params(), max_grad_norm=1.0)
    assert opt.refuse("ddp", 1) is None and opt.refuse("none", 2) is None
    assert "max_grad_norm" in opt.refuse("fsdp", 1)
    assert OPTIMIZERS["adan"](make_params()).refuse("fsdp", 1) is None
