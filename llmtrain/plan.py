"""Dry-run planner: size a run before renting GPUs (``llmtrain ... dry_run=true``).

The model is built on the meta device, so nothing is allocated and even 70B plans in a second.
Everything below is an estimate of *peak* memory per GPU, in bytes, under this accounting:

- ``weights``: fp32 master weights, 4 B/param, divided by the parameter-sharding factor.
- ``gradients``: fp32 gradients, 4 B/param (FSDP reduces in fp32), divided by the gradient-sharding factor.
- ``optimizer``: ``state_bytes_per_param`` of the optimizer class (AdamW 8, Lion 4, 8-bit Adam ~2),
  divided by the optimizer-sharding factor.
- ``working``: low-precision and gathered copies that exist only during forward/backward:
  with bf16/fp16 and replicated parameters, autocast caches a 2 B/param copy of every weight;
  zero2 (FSDP2 without resharding after forward) holds every parameter unsharded in the compute
  dtype; fsdp/hsdp hold two blocks unsharded (the current one and the prefetched next one), the
  root module (embeddings, head) unsharded, and one block's unsharded fp32 gradient before the
  reduce-scatter.
- ``activations``: tensors saved for backward, counted per token and layer for SDPA's
  flash/memory-efficient kernels (no T x T score matrix is stored):
  LLaMA 7d + 3·d_kv + 4f (norm in/out 2d, q and k before and after RoPE 2d + 2·d_kv, v d_kv,
  attention output d, MLP norm in/out 2d, gate, up, silu(gate), product 4f); GPT 8d + 2f.
  Full checkpointing keeps only each block's input (d) plus one block being recomputed;
  selective (every other block) keeps full activations for the odd blocks. The head adds the
  logits, their fp32 copy for the loss and its gradient: B·T·V·(act_bytes + 8). Element size is
  2 B under bf16/fp16 and 4 B under fp32; ``plan`` treats ``auto`` precision as bf16 (a GPU run).

Sharding factors with N ranks (S = min(gpus_per_node, N) for hsdp):
none/ddp 1/1/1, zero1 1/1/N, zero2 N/N/N (+ unsharded working copy), fsdp N/N/N, hsdp S/S/S.
A plan "fits" when the total is at most 90% of ``plan.gpu_memory_gb`` (decimal GB): the rest is
left for the CUDA context, NCCL buffers and allocator fragmentation.

FLOPs per token (PaLM, Chowdhery et al. 2022, App. B): 6·N_matmul + 12·L·d·T, where N_matmul is
every weight that multiplies a token (non-embedding parameters plus the output head, tied or
not) and 12·L·d·T the attention score and value products at sequence length T.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import torch

from llmtrain.config import RootConfig
from llmtrain.errors import ConfigError
from llmtrain.models import build_model
from llmtrain.models.config import ModelConfig
from llmtrain.models.llama import llama_ffn_hidden

DEFAULT_STATE_BYTES_PER_PARAM = 8.0  # AdamW's two fp32 moments, when an optimizer does not say
MASTER_BYTES = 4                     # fp32 master weights
GRAD_BYTES = 4                       # fp32 gradients
FIT_FRACTION = 0.9


def resolve_strategy(strategy: str, world_size: int) -> str:
    from llmtrain.distributed import resolve_strategy as resolve

    return resolve(strategy, world_size)


def _meta_model(mcfg: ModelConfig):
    with torch.device("meta"):
        return build_model(mcfg)


_COUNTS: dict[str, dict[str, int]] = {}


def param_counts(mcfg: ModelConfig) -> dict[str, int]:
    """total, embedding (input token/position tables), non_embedding, per_block, matmul."""
    key = repr(mcfg)
    if key not in _COUNTS:
        _COUNTS[key] = _count(mcfg)
    return dict(_COUNTS[key])


def _count(mcfg: ModelConfig) -> dict[str, int]:
    model = _meta_model(mcfg)
    total = model.num_params()
    non_embedding = model.num_params(exclude_embeddings=True)
    per_block = sum(p.numel() for p in model.layers[0].parameters())
    head = mcfg.vocab_size * mcfg.d_model
    return {
        "total": total,
        "embedding": total - non_embedding,
        "non_embedding": non_embedding,
        "per_block": per_block,
        # weights that multiply every token: the non-embedding ones plus the head (tied heads
        # were excluded with the embedding they share)
        "matmul": non_embedding + (head if mcfg.tie_embeddings else 0),
    }


def flops_per_token(mcfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6·N_matmul + 12·n_layers·d_model·seq_len (PaLM App. B)."""
    return 6 * param_counts(mcfg)["matmul"] + 12 * mcfg.n_layers * mcfg.d_model * seq_len


