"""Dry-run planner: size a run before renting GPUs (``llmtrain ... dry_run=true``), and the
pre-flight memory check every run makes before it allocates anything.

The model is built on the meta device, so nothing is allocated and even 70B plans in a second.
``plan.json`` holds the parameters, FLOPs per token (PaLM, Chowdhery et al. 2022, App. B:
6·N_matmul + 12·L·d·T, N_matmul = non-embedding parameters plus the output head), the modelled
peak memory per GPU by part (llmtrain/plan_memory.py) and the modelled step time by part, with
tokens/s per GPU and what bounds the step (llmtrain/plan_time.py), on the GPU ``plan.gpu`` names
(llmtrain/hardware.py). Both models are checked against published runs by
``scripts/validate_planner.py``; ``MEMORY_MODEL_ERROR`` is the memory model's largest error there.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from llmtrain.config import RootConfig
from llmtrain.errors import ConfigError, ResourceError
from llmtrain.hardware import DEFAULT_GPU, GpuSpec, available_memory_bytes, detect_gpu, gpu_spec
from llmtrain.plan_layout import (
    Layout,
    check_layout,
    flops_per_token,
    optimizer_state_bytes_per_param,
    param_counts,
)
from llmtrain.plan_memory import GRAD_BYTES, MASTER_BYTES, memory_per_gpu, peak_moment, runtime_reserve_bytes
from llmtrain.plan_time import step_time

__all__ = ["check_fits", "flops_per_token", "format_plan", "memory_per_rank", "param_counts", "plan", "run_dry_run"]

# Largest |error| of the modelled peak memory on the check rows of scripts/validate_planner.py
# (tests/test_plan_validation.py keeps this at or above what the script measures).
MEMORY_MODEL_ERROR = 0.08
SHORT_STEP_S = 0.01


def resolve_strategy(strategy: str, world_size: int) -> str:
    from llmtrain.distributed import resolve_strategy as resolve

    return resolve(strategy, world_size)


def planned_mfu(cfg: RootConfig) -> Optional[float]:
    """``plan.mfu`` as a number, or None for ``auto`` (the modelled step time)."""
    mfu = cfg.plan.mfu
    if isinstance(mfu, str):
        if mfu != "auto":
            raise ConfigError("plan.mfu", f"got {mfu!r}, expected auto or a number in (0, 1]")
        return None
    if isinstance(mfu, bool) or not 0 < mfu <= 1:
        raise ConfigError("plan.mfu", f"got {mfu!r}, expected auto or a number in (0, 1]")
    return float(mfu)


def resolve_gpu(cfg: RootConfig, device: Optional[torch.device] = None) -> tuple[GpuSpec, Optional[str]]:
    """The GPU to plan for (``plan.gpu``; ``auto`` = this machine's, with its real memory) with the
    ``plan.*`` overrides applied, and a note when ``auto`` fell back to the default."""
    p = cfg.plan
    detected = detect_gpu(device) if p.gpu == "auto" else None
    note = None
    if p.gpu != "auto":
        name = p.gpu
    elif detected is not None:
        name = detected.name
    else:
        name = DEFAULT_GPU
        note = f"plan.gpu=auto without a known GPU here: planned for {DEFAULT_GPU}; name another with plan.gpu=NAME"
    memory_gb = p.gpu_memory_gb
    if memory_gb is None and detected is not None:
        memory_gb = detected.memory_bytes / 1e9
    spec = gpu_spec(name, memory_gb=memory_gb, peak_tflops=p.gpu_peak_tflops, inter_node_gbps=p.inter_node_gbps)
    return spec, note


def layout_from_config(cfg: RootConfig, world_size: int, strategy: str, precision: str, gpu: GpuSpec) -> Layout:
    t = cfg.train
    bpp, _ = optimizer_state_bytes_per_param(cfg.optim)
    dp = world_size if strategy != "none" else 1
    layout = Layout(model=cfg.model, gpu=gpu, world_size=world_size, strategy=strategy,
                    gpus_per_node=cfg.distributed.gpus_per_node, micro_batch_size=t.micro_batch_size,
                    seq_len=t.seq_len, grad_accum_steps=max(1, t.global_batch_size // (t.micro_batch_size * dp)),
                    precision=precision, checkpointing=cfg.model.activation_checkpointing, compile=t.compile,
                    optimizer_state_bytes=bpp)
    check_layout(layout)
    return layout


def _run_precision(precision: str, device: Optional[torch.device]) -> str:
    """``auto`` as the trainer resolves it on ``device``: bf16 on a bf16-capable GPU, else fp32."""
    if precision != "auto":
        return precision
    on_gpu = torch.cuda.is_available() and (device is None or device.type == "cuda")
    return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"


def memory_per_rank(cfg: RootConfig, world_size: int, strategy: str,
                    precision: Optional[str] = None) -> dict[str, int]:
    """Modelled peak bytes per GPU by part (see llmtrain/plan_memory.py).

    ``precision`` defaults to ``cfg.train.precision``; ``auto`` resolves as the trainer does on
    this machine (bf16 on a bf16-capable GPU, else fp32). ``plan`` passes bf16 for ``auto``.
    """
    strategy = resolve_strategy(strategy, world_size)
    precision = _run_precision(precision or cfg.train.precision, None)
    gpu = gpu_spec(DEFAULT_GPU)  # memory does not depend on the GPU's speed
    return memory_per_gpu(layout_from_config(cfg, world_size, strategy, precision, gpu))


def memory_verdict(need: int, capacity: int) -> str:
    """fits / tight (within the model's error below capacity) / may not fit (within it above) /
    does not fit."""
    if need > capacity * (1 + MEMORY_MODEL_ERROR):
        return "does not fit"
    if need > capacity:
        return "may not fit"
    if need > capacity * (1 - MEMORY_MODEL_ERROR):
        return "tight"
    return "fits"


def _throughput(layout: Layout, cfg: RootConfig, fpt: int, world_size: int) -> dict[str, Any]:
    t = cfg.train
    modelled = step_time(layout)
    override = planned_mfu(cfg)
    per_gpu = float(modelled["tokens_per_s_per_gpu"])
    if override is not None:
        per_gpu = override * layout.gpu.peak_flops / fpt
    tokens_per_s = per_gpu * world_size
    tokens_per_step = t.global_batch_size * t.seq_len
    breakdown = {k: float(modelled[k]) for k in ("compute_s", "matmul_s", "attention_s", "memory_bound_s",
                                                  "communication_s", "exposed_communication_s", "step_s")}
    return {
        "tokens_per_s_per_gpu": per_gpu,
        "tokens_per_s": tokens_per_s,
        "tokens_per_day": tokens_per_s * 86400,
        "tokens_per_step": tokens_per_step,
        "step_time_s": tokens_per_step / tokens_per_s,
        "run_days": t.max_steps * tokens_per_step / tokens_per_s / 86400,
        "mfu": fpt * per_gpu / layout.gpu.peak_flops,
        "mfu_source": "modelled" if override is None else "plan.mfu",
        "gpu_peak_tflops": layout.gpu.peak_flops / 1e12,
        "bound": modelled["bound"],
        "modelled_breakdown_per_step": breakdown,
    }


def plan(cfg: RootConfig, world_size: Optional[int] = None) -> dict[str, Any]:
    """Parameters, FLOPs/token, per-GPU memory, fit and throughput of ``cfg`` on ``world_size`` GPUs."""
    world_size = world_size or cfg.distributed.world_size or 1
    if world_size < 1:
        raise ConfigError("distributed.world_size", f"got {world_size}, expected >= 1")
    strategy = resolve_strategy(cfg.distributed.strategy, world_size)
    precision = "bf16" if cfg.train.precision == "auto" else cfg.train.precision
    t, mcfg = cfg.train, cfg.model
    dp = world_size if strategy != "none" else 1
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError("train.global_batch_size",
                          f"{t.global_batch_size} is not divisible by train.micro_batch_size x world_size = "
                          f"{t.micro_batch_size} x {world_size}; use a multiple of {per_step}")
    gpu, gpu_note = resolve_gpu(cfg)
    layout = layout_from_config(cfg, world_size, strategy, precision, gpu)
    counts = param_counts(mcfg)
    bpp, note = optimizer_state_bytes_per_param(cfg.optim)
    mem = memory_per_gpu(layout)
    reserve = runtime_reserve_bytes(layout)
    fpt = flops_per_token(mcfg, t.seq_len)
    verdict = memory_verdict(int(mem["total"]) + reserve, gpu.memory_bytes)
    notes = [n for n in (note, gpu_note) if n]
    if strategy != cfg.distributed.strategy:
        notes.append(f"distributed.strategy={cfg.distributed.strategy} runs as {strategy} on {world_size} GPU(s); "
                     f"plan another size with distributed.world_size=N")
    if cfg.train.precision == "auto":
        notes.append("precision auto planned as bf16 (bf16-capable GPU)")
    throughput = _throughput(layout, cfg, fpt, world_size)
    if throughput["modelled_breakdown_per_step"]["step_s"] < SHORT_STEP_S:
        notes.append(f"a modelled step under {SHORT_STEP_S * 1e3:.0f} ms: kernel launches and Python overhead, which "
                     f"the model does not count, likely set the pace of a model this small")
    budget, budget_note = token_budget(cfg)
    if budget_note:
        notes.append(budget_note)
    if layout.grad_accum_steps > 1 and strategy in ("zero2", "fsdp", "hsdp"):
        notes.append(f"{layout.grad_accum_steps} accumulation steps: FSDP keeps unsharded fp32 gradients between "
                     f"micro-batches (accumulated_gradients); a larger micro-batch avoids them")
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
        "compile": t.compile,
        "micro_batch_size": t.micro_batch_size,
        "seq_len": t.seq_len,
        "grad_accum_steps": layout.grad_accum_steps,
        "optimizer": {"name": cfg.optim.get("name"), "state_bytes_per_param": bpp},
        "bytes_per_param_before_sharding": {
            "weights": MASTER_BYTES, "gradients": GRAD_BYTES, "optimizer": bpp,
            "total": MASTER_BYTES + GRAD_BYTES + bpp,
        },
        "gpu": {"name": gpu.name, "peak_tflops": gpu.peak_flops / 1e12, "memory_bytes": gpu.memory_bytes,
                "hbm_bytes_per_s": gpu.hbm_bytes_per_s, "intra_node_bytes_per_s": gpu.intra_node_bytes_per_s,
                "inter_node_bytes_per_s": gpu.inter_node_bytes_per_s, "validated": gpu.validated},
        "memory_per_gpu": mem,
        "memory_peak_at": peak_moment(layout),
        "gpu_memory_bytes": gpu.memory_bytes,
        "runtime_reserve_bytes": reserve,
        "memory_model_error": MEMORY_MODEL_ERROR,
        "memory_verdict": verdict,
        "fits": verdict in ("fits", "tight"),
        "throughput": throughput,
        "epochs": None if budget is None else budget["epochs"],
        "token_budget": budget,
        "notes": notes,
    }


def token_budget(cfg: RootConfig) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """Planned tokens against the training split (llmtrain/data/budget.py), and why it is unknown if so."""
    from llmtrain.data.budget import corpus_size, run_budget

    size, why = corpus_size(cfg.data)
    if size is None:
        return None, why
    t = cfg.train
    return run_budget(t.max_steps, t.global_batch_size, t.seq_len, list(cfg.data.sources), size), None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


BOUND_WORDS = {"compute": "compute-bound", "memory_bound": "memory-bound", "communication": "communication-bound"}
MEMORY_ROWS = ("weights", "gradients", "optimizer", "working", "accumulated_gradients", "activations", "recompute",
               "loss", "allocator")


def format_plan(p: dict[str, Any]) -> str:
    """A table a person reads before launching the run."""
    mem, par, thr, gpu = p["memory_per_gpu"], p["params"], p["throughput"], p["gpu"]
    bpp, parts = p["bytes_per_param_before_sharding"], thr["modelled_breakdown_per_step"]
    rows = [
        ("model", f"{p['model']} ({p['family']})"),
        ("parameters", f"{_human(par['total'])} ({par['total']:,}); embedding {par['embedding']:,}, "
                       f"non-embedding {par['non_embedding']:,}"),
        ("FLOPs / token", f"{_human(p['flops_per_token'])} ({p['flops_formula']})"),
        ("layout", f"{p['strategy']} on {p['world_size']} GPU(s), {p['precision']}, micro-batch "
                   f"{p['micro_batch_size']} x {p['seq_len']} tokens, {p['grad_accum_steps']} accumulation step(s), "
                   f"checkpointing {p['activation_checkpointing']}{', compiled' if p['compile'] else ''}"),
        ("GPU", f"{gpu['name']}: {gpu['peak_tflops']:g} TFLOP/s bf16, {gpu['memory_bytes'] / 1e9:g} GB at "
                f"{gpu['hbm_bytes_per_s'] / 1e12:g} TB/s, {gpu['intra_node_bytes_per_s'] / 1e9:g} GB/s in a node, "
                f"{gpu['inter_node_bytes_per_s'] / 1e9:g} GB/s between nodes"
                f"{'' if gpu['validated'] else ' (efficiencies not validated on this GPU)'}"),
        ("optimizer", f"{p['optimizer']['name']}: {p['optimizer']['state_bytes_per_param']:g} B/param of state"),
        ("bytes/param", f"{bpp['total']:g} before sharding (weights {bpp['weights']} + grads {bpp['gradients']} "
                        f"+ optimizer {bpp['optimizer']:g})"),
    ]
    rows.extend((f"  {key.replace('_', ' ')}", _gib(mem[key])) for key in MEMORY_ROWS if mem[key])
    rows.append(("memory / GPU", f"{_gib(mem['total'])} at its peak ({p['memory_peak_at']}) + "
                                 f"{_gib(p['runtime_reserve_bytes'])} CUDA/NCCL of {_gib(p['gpu_memory_bytes'])} "
                                 f"-> {p['memory_verdict']} (model error ±{p['memory_model_error']:.0%})"))
    rows.append(("step time", f"{parts['step_s']:.3g} s modelled: compute {parts['compute_s']:.3g} s "
                              f"(matmul {parts['matmul_s']:.3g}, attention {parts['attention_s']:.3g}), memory-bound "
                              f"{parts['memory_bound_s']:.3g} s, communication {parts['communication_s']:.3g} s "
                              f"of which "
                              f"{parts['exposed_communication_s']:.3g} s exposed -> {BOUND_WORDS[thr['bound']]}"))
    source = "modelled" if thr["mfu_source"] == "modelled" else "from plan.mfu"
    rows.append(("throughput", f"{thr['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, "
                               f"{_human(thr['tokens_per_s'])} tokens/s, "
                               f"{_human(thr['tokens_per_day'])} tokens/day; MFU {thr['mfu']:.0%} ({source})"))
    rows.append(("run", f"{thr['step_time_s']:.2f} s/step, {thr['run_days']:.2f} days for the configured max_steps"))
    budget = p.get("token_budget")
    if budget is not None and budget["epochs"] is not None:
        how = "" if budget["train_split_tokens_source"] == "prepared" else " (estimated from data.sources[].tokens)"
        rows.append(("data", f"{_human(budget['planned_tokens'])} tokens planned over a "
                             f"{_human(budget['train_split_tokens'])}-token training split{how}: "
                             f"{budget['epochs']:,.2f} epochs"))
    rows.extend(("note", n) for n in p["notes"])
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run_dry_run(cfg: RootConfig, run_dir: str) -> dict[str, Any]:
    """Print the plan and write ``run_dir/plan.json``; allocates no model memory."""
    from llmtrain.data.budget import epochs_warning

    p = plan(cfg)
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(p, indent=2) + "\n")
    print(format_plan(p))
    warning = epochs_warning(p["token_budget"]) if p["token_budget"] else None
    if warning:
        print(warning, file=sys.stderr)
    print(f"plan written to {out / 'plan.json'}")
    return p


def check_fits(cfg: RootConfig, world_size: int, strategy: str, device: torch.device) -> Optional[str]:
    """Refuse a run the machine cannot hold before allocating anything (no OOM crash).

    Refuses only when the modelled peak is over capacity by more than the memory model's own
    error; within that band it warns (and returns the warning). ``plan.check=false`` skips it.
    On CPU the capacity is the host's available memory.
    """
    planned_mfu(cfg)  # a bad plan.* value is an error at start-up, not only in dry runs
    gpu, _ = resolve_gpu(cfg, device)
    if not cfg.plan.check:
        return None
    layout = layout_from_config(cfg, world_size, strategy, _run_precision(cfg.train.precision, device), gpu)
    need = int(memory_per_gpu(layout)["total"]) + (runtime_reserve_bytes(layout) if device.type == "cuda" else 0)
    have = available_memory_bytes(device)
    verdict = memory_verdict(need, have)
    what = (f"{cfg.model.name} needs ~{need / 2**30:.1f} GiB per rank under strategy={strategy} with "
            f"{world_size} rank(s), but this {device.type} has {have / 2**30:.1f} GiB")
    if verdict == "does not fit":
        raise ResourceError(
            "model",
            f"{what}; see the plan with dry_run=true, or launch on more GPUs (torchrun --nproc_per_node=N, "
            f"distributed.strategy=fsdp), or skip this check with plan.check=false",
        )
    if verdict == "may not fit" and int(os.environ.get("RANK", "0")) == 0:
        warning = f"warning: {what} (within the memory model's ±{MEMORY_MODEL_ERROR:.0%}); it may run out of memory"
        print(warning, file=sys.stderr)
        return warning
    return None
