"""Optimizers that need more than step(): the trainer serves them through the hook protocol."""

from __future__ import annotations

import json

import pytest

from llmtrain.cli import compose
from llmtrain.trainer import Trainer

from conftest import tiny_overrides


def _fit(corpus, cache, run, **extra):
    return Trainer(compose(tiny_overrides(corpus, cache, run, **extra)), run).fit()


def _losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("optim,extra", [
    ("sam", {"optim.lr": 3e-3}),                                           # requires_closure
    ("sophia", {"optim.lr": 3e-3, "optim.hess_interval": 2}),              # after_step: Hessian refresh
    ("schedulefree_adamw", {"schedule": "constant", "schedule.warmup_steps": 0}),  # train()/eval()
    ("lbfgs", {"optim.lr": 1.0, "train.max_steps": 4}),                    # closure, several evaluations
])
def test_hook_optimizers_train_through_the_trainer(corpus, data_cache, tmp_path, optim, extra):
    run = tmp_path / optim
    summary = _fit(corpus, data_cache, run, optim=optim, **{"train.max_steps": 8, **extra})
    assert summary["status"] == "completed", summary
    losses = _losses(run)
    assert losses[-1] < losses[0], losses


def test_schedulefree_checkpoint_resume_is_bitwise(corpus, data_cache, tmp_path):
    """Checkpoints hold Schedule-Free's evaluation weights; resuming from them continues exactly."""
    extra = {"optim": "schedulefree_adamw", "schedule": "constant", "schedule.warmup_steps": 0,
             "train.max_steps": 8, "train.save_every": 4, "train.keep_checkpoints": 4, "train.eval_every": 4}
    full = tmp_path / "full"
    _fit(corpus, data_cache, full, **extra)
    resumed = tmp_path / "resumed"
    _fit(corpus, data_cache, resumed, resume=f"'{full / 'checkpoints' / 'step_4'}'", **extra)
    assert _losses(full)[4:] == _losses(resumed)
