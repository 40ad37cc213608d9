"""Optimizer step throughput: llmtrain's Triton kernels vs torch fused/foreach/eager and bitsandbytes.

An optimizer step is memory traffic, so each row reports ms per step, the bytes it must move per
step divided by that time (GB/s), and that bandwidth as a % of a device-to-device copy measured in
the same run. Parameters are the tensors of a LLaMA-shaped model (embedding, q/k/v/o, SwiGLU
w1/w2/w3, RMSNorm weights, untied head), fp32, with fixed random gradients.

Bytes counted per parameter (the minimum each update rule must read + write):
  AdamW fp32      read p, g, m, v + write p, m, v              = 28 B
  Lion fp32       read p, g, m + write p, m                    = 20 B
  8-bit AdamW     read p, g (8) + m, v codes (2) + write p (4) + codes (2) = 16 B,
                  + absmax read+write 16 B per 256 elements; tensors < 4096 elements are fp32 (28 B)
The copy baseline copies a buffer of half the AdamW bytes (read + write = the AdamW traffic).
State bytes/param is the optimizer's own state (``llmtrain.optim.protocol.state_bytes``).

    python scripts/bench_optim.py                        # CPU: 10M and 25M; CUDA: 10M ... 1B
    python scripts/bench_optim.py --sizes 125M --steps 20 --cases adamw
    python scripts/bench_optim.py --markdown bench.md    # also write the tables as markdown
    python scripts/bench_optim.py --registry             # = scripts/bench_optim_registry.py

Add a row with one more ``BenchCase`` in ``CASES`` (issue 10: every registry optimizer vs its
reference package): a label, the bytes-per-parameter rule, and a factory from parameters to an
object with ``step()``; return None from the factory when the case cannot run on the device.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmtrain.optim.protocol import state_bytes  # noqa: E402

# (d_model, n_layers, ffn_hidden, vocab, n_heads, n_kv_heads): LLaMA-style shapes per size label
MODEL_SHAPES = {
    "1M": (128, 4, 352, 2048, 4, 4),  # smoke tests of this script
    "10M": (256, 8, 704, 8192, 4, 4),
    "25M": (384, 8, 1024, 16384, 6, 6),
    "125M": (768, 12, 2048, 32000, 12, 12),
    "350M": (1024, 24, 2816, 32000, 16, 16),
    "1B": (2048, 16, 5632, 32000, 32, 8),
}


def llama_shapes(label: str) -> list[tuple[int, ...]]:
    d, n_layers, ffn, vocab, n_heads, n_kv = MODEL_SHAPES[label]
    kv = d // n_heads * n_kv
    per_layer = [(d, d), (kv, d), (kv, d), (d, d), (ffn, d), (ffn, d), (d, ffn), (d,), (d,)]
    return [(vocab, d)] + per_layer * n_layers + [(d,), (vocab, d)]


# --- bytes moved per step ------------------------------------------------------------------------

def adamw_bytes(numels: list[int]) -> int:
    return 28 * sum(numels)


def lion_bytes(numels: list[int]) -> int:
    return 20 * sum(numels)


def adamw8bit_bytes(numels: list[int], min_8bit_size: int = 4096) -> int:
    total = 0
    for n in numels:
        total += 16 * n + 16 * ((n + 255) // 256) if n >= min_8bit_size else 28 * n
    return total


# --- cases ---------------------------------------------------------------------------------------

@dataclass
class BenchCase:
    label: str                                  # "optimizer / implementation"
    bytes_moved: Callable[[list[int]], int]     # per step, from the parameter sizes
    factory: Callable[[list[torch.Tensor]], Optional[object]]  # None: cannot run on this device


class KernelStep:
    """llmtrain's fused kernel called directly: the kernel's own speed, without any class overhead."""

    def __init__(self, params: list[torch.Tensor], kind: str):
        from llmtrain.optim.kernels import triton_usable

        if not triton_usable(params[0].device):
            raise _Skip("needs CUDA + triton")
        self.params, self.kind = params, kind
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params] if kind == "adamw" else []
        self.step_t = torch.zeros((), device=params[0].device)
        self.lr = torch.tensor(1e-4, device=params[0].device)

    def step(self):
        grads = [p.grad for p in self.params]
        if self.kind == "adamw":
            from llmtrain.optim.kernels.adamw import fused_adamw_

            self.step_t += 1
            fused_adamw_(self.params, grads, self.m, self.v, self.step_t, lr=self.lr, beta1=0.9, beta2=0.95,
                         eps=1e-8, weight_decay=0.1)
        else:
            from llmtrain.optim.kernels.lion import fused_lion_

            fused_lion_(self.params, grads, self.m, lr=self.lr, beta1=0.9, beta2=0.99, weight_decay=0.1)

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.m + self.v)


class _Skip(Exception):
    """A case that cannot run on this device (the reason goes in the table)."""


def _torch_adamw(**kw):
    def make(params):
        return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, **kw)
    return make


def _registry(name: str, **kw):
    def make(params):
        from llmtrain.errors import ConfigError
        from llmtrain.optim import OPTIMIZERS

        try:
            return OPTIMIZERS[name](params, **kw)
        except ConfigError as err:
            raise _Skip(err.message.split(";")[0]) from None
    return make


def _bnb(cls_name: str, **kw):
    def make(params):
        try:
            import bitsandbytes as bnb
        except Exception as err:  # missing native library raises more than ImportError
            raise _Skip(f"bitsandbytes unavailable ({type(err).__name__})") from None
        from llmtrain.optim.adamw8bit import bnb_runs_on

        if not bnb_runs_on(params[0].device.type):
            raise _Skip(f"bitsandbytes 8-bit does not run on {params[0].device.type}")
        return getattr(bnb.optim, cls_name)(params, lr=1e-4, **kw)
    return make


def _lion_pytorch(params):
    try:
        from lion_pytorch import Lion
    except ImportError:
        raise _Skip("lion-pytorch not installed") from None
    return Lion(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)


CASES: list[BenchCase] = [
    BenchCase("adamw / triton kernel", adamw_bytes, lambda ps: KernelStep(ps, "adamw")),
    BenchCase("adamw / llmtrain impl=triton", adamw_bytes, _registry("adamw", lr=1e-4, weight_decay=0.1,
                                                                      impl="triton")),
    BenchCase("adamw / torch fused", adamw_bytes, _torch_adamw(fused=True)),
    BenchCase("adamw / torch foreach", adamw_bytes, _torch_adamw(foreach=True)),
    BenchCase("adamw / torch eager", adamw_bytes, _torch_adamw(foreach=False)),
    BenchCase("adamw8bit / llmtrain triton", adamw8bit_bytes, _registry("adamw8bit", lr=1e-4, impl="triton")),
    BenchCase("adamw8bit / bitsandbytes", adamw8bit_bytes, _bnb("AdamW8bit", weight_decay=0.1)),
    BenchCase("adamw8bit / llmtrain eager", adamw8bit_bytes, _registry("adamw8bit", lr=1e-4, impl="eager")),
    BenchCase("lion / triton kernel", lion_bytes, lambda ps: KernelStep(ps, "lion")),
    BenchCase("lion / lion-pytorch", lion_bytes, _lion_pytorch),
]


# --- timing --------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], None], device: torch.device, warmup: int, steps: int) -> float:
    """Median wall time of one call in ms (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_gbps(n_bytes: int, device: torch.device, warmup: int, steps: int) -> float:
    """Bandwidth of dst.copy_(src) with src of n_bytes / 2 (read + write = n_bytes)."""
    src = torch.empty(n_bytes // 2 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup, steps)
    del src, dst
    return n_bytes / ms / 1e6


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_size(label: str, device: torch.device, cases: list[BenchCase], warmup: int, steps: int) -> list[dict]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    shapes = llama_shapes(label)
    numels = [int(torch.Size(s).numel()) for s in shapes]
    copy = copy_gbps(adamw_bytes(numels), device, warmup, steps)
    rows = [dict(size=label, case="device copy (baseline)", ms=adamw_bytes(numels) / copy / 1e6, gbps=copy,
                 pct=100.0, state=None, note="")]
    for case in cases:
        params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in shapes]
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
        try:
            opt = case.factory(params)
            ms = time_ms(opt.step, device, warmup, steps)
        except _Skip as why:
            rows.append(dict(size=label, case=case.label, ms=None, gbps=None, pct=None, state=None, note=str(why)))
            del params
            _free(device)
            continue
        gbps = case.bytes_moved(numels) / ms / 1e6
        rows.append(dict(size=label, case=case.label, ms=ms, gbps=gbps, pct=100.0 * gbps / copy,
                         state=state_bytes(opt) / sum(numels), note=""))
        del opt, params
        _free(device)
    return rows


def format_table(device_name: str, rows: list[dict], params: dict[str, int]) -> str:
    head = f"### {device_name}\n\n| params | impl | ms/step | GB/s | % of copy | state B/param | note |\n" \
           "|---|---|---:|---:|---:|---:|---|\n"
    lines = []
    for r in rows:
        fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
        lines.append(f"| {r['size']} ({params[r['size']] / 1e6:.1f}M) | {r['case']} | {fmt(r['ms'], '.2f')} | "
                     f"{fmt(r['gbps'], '.1f')} | {fmt(r['pct'], '.0f')} | {fmt(r['state'], '.3f')} | {r['note']} |")
    return head + "\n".join(lines) + "\n"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(device)}"
    import platform

    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--registry" in argv:  # every registry optimizer against its reference package: one table
        argv.remove("--registry")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_optim_registry import main as registry_main

        return registry_main(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="--registry [options of bench_optim_registry.py]: every registry "
                                            "optimizer at impl=auto against its reference package instead")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default=None, help="comma-separated, from " + ", ".join(MODEL_SHAPES))
    parser.add_argument("--cases", default="", help="only cases whose label contains one of these (comma-separated)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    sizes = (args.sizes or ("10M,25M,125M,350M,1B" if on_gpu else "10M,25M")).split(",")
    unknown = [s for s in sizes if s not in MODEL_SHAPES]
    if unknown:
        print(f"--sizes: unknown {unknown}; known: {', '.join(MODEL_SHAPES)}", file=sys.stderr)
        return 2
    wanted = [w for w in args.cases.split(",") if w]
    cases = [c for c in CASES if not wanted or any(w in c.label for w in wanted)]
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 2)
    steps = args.steps if args.steps is not None else (50 if on_gpu else 5)

    params = {s: sum(int(torch.Size(x).numel()) for x in llama_shapes(s)) for s in sizes}
    rows: list[dict] = []
    for size in sizes:
        rows += bench_size(size, device, cases, warmup, steps)
        print(f"done {size}", file=sys.stderr)
    table = format_table(device_name(device), rows, params)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
