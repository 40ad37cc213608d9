"""The stages of the GPU check and its one table; ``scripts/gpu_check.sh`` runs them (docs/gpu.md).

    python scripts/gpu_check.py detect                  # exit 1 with "no GPU found: ..." where none is
    python scripts/gpu_check.py env     RESULTS         # GPU, torch, CUDA, triton -> env.json
    python scripts/gpu_check.py kernels RESULTS         # Triton kernels against their twins; SDPA kernels
    python scripts/gpu_check.py optim   RESULTS         # optimizer steps: GB/s against a device copy
    python scripts/gpu_check.py train   RESULTS RUN     # one run of RUNS -> tokens/s, MFU, peak memory
    python scripts/gpu_check.py nccl    RESULTS         # 2 ranks on 2 GPUs: fsdp over NCCL
    python scripts/gpu_check.py table   RESULTS         # every result as one markdown table

Each stage writes ``RESULTS/<stage>[_<RUN>].json`` = {"rows": [...]}. A row holds ``check``,
``config``, ``ok`` (true, false, or null when skipped), ``note`` and any of ``tokens_per_s``,
``mfu``, ``gbps``, ``pct_of_copy``, ``peak_mem_bytes``. ``table`` exits 1 when a row failed.
Nothing here imports torch at module level, so ``detect`` can say that torch itself is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
FSDP_VIEW_WARNING = "returned a view tensor"

# Training runs: preset overrides on top of COMMON. Tokens/s and MFU come from the last logged
# window (steady state, after any compile); the whole run's numbers, compile included, are in
# summary.json and go to the notes. pad_vocab_to_multiple_of keeps each preset's published
# embedding size whatever BPE the generated corpus supports.
TINY = ["model=llama_tiny", "train.seq_len=256", "train.micro_batch_size=32", "train.global_batch_size=32",
        "train.max_steps=100", "train.log_every=20", "data.pad_vocab_to_multiple_of=4096"]
ONE_B = ["model=llama_1b", "train.seq_len=2048", "train.micro_batch_size=4", "train.global_batch_size=4",
         "train.max_steps=30", "train.log_every=10", "model.vocab_size=128256",
         "data.pad_vocab_to_multiple_of=128256"]


@dataclass(frozen=True)
class Run:
    label: str                 # the table's configuration cell
    overrides: list[str]
    precision: Optional[str]   # what summary.json must say (auto is bf16 on a bf16 GPU); None: anything


RUNS: dict[str, Run] = {
    "llama_tiny": Run("llama_tiny (4.2M), 32 x 256 tokens, precision auto, eager", TINY, "bfloat16"),
    "llama_tiny_compile": Run("llama_tiny (4.2M), 32 x 256 tokens, precision auto, train.compile",
                              [*TINY, "train.compile=true"], "bfloat16"),
    "llama_1b": Run("llama_1b (1.24B), 4 x 2048 tokens, precision auto, eager", ONE_B, "bfloat16"),
    "llama_1b_compile": Run("llama_1b (1.24B), 4 x 2048 tokens, precision auto, train.compile",
                            [*ONE_B, "train.compile=true"], "bfloat16"),
    "llama_tiny_fp16": Run("llama_tiny (4.2M), precision fp16 (GradScaler)", [*TINY, "train.precision=fp16"],
                           "float16"),
}
NCCL_RUN = Run("llama_tiny, fsdp on 2 ranks (NCCL), precision auto",
               [*TINY, "distributed.strategy=fsdp", "train.global_batch_size=64"], "bfloat16")
COMMON = ["train.eval_every=0", "train.eval_steps=1", "train.save_every=0", "train.keep_checkpoints=1",
          "train.sample_tokens=0", "train.progress_bar=false", "logger.wandb.mode=disabled", "logger.plot=false",
          "resume=never", "data.vocab_size=4096", "data.num_proc=4"]
OPTIM_SIZES = ("350M",)
OPTIM_CASES = ("adamw / triton kernel", "adamw / llmtrain impl=triton", "adamw / torch fused",
               "adamw8bit / llmtrain triton", "adamw8bit / bitsandbytes", "lion / triton kernel", "lion / lion-pytorch")


def row(check: str, config: str, ok: Optional[bool], note: str = "", **numbers: Any) -> dict[str, Any]:
    return {"check": check, "config": config, "ok": ok, "note": note, **numbers}


def write_rows(results: Path, name: str, rows: list[dict[str, Any]]) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps({"rows": rows}, indent=1))


# ------------------------------------------------------------------ detect, env

def detect() -> tuple[int, str]:
    """(GPU count, the line to print): the line says plainly why when there is none."""
    try:
        import torch
    except ImportError as err:
        return 0, f"no GPU found: {sys.executable} cannot import torch ({err}); nothing was run"
    n = torch.cuda.device_count()
    if n == 0:
        return 0, (f"no GPU found: torch {torch.__version__} sees no CUDA device (torch.cuda.device_count() is 0); "
                   "nothing was run")
    return n, f"{n} x {torch.cuda.get_device_name(0)}"


def environment() -> dict[str, Any]:
    import platform

    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpus = torch.cuda.device_count()
    return {"gpu": torch.cuda.get_device_name(0) if gpus else platform.processor() or platform.machine(),
            "gpus": gpus, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


# ------------------------------------------------------------------ kernels against their twins

KERNEL_SHAPES = [(37,), (33, 29), (4099,), ((1 << 20) + 3,), (1024, 4096)]


def _randn(shapes, device, seed: int, scale: float = 1.0, dtype=None) -> list:
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    out = [torch.randn(s, generator=gen, device=device) * scale for s in shapes]
    return [t.to(dtype) for t in out] if dtype is not None else out


def _compare(got: list, want: list, atol: float, rtol: float, atol_of_max: bool = False) -> tuple[float, int]:
    """(max |got - want|, elements outside atol + rtol * |want|); ``atol_of_max``: atol is relative to
    each tensor's largest |want| (low-precision moments, whose roundings feed the next step)."""
    import torch

    worst, bad = 0.0, 0
    for a, b in zip(got, want):
        if not b.numel():
            continue
        a, b = a.float(), b.float()
        tol = atol * float(b.abs().max()) if atol_of_max else atol
        worst = max(worst, float((a - b).abs().max()))
        bad += int((~torch.isclose(a, b, atol=tol, rtol=rtol)).sum())
    return worst, bad


