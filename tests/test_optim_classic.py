"""SGD, Adagrad, RMSprop against torch.optim step for step (1e-6), plus state round trips."""

from __future__ import annotations

import pytest
import torch

from llmtrain.optim.adagrad import Adagrad
from llmtrain.optim.rmsprop import RMSprop
from llmtrain.optim.sgd import SGD
from optim_parity import assert_state_dict_round_trip, max_trajectory_diff, moved

CASES = [
    (SGD, torch.optim.SGD, dict(lr=0.05)),
    (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1)),
    (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    (Adagrad, torch.optim.Adagrad, dict(lr=0.05)),
    (Adagrad, torch.optim.Adagrad, dict(lr=0.05, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1)),
    (RMSprop, torch.optim.RMSprop, dict(lr=0.01)),
    (RMSprop, torch.optim.RMSprop, dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01)),
    (RMSprop, torch.optim.RMSprop, dict(lr=0.01, alpha=0.9, momentum=0.5)),
]


@pytest.mark.parametrize("ours,ref,kw", CASES, ids=lambda x: getattr(x, "__name__", None) or repr(x))
def test_matches_torch(ours, ref, kw):
    ref_kw = dict(kw, foreach=False)
    # the eager rule against torch's for-loop; the fused paths against torch's fused kernels are in
    # test_optim_fused_paths.py (maximize=True amplifies the kernels' rounding differences over 25 steps)
    assert max_trajectory_diff(lambda p: ours(p, impl="eager", **kw), lambda p: ref(p, **ref_kw), steps=25) < 1e-6
    assert moved(lambda p: ours(p, **kw)) > 0.05


@pytest.mark.parametrize("ours,ref,kw", CASES[1::2], ids=lambda x: getattr(x, "__name__", None) or repr(x))
def test_state_dict_round_trip(ours, ref, kw):
    assert_state_dict_round_trip(lambda p: ours(p, **kw))


def test_nesterov_needs_momentum():
    with pytest.raises(ValueError):
        SGD([torch.nn.Parameter(torch.zeros(1))], nesterov=True)
