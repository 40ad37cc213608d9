"""Optimizer comparison report: ``llmtrain-report SWEEP_DIR`` turns a sweep of runs into report.md + plots.

A sweep is any directory holding run directories (a Hydra multirun dir, or several merged into
one): every directory below it with a ``config.yaml``, ``metrics.jsonl`` or ``summary.json`` is a
run. The report follows the protocol the optimizer surveys ask for: same model, data and token
budget for every run; each optimizer judged at its own best learning rate from the grid (so a
tuned baseline is never compared with an untuned rival); loss against tokens *and* against
wall-clock time; memory and throughput alongside.

Definitions used throughout (also printed in the report):

- final val loss: the last finite eval ``val_loss`` in metrics.jsonl (else summary.json's).
- final val bpb: that eval's ``val_bpb``, bits per UTF-8 byte of validation text (else
  summary.json's ``final_val_bpb``); unlike the loss it compares runs with different tokenizers.
- best lr: per optimizer, the usable run with the lowest final val loss (``--select best`` uses
  the lowest val loss seen at any eval instead).
- tokens to target: the first point where the val-loss curve reaches the target, interpolated
  linearly between the two eval points that bracket the crossing. A run already below target at
  its first eval is credited with that eval's token count. Same rule for wall-clock time.
- default target: the highest of the optimizers' best final val losses, i.e. a loss every
  optimizer's best run reached, so every row has a tokens-to-target and a speed-up.
- speed-up: baseline (AdamW) tokens to target / this optimizer's tokens to target (>1 = fewer
  tokens than AdamW).
- a run is unusable when it failed (summary status, or no metrics at all), diverged (summary
  status, a non-finite final train or val loss, or a final loss above ``diverge_factor`` x its
  first logged loss) or is incomplete (stopped, or no summary.json yet). Unusable runs are listed
  with the reason and take no part in best-lr selection.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import yaml

from llmtrain.errors import UserError

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")
# Directories inside a run that never hold another run; skipping them keeps the walk fast on
# sweeps with many checkpoints and W&B offline folders.
NOT_RUNS = {"checkpoints", "wandb", "__pycache__"}
DEFAULT_DIVERGE_FACTOR = 1.5
DEFAULT_BASELINE = "adamw"
# Keys that legitimately differ between the runs of one sweep; any other differing key means the
# comparison is not like for like and the report says so.
SWEPT_PREFIXES = ("optim.", "run_dir", "logger.", "resume", "hydra", "experiment")

OK, FAILED, DIVERGED, INCOMPLETE = "ok", "failed", "diverged", "incomplete"


@dataclass
class Run:
    """One run directory as read from disk; nothing here is computed beyond parsing."""

    path: Path
    name: str                                   # path relative to the sweep dir
    config: dict[str, Any] = field(default_factory=dict)
    summary: Optional[dict[str, Any]] = None
    train: list[dict[str, Any]] = field(default_factory=list)   # rows with ``loss``
    evals: list[dict[str, Any]] = field(default_factory=list)   # rows with ``val_loss``
    has_metrics_file: bool = False
    problems: list[str] = field(default_factory=list)           # unreadable files / lines

    @property
    def optimizer(self) -> str:
        name = (self.summary or {}).get("optimizer") or self.config.get("optim", {}).get("name")
        return str(name) if name else "unknown"

    @property
    def lr(self) -> Optional[float]:
        """The peak lr: optim.lr from the resolved config (times optim.lr_scale where a config
        has one), else summary.json's lr."""
        optim = self.config.get("optim", {})
        lr = _num(optim.get("lr"))
        if lr is None:
            return _num((self.summary or {}).get("lr"))
        scale = _num(optim.get("lr_scale"))
        return lr * scale if scale is not None else lr

    def final_val_loss(self) -> Optional[float]:
        finite = [e["val_loss"] for e in self.evals if _finite(e.get("val_loss"))]
        if finite:
            return finite[-1]
        value = _num((self.summary or {}).get("final_val_loss"))
        return value if _finite(value) else None

    def final_val_bpb(self) -> Optional[float]:
        """The bits per byte of the eval that gives ``final_val_loss`` (older runs log none)."""
        finite = [e for e in self.evals if _finite(e.get("val_loss"))]
        if finite:
            value = finite[-1].get("val_bpb")
        else:
            value = _num((self.summary or {}).get("final_val_bpb"))
        return value if _finite(value) else None

    def best_val_loss(self) -> Optional[float]:
        finite = [e["val_loss"] for e in self.evals if _finite(e.get("val_loss"))]
        if finite:
            return min(finite)
        value = _num((self.summary or {}).get("best_val_loss"))
        return value if _finite(value) else None

    def stat(self, key: str) -> Optional[float]:
        """A summary number, or None when absent or not a number."""
        return _num((self.summary or {}).get(key))


