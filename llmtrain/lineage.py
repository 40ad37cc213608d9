"""One line of history per run directory: which checkpoint a start resumes, what a rollback sets aside.

``resume=auto`` continues the newest checkpoint of the run directory (falling back over damaged
ones); ``resume=PATH`` to one of its own older checkpoints rolls back: the newer checkpoints and
the metrics rows after that step move under ``abandoned/``, and ``auto`` follows the new line from
then on. A run directory that already holds checkpoints never starts a second line:
``resume=never``, or a checkpoint of another run, is refused there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from llmtrain.checkpoint_store import MARKER, checkpoint_root, latest_checkpoint, list_checkpoints, set_aside, step_of
from llmtrain.durable import atomic_write_text
from llmtrain.errors import UserError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


@dataclass
class ResumeChoice:
    """The checkpoints to try, newest first; ``explicit`` ones are not fallen back from."""

    candidates: list[Path]
    explicit: bool = False


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def choose(resume: str, run_dir: Path) -> ResumeChoice:
    """What ``resume`` (auto | never | PATH) means in ``run_dir``; raises UserError for a second line."""
    own = list_checkpoints(run_dir)
    if resume == "auto":
        return ResumeChoice(own[::-1])
    if resume == "never":
        if own:
            raise UserError("resume", f"never, but {run_dir} already holds checkpoints (newest {own[-1].name}); "
                                      f"use a new run_dir, or resume=auto to continue it")
        return ResumeChoice([])
    path = Path(resume)
    if not (path / MARKER).is_file():
        newest = latest_checkpoint(path)  # a run directory
        if newest is None:
            raise UserError("resume", f"{resume} is neither a complete checkpoint (with {MARKER}) nor a run dir "
                                      f"containing one")
        path = newest
    if own and not _inside(path, checkpoint_root(run_dir)):
        raise UserError("resume", f"{path} belongs to another run, but {run_dir} already holds checkpoints "
                                  f"(newest {own[-1].name}); resume it in a new run_dir")
    return ResumeChoice([path], explicit=True)


def newer_checkpoints(run_dir: Path, step: int) -> list[Path]:
    """Checkpoints of ``run_dir`` after ``step`` (marker or not: a rollback leaves none behind)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if (step_of(p) or -1) > step), key=step_of)


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if isinstance(row, dict):
            rows.append(row)
    return rows


def set_aside_after(run_dir: Path, step: int, label: str, checkpoints: list[Path]) -> Optional[Path]:
    """Move what lies after ``step`` out of the line, into one ``abandoned/<time>-<label>/`` folder:
    ``checkpoints`` (a rolled-back line's) and the metrics rows after ``step`` (that line's, or steps
    after the last checkpoint that will be redone). Returns the folder, or None when nothing moved."""
    path = run_dir / METRICS
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    kept, later = [], []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        (kept if isinstance(row, dict) and row.get("step", 0) <= step else later).append(line)
    if not later and not checkpoints:
        return None
    dest = set_aside(run_dir, checkpoints, label)
    if later:
        (dest / METRICS).write_text("".join(line + "\n" for line in later))
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dest


def saved_config(ckpt: Path) -> Optional[dict[str, Any]]:
    """The config a checkpoint was trained with (None for checkpoints from before configs were saved)."""
    path = ckpt / CONFIG
    if not path.is_file():
        return None
    cfg = yaml.safe_load(path.read_text())
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a mapping")
    return cfg


def write_config(run_dir: Path, config: dict[str, Any], step: int) -> Optional[Path]:
    """``config.yaml`` is what runs now; a different earlier one is kept beside it as
    ``config.until_step_N.yaml`` (N: the step the new one takes over at). Returns the kept copy."""
    text = yaml.safe_dump(config, sort_keys=False)
    path, kept = run_dir / CONFIG, None
    if path.is_file() and path.read_text() != text:
        kept = run_dir / f"config.until_step_{step}.yaml"
        n = 1
        while kept.exists():
            n += 1
            kept = run_dir / f"config.until_step_{step}~{n}.yaml"
        path.rename(kept)
    atomic_write_text(path, text)
    return kept


def finished_summary(run_dir: Path, max_steps: int) -> Optional[dict[str, Any]]:
    """The summary of a run that already completed at its newest checkpoint with max_steps reached."""
    newest, summary_path = latest_checkpoint(run_dir), run_dir / SUMMARY
    if newest is None or not summary_path.is_file():
        return None
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return None
    step = step_of(newest)
    if summary.get("status") == "completed" and summary.get("steps") == step and step >= max_steps:
        return summary
    return None
