"""The CUDA-only branches, tested on CPU with the device mocked (docs/gpu.md lists every branch).

``torch.cuda`` is patched to answer as a machine with one H100 would; nothing is allocated on it.
Selection functions get ``torch.device("cuda", N)`` objects, which need no GPU to exist.
"""

from __future__ import annotations

import datetime
from types import SimpleNamespace

import pytest
import torch

from llmtrain import checkpoint, distributed
from llmtrain.errors import ConfigError, ResourceError
from llmtrain.optim import _common, compiled, kernels, lion
from llmtrain.optim import adamw8bit as adamw8bit_module
from llmtrain.hardware import available_memory_bytes
from llmtrain.plan import check_fits
from llmtrain.trainer import peak_memory_bytes, resolve_precision

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)
H100 = SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 2**30, major=9, minor=0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """``torch.cuda`` as a machine with one bf16-capable H100 answers it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: H100.name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: H100)
    return H100


# ------------------------------------------------------------------ precision, memory, MFU

def test_precision_auto_is_bf16_on_a_bf16_gpu_only(fake_gpu, monkeypatch):
    assert resolve_precision("auto", CUDA0) == torch.bfloat16
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32  # the run's device decides
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # V100, T4
    assert resolve_precision("auto", CUDA0) == torch.float32
    assert resolve_precision("fp16", CUDA0) == torch.float16


def test_plan_counts_auto_as_bf16_when_a_bf16_gpu_is_visible(fake_gpu):
    from llmtrain.config import RootConfig, TrainConfig
    from llmtrain.plan import memory_per_rank

    def cfg(precision):
        return RootConfig(train=TrainConfig(precision=precision, micro_batch_size=2, global_batch_size=2))

    assert memory_per_rank(cfg("auto"), 1, "none") == memory_per_rank(cfg("bf16"), 1, "none")
    assert memory_per_rank(cfg("auto"), 1, "none") != memory_per_rank(cfg("fp32"), 1, "none")


def test_capacity_is_the_gpus_memory(fake_gpu):
    from llmtrain.cli import compose

    assert available_memory_bytes(CUDA0) == 80 * 2**30
    check_fits(compose(["model=llama_1b"]), 1, "none", CUDA0)  # ~20 GiB: fits
    with pytest.raises(ResourceError, match=r"llama2_70b .*80\.0 GiB"):  # the GPU's memory, not the host's
        check_fits(compose(["model=llama2_70b"]), 1, "none", CUDA0)


def test_peak_memory_is_the_cuda_allocators_for_the_run_device(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: asked.append(device) or 123)
    assert peak_memory_bytes(CUDA1) == 123 and asked == [CUDA1]
    assert peak_memory_bytes(torch.device("cpu")) > 2**20  # CPU: the process's peak RSS


@pytest.fixture
def cpu_trainer(corpus, data_cache, tmp_path):
    from llmtrain.cli import compose
    from llmtrain.trainer import Trainer

    from conftest import tiny_overrides

    return Trainer(compose(tiny_overrides(corpus, data_cache, tmp_path / "run")), tmp_path / "run")


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA GeForce GTX 1080", None)])
def test_summary_mfu_uses_the_named_gpus_peak(cpu_trainer, fake_gpu, monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(vars(H100), name=name))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 7 * 2**30)
    trainer = cpu_trainer
    trainer.env.device, trainer.tokens, trainer.elapsed = CUDA0, 4096, 2.0
    summary = trainer._summary("completed", "", {})
    m, seq = trainer.cfg.model, trainer.cfg.train.seq_len
    flops_per_token = 6 * trainer.params + 12 * m.n_layers * m.d_model * seq
    assert summary["tokens_per_s"] == 2048.0 and summary["peak_mem_bytes"] == 7 * 2**30
    if peak is None:
        assert summary["mfu"] is None
    else:
        assert summary["mfu"] == pytest.approx(flops_per_token * 2048.0 / peak)


def test_summary_mfu_is_null_on_cpu(cpu_trainer):
    assert cpu_trainer._summary("completed", "", {})["mfu"] is None


def test_fp16_loss_scaling_is_refused_under_sharding():
    from llmtrain.optim.sharded import shard_optimizer

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))])
    env = distributed.DistEnv(rank=0, world_size=2, device=CUDA0, strategy="fsdp")
    with pytest.raises(ConfigError, match="^train.precision: fp16 loss scaling checks overflow per shard"):
        shard_optimizer(opt, env, "adamw", loss_scaling=True)
    ddp = distributed.DistEnv(rank=0, world_size=2, device=CUDA0, strategy="ddp")
    assert shard_optimizer(opt, ddp, "adamw", loss_scaling=True) is opt


# ------------------------------------------------------------------ device, process group, wrapping

def test_device_auto_is_the_local_ranks_gpu(fake_gpu):
    assert distributed.resolve_device("auto", 3) == torch.device("cuda", 3)
    assert distributed.resolve_device("cuda", 2) == torch.device("cuda", 2)
    assert distributed.resolve_device("cuda:1", 0) == CUDA1
    assert distributed.resolve_device("cpu", 1) == torch.device("cpu")


def test_cuda_without_a_gpu_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.resolve_device("auto", 3) == torch.device("cpu")
    with pytest.raises(ConfigError, match="^train.device: got 'cuda' but no CUDA GPU is visible"):
        distributed.resolve_device("cuda", 0)


@pytest.mark.parametrize("device,backend", [("auto", "nccl"), ("cpu", "gloo")])
def test_process_group_is_nccl_on_the_rank_gpu_with_the_timeout(fake_gpu, monkeypatch, device, backend):
    joined, current = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: joined.append((backend, kw)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    env = distributed.init_distributed(device, "fsdp", timeout_s=123)
    assert (env.rank, env.world_size, env.strategy) == (1, 2, "fsdp")
    assert joined[0][0] == backend and joined[0][1]["timeout"] == datetime.timedelta(seconds=123)
    if backend == "nccl":
        assert env.device == CUDA1 and current == [CUDA1]  # before the group: NCCL binds to the current device
    else:
        assert env.device == torch.device("cpu") and current == []


@pytest.mark.parametrize("strategy,local,shape", [("fsdp", None, (4,)), ("hsdp", "2", (2, 2))])
def test_device_mesh_is_built_on_the_run_device_type(monkeypatch, strategy, local, shape):
    import torch.distributed.device_mesh as dm

    built = []
    monkeypatch.setattr(dm, "init_device_mesh", lambda kind, shape, **kw: built.append((kind, shape)) or "mesh")
    if local:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    else:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    env = distributed.DistEnv(rank=0, world_size=4, device=CUDA0, strategy=strategy)
    assert distributed.device_mesh(env, gpus_per_node=8) == "mesh"
    assert built == [("cuda", shape)]


@pytest.mark.parametrize("device,device_ids", [(CUDA1, [1]), (torch.device("cpu"), None)])
def test_ddp_binds_the_module_to_the_rank_gpu(monkeypatch, device, device_ids):
    import torch.nn.parallel

    class RecordingDDP(torch.nn.Module):
        def __init__(self, module, device_ids=None):
            super().__init__()
            self.module, self.device_ids = module, device_ids

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", RecordingDDP)
    env = distributed.DistEnv(rank=1, world_size=2, device=device, strategy="ddp")
    wrapped = distributed.parallelize(torch.nn.Linear(2, 2), env)
    assert isinstance(wrapped, RecordingDDP) and wrapped.device_ids == device_ids


@pytest.mark.parametrize("dtype,param,reduce", [(torch.bfloat16, torch.bfloat16, torch.float32),
                                                (torch.float16, torch.float16, torch.float32),
                                                (torch.float32, None, None), (None, None, None)])
def test_fsdp_mixed_precision_computes_low_and_reduces_fp32(dtype, param, reduce):
    policy = distributed.fsdp_mixed_precision(dtype)
    assert (policy.param_dtype, policy.reduce_dtype) == (param, reduce)


@pytest.mark.dist
@pytest.mark.slow
def test_fsdp_bf16_run_keeps_fp32_master_weights_and_state(corpus, data_cache, tmp_path):
    """What auto precision selects on a GPU, run on 2 CPU ranks: bf16 compute, AdamW state in fp32
    (8 B/param, half per rank), finite losses."""
    import json
    import socket
    import subprocess
    import sys

    from conftest import REPO, tiny_overrides, torchrun_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = tiny_overrides(corpus, data_cache, tmp_path, **{
        "distributed.strategy": "fsdp", "train.precision": "bf16", "train.max_steps": 4,
        "train.micro_batch_size": 4, "train.eval_every": 0})
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", "-m", "llmtrain", *args],
                          cwd=REPO, env=torchrun_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["precision"] == "bfloat16" and summary["world_size"] == 2
    assert summary["optimizer_state_bytes_per_param"] == pytest.approx(4.0, rel=0.01)
    assert summary["nonfinite_steps"] == 0


# ------------------------------------------------------------------ optimizer implementations

def test_triton_is_usable_on_cuda_devices_only(monkeypatch):
    monkeypatch.setattr(kernels, "triton_importable", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernels.triton_usable(CUDA0) and kernels.triton_usable("cuda:1")
    assert not kernels.triton_usable("cpu") and not kernels.triton_usable(torch.device("meta"))
    kernels.require_triton(CUDA0, accepted=("auto",))  # no error on a GPU
    monkeypatch.setattr(kernels, "triton_importable", lambda: False)
    assert not kernels.triton_usable(CUDA0)
    with pytest.raises(ConfigError, match=r'^optim.impl: triton is not installed \(pip install "llmtrain\[triton\]"\); '
                                          r"accepted here: auto, eager$"):
        kernels.require_triton(CUDA0, accepted=("auto", "eager"))


def test_impl_triton_is_accepted_when_a_gpu_is_visible(fake_gpu, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _common.resolve_impl("triton", name="adamw", has_fused=True, has_triton=True) == "triton"
    assert _common.resolve_impl("auto", name="adamw", has_fused=True, has_triton=True) == "fused"  # torch's kernel
    assert _common.resolve_compiled_impl("triton", name="lion", has_foreach=True, has_triton=True) == "triton"


@pytest.mark.parametrize("triton_ok,bnb_ok,expected", [(True, True, "triton"), (False, True, "bnb"),
                                                       (False, False, "eager")])
def test_adamw8bit_auto_prefers_triton_on_cuda(monkeypatch, triton_ok, bnb_ok, expected):
    monkeypatch.setattr(adamw8bit_module, "triton_usable",
                        lambda device: triton_ok and torch.device(device).type == "cuda")
    monkeypatch.setattr(adamw8bit_module, "bnb_runs_on", lambda device_type: bnb_ok)
    assert adamw8bit_module.resolve_impl("auto", CUDA0) == expected


@pytest.mark.parametrize("on_gpu,big,expected", [(True, True, "triton"), (True, False, "foreach"),
                                                 (False, True, "fused"), (False, False, "foreach")])
def test_lion_auto_takes_the_triton_kernel_for_big_groups_on_cuda(monkeypatch, on_gpu, big, expected):
    taken = []
    monkeypatch.setattr(lion, "triton_usable", lambda device: on_gpu)
    monkeypatch.setattr(compiled, "compile_available", lambda: True)
    monkeypatch.setattr(compiled, "AUTO_MIN_NUMEL", 8 if big else 1 << 22)
    monkeypatch.setattr(lion, "lion_step", lambda *a, impl, **kw: taken.append(impl))
    p = torch.nn.Parameter(torch.zeros(4, 4))
    p.grad = torch.ones(4, 4)
    opt = lion.Lion([p])
    opt.step()
    assert opt.impl == "auto" and taken == [expected]


def test_compiled_updates_need_no_cxx_compiler_on_cuda(fake_gpu, monkeypatch):
    import shutil

    monkeypatch.delenv("LLMTRAIN_NO_COMPILE", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert compiled.compile_available()  # inductor emits Triton on CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not compiled.compile_available()


def test_muon_stacks_newton_schulz_off_the_cpu(monkeypatch):
    """The GPU path batches same-shape matrices into one Newton–Schulz chain; on CPU the chain runs
    per matrix. Meta tensors stand in for CUDA ones (same branch, no values)."""
    from llmtrain.optim import muon

    calls = []
    real = muon.zeropower_via_newtonschulz5
    monkeypatch.setattr(muon, "zeropower_via_newtonschulz5", lambda g, steps: calls.append(g.shape) or real(g, steps))
    for device, expected in [("meta", [(3, 8, 6)]), ("cpu", [(8, 6)] * 3)]:
        calls.clear()
        grads = [torch.randn(8, 6, device=device) for _ in range(3)]
        bufs = [torch.zeros(8, 6, device=device) for _ in range(3)]
        out = muon.muon_update_batched(grads, bufs, beta=0.95, nesterov=True, ns_steps=5)
        assert [tuple(s) for s in calls] == expected and [o.shape for o in out] == [(8, 6)] * 3


def test_stacked_newton_schulz_equals_one_matrix_at_a_time():
    from llmtrain.optim.muon import zeropower_via_newtonschulz5

    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(16, 24, generator=gen) * s for s in (1.0, 1e-3, 30.0)]
    stacked = zeropower_via_newtonschulz5(torch.stack(mats))
    for one, m in zip(stacked, mats):
        torch.testing.assert_close(one.float(), zeropower_via_newtonschulz5(m).float(), atol=2e-2, rtol=0)


def test_onednn_linears_never_take_non_cpu_tensors():
    from llmtrain.cpu_matmul import set_cpu_matmul, uses_onednn

    set_cpu_matmul("auto")
    on_meta = [torch.empty(4, 4, device="meta"), torch.empty(4, 4, device="meta")]
    assert not uses_onednn(*on_meta)


# ------------------------------------------------------------------ checkpoint RNG

def test_cuda_rng_is_saved_and_restored_onto_the_gpus_that_exist(fake_gpu, monkeypatch):
    """A checkpoint from an 8-GPU node resumes on a 1-GPU machine: states of absent devices are
    dropped (torch.cuda.set_rng_state_all indexes devices by position and fails past the last)."""
    saved = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    restored = []

    def set_all(states):
        for i, s in enumerate(states):
            if i >= torch.cuda.device_count():
                raise IndexError("tuple index out of range")  # torch.cuda.default_generators[i]
            restored.append(s)

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: saved)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    state = checkpoint.rng_state()
    assert state["cuda"] is saved
    checkpoint.set_rng_state(state)
    assert restored == saved[:1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # resumed on a CPU: CUDA states ignored
    restored.clear()
    checkpoint.set_rng_state(state)
    assert restored == [] and "cuda" not in checkpoint.rng_state()


# ------------------------------------------------------------------ docs/gpu.md stays true

def test_every_test_docs_gpu_md_names_exists():
    """Each `file.py::name` in the branch table is a test function of that file (a row whose test
    was renamed or removed would otherwise keep claiming coverage)."""
    import re

    from conftest import REPO

    text = (REPO / "docs" / "gpu.md").read_text()
    cited, current = [], None
    for path, name in re.findall(r"`(?:(test_\w+\.py))?::(test_\w+)(?:\[[^\]]*\])?`", text):
        current = path or current  # `::name` right after `file.py::name` is in that file
        cited.append((current, name))
    assert len(cited) > 30
    missing = [f"{path}::{name}" for path, name in cited
               if not re.search(rf"^def {name}\(", (REPO / "tests" / path).read_text(), re.M)]
    assert not missing, missing