# ----------------------------------------------------------------------------- loading


def _num(value: Any) -> Optional[float]:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_yaml(path: Path, run: Run) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        run.problems.append(f"{path.name} unreadable ({type(err).__name__})")
        return {}
    return data if isinstance(data, dict) else {}


def _read_metrics(path: Path, run: Run) -> None:
    """Parse metrics.jsonl; a truncated or garbled line (a run killed mid-write) is skipped."""
    by_step_train: dict[Any, dict] = {}
    by_step_eval: dict[Any, dict] = {}
    bad = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for order, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(row, dict):
                bad += 1
                continue
            row = {k: _num(v) for k, v in row.items()}
            if _finite(row.get("step")):
                row["step"] = int(row["step"])
            # A resumed run re-logs the steps after its last checkpoint; the later row wins.
            key = row.get("step", f"#{order}")
            # Key presence, not value: a NaN loss may be written as null or "nan" and must count.
            if "val_loss" in row:
                by_step_eval[key] = row
            if "loss" in row:
                by_step_train[key] = row
    if bad:
        run.problems.append(f"metrics.jsonl: {bad} unreadable line(s) skipped")
    order_key = lambda r: (r.get("step") if r.get("step") is not None else math.inf)  # noqa: E731
    run.train = sorted(by_step_train.values(), key=order_key)
    run.evals = sorted(by_step_eval.values(), key=order_key)
    _fill_eval_tokens(run)


def _fill_eval_tokens(run: Run) -> None:
    """Eval rows should carry ``tokens``; if one does not, derive it from the step."""
    train_cfg = run.config.get("train", {})
    per_step = None
    if _finite(_num(train_cfg.get("global_batch_size"))) and _finite(_num(train_cfg.get("seq_len"))):
        per_step = float(train_cfg["global_batch_size"]) * float(train_cfg["seq_len"])
    tokens_at = {r["step"]: r["tokens"] for r in run.train if r.get("step") is not None and r.get("tokens") is not None}
    for row in run.evals:
        if row.get("tokens") is None and row.get("step") is not None:
            row["tokens"] = tokens_at.get(row["step"], row["step"] * per_step if per_step else None)


def _load_run(path: Path, sweep_dir: Path) -> Run:
    run = Run(path=path, name=str(path.relative_to(sweep_dir)) if path != sweep_dir else path.name)
    config_path = path / "config.yaml"
    if not config_path.exists():
        # Hydra writes the composed config here before the job starts, so even a run that died
        # before writing its own config.yaml can be attributed to an optimizer and lr.
        config_path = path / ".hydra" / "config.yaml"
    if config_path.exists():
        run.config = _read_yaml(config_path, run)
    if (path / "summary.json").exists():
        try:
            summary = json.loads((path / "summary.json").read_text())
            run.summary = summary if isinstance(summary, dict) else None
        except (OSError, json.JSONDecodeError) as err:
            run.problems.append(f"summary.json unreadable ({type(err).__name__})")
    if (path / "metrics.jsonl").exists():
        run.has_metrics_file = True
        _read_metrics(path / "metrics.jsonl", run)
    return run


def _is_run_dir(path: Path) -> bool:
    return any((path / f).is_file() for f in RUN_FILES) or (path / ".hydra" / "config.yaml").is_file()


