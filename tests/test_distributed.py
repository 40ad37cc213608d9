"""Multi-process training through the real CLI: torchrun (gloo, CPU) against one process.

Every strategy must reproduce the one-process loss curve with the same global batch (the data
loader gives each rank a disjoint slice of the same global batch), report per-rank optimizer
state that halves where the strategy shards it, resume 2 -> 1 -> 2 ranks on the same curve, and
run as a two-"node" job rendezvousing on 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, tiny_overrides, torchrun_env

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS = 20
# fp32; ranks reduce in a different order than one process, so bits differ. Muon orthogonalises in
# bf16 (as its reference does) with a quintic of slope ~3.4 at small singular values, so that ~1e-7
# gradient noise flips bf16 roundings and grows: over 20 steps even plain DDP drifts 1.3e-4.
TOL = {"adamw": 1e-4, "muon": 2e-4}
TIMEOUT = 300
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(corpus, cache, run_dir, optim: str, **extra) -> list[str]:
    # micro 2 of a global 8: 4 accumulation steps on one process, 2 per rank on two.
    base = {"train.max_steps": STEPS, "train.micro_batch_size": 2, "train.eval_every": 0,
            "train.grad_clip": 1.0, "schedule.name": "constant"}
    if optim != "adamw":
        base["optim"] = optim
        base.pop("optim.lr", None)
    base.update(extra)
    args = tiny_overrides(corpus, cache, run_dir, **base)
    if optim != "adamw":  # the preset's own lr (tiny_overrides sets adamw's)
        args = [a for a in args if not a.startswith("optim.lr=")]
    return args


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def run_single(args: list[str]) -> None:
    check(subprocess.run([sys.executable, "-m", "llmtrain", *args], cwd=REPO, env=torchrun_env(),
                         capture_output=True, text=True, timeout=TIMEOUT))


def run_torchrun(args: list[str], nproc: int = 2) -> None:
    cmd = [*TORCHRUN, f"--nproc_per_node={nproc}", f"--master_port={free_port()}", "-m", "llmtrain", *args]
    check(subprocess.run(cmd, cwd=REPO, env=torchrun_env(), capture_output=True, text=True, timeout=TIMEOUT))


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "val_loss" not in r}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def max_diff(a: dict[int, float], b: dict[int, float]) -> float:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max(abs(a[s] - b[s]) for s in a)


@pytest.fixture(scope="module")
def reference(corpus, data_cache, tmp_path_factory):
    """One-process runs (also prepares the data cache before two ranks share it)."""
    runs = {}
    for optim in ("adamw", "muon"):
        run_dir = tmp_path_factory.mktemp(f"ref_{optim}")
        run_single(overrides(corpus, data_cache, run_dir, optim))
        runs[optim] = run_dir
    return runs


# strategy, extra overrides, does it shard optimizer state?
CASES = [
    ("ddp", {}, False),
    ("zero1", {}, True),
    ("zero2", {}, True),
    ("fsdp", {}, True),
    ("hsdp", {}, True),                                # 1 x 2 mesh: both ranks on one "node"
    ("hsdp", {"distributed.gpus_per_node": 1}, False),  # 2 x 1 mesh: shard groups of one, replicated
]


@pytest.mark.parametrize("optim", ["adamw", "muon"])
@pytest.mark.parametrize("strategy,extra,shards", CASES, ids=["ddp", "zero1", "zero2", "fsdp", "hsdp1x2", "hsdp2x1"])
def test_two_ranks_match_one(reference, corpus, data_cache, tmp_path, optim, strategy, extra, shards):
    run_torchrun(overrides(corpus, data_cache, tmp_path, optim, **{"distributed.strategy": strategy, **extra}))
    ref = reference[optim]
    diff = max_diff(losses(ref), losses(tmp_path))
    print(f"{strategy} {extra} {optim}: max |loss diff| over {STEPS} steps = {diff:.2e}")
    assert diff < TOL[optim]
    one, two = summary(ref), summary(tmp_path)
    assert two["world_size"] == 2 and two["strategy"] == strategy
    ratio = two["optimizer_state_bytes"] / one["optimizer_state_bytes"]
    print(f"  optimizer_state_bytes per rank: 1 proc {one['optimizer_state_bytes']}, 2 procs {two['optimizer_state_bytes']} ({ratio:.3f})")
    if shards:
        assert 0.45 < ratio < 0.6
    elif optim == "muon" and strategy == "hsdp":
        # Shard groups of one keep AdamW state whole, but Muon's matrices still have one owner each.
        assert 0.5 < ratio < 0.9
    else:
        assert ratio == pytest.approx(1.0, abs=0.01)


def test_two_node_launch_matches_one(reference, corpus, data_cache, tmp_path):
    """Two torchrun agents (one per simulated node) rendezvous over c10d on 127.0.0.1."""
    port = free_port()
    args = overrides(corpus, data_cache, tmp_path, "adamw", **{"distributed.strategy": "hsdp"})
    procs = [subprocess.Popen([*TORCHRUN, "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=llmtrain-test",
                               "-m", "llmtrain", *args], cwd=REPO, env=torchrun_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-4000:]
    diff = max_diff(losses(reference["adamw"]), losses(tmp_path))
    print(f"2 nodes x 1 rank (hsdp 2x1): max |loss diff| = {diff:.2e}")
    assert diff < TOL["adamw"]
    assert summary(tmp_path)["world_size"] == 2


@pytest.mark.parametrize("strategy,optim", [("fsdp", "adamw"), ("fsdp", "muon"), ("zero1", "muon")])
def test_resume_two_one_two(reference, corpus, data_cache, tmp_path, strategy, optim):
    """Steps 1-4 on 2 ranks, 5-7 on 1 process, 8-20 on 2 ranks == the uninterrupted curve."""
    ckpt = lambda run, step: str(run / "checkpoints" / f"step_{step}")  # noqa: E731
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    # The constant schedule makes the LR independent of max_steps, so a run cut short at step 4
    # is the same run as the first four steps of the reference.
    run_torchrun(overrides(corpus, data_cache, a, optim, **{"distributed.strategy": strategy, "train.max_steps": 4}))
    assert (a / "checkpoints" / "step_4" / "dcp" / ".metadata").is_file()
    run_single(overrides(corpus, data_cache, b, optim, **{"train.max_steps": 7, "resume": f"'{ckpt(a, 4)}'"}))
    assert (b / "checkpoints" / "step_7" / "model.pt").is_file()
    run_torchrun(overrides(corpus, data_cache, c, optim, **{"distributed.strategy": strategy, "resume": f"'{ckpt(b, 7)}'"}))
    joined = {**losses(a), **losses(b), **losses(c)}
    diff = max_diff(losses(reference[optim]), joined)
    print(f"resume 2->1->2 {strategy} {optim}: max |loss diff| = {diff:.2e}")
    assert diff < TOL[optim]


def test_powersgd_bytes_per_step_in_metrics(corpus, data_cache, tmp_path):
    """DDP + PowerSGD through the trainer: every metrics row carries the all-reduced bytes per
    step; after torch's two uncompressed warm-up steps they drop to the rank-4 factors."""
    run_torchrun(overrides(corpus, data_cache, tmp_path, "adamw", **{
        "distributed.strategy": "ddp", "distributed.grad_compression": "powersgd", "train.max_steps": 5}))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    sent = [r["comm_bytes_per_step"] for r in rows if "loss" in r and "val_loss" not in r]
    print(f"PowerSGD all-reduced bytes/step: {sent}")
    assert len(sent) == 5 and sent[0] == sent[1] > 0
    assert 0 < sent[-1] < sent[0] / 2


