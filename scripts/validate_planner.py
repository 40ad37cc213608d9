"""The planner against published training runs: predicted vs published tokens/s/GPU and memory.

    python scripts/validate_planner.py              # a plain table
    python scripts/validate_planner.py --markdown   # the README's table

Each row is a published configuration (model, GPUs, sharding, micro-batch, sequence length,
activation checkpointing, torch.compile) run through the same models ``dry_run=true`` uses. Rows
marked ``calibrate`` set the few fitted constants (each GPU's matmul efficiency, the allocator's
share); every other row is only checked. Rows with float8 linears or tensor/context parallelism
are left out for throughput (llmtrain has neither); a float8 row whose memory torchtitan shows
to be float8-independent is kept for memory only.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from llmtrain.hardware import gpu_spec
from llmtrain.models.config import ModelConfig
from llmtrain.plan_layout import Layout
from llmtrain.plan_memory import memory_parts, memory_per_gpu, peak_allocated
from llmtrain.plan_time import step_time

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"

# Permalinks to the commits whose tables are copied below.
TORCHTITAN_H100 = ("https://github.com/pytorch/torchtitan/blob/820504e20d1149fbf0b98c567af24c4b0433b22d/"
                   "benchmarks/llama3_h100_202412_torchtitan.md")
# "Llama 3 performance numbers" and "Llama 2 performance numbers" on 64 A100 80GB (2024-08)
TORCHTITAN_A100 = ("https://github.com/pytorch/torchtitan/blob/3faaa1a0dee68ce028400e3dafd1735d152cb4f8/"
                   "docs/performance.md")
LLM_FOUNDRY = ("https://github.com/mosaicml/llm-foundry/blob/495218376830947dce625efabc4d86be7c47cc45/"
               "scripts/train/benchmarking/README.md")
SOURCE_NAMES = {TORCHTITAN_H100: "torchtitan-h100", TORCHTITAN_A100: "torchtitan-a100", LLM_FOUNDRY: "llm-foundry"}


def preset(name: str, seq_len: int) -> ModelConfig:
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONFIG_DIR / f"{name}.yaml"))
    model: ModelConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    return dataclasses.replace(model, max_seq_len=max(model.max_seq_len, seq_len))


def mpt(size: str, seq_len: int) -> ModelConfig:
    """llm-foundry's MPT (scripts/train/yamls/pretrain/mpt-*.yaml): a GPT block with a 4d GELU MLP,
    tied 50,368-token embeddings and learned positions in these benchmarks."""
    d_model, n_heads, n_layers = {
        "125m": (768, 12, 12), "350m": (1024, 16, 24), "760m": (1536, 12, 24), "1b": (2048, 16, 24),
        "3b": (2560, 20, 32), "7b": (4096, 32, 32), "13b": (5120, 40, 40), "30b": (7168, 56, 48),
        "70b": (8192, 64, 80),
    }[size]
    return ModelConfig(name=f"mpt_{size}", family="gpt", n_layers=n_layers, d_model=d_model, n_heads=n_heads,
                       vocab_size=50368, max_seq_len=seq_len, tie_embeddings=True)


@dataclass(frozen=True)
class PublishedRun:
    label: str
    source: str                      # URL of the table
    table: str                       # which table / row
    model: ModelConfig
    gpu: str
    world_size: int
    strategy: str
    micro_batch_size: int
    seq_len: int
    grad_accum_steps: int
    checkpointing: str
    compile: bool
    tokens_per_s_per_gpu: Optional[float]  # published; None = not usable for throughput
    memory_gib: Optional[float]            # published peak reserved memory; None = not published
    calibrates: tuple[str, ...] = ()       # "throughput" / "memory": the row sets a fitted constant
    inter_node_gbps: Optional[float] = None
    logits_held_in_backward: bool = True  # torchtitan deletes its logits before backward

    def layout(self) -> Layout:
        return Layout(model=self.model, gpu=gpu_spec(self.gpu, inter_node_gbps=self.inter_node_gbps),
                      world_size=self.world_size, strategy=self.strategy, micro_batch_size=self.micro_batch_size,
                      seq_len=self.seq_len, grad_accum_steps=self.grad_accum_steps, precision="bf16",
                      checkpointing=self.checkpointing, compile=self.compile, optimizer_state_bytes=8.0,
                      logits_held_in_backward=self.logits_held_in_backward)


def _tt(label, table, model, world, mbs, seq, ckpt, compile, tps, mem, gpu="h100_96gb", calibrates=()):
    source = TORCHTITAN_H100 if gpu == "h100_96gb" else TORCHTITAN_A100
    return PublishedRun(label, source, table, model, gpu, world, "fsdp", mbs, seq, 1, ckpt, compile, tps, mem,
                        calibrates, logits_held_in_backward=False)


def _foundry(label, table, size, seq, world, mbs, accum, ckpt, tps, gpu):
    return PublishedRun(label, LLM_FOUNDRY, table, mpt(size, seq), gpu, world, "fsdp", mbs, seq, accum,
                        "full" if ckpt else "none", False, tps, None)


def published_runs() -> list[PublishedRun]:
    l31_8b, l3_8b = preset("llama3_8b", 32768), preset("llama3_8b", 8192)
    l3_70b, l2_13b, l2_70b = preset("llama3_70b", 8192), preset("llama2_13b", 4096), preset("llama2_70b", 4096)
    h100, a100_80, a100_40 = "H100 80GB BF16", "A100 80GB", "A100 40GB"
    return [
        # torchtitan, Llama 3.1 8B on H100 96GB (500 W), FSDP, selective (per-op) checkpointing, bf16.
        _tt("Llama 3.1 8B, 8 GPU", "Table 1, FSDP", l31_8b, 8, 2, 8192, "selective_op", False, 5762, 82.4,
            calibrates=("throughput", "memory")),
        _tt("Llama 3.1 8B, 8 GPU, compile", "Table 1, FSDP + torch.compile", l31_8b, 8, 2, 8192, "selective_op",
            True, 6667, 77.0, calibrates=("memory",)),
        _tt("Llama 3.1 8B, 128 GPU", "Table 3, FSDP", l31_8b, 128, 2, 8192, "selective_op", False, 5605, 67.0),
        _tt("Llama 3.1 8B, 128 GPU, compile", "Table 3, FSDP + torch.compile", l31_8b, 128, 2, 8192,
            "selective_op", True, 6514, 62.0),
        # float8 linears change memory by 0.2 GiB in Table 1 (77.0 -> 76.8), so this row checks memory only
        _tt("Llama 3.1 8B, 8 GPU, 32k seq, full AC", "Table 2, FSDP 8, CP 1 (compile + float8)", l31_8b, 8, 1,
            32768, "full", True, None, 83.9),
        # torchtitan, 64 A100 80GB, FSDP, local batch 1 (Llama 3) or 2 (Llama 2), no compile.
        _tt("Llama 3 8B, 64 GPU, selective layer", "Llama 3, 8B selective layer", l3_8b, 64, 1, 8192, "selective",
            False, 2904, None, gpu="a100_80gb", calibrates=("throughput",)),
        _tt("Llama 3 8B, 64 GPU, selective op", "Llama 3, 8B selective op", l3_8b, 64, 1, 8192, "selective_op",
            False, 2973, None, gpu="a100_80gb"),
        _tt("Llama 3 70B, 64 GPU, full AC", "Llama 3, 70B full", l3_70b, 64, 1, 8192, "full", False, 331, None,
            gpu="a100_80gb"),
        _tt("Llama 2 13B, 64 GPU, no AC", "Llama 2, 13B no", l2_13b, 64, 2, 4096, "none", False, 2162, None,
            gpu="a100_80gb"),
        _tt("Llama 2 13B, 64 GPU, selective op", "Llama 2, 13B selective op", l2_13b, 64, 2, 4096, "selective_op",
            False, 1904, None, gpu="a100_80gb"),
        _tt("Llama 2 70B, 64 GPU, full AC", "Llama 2, 70B full (batch 2)", l2_70b, 64, 2, 4096, "full", False,
            353, None, gpu="a100_80gb"),
        # llm-foundry MPT tables (FSDP1 FULL_SHARD = fsdp; "Activation Checkpointing True" = full).
        _foundry("MPT-7B, 8 GPU", f"{h100}: 7b, 2048, 8 GPUs", "7b", 2048, 8, 6, 1, False, 10643, "h100_sxm_80gb"),
        _foundry("MPT-7B, 8 GPU, 8k seq, AC", f"{h100}: 7b, 8192, 8 GPUs", "7b", 8192, 8, 8, 2, True, 6935,
                 "h100_sxm_80gb"),
        _foundry("MPT-1B, 8 GPU", f"{h100}: 1b, 2048, 8 GPUs", "1b", 2048, 8, 14, 1, False, 45455, "h100_sxm_80gb"),
        _foundry("MPT-13B, 8 GPU, 4k seq, AC", f"{h100}: 13b, 4096, 8 GPUs", "13b", 4096, 8, 10, 3, True, 4717,
                 "h100_sxm_80gb"),
        _foundry("MPT-30B, 32 GPU, AC", f"{h100}: 30b, 2048, 32 GPUs", "30b", 2048, 32, 14, 3, True, 2308,
                 "h100_sxm_80gb"),
        _foundry("MPT-70B, 64 GPU, AC", f"{h100}: 70b, 2048, 64 GPUs", "70b", 2048, 64, 8, 4, True, 1039,
                 "h100_sxm_80gb"),
        _foundry("MPT-70B, 32 GPU, micro-batch 2, AC", f"{h100}: 70b, 2048, 32 GPUs", "70b", 2048, 32, 2, 16, True,
                 882, "h100_sxm_80gb"),
        _foundry("MPT-7B, 512 GPU", f"{h100} (large scale): 7b, 2048, 512 GPUs", "7b", 2048, 512, 6, 1, False, 9670,
                 "h100_sxm_80gb"),
        _foundry("MPT-70B, 512 GPU, AC", f"{h100} (large scale): 70b, 2048, 512 GPUs", "70b", 2048, 512, 8, 1, True,
                 1007, "h100_sxm_80gb"),
        _foundry("MPT-7B, 8 GPU", f"{a100_80}: 7b, 2048, 8 GPUs", "7b", 2048, 8, 6, 2, False, 4641, "a100_80gb"),
        _foundry("MPT-13B, 8 GPU", f"{a100_80}: 13b, 2048, 8 GPUs", "13b", 2048, 8, 2, 3, False, 2262, "a100_80gb"),
        _foundry("MPT-30B, 8 GPU, AC", f"{a100_80}: 30b, 2048, 8 GPUs", "30b", 2048, 8, 3, 21, True, 916,
                 "a100_80gb"),
        _foundry("MPT-350M, 8 GPU", f"{a100_80}: 350m, 2048, 8 GPUs", "350m", 2048, 8, 32, 2, False, 58782,
                 "a100_80gb"),
        _foundry("MPT-7B, 8 GPU, AC", f"{a100_40}: 7b, 2048, 8 GPUs", "7b", 2048, 8, 12, 4, True, 3679, "a100_40gb"),
        _foundry("MPT-125M, 8 GPU", f"{a100_40}: 125m, 2048, 8 GPUs", "125m", 2048, 8, 26, 3, False, 136334,
                 "a100_40gb"),
        _foundry("MPT-70B, 128 GPU, AC", f"{a100_40}: 70b, 2048, 128 GPUs", "70b", 2048, 128, 4, 1, True, 376,
                 "a100_40gb"),
    ]


@dataclass
class Comparison:
    run: PublishedRun
    tokens_per_s_per_gpu: float
    memory_gib: float
    bound: str

    @property
    def throughput_error(self) -> Optional[float]:
        published = self.run.tokens_per_s_per_gpu
        return None if published is None else self.tokens_per_s_per_gpu / published - 1

    @property
    def memory_error(self) -> Optional[float]:
        published = self.run.memory_gib
        return None if published is None else self.memory_gib / published - 1

    def error(self, kind: str) -> Optional[float]:
        return self.throughput_error if kind == "throughput" else self.memory_error


def _fit_matmul_efficiency(run: PublishedRun) -> float:
    """The matmul efficiency at which the planner reproduces ``run``'s tokens/s/GPU (bisection)."""
    low, high = 0.05, 1.0
    for _ in range(50):
        mid = (low + high) / 2
        layout = run.layout()
        layout = dataclasses.replace(layout, gpu=dataclasses.replace(layout.gpu, matmul_efficiency=mid))
        if float(step_time(layout)["tokens_per_s_per_gpu"]) < run.tokens_per_s_per_gpu:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def _fit_allocator_fraction(run: PublishedRun) -> float:
    """The allocator share at which the planner reproduces ``run``'s peak reserved memory."""
    layout = run.layout()
    allocated, transient, _ = peak_allocated(memory_parts(layout), layout)
    return (run.memory_gib * 2**30 - allocated) / transient