def load_runs(sweep_dir: str | os.PathLike) -> list[Run]:
    """Every run directory under ``sweep_dir`` (itself included), in path order.

    Raises UserError when the directory does not exist; returns [] when it holds no runs.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise UserError("SWEEP_DIR", f"no such directory: {root}")
    found: list[Path] = []
    stack = [root]
    while stack:
        path = stack.pop()
        if _is_run_dir(path):
            found.append(path)
            continue  # a run's subfolders are its checkpoints and logs, not more runs
        try:
            children = [p for p in path.iterdir() if p.is_dir()]
        except OSError:
            continue
        stack.extend(p for p in children if not p.name.startswith(".") and p.name not in NOT_RUNS)
    return [_load_run(p, root) for p in sorted(found, key=_natural_key)]


def _natural_key(path: Path) -> list:
    # Hydra numbers jobs 0..N; sort "10" after "9".
    return [int(part) if part.isdigit() else part for part in path.parts]


# ----------------------------------------------------------------------------- analysis


def classify_run(run: Run, diverge_factor: float = DEFAULT_DIVERGE_FACTOR) -> tuple[str, str]:
    """(status, reason): status is ok, failed, diverged or incomplete; reason is one line."""
    summary = run.summary or {}
    status = str(summary.get("status") or "").lower()
    reason = str(summary.get("reason") or "").strip()
    if status == "failed":
        return FAILED, reason or "summary.json says failed"
    if status == "diverged":
        return DIVERGED, reason or "summary.json says diverged"
    if not run.train and not run.evals:
        if not run.has_metrics_file:
            if run.summary is None and not (run.path / "config.yaml").exists():
                # Only Hydra's .hydra/ copy: the job stopped while building (a config refusal
                # or a crash); its one-line error is in the sweep's console output.
                return FAILED, "no metrics.jsonl: the job failed before training (see the sweep's console output)"
            return FAILED, "no metrics.jsonl" + (f" ({'; '.join(run.problems)})" if run.problems else "")
        return FAILED, "metrics.jsonl has no readable rows"

    # A single skipped non-finite step is normal (the trainer skips it and goes on); a run that
    # *ends* non-finite has diverged. Report where the final non-finite stretch began.
    last_eval = run.evals[-1] if run.evals else {}
    eval_after_train = bool(run.train) and _finite(last_eval.get("val_loss")) and \
        (last_eval.get("step") or 0) >= (run.train[-1].get("step") or 0)
    for rows, key, what in ((run.train, "loss", "train"), (run.evals, "val_loss", "val")):
        if what == "train" and eval_after_train:
            continue  # the weights were still sound at the end: a finite eval came after
        if rows and not _finite(rows[-1].get(key)):
            start = len(rows) - 1
            while start > 0 and not _finite(rows[start - 1].get(key)):
                start -= 1
            return DIVERGED, f"non-finite {what} loss ({rows[-1].get(key)}) from step {rows[start].get('step')} on"
    first = _initial_loss(run)
    if first is not None:
        final = [x for x in (run.train[-1].get("loss") if run.train else None, run.final_val_loss()) if _finite(x)]
        worst = max(final) if final else None
        if worst is not None and worst > diverge_factor * first:
            return DIVERGED, f"final loss {worst:.3f} > {diverge_factor:g} x initial loss {first:.3f}"

    if status == "stopped":
        return INCOMPLETE, reason or "stopped before max_steps"
    if run.summary is None:
        return INCOMPLETE, "no summary.json (still running, or killed)"
    if status and status != "completed":
        return INCOMPLETE, f"status {status!r}" + (f": {reason}" if reason else "")
    return OK, ""


def _initial_loss(run: Run) -> Optional[float]:
    """The earliest logged loss: an eval at step 0 if there is one, else the first train loss."""
    firsts = [(r.get("step") if r.get("step") is not None else math.inf, i, r[key])
              for i, (rows, key) in enumerate(((run.train, "loss"), (run.evals, "val_loss")))
              for r in rows[:1] if _finite(r.get(key))]
    return min(firsts)[2] if firsts else None


def tokens_to_target(evals: Sequence[Mapping[str, Any]], target: float, key: str = "tokens") -> Optional[float]:
    """Tokens (or another x such as ``time_s``) at which val loss first reaches ``target``.

    ``evals`` are eval rows (``val_loss`` plus ``key``), in training order. Between the last
    eval above the target and the first at or below it the curve is taken as a straight line;
    a run already at or below target at its first eval gets that eval's x. Non-finite points
    are ignored. Returns None when the target is never reached.
    """
    points = [(float(e[key]), float(e["val_loss"])) for e in evals
              if _finite(e.get("val_loss")) and _finite(_num(e.get(key)))]
    previous: Optional[tuple[float, float]] = None
    for x, loss in points:
        if loss <= target:
            if previous is None:
                return x
            x0, l0 = previous
            return x0 + (l0 - target) / (l0 - loss) * (x - x0)
        previous = (x, loss)
    return None


def _selection_loss(run: Run, select: str) -> Optional[float]:
    loss = run.best_val_loss() if select == "best" else run.final_val_loss()
    if loss is None and run.train and _finite(run.train[-1].get("loss")):
        return run.train[-1]["loss"]  # a sweep without evals still gets ranked, on train loss
    return loss


def best_lr_per_optimizer(runs: Iterable[Run], select: str = "final",
                          diverge_factor: float = DEFAULT_DIVERGE_FACTOR) -> dict[str, Run]:
    """optimizer name -> its usable run with the lowest final (or ``select="best"``) val loss.

    Only runs that ``classify_run`` calls ok compete; ties go to the smaller lr so the choice
    does not depend on directory order.
    """
    if select not in ("final", "best"):
        raise UserError("--select", f"got {select!r}, expected one of: final, best")
    best: dict[str, tuple[float, float, Run]] = {}
    for run in runs:
        if classify_run(run, diverge_factor)[0] != OK:
            continue
        loss = _selection_loss(run, select)
        if loss is None:
            continue
        rank = (loss, run.lr if run.lr is not None else math.inf)
        if run.optimizer not in best or rank < best[run.optimizer][:2]:
            best[run.optimizer] = (*rank, run)
    return {name: entry[2] for name, entry in sorted(best.items())}


def default_target(best: Mapping[str, Run]) -> Optional[float]:
    """The worst of the optimizers' best final val losses: a loss every best run reached."""
    finals = [run.final_val_loss() for run in best.values()]
    finals = [x for x in finals if x is not None]
    return max(finals) if finals else None


