"""Lion against lion-pytorch on every impl (1e-6) and its 4 B/param state."""

from __future__ import annotations

import pytest
import torch
from lion_pytorch import Lion as RefLion

from llmtrain.errors import ConfigError
from llmtrain.optim.lion import Lion
from llmtrain.optim.protocol import state_bytes
from optim_parity import assert_state_dict_round_trip, max_trajectory_diff, moved


@pytest.mark.parametrize("impl", ["eager", "foreach", "auto"])
@pytest.mark.parametrize("kw", [dict(lr=1e-3), dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.5)])
def test_matches_lion_pytorch(impl, kw):
    assert max_trajectory_diff(lambda p: Lion(p, impl=impl, **kw), lambda p: RefLion(p, **kw), steps=25) < 1e-6
    assert moved(lambda p: Lion(p, impl=impl, **kw)) > 0.02


def test_lion_first_step_is_minus_lr_sign_grad():
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5]))
    opt = Lion([p], lr=0.1)
    p.grad = torch.tensor([2.0, -0.001, 0.0])
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor([0.9, -0.9, 0.5]))


def test_round_trip_and_state_bytes():
    assert_state_dict_round_trip(lambda p: Lion(p, lr=1e-3, weight_decay=0.1))
    p = torch.nn.Parameter(torch.zeros(10, 10))
    opt = Lion([p])
    p.grad = torch.ones_like(p)
    opt.step()
    assert state_bytes(opt) == 4 * p.numel()


def test_unknown_impl():
    # impl=fused is the compiled update since issue 10 (tests/test_optim_fused_paths.py)
    with pytest.raises(ConfigError, match="optim.impl"):
        Lion([torch.nn.Parameter(torch.zeros(1))], impl="fastest")


def test_triton_impl_under_the_interpreter_matches_lion_pytorch(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kw = dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.5)
    assert max_trajectory_diff(lambda p: Lion(p, impl="triton", **kw), lambda p: RefLion(p, **kw), steps=20) < 1e-6