def _adamw_case(device, shapes, steps, *, bf16_params: bool, bf16_moments: bool) -> dict[str, Any]:
    import torch

    from llmtrain.optim.kernels.adamw import fused_adamw_
    from llmtrain.optim.kernels.twins import fused_adamw_reference

    master = _randn(shapes, device, 0, 0.5)
    masters = (master, [w.clone() for w in master]) if bf16_params else (None, None)
    params = ([w.to(torch.bfloat16) for w in master], [w.to(torch.bfloat16) for w in master]) if bf16_params \
        else (master, [w.clone() for w in master])
    mdt = torch.bfloat16 if bf16_moments else torch.float32
    state = [([torch.zeros_like(w, dtype=mdt) for w in master], [torch.zeros_like(w, dtype=mdt) for w in master])
             for _ in range(2)]
    step, lr = torch.zeros((), device=device), torch.tensor(1e-2, device=device)
    for i in range(steps):
        grads = _randn(shapes, device, 100 + i, dtype=torch.bfloat16 if bf16_params else None)
        step += 1
        for fn, p, (m, v), w in zip((fused_adamw_, fused_adamw_reference), params, state, masters):
            fn(p, grads, m, v, step, lr=lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
               maximize=bf16_moments, master_params=w)
    exact = masters[0] if bf16_params else params[0]
    err, bad = _compare(exact, masters[1] if bf16_params else params[1], 1e-5, 1e-5)
    moments = (state[0][0] + state[0][1], state[1][0] + state[1][1])
    m_err, m_bad = _compare(*moments, 1e-2, 0, atol_of_max=True) if bf16_moments else _compare(*moments, 1e-5, 1e-5)
    if bf16_params:  # the bf16 copy is the fp32 master rounded, written in the same pass
        _, copy_bad = _compare(params[0], [w.to(torch.bfloat16) for w in masters[0]], 0, 0)
        bad += copy_bad
    return dict(ok=bad == 0 and m_bad == 0, note=f"max |Δ| weights {err:.1e}, moments {m_err:.1e}")


