"""What a person sees: a progress bar (plain lines when output is not a terminal), metrics.jsonl,
summary.json, loss.png and W&B.

Only rank 0 writes. One small interface (``RunLogger.log_train / log_eval / summary / close``);
wandb and matplotlib are imported only when used.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from llmtrain.console import RecentRate, format_eta, is_terminal
from llmtrain.errors import ConfigError, choices


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN/inf; write them as strings so the file stays valid and the value visible.
    out = {}
    for k, v in row.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)
        out[k] = v
    return out


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


# WANDB_MODE values wandb accepts, as the mode they mean (dryrun and run are its old names).
WANDB_ENV_MODES = {"online": "online", "offline": "offline", "disabled": "disabled", "dryrun": "offline",
                   "run": "online", "shared": "shared"}


def wandb_mode(configured: str) -> str:
    """The mode a run logs in. ``auto``: WANDB_MODE (or WANDB_DISABLED) from the environment when set,
    else online when logged in, else offline. A mode set in the config is used as it is."""
    if configured != "auto":
        return configured
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"):
        return "disabled"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if not env:
        return "online" if wandb_logged_in() else "offline"
    if env not in WANDB_ENV_MODES:
        raise ConfigError("WANDB_MODE", f"got {env!r}, expected {choices(WANDB_ENV_MODES)}")
    return WANDB_ENV_MODES[env]


# Overrides that say where or how a run is logged, not what it trains: left out of its W&B name.
_NOT_IN_NAME = ("run_dir", "resume", "dry_run", "experiment", "data.cache_dir", "train.progress_bar")


def _override_key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def _shown(override: str) -> str:
    """An override as a person wrote it: without the ``++`` the CLI adds to ``optim.*`` keys."""
    return override if override.startswith("~") else override.lstrip("+")


def run_name(config: dict, overrides: Sequence[str], limit: int = 128) -> str:
    """``gpt2_124m_adamw optim.lr=3e-4``: the experiment (else model_optimizer) and the overrides that
    describe the run; values over 32 characters keep their tail, the whole at most ``limit``."""
    experiment = config.get("experiment")
    parts = [str(experiment or "_".join(str((config.get(k) or {}).get("name", k)) for k in ("model", "optim")))]
    for override in overrides:
        key = _override_key(override)
        if key in _NOT_IN_NAME or key.startswith(("hydra.", "logger.")):
            continue
        if not experiment and key in ("model", "optim"):
            continue  # already the name's first word
        text = _shown(override)
        name, eq, value = text.partition("=")
        parts.append(f"{name}={value if len(value) <= 32 else '…' + value[-31:]}" if eq else text)
    name = " ".join(parts)
    return name if len(name) <= limit else name[:limit - 1] + "…"


def hydra_job() -> tuple[list[str], Optional[str]]:
    """This Hydra job's command-line overrides and, in a multirun, its sweep folder; ([], None) outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return [], None
    hydra_cfg = HydraConfig.get()
    sweep = str(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
    return list(hydra_cfg.overrides.task), sweep


def job_header(num: int, count: Optional[int], overrides: Sequence[str], swept: Sequence[str]) -> str:
    """``[job 2/6] optim=lion optim.lr=1e-3``: a multirun job (``num`` from 0) and the overrides it sweeps
    (all of its overrides when nothing is swept)."""
    swept_keys = {k.lstrip("+~") for k in swept}
    shown = [_shown(o) for o in overrides if _override_key(o) in swept_keys] or [_shown(o) for o in overrides]
    position = f"{num + 1}/{count}" if count else f"{num + 1}"
    return " ".join([f"[job {position}]", *shown])


def sweep_shape(overrides: Sequence[str]) -> tuple[Optional[int], list[str]]:
    """How many jobs a multirun launches (None if unknown) and which keys it sweeps."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    count, swept = 1, []
    try:
        for override in OverridesParser.create().parse_overrides(list(overrides)):
            if override.is_sweep_override():
                count *= len(list(override.sweep_string_iterator()))
                swept.append(override.key_or_group)
    except Exception:  # glob() and other sweeps that need the config repository to expand
        return None, swept
    return count, swept


def print_job_header(argv: Sequence[str]) -> None:
    """Print this multirun job's header line (rank 0 only), so a sweep's log says which job is which."""
    from hydra.core.hydra_config import HydraConfig

    if int(os.environ.get("RANK", "0")) != 0:
        return
    count, swept = sweep_shape([a for a in argv if not a.startswith("-")])
    hydra_cfg = HydraConfig.get()
    print(job_header(hydra_cfg.job.num, count, hydra_cfg.overrides.task, swept), flush=True)


class WandbSink:
    """W&B in online/offline mode, resumable by run id. Named from the experiment and the overrides,
    grouped by the multirun sweep (the group ``llmtrain-report`` logs to), unless the config names them."""

    def __init__(self, cfg, run_dir: Path, config: dict, run_id: Optional[str], mode: str):
        import wandb  # lazy: only when enabled

        overrides, sweep = hydra_job()
        name = cfg.name or run_name(config, overrides)
        group = cfg.group or (Path(sweep).resolve().name if sweep else None)
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=group, name=name,
            dir=str(run_dir), config=config, mode=mode, id=run_id, resume="allow" if run_id else None,
            settings=wandb.Settings(silent=True),
        )
        self.run_id = self.run.id
        if mode == "offline":
            print(f"wandb: offline run in {run_dir}/wandb; "
                  f"upload it later with `wandb sync {run_dir}/wandb/offline-run-*`", flush=True)

    def log(self, row: dict[str, Any]) -> None:
        step = row.get("step")
        self.run.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=step)

    def close(self, summary: dict[str, Any]) -> None:
        for k, v in summary.items():
            if isinstance(v, (int, float, str)):
                self.run.summary[k] = v
        self.run.finish()


class ProgressBar:
    """A tqdm bar when ``bar`` (a terminal); otherwise one plain line per logged step, flushed at once:
    ``step 120/5000 | loss 3.412 | lr 6.0e-04 | 52,310 tok/s | eta 1h12m``. Nothing when not ``enabled``."""

    def __init__(self, total: int, initial: int, enabled: bool, bar: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.enabled = total, enabled
        self.rate = RecentRate(start=initial, clock=clock)  # ETA from the recent logged steps' wall-clock rate
        self.bar = None
        if enabled and bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.rate.add(step)
            eta = format_eta(self.rate.eta(self.total - step))
            self.write(f"step {step}/{self.total} | loss {row['loss']:.3f} | lr {row['lr']:.1e} | "
                       f"{row['tokens_per_s']:,.0f} tok/s | eta {eta}")
            return
        self.bar.n = step
        self.bar.set_postfix_str(
            f"loss {row['loss']:.4f} lr {row['lr']:.2e} {row['tokens_per_s']:,.0f} tok/s", refresh=False
        )
        self.bar.refresh()

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)  # a log file is block-buffered: show each line when it happens

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def loss_figure(train_rows: Sequence[dict[str, Any]], eval_rows: Sequence[dict[str, Any]], title: str):
    """loss.png's figure: train and val loss against steps and tokens, val bits per byte on a
    second y axis (it compares across tokenizers, the loss does not)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x in zip(axes, ("step", "tokens")):
        if train_rows:
            ax.plot([r[x] for r in train_rows], [r["loss"] for r in train_rows], label="train", lw=1)
        if eval_rows:
            ax.plot([r[x] for r in eval_rows], [r["val_loss"] for r in eval_rows], "o-", label="val")
        ax.set_xlabel(x)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        bpb = [(r[x], r["val_bpb"]) for r in eval_rows if isinstance(r.get("val_bpb"), (int, float))]
        if bpb:  # rows of a run resumed from before val_bpb existed have none
            right = ax.twinx()
            right.plot([p[0] for p in bpb], [p[1] for p in bpb], "s--", color="tab:green", label="val bpb")
            right.set_ylabel("val bits per byte")
            more_handles, more_labels = right.get_legend_handles_labels()
            handles, labels = handles + more_handles, labels + more_labels
        ax.legend(handles, labels)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


class RunLogger:
    def __init__(self, run_dir: Path, logger_cfg, config: dict, *, enabled: bool, total_steps: int,
                 start_step: int, progress: bool, wandb_run_id: Optional[str] = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.plot = logger_cfg.plot
        self.train_rows: list[dict[str, Any]] = []
        self.eval_rows: list[dict[str, Any]] = []
        self.wandb: Optional[WandbSink] = None
        self.bar = ProgressBar(total_steps, start_step, enabled, bar=progress and is_terminal())
        if not enabled:
            return
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._reload_history(start_step)
        mode = wandb_mode(logger_cfg.wandb.mode)
        if mode != "disabled":
            self.wandb = WandbSink(logger_cfg.wandb, self.run_dir, config, wandb_run_id, mode)

    @property
    def wandb_run_id(self) -> Optional[str]:
        return self.wandb.run_id if self.wandb else None

    def _reload_history(self, start_step: int) -> None:
        """The rows of the line up to the step training resumes from (later ones were set aside)."""
        from llmtrain.lineage import read_rows

        for row in read_rows(self.run_dir):
            if row.get("step", 0) > start_step:
                continue
            if "val_loss" in row:
                self.eval_rows.append(row)
            elif "loss" in row:
                self.train_rows.append(row)

    def _append(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(_json_safe(row)) + "\n")
        if self.wandb:
            self.wandb.log(row)

    def record(self, row: dict[str, Any]) -> None:
        """A row that is neither a train nor an eval row (a config change on resume)."""
        if self.enabled:
            self._append(row)

    def log_train(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.train_rows.append(row)
        self._append(row)
        self.bar.update(row["step"], row)

    def log_eval(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.eval_rows.append(row)
        self._append(row)
        bpb = row.get("val_bpb")
        extra = "" if bpb is None else f" | val_bpb {bpb:.4f}"
        self.bar.write(f"step {row['step']}: val_loss {row['val_loss']:.4f}{extra}")
        if self.plot:
            self.write_plot()

    def note(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def write_plot(self) -> None:
        import matplotlib.pyplot as plt

        fig = loss_figure(self.train_rows, self.eval_rows, self.run_dir.name)
        tmp = self.run_dir / ".loss.png.tmp"
        fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        os.replace(tmp, self.run_dir / "loss.png")

    def summary(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        tmp = self.run_dir / ".summary.json.tmp"
        tmp.write_text(json.dumps({k: _finite_or_none(v) for k, v in summary.items()}, indent=2) + "\n")
        os.replace(tmp, self.run_dir / "summary.json")

    def close(self, summary: dict[str, Any]) -> None:
        self.bar.close()
        if self.enabled and self.plot and (self.train_rows or self.eval_rows):
            self.write_plot()
        if self.wandb:
            self.wandb.close(summary)
