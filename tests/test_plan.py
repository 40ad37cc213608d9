"""Dry-run planner against hand-computed numbers for one small LLaMA, plus the 7B acceptance check."""

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

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"

# Hand count for SMALL: head_dim 16, d_kv 32. Block: q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12288,
# SwiGLU 3*64*128 = 24576, two norms 128 -> 36992. Model: embed 6400 + 2 blocks + norm 64 + head 6400.
SMALL = ModelConfig(name="small", family="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                    vocab_size=100, max_seq_len=32, tie_embeddings=False)
BLOCK, TOTAL = 36992, 86848
# Saved activations per token and layer: 7d + 3 d_kv + 4f = 448 + 96 + 512.
PER_LAYER = 1056


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
    mem = memory_per_rank(root(), 4, "zero1")
    acts = (2 * PER_LAYER + 2 * 64) * 64 * 4 + 64 * 100 * (4 + 8)  # 64 tokens, fp32, + logits/loss
    assert mem == {
        "weights": 4 * TOTAL,
        "gradients": 4 * TOTAL,
        "optimizer": 8 * TOTAL // 4,  # AdamW, sharded over 4 ranks
        "working": 0,
        "activations": acts,
        "total": 8 * TOTAL + 2 * TOTAL + acts,
    }


def test_memory_fsdp_bf16_full_checkpointing_by_hand():
    model = ModelConfig(**{**SMALL.__dict__, "activation_checkpointing": "full"})
    mem = memory_per_rank(root(model=model, precision="bf16", optim="lion"), 4, "fsdp")
    root_params = TOTAL - 2 * BLOCK
    assert mem["weights"] == TOTAL and mem["gradients"] == TOTAL
    assert mem["optimizer"] == 4 * TOTAL // 4  # Lion: one fp32 momentum
    assert mem["working"] == 2 * BLOCK * 2 + BLOCK * 4 + root_params * 2
    assert mem["activations"] == (2 * 64 + PER_LAYER + 2 * 64) * 64 * 2 + 64 * 100 * (2 + 8)
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")


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


def test_plan_report_and_dry_run_file(tmp_path, capsys):
    p = run_dry_run(root(), str(tmp_path))
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved == json.loads(json.dumps(p))
    assert saved["params"] == {"total": TOTAL, "embedding": 6400, "non_embedding": TOTAL - 6400}
    assert saved["grad_accum_steps"] == 2  # 16 / (2 micro x 4 ranks)
    assert saved["fits"] is True
    tokens_per_s = 4 * 989e12 * 0.4 / saved["flops_per_token"]
    assert saved["throughput"]["tokens_per_day"] == pytest.approx(tokens_per_s * 86400)
    out = capsys.readouterr().out
    assert "parameters" in out and "fits" in out and "plan.json" in out


def test_plan_flags_what_does_not_fit_and_bad_batches():
    cfg = root()
    cfg.plan.gpu_memory_gb = 0.001
    assert plan(cfg)["fits"] is False
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


def test_llama2_7b_plan_shows_published_size_and_16_bytes_per_param():
    model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONFIG_DIR / "llama2_7b.yaml")))
    cfg = root(model=model, strategy="fsdp", world_size=8, precision="bf16", micro_batch_size=1, seq_len=4096,
               global_batch_size=1024)
    p = plan(cfg)
    assert p["params"]["total"] == 6_738_415_616
    assert p["bytes_per_param_before_sharding"]["total"] == 16
    mem = p["memory_per_gpu"]
    assert mem["weights"] + mem["gradients"] + mem["optimizer"] == pytest.approx(16 * 6_738_415_616 / 8, abs=8)


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_activation_estimate_matches_saved_tensors(family):
    """The per-token count agrees with what autograd actually saves (fp32, CPU) within 15%."""
    from llmtrain.plan import activation_bytes

    cfg = ModelConfig(family=family, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2 if family == "llama" else None,
                      ffn_hidden=128, vocab_size=100, max_seq_len=32)
    model = build_model(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    idx = torch.randint(0, 100, (2, 32))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(idx)
        torch.nn.functional.cross_entropy(logits.float().view(-1, 100), idx.view(-1))
    measured = sum(n for ptr, n in saved.items() if ptr not in params)
    assert activation_bytes(cfg, 2, 32, "fp32") == pytest.approx(measured, rel=0.15)


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto means bf16 on a GPU")
def test_memory_per_rank_resolves_auto_like_the_trainer_on_cpu():
    assert memory_per_rank(root(precision="auto"), 4, "zero1") == memory_per_rank(root(precision="fp32"), 4, "zero1")
    assert plan(root(precision="auto"))["precision"] == "bf16"


def test_sam_plans_with_its_base_optimizers_state():
    from llmtrain.plan import optimizer_state_bytes_per_param

    assert optimizer_state_bytes_per_param({"name": "sam", "base": "lion"}) == (4.0, None)
    assert optimizer_state_bytes_per_param({"name": "sam"}) == (8.0, None)  # base defaults to adamw