def _lion_case(device, shapes, steps, *, bf16_params: bool) -> dict[str, Any]:
    import torch

    from llmtrain.optim.kernels.lion import fused_lion_
    from llmtrain.optim.kernels.twins import fused_lion_reference

    dtype = torch.bfloat16 if bf16_params else torch.float32
    start = _randn(shapes, device, 0, 0.5, dtype)
    params = (start, [p.clone() for p in start])
    moms = ([torch.zeros_like(p) for p in start], [torch.zeros_like(p) for p in start])
    for i in range(steps):
        grads = _randn(shapes, device, 200 + i, dtype=dtype)
        for fn, p, m in zip((fused_lion_, fused_lion_reference), params, moms):
            fn(p, grads, m, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)
    err, bad = _compare(params[0], params[1], 1e-6, 1e-5 if not bf16_params else 2 ** -7)
    total = sum(p.numel() for p in start)
    # sign(β1·m + (1-β1)·g) may flip where that sum rounds to ~0: a handful of elements at most
    return dict(ok=bad <= max(2, total // 10**5),
                note=f"max |Δ| weights {err:.1e}; {bad} of {total:,} elements differ")


def _adamw8bit_case(device, shapes, steps) -> dict[str, Any]:
    import torch

    from llmtrain.optim.kernels.adamw8bit import fused_adamw8bit_
    from llmtrain.optim.kernels.twins import fused_adamw8bit_reference, num_quant_blocks

    start = _randn(shapes, device, 0, 0.1)
    params = (start, [p.clone() for p in start])

    def states():
        codes = lambda: [torch.zeros(s, dtype=torch.uint8, device=device) for s in shapes]  # noqa: E731
        absmax = lambda: [torch.zeros(num_quant_blocks(math.prod(s)), device=device) for s in shapes]  # noqa: E731
        return codes(), absmax(), codes(), absmax()

    state = (states(), states())
    step = [torch.zeros((), device=device) for _ in shapes]
    for i in range(steps):
        grads = _randn(shapes, device, 300 + i, 0.01)
        for s in step:
            s += 1
        for fn, p, st in zip((fused_adamw8bit_, fused_adamw8bit_reference), params, state):
            fn(p, grads, *st, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    err, bad = _compare(params[0], params[1], 1e-5, 1e-3)
    codes_k, codes_t = state[0][0] + state[0][2], state[1][0] + state[1][2]
    far = sum(int(((a.int() - b.int()).abs() > 1).sum()) for a, b in zip(codes_k, codes_t))
    moved = sum(int((a != b).sum()) for a, b in zip(codes_k, codes_t)) / sum(a.numel() for a in codes_k)
    # a value on a midpoint between two codes may round either way: neighbouring codes, rarely
    return dict(ok=bad == 0 and far == 0 and moved < 0.01,
                note=f"max |Δ| weights {err:.1e}; {moved:.2%} of moment codes differ by one")


KERNEL_CASES: dict[str, Callable[..., dict[str, Any]]] = {
    "adamw fp32": lambda d, s, n: _adamw_case(d, s, n, bf16_params=False, bf16_moments=False),
    "adamw bf16 weights + fp32 master": lambda d, s, n: _adamw_case(d, s, n, bf16_params=True, bf16_moments=False),
    "adamw bf16 moments, maximize": lambda d, s, n: _adamw_case(d, s, n, bf16_params=False, bf16_moments=True),
    "lion fp32": lambda d, s, n: _lion_case(d, s, n, bf16_params=False),
    "lion bf16": lambda d, s, n: _lion_case(d, s, n, bf16_params=True),
    "adamw8bit": lambda d, s, n: _adamw8bit_case(d, s, n),
}


def kernel_rows(device: str = "cuda", shapes=KERNEL_SHAPES, steps: int = 10) -> list[dict[str, Any]]:
    """Each kernel and its twin take the same ``steps`` steps from the same start on ``device``."""
    n = sum(math.prod(s) for s in shapes)
    rows = []
    for name, case in KERNEL_CASES.items():
        try:
            out = case(device, shapes, steps)
        except Exception as err:  # a kernel that does not compile or launch is this row's failure
            out = dict(ok=False, note=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
        rows.append(row("kernel vs twin", f"{name}, {len(shapes)} tensors, {n:,} elements, {steps} steps",
                        out["ok"], out["note"]))
    return rows


def attention_row(device: str = "cuda", seq: int = 2048) -> dict[str, Any]:
    """Which fused SDPA kernels take the models' attention call (causal, GQA, llama_1b's heads):
    with the math fallback alone, attention would run several times slower and use O(T²) memory."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, kv_heads, head_dim = 32, 8, 64
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    q = torch.randn(2, heads, seq, head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(2, kv_heads, seq, head_dim, device=device, dtype=dtype) for _ in range(2))
    fused = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            fused.append(backend.name.lower())
        except RuntimeError:  # this backend refuses these inputs
            continue
    config = f"SDPA causal, GQA {heads}/{kv_heads} heads, head_dim {head_dim}, {seq} tokens, {str(dtype)[6:]}"
    return row("attention kernel", config, bool(fused), "fused kernels that take it: " + (", ".join(fused) or
                                                                                     "none (math fallback only)"))


# ------------------------------------------------------------------ optimizer step bandwidth

def _bench_optim():
    spec = importlib.util.spec_from_file_location("bench_optim", REPO / "scripts" / "bench_optim.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def optim_rows(device: str = "cuda", sizes=OPTIM_SIZES, cases=OPTIM_CASES, warmup: int = 5,
               steps: int = 20) -> list[dict[str, Any]]:
    """``scripts/bench_optim.py``'s rows: bytes each update must move / time, against a copy."""
    import torch

    bench = _bench_optim()
    chosen = [c for c in bench.CASES if c.label in cases]
    rows = []
    for size in sizes:
        for r in bench.bench_size(size, torch.device(device), chosen, warmup, steps):
            if r["ms"] is None:
                rows.append(row("optimizer step", f"{r['case']}, {size}", None, r["note"]))
                continue
            state = "" if r["state"] is None else f", state {r['state']:.2f} B/param"
            rows.append(row("optimizer step", f"{r['case']}, {size}", True, f"{r['ms']:.2f} ms/step{state}",
                            gbps=r["gbps"], pct_of_copy=r["pct"]))
    return rows


# ------------------------------------------------------------------ training runs

def write_corpus(path: Path, mb: float = 2.0, seed: int = 0) -> Path:
    """Made-up words with Zipf frequencies, documents split by blank lines (throughput needs no meaning)."""
    if path.is_file():
        return path
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9))) for _ in range(20000)]
    weights = [1.0 / (i + 1) for i in range(len(vocab))]
    docs, size = [], 0
    while size < mb * 2**20:
        doc = " ".join(rng.choices(vocab, weights, k=rng.randint(50, 1000)))
        docs.append(doc)
        size += len(doc) + 2
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(docs) + "\n")
    return path


