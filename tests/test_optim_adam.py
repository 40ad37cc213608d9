"""Adam / AdamW against torch.optim on every impl, the textbook example, and state round trips."""

from __future__ import annotations

import pytest
import torch

from llmtrain.errors import ConfigError
from llmtrain.optim import OPTIMIZERS
from llmtrain.optim.adam import Adam, AdamW, adam_update_
from llmtrain.optim.protocol import state_bytes
from optim_parity import assert_state_dict_round_trip, max_trajectory_diff, moved

IMPLS = ["eager", "foreach", "fused", "auto"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("ours,ref,wd", [(AdamW, torch.optim.AdamW, 0.1), (Adam, torch.optim.Adam, 0.05), (Adam, torch.optim.Adam, 0.0)])
def test_matches_torch(ours, ref, wd, amsgrad, impl):
    kw = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd, amsgrad=amsgrad)
    diff = max_trajectory_diff(
        lambda p: ours(p, impl=impl, **kw), lambda p: ref(p, foreach=False, **kw), steps=25
    )
    assert diff < 1e-6
    assert moved(lambda p: ours(p, impl=impl, **kw)) > 0.1


def test_maximize_matches_torch():
    kw = dict(lr=1e-2, weight_decay=0.1, maximize=True)
    for impl in IMPLS:
        assert max_trajectory_diff(lambda p: AdamW(p, impl=impl, **kw), lambda p: torch.optim.AdamW(p, **kw)) < 1e-6


def test_textbook_example():
    """Adam on θ²/2 from θ=2, lr 0.1, betas (0.9, 0.999): θ = 1.90000, 1.80017, 1.70062."""
    for impl in IMPLS:
        theta = torch.nn.Parameter(torch.tensor([2.0]))
        opt = Adam([theta], lr=0.1, betas=(0.9, 0.999), eps=1e-8, impl=impl)
        got = []
        for _ in range(3):
            opt.zero_grad()
            (theta**2 / 2).sum().backward()
            opt.step()
            got.append(theta.item())
        assert got == pytest.approx([1.90000, 1.80017, 1.70062], abs=5e-6), impl


def test_pure_update_function_first_step_is_sign_times_lr():
    p, g = torch.tensor([1.0, -2.0]), torch.tensor([0.5, -3.0])
    m, v = torch.zeros(2), torch.zeros(2)
    adam_update_(p, g, m, v, None, 1, lr=0.1, beta1=0.9, beta2=0.999, eps=0.0, weight_decay=0.0, decoupled=True)
    assert torch.allclose(p, torch.tensor([0.9, -1.9]))


@pytest.mark.parametrize("impl", ["eager", "fused", "foreach"])
@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_state_dict_round_trip_continues_identically(cls, impl):
    assert_state_dict_round_trip(lambda p: cls(p, lr=1e-2, weight_decay=0.1, amsgrad=True, impl=impl))


def test_state_bytes_adamw_is_8_per_param():
    model = torch.nn.Linear(16, 8)
    opt = OPTIMIZERS["adamw"](model.parameters(), lr=1e-3)
    model(torch.ones(1, 16)).sum().backward()
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    # plus one 4-byte step counter per parameter tensor
    assert state_bytes(opt) == 8 * n + 4 * 2
    assert AdamW.state_bytes_per_param == 8.0


def test_bad_impl_and_triton_without_cuda(monkeypatch):
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ConfigError, match="optim.impl"):
        AdamW(p, impl="cuda")
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ConfigError, match="CUDA"):
            AdamW(p, impl="triton")


def test_invalid_hyperparameters_raise_value_error():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError):
        AdamW(p, lr=-1.0)
    with pytest.raises(ValueError):
        AdamW(p, betas=(0.9, 1.0))


@pytest.mark.parametrize("cls,ref,wd", [(AdamW, torch.optim.AdamW, 0.1), (Adam, torch.optim.Adam, 0.0)])
def test_triton_impl_under_the_interpreter_matches_torch(monkeypatch, cls, ref, wd):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kw = dict(lr=3e-2, betas=(0.9, 0.95), weight_decay=wd)
    assert max_trajectory_diff(lambda p: cls(p, impl="triton", **kw), lambda p: ref(p, foreach=False, **kw), steps=20) < 1e-6


def test_triton_impl_refuses_what_the_kernel_lacks(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ConfigError, match="amsgrad"):
        AdamW(p, impl="triton", amsgrad=True)
    with pytest.raises(ConfigError, match="optim=adamw"):
        Adam(p, impl="triton", weight_decay=0.1)


@pytest.mark.parametrize("impl", ["foreach", "fused"])
@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_fast_paths_equal_the_eager_update_rule(cls, impl):
    kw = dict(lr=2e-2, betas=(0.8, 0.9), weight_decay=0.05, amsgrad=True)
    assert max_trajectory_diff(lambda p: cls(p, impl=impl, **kw), lambda p: cls(p, impl="eager", **kw), steps=25) < 1e-6