def config_differences(runs: Sequence[Run]) -> dict[str, list[Any]]:
    """Config keys (other than optimizer, logging and paths) whose value differs between runs.

    An optimizer comparison is fair only when model, data, seed and token budget are the same;
    this is how the report checks it.
    """
    flat = [_flatten(r.config) for r in runs if r.config]
    keys = set().union(*flat) if flat else set()
    diffs: dict[str, list[Any]] = {}
    for key in sorted(keys):
        if key.startswith(SWEPT_PREFIXES):
            continue
        values = []
        for cfg in flat:
            value = cfg.get(key, "<unset>")
            if value not in values:
                values.append(value)
        if len(values) > 1:
            diffs[key] = values
    return diffs


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v
    return out


@dataclass
class Row:
    """One line of the comparison table: an optimizer at its best lr."""

    optimizer: str
    run: Run
    lrs_tried: int
    lrs_usable: int
    final_val_loss: Optional[float]
    final_val_bpb: Optional[float]
    best_val_loss: Optional[float]
    tokens_to_target: Optional[float]
    time_to_target: Optional[float]
    speedup_tokens: Optional[float]
    speedup_time: Optional[float]
    tokens_per_s: Optional[float]
    peak_mem_bytes: Optional[float]
    state_bytes_per_param: Optional[float]
    params: Optional[float]


def _tokens_per_s(run: Run) -> Optional[float]:
    value = run.stat("tokens_per_s")
    if value:
        return value
    rates = [r["tokens_per_s"] for r in run.train if _finite(r.get("tokens_per_s"))]
    # The first logged interval includes compilation and allocator warm-up; skip it if we can.
    rates = rates[1:] if len(rates) > 1 else rates
    return sum(rates) / len(rates) if rates else None


def _peak_mem(run: Run) -> Optional[float]:
    value = run.stat("peak_mem_bytes")
    if value:
        return value
    peaks = [r["peak_mem_bytes"] for r in run.train if _finite(r.get("peak_mem_bytes"))]
    return max(peaks) if peaks and max(peaks) > 0 else None


def _state_bytes_per_param(run: Run) -> Optional[float]:
    value = run.stat("optimizer_state_bytes_per_param")
    if value is not None:
        return value
    total, params = run.stat("optimizer_state_bytes"), run.stat("params")
    return total / params if total is not None and params else None


def comparison_rows(runs: Sequence[Run], best: Mapping[str, Run], target: Optional[float],
                    baseline: str = DEFAULT_BASELINE,
                    diverge_factor: float = DEFAULT_DIVERGE_FACTOR) -> list[Row]:
    """The table: one row per optimizer that has a usable run, baseline first, then best first."""
    rows = []
    for name, run in best.items():
        group = [r for r in runs if r.optimizer == name]
        usable = [r for r in group if classify_run(r, diverge_factor)[0] == OK]
        rows.append(Row(
            optimizer=name, run=run,
            lrs_tried=len({r.lr for r in group}), lrs_usable=len({r.lr for r in usable}),
            final_val_loss=run.final_val_loss(), final_val_bpb=run.final_val_bpb(), best_val_loss=run.best_val_loss(),
            tokens_to_target=tokens_to_target(run.evals, target) if target is not None else None,
            time_to_target=tokens_to_target(run.evals, target, key="time_s") if target is not None else None,
            speedup_tokens=None, speedup_time=None,
            tokens_per_s=_tokens_per_s(run), peak_mem_bytes=_peak_mem(run),
            state_bytes_per_param=_state_bytes_per_param(run), params=run.stat("params"),
        ))
    base = next((r for r in rows if r.optimizer == baseline), None)
    for row in rows:
        if base is not None:
            row.speedup_tokens = _ratio(base.tokens_to_target, row.tokens_to_target)
            row.speedup_time = _ratio(base.time_to_target, row.time_to_target)
    # A leaderboard: the baseline first, then by final val loss (no val loss last).
    rows.sort(key=lambda r: (r.optimizer != baseline,
                             r.final_val_loss if r.final_val_loss is not None else math.inf, r.optimizer))
    return rows


