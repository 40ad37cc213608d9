"""Every tensor that enters a collective is on the run's device (NCCL refuses CPU tensors).

CPU tests run gloo, which takes any CPU tensor, so these tests make the GPU failure visible on CPU:
a source check that collectives are only called from llmtrain/distributed.py's helpers, a fake
process group with no CPU backend (it fails the way NCCL does), and tests/device_guard.py, which
tags tensors llmtrain makes without ``device=`` and fails any collective that receives one, in
process and around real 2-rank training runs.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from conftest import REPO, tiny_overrides, torchrun_env
from device_guard import LLMTRAIN_DIR, DeviceGuard, UntargetedCollective, tag_of
from llmtrain.distributed import DistEnv, all_reduce_mean, any_rank, barrier, broadcast_
from llmtrain.trainer import Trainer

COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_coalesced",
    "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "reduce", "gather", "scatter",
    "send", "recv", "isend", "irecv", "batch_isend_irecv", "barrier", "monitored_barrier", "broadcast_object_list",
    "all_gather_object", "gather_object", "scatter_object_list",
}


def _direct_collective_calls(path: Path) -> list[str]:
    """``<torch.distributed alias>.<collective>(...)`` calls and ``from torch.distributed import
    <collective>`` in one source file."""
    tree = ast.parse(path.read_text())
    aliases, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name.startswith("torch.distributed")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            found += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names if a.name in COLLECTIVES]
            aliases |= {a.asname or a.name for a in node.names if a.name in ("distributed_c10d", "c10d")}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in aliases or owner.startswith("torch.distributed"):
                found.append(f"{path.name}:{node.lineno} calls {owner}.{node.func.attr}")
    return found


def test_collectives_are_called_only_through_the_distributed_helpers():
    offenders = []
    for path in sorted((REPO / "llmtrain").rglob("*.py")):
        if path != REPO / "llmtrain" / "distributed.py":
            offenders += _direct_collective_calls(path)
    assert offenders == []
    # The check itself sees a direct call (it would have flagged the old trainer and checkpoint code).
    assert _direct_collective_calls(REPO / "llmtrain" / "distributed.py")


@pytest.fixture
def fake_group(request):
    """A default process group of 2 ranks that communicates nothing (torch's testing FakeProcessGroup)
    with the backend map ``request.param`` ("cpu:fake", or "meta:fake": no CPU entry, like NCCL's)."""
    import torch.testing._internal.distributed.fake_pg  # noqa: F401 (registers the "fake" backend)

    dist.init_process_group(request.param, store=dist.HashStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


def _run_as_llmtrain(source: str, scope: dict) -> dict:
    """Run ``source`` as if it were code in the llmtrain package (the guard looks at the caller's file)."""
    exec(compile(source, LLMTRAIN_DIR + "_device_guard_probe.py", "exec"), scope)
    return scope


@pytest.mark.parametrize("fake_group", ["cpu:fake"], indirect=True)
def test_guard_tags_tensors_llmtrain_makes_without_a_device(fake_group):
    original = dist.all_reduce
    with DeviceGuard() as guard:
        assert dist.all_reduce is not original
        probe = "t = torch.tensor(1.0)\nz = torch.zeros(3, device='cpu')\nc = z.cpu()"
        made = _run_as_llmtrain(probe, {"torch": torch})
        t, z = made["t"], made["z"]
        assert tag_of(t) and tag_of(t).endswith("_device_guard_probe.py:1")
        assert tag_of(t * 2) and tag_of(t.clone()) and tag_of(t.to(torch.float64))  # ops on it stay on the CPU
        assert tag_of(made["c"])  # an explicit .cpu() in llmtrain
        assert not tag_of(z) and not tag_of(z + t)  # an explicit device; a device tensor plus a CPU scalar
        assert not tag_of(torch.tensor(1.0))  # made here, not in llmtrain
        moved = t.to(torch.device("cpu"))
        assert not tag_of(moved) and tag_of(t)  # a move makes a new tensor; the source keeps its placement
        assert not tag_of(t.to(z)) and tag_of(z.to(t))
        with pytest.raises(UntargetedCollective, match="all_reduce got a tensor made without device="):
            dist.all_reduce(t * 2)
        dist.all_reduce(moved)
        dist.broadcast(z, src=0)
    assert guard.calls["all_reduce"] == 2 and guard.calls["broadcast"] == 1 and len(guard.violations) == 1
    assert dist.all_reduce is original  # the patches are undone on exit


@pytest.mark.parametrize("fake_group", ["cpu:fake"], indirect=True)
def test_stop_check_reduces_a_flag_made_on_the_run_device(fake_group):
    """The trainer's per-step stop check all-reduced ``torch.tensor(float(...))``, a CPU tensor."""
    from llmtrain.preemption import StopRequest

    env = DistEnv(rank=0, world_size=2, device=torch.device("cpu"), strategy="fsdp")
    signalled = StopRequest()
    signalled.signum = 15
    with DeviceGuard() as guard:
        assert Trainer._agreed_stop(SimpleNamespace(env=env, stop=StopRequest())) is False
        assert Trainer._agreed_stop(SimpleNamespace(env=env, stop=signalled)) is True
    assert guard.calls["all_reduce"] == 2 and guard.violations == []


@pytest.mark.parametrize("fake_group", ["meta:fake"], indirect=True)
def test_helpers_move_tensors_to_a_device_the_group_serves(fake_group):
    """A group whose backend map has no CPU entry (as NCCL's) refuses a CPU tensor with NCCL's
    message; the helpers put every tensor on ``env.device`` (meta stands in for cuda here)."""
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_reduce(torch.tensor(1.0))
    env = DistEnv(rank=0, world_size=2, device=torch.device("meta"), strategy="ddp")
    mean = all_reduce_mean(torch.tensor([2.0, 4.0]), env)
    assert mean.device.type == "meta" and mean.shape == (2,)
    with pytest.raises(ValueError, match="broadcast_ got a tensor on cpu; the run's device is meta"):
        broadcast_(torch.arange(4.0), src=0, env=env)  # in place: it cannot be moved for the caller
    on_device = torch.zeros(3, device="meta")
    work = broadcast_(on_device, src=0, env=env, async_op=True)
    assert work is not None
    work.wait()
    with pytest.raises(RuntimeError, match="device type cpu"):
        any_rank(True, DistEnv(rank=0, world_size=2, device=torch.device("cpu")))  # the helper does not hide it


@pytest.mark.parametrize("fake_group", ["cpu:fake"], indirect=True)
def test_any_rank_and_barrier_on_one_process_do_not_communicate(fake_group):
    env = DistEnv(rank=0, world_size=1)
    with DeviceGuard() as guard:
        assert any_rank(True, env) is True and any_rank(False, env) is False
        barrier(env)
    assert sum(guard.calls.values()) == 0


GUARD = Path(__file__).resolve().parent / "device_guard.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero1", "fsdp", "hsdp"])
@pytest.mark.parametrize("optim", ["muon", "adamw8bit"])
def test_two_rank_training_gives_collectives_only_device_tensors(corpus, data_cache, tmp_path, strategy, optim):
    """Two gloo ranks train, evaluate and checkpoint under the guard: no collective may receive a
    tensor llmtrain made without ``device=`` (before: the trainer's per-step stop flag)."""
    run_dir, reports = tmp_path / "run", tmp_path / "reports"
    args = tiny_overrides(corpus, data_cache, run_dir, **{
        "optim": optim, "distributed.strategy": strategy, "train.max_steps": 3, "train.micro_batch_size": 2,
        "train.eval_every": 2, "train.save_every": 2, "train.eval_steps": 1, "schedule.name": "constant"})
    args = [a for a in args if not a.startswith("optim.lr=")]  # the preset's own lr
    env = {**torchrun_env(), "LLMTRAIN_DEVICE_GUARD_DIR": str(reports)}
    cmd = [*TORCHRUN, "--nproc_per_node=2", f"--master_port={_free_port()}", str(GUARD), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    files = [reports / f"rank{r}.json" for r in (0, 1)]
    ranks = [json.loads(f.read_text()) for f in files if f.is_file()]
    assert proc.returncode == 0, ([r["violations"] for r in ranks], proc.stderr[-4000:])
    assert len(ranks) == 2
    for report in ranks:
        assert report["violations"] == []
        assert report["collectives"]["all_reduce"] >= 3 + 3  # the loss and the stop flag, every step
        assert report["collectives"]["barrier"] >= 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3


STOP_ON_ONE_RANK = """
import signal
import sys

sys.path.insert(0, {tests!r})
import llmtrain.trainer as trainer
from device_guard import _run_cli_under_guard

original = trainer.Trainer.train_step


def train_step(self):
    out = original(self)
    if self.env.rank == 1 and self.step == 2:
        self.stop.signum = signal.SIGTERM  # as if the signal had reached this rank only
    return out


trainer.Trainer.train_step = train_step
_run_cli_under_guard()
"""


@pytest.mark.dist
@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank(corpus, data_cache, tmp_path):
    """Rank 1 alone sees SIGTERM after step 2; both ranks stop there and save together."""
    script = tmp_path / "stop_one_rank.py"
    script.write_text(STOP_ON_ONE_RANK.format(tests=str(Path(__file__).resolve().parent)))
    run_dir, reports = tmp_path / "run", tmp_path / "reports"
    args = tiny_overrides(corpus, data_cache, run_dir, **{"distributed.strategy": "fsdp", "train.max_steps": 6,
                                                          "train.micro_batch_size": 2, "train.eval_every": 0})
    env = {**torchrun_env(), "LLMTRAIN_DEVICE_GUARD_DIR": str(reports)}
    cmd = [*TORCHRUN, "--nproc_per_node=2", f"--master_port={_free_port()}", str(script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["steps"] == 2, (summary, proc.stderr[-3000:])
    assert "SIGTERM" in summary["reason"]
    assert (run_dir / "checkpoints" / "step_2" / "COMPLETE").is_file()
    for r in (0, 1):
        assert json.loads((reports / f"rank{r}.json").read_text())["violations"] == []
