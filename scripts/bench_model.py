"""Forward+backward tokens/s of an llmtrain model against transformers' implementation of the
identical architecture and weights (``LlamaForCausalLM`` / ``GPT2LMHeadModel``), in the same run.

    python scripts/bench_model.py                       # llama_tiny, CPU (or the GPU if present)
    python scripts/bench_model.py --preset llama_1b --batch 4 --seq 2048 --device cuda

Both models see the same batches; rounds alternate between them so a noisy shared machine
slows both alike, and the median round is reported. On CUDA both run under bf16 autocast.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from llmtrain.export import to_hf
from llmtrain.models import build_model

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"


def load_preset(name: str, vocab_size: int) -> dict:
    cfg = OmegaConf.merge({"data": {"vocab_size": vocab_size}}, {"model": OmegaConf.load(CONFIG_DIR / f"{name}.yaml")})
    return OmegaConf.to_container(cfg.model, resolve=True)


def train_step(forward, params, x, y, autocast) -> None:
    with autocast():
        logits = forward(x)
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
    loss.backward()
    for p in params:
        p.grad = None


def time_steps(forward, params, batches, device, autocast) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for x, y in batches:
        train_step(forward, params, x, y, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama_tiny")
    ap.add_argument("--vocab-size", type=int, default=4096, help="for presets whose vocab follows the tokenizer")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    ours = build_model(load_preset(args.preset, args.vocab_size)).to(device).train()
    theirs = to_hf(ours).to(device).train()
    hf_forward = lambda x: theirs(input_ids=x, use_cache=False).logits  # noqa: E731
    forwards = {"llmtrain": ours, "transformers": hf_forward}
    if args.compile:
        forwards = {k: torch.compile(f) for k, f in forwards.items()}
    params = {"llmtrain": list(ours.parameters()), "transformers": list(theirs.parameters())}
    if device.type == "cuda":
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731

    vocab = ours.cfg.vocab_size
    batches = [(torch.randint(0, vocab, (args.batch, args.seq), device=device),
                torch.randint(0, vocab, (args.batch, args.seq), device=device)) for _ in range(args.steps)]
    for name, fwd in forwards.items():
        time_steps(fwd, params[name], batches[: args.warmup], device, autocast)
    rounds: dict[str, list[float]] = {name: [] for name in forwards}
    for _ in range(args.rounds):
        for name, fwd in forwards.items():
            rounds[name].append(time_steps(fwd, params[name], batches, device, autocast))

    tokens = args.batch * args.seq * args.steps
    tps = {name: tokens / statistics.median(times) for name, times in rounds.items()}
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"{args.preset}: {ours.num_params():,} params, batch {args.batch} x {args.seq}, {device} "
          f"({torch.get_num_threads()} threads), {precision}{', compiled' if args.compile else ''}, "
          f"median of {args.rounds} rounds x {args.steps} fwd+bwd steps")
    print(f"{'implementation':<14} {'tokens/s':>12} {'ms/step':>10}")
    for name, value in tps.items():
        print(f"{name:<14} {value:>12,.0f} {1000 * args.batch * args.seq / value:>10.1f}")
    print(f"ratio llmtrain / transformers: {tps['llmtrain'] / tps['transformers']:.2f}x")


if __name__ == "__main__":
    main()
