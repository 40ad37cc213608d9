"""Schedule-Free AdamW against facebookresearch's schedulefree.AdamWScheduleFree, incl. eval()/train()."""

from __future__ import annotations

import pytest
import schedulefree
import torch

from llmtrain.optim.schedulefree import ScheduleFreeAdamW
from optim_parity import assert_state_dict_round_trip, loss_fn, make_params, max_trajectory_diff, moved


def _ref(kw):
    def make(p):
        opt = schedulefree.AdamWScheduleFree(p, foreach=False, **kw)
        opt.train()
        return opt
    return make


@pytest.mark.parametrize("kw", [dict(lr=1e-2), dict(lr=1e-2, warmup_steps=5, weight_decay=0.1, betas=(0.95, 0.99), r=0.5)])
def test_matches_reference(kw):
    ours = lambda p: ScheduleFreeAdamW(p, **kw)  # noqa: E731
    assert max_trajectory_diff(ours, _ref(kw), steps=25) < 1e-6
    assert moved(ours) > 0.05


def test_eval_weights_match_reference_and_train_restores():
    kw = dict(lr=1e-2, warmup_steps=3)
    pa, pb = make_params(), make_params()
    a, b = ScheduleFreeAdamW(pa, **kw), _ref(kw)(pb)
    for step in range(10):
        for opt, params in ((a, pa), (b, pb)):
            opt.zero_grad()
            loss_fn(params, step).backward()
            opt.step()
    y = [p.detach().clone() for p in pa]
    a.eval()
    b.eval()
    for x, ref, yy in zip(pa, pb, y):
        assert torch.allclose(x, ref, atol=1e-6)
        assert not torch.allclose(x, yy)  # x and y differ
    with pytest.raises(RuntimeError, match="train"):
        a.step()
    a.train()
    for p, yy in zip(pa, y):
        assert torch.allclose(p, yy, atol=1e-6)


def test_round_trip():
    assert_state_dict_round_trip(lambda p: ScheduleFreeAdamW(p, lr=1e-2, warmup_steps=2))
