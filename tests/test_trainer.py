"""The training loop: accumulation, clipping, resume, non-finite steps, run-directory files."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmtrain.cli import compose
from llmtrain.trainer import Trainer, resolve_precision

from conftest import REPO, tiny_overrides


def make_trainer(corpus, cache, run_dir, **extra) -> Trainer:
    cfg = compose(tiny_overrides(corpus, cache, run_dir, **extra))
    return Trainer(cfg, run_dir)


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def test_precision_auto_is_fp32_on_cpu():
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16


def test_accumulation_equals_full_batch(corpus, data_cache, tmp_path):
    """4 micro-batches of 2 == 1 batch of 8: same loss and same weights after a step (fp32)."""
    common = {"train.max_steps": 1, "train.eval_every": 0, "train.grad_clip": 1.0, "optim.weight_decay": 0.1}
    full = make_trainer(corpus, data_cache, tmp_path / "full", **common)
    accum = make_trainer(corpus, data_cache, tmp_path / "accum", **{**common, "train.micro_batch_size": 2})
    assert accum.accum_steps == 4 and full.accum_steps == 1
    row_full, row_accum = full.train_step(), accum.train_step()
    assert row_accum["loss"] == pytest.approx(row_full["loss"], abs=1e-6)
    assert row_accum["grad_norm"] == pytest.approx(row_full["grad_norm"], rel=1e-5)
    for (name, a), (_, b) in zip(full.model.state_dict().items(), accum.model.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_clipping_logs_preclip_norm_and_scales_gradients(corpus, data_cache, tmp_path):
    trainer = make_trainer(corpus, data_cache, tmp_path / "run", **{"train.grad_clip": 0.01})
    batch = [tuple(trainer.data.train.next_batch())]
    trainer.forward_backward(batch)
    unclipped = torch.sqrt(sum(p.grad.pow(2).sum() for p in trainer.model.parameters()))
    reported = trainer.clip_gradients()
    clipped = torch.sqrt(sum(p.grad.pow(2).sum() for p in trainer.model.parameters()))
    assert float(reported) == pytest.approx(float(unclipped), rel=1e-5)
    assert float(unclipped) > 0.01
    assert float(clipped) == pytest.approx(0.01, rel=1e-3)


def test_grad_clip_zero_disables_clipping(corpus, data_cache, tmp_path):
    trainer = make_trainer(corpus, data_cache, tmp_path / "run", **{"train.grad_clip": 0})
    trainer.forward_backward([tuple(trainer.data.train.next_batch())])
    before = [p.grad.clone() for p in trainer.model.parameters()]
    trainer.clip_gradients()
    for b, p in zip(before, trainer.model.parameters()):
        assert torch.equal(b, p.grad)


def test_run_directory_files_and_metric_keys(corpus, data_cache, tmp_path):
    run = tmp_path / "run"
    summary = make_trainer(corpus, data_cache, run, **{"logger.plot": "true", "train.save_every": 5}).fit()
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "tokenizer.json"):
        assert (run / name).is_file(), name
    train_rows, eval_rows = read_metrics(run)
    assert [r["step"] for r in train_rows] == list(range(1, 11))
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "peak_mem_bytes"):
        assert all(key in r for r in train_rows), key
    assert [r["step"] for r in eval_rows] == [5, 10] and all(math.isfinite(r["val_loss"]) for r in eval_rows)
    assert train_rows[-1]["tokens"] == 10 * 8 * 32
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["status"] == "completed" and on_disk == json.loads(json.dumps(summary))
    for key in ("optimizer_state_bytes", "params", "tokens_per_s", "mfu", "final_val_loss"):
        assert key in on_disk
    # AdamW keeps two fp32 moments per parameter.
    assert on_disk["optimizer_state_bytes_per_param"] == pytest.approx(8.0, rel=0.01)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_10", "step_5"]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]


def test_resume_is_bitwise_identical(corpus, data_cache, tmp_path):
    """Resume from the step-6 checkpoint in a fresh trainer: steps 7..12 match bit for bit."""
    extra = {"train.max_steps": 12, "train.save_every": 6, "train.keep_checkpoints": 5, "train.eval_every": 4}
    full = tmp_path / "full"
    make_trainer(corpus, data_cache, full, **extra).fit()
    resumed = tmp_path / "resumed"
    make_trainer(corpus, data_cache, resumed, **extra, resume=f"'{full / 'checkpoints' / 'step_6'}'").fit()
    a, a_eval = read_metrics(full)
    b, b_eval = read_metrics(resumed)
    assert [r["step"] for r in b] == list(range(7, 13))
    assert [r["loss"] for r in a[6:]] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a[6:]] == [r["grad_norm"] for r in b]
    assert [r["val_loss"] for r in a_eval if r["step"] > 6] == [r["val_loss"] for r in b_eval]


def test_nonfinite_loss_skips_the_step(corpus, data_cache, tmp_path, monkeypatch):
    trainer = make_trainer(corpus, data_cache, tmp_path / "run", **{"train.max_steps": 4})
    real = trainer.forward_backward
    poisoned_steps = {1}

    def poisoned(micro):
        loss = real(micro)
        if trainer.step in poisoned_steps:
            for p in trainer.model.parameters():
                p.grad.fill_(float("nan"))
            return loss * float("nan")
        return loss

    monkeypatch.setattr(trainer, "forward_backward", poisoned)
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    row = trainer.train_step()
    assert row["skipped"] and trainer.nonfinite_total == 1
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(before[k], v), k
    assert not trainer.train_step()["skipped"] and trainer.nonfinite_streak == 0


def test_nonfinite_streak_stops_with_checkpoint(corpus, data_cache, tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer = make_trainer(corpus, data_cache, run, **{"train.max_steps": 20, "train.max_nonfinite_in_a_row": 3})
    real = trainer.forward_backward
    monkeypatch.setattr(trainer, "forward_backward", lambda micro: real(micro) * float("nan"))
    summary = trainer.fit()
    assert summary["status"] == "diverged" and summary["steps"] == 3
    assert "3 non-finite" in summary["reason"]
    assert (run / "checkpoints" / "step_3" / "COMPLETE").is_file()


def _cli(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "llmtrain", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_resume_continues(corpus, data_cache, tmp_path):
    run = tmp_path / "run"
    args = tiny_overrides(corpus, data_cache, run, **{"train.max_steps": 100000, "train.eval_every": 0})
    proc = _cli(args)
    deadline = time.time() + 120
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err  # a scheduler must not take it for a finished run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped" and "SIGTERM" in summary["reason"] and summary["signal"] == "SIGTERM"
    step = summary["steps"]
    assert (run / "checkpoints" / f"step_{step}" / "COMPLETE").is_file()
    assert "resume=auto" in out + err
    # resume=auto (the default) picks the checkpoint up and goes on.
    proc = _cli(tiny_overrides(corpus, data_cache, run, **{"train.max_steps": step + 2, "train.eval_every": 0}))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-3:] == [step, step + 1, step + 2]
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_keep_fp32_master_weights(corpus, data_cache, tmp_path, precision):
    trainer = make_trainer(corpus, data_cache, tmp_path / "run", **{"train.precision": precision, "train.max_steps": 3,
                                                                    "train.eval_every": 0})
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    summary = trainer.fit()
    assert summary["status"] == "completed" and math.isfinite(summary["final_loss"])
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
