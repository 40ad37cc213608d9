"""Strategy plumbing without the trainer: owner assignment, mesh shapes, refusals (fast), and every
registry optimizer under fsdp and zero1 on 2 ranks against DDP and one process (torchrun, slow)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmtrain.distributed import DistEnv, hsdp_shape, resolve_strategy
from llmtrain.errors import ConfigError
from llmtrain.optim import OPTIMIZERS
from llmtrain.optim.sharded import assign_owners, shard_optimizer, whole_tensor_groups

from conftest import torchrun_env

WORKER = Path(__file__).resolve().parent / "dist_worker.py"
# Optimizers that draw random numbers from the global generator inside step() (PSGD-Kron's probe
# vectors): owners draw them for their own parameters only, so the sequence differs from DDP's.
STOCHASTIC = {"psgd_kron"}


def test_owners_balance_bytes_and_are_deterministic():
    sizes = [4096, 4096, 1024, 1024, 64, 64]
    owners = assign_owners(sizes, 2)
    assert owners == assign_owners(sizes, 2)
    load = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(2)]
    assert load[0] == load[1]
    assert assign_owners([10, 20, 30], 1) == [0, 0, 0]


def test_strategy_resolution_and_hsdp_mesh():
    assert resolve_strategy("auto", 1) == "none" and resolve_strategy("auto", 8) == "fsdp"
    assert resolve_strategy("fsdp", 1) == "none"
    with pytest.raises(ConfigError, match="distributed.strategy"):
        resolve_strategy("none", 2)
    assert hsdp_shape(16, 8, 8) == (2, 8)      # 2 nodes x 8 GPUs: replicate 2, shard 8
    assert hsdp_shape(2, 8, 2) == (1, 2)       # one node of 2: pure sharding
    assert hsdp_shape(2, 1, 2) == (2, 1)       # gpus_per_node=1: pure replication
    with pytest.raises(ConfigError, match="gpus_per_node"):
        hsdp_shape(6, 4, None)


def test_whole_tensor_groups_follow_the_optimizer_kind():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    from llmtrain.optim import build_optimizer

    muon = build_optimizer({"name": "muon", "lr": 0.02}, model)
    flags = whole_tensor_groups(muon, "muon")
    assert any(flags) and not all(flags)  # matrices whole, the AdamW side elementwise
    assert not any(whole_tensor_groups(build_optimizer({"name": "adamw", "lr": 1e-3}, model), "adamw"))
    assert all(whole_tensor_groups(build_optimizer({"name": "lamb", "lr": 1e-3}, model), "lamb"))  # trust ratio


def test_refusals_are_one_line_config_errors():
    model = torch.nn.Linear(4, 4)
    from llmtrain.optim import build_optimizer

    env = DistEnv(rank=0, world_size=2, strategy="fsdp")
    for name in ("lomo", "sam", "lbfgs"):
        if name not in OPTIMIZERS:
            continue
        with pytest.raises(ConfigError) as err:
            shard_optimizer(build_optimizer({"name": name, "lr": 1e-3}, model), env, name)
        assert err.value.key == "optim.name" and "\n" not in str(err.value) and "ddp" in str(err.value)
    plain = build_optimizer({"name": "adamw", "lr": 1e-3}, model)
    assert shard_optimizer(plain, DistEnv(world_size=2, strategy="ddp"), "adamw") is plain


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero1"])
def test_every_optimizer_runs_exactly_or_refuses(strategy, tmp_path):
    """3 steps of a tiny LLaMA, global batch 8 as 2 ranks x 2 micro-batches x 2 accumulation steps.

    Sharded == DDP (the same gradients) to 1e-6 for every optimizer that runs: owner-rank updates
    of whole matrices change nothing. Against one process the loss agrees within 1e-4 wherever DDP
    itself does (SOAP's eigenbases amplify reduction-order differences even under plain DDP).
    """
    out = tmp_path / "matrix.json"
    spec = {"mode": "matrix", "strategy": strategy, "optims": sorted(OPTIMIZERS), "out": str(out)}
    env = torchrun_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(WORKER), json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(OPTIMIZERS)
    for name, r in sorted(results.items()):
        print(strategy, name, r)
        assert "error" not in r, (name, r)
        if "refused" in r:
            assert r["refused"].startswith("optim.name: ") and "\n" not in r["refused"], (name, r)
            continue
        if name in STOCHASTIC:  # the same distribution of random draws, a different order
            assert r["param_diff_vs_ddp"] <= 0.1 * r["update"], (name, r)
        else:
            assert r["param_diff_vs_ddp"] <= 1e-6, (name, r)
        if r["loss_diff_ddp_vs_one"] < 1e-4:
            assert r["loss_diff_vs_one"] < 1e-4, (name, r)
    ran = [n for n, r in results.items() if "refused" not in r]
    for required in ("adamw", "muon", "shampoo", "soap", "galore_adamw", "adamw8bit", "lion", "adafactor"):
        if required in OPTIMIZERS:
            assert required in ran, (required, results[required])


def run_worker(spec: dict, tmp_path: Path, nproc: int) -> list[float]:
    out = tmp_path / f"{spec['strategy']}_{nproc}.json"
    spec = {**spec, "out": str(out)}
    env = torchrun_env()
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}"] if nproc > 1 else [sys.executable]
    proc = subprocess.run([*launcher, str(WORKER), json.dumps(spec)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(out.read_text())["losses"]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_compile_and_activation_checkpointing_compose(strategy, tmp_path):
    """torch.compile (per block under FSDP2, whole model under DDP) + selective activation
    checkpointing on 2 ranks == plain eager training on one process."""
    base = {"optim": "adamw", "steps": 3}
    one = run_worker({**base, "strategy": "none"}, tmp_path, 1)
    two = run_worker({**base, "strategy": strategy, "compile": True, "ac": "selective"}, tmp_path, 2)
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4


@pytest.mark.dist
@pytest.mark.slow
def test_powersgd_cuts_gradient_traffic_and_still_learns(tmp_path):
    """DDP + PowerSGD rank 4 on 2 ranks: after 2 plain warm-up steps each step all-reduces the
    rank-4 factors P (n x 4) and Q (m x 4) of every matrix worth compressing plus the 1-D tensors
    whole, and a learnable counting task is still learned."""
    from llmtrain.models import build_model
    from llmtrain.models.config import ModelConfig

    spec = {"strategy": "ddp", "optim": "adamw", "steps": 40, "lr": 0.01, "learnable": True,
            "grad_compression": "powersgd", "powersgd_rank": 4}
    run_worker(spec, tmp_path, 2)
    result = json.loads((tmp_path / "ddp_2.json").read_text())
    model = build_model(ModelConfig(family="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                                    vocab_size=128, max_seq_len=32, ffn_hidden=128))
    full, compressed = 0, 0
    for p in model.parameters():
        n, m = p.shape[0], p.numel() // p.shape[0]
        r = min(n, m, 4)
        full += 4 * p.numel()
        compressed += 4 * ((n + m) * r if n * m > (n + m) * r else n * m)
    sent = result["comm_bytes"]
    print(f"all-reduced bytes/step: {sent[0]} plain, {sent[-1]} PowerSGD rank 4 ({sent[0] / sent[-1]:.1f}x less)")
    assert sent[:2] == [full, full]
    assert set(sent[2:]) == {compressed}
    assert full / compressed > 5
    losses = result["losses"]
    assert losses[0] > 4.0 and losses[-1] < 0.5, losses


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("optim,strategy", [("adamw8bit", "fsdp"), ("shampoo", "hsdp"), ("schedulefree_adamw", "zero1")])
def test_optimizer_state_reshards_two_one_two(optim, strategy, tmp_path):
    """8-bit blocks, Shampoo preconditioners and Schedule-Free sequences survive DCP checkpoints
    written by 2 ranks, resumed by 1 process (legacy files), resumed again by 2 ranks."""
    base = {"optim": optim, "steps": 8}
    one = run_worker({**base, "strategy": "none"}, tmp_path, 1)
    a = run_worker({**base, "strategy": strategy, "steps": 4, "save_at": 4, "run_dir": str(tmp_path / "a")}, tmp_path, 2)
    b = run_worker({**base, "strategy": "none", "steps": 6, "save_at": 6, "run_dir": str(tmp_path / "b"),
                    "resume": str(tmp_path / "a" / "checkpoints" / "step_4")}, tmp_path, 1)
    c = run_worker({**base, "strategy": strategy, "resume": str(tmp_path / "b" / "checkpoints" / "step_6")}, tmp_path, 2)
    assert len(a + b + c) == len(one)
    assert max(abs(x - y) for x, y in zip(one, a + b + c)) < 1e-4
