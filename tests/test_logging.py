"""W&B modes and the loss plot."""

from __future__ import annotations

import json

import pytest

from llmtrain.cli import compose
from llmtrain.logging import wandb_logged_in
from llmtrain.trainer import Trainer

from conftest import tiny_overrides


def test_wandb_auto_is_offline_without_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_logged_in()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    assert wandb_logged_in()
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert wandb_logged_in()


@pytest.mark.slow
def test_wandb_offline_run_logs_and_resumes_same_id(corpus, data_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    run = tmp_path / "run"
    extra = {"logger.wandb.mode": "auto", "train.max_steps": 4, "train.eval_every": 2, "train.save_every": 2}
    summary = Trainer(compose(tiny_overrides(corpus, data_cache, run, **extra)), run).fit()
    assert summary["status"] == "completed"
    assert "wandb sync" in capsys.readouterr().out
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))
    run_id = offline[0].name.rsplit("-", 1)[-1]
    state_id = __import__("torch").load(run / "checkpoints" / "step_4" / "trainer.pt", weights_only=True)["wandb_run_id"]
    assert state_id == run_id
    # Resuming continues the same W&B run.
    extra["train.max_steps"] = 6
    Trainer(compose(tiny_overrides(corpus, data_cache, run, **extra)), run).fit()
    assert {p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")} == {run_id}


def test_loss_plot_written_at_eval(corpus, data_cache, tmp_path):
    run = tmp_path / "run"
    extra = {"logger.plot": "true", "train.max_steps": 4, "train.eval_every": 2}
    Trainer(compose(tiny_overrides(corpus, data_cache, run, **extra)), run).fit()
    png = (run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