def optimizer_state_bytes_per_param(optim: dict[str, Any]) -> tuple[float, Optional[str]]:
    """The optimizer class's ``state_bytes_per_param``, or 8.0 and a note saying it was assumed."""
    from llmtrain.optim import OPTIMIZERS

    name = optim.get("name")
    if name == "sam":  # a wrapper: its state is its base optimizer's
        name = optim.get("base", "adamw")
    cls = OPTIMIZERS.get(name)
    value = getattr(cls, "state_bytes_per_param", None) if cls is not None else None
    if value is None:
        return DEFAULT_STATE_BYTES_PER_PARAM, (
            f"optimizer {name!r} does not declare state_bytes_per_param; assumed {DEFAULT_STATE_BYTES_PER_PARAM} (AdamW)")
    return float(value), None


def _act_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def _shard_factors(strategy: str, world_size: int, gpus_per_node: int) -> tuple[int, int, int]:
    n = world_size
    s = max(1, min(gpus_per_node, n))
    return {
        "none": (1, 1, 1), "ddp": (1, 1, 1), "zero1": (1, 1, n),
        "zero2": (n, n, n), "fsdp": (n, n, n), "hsdp": (s, s, s),
    }[strategy]


def activation_bytes(mcfg: ModelConfig, micro_batch_size: int, seq_len: int, precision: str) -> int:
    """Bytes saved for backward by one micro-batch (see the module docstring for the count)."""
    d, L = mcfg.d_model, mcfg.n_layers
    d_kv = (mcfg.n_kv_heads or mcfg.n_heads) * (d // mcfg.n_heads)
    if mcfg.family == "llama":
        per_layer = 7 * d + 3 * d_kv + 4 * llama_ffn_hidden(mcfg)
    else:
        per_layer = 8 * d + 2 * (mcfg.ffn_hidden or 4 * d)
    mode = mcfg.activation_checkpointing
    if mode == "full":
        elements = L * d + per_layer
    elif mode == "selective":
        checkpointed = math.ceil(L / 2)
        elements = checkpointed * d + (L - checkpointed) * per_layer + per_layer
    else:
        elements = L * per_layer
    b = _act_bytes(precision)
    tokens = micro_batch_size * seq_len
    head = tokens * mcfg.vocab_size * (b + 8)
    return tokens * (elements + 2 * d) * b + head  # + final norm in/out


def memory_per_rank(cfg: RootConfig, world_size: int, strategy: str,
                    precision: Optional[str] = None) -> dict[str, int]:
    """Peak bytes per GPU: weights, gradients, optimizer, working, activations, total.

    ``precision`` defaults to ``cfg.train.precision``; ``auto`` resolves as the trainer does on
    this machine (bf16 on a bf16-capable GPU, else fp32), since the trainer calls this to refuse a
    run that cannot fit. ``plan`` passes bf16 for ``auto`` because it plans GPU runs.
    """
    strategy = resolve_strategy(strategy, world_size)
    precision = precision or cfg.train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    mcfg = cfg.model
    counts = param_counts(mcfg)
    P = counts["total"]
    w_shard, g_shard, o_shard = _shard_factors(strategy, world_size, cfg.distributed.gpus_per_node)
    bpp, _ = optimizer_state_bytes_per_param(cfg.optim)
    low = precision in ("bf16", "fp16")
    compute_bytes = 2 if low else 4
    if strategy in ("none", "ddp", "zero1"):
        working = 2 * P if low else 0
    elif strategy == "zero2":
        working = P * compute_bytes
    else:
        root = P - mcfg.n_layers * counts["per_block"]
        working = 2 * counts["per_block"] * compute_bytes + counts["per_block"] * GRAD_BYTES + root * compute_bytes
    mem = {
        "weights": math.ceil(MASTER_BYTES * P / w_shard),
        "gradients": math.ceil(GRAD_BYTES * P / g_shard),
        "optimizer": math.ceil(bpp * P / o_shard),
        "working": int(working),
        "activations": activation_bytes(mcfg, cfg.train.micro_batch_size, cfg.train.seq_len, precision),
    }
    mem["total"] = sum(mem.values())
    return mem


def plan(cfg: RootConfig, world_size: Optional[int] = None) -> dict[str, Any]:
    """Parameters, FLOPs/token, per-GPU memory, fit and throughput of ``cfg`` on ``world_size`` GPUs."""
    world_size = world_size or cfg.distributed.world_size or 1
    if world_size < 1:
        raise ConfigError("distributed.world_size", f"got {world_size}, expected >= 1")
    strategy = resolve_strategy(cfg.distributed.strategy, world_size)
    precision = "bf16" if cfg.train.precision == "auto" else cfg.train.precision
    t, mcfg = cfg.train, cfg.model
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError("train.global_batch_size",
                          f"{t.global_batch_size} is not divisible by train.micro_batch_size x world_size = "
                          f"{t.micro_batch_size} x {world_size}; use a multiple of {per_step}")
    counts = param_counts(mcfg)
    bpp, note = optimizer_state_bytes_per_param(cfg.optim)
    mem = memory_per_rank(cfg, world_size, strategy, precision)
    capacity = int(cfg.plan.gpu_memory_gb * 1e9)
    fpt = flops_per_token(mcfg, t.seq_len)
    cluster_flops = world_size * cfg.plan.gpu_peak_tflops * 1e12 * cfg.plan.mfu
    tokens_per_s = cluster_flops / fpt
    tokens_per_step = t.global_batch_size * t.seq_len
    notes = [note] if note else []
    if strategy != cfg.distributed.strategy:
        notes.append(f"distributed.strategy={cfg.distributed.strategy} runs as {strategy} on {world_size} GPU(s); "
                     f"plan another size with distributed.world_size=N")
    if cfg.train.precision == "auto":
        notes.append("precision auto planned as bf16 (bf16-capable GPU)")
    return {
        "model": mcfg.name,
        "family": mcfg.family,
        "params": {k: counts[k] for k in ("total", "embedding", "non_embedding")},
        "flops_per_token": fpt,
        "flops_formula": "6*N_matmul + 12*n_layers*d_model*seq_len (PaLM App. B); "
                         "N_matmul = non-embedding params + output head",
        "strategy": strategy,
        "world_size": world_size,
        "gpus_per_node": cfg.distributed.gpus_per_node,
        "precision": precision,
        "activation_checkpointing": mcfg.activation_checkpointing,
        "micro_batch_size": t.micro_batch_size,
        "seq_len": t.seq_len,
        "grad_accum_steps": t.global_batch_size // per_step,
        "optimizer": {"name": cfg.optim.get("name"), "state_bytes_per_param": bpp},
        "bytes_per_param_before_sharding": {
            "weights": MASTER_BYTES, "gradients": GRAD_BYTES, "optimizer": bpp,
            "total": MASTER_BYTES + GRAD_BYTES + bpp,
        },
        "memory_per_gpu": mem,
        "gpu_memory_bytes": capacity,
        "fits": mem["total"] <= FIT_FRACTION * capacity,
        "throughput": {
            "mfu": cfg.plan.mfu,
            "gpu_peak_tflops": cfg.plan.gpu_peak_tflops,
            "tokens_per_s": tokens_per_s,
            "tokens_per_day": tokens_per_s * 86400,
            "tokens_per_step": tokens_per_step,
            "step_time_s": tokens_per_step / tokens_per_s,
            "run_days": t.max_steps * tokens_per_step / tokens_per_s / 86400,
        },
        "notes": notes,
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_plan(p: dict[str, Any]) -> str:
    """A table a person reads before launching the run."""
    mem, par, thr = p["memory_per_gpu"], p["params"], p["throughput"]
    bpp = p["bytes_per_param_before_sharding"]
    rows = [
        ("model", f"{p['model']} ({p['family']})"),
        ("parameters", f"{_human(par['total'])} ({par['total']:,}); embedding {par['embedding']:,}, "
                       f"non-embedding {par['non_embedding']:,}"),
        ("FLOPs / token", f"{_human(p['flops_per_token'])} ({p['flops_formula']})"),
        ("layout", f"{p['strategy']} on {p['world_size']} GPU(s), {p['precision']}, micro-batch "
                   f"{p['micro_batch_size']} x {p['seq_len']} tokens, {p['grad_accum_steps']} accumulation step(s), "
                   f"checkpointing {p['activation_checkpointing']}"),
        ("optimizer", f"{p['optimizer']['name']}: {p['optimizer']['state_bytes_per_param']:g} B/param of state"),
        ("bytes/param", f"{bpp['total']:g} before sharding (weights {bpp['weights']} + grads {bpp['gradients']} "
                        f"+ optimizer {bpp['optimizer']:g})"),
    ]
    for key in ("weights", "gradients", "optimizer", "working", "activations"):
        rows.append((f"  {key}", _gib(mem[key])))
    verdict = "fits" if p["fits"] else "DOES NOT FIT"
    rows.append(("memory / GPU", f"{_gib(mem['total'])} of {p['gpu_memory_bytes'] / 1e9:g} GB "
                                 f"({_gib(p['gpu_memory_bytes'])}) -> {verdict} (limit {FIT_FRACTION:.0%})"))
    rows.append(("throughput", f"{_human(thr['tokens_per_s'])} tokens/s, {_human(thr['tokens_per_day'])} tokens/day "
                               f"at MFU {thr['mfu']:.0%} of {thr['gpu_peak_tflops']:g} TFLOP/s per GPU"))
    rows.append(("run", f"{thr['step_time_s']:.2f} s/step, {thr['run_days']:.2f} days for the configured max_steps"))
    rows.extend(("note", n) for n in p["notes"])
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run_dry_run(cfg: RootConfig, run_dir: str) -> dict[str, Any]:
    """Print the plan and write ``run_dir/plan.json``; allocates no model memory."""
    p = plan(cfg)
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(p, indent=2) + "\n")
    print(format_plan(p))
    print(f"plan written to {out / 'plan.json'}")
    return p