def calibrate() -> dict[str, float]:
    """The fitted constants, each from the published row that calibrates it."""
    runs = published_runs()
    throughput = {r.gpu: r for r in runs if "throughput" in r.calibrates}
    memory = {r.compile: r for r in runs if "memory" in r.calibrates}
    return {
        "HOPPER_MATMUL_EFFICIENCY": _fit_matmul_efficiency(throughput["h100_96gb"]),
        "AMPERE_MATMUL_EFFICIENCY": _fit_matmul_efficiency(throughput["a100_80gb"]),
        "ALLOCATOR_FRACTION_EAGER": _fit_allocator_fraction(memory[False]),
        "ALLOCATOR_FRACTION_COMPILED": _fit_allocator_fraction(memory[True]),
    }


def compare(run: PublishedRun) -> Comparison:
    layout = run.layout()
    time = step_time(layout)
    memory = memory_per_gpu(layout)
    return Comparison(run, float(time["tokens_per_s_per_gpu"]), memory["total"] / 2**30, str(time["bound"]))


def compare_all() -> list[Comparison]:
    return [compare(run) for run in published_runs()]


def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{x:+.1%}"


def _num(x: Optional[float], fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def table(rows: list[Comparison], markdown: bool) -> str:
    head = ["run", "GPU", "source", "role", "tok/s/GPU published", "predicted", "error",
            "memory GiB published", "predicted", "error", "bound"]
    lines = []
    for c in rows:
        r = c.run
        source = f"[{SOURCE_NAMES[r.source]}] {r.table}" if markdown else r.table
        role = "calibrates " + " + ".join(r.calibrates) if r.calibrates else "check"
        lines.append([r.label, r.gpu, source, role, _num(r.tokens_per_s_per_gpu, ",.0f"),
                      f"{c.tokens_per_s_per_gpu:,.0f}" if r.tokens_per_s_per_gpu else "", _pct(c.throughput_error),
                      _num(r.memory_gib, ".1f"), f"{c.memory_gib:.1f}" if r.memory_gib else "", _pct(c.memory_error),
                      c.bound])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        links = [f"[{name}]: {url}" for url, name in SOURCE_NAMES.items()]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines] + [""] + links)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head, *lines])


def summary(rows: list[Comparison]) -> str:
    out = []
    for kind, label in (("throughput", "tokens/s/GPU"), ("memory", "memory")):
        for calibrated in (True, False):
            errs = [abs(e) for c in rows
                    if (e := c.error(kind)) is not None and (kind in c.run.calibrates) == calibrated]
            if errs:
                out.append(f"{label} ({'calibration' if calibrated else 'check'} rows): {len(errs)} rows, "
                           f"max |error| {max(errs):.1%}, mean |error| {sum(errs) / len(errs):.1%}")
    return "\n".join(out)


def max_check_error(rows: list[Comparison], kind: str) -> float:
    """The largest |error| on rows that did not set a constant: the model's own measured error."""
    return max(abs(e) for c in rows if (e := c.error(kind)) is not None and kind not in c.run.calibrates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the README's markdown table")
    parser.add_argument("--calibrate", action="store_true", help="print the fitted constants")
    args = parser.parse_args()
    if args.calibrate:
        for name, value in calibrate().items():
            print(f"{name} = {value:.3f}")
        return
    rows = compare_all()
    print(table(rows, args.markdown))
    print()
    print(summary(rows))


if __name__ == "__main__":
    main()
