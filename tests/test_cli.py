"""The CLI as a user runs it: a Hydra multirun sweep and the console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, tiny_overrides


@pytest.mark.slow
def test_multirun_sweep_writes_one_run_per_job(corpus, data_cache, tmp_path):
    sweep = tmp_path / "sweep"
    args = [o for o in tiny_overrides(corpus, data_cache, tmp_path, **{"train.max_steps": 3, "train.eval_every": 3})
            if not o.startswith("run_dir=")]
    cmd = [sys.executable, "-m", "llmtrain", "-m", "optim=adamw,lion", f"hydra.sweep.dir={sweep}", *args]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = {json.loads((sweep / n / "summary.json").read_text())["optimizer"] for n in ("0", "1")}
    assert summaries == {"adamw", "lion"}


def test_console_script_is_installed():
    exe = shutil.which("llmtrain")
    assert exe, "pip install -e . should put llmtrain on PATH"
    result = subprocess.run([exe, "schedule.name=nope"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: schedule.name")
