"""Every registry optimizer (``impl=auto``) against its reference package, one table, one run.

Parameters are a LLaMA-shaped set (``bench_optim.llama_shapes``: embedding, q/k/v/o, SwiGLU
w1/w2/w3, RMSNorm weights, untied head), fp32, with fixed random gradients, grouped as
``build_optimizer`` groups them: weight decay on the hidden matrices and the head, none on the
embedding and norms; matrix optimizers (Muon, Shampoo, SOAP, GaLore) get the hidden matrices and
AdamW the rest. All optimizers step the same shared tensors (each keeps its own state), so the
memory held is one model plus one optimizer at a time.

A shared machine is noisy, so the cases are interleaved: each of ``--repeats`` rounds builds every
optimizer afresh, runs ``--warmup`` steps, then times ``--steps`` steps, each alternated with a
step of torch's fused AdamW on the same parameters; a row reports the median over rounds of each
round's median. × AdamW is the median over rounds of (median step ÷ median of the alternated AdamW
steps), and the speed-up over the reference the ratio of the two × AdamW of a round: memory
bandwidth on a shared VM drifts by 20-30% over minutes, and alternating steps cancels it. The
first step of the first round (state allocation, and the one-off ``torch.compile`` of a compiled
update) is reported separately. Shampoo/SOAP/GaLore recompute preconditioners every k steps: the
timed steps exclude that refresh; its cost (measured on the first step, which refreshes) is
reported and amortised over k.

    python scripts/bench_optim_registry.py --threads 2                  # CPU, 25M
    python scripts/bench_optim_registry.py --only adamw,lion,muon --repeats 1
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_optim import MODEL_SHAPES, _sync, llama_shapes  # noqa: E402

Groups = list[dict]


class Unavailable(Exception):
    """A case that cannot run here (the reason goes in the table)."""


# --- parameter set -----------------------------------------------------------------------------

@dataclass
class ParamSet:
    named: list[tuple[str, torch.nn.Parameter]]
    hidden: list[torch.nn.Parameter] = field(default_factory=list)     # 2-D attention/MLP matrices
    head: list[torch.nn.Parameter] = field(default_factory=list)
    embedding: list[torch.nn.Parameter] = field(default_factory=list)
    norms: list[torch.nn.Parameter] = field(default_factory=list)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named]

    def decay_groups(self, weight_decay: float) -> Groups:
        return [dict(params=self.hidden + self.head, weight_decay=weight_decay),
                dict(params=self.embedding + self.norms, weight_decay=0.0)]

    def hybrid_groups(self, flag: str, **matrix_keys) -> Groups:
        return [dict(params=self.hidden, **{flag: True}, **matrix_keys),
                dict(params=self.embedding + self.head + self.norms, **{flag: False})]


def llama_params(label: str, device: torch.device) -> ParamSet:
    """HF-style names (what the adam-mini package reads to find its blocks)."""
    d, n_layers, *_ = MODEL_SHAPES[label]
    gen = torch.Generator().manual_seed(0)
    shapes = llama_shapes(label)
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]
    names = (["model.embed_tokens"] + [f"model.layers.{i}.{n}" for i in range(n_layers) for n in per_layer]
             + ["model.norm", "lm_head"])
    out = ParamSet(named=[])
    for name, shape in zip(names, shapes):
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device)
        out.named.append((name + ".weight", p))
        kind = ("embedding" if name == "model.embed_tokens" else "head" if name == "lm_head"
                else "norms" if p.ndim == 1 else "hidden")
        getattr(out, kind).append(p)
    return out


# --- cases -------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str                                     # registry name
    ours: Callable[[ParamSet], torch.optim.Optimizer]
    ref_label: str = "—"
    ref: Optional[Callable[[ParamSet], object]] = None
    ref_fused: bool = False                       # the reference is itself a fused kernel
    kind: str = "elementwise"                     # elementwise | matrix | other (for the targets)
    refresh_every: int = 0                        # preconditioner refresh period (matrix optimizers)


def registry(name: str, groups: Callable[[ParamSet], Groups], **kw):
    def make(ps: ParamSet):
        from llmtrain.optim import OPTIMIZERS

        return OPTIMIZERS[name](groups(ps), **kw)
    return make


def package(module: str, attr: str, groups: Callable[[ParamSet], Groups], **kw):
    def make(ps: ParamSet):
        try:
            mod = __import__(module, fromlist=[attr])
        except Exception as err:  # bitsandbytes raises more than ImportError without its native library
            raise Unavailable(f"{module} unavailable ({type(err).__name__})") from None
        opt = getattr(mod, attr)(groups(ps), **kw)
        if hasattr(opt, "train"):  # schedulefree: step() only in train mode
            opt.train()
        return opt
    return make


def bnb_adamw8bit(ps: ParamSet):
    from llmtrain.optim.adamw8bit import bnb_runs_on

    if not bnb_runs_on(ps.params[0].device.type):
        raise Unavailable("bitsandbytes 8-bit does not run on this device")
    return package("bitsandbytes.optim", "AdamW8bit", lambda s: s.decay_groups(0.1), lr=1e-4)(ps)


def adam_mini_package(ps: ParamSet):
    d, _, _, _, n_heads, n_kv = MODEL_SHAPES[BENCH_SIZE]
    import adam_mini

    return adam_mini.Adam_mini(ps.named, lr=1e-4, weight_decay=0.1, dim=d, n_heads=n_heads, n_kv_heads=n_kv,
                               verbose=False)


def galore_package(ps: ParamSet):
    import galore_torch

    groups = [dict(params=ps.hidden, rank=128, update_proj_gap=200, scale=0.25, proj_type="std"),
              dict(params=ps.embedding + ps.head + ps.norms)]
    return galore_torch.GaLoreAdamW(groups, lr=1e-4, no_deprecation_warning=True)


class Hybrid:
    """A matrix-only reference package on the hidden matrices plus torch's AdamW on the rest,
    the split llmtrain's hybrid groups make (the package has no such split of its own)."""

    def __init__(self, matrix_opt, rest_opt):
        self.matrix_opt, self.rest_opt = matrix_opt, rest_opt

    def step(self):
        self.matrix_opt.step()
        self.rest_opt.step()


