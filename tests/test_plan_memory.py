"""The memory model's activation counts against what autograd really saves, and the pre-flight
check: refuse only beyond the model's own error, warn within it, ``plan.check=false`` skips."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llmtrain.config import DistributedConfig, RootConfig, TrainConfig
from llmtrain.errors import ConfigError, ResourceError
from llmtrain.hardware import gpu_spec
from llmtrain.models import build_model
from llmtrain.models.config import ModelConfig
from llmtrain.plan import MEMORY_MODEL_ERROR, check_fits, memory_per_rank
from llmtrain.plan_layout import Layout
from llmtrain.plan_memory import activation_bytes, block_activation_bytes_per_token

SHAPES = [(64, 4, 2, 192), (128, 4, 2, 192), (64, 4, 4, 320), (96, 6, 3, 160)]  # d, heads, kv heads, ffn
T = 17  # a prime token count, so no activation has a parameter's shape


def _model(family: str, n_layers: int, d: int, heads: int, kv: int, f: int) -> ModelConfig:
    return ModelConfig(name="small", family=family, n_layers=n_layers, d_model=d, n_heads=heads,
                       n_kv_heads=kv if family == "llama" else None, ffn_hidden=f, vocab_size=100, max_seq_len=2 * T)


def saved_bytes(mcfg: ModelConfig, mode: str, compile: bool = False) -> int:
    """Bytes autograd saves for one forward + loss of 1 x T tokens, parameters and their casts excluded.

    mode: fp32; bf16 (bf16 parameters, as FSDP2 hands them to the blocks); autocast (fp32
    parameters under bf16 autocast, as none/ddp/zero1 run)."""
    torch.manual_seed(0)
    model = build_model(mcfg)
    if mode == "bf16":
        model.to(torch.bfloat16)
    if compile:
        for block in model.layers:
            block.compile()  # per block, as llmtrain's parallelize does
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params and tuple(t.shape) not in shapes:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    idx = torch.randint(0, 100, (1, T))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast:
            logits = model(idx)
        torch.nn.functional.cross_entropy(logits.float().view(-1, 100), idx.view(-1))
    return sum(saved.values())


def _layout(mcfg: ModelConfig, mode: str, compile: bool = False) -> Layout:
    sharded = mode == "bf16"
    return Layout(model=mcfg, gpu=gpu_spec("h100_sxm_80gb"), world_size=2 if sharded else 1,
                  strategy="fsdp" if sharded else "none", micro_batch_size=1, seq_len=T,
                  precision="fp32" if mode == "fp32" else "bf16", compile=compile)


@pytest.mark.parametrize("family", ["llama", "gpt"])
@pytest.mark.parametrize("mode", ["fp32", "bf16", "autocast"])
def test_block_activations_are_what_autograd_saves(family, mode):
    """Per token and block, exactly: the difference between a 2-block and a 1-block model."""
    for shape in SHAPES:
        one, two = (_model(family, n, *shape) for n in (1, 2))
        measured = (saved_bytes(two, mode) - saved_bytes(one, mode)) / T
        assert block_activation_bytes_per_token(_layout(two, mode)) == measured, shape


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_compiled_llama_blocks_save_what_the_model_says(mode):
    """Inductor recomputes the cheap ops in backward, so a compiled block saves less."""
    one, two = (_model("llama", n, *SHAPES[0]) for n in (1, 2))
    measured = (saved_bytes(two, mode, compile=True) - saved_bytes(one, mode, compile=True)) / T
    assert block_activation_bytes_per_token(_layout(two, mode, compile=True)) == measured
    assert measured < block_activation_bytes_per_token(_layout(two, mode))


@pytest.mark.parametrize("family", ["llama", "gpt"])
@pytest.mark.parametrize("mode", ["fp32", "bf16", "autocast"])
def test_whole_model_activations_plus_log_softmax_are_what_autograd_saves(family, mode):
    """Blocks, final norm, head input and targets; the loss's saved fp32 log_softmax output (4 B
    per logit) is counted in ``loss``, not ``activations``; nll_loss also keeps a 4-byte scalar."""
    mcfg = _model(family, 2, *SHAPES[0])
    assert activation_bytes(_layout(mcfg, mode)) + T * 100 * 4 + 4 == saved_bytes(mcfg, mode)


def root(model: ModelConfig, **plan_keys) -> RootConfig:
    cfg = RootConfig(model=model, train=TrainConfig(micro_batch_size=2, seq_len=32, global_batch_size=2,
                                                    precision="fp32"),
                     optim={"name": "adamw", "lr": 1e-3}, distributed=DistributedConfig(strategy="none"))
    for key, value in plan_keys.items():
        setattr(cfg.plan, key, value)
    return cfg


SMALL = _model("llama", 2, 64, 4, 2, 128)


def _with_capacity(monkeypatch, need_over_capacity: float) -> int:
    """Make this CPU look as if the model needs ``need_over_capacity`` times its free memory."""
    need = memory_per_rank(root(SMALL), 1, "none")["total"]
    monkeypatch.setattr("llmtrain.plan.available_memory_bytes", lambda device: int(need / need_over_capacity))
    return need


def test_check_passes_a_run_that_fits(monkeypatch, capsys):
    _with_capacity(monkeypatch, 0.5)
    assert check_fits(root(SMALL), 1, "none", torch.device("cpu")) is None
    assert capsys.readouterr().err == ""


def test_check_lets_a_run_within_the_model_error_start(monkeypatch, capsys):
    """Over capacity by less than the memory model's own error: a warning, never a refusal."""
    _with_capacity(monkeypatch, 1 + MEMORY_MODEL_ERROR / 2)
    warning = check_fits(root(SMALL), 1, "none", torch.device("cpu"))
    assert warning and "may run out of memory" in warning
    assert capsys.readouterr().err.strip() == warning
    _with_capacity(monkeypatch, 1 - MEMORY_MODEL_ERROR / 2)  # under capacity, within the error: silent
    assert check_fits(root(SMALL), 1, "none", torch.device("cpu")) is None


