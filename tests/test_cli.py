"""The CLI as a user runs it: a Hydra multirun sweep and the console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, tiny_overrides, torchrun_env


# A stand-in ``wandb`` package for subprocesses: it records init's arguments beside the run.
FAKE_WANDB = """
import json, os
Settings = dict
class _Run:
    id, summary = "fake1", {}
    def log(self, row, step=None): pass
    def finish(self): pass
def init(**kw):
    with open(os.path.join(kw["dir"], "wandb_init.json"), "w") as f:
        json.dump({k: kw[k] for k in ("name", "group", "mode")}, f)
    return _Run()
"""


@pytest.mark.slow
def test_multirun_sweep_writes_one_run_per_job(corpus, data_cache, tmp_path):
    sweep = tmp_path / "sweep"
    (tmp_path / "fake" / "wandb").mkdir(parents=True)
    (tmp_path / "fake" / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    extra = {"train.max_steps": 3, "train.eval_every": 3, "logger.wandb.mode": "auto"}
    args = [o for o in tiny_overrides(corpus, data_cache, tmp_path, **extra) if not o.startswith("run_dir=")]
    cmd = [sys.executable, "-m", "llmtrain", "-m", "optim=adamw,lion", f"hydra.sweep.dir={sweep}", *args]
    fake_first = os.pathsep.join([str(tmp_path / "fake"), str(REPO)])
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_API_KEY": "not-a-key", "PYTHONPATH": fake_first}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = {json.loads((sweep / n / "summary.json").read_text())["optimizer"] for n in ("0", "1")}
    assert summaries == {"adamw", "lion"}
    headers = [line for line in result.stdout.splitlines() if line.startswith("[job ")]
    assert headers == ["[job 1/2] optim=adamw", "[job 2/2] optim=lion"]
    assert "\r" not in result.stdout + result.stderr
    inits = [json.loads((sweep / n / "wandb_init.json").read_text()) for n in ("0", "1")]
    assert [i["mode"] for i in inits] == ["offline", "offline"]  # WANDB_MODE, not "logged in or not"
    assert [i["group"] for i in inits] == ["sweep", "sweep"]  # the sweep folder, as llmtrain-report's group
    names = [i["name"] for i in inits]
    assert [n.split(" ")[0] for n in names] == ["llama_tiny_adamw", "llama_tiny_lion"]
    assert all("model.n_layers=2" in n and len(n) <= 128 for n in names), names
    assert not any(word in n for n in names for word in (" optim=", "logger.", "cache_dir", "run_dir")), names


def test_console_script_is_installed():
    exe = shutil.which("llmtrain")
    assert exe, "pip install -e . should put llmtrain on PATH"
    result = subprocess.run([exe, "schedule.name=nope"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: schedule.name")


def test_an_error_line_is_one_write(monkeypatch):
    """Every rank of a torchrun job prints its refusal to the same pipe; print() writes the message
    and its newline separately, so two ranks' lines could run together ("...run_direrror: ...")."""
    from llmtrain.console import print_error
    from llmtrain.errors import ConfigError

    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)
            return len(text)

        def flush(self):
            writes.append(None)

    monkeypatch.setattr(sys, "stderr", Recorder())
    print_error(ConfigError("train.max_steps", "got -1, expected > 0"))
    assert writes == ["error: train.max_steps: got -1, expected > 0\n", None]


def test_a_run_with_run_dir_leaves_nothing_in_the_working_directory(corpus, data_cache, tmp_path):
    """With run_dir set, Hydra's own outputs/DATE/TIME/.hydra folder was still made in the working
    directory on every invocation, refused starts included."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "llmtrain", *tiny_overrides(corpus, data_cache, run, **{"train.max_steps": 2})]
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=torchrun_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run / "summary.json").is_file() and not (run / ".hydra").exists()
    assert list(cwd.iterdir()) == []
