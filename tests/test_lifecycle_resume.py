"""Resume that obeys the user: refused changes in one line, applied changes recorded, config history,
and model.init_from from an llmtrain checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from llmtrain.cli import compose
from llmtrain.errors import UserError
from llmtrain.trainer import Trainer

from conftest import tiny_overrides

BASE = {"train.max_steps": 4, "train.save_every": 2, "train.keep_checkpoints": 5, "train.eval_every": 0,
        "optim.lr": 2e-3, "schedule.name": "constant",
        "schedule.warmup_steps": 0}


def trainer(corpus, cache, run, **extra) -> Trainer:
    return Trainer(compose(tiny_overrides(corpus, cache, run, **{**BASE, **extra})), run)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run directory but the lock (whose holder record each start rewrites)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture
def finished(corpus, data_cache, tmp_path) -> Path:
    run = tmp_path / "run"
    trainer(corpus, data_cache, run).fit()
    return run


def test_changed_lr_and_weight_decay_apply_and_are_recorded(corpus, data_cache, finished, capsys):
    t = trainer(corpus, data_cache, finished, **{"train.max_steps": 6, "optim.lr": 5e-4, "optim.weight_decay": 0.3})
    decaying = [g for g in t.optimizer.param_groups if g["weight_decay"] > 0]
    assert decaying and all(g["weight_decay"] == 0.3 for g in decaying)
    assert all(g["initial_lr"] == 5e-4 for g in t.optimizer.param_groups)
    t.fit()
    out = capsys.readouterr()
    assert "config change on resume: optim.lr 0.002 -> 0.0005" in out.out + out.err
    after = [r for r in rows(finished) if "loss" in r and r["step"] > 4]
    assert [r["lr"] for r in after] == [5e-4, 5e-4]  # constant schedule: the new peak, not the saved one
    change = next(r for r in rows(finished) if "config_change" in r)
    assert change["step"] == 4
    assert change["config_change"]["optim.lr"] == [2e-3, 5e-4]
    assert change["config_change"]["optim.weight_decay"] == [0.1, 0.3]
    assert change["config_change"]["train.max_steps"] == [4, 6]
    assert yaml.safe_load((finished / "config.yaml").read_text())["optim"]["lr"] == 5e-4
    kept = yaml.safe_load((finished / "config.until_step_4.yaml").read_text())
    assert kept["optim"]["lr"] == 2e-3
    assert yaml.safe_load((finished / "checkpoints" / "step_6" / "config.yaml").read_text())["optim"]["lr"] == 5e-4
    assert json.loads((finished / "summary.json").read_text())["lr"] == 5e-4


def test_max_steps_change_says_what_happens_to_the_lr(corpus, data_cache, tmp_path, capsys):
    run = tmp_path / "run"
    trainer(corpus, data_cache, run, **{"schedule.name": "cosine"}).fit()
    capsys.readouterr()
    trainer(corpus, data_cache, run, **{"schedule.name": "cosine", "train.max_steps": 40})
    out = capsys.readouterr()
    line = next(x for x in (out.out + out.err).splitlines() if "train.max_steps" in x)
    assert "4 -> 40" in line and "lr at step 4: 2.000e-04 -> " in line


@pytest.mark.parametrize("override,key", [
    ({"optim": "lion"}, "optim.name 'adamw' -> 'lion'"),
    ({"optim": "sgd"}, "optim.name 'adamw' -> 'sgd'"),
    ({"optim": "muon"}, "optim.name 'adamw' -> 'muon'"),
    ({"model.n_layers": 3}, "model.n_layers 2 -> 3"),
    ({"train.seq_len": 16}, "train.seq_len 32 -> 16"),
    ({"data.vocab_size": 320}, "data.vocab_size 384 -> 320"),
])
def test_changes_that_cannot_apply_are_refused_in_one_line(corpus, data_cache, finished, override, key):
    before = snapshot(finished)
    extra = {k: v for k, v in override.items()}
    if "optim" in extra:
        extra["optim.lr"] = 1e-3
    with pytest.raises(UserError) as err:
        trainer(corpus, data_cache, finished, **{"train.max_steps": 6, **extra})
    message = str(err.value)
    assert "\n" not in message and message.startswith("resume: step_4")
    assert key in message and "model.init_from=" in message
    assert snapshot(finished) == before


def test_init_from_an_llmtrain_checkpoint_starts_a_new_run_with_any_optimizer(corpus, data_cache, finished, tmp_path):
    ckpt = finished / "checkpoints" / "step_4"
    t = trainer(corpus, data_cache, tmp_path / "new", optim="lion",
                **{"optim.lr": 1e-4, "model.init_from": f"'{ckpt}'"})
    saved = torch.load(ckpt / "model.pt", weights_only=True)
    for name, value in t.model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert t.step == 0 and not t.optimizer.state
    t.fit()
    assert [r["step"] for r in rows(tmp_path / "new") if "loss" in r] == [1, 2, 3, 4]


def test_init_from_a_checkpoint_of_another_shape_is_one_line(corpus, data_cache, finished, tmp_path):
    with pytest.raises(UserError, match=r"model.init_from: .*step_4 has n_layers=2 but model.n_layers=3"):
        trainer(corpus, data_cache, tmp_path / "new", **{"model.n_layers": 3,
                                                         "model.init_from": f"'{finished / 'checkpoints' / 'step_4'}'"})