def test_sharded_checkpoint_exports_whole_model(reference, corpus, data_cache, tmp_path):
    """load_model_state stitches a DCP checkpoint into the same state_dict a one-process run saves."""
    import torch

    from llmtrain.checkpoint import latest_checkpoint, load_model_state

    run_torchrun(overrides(corpus, data_cache, tmp_path, "adamw", **{"distributed.strategy": "fsdp"}))
    sharded = load_model_state(latest_checkpoint(tmp_path))
    whole = load_model_state(latest_checkpoint(reference["adamw"]))
    assert sorted(sharded) == sorted(whole)
    for name in whole:
        assert sharded[name].shape == whole[name].shape
        torch.testing.assert_close(sharded[name], whole[name], atol=1e-4, rtol=0)


FAIL_RANK_SCRIPT = """
import llmtrain.trainer as trainer
from llmtrain.cli import main

original = trainer.Trainer.train_step

def train_step(self):
    if self.env.rank == 1 and self.step == 2:
        raise RuntimeError("injected failure on rank 1")
    return original(self)

trainer.Trainer.train_step = train_step
main()
"""


def test_failing_rank_stops_the_job(corpus, data_cache, tmp_path):
    """A rank that raises brings torchrun down with its error shown instead of a hang: rank 0
    waits in the next all-reduce until torchrun tears the group down."""
    import time

    script = tmp_path / "fail_rank.py"
    script.write_text(FAIL_RANK_SCRIPT)
    args = overrides(corpus, data_cache, tmp_path / "run", "adamw", **{"distributed.strategy": "fsdp",
                                                                      "distributed.timeout_s": 60})
    cmd = [*TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", str(script), *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=torchrun_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stdout + proc.stderr
    assert time.monotonic() - start < 120
