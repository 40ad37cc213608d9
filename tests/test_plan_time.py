"""The step-time model: one matmul, flash attention and a 2-layer step by hand on a GPU with round
numbers, communication by hand, and the effects a planner must show (checkpointing, compile,
sequence length, communication at scale)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from llmtrain.config import DistributedConfig, RootConfig, TrainConfig
from llmtrain.hardware import HBM_EFFICIENCY, LINK_EFFICIENCY, GpuSpec
from llmtrain.models.config import ModelConfig
from llmtrain.plan import plan
from llmtrain.plan_layout import Layout
from llmtrain.plan_time import attention_seconds, communication_seconds, compute_seconds, gemm_seconds, step_time

# 100 TFLOP/s, half of it in matmuls and attention; 1 TB/s HBM; 100 GB/s NVLink, 10 GB/s between nodes
ROUND = GpuSpec("round", peak_flops=100e12, fp32_flops=10e12, memory_bytes=80 * 10**9, hbm_bytes_per_s=1e12,
                intra_node_bytes_per_s=100e9, inter_node_bytes_per_s=10e9, matmul_efficiency=0.5,
                attention_efficiency=0.5)
SMALL = ModelConfig(name="small", family="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                    vocab_size=100, max_seq_len=256, tie_embeddings=False)
BLOCK, TOTAL = 36992, 86848
HBM = 1e12 * HBM_EFFICIENCY


def layout(**kw) -> Layout:
    base = dict(model=SMALL, gpu=ROUND, micro_batch_size=2, seq_len=256, precision="bf16")
    base.update(kw)
    return Layout(**base)


def roofline(flops: float, nbytes: float) -> float:
    """Time of a matmul: the soft maximum (p = 2) of its compute and its memory traffic."""
    return math.hypot(flops / (100e12 * 0.5), nbytes / HBM)


def test_one_matmul_by_hand():
    # 4096^3: 137.4 GFLOP at 50 TFLOP/s = 2.749 ms; 3 x 4096^2 bf16 = 100.7 MB at 0.8 TB/s = 0.126 ms
    t = gemm_seconds(4096, 4096, 4096, layout())
    assert t == pytest.approx(math.hypot(2 * 4096**3 / 50e12, 2 * 3 * 4096**2 / 0.8e12), rel=1e-12)
    # a thin matmul is bound by its traffic: 64 x 64 by 64 x 8192 moves 2 MB for 67 MFLOP
    thin = gemm_seconds(64, 64, 8192, layout())
    assert thin == pytest.approx(roofline(2 * 64 * 64 * 8192, 2 * (64 * 64 + 64 * 8192 + 64 * 8192)))
    assert thin > 2 * (2 * 64 * 64 * 8192 / 50e12)


def test_flash_attention_by_hand():
    # causal forward: 2·b·s²·d = 2·2·256²·64 FLOPs at 0.5 x 256/(256+256) of peak; backward 2.5x
    fwd, bwd = attention_seconds(layout())
    expected = 2 * 2 * 256**2 * 64 / (100e12 * 0.5 * 0.5)
    assert fwd == pytest.approx(expected) and bwd == pytest.approx(2.5 * expected)


def test_two_layer_step_by_hand():
    lay = layout()
    m = 2 * 256  # tokens in the micro-batch
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    block_mm = sum(roofline(2 * m * k * n, 2 * (m * k + k * n + m * n)) for k, n in shapes)
    head_mm = roofline(2 * m * 64 * 100, 2 * (m * 64 + 64 * 100 + m * 100))
    attn = 2 * 2 * 256**2 * 64 / (100e12 * 0.25)
    elementwise = m * (124 * 64 + 36 * 32 + 10 * 128) / HBM  # one block's eager forward
    loss = m * 100 * 44 / HBM
    optimizer = TOTAL * (12 + 2 * 8 + 12) / HBM  # AdamW step, clipping; one GPU
    c = compute_seconds(lay)
    assert c["matmul"] == pytest.approx(2 * 3 * block_mm + 3 * head_mm)
    assert c["attention"] == pytest.approx(2 * 3.5 * attn)
    assert c["elementwise"] == pytest.approx(2 * 3 * elementwise)
    assert c["loss"] == pytest.approx(loss)
    t = step_time(lay)
    assert t["exposed_communication_s"] == 0.0
    assert t["step_s"] == pytest.approx(c["matmul"] + c["attention"] + c["elementwise"] + loss + optimizer)
    assert t["tokens_per_s_per_gpu"] == pytest.approx(m / t["step_s"])


def test_full_checkpointing_reruns_the_forward_of_every_block():
    none, full = compute_seconds(layout()), compute_seconds(layout(checkpointing="full"))
    assert full["attention"] == pytest.approx(none["attention"] * 4.5 / 3.5)
    assert full["elementwise"] == pytest.approx(none["elementwise"] * 4 / 3)
    head_mm = gemm_seconds(512, 64, 100, layout())
    assert full["matmul"] - none["matmul"] == pytest.approx((none["matmul"] - 3 * head_mm) / 3)


def test_fsdp_communication_by_hand():
    # 16 GPUs on 2 nodes of 8: a ring over both nodes moves 15/16 of each buffer per rank at
    # min(NVLink, 8 NICs) = 80 GB/s x LINK_EFFICIENCY
    lay = layout(world_size=16, strategy="fsdp", gpus_per_node=8, grad_accum_steps=1)
    bw = 80e9 * LINK_EFFICIENCY
    ring = 15 / 16
    root = TOTAL - 2 * BLOCK
    total = (2 * (root + BLOCK) + 2 * BLOCK + 0) * ring / bw + (4 * BLOCK + 4 * (root + BLOCK)) * ring / bw
    comm = communication_seconds(lay, compute_seconds(lay))
    assert comm["total"] == pytest.approx(total)


def test_hsdp_reduces_across_nodes_on_each_gpus_own_nic():
    lay = layout(world_size=16, strategy="hsdp", gpus_per_node=8)
    fsdp_within = communication_seconds(dataclasses.replace(lay, world_size=8, strategy="fsdp"),
                                        compute_seconds(lay))
    comm = communication_seconds(lay, compute_seconds(lay))
    cross = 2 * (4 * TOTAL / 8) * (1 / 2) / (10e9 * LINK_EFFICIENCY)
    assert comm["total"] == pytest.approx(fsdp_within["total"] + cross)


def cfg(model="llama3_8b", world_size=8, micro=2, seq=8192, ckpt="selective", compile=False, **plan_keys) -> RootConfig:
    from omegaconf import OmegaConf

    from conftest import REPO

    mcfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                               OmegaConf.load(REPO / "configs" / "model" / f"{model}.yaml")))
    mcfg.activation_checkpointing = ckpt
    train = TrainConfig(micro_batch_size=micro, seq_len=seq, global_batch_size=micro * world_size, precision="bf16",
                        compile=compile)
    root = RootConfig(model=mcfg, train=train,
                      distributed=DistributedConfig(strategy="fsdp", world_size=world_size))
    for key, value in plan_keys.items():
        setattr(root.plan, key, value)
    return root


def test_fp32_matmuls_run_at_the_fp32_peak():
    """llmtrain leaves TF32 off, so fp32 matmuls get the GPU's fp32 rate, not its tensor cores'."""
    t = gemm_seconds(4096, 4096, 4096, layout(precision="fp32"))
    assert t == pytest.approx(math.hypot(2 * 4096**3 / (10e12 * 0.5), 4 * 3 * 4096**2 / 0.8e12))


def test_throughput_depends_on_checkpointing():
    tps = {mode: plan(cfg(ckpt=mode))["throughput"]["tokens_per_s_per_gpu"] for mode in ("none", "selective", "full")}
    assert tps["none"] > tps["selective"] > tps["full"]


def test_compile_speeds_up_the_memory_bound_part():
    eager, compiled = (plan(cfg(compile=c))["throughput"] for c in (False, True))
    assert compiled["tokens_per_s_per_gpu"] > eager["tokens_per_s_per_gpu"]
    assert (compiled["modelled_breakdown_per_step"]["memory_bound_s"]
            < eager["modelled_breakdown_per_step"]["memory_bound_s"])
    assert eager["modelled_breakdown_per_step"]["compute_s"] == compiled["modelled_breakdown_per_step"]["compute_s"]


def test_exposed_communication_lowers_per_gpu_throughput():
    """Short micro-batches of an 8B model cannot hide FSDP's all-gathers behind compute: the step
    is communication-bound, and a slower network between nodes makes it slower per GPU."""
    one_node = plan(cfg(micro=1, seq=512))["throughput"]
    slow_net = plan(cfg(world_size=64, micro=1, seq=512, inter_node_gbps=25))["throughput"]
    assert one_node["bound"] == "communication"
    assert slow_net["tokens_per_s_per_gpu"] < 0.8 * one_node["tokens_per_s_per_gpu"]
    big = plan(cfg(micro=2, seq=8192))["throughput"]
    assert big["bound"] == "compute"


def test_named_gpus_differ():
    h100, a100 = (plan(cfg(gpu=g))["throughput"]["tokens_per_s_per_gpu"] for g in ("h100_sxm_80gb", "a100_80gb"))
    assert h100 > 2 * a100
