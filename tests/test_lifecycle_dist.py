"""The run lifecycle across ranks (torchrun, gloo, CPU): a signal on one rank stops them all at the same
step, a damaged shard is caught by the rank that checks it and every rank falls back together, a
failed shard write is one line on every rank, and a second job on a run_dir is refused on every rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from llmtrain import checkpoint_store

from conftest import REPO, tiny_overrides, torchrun_env
from test_distributed import TIMEOUT, TORCHRUN, free_port
from test_lifecycle_process import hold_lock

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def args(corpus, cache, run, **extra) -> list[str]:
    base = {"train.micro_batch_size": 2, "train.eval_every": 0, "train.save_every": 2, "train.keep_checkpoints": 5,
            "distributed.strategy": "fsdp", "schedule.name": "constant", "schedule.warmup_steps": 0,
            "train.max_steps": 4}
    return tiny_overrides(corpus, cache, run, **{**base, **extra})


def torchrun(argv: list[str], script: str = "-m llmtrain", **kw) -> subprocess.Popen:
    cmd = [*TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", *script.split(), *argv]
    return subprocess.Popen(cmd, cwd=REPO, env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out + err


def worker_pids(agent: int) -> dict[int, int]:
    """RANK -> pid of torchrun's workers."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent and "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(corpus, data_cache, tmp_path):
    run = tmp_path / "run"
    proc = torchrun(args(corpus, data_cache, run, **{"train.max_steps": 100000, "train.save_every": 0}))
    metrics = run / "metrics.jsonl"
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    pids = worker_pids(proc.pid)
    os.kill(pids[1], signal.SIGUSR1)  # only rank 1 hears it, as a node-local signal would
    code, out = finish(proc)
    assert code != 0, out[-3000:]
    assert "exitcode  : 138" in out or "exit code 138" in out or "exitcode: 138" in out, out[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["signal"] == "SIGUSR1" and summary["world_size"] == 2
    ckpt = run / "checkpoints" / f"step_{summary['steps']}"
    assert (ckpt / "dcp" / ".metadata").is_file() and checkpoint_store.verify(ckpt) is None


def test_a_damaged_shard_is_set_aside_on_every_rank(corpus, data_cache, tmp_path):
    run = tmp_path / "run"
    code, out = finish(torchrun(args(corpus, data_cache, run)))
    assert code == 0, out[-3000:]
    shard = run / "checkpoints" / "step_4" / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, out = finish(torchrun(args(corpus, data_cache, run, **{"train.max_steps": 6})))
    assert code == 0, out[-3000:]
    assert "step_4 is damaged: hash mismatch in dcp/__1_0.distcp" in out
    assert "resumed from" in out and "step_2 at step 2" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2", "step_4", "step_6"]
    assert list((run / "abandoned").glob("*damaged-step_4/checkpoints/step_4/dcp/__1_0.distcp"))


FULL_DISK_ON_RANK_1 = """
import errno, os
import torch.distributed.checkpoint.filesystem as fs
import llmtrain.trainer as trainer
from llmtrain.cli import main

original = fs.FileSystem.create_stream
state = {}

def create_stream(self, path, mode):
    if os.environ["RANK"] == "1" and state.get("step") == 4 and "w" in mode:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return original(self, path, mode)

original_save = trainer.Trainer.save

def save(self):
    state["step"] = self.step
    return original_save(self)

fs.FileSystem.create_stream = create_stream
trainer.Trainer.save = save
main()
"""


def test_a_full_disk_on_one_rank_is_one_line_on_every_rank(corpus, data_cache, tmp_path):
    run = tmp_path / "run"
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK_ON_RANK_1)
    code, out = finish(torchrun(args(corpus, data_cache, run, **{"train.max_steps": 6}), script=str(script)))
    assert code != 0
    errors = [line for line in out.splitlines() if line.startswith("error: checkpoints: saving step_4 failed")]
    assert len(errors) == 2, out[-4000:]  # rank 0 and rank 1, the same line
    assert "No space left on device" in errors[0] and "step_2 is untouched" in errors[0]
    assert "Traceback" not in out.split("failed (exitcode")[0]  # only torchrun's own report follows
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_2"] and checkpoint_store.verify(root / "step_2") is None


def test_a_second_job_on_a_run_dir_is_refused_on_every_rank(corpus, data_cache, tmp_path):
    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        code, out = finish(torchrun(args(corpus, data_cache, run)))
    finally:
        holder.kill()
        holder.wait()
    assert code != 0
    refusals = [line for line in out.splitlines() if line.startswith(f"error: run_dir: {run} is in use")]
    assert len(refusals) == 2 and f"pid {holder.pid}" in refusals[0], out[-3000:]
    assert not (run / "metrics.jsonl").exists()
