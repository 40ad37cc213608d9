"""Training throughput: llmtrain vs transformers.LlamaForCausalLM + torch.optim.AdamW (foreach), same run.

Both sides train the identical model (``llmtrain.export.to_hf`` copies llmtrain's initial weights
into the HF model, so the logits agree to 1e-4), on the identical batch, with the same loss
(token cross-entropy on fp32 logits) and AdamW hyperparameters. llmtrain's side is what its
trainer runs: ``build_optimizer`` parameter groups with ``impl=auto`` AdamW (torch's fused kernel),
fp32 CPU linears through oneDNN (``train.cpu_matmul=auto``; a second row with ``aten`` shows what
that is worth) and, with ``--compile`` on, the model under ``torch.compile`` (``train.compile=true``); the HF side
is the common baseline: eager HF model, ``torch.optim.AdamW(foreach=True)`` over all parameters.

Rounds interleave the variants (the machine is shared); each row is the median over rounds of the
per-round median step. Columns: tokens/s, ms per step, the optimizer's share of the step, and the
ratio to the HF baseline. The one-off compile time of the compiled variant is printed apart.

    python scripts/bench_train.py --threads 2                 # llama_tiny, batch 8 x 256
    python scripts/bench_train.py --compile off --rounds 2
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent


def model_config(name: str, vocab_size: int):
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / f"{name}.yaml"), resolve=False)
    raw["vocab_size"] = vocab_size  # the preset takes it from the data group's tokenizer
    return raw


class Variant:
    """One training setup: a forward function, its parameters' optimizer, and timings per step."""

    def __init__(self, label: str, forward: Callable[[torch.Tensor], torch.Tensor], optimizer,
                 cpu_matmul: str = "auto"):
        self.label, self.forward, self.optimizer = label, forward, optimizer
        self.cpu_matmul = cpu_matmul  # llmtrain's linears only; the HF model's nn.Linear ignores it
        self.step_ms: list[float] = []
        self.opt_ms: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
        from llmtrain.cpu_matmul import set_cpu_matmul

        set_cpu_matmul(self.cpu_matmul)
        start = time.perf_counter()
        logits = self.forward(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        mid = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        return (end - start) * 1e3, (end - mid) * 1e3, loss.item()


def build_variants(args) -> tuple[list[Variant], dict]:
    from llmtrain.export import to_hf
    from llmtrain.models import build_model
    from llmtrain.optim import build_optimizer

    torch.manual_seed(0)
    ours = build_model(model_config(args.model, args.vocab))
    hf = to_hf(ours)
    hf.train()
    n_params = sum(p.numel() for p in ours.parameters())
    info = {"params": n_params}

    optim = {"name": "adamw", "lr": 3e-4, "weight_decay": 0.1, "betas": (0.9, 0.95)}
    variants = [Variant("HF LlamaForCausalLM + torch AdamW (foreach)", lambda x: hf(input_ids=x).logits,
                        torch.optim.AdamW(hf.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95),
                                          foreach=True))]
    if args.compile in ("off", "both"):
        # the default (oneDNN linears on CPU), and aten's matmuls to show what that part is worth
        for backend in ("auto", "aten"):
            model = copy.deepcopy(ours)
            variants.append(Variant(f"llmtrain (eager model, train.cpu_matmul={backend}, optim impl=auto)", model,
                                    build_optimizer(optim, model), cpu_matmul=backend))
    if args.compile in ("on", "both"):
        model = copy.deepcopy(ours)
        variants.append(Variant("llmtrain (train.compile=true, optim impl=auto)", torch.compile(model),
                                build_optimizer(optim, model)))
    return variants, info


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama_tiny")
    parser.add_argument("--vocab", type=int, default=4096, help="llama_tiny's default BPE vocabulary")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--compile", default="both", choices=["on", "off", "both"])
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    variants, info = build_variants(args)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    first_s = {}
    losses = {}
    for v in variants:  # warm-up: state allocation, and the compile of the compiled variant
        start = time.perf_counter()
        _, _, losses[v.label] = v.step(x, y)
        first_s[v.label] = time.perf_counter() - start
        v.step(x, y)
        print(f"warm: {v.label} first step {first_s[v.label]:.1f} s, loss {losses[v.label]:.4f}", file=sys.stderr)
    rounds: dict[str, list[tuple[float, float]]] = {v.label: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            per = [v.step(x, y)[:2] for _ in range(args.steps)]
            rounds[v.label].append((statistics.median(s for s, _ in per), statistics.median(o for _, o in per)))
            print(f"round {r + 1}: {v.label} {rounds[v.label][-1][0]:.0f} ms", file=sys.stderr, flush=True)

    tokens_per_step = args.batch * args.seq
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    base_label = variants[0].label
    rows, base_tps = [], None
    for v in variants:
        step = statistics.median(s for s, _ in rounds[v.label])
        opt = statistics.median(o for _, o in rounds[v.label])
        tps = tokens_per_step / step * 1e3
        base_tps = base_tps or tps
        rows.append((v.label, tps, step, opt, first_s[v.label]))
    lines = [f"{args.model} ({info['params'] / 1e6:.2f}M params), batch {args.batch}×{args.seq} tokens, "
             f"torch.set_num_threads({args.threads}), {os.cpu_count()} CPUs, load average at end {load:.1f}; "
             f"median of {args.rounds} interleaved rounds × {args.steps} steps; first-step loss "
             + ", ".join(f"{losses[v.label]:.4f}" for v in variants),
             "",
             "| setup | tokens/s | ms/step | optimizer ms (share) | vs HF baseline | first step s |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, tps, step, opt, first in rows:
        lines.append(f"| {label} | {tps:.0f} | {step:.0f} | {opt:.1f} ({100 * opt / step:.1f}%) | "
                     f"{tps / base_tps:.2f}× | {first:.1f} |")
    best = max(rows[1:], key=lambda r: r[1])
    lines.append("")
    lines.append(f"Best llmtrain setup: {best[0]} at {best[1] / base_tps:.2f}× the {base_label} tokens/s "
                 f"(target ≥ 1.2×: {'met' if best[1] >= 1.2 * base_tps else 'NOT met'}).")
    out = "\n".join(lines) + "\n"
    print(out)
    if args.markdown:
        args.markdown.write_text(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
