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
from typing import Any, Callable, Optional

from llmtrain.console import RecentRate, format_eta, is_terminal


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


class WandbSink:
    """W&B in online/offline mode, resumable by run id."""

    def __init__(self, cfg, run_dir: Path, config: dict, run_id: Optional[str]):
        import wandb  # lazy: only when enabled

        mode = cfg.mode
        if mode == "auto":
            mode = "online" if wandb_logged_in() else "offline"
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=cfg.group, name=cfg.name or run_dir.name,
            dir=str(run_dir), config=config, mode=mode, id=run_id, resume="allow" if run_id else None,
            settings=wandb.Settings(silent=True),
        )
        self.run_id = self.run.id
        if mode == "offline":
            print(f"wandb: offline run in {run_dir}/wandb; upload it later with `wandb sync {run_dir}/wandb/offline-run-*`")

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
        if logger_cfg.wandb.mode != "disabled":
            self.wandb = WandbSink(logger_cfg.wandb, self.run_dir, config, wandb_run_id)

    @property
    def wandb_run_id(self) -> Optional[str]:
        return self.wandb.run_id if self.wandb else None

    def _reload_history(self, start_step: int) -> None:
        """On resume keep rows up to the checkpoint step, drop any logged after it (they will be redone)."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= start_step:
                kept.append(line)
                (self.eval_rows if "val_loss" in row else self.train_rows).append(row)
        self.metrics_path.write_text("".join(k + "\n" for k in kept))

    def _append(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(_json_safe(row)) + "\n")
        if self.wandb:
            self.wandb.log(row)

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
        self.bar.write(f"step {row['step']}: val_loss {row['val_loss']:.4f}")
        if self.plot:
            self.write_plot()

    def note(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def write_plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, x in zip(axes, ("step", "tokens")):
            if self.train_rows:
                ax.plot([r[x] for r in self.train_rows], [r["loss"] for r in self.train_rows], label="train", lw=1)
            if self.eval_rows:
                ax.plot([r[x] for r in self.eval_rows], [r["val_loss"] for r in self.eval_rows], "o-", label="val")
            ax.set_xlabel(x)
            ax.set_ylabel("loss")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(self.run_dir.name)
        fig.tight_layout()
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
