"""LOMO / AdaLomo: parity with lomo-optim through the backward(loss) protocol, and the protocol itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmtrain.optim import OPTIMIZERS, build_optimizer

lomo_optim = pytest.importorskip("lomo_optim")


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)


def loss_of(model, step):
    x, y = batch(step)
    return ((model(x) - y) ** 2).mean()


def run_ours(name, steps=25, **kw):
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters(), **kw)
    for step in range(steps):
        opt.backward(loss_of(model, step))
        assert all(p.grad is None for p in model.parameters())
    return [p.detach().clone() for p in model.parameters()]


def run_reference(cls, lr, steps=25, **kw):
    model = make_model()
    opt = cls(model, lr=lr, **kw)
    for step in range(steps):
        loss = loss_of(model, step)
        if kw.get("clip_grad_norm"):
            opt.grad_norm(loss)
        opt.fused_backward(loss, lr)
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture
def cpu_only_reference(monkeypatch):
    # lomo-optim's AdaLomo allocates its statistics with .cuda(); keep them on the CPU here.
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)


@pytest.mark.parametrize("kw", [dict(lr=0.05), dict(lr=0.05, weight_decay=0.1, clip_grad_norm=0.5),
                                dict(lr=0.05, clip_grad_value=0.02)])
def test_lomo_parity(kw):
    ours = run_ours("lomo", **kw)
    theirs = run_reference(lomo_optim.Lomo, **kw)
    assert max((a - s).abs().max().item() for a, s in zip(ours, make_model().parameters())) > 1e-3
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(lr=0.02), dict(lr=0.02, weight_decay=0.1, clip_grad_norm=0.5)])
def test_adalomo_parity(kw, cpu_only_reference):
    ours = run_ours("adalomo", **kw)
    theirs = run_reference(lomo_optim.AdaLomo, **kw)
    assert max((a - s).abs().max().item() for a, s in zip(ours, make_model().parameters())) > 1e-3
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_norm_pass_clips_by_the_global_norm():
    model = make_model()
    expected = make_model()
    loss_of(expected, 0).backward()
    total = torch.norm(torch.stack([p.grad.norm() for p in expected.parameters()]))
    coef = min(1.0, 0.1 / (float(total) + 1e-6))
    opt = OPTIMIZERS["lomo"](model.parameters(), lr=0.5, clip_grad_norm=0.1)
    opt.backward(loss_of(model, 0))
    assert opt.last_grad_norm == pytest.approx(float(total), rel=1e-6)
    for p, q in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p.detach(), q.detach() - 0.5 * coef * q.grad, rtol=0, atol=1e-7)


def test_gradients_are_freed_during_backward():
    """At most one parameter holds a gradient at any moment of the update pass."""
    model = make_model()
    opt = OPTIMIZERS["lomo"](model.parameters(), lr=0.1)
    params = list(model.parameters())
    held = []
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _p: held.append(sum(q.grad is not None for q in params)))
    opt.backward(loss_of(model, 0))
    assert held and max(held) <= 1


def test_protocol_refusals_and_plain_backward_is_untouched():
    model = make_model()
    opt = build_optimizer({"name": "adalomo", "lr": 1e-3}, model)
    assert opt.owns_backward is True
    assert opt.refuse("none", 1) is None
    assert "micro" in opt.refuse("none", 4)
    assert "ddp" in opt.refuse("ddp", 1)
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model, 0).backward()  # outside backward(loss): hooks stay inactive
    assert all(p.grad is not None for p in model.parameters())
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    with pytest.raises(RuntimeError, match="backward"):
        opt.step()
