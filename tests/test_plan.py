"""Dry-run planner: parameters, FLOPs and memory against hand-computed numbers for one small LLaMA,
plan.json's contract, and the 7B acceptance check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from llmtrain.config import DistributedConfig, RootConfig, TrainConfig
from llmtrain.errors import ConfigError
from llmtrain.models import build_model
from llmtrain.models.config import ModelConfig
from llmtrain.plan import flops_per_token, memory_per_rank, param_counts, plan, run_dry_run
from llmtrain.plan_memory import ALLOCATOR_FRACTION_EAGER

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"

# Hand count for SMALL: head_dim 16, d_kv 32. Block: q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12288,
# SwiGLU 3*64*128 = 24576, two norms 128 -> 36992. Model: embed 6400 + 2 blocks + norm 64 + head 6400.
SMALL = ModelConfig(name="small", family="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                    vocab_size=100, max_seq_len=32, tie_embeddings=False)
BLOCK, TOTAL = 36992, 86848
ROOT = TOTAL - 2 * BLOCK  # embedding, final norm, head
# Bytes autograd saves per token and block (measured in test_plan_memory.py), d=64, k=32, f=128, h=4:
BLOCK_FP32 = 32 * 64 + 8 * 32 + 16 * 128 + 8 + 4 * 4          # 4376
BLOCK_BF16 = 20 * 64 + 4 * 32 + 8 * 128 + 8 + 4 * 4           # 2456 (bf16 parameters, FSDP)
HEAD_FP32, HEAD_BF16 = 12 * 64 + 12, 8 * 64 + 12               # final norm + the head's input


def root(model=SMALL, strategy="zero1", world_size=4, precision="fp32", optim="adamw", **train) -> RootConfig:
    t = dict(micro_batch_size=2, seq_len=32, global_batch_size=16, precision=precision, max_steps=10)
    t.update(train)
    return RootConfig(model=model, train=TrainConfig(**t), optim={"name": optim, "lr": 1e-3},
                      distributed=DistributedConfig(strategy=strategy, world_size=world_size, gpus_per_node=2))


def test_param_counts_and_flops_by_hand():
    counts = param_counts(SMALL)
    assert counts["total"] == TOTAL == build_model(SMALL).num_params()
    assert counts["embedding"] == 6400 and counts["non_embedding"] == TOTAL - 6400
    # untied: the head is already among the non-embedding weights
    assert flops_per_token(SMALL, 32) == 6 * (TOTAL - 6400) + 12 * 2 * 64 * 32
    tied = ModelConfig(**{**SMALL.__dict__, "tie_embeddings": True})
    assert param_counts(tied)["total"] == TOTAL - 6400
    # tied: the head shares the embedding table but still multiplies every token
    assert flops_per_token(tied, 32) == 6 * (TOTAL - 6400) + 12 * 2 * 64 * 32


def test_memory_zero1_fp32_by_hand():
    # 64 tokens a micro-batch, 16 / (2 x 4) = 2 accumulation steps
    mem = memory_per_rank(root(), 4, "zero1")
    activations = 64 * (2 * BLOCK_FP32 + HEAD_FP32)
    loss = 64 * 100 * (4 + 12)  # fp32 logits held + log_softmax out + two fp32 gradients
    working = 4 * TOTAL         # DDP's fp32 gradient buckets (no autocast copies in fp32)
    assert {k: mem[k] for k in ("weights", "gradients", "optimizer", "working", "accumulated_gradients",
                                "activations", "recompute", "loss")} == {
        "weights": 4 * TOTAL, "gradients": 4 * TOTAL,
        "optimizer": 8 * TOTAL // 4,        # AdamW, sharded over 4 ranks
        "working": working,
        "accumulated_gradients": 4 * TOTAL,  # DDP keeps its fp32 gradients between micro-batches
        "activations": activations, "recompute": 0, "loss": loss,
    }
    transient = activations + loss + working
    assert mem["allocator"] == int(ALLOCATOR_FRACTION_EAGER * transient)
    # peak at the start of backward: weights + optimizer + accumulated gradients + what comes and goes
    assert mem["total"] == 4 * TOTAL + 2 * TOTAL + 4 * TOTAL + transient + mem["allocator"]


def test_memory_fsdp_bf16_full_checkpointing_by_hand():
    model = ModelConfig(**{**SMALL.__dict__, "activation_checkpointing": "full"})
    mem = memory_per_rank(root(model=model, precision="bf16", optim="lion", global_batch_size=8), 4, "fsdp")
    assert mem["weights"] == TOTAL and mem["gradients"] == TOTAL  # 4 B/param over 4 ranks
    assert mem["optimizer"] == 4 * TOTAL // 4  # Lion: one fp32 momentum
    # root and two blocks unsharded in bf16, the head's bf16 gradient, one block's bf16 + fp32 gradient
    assert mem["working"] == 2 * (ROOT + 2 * BLOCK) + 2 * 100 * 64 + BLOCK * (2 + 4)
    assert mem["accumulated_gradients"] == 0  # 8 / (2 x 4): one micro-batch a step
    assert mem["activations"] == 64 * (2 * 2 * 64 + HEAD_BF16)  # each block keeps its bf16 input
    assert mem["recompute"] == 64 * BLOCK_BF16
    assert mem["loss"] == 64 * 100 * (2 + 12)
    transient = mem["activations"] + max(mem["loss"], mem["recompute"]) + mem["working"]
    assert mem["total"] == TOTAL + TOTAL + transient + int(ALLOCATOR_FRACTION_EAGER * transient)


def test_peak_can_be_the_optimizer_step():
    """Two tokens a step on DDP-style zero1: weights, state, fp32 gradients and DDP's buckets
    (12 B/param + state) outweigh the start of backward."""
    cfg = root(micro_batch_size=1, seq_len=2, global_batch_size=4)
    mem = memory_per_rank(cfg, 4, "zero1")
    transient = mem["activations"] + mem["loss"] + mem["working"]
    assert mem["total"] == 4 * TOTAL + 2 * TOTAL + 4 * TOTAL + 4 * TOTAL + int(ALLOCATOR_FRACTION_EAGER * transient)
    assert plan(cfg)["memory_peak_at"] == "optimizer step"


def test_fsdp_accumulation_keeps_unsharded_fp32_gradients():
    """FSDP2 without gradient sync accumulates unsharded gradients in its fp32 reduce dtype."""
    one = memory_per_rank(root(precision="bf16", global_batch_size=8), 4, "fsdp")
    two = memory_per_rank(root(precision="bf16", global_batch_size=16), 4, "fsdp")
    assert one["accumulated_gradients"] == 0 and two["accumulated_gradients"] == 4 * TOTAL
    assert two["total"] - one["total"] == 4 * TOTAL


@pytest.mark.parametrize("strategy,shards", [("none", (1, 1, 1)), ("ddp", (1, 1, 1)), ("zero1", (1, 1, 4)),
                                             ("zero2", (4, 4, 4)), ("fsdp", (4, 4, 4)), ("hsdp", (2, 2, 2))])
def test_strategies_divide_the_right_parts(strategy, shards):
    world = 1 if strategy == "none" else 4
    mem = memory_per_rank(root(strategy=strategy, world_size=world), world, strategy)
    w, g, o = (1, 1, 1) if strategy == "none" else shards
    assert (mem["weights"], mem["gradients"], mem["optimizer"]) == (4 * TOTAL // w, 4 * TOTAL // g, 8 * TOTAL // o)


def test_selective_checkpointing_sits_between_none_and_full():
    acts = {}
    for mode in ("none", "selective", "full"):
        model = ModelConfig(**{**SMALL.__dict__, "n_layers": 4, "activation_checkpointing": mode})
        acts[mode] = memory_per_rank(root(model=model), 4, "zero1")["activations"]
    assert acts["full"] < acts["selective"] < acts["none"]
    # selective: blocks 0 and 2 keep their input, 1 and 3 everything
    assert acts["selective"] == 64 * (2 * 4 * 64 + 2 * BLOCK_FP32 + HEAD_FP32)


def test_plan_report_and_dry_run_file(tmp_path, capsys):
    p = run_dry_run(root(), str(tmp_path))
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved == json.loads(json.dumps(p))
    assert saved["params"] == {"total": TOTAL, "embedding": 6400, "non_embedding": TOTAL - 6400}
    assert saved["grad_accum_steps"] == 2  # 16 / (2 micro x 4 ranks)
    assert saved["fits"] is True and saved["memory_verdict"] == "fits" and saved["memory_peak_at"] == "backward"
    thr = saved["throughput"]
    assert thr["tokens_per_s_per_gpu"] > 0 and thr["bound"] in ("compute", "memory_bound", "communication")
    assert thr["mfu_source"] == "modelled"
    assert thr["tokens_per_s"] == pytest.approx(4 * thr["tokens_per_s_per_gpu"])
    assert thr["tokens_per_day"] == pytest.approx(thr["tokens_per_s"] * 86400)
    mem = saved["memory_per_gpu"]
    assert {"weights", "gradients", "optimizer", "activations", "loss", "total"} <= set(mem)
    assert all(isinstance(v, int) and v >= 0 for v in mem.values())  # a breakdown in bytes
    out = capsys.readouterr().out
    assert "parameters" in out and "fits" in out and "plan.json" in out and "bound" in out


def test_plan_mfu_number_overrides_the_model():
    cfg = root()
    cfg.plan.mfu = 0.4
    thr = plan(cfg)["throughput"]
    assert thr["mfu_source"] == "plan.mfu" and thr["mfu"] == pytest.approx(0.4)
    assert thr["tokens_per_s_per_gpu"] == pytest.approx(0.4 * 989e12 / flops_per_token(SMALL, 32))
    for bad in ("fast", 0, 1.5):
        cfg.plan.mfu = bad
        with pytest.raises(ConfigError, match="plan.mfu"):
            plan(cfg)


def test_plan_flags_what_does_not_fit_and_bad_batches():
    cfg = root()
    cfg.plan.gpu_memory_gb = 0.001
    p = plan(cfg)
    assert p["fits"] is False and p["memory_verdict"] == "does not fit"
    assert p["gpu_memory_bytes"] == 1_000_000
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        plan(root(global_batch_size=12), world_size=4)


def test_unknown_state_bytes_falls_back_to_adamw_with_a_note(monkeypatch):
    from llmtrain.optim import OPTIMIZERS

    class Bare(torch.optim.SGD):
        pass

    monkeypatch.setitem(OPTIMIZERS, "bare", Bare)
    p = plan(root(optim="bare"))
    assert p["optimizer"]["state_bytes_per_param"] == 8.0
    assert any("state_bytes_per_param" in n for n in p["notes"])


def _preset(name: str) -> ModelConfig:
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONFIG_DIR / f"{name}.yaml"))
    return OmegaConf.to_object(merged)


def test_llama2_7b_plan_shows_published_size_and_16_bytes_per_param():
    cfg = root(model=_preset("llama2_7b"), strategy="fsdp", world_size=8, precision="bf16", micro_batch_size=1,
               seq_len=4096, global_batch_size=1024)
    p = plan(cfg)
    assert p["params"]["total"] == 6_738_415_616
    assert p["bytes_per_param_before_sharding"]["total"] == 16
    mem = p["memory_per_gpu"]
    assert mem["weights"] + mem["gradients"] + mem["optimizer"] == pytest.approx(16 * 6_738_415_616 / 8, abs=8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto means bf16 on a GPU")
def test_memory_per_rank_resolves_auto_like_the_trainer_on_cpu():
    assert memory_per_rank(root(precision="auto"), 4, "zero1") == memory_per_rank(root(precision="fp32"), 4, "zero1")
    assert plan(root(precision="auto"))["precision"] == "bf16"


def test_sam_plans_with_its_base_optimizers_state():
    from llmtrain.plan_layout import optimizer_state_bytes_per_param

    assert optimizer_state_bytes_per_param({"name": "sam", "base": "lion"}) == (4.0, None)
    assert optimizer_state_bytes_per_param({"name": "sam"}) == (8.0, None)  # base defaults to adamw


def _names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR.parent / group).glob("*.yaml"))


@pytest.mark.parametrize("override", [f"+experiment={n}" for n in _names("experiment")]
                         + [f"model={n}" for n in _names("model")])
def test_every_shipped_config_plans(override):
    from llmtrain.cli import compose

    p = plan(compose([override, "dry_run=true"]))
    assert p["memory_per_gpu"]["total"] > 0 and p["throughput"]["tokens_per_s_per_gpu"] > 0
    assert p["throughput"]["bound"] in ("compute", "memory_bound", "communication")
    json.dumps(p)
