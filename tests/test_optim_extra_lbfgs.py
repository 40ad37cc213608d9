"""L-BFGS: parity with torch.optim.LBFGS, several param groups, protocol attributes."""

from __future__ import annotations

import copy

import pytest
import torch

from llmtrain.errors import ConfigError
from llmtrain.optim import OPTIMIZERS


def problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(6, 4, generator=g)), torch.nn.Parameter(torch.randn(6, generator=g))]
    x = torch.randn(40, 4, generator=g)
    # A teacher of the same form, so the minimum is near zero and progress is visible.
    y = torch.tanh(x @ torch.randn(6, 4, generator=g).T * 0.5) + 0.01 * torch.randn(40, 6, generator=g)

    def closure_for(opt):
        def closure():
            opt.zero_grad()
            loss = ((torch.tanh(x @ params[0].T + params[1]) - y) ** 2).mean()
            loss.backward()
            return loss
        return closure

    return params, closure_for


@pytest.mark.parametrize("kw,ratio", [(dict(lr=0.2), 0.01),
                                      (dict(lr=0.5, line_search_fn="strong_wolfe", history_size=5), 0.01),
                                      (dict(lr=0.5, max_iter=3, history_size=3), 0.3)])
def test_parity_with_torch_lbfgs_over_20_steps(kw, ratio):
    ours_p, ours_closure = problem()
    ref_p, ref_closure = problem()
    ours = OPTIMIZERS["lbfgs"](ours_p, **kw)
    ref = torch.optim.LBFGS(ref_p, **kw)
    losses = []
    for _ in range(20):
        a = ours.step(ours_closure(ours))
        b = ref.step(ref_closure(ref))
        losses.append(float(a.detach()))
        assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-6, abs=1e-7)
    for p, q in zip(ours_p, ref_p):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert losses[-1] < ratio * losses[0]
    assert ours.state[ours_p[0]]["func_evals"] == ref.state[ref_p[0]]["func_evals"]


def test_several_param_groups_equal_one_group():
    one_p, one_closure = problem()
    two_p, two_closure = problem()
    one = OPTIMIZERS["lbfgs"](one_p, lr=1.0, max_iter=5)
    two = OPTIMIZERS["lbfgs"]([{"params": [two_p[0]], "initial_lr": 1.0}, {"params": [two_p[1]], "initial_lr": 1.0}],
                              lr=1.0, max_iter=5)
    for _ in range(5):
        one.step(one_closure(one))
        two.step(two_closure(two))
    for p, q in zip(one_p, two_p):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_state_dict_round_trip():
    params, closure_for = problem()
    opt = OPTIMIZERS["lbfgs"](params, lr=1.0, max_iter=4)
    for _ in range(3):
        opt.step(closure_for(opt))
    clone, clone_closure_for = problem()
    with torch.no_grad():
        for c, p in zip(clone, params):
            c.copy_(p)
    opt2 = OPTIMIZERS["lbfgs"](clone, lr=1.0, max_iter=4)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(3):
        opt.step(closure_for(opt))
        opt2.step(clone_closure_for(opt2))
    for p, q in zip(params, clone):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_protocol_and_refusals():
    params, _ = problem()
    opt = OPTIMIZERS["lbfgs"](params)
    assert opt.requires_closure is True
    assert opt.refuse("none", 4) is None
    assert "fsdp" in opt.refuse("fsdp", 1)
    with pytest.raises(ConfigError, match="weight_decay"):
        OPTIMIZERS["lbfgs"]([{"params": params, "weight_decay": 0.1}])
    two = OPTIMIZERS["lbfgs"]([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 0.1}])
    with pytest.raises(ConfigError, match="lr"):
        two.step(lambda: torch.tensor(0.0))