def tuning_notes(runs: Sequence[Run], best: Mapping[str, Run]) -> dict[str, str]:
    """optimizer -> why its best lr may not be its best: one lr tried, or best at the grid's edge.

    A best lr at the edge of the grid means the optimum may lie outside it; the comparison is
    fair only once the grid brackets it (the next lr out is worse or diverged).
    """
    notes = {}
    for name, run in best.items():
        lrs = sorted({r.lr for r in runs if r.optimizer == name and r.lr is not None})
        if len(lrs) == 1:
            notes[name] = "one lr tried: not tuned"
        elif run.lr == lrs[0]:
            notes[name] = f"best lr is the smallest tried ({_fmt(run.lr, 'lr')}): try smaller"
        elif run.lr == lrs[-1]:
            notes[name] = f"best lr is the largest tried ({_fmt(run.lr, 'lr')}): try larger"
    return notes


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return num / den if num is not None and den else None


# ----------------------------------------------------------------------------- formatting


def _fmt(value: Optional[float], kind: str = "g") -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    if kind == "loss":
        return f"{value:.4f}"
    if kind == "lr":
        return f"{value:.3g}"
    if kind == "count":
        for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(value) >= scale:
                return f"{value / scale:.3g}{unit}"
        return f"{value:.3g}"
    if kind == "bytes":
        for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if abs(value) >= scale:
                return f"{value / scale:.2f} {unit}"
        return f"{value:.0f} B"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "s":
        return f"{value:.1f} s"
    return f"{value:.3g}"


TABLE_HEADER = ("optimizer", "best lr", "lrs ok/tried", "final val loss", "final val bpb", "best val loss",
                "tokens to target", "speed-up vs {b} (tokens)", "time to target",
                "speed-up vs {b} (time)", "tokens/s", "peak memory", "opt. state bytes/param", "params")


def table_cells(row: Row) -> list[str]:
    return [
        row.optimizer, _fmt(row.run.lr, "lr"), f"{row.lrs_usable}/{row.lrs_tried}",
        _fmt(row.final_val_loss, "loss"), _fmt(row.final_val_bpb, "loss"), _fmt(row.best_val_loss, "loss"),
        _fmt(row.tokens_to_target, "count"), _fmt(row.speedup_tokens, "x"),
        _fmt(row.time_to_target, "s"), _fmt(row.speedup_time, "x"),
        _fmt(row.tokens_per_s, "count"), _fmt(row.peak_mem_bytes, "bytes"),
        _fmt(row.state_bytes_per_param, "g"), _fmt(row.params, "count"),
    ]


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _color_map(names: Iterable[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    names = sorted(set(names))
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _new_axes(ncols: int = 1):
    # Figure without pyplot: no global backend state, renders with Agg, safe in threads and tests.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4 * ncols, 4.4), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _curve(run: Run, key: str) -> tuple[list[float], list[float]]:
    pts = [(e[key], e["val_loss"]) for e in run.evals if _finite(e.get(key)) and _finite(e.get("val_loss"))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot_all_runs(runs: Sequence[Run], best: Mapping[str, Run], colors, key: str, xlabel: str,
                   title: str, path: Path) -> Path:
    fig, (ax,) = _new_axes()
    for run in runs:
        xs, ys = _curve(run, key)
        if not xs:
            continue
        is_best = best.get(run.optimizer) is run
        ax.plot(xs, ys, marker="o", markersize=3 if is_best else 2, linewidth=2.0 if is_best else 0.8,
                alpha=1.0 if is_best else 0.45, linestyle="-" if is_best else "--",
                color=colors[run.optimizer],
                label=f"{run.optimizer} lr={_fmt(run.lr, 'lr')}" + (" *" if is_best else ""))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, ncol=2 if len(ax.lines) > 8 else 1)
    fig.savefig(path, dpi=120)
    return path


def _plot_best(best: Mapping[str, Run], colors, target: Optional[float], path: Path) -> Path:
    fig, axes = _new_axes(2)
    for ax, key, xlabel in zip(axes, ("tokens", "time_s"), ("tokens", "wall-clock time (s)")):
        for name, run in best.items():
            xs, ys = _curve(run, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, color=colors[name], label=f"{name} (lr={_fmt(run.lr, 'lr')})")
        if target is not None:
            ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.3f}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle("each optimizer at its best learning rate")
    fig.savefig(path, dpi=120)
    return path


def _plot_lr_sensitivity(runs: Sequence[Run], colors, select: str, diverge_factor: float, path: Path) -> Path:
    fig, (ax,) = _new_axes()
    failed: dict[str, list[float]] = {}
    for name in sorted({r.optimizer for r in runs}):
        pts = []
        for run in runs:
            if run.optimizer != name or run.lr is None or run.lr <= 0:
                continue
            loss = _selection_loss(run, select) if classify_run(run, diverge_factor)[0] == OK else None
            if loss is None:
                failed.setdefault(name, []).append(run.lr)
            else:
                pts.append((run.lr, loss))
        pts.sort()
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[name], label=name)
    if failed and ax.lines:
        # Unusable runs sit on the top edge so a reader sees where each optimizer's lr range ends.
        top = ax.get_ylim()[1]
        for name, lrs in failed.items():
            ax.scatter(lrs, [top] * len(lrs), marker="x", color=colors[name], clip_on=False, zorder=3)
        ax.set_ylim(top=top)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel(f"{select} validation loss")
    ax.set_title("learning-rate sensitivity (x on top edge: diverged / failed)")
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return path