def test_check_refuses_beyond_the_model_error_in_one_line(monkeypatch):
    _with_capacity(monkeypatch, 1 + 2 * MEMORY_MODEL_ERROR)
    with pytest.raises(ResourceError) as err:
        check_fits(root(SMALL), 1, "none", torch.device("cpu"))
    message = str(err.value)
    assert message.startswith("model: small needs ~")
    assert "dry_run=true" in message and "plan.check=false" in message and "\n" not in message


def test_plan_check_false_skips_the_check(monkeypatch):
    _with_capacity(monkeypatch, 100.0)
    assert check_fits(root(SMALL, check=False), 1, "none", torch.device("cpu")) is None


def test_bad_plan_keys_are_start_up_errors():
    with pytest.raises(ConfigError, match="plan.gpu: got 'h1000'"):
        check_fits(root(SMALL, gpu="h1000"), 1, "none", torch.device("cpu"))
    with pytest.raises(ConfigError, match="plan.mfu"):
        check_fits(root(SMALL, mfu="lots"), 1, "none", torch.device("cpu"))


def test_gpu_overrides_replace_the_named_values():
    spec = gpu_spec("a100_40gb", memory_gb=48, peak_tflops=100, inter_node_gbps=800)
    base = gpu_spec("a100_40gb")
    assert (spec.memory_bytes, spec.peak_flops, spec.inter_node_bytes_per_s) == (48 * 10**9, 100e12, 100e9)
    assert dataclasses.replace(spec, memory_bytes=base.memory_bytes, peak_flops=base.peak_flops,
                               inter_node_bytes_per_s=base.inter_node_bytes_per_s) == base


def test_device_names_pick_the_most_specific_spec():
    from llmtrain.hardware import spec_for_device_name

    assert spec_for_device_name("NVIDIA H100 80GB HBM3").name == "h100_sxm_80gb"
    assert spec_for_device_name("NVIDIA H100 PCIe").name == "h100_pcie_80gb"
    assert spec_for_device_name("NVIDIA A100-SXM4-40GB").name == "a100_40gb"
    assert spec_for_device_name("NVIDIA A10G").name == "a10_24gb"
    assert spec_for_device_name("NVIDIA H200").name == "h200_141gb"
    assert spec_for_device_name("Quadro RTX 6000") is None
