"""Adafactor against transformers.optimization.Adafactor in every mode."""

from __future__ import annotations

import pytest
import torch
from transformers.optimization import Adafactor as HFAdafactor

from llmtrain.optim.adafactor import Adafactor
from llmtrain.optim.protocol import state_bytes
from optim_parity import assert_state_dict_round_trip, max_trajectory_diff, moved

MODES = [
    dict(lr=1e-2, scale_parameter=False),
    dict(lr=1e-2, scale_parameter=True, beta1=0.9, weight_decay=0.01),
    dict(relative_step=True, scale_parameter=True),
    dict(relative_step=True, warmup_init=True, clip_threshold=0.5),
]


@pytest.mark.parametrize("kw", MODES)
def test_matches_transformers(kw):
    ref_kw = dict(kw, relative_step=kw.get("relative_step", False))
    if ref_kw["relative_step"]:
        ref_kw["lr"] = None
    ours = lambda p: Adafactor(p, **kw)  # noqa: E731
    assert max_trajectory_diff(ours, lambda p: HFAdafactor(p, **ref_kw), steps=25) < 1e-6
    assert moved(ours) > 1e-5


def test_round_trip():
    assert_state_dict_round_trip(lambda p: Adafactor(p, lr=1e-2, beta1=0.9))


def test_factored_state_is_tiny():
    p = torch.nn.Parameter(torch.randn(256, 512))
    opt = Adafactor([p], lr=1e-2)
    p.grad = torch.randn_like(p)
    opt.step()
    per_param = state_bytes(opt) / p.numel()
    assert per_param < 0.05  # (256 + 512) floats + step RMS, vs 4 for a full second moment
    assert Adafactor.state_bytes_per_param < 0.1


@pytest.mark.parametrize("shape", [(8192, 3), (384, 5), (48, 4), (5, 4), (4099, 2), (2, 12288, 3)])
def test_blocked_column_mean_equals_mean(shape):
    """Column means summed in row blocks (a faster CPU kernel) equal mean(dim=-2): 64-row blocks,
    32- or 16-row blocks, none (5 rows; 4099 is prime), and with a leading batch dimension."""
    from llmtrain.optim.adafactor import _mean_over_rows

    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(_mean_over_rows(x), x.mean(dim=-2), rtol=1e-12, atol=0)