# ----------------------------------------------------------------------------- report


@dataclass
class Report:
    """Everything the report shows, computed once and rendered to markdown and W&B."""

    sweep_dir: Path
    runs: list[Run]
    statuses: dict[str, tuple[str, str]]        # run name -> (status, reason)
    best: dict[str, Run]
    target: Optional[float]
    target_source: str
    baseline: str
    select: str
    rows: list[Row]
    differences: dict[str, list[Any]]
    plots: dict[str, Path]
    notes: dict[str, str] = field(default_factory=dict)


def build_report(sweep_dir: str | os.PathLike, *, target: Optional[float] = None,
                 baseline: str = DEFAULT_BASELINE, select: str = "final",
                 diverge_factor: float = DEFAULT_DIVERGE_FACTOR, out_dir: Optional[str | os.PathLike] = None) -> Report:
    """Read the sweep, write report.md and the PNGs into ``out_dir`` (default the sweep dir)."""
    runs = load_runs(sweep_dir)
    if not runs:
        raise UserError("SWEEP_DIR",
                        f"no run directories (with config.yaml, metrics.jsonl or summary.json) under {sweep_dir}")
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    statuses = {run.name: classify_run(run, diverge_factor) for run in runs}
    best = best_lr_per_optimizer(runs, select, diverge_factor)
    target_source = "--target"
    if target is None:
        target, target_source = default_target(best), "default: the worst of the optimizers' best final val losses"
    rows = comparison_rows(runs, best, target, baseline, diverge_factor)

    colors = _color_map(r.optimizer for r in runs)
    usable = [r for r in runs if statuses[r.name][0] == OK]
    plots = {
        "val_loss_vs_tokens": _plot_all_runs(usable, best, colors, "tokens", "tokens",
                                             "validation loss vs tokens (all usable runs; * = best lr)",
                                             out / "val_loss_vs_tokens.png"),
        "val_loss_vs_time": _plot_all_runs(usable, best, colors, "time_s", "wall-clock time (s, excluding eval)",
                                           "validation loss vs wall-clock (all usable runs; * = best lr)",
                                           out / "val_loss_vs_time.png"),
        "best_lr_curves": _plot_best(best, colors, target, out / "best_lr_curves.png"),
        "lr_sensitivity": _plot_lr_sensitivity(runs, colors, select, diverge_factor, out / "lr_sensitivity.png"),
    }
    report = Report(Path(sweep_dir), runs, statuses, best, target, target_source, baseline, select, rows,
                    config_differences(runs), plots, tuning_notes(runs, best))
    (out / "report.md").write_text(render_markdown(report, out))
    return report


def _setup_line(runs: Sequence[Run]) -> str:
    """How the runs were executed (from summary.json), so a reader knows what timings mean."""
    setups = sorted({f"{r.summary.get('world_size', '?')} x {r.summary.get('strategy', '?')}, "
                     f"{r.summary.get('precision', '?')}" for r in runs if r.summary})
    return f"Setup (processes x strategy, precision): {'; '.join(setups)}." if setups else ""