def run_overrides(results: Path, name: str, preset: list[str]) -> list[str]:
    corpus = write_corpus(results / "corpus.txt")
    return [*COMMON, *preset, f"data.sources=[{{path:'{corpus}'}}]", f"data.cache_dir='{results / 'data_cache'}'",
            f"run_dir='{results / 'runs' / name}'"]


def train_row(run: Run, run_dir: Path, log: str = "") -> dict[str, Any]:
    """One run's row from its summary.json and metrics.jsonl: status, loss went down, precision."""
    config = run.label
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        tail = [line for line in log.strip().splitlines() if line.strip()][-1:] or ["no summary.json"]
        return row("train", config, False, tail[0][:200])
    summary = json.loads(summary_path.read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r and "val_loss" not in r]
    steady = train[-1]["tokens_per_s"] if train else None
    mfu_run, tps_run = summary.get("mfu"), summary.get("tokens_per_s") or 0.0
    mfu = mfu_run * steady / tps_run if mfu_run is not None and steady and tps_run else None
    problems = []
    if summary.get("status") != "completed":
        problems.append(f"status {summary.get('status')}: {summary.get('reason')}")
    if not train or not all(math.isfinite(r["loss"]) for r in train) or train[-1]["loss"] >= train[0]["loss"]:
        problems.append("loss did not go down" if train else "no training rows")
    if run.precision and summary.get("precision") != run.precision:
        problems.append(f"ran in {summary.get('precision')}, expected {run.precision}")
    if FSDP_VIEW_WARNING in log:
        problems.append("FSDP view-tensor warning printed")
    whole = f"whole run {tps_run:,.0f} tok/s" + (f", MFU {mfu_run:.1%}" if mfu_run is not None else "")
    note = "; ".join(problems) or (f"{summary['precision']}, {summary['world_size']} rank(s), {whole}; loss "
                                   f"{train[0]['loss']:.2f} -> {train[-1]['loss']:.2f} in {summary['steps']} steps")
    return row("train", config, not problems, note, tokens_per_s=steady, mfu=mfu,
               peak_mem_bytes=summary.get("peak_mem_bytes"))