def soap_package(ps: ParamSet):
    import pytorch_optimizer

    return Hybrid(pytorch_optimizer.SOAP(ps.hidden, lr=1e-4),
                  torch.optim.AdamW(ps.embedding + ps.head + ps.norms, lr=1e-4, fused=True))


def muon_reference(ps: ParamSet):
    """KellerJordan's MuonWithAuxAdam verbatim (tests/reference_muon.py; not on PyPI): its Adam on
    the embedding, head and norms at the reference's lr 3e-4."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from reference_muon import RefMuonWithAuxAdam

    return RefMuonWithAuxAdam([
        dict(params=ps.hidden, use_muon=True, lr=0.02, momentum=0.95, weight_decay=0.0),
        dict(params=ps.embedding + ps.head + ps.norms, use_muon=False, lr=3e-4, betas=(0.9, 0.95), eps=1e-10,
             weight_decay=0.0),
    ])


BENCH_SIZE = "25M"
decay = lambda wd: (lambda ps: ps.decay_groups(wd))  # noqa: E731
TORCH = "torch.optim"

CASES: list[Case] = [
    Case("adamw", registry("adamw", decay(0.1), lr=1e-4), f"{TORCH}.AdamW fused",
         package("torch.optim", "AdamW", decay(0.1), lr=1e-4, fused=True), ref_fused=True),
    Case("adam", registry("adam", decay(0.0), lr=1e-4), f"{TORCH}.Adam fused",
         package("torch.optim", "Adam", decay(0.0), lr=1e-4, fused=True), ref_fused=True),
    Case("sgd", registry("sgd", decay(0.01), lr=1e-3, momentum=0.9), f"{TORCH}.SGD fused",
         package("torch.optim", "SGD", decay(0.01), lr=1e-3, momentum=0.9, fused=True), ref_fused=True),
    Case("adagrad", registry("adagrad", decay(0.0), lr=1e-3), f"{TORCH}.Adagrad fused",
         package("torch.optim", "Adagrad", decay(0.0), lr=1e-3, fused=True), ref_fused=True),
    Case("rmsprop", registry("rmsprop", decay(0.0), lr=1e-4), f"{TORCH}.RMSprop (default)",
         package("torch.optim", "RMSprop", decay(0.0), lr=1e-4)),
    Case("lion", registry("lion", decay(0.1), lr=1e-5), "lion-pytorch Lion",
         package("lion_pytorch", "Lion", decay(0.1), lr=1e-5)),
    Case("adabelief", registry("adabelief", decay(0.1), lr=1e-4), "pytorch_optimizer.AdaBelief",
         package("pytorch_optimizer", "AdaBelief", decay(0.1), lr=1e-4)),
    Case("lamb", registry("lamb", decay(0.1), lr=1e-4), "pytorch_optimizer.Lamb",
         package("pytorch_optimizer", "Lamb", decay(0.1), lr=1e-4)),
    Case("lars", registry("lars", decay(0.01), lr=1e-3), "pytorch_optimizer.LARS",
         package("pytorch_optimizer", "LARS", decay(0.01), lr=1e-3)),
    Case("adafactor", registry("adafactor", decay(0.0), lr=1e-3), "transformers Adafactor",
         package("transformers.optimization", "Adafactor", decay(0.0), lr=1e-3, relative_step=False)),
    Case("sophia", registry("sophia", decay(0.1), lr=1e-4), "sophia-opt SophiaG",
         package("sophia_opt", "SophiaG", decay(0.1), lr=1e-4)),
    Case("schedulefree_adamw", registry("schedulefree_adamw", decay(0.1), lr=1e-4), "schedulefree AdamWScheduleFree",
         package("schedulefree", "AdamWScheduleFree", decay(0.1), lr=1e-4)),
    Case("adam_mini", registry("adam_mini", decay(0.1), lr=1e-4), "adam-mini Adam_mini", adam_mini_package),
    Case("adamw8bit", registry("adamw8bit", decay(0.1), lr=1e-4), "bitsandbytes AdamW8bit", bnb_adamw8bit,
         kind="other"),
    Case("muon", registry("muon", lambda ps: ps.hybrid_groups("use_muon"), lr=0.02),
         "KellerJordan MuonWithAuxAdam (verbatim)", muon_reference, kind="matrix"),
    Case("shampoo", registry("shampoo", lambda ps: ps.hybrid_groups("use_shampoo"), lr=1e-4), kind="matrix",
         refresh_every=10),
    Case("soap", registry("soap", lambda ps: ps.hybrid_groups("use_soap"), lr=1e-4), "pytorch_optimizer.SOAP + torch AdamW",
         soap_package, kind="matrix",
         refresh_every=10),
    Case("galore_adamw", registry("galore_adamw", lambda ps: ps.hybrid_groups("use_galore"), lr=1e-4),
         "galore-torch GaLoreAdamW", galore_package, kind="matrix", refresh_every=200),
]


# --- timing ------------------------------------------------------------------------------------

# every timing is paired with this one's reference: torch's fused AdamW
BASELINE = next(c for c in CASES if c.name == "adamw")


def _impl_label(opt) -> str:
    impl = getattr(opt, "impl", None)
    if impl is None:
        return "one impl"
    if impl != "auto":
        return impl
    from llmtrain.optim._common import group_impl

    return "/".join(sorted({group_impl("auto", g["params"], "eager") for g in opt.param_groups}))


def _build(ps: ParamSet, case: Case, which: str, first: dict):
    """The optimizer, stepped once (state allocation; a compiled update's one-off compile), or None."""
    make = case.ours if which == "ours" else case.ref
    try:
        opt = make(ps)
    except Unavailable as why:
        first[(case.name, which)] = str(why)
        return None
    start = time.perf_counter()
    opt.step()
    if (case.name, which) not in first:
        first[(case.name, which)] = time.perf_counter() - start
        if which == "ours":
            first[(case.name, "path")] = _impl_label(opt)
            timer = getattr(opt, "precondition_timer", None)
            if timer is not None:
                first[(case.name, "refresh_ms")] = timer.last_refresh_ms
    return opt


def run_pair(ps: ParamSet, case: Case, which: str, warmup: int, steps: int, first: dict
             ) -> Optional[tuple[float, float]]:
    """(median ms of ``case``'s step, median ms of torch fused AdamW's) with the two stepped in
    alternation, so both medians come from the same minutes of a shared machine."""
    device = ps.params[0].device
    opt = _build(ps, case, which, first)
    if opt is None:
        return None
    base = BASELINE.ref(ps)
    base.step()
    ms: dict[str, list[float]] = {"case": [], "base": []}
    for i in range(max(warmup - 1, 0) + steps):
        for key, o in (("base", base), ("case", opt)):
            _sync(device)
            start = time.perf_counter()
            o.step()
            _sync(device)
            if i >= max(warmup - 1, 0):
                ms[key].append((time.perf_counter() - start) * 1e3)
    if which == "ours" and case.name == "muon":
        first.setdefault("muon_split", []).append(dict(opt.last_step_ms))
    del opt, base
    gc.collect()
    return statistics.median(ms["case"]), statistics.median(ms["base"])


def bench(cases: list[Case], ps: ParamSet, repeats: int, warmup: int, steps: int) -> tuple[dict, dict, dict]:
    """Median ms per (case, ours|ref), and median ratios: ``(name, which)`` is the case's time over
    torch fused AdamW's, stepped in alternation with it (``run_pair``); ``(name, "speedup")`` is the
    reference's ratio over ours, from the same round. The shared VM drifts by 20% over minutes;
    a ratio of interleaved steps does not."""
    times: dict[tuple[str, str], list[float]] = {}
    ratios: dict[tuple[str, str], list[float]] = {}
    first: dict = {}
    for r in range(repeats):
        for case in cases:
            this_round = {}
            for which in ("ours", "ref"):
                if which == "ref" and case.ref is None:
                    continue
                # a round is at most one step shorter than a refresh period, so no refresh is timed
                n = min(steps, case.refresh_every - 2) if case.refresh_every else steps
                pair = run_pair(ps, case, which, warmup, n, first)
                if pair is not None:
                    ms, base_ms = pair
                    times.setdefault((case.name, which), []).append(ms)
                    ratios.setdefault((case.name, which), []).append(ms / base_ms)
                    this_round[which] = ms / base_ms
                print(f"round {r + 1}/{repeats}: {case.name} {which} {pair}", file=sys.stderr, flush=True)
            if len(this_round) == 2:
                ratios.setdefault((case.name, "speedup"), []).append(this_round["ref"] / this_round["ours"])
    median = lambda d: {k: statistics.median(v) for k, v in d.items()}  # noqa: E731
    return median(times), median(ratios), first


def fmt(v: Optional[float], spec: str = ".1f") -> str:
    return "—" if v is None else format(v, spec)


def table(cases: list[Case], ms: dict, ratio: dict, first: dict) -> str:
    lines = ["| optimizer | llmtrain auto path | ms/step | first step s | reference | ref ms/step | speed-up "
             "| × torch fused AdamW | note |", "|---|---|---:|---:|---|---:|---:|---:|---|"]
    for c in cases:
        ours, ref = ms.get((c.name, "ours")), ms.get((c.name, "ref"))
        note = []
        if isinstance(first.get((c.name, "ref")), str):
            note.append(first[(c.name, "ref")])
        refresh = first.get((c.name, "refresh_ms"))
        if refresh is not None and c.refresh_every:
            note.append(f"refresh {refresh:.0f} ms every {c.refresh_every} steps = +{refresh / c.refresh_every:.1f} ms/step "
                        f"amortised")
        if c.name == "muon" and first.get("muon_split"):
            split = first["muon_split"][-1]
            note.append(f"Muon side {split['muon']:.1f} ms, AdamW side {split['adamw']:.1f} ms")
        if c.ref_fused:
            note.append("reference already fused")
        first_s = first.get((c.name, "ours"))
        lines.append(
            f"| {c.name} | {first.get((c.name, 'path'), '—')} | {fmt(ours)} | "
            f"{fmt(first_s if isinstance(first_s, float) else None, '.2f')} | {c.ref_label} | {fmt(ref)} | "
            f"{fmt(ratio.get((c.name, 'speedup')), '.2f')}{'×' if (c.name, 'speedup') in ratio else ''} | "
            f"{fmt(ratio.get((c.name, 'ours')), '.2f')} | {'; '.join(note)} |")
    return "\n".join(lines) + "\n"


def newton_schulz_gflop(shapes: list[tuple[int, ...]], steps: int = 5) -> float:
    """FLOPs of Muon's Newton–Schulz per optimizer step: per iteration on an m×n matrix (m ≤ n),
    A = XXᵀ (2m²n), A·A (2m³) and B·X (2m²n)."""
    total = 0
    for shape in shapes:
        m, n = sorted(shape[-2:])
        total += steps * (4 * m * m * n + 2 * m**3)
    return total / 1e9


def targets(cases: list[Case], ms: dict, ratio: dict, first: Optional[dict] = None) -> str:
    out = []
    for c in cases:
        x_adamw, speedup = ratio.get((c.name, "ours")), ratio.get((c.name, "speedup"))
        if x_adamw is None:
            continue
        if c.kind == "elementwise":
            within = x_adamw <= 1.5
            fast = "n/a (reference fused)" if c.ref_fused or speedup is None else ("met" if speedup >= 2 else "NOT met")
            out.append(f"- {c.name}: ≤1.5× fused AdamW {'met' if within else 'NOT met'} ({x_adamw:.2f}×); "
                       f"≥2× its reference: {fast}" + (f" ({speedup:.2f}×)" if speedup else ""))
        elif c.name == "muon":
            line = f"- muon: ≤3× AdamW {'met' if x_adamw <= 3 else 'NOT met'} ({x_adamw:.2f}×)"
            split = (first or {}).get("muon_split")
            if split:  # what the Newton–Schulz matmuls alone demand (the hidden matrices of the set)
                gflop = newton_schulz_gflop([s for s in llama_shapes(BENCH_SIZE)[1:-1] if len(s) == 2])
                adamw_ms = ms[(c.name, "ours")] / x_adamw
                line += (f"; Newton–Schulz is {gflop:.0f} GFLOP per step, run at {gflop / split[-1]['muon'] * 1e3:.0f} "
                         f"GFLOP/s; 3× AdamW would take {gflop / (3 * adamw_ms) * 1e3:.0f} GFLOP/s")
            out.append(line)
    return "\n".join(out) + "\n"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA {torch.cuda.get_device_name(device)}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    return (f"CPU {cpu}, {os.cpu_count()} cores, torch.set_num_threads({torch.get_num_threads()}), "
            f"torch {torch.__version__}, load average at start {load:.1f}")


def main(argv: Optional[list[str]] = None) -> int:
    global BENCH_SIZE
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", default="25M", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", default="", help="comma-separated registry names")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    BENCH_SIZE = args.size
    device = torch.device(args.device)
    wanted = [w for w in args.only.split(",") if w]
    cases = [c for c in CASES if not wanted or c.name in wanted]
    if not any(c.name == "adamw" for c in cases):
        cases.insert(0, CASES[0])  # the torch fused AdamW baseline is always measured
    ps = llama_params(args.size, device)
    n_params = sum(p.numel() for p in ps.params)
    header = f"{machine(device)}; LLaMA-shaped {args.size} set ({n_params / 1e6:.1f}M fp32 params, {len(ps.params)} tensors)"
    print(header, file=sys.stderr)
    ms, ratio, first = bench(cases, ps, args.repeats, args.warmup, args.steps)
    out = (f"{header}; median of {args.repeats} interleaved rounds × {args.steps} steps; speed-up and × AdamW "
           f"are medians over rounds of ratios to torch fused AdamW steps alternated with the timed ones\n\n"
           + table(cases, ms, ratio, first) + "\nTargets:\n" + targets(cases, ms, ratio, first))
    print(out)
    if args.markdown:
        args.markdown.write_text(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