def render_markdown(report: Report, out_dir: Path) -> str:
    b = report.baseline
    header = [h.format(b=b) for h in TABLE_HEADER]
    n_ok = sum(1 for s, _ in report.statuses.values() if s == OK)
    lines = [
        f"# Optimizer comparison: `{report.sweep_dir}`",
        "",
        f"{len(report.runs)} runs, {n_ok} usable, {len(report.best)} optimizers with a usable run.",
        _setup_line(report.runs),
        "",
        "## Each optimizer at its best learning rate",
        "",
        _md_table(header, [table_cells(r) for r in report.rows]) if report.rows else "_No usable runs._",
        "",
        f"- **target loss**: {_fmt(report.target, 'loss')} ({report.target_source}).",
        f"- **best lr**: the run with the lowest {report.select} val loss among that optimizer's usable runs "
        "(lrs ok/tried counts distinct learning rates).",
        "- **tokens / time to target**: first crossing of the target by the val-loss curve, linearly "
        "interpolated between the two bracketing evals; `n/a` = never reached. Time is training "
        "wall-clock excluding evals.",
        "- **val bpb**: validation bits per UTF-8 byte, val loss / ln 2 x tokens per byte of the validation "
        "text (EOS counted as a token of no bytes); unlike the loss it compares runs with different tokenizers.",
        f"- **speed-up**: {b}'s tokens (time) to target / this optimizer's; above 1 means it needs fewer "
        f"tokens (less time) than {b}." + ("" if any(r.optimizer == b for r in report.rows)
                                           else f" No usable `{b}` run in this sweep, so no speed-ups."),
        "- **tokens/s, peak memory, opt. state bytes/param**: from the best run's summary.json "
        "(optimizer state is per rank). Wall-clock columns compare fairly only between runs made "
        "one after another on the same, otherwise idle machine.",
        "",
    ]
    if report.notes:
        lines += ["## Tuning warnings", "",
                  "An optimizer is tuned fairly when its lr grid brackets the best lr:", ""]
        lines += [f"- **{name}**: {note}" for name, note in report.notes.items()]
        lines.append("")
    if report.differences:
        lines += ["## Warning: runs differ in more than the optimizer", "",
                  "A fair comparison keeps model, data, seed and token budget equal. These keys differ:", ""]
        lines += [f"- `{k}`: {', '.join(str(v) for v in vals)}" for k, vals in report.differences.items()]
        lines.append("")
    lines += ["## Plots", ""]
    for name, path in report.plots.items():
        rel = os.path.relpath(path, out_dir)
        lines += [f"### {name.replace('_', ' ')}", "", f"![{name}]({rel})", ""]

    bad = [(run, *report.statuses[run.name]) for run in report.runs if report.statuses[run.name][0] != OK]
    lines += ["## Failed / diverged / incomplete runs", ""]
    if bad:
        lines.append(_md_table(("run", "optimizer", "lr", "status", "reason"),
                               [(r.name, r.optimizer, _fmt(r.lr, "lr"), s, reason) for r, s, reason in bad]))
    else:
        lines.append("None.")
    lines += ["", "## All runs", ""]
    lines.append(_md_table(
        ("run", "optimizer", "lr", "status", "final val loss", "final val bpb", "best val loss", "tokens",
         "wall time", "notes"),
        [(r.name, r.optimizer, _fmt(r.lr, "lr"), report.statuses[r.name][0], _fmt(r.final_val_loss(), "loss"),
          _fmt(r.final_val_bpb(), "loss"), _fmt(r.best_val_loss(), "loss"),
          _fmt(r.stat("tokens") or (r.train[-1].get("tokens") if r.train else None), "count"),
          _fmt(r.stat("wall_time_s"), "s"), "; ".join(r.problems))
         for r in report.runs]))
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- W&B


def _wandb_mode(runs: Sequence[Run], requested: Optional[str]) -> str:
    """W&B mode for the report: the flag, else what the runs were logged with; env disabled wins."""
    if os.environ.get("WANDB_MODE", "").lower() == "disabled" or \
            os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true"):
        return "disabled"
    mode = requested
    if mode is None:
        modes = {str(r.config.get("logger", {}).get("wandb", {}).get("mode", "disabled")) for r in runs if r.config}
        enabled = sorted(modes - {"disabled"})
        mode = enabled[0] if enabled else "disabled"
    if mode == "auto":  # the same rule the trainer's logger uses
        from llmtrain.logging import wandb_logged_in

        mode = "online" if wandb_logged_in() else "offline"
    return mode


