"""llmtrain.schedules.lr_factor equals transformers' schedules at every step, plus hand values."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import optimization as hf

from llmtrain.errors import ConfigError
from llmtrain.schedules import SCHEDULE_NAMES, lr_factor

GRID = [(0, 50), (10, 110), (7, 40), (1, 3), (24, 25)]  # (warmup, total)


def hf_lambda(make, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return make(opt, **kw).lr_lambdas[0]


def assert_every_step(ours, theirs, steps):
    for s in steps:
        assert ours(s) == pytest.approx(theirs(s), abs=1e-12), s


@pytest.mark.parametrize("warmup,total", GRID)
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1, 0.5])
def test_cosine_matches_transformers(warmup, total, min_lr_ratio):
    if min_lr_ratio == 0.0:
        theirs = hf_lambda(hf.get_cosine_schedule_with_warmup, num_warmup_steps=warmup, num_training_steps=total)
    else:
        theirs = hf_lambda(hf.get_cosine_with_min_lr_schedule_with_warmup, num_warmup_steps=warmup,
                           num_training_steps=total, min_lr_rate=min_lr_ratio)
    ours = lambda s: lr_factor("cosine", s, total_steps=total, warmup_steps=warmup, min_lr_ratio=min_lr_ratio)  # noqa: E731
    assert_every_step(ours, theirs, range(total + 1))
    # past the end transformers' cosine climbs back up; ours stays at the floor
    assert ours(total + 7) == pytest.approx(min_lr_ratio)


# (warmup, total, decay_ratio) where warmup ends before the decay window starts
WSD_GRID = [(w, t, r) for w, t in [(0, 100), (10, 100), (5, 37), (0, 10)] for r in (0.1, 0.2, 0.5, 1.0)
            if t - round(r * t) >= w]


@pytest.mark.parametrize("warmup,total,decay_ratio", WSD_GRID)
@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1])
def test_wsd_matches_transformers(warmup, total, decay_ratio, shape, min_lr_ratio):
    decay = round(decay_ratio * total)
    theirs = hf_lambda(hf.get_wsd_schedule, num_warmup_steps=warmup, num_decay_steps=decay, num_training_steps=total,
                       decay_type=shape, min_lr_ratio=min_lr_ratio)
    ours = lambda s: lr_factor("wsd", s, total_steps=total, warmup_steps=warmup, min_lr_ratio=min_lr_ratio,  # noqa: E731
                               decay_ratio=decay_ratio, decay_shape=shape)
    # transformers' WSD warms up from min_lr_ratio; ours (like every schedule here) from 0
    start = warmup if min_lr_ratio else 0
    assert_every_step(ours, theirs, range(start, total + 20))
    for s in range(warmup):
        assert ours(s) == pytest.approx(s / warmup)


@pytest.mark.parametrize("warmup,total", GRID)
def test_linear_constant_restarts_match_transformers(warmup, total):
    kw = dict(total_steps=total, warmup_steps=warmup)
    assert_every_step(lambda s: lr_factor("linear", s, **kw),
                      hf_lambda(hf.get_linear_schedule_with_warmup, num_warmup_steps=warmup, num_training_steps=total),
                      range(total + 5))
    assert_every_step(lambda s: lr_factor("constant", s, **kw),
                      hf_lambda(hf.get_constant_schedule_with_warmup, num_warmup_steps=warmup), range(total + 5))
    for cycles in (1, 3):
        assert_every_step(lambda s: lr_factor("cosine_restarts", s, num_cycles=cycles, **kw),
                          hf_lambda(hf.get_cosine_with_hard_restarts_schedule_with_warmup, num_warmup_steps=warmup,
                                    num_training_steps=total, num_cycles=cycles),
                          range(total + 5))


@pytest.mark.parametrize("warmup", [1, 10, 100])
def test_inv_sqrt_matches_transformers(warmup):
    theirs = hf_lambda(hf.get_inverse_sqrt_schedule, num_warmup_steps=warmup)
    assert_every_step(lambda s: lr_factor("inv_sqrt", s, total_steps=10_000, warmup_steps=warmup), theirs, range(0, 5000, 7))


def test_hand_values():
    cos = lambda s: lr_factor("cosine", s, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)  # noqa: E731
    assert [cos(0), cos(5), cos(10), cos(60), cos(110), cos(500)] == pytest.approx([0.0, 0.5, 1.0, 0.55, 0.1, 0.1])
    wsd = lambda s, shape: lr_factor("wsd", s, total_steps=100, warmup_steps=10, min_lr_ratio=0.1,  # noqa: E731
                                     decay_ratio=0.2, decay_shape=shape)
    assert [wsd(5, "linear"), wsd(50, "linear"), wsd(80, "linear"), wsd(90, "linear"), wsd(100, "linear")] == pytest.approx(
        [0.5, 1.0, 1.0, 0.55, 0.1])
    assert wsd(90, "cosine") == pytest.approx(0.55)
    assert wsd(95, "cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert wsd(90, "1-sqrt") == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    lin = lambda s: lr_factor("linear", s, total_steps=20, warmup_steps=0, min_lr_ratio=0.0)  # noqa: E731
    assert [lin(0), lin(10), lin(20), lin(30)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert lr_factor("inv_sqrt", 400, total_steps=1000, warmup_steps=100) == pytest.approx(0.5)
    assert lr_factor("inv_sqrt", 10_000, total_steps=100_000, warmup_steps=100, min_lr_ratio=0.2) == pytest.approx(0.2)
    rs = lambda s: lr_factor("cosine_restarts", s, total_steps=40, num_cycles=4)  # noqa: E731
    assert [rs(0), rs(5), rs(10), rs(15), rs(40)] == pytest.approx([1.0, 0.5, 1.0, 0.5, 0.0])


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_every_schedule_warms_up_from_zero_and_stays_in_range(name):
    values = [lr_factor(name, s, total_steps=200, warmup_steps=20, min_lr_ratio=0.1, num_cycles=3) for s in range(260)]
    assert values[0] == 0.0 and values[20] == pytest.approx(1.0)
    assert all(0.0 <= v <= 1.0 for v in values)
    assert values[10] == pytest.approx(0.5)


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="schedule.name"):
        lr_factor("cosin", 0, total_steps=10)
    with pytest.raises(ConfigError, match="schedule.decay_shape"):
        lr_factor("wsd", 0, total_steps=10, decay_shape="sqrt")


def test_plot_script_writes_a_png(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "plot_schedules.py"
    spec = importlib.util.spec_from_file_location("plot_schedules", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "s.png"
    module.main(["--out", str(out), "--steps", "100", "--warmup", "10"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "wsd (1-sqrt)" in table and "cosine_restarts" in table
