"""FSDP2 warns when a wrapped module returns a view ("returned a view tensor ... wrong gradients"):
an in-place op on that view would drop FSDP's pre-backward hook. The model's logits must be a
tensor of their own on every CPU matmul backend, and a 2-rank FSDP run must print no such warning."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch

from llmtrain.cpu_matmul import onednn_available, set_cpu_matmul
from llmtrain.models import ModelConfig, build_model

from conftest import REPO, tiny_overrides, torchrun_env

FSDP_VIEW_WARNING = "returned a view tensor"
BACKENDS = ["aten", pytest.param("onednn", marks=pytest.mark.skipif(not onednn_available(), reason="no oneDNN"))]


def _tiny(family: str) -> torch.nn.Module:
    cfg = ModelConfig(name=f"{family}_test", family=family, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2,
                      vocab_size=61, max_seq_len=16, ffn_hidden=64)
    return build_model(cfg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_logits_are_not_a_view(family, backend):
    set_cpu_matmul(backend)
    model = _tiny(family)
    logits = model(torch.randint(0, 61, (2, 7)))
    assert logits.shape == (2, 7, 61)
    assert logits._base is None, f"{family} on {backend} returns a view of a {tuple(logits._base.shape)} tensor"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.skipif(not onednn_available(), reason="no oneDNN")
def test_fsdp_run_prints_no_view_warning(corpus, data_cache, tmp_path):
    """On the oneDNN backend (the CPU default), whose linears reshape their 2-D product."""
    args = tiny_overrides(corpus, data_cache, tmp_path / "run", **{
        "distributed.strategy": "fsdp", "train.max_steps": 2, "train.micro_batch_size": 4,
        "train.eval_every": 0, "train.cpu_matmul": "onednn"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "llmtrain", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=torchrun_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert FSDP_VIEW_WARNING not in proc.stderr, proc.stderr[-4000:]