def log_to_wandb(report: Report, mode: str, group: Optional[str] = None) -> None:
    """One W&B run per report, in the sweep's group: the table, the plots, the best curves."""
    import wandb  # lazy: only when W&B is enabled

    wcfg = next((r.config.get("logger", {}).get("wandb", {}) for r in report.runs if r.config), {})
    group = group or wcfg.get("group") or report.sweep_dir.resolve().name
    run = wandb.init(project=wcfg.get("project") or "llmtrain", entity=wcfg.get("entity"), group=group,
                     name=f"report-{group}", job_type="optimizer-report", mode=mode,
                     dir=str(report.sweep_dir), config={"target": report.target, "baseline": report.baseline,
                                                        "select": report.select},
                     settings=wandb.Settings(silent=True))
    header = [h.format(b=report.baseline) for h in TABLE_HEADER]
    data: dict[str, Any] = {"comparison": wandb.Table(columns=header, data=[table_cells(r) for r in report.rows])}
    for name, path in report.plots.items():
        data[f"plots/{name}"] = wandb.Image(str(path))
    curves = {name: _curve(r, "tokens") for name, r in report.best.items()}
    curves = {k: v for k, v in curves.items() if v[0]}
    if curves:
        data["best_val_loss_vs_tokens"] = wandb.plot.line_series(
            xs=[v[0] for v in curves.values()], ys=[v[1] for v in curves.values()],
            keys=list(curves), title="val loss vs tokens (best lr per optimizer)", xname="tokens")
    run.log(data)
    for row in report.rows:
        run.summary[f"{row.optimizer}/final_val_loss"] = row.final_val_loss
        run.summary[f"{row.optimizer}/final_val_bpb"] = row.final_val_bpb
        run.summary[f"{row.optimizer}/best_lr"] = row.run.lr
        run.summary[f"{row.optimizer}/speedup_tokens"] = row.speedup_tokens
    run.finish()
    if mode == "offline":
        print(f"wandb: offline run in {report.sweep_dir}/wandb; upload it with "
              f"`wandb sync {report.sweep_dir}/wandb/offline-run-*`")


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmtrain-report",
        description="Compare the optimizers of a sweep: writes SWEEP_DIR/report.md and PNG plots.")
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="a Hydra multirun dir (or any dir of run dirs)")
    p.add_argument("--target", type=float, default=None,
                   help="val loss for tokens/time-to-target (default: the worst optimizer's best final val loss)")
    p.add_argument("--baseline", default=DEFAULT_BASELINE,
                   help="optimizer the speed-ups are relative to (default adamw)")
    p.add_argument("--select", choices=("final", "best"), default="final",
                   help="pick each optimizer's best lr by final (default) or best val loss")
    p.add_argument("--diverge-factor", type=float, default=DEFAULT_DIVERGE_FACTOR,
                   help="a run whose final loss exceeds this x its first loss is marked diverged (default 1.5)")
    p.add_argument("--out", default=None, help="write the report here instead of SWEEP_DIR")
    p.add_argument("--wandb", nargs="?", const="auto", default=None, choices=("auto", "online", "offline", "disabled"),
                   help="log the comparison to W&B (default: the mode the runs used; WANDB_MODE=disabled wins)")
    p.add_argument("--wandb-group", default=None, help="W&B group (default: the sweep directory's name)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.diverge_factor <= 1:
            raise UserError("--diverge-factor", f"got {args.diverge_factor}, expected a number > 1")
        report = build_report(args.sweep_dir, target=args.target, baseline=args.baseline, select=args.select,
                              diverge_factor=args.diverge_factor, out_dir=args.out)
    except UserError as err:
        print(f"llmtrain-report: {err}", file=sys.stderr)
        return err.exit_code
    out = Path(args.out) if args.out else Path(args.sweep_dir)
    header = [h.format(b=report.baseline) for h in TABLE_HEADER]
    print(_md_table(header, [table_cells(r) for r in report.rows]) if report.rows else "no usable runs")
    bad = sum(1 for s, _ in report.statuses.values() if s != OK)
    print(f"{len(report.runs)} runs ({bad} failed/diverged/incomplete); report: {out / 'report.md'}")
    mode = _wandb_mode(report.runs, args.wandb)
    if mode != "disabled":
        try:
            log_to_wandb(report, mode, args.wandb_group)
        except Exception as err:  # W&B trouble must not lose a report already written
            print(f"llmtrain-report: W&B logging failed ({type(err).__name__}: {err}); report.md is complete",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
