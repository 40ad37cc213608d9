"""Atomic checkpoints: save, find the newest valid one, resume.

Layout: ``RUN_DIR/checkpoints/step_N/`` with ``model.pt`` (the unwrapped model's fp32
state_dict), ``optim.pt`` (optimizer state_dict), ``trainer.pt`` (step, token count, RNG
states, data-loader position, counters, W&B run id) and a ``COMPLETE`` marker written last.
A checkpoint is written under ``.tmp_step_N`` and renamed into place, so a crash mid-save never
leaves a directory that looks valid. Everything loads with ``weights_only=True``.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from llmtrain.errors import UserError

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Valid checkpoints (marker present), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_resume(resume: str, run_dir: str | Path) -> Optional[Path]:
    """``auto`` -> newest valid checkpoint in run_dir (or None); ``never`` -> None; else a path."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if (path / MARKER).is_file():
        return path
    newest = latest_checkpoint(path)  # a run directory
    if newest is None:
        raise UserError("resume", f"{resume} is neither a complete checkpoint (with {MARKER}) nor a run dir containing one")
    return newest


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(str(path), "missing from checkpoint") from None
    except Exception as err:  # corrupt or non-weights content
        raise UserError(str(path), f"cannot be loaded with weights_only=True ({type(err).__name__})") from None


def load_model_state(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The consolidated model state_dict of a checkpoint (for export and init)."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / MARKER).is_file():
        raise UserError(str(ckpt_dir), f"not a complete checkpoint (no {MARKER} marker)")
    return _load(ckpt_dir / "model.pt")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write step_N atomically and prune all but the newest ``keep`` valid checkpoints."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(model_state, tmp / "model.pt")
    torch.save(optim_state, tmp / "optim.pt")
    torch.save(trainer_state, tmp / "trainer.pt")
    (tmp / MARKER).write_text(f"step {step}\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt_dir: str | Path) -> tuple[dict, dict, dict]:
    """(model_state, optim_state, trainer_state) of a complete checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    model_state = load_model_state(ckpt_dir)
    return model_state, _load(ckpt_dir / "optim.pt"), _load(ckpt_dir / "trainer.pt")
