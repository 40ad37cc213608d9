"""K-FAC against an explicit (A (x) G + damping I)^-1 on a small Linear layer (no installable reference)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from llmtrain.errors import ConfigError
from llmtrain.optim import OPTIMIZERS, build_optimizer


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(16, 3)
    y = torch.randn(16, 2)
    return model, x, y


def explicit_natural_gradient(model, x, y, damping):
    """A, G from their definitions, then solve (G (x) A + damping I) vec_r(X) = vec_r(V)."""
    layer = model[0]
    n = x.shape[0]
    out = layer(x)
    out.retain_grad()
    ((out - y) ** 2).mean().backward()
    a = torch.cat([x, torch.ones(n, 1)], dim=1)
    big_a = a.T @ a / n
    g = out.grad * n  # per-sample output gradients of the summed loss
    big_g = g.T @ g / n
    v = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
    # Row-major vec of G X A is (G (x) A) vec(X) for symmetric A.
    x_nat = torch.linalg.solve(torch.kron(big_g, big_a) + damping * torch.eye(v.numel()), v.reshape(-1))
    model.zero_grad()
    return x_nat.reshape(v.shape), v


def test_first_step_is_the_damped_kronecker_natural_gradient():
    model, x, y = setup()
    ref_model = copy.deepcopy(model)
    nat, _ = explicit_natural_gradient(ref_model, x, y, damping=0.1)
    opt = OPTIMIZERS["kfac"](model.parameters(), lr=0.5, model=model, momentum=0.0, stat_decay=0.0, damping=0.1,
                             kl_clip=1e9, TCov=1, TInv=1)
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    torch.testing.assert_close(model[0].weight.detach(), w0 - 0.5 * nat[:, :3], rtol=0, atol=1e-6)
    torch.testing.assert_close(model[0].bias.detach(), b0 - 0.5 * nat[:, 3], rtol=0, atol=1e-6)


def test_kl_clip_scales_the_update():
    model, x, y = setup()
    ref_model = copy.deepcopy(model)
    nat, v = explicit_natural_gradient(ref_model, x, y, damping=0.1)
    lr, kl_clip = 0.5, 1e-4
    nu = min(1.0, math.sqrt(kl_clip / float((nat * v).sum() * lr ** 2)))
    assert nu < 1.0
    opt = OPTIMIZERS["kfac"](model.parameters(), lr=lr, model=model, momentum=0.0, stat_decay=0.0, damping=0.1,
                             kl_clip=kl_clip, TCov=1, TInv=1)
    w0 = model[0].weight.detach().clone()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    torch.testing.assert_close(model[0].weight.detach(), w0 - lr * nu * nat[:, :3], rtol=0, atol=1e-6)


def test_inverse_refreshes_every_TInv_steps_and_stats_every_TCov():
    model, x, y = setup()
    opt = OPTIMIZERS["kfac"](model.parameters(), lr=0.1, model=model, TCov=2, TInv=3)
    state = opt.state[model[0].weight]
    seen_q, seen_a = [], []
    for _ in range(5):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        seen_q.append(state["QA"].clone())
        seen_a.append(state["A"].clone())
    assert torch.equal(seen_q[0], seen_q[1]) and torch.equal(seen_q[1], seen_q[2])
    assert not torch.equal(seen_q[2], seen_q[3])  # refreshed at step 3
    assert torch.equal(seen_a[0], seen_a[1]) and not torch.equal(seen_a[1], seen_a[2])  # stats at steps 0, 2, 4


def test_needs_model_refuses_distributed_and_skips_tied_and_huge_layers():
    model, _, _ = setup()
    with pytest.raises(ConfigError, match="model"):
        OPTIMIZERS["kfac"](model.parameters(), lr=0.1)
    opt = OPTIMIZERS["kfac"](model.parameters(), lr=0.1, model=model)
    assert opt.refuse("none", 4) is None and "fsdp" in opt.refuse("fsdp", 1)
    emb = nn.Embedding(50, 4)
    head = nn.Linear(4, 50, bias=False)
    head.weight = emb.weight
    lm = nn.Sequential(emb, nn.Linear(4, 4), head)
    opt = build_optimizer({"name": "kfac", "lr": 0.1, "max_factor_dim": 40}, lm)
    assert opt.layers == [lm[1]]


def test_state_dict_round_trip():
    model, x, y = setup()
    opt = OPTIMIZERS["kfac"](model.parameters(), lr=0.1, model=model, TCov=2, TInv=3)
    for _ in range(4):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    clone = setup()[0]  # not deepcopy(model): that would copy the hooks bound to the first optimizer
    clone.load_state_dict(model.state_dict())
    opt2 = OPTIMIZERS["kfac"](clone.parameters(), lr=0.1, model=clone, TCov=2, TInv=3)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for o, m in ((opt, model), (opt2, clone)):
        for _ in range(4):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()
    for p, q in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