def run_training(results: Path, name: str, run: Run, *, nproc: int = 1, timeout_s: float = 300) -> dict[str, Any]:
    """``python -m llmtrain`` (or torchrun with ``nproc`` ranks) for ``run``; its row."""
    run_dir = results / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    launcher = [sys.executable, "-m", "llmtrain"]
    if nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    f"--master_port={port}", "-m", "llmtrain"]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    log_path = results / "logs" / f"run_{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # a session of its own: on timeout the whole group goes, torchrun's workers (and their GPU memory) too
    proc = subprocess.Popen([*launcher, *run_overrides(results, name, run.overrides)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log = proc.communicate()[0] + f"\ntimed out after {timeout_s:.0f} s\n"
    finally:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # llama_1b's are 15 GB
    log_path.write_text(log)
    out = train_row(run, run_dir, log)
    if not out["ok"]:
        out["note"] += f" (log: logs/{log_path.name})"
    return out


# ------------------------------------------------------------------ the table

def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "" if value is None else format(value, spec) + suffix


def format_table(env: dict[str, Any], rows: list[dict[str, Any]], elapsed_s: Optional[float] = None) -> str:
    """One markdown table: a caption line with the machine, then one line per row."""
    caption = (f"GPU check {env.get('date', '')}: {env.get('gpus', '?')} x {env.get('gpu', '?')}, "
               f"torch {env.get('torch', '?')} (CUDA {env.get('cuda', '?')}), triton {env.get('triton', '?')}")
    if elapsed_s is not None:
        caption += f", {elapsed_s:.0f} s in all"
    lines = [caption, "",
             "| check | configuration | result | tokens/s | MFU | GB/s | % of copy | peak mem | notes |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        result = {True: "pass", False: "FAIL", None: "skipped"}[r.get("ok")]
        peak = r.get("peak_mem_bytes")
        cells = [r["check"], r["config"], result, _fmt(r.get("tokens_per_s"), ",.0f"), _fmt(r.get("mfu"), ".1%"),
                 _fmt(r.get("gbps"), ",.0f"), _fmt(r.get("pct_of_copy"), ".0f", "%"),
                 _fmt(None if peak is None else peak / 2**30, ".1f", " GiB"), r.get("note", "")]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    outcomes = (("passed", True), ("failed", False), ("skipped", None))
    counts = {k: sum(r.get("ok") is v for r in rows) for k, v in outcomes}
    lines += ["", f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"]
    return "\n".join(lines) + "\n"


def load_results(results: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """env.json and every stage's rows, in the order the stages ran (file modification time)."""
    env_path = results / "env.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    files = sorted((p for p in results.glob("*.json") if p.name != "env.json"), key=lambda p: p.stat().st_mtime_ns)
    rows = [r for p in files for r in json.loads(p.read_text())["rows"]]
    return env, rows


# ------------------------------------------------------------------ command line

def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=("detect", "env", "kernels", "optim", "train", "nccl", "table", "missing"))
    parser.add_argument("results", type=Path, nargs="?")
    parser.add_argument("name", nargs="?", help="train: a key of RUNS; missing: the stage that left no result")
    parser.add_argument("--note", default="", help="missing: why")
    parser.add_argument("--skipped", action="store_true", help="missing: it was skipped, not failed")
    parser.add_argument("--timeout", type=float, default=float(os.environ.get("GPU_CHECK_RUN_TIMEOUT_S", 300)),
                        help="train, nccl: seconds the run may take (default: $GPU_CHECK_RUN_TIMEOUT_S, else 300)")
    parser.add_argument("--elapsed", type=float, default=None, help="table: seconds the whole check took")
    args = parser.parse_args(argv)

    if args.stage == "detect":
        count, line = detect()
        print(line)
        return 0 if count else 1
    if args.results is None:
        parser.error(f"{args.stage} needs RESULTS")
    results: Path = args.results
    if args.stage == "env":
        results.mkdir(parents=True, exist_ok=True)
        (results / "env.json").write_text(json.dumps(environment(), indent=1))
    elif args.stage == "kernels":
        write_rows(results, "kernels", [*kernel_rows(), attention_row()])
    elif args.stage == "optim":
        write_rows(results, "optim", optim_rows())
    elif args.stage == "train":
        if args.name not in RUNS:
            parser.error(f"train: RUN is one of {', '.join(RUNS)}")
        write_rows(results, f"train_{args.name}", [run_training(results, args.name, RUNS[args.name],
                                                                 timeout_s=args.timeout)])
    elif args.stage == "nccl":
        write_rows(results, "nccl", [run_training(results, "nccl", NCCL_RUN, nproc=2, timeout_s=args.timeout)])
    elif args.stage == "missing":
        write_rows(results, args.name, [row(args.name.replace("_", " "), "", None if args.skipped else False,
                                            args.note)])
    else:
        env, rows = load_results(results)
        table = format_table(env, rows, args.elapsed)
        results.mkdir(parents=True, exist_ok=True)
        (results / "table.md").write_text(table)
        print(table, end="")
        return 1 if any(r.get("ok") is False for r in rows) or not rows else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
