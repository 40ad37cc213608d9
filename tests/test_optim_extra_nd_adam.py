"""ND-Adam against the paper's Algorithm 1 on a hand-derived 2x2 example (no installable reference)."""

from __future__ import annotations

import math

import pytest
import torch

from llmtrain.errors import ConfigError
from llmtrain.optim import OPTIMIZERS, build_optimizer


def test_first_step_matches_hand_derivation():
    # Rows (3, 4) and (1, 0) are normalised to (0.6, 0.8) and (1, 0) first. With gradients (1, 0)
    # and (0, 2): tangents (0.64, -0.48) and (0, 2); bias-corrected m = tangent, v = |tangent|^2,
    # so the step is -lr * tangent / |tangent| = -(0.08, -0.06) and -(0, 0.1) at lr = 0.1; then both
    # rows are renormalised (each pre-norm vector has norm sqrt(1.01)).
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
    opt = OPTIMIZERS["nd_adam"]([w], lr=0.1, eps=0.0)
    w.grad = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    opt.step()
    r = math.sqrt(1.01)
    expected = torch.tensor([[0.52 / r, 0.86 / r], [1.0 / r, -0.1 / r]])
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-7)


def paper_algorithm(w0, grads, lr, b1, b2, eps):
    """Algorithm 1 written out per vector with Python floats, independent of the module."""
    out = []
    for row in range(len(w0)):
        w = [x / math.sqrt(sum(v * v for v in w0[row])) for x in w0[row]]
        m, v = [0.0] * len(w), 0.0
        for t, g_all in enumerate(grads, start=1):
            g = g_all[row]
            gw = sum(a * b for a, b in zip(g, w))
            gbar = [a - gw * b for a, b in zip(g, w)]
            m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, gbar)]
            v = b2 * v + (1 - b2) * sum(x * x for x in gbar)
            mh = [mi / (1 - b1 ** t) for mi in m]
            vh = v / (1 - b2 ** t)
            wbar = [wi - lr * mi / (math.sqrt(vh) + eps) for wi, mi in zip(w, mh)]
            norm = math.sqrt(sum(x * x for x in wbar))
            w = [x / norm for x in wbar]
        out.append(w)
    return out


def test_five_steps_match_the_papers_algorithm():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(2, 2, generator=g, dtype=torch.float64)
    grads = [torch.randn(2, 2, generator=g, dtype=torch.float64) for _ in range(5)]
    w = torch.nn.Parameter(w0.clone())
    opt = OPTIMIZERS["nd_adam"]([w], lr=0.05, betas=(0.8, 0.9), eps=1e-8)
    for grad in grads:
        w.grad = grad.clone()
        opt.step()
    expected = paper_algorithm(w0.tolist(), [x.tolist() for x in grads], 0.05, 0.8, 0.9, 1e-8)
    torch.testing.assert_close(w.detach(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(w.detach().norm(dim=1), torch.ones(2, dtype=torch.float64))


def test_build_optimizer_puts_hidden_matrices_in_nd_groups_and_the_rest_in_adamw():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer({"name": "nd_adam", "lr": 0.05, "adamw_lr": 1e-3}, model)
    nd = [p for g in opt.param_groups if g["use_nd"] for p in g["params"]]
    assert len(nd) == 1 and nd[0] is model[1].weight
    assert {g["initial_lr"] for g in opt.param_groups if not g["use_nd"]} == {1e-3}
    with pytest.raises(ConfigError):
        OPTIMIZERS["nd_adam"]([{"params": [model[1].bias], "use_nd": True}])
