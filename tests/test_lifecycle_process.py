"""One run per run directory, pre-emption that schedulers understand, and start-up output, through
the real CLI (single process) and RunLock itself."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmtrain.errors import UserError
from llmtrain.run_lock import RunLock

from conftest import REPO, tiny_overrides, torchrun_env

HOLD = ("import sys, time; from llmtrain.run_lock import RunLock; RunLock.acquire(sys.argv[1]); "
        "print('held', flush=True); time.sleep(120)")


def hold_lock(run: Path) -> subprocess.Popen:
    """Another process holding the run_dir lock (returns once it holds it)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], env=torchrun_env(), stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def cli(args, cwd=REPO, **kw) -> subprocess.Popen:
    env = {**torchrun_env(), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "llmtrain", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_a_second_process_on_a_run_dir_is_refused_naming_the_holder(corpus, data_cache, tmp_path):
    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        proc = cli(tiny_overrides(corpus, data_cache, run))
        out, err = proc.communicate(timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, err
    line = err.strip()
    assert "\n" not in line and line.startswith(f"error: run_dir: {run} is in use by another llmtrain run")
    assert f"pid {holder.pid}" in line and socket.gethostname() in line
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "x"}))
    lock = RunLock.acquire(tmp_path)
    try:
        assert lock.took_over and f"pid {int(dead.stdout)}" in lock.took_over
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_a_released_lock_leaves_no_holder_to_take_over(tmp_path):
    """A run that ended cleanly is not a stale holder: the next run says nothing of a take-over."""
    RunLock.acquire(tmp_path).release()
    assert (tmp_path / ".lock").read_text() == ""
    lock = RunLock.acquire(tmp_path)
    try:
        assert lock.took_over is None
    finally:
        lock.release()


def test_another_hosts_lock_counts_while_its_heartbeat_is_fresh(tmp_path):
    """Where a filesystem's flock is node-local, the holder record still keeps a second node out."""
    path = tmp_path / ".lock"
    path.write_text(json.dumps({"host": "node-elsewhere", "pid": 4242, "started": "x"}))
    with pytest.raises(UserError, match="in use by another llmtrain run .host node-elsewhere, pid 4242"):
        RunLock.acquire(tmp_path)
    old = time.time() - 3600
    os.utime(path, (old, old))  # its heartbeat stopped an hour ago: the node died
    lock = RunLock.acquire(tmp_path)
    assert "node-elsewhere" in lock.took_over
    lock.release()


def test_the_lock_heartbeat_keeps_the_record_fresh(tmp_path, monkeypatch):
    import llmtrain.run_lock as run_lock

    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = RunLock.acquire(tmp_path)
    old = time.time() - 3600
    os.utime(tmp_path / ".lock", (old, old))
    time.sleep(0.5)
    assert time.time() - (tmp_path / ".lock").stat().st_mtime < 5
    lock.release()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT], ids=["SIGUSR1", "SIGINT"])
def test_a_signal_finishes_the_step_saves_and_exits_128_plus_n(corpus, data_cache, tmp_path, sig):
    run = tmp_path / "run"
    proc = cli(tiny_overrides(corpus, data_cache, run, **{"train.max_steps": 100000, "train.eval_every": 0}))
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["signal"] == signal.Signals(sig).name
    assert (run / "checkpoints" / f"step_{summary['steps']}" / "COMPLETE").is_file()
    assert "resume=auto" in out + err


def test_a_second_ctrl_c_aborts_at_once():
    from llmtrain.preemption import StopRequest

    before = signal.getsignal(signal.SIGINT)
    stop = StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_a_timestamped_run_dir_is_announced_as_not_resumable(corpus, data_cache, tmp_path):
    args = tiny_overrides(corpus, data_cache, tmp_path, **{"train.max_steps": 1})
    args = [a for a in args if not a.startswith("run_dir=")]
    proc = cli(args, cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "run_dir is not set" in err and "pass run_dir=PATH to make restarts resume" in err
    assert list((tmp_path / "outputs").glob("*/*/summary.json"))


def test_slurm_script_asks_for_the_warning_signal_and_requeue():
    text = (REPO / "scripts" / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text
    assert "scontrol requeue" in text and "trap" in text
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "launch" / "slurm.sbatch")]).returncode == 0


def test_the_slurm_trap_signals_only_the_training_processes(tmp_path):
    """The script's USR1 forwarding, run against fake processes of the job: a training rank (started as
    ``python -u -m llmtrain...``) gets USR1; the torchrun agent and a process outside the job do not."""
    text = (REPO / "scripts" / "launch" / "slurm.sbatch").read_text()
    start = text.index("forward_usr1() {")
    function = text[start:text.index("\n}\n", start) + 3]
    (tmp_path / "llmtrain_fake_rank.py").write_text(
        "import signal, sys, time\nsignal.signal(signal.SIGUSR1, lambda *a: sys.exit(138))\ntime.sleep(60)\n")
    sleeper = "import time; time.sleep(60)"
    rank = subprocess.Popen([sys.executable, "-u", "-m", "llmtrain_fake_rank"], cwd=tmp_path)
    agent = subprocess.Popen([sys.executable, "-c", sleeper, "torch.distributed.run", "-m", "llmtrain"])
    other = subprocess.Popen([sys.executable, "-u", "-m", "llmtrain_fake_rank"], cwd=tmp_path)  # another job's
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho 'PID JOBID STEPID LOCALID GLOBALID'\n"
                                      f"echo '{rank.pid} 7 0 0 0'\necho '{agent.pid} 7 0 - -'\n")
    (bin_dir / "scontrol").chmod(0o755)
    time.sleep(1)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7"}
    subprocess.run(["bash", "-c", f"{function}\nforward_usr1"], check=True, timeout=30, env=env)
    try:
        assert rank.wait(timeout=30) == 138
        time.sleep(0.5)
        assert agent.poll() is None and other.poll() is None
    finally:
        for p in (rank, agent, other):
            p.kill()
            p.wait()
