"""One line of history per run directory: rollback sets aside and never deletes, resume=never and
foreign checkpoints cannot start a second line, a finished run started again changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmtrain.errors import UserError

from test_lifecycle_resume import rows, snapshot, trainer


def steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))


def test_rollback_sets_the_newer_line_aside_and_auto_follows_the_new_one(corpus, data_cache, tmp_path, capsys):
    run = tmp_path / "run"
    trainer(corpus, data_cache, run, **{"train.max_steps": 8, "train.keep_checkpoints": 2}).fit()
    assert steps(run) == [6, 8]
    old_rows = [r for r in rows(run) if "loss" in r]
    # Roll back to step 6 and train 2 steps of a new line, saving every step: keep_checkpoints=2 must
    # prune the old line's step 6 after the new 7 and 8 exist, never the new ones.
    t = trainer(corpus, data_cache, run, resume=f"'{run / 'checkpoints' / 'step_6'}'",
                **{"train.max_steps": 8, "train.keep_checkpoints": 2, "train.save_every": 1, "optim.lr": 1e-3})
    assert t.step == 6
    t.fit()
    out = capsys.readouterr()
    assert "rolled back to step_6" in out.out + out.err
    assert steps(run) == [7, 8]
    (aside,) = (run / "abandoned").glob("*rollback-to-step_6*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step_8"]
    abandoned_rows = [json.loads(line) for line in (aside / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in abandoned_rows if "loss" in r] == [7, 8]
    assert [r["loss"] for r in abandoned_rows if "loss" in r] == [r["loss"] for r in old_rows[6:]]
    now = [r for r in rows(run) if "loss" in r]
    assert [r["step"] for r in now] == list(range(1, 9))  # one line, no duplicate steps
    assert [r["lr"] for r in now[6:]] == [1e-3, 1e-3]
    # resume=auto continues the new line (its step 8), not the abandoned one
    t = trainer(corpus, data_cache, run, **{"train.max_steps": 9, "train.keep_checkpoints": 2, "optim.lr": 1e-3})
    assert t.step == 8 and t.optimizer.param_groups[0]["initial_lr"] == 1e-3


def test_resume_never_in_a_run_dir_with_checkpoints_is_refused(corpus, data_cache, tmp_path):
    run = tmp_path / "run"
    trainer(corpus, data_cache, run).fit()
    before = snapshot(run)
    refusal = r"^resume: never, but .* already holds checkpoints \(newest step_4\); use a new run_dir"
    with pytest.raises(UserError, match=refusal):
        trainer(corpus, data_cache, run, resume="never")
    assert snapshot(run) == before


def test_a_checkpoint_of_another_run_cannot_start_a_second_line(corpus, data_cache, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    trainer(corpus, data_cache, a).fit()
    trainer(corpus, data_cache, b).fit()
    before = snapshot(b)
    with pytest.raises(UserError, match="belongs to another run"):
        trainer(corpus, data_cache, b, resume=f"'{a / 'checkpoints' / 'step_2'}'", **{"train.max_steps": 6})
    assert snapshot(b) == before
    # into a fresh run_dir it is a fork, as before
    fork = trainer(corpus, data_cache, tmp_path / "fork", resume=f"'{a / 'checkpoints' / 'step_2'}'")
    assert fork.step == 2


def test_rows_logged_after_the_last_checkpoint_are_set_aside_not_deleted(corpus, data_cache, tmp_path):
    run = tmp_path / "run"
    trainer(corpus, data_cache, run).fit()
    with open(run / "metrics.jsonl", "a") as f:  # a crash after logging steps 5 and 6 but before saving
        for step in (5, 6):
            f.write(json.dumps({"step": step, "loss": 1.0, "lr": 0.0}) + "\n")
    trainer(corpus, data_cache, run, **{"train.max_steps": 5}).fit()
    (aside,) = (run / "abandoned").glob("*after-step_4*")
    assert [json.loads(line)["step"] for line in (aside / "metrics.jsonl").read_text().splitlines()] == [5, 6]
    assert [r["step"] for r in rows(run) if "loss" in r] == [1, 2, 3, 4, 5]


def test_a_finished_run_started_again_says_so_and_changes_nothing(corpus, data_cache, tmp_path, capsys):
    run = tmp_path / "run"
    summary = trainer(corpus, data_cache, run).fit()
    before = snapshot(run)
    capsys.readouterr()
    again = trainer(corpus, data_cache, run).fit()
    assert "already finished at step 4" in capsys.readouterr().out
    assert again == json.loads(json.dumps(summary))
    assert snapshot(run) == before
