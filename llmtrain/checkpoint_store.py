"""The checkpoints of one run directory on disk: names, commit, manifest, verify, adopt, set aside, prune.

``RUN_DIR/checkpoints/step_N/`` holds a checkpoint's files and a ``COMPLETE`` marker, a JSON
manifest with each file's size and sha256. A checkpoint is written as ``.tmp_step_N``, every file
fsynced, then the manifest (fsynced), then renamed to ``step_N`` and the parent fsynced: after a
crash there is either no ``step_N`` or a complete one. What the code here takes out of the line
(a damaged checkpoint, the newer checkpoints a rollback leaves behind) is moved under
``RUN_DIR/abandoned/``, never deleted; only pruning deletes, and only older checkpoints of the line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from llmtrain.durable import atomic_write_text, fsync_dir, fsync_tree, sha256_file
from llmtrain.errors import ResourceError

MARKER = "COMPLETE"
MANIFEST_FORMAT = 2
ABANDONED = "abandoned"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_DIR = re.compile(r"^\.tmp_step_(\d+)$")
_OLD_DIR = re.compile(r"^\.(old|del)_step_(\d+)$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_of(path: str | Path) -> Optional[int]:
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints with their marker, oldest first (not yet verified: see ``verify``)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(step_of(p), p) for p in root.iterdir() if step_of(p) is not None and (p / MARKER).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def tmp_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f".tmp_step_{step}"


# ------------------------------------------------------------------------------ manifest
def hash_files(folder: Path, relpaths: list[str]) -> dict[str, dict[str, Any]]:
    return {rel: {"bytes": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)} for rel in relpaths}


def files_under(folder: Path) -> list[str]:
    """Every file below ``folder``, as paths relative to it (the marker excluded)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MARKER)


def read_manifest(ckpt: Path) -> Optional[dict[str, Any]]:
    """The marker's manifest; None for a marker written before manifests existed (nothing to check).
    Raises ValueError when the marker is unreadable."""
    text = (ckpt / MARKER).read_text()
    if not text.lstrip().startswith("{"):
        return None  # legacy marker: "step N" lines or empty
    manifest = json.loads(text)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError("marker is not a manifest")
    return manifest


def write_manifest(folder: Path, step: int, files: dict[str, dict[str, Any]], **extra: Any) -> None:
    """The marker, written last, after every file under ``folder`` is on disk: it makes ``folder`` a
    complete checkpoint once renamed."""
    fsync_tree(folder)
    manifest = {"format": MANIFEST_FORMAT, "step": step, **extra, "files": dict(sorted(files.items()))}
    atomic_write_text(folder / MARKER, json.dumps(manifest, indent=1) + "\n")


def verify(ckpt: Path, rank: int = 0, world_size: int = 1) -> Optional[str]:
    """Why ``ckpt`` is damaged, or None. Rank r checks every world_size-th file of the manifest."""
    try:
        manifest = read_manifest(ckpt)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return f"damaged: unreadable {MARKER} marker ({type(err).__name__})"
    if manifest is None:
        return None
    for i, (rel, expected) in enumerate(sorted(manifest["files"].items())):
        if i % world_size != rank:
            continue
        path = ckpt / rel
        if not path.is_file():
            return f"damaged: {rel} is missing"
        size = path.stat().st_size
        if size != expected.get("bytes"):
            return f"damaged: {rel} has {size} bytes, the manifest says {expected.get('bytes')} (truncated?)"
        if sha256_file(path) != expected.get("sha256"):
            return f"damaged: hash mismatch in {rel}"
    return None


# ------------------------------------------------------------------------------ commit
def commit(tmp: Path, final: Path) -> None:
    """Rename a checkpoint with its marker into place (and persist the rename). An existing copy of
    the step is renamed aside first and removed only once the new one is in place."""
    old = final.with_name(f".old_{final.name}")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def prune(run_dir: str | Path, keep: int, protect: Path) -> None:
    """Delete all but the newest ``keep`` checkpoints of the line (never ``protect``, just written).
    A checkpoint is renamed before it is deleted, so a half-deleted one never looks complete."""
    if keep <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep]:
        if old.resolve() == protect.resolve():
            continue
        doomed = old.with_name(f".del_{old.name}")
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    fsync_dir(checkpoint_root(run_dir))


def adopt_and_clean(run_dir: str | Path) -> list[str]:
    """Finish what a crash interrupted; returns one note per action.

    A ``.tmp_step_N`` whose manifest verifies and that has no ``step_N`` crashed between its marker
    and its rename: it is adopted. A ``.old_step_N`` without ``step_N`` crashed between the two renames
    of a re-save: it is put back. Every other temporary directory is an unfinished write: removed.
    Call it only while holding the run directory's lock (no writer can be mid-save)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    notes = []
    # Temporary copies first: a complete one is newer than a copy a re-save set aside.
    for path in sorted(root.iterdir(), key=lambda p: (not p.name.startswith(".tmp_"), p.name)):
        tmp, old = _TMP_DIR.match(path.name), _OLD_DIR.match(path.name)
        if not (tmp or old):
            continue
        final = root / f"step_{tmp.group(1) if tmp else old.group(2)}"
        if tmp and not final.exists() and (path / MARKER).is_file() and verify(path) is None:
            os.rename(path, final)
            notes.append(f"adopted {final.name}: it was complete but not yet renamed when the last run stopped")
        elif old and old.group(1) == "old" and not final.exists() and (path / MARKER).is_file():
            os.rename(path, final)
            notes.append(f"restored {final.name} from its copy set aside by an interrupted re-save")
        else:
            shutil.rmtree(path, ignore_errors=True)
            notes.append(f"removed {path.name}, left unfinished by an earlier run")
    fsync_dir(root)
    return notes


def set_aside(run_dir: str | Path, paths: list[Path], label: str) -> Path:
    """Move ``paths`` (checkpoints, files of the run directory) under ``abandoned/<time>-<label>/``."""
    run_dir = Path(run_dir)
    dest = run_dir / ABANDONED / f"{time.strftime('%Y%m%d-%H%M%S')}-{label}"
    n = 1
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{dest.name.split('~')[0]}~{n}")
    dest.mkdir(parents=True)
    for path in paths:
        rel = Path(path).resolve().relative_to(run_dir.resolve())
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, target)
    fsync_dir(dest)
    for source_dir in {Path(p).parent for p in paths}:
        fsync_dir(source_dir)
    return dest


# ------------------------------------------------------------------------------ start-up checks
def check_writable(run_dir: str | Path) -> None:
    """The checkpoints folder exists (or can be made) and takes a file, before any work is done."""
    root = checkpoint_root(run_dir)
    probe = root / f".write_test.{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as err:
        raise ResourceError("run_dir", f"cannot write checkpoints to {root} ({err.strerror or err}); "
                                       f"expected a writable directory (set run_dir=PATH)") from None


def check_free_space(run_dir: str | Path, checkpoint_bytes: int, keep: int) -> None:
    """Free space for the checkpoints still to be written before pruning (keep + 1 at the peak)."""
    root = checkpoint_root(run_dir)
    existing = len(list_checkpoints(run_dir))
    count = max(1, keep + 1 - existing) if keep > 0 else 1
    need, free = count * checkpoint_bytes, shutil.disk_usage(root).free
    if free < need:
        raise ResourceError(
            "train.keep_checkpoints",
            f"{root} has {free / 2**30:.2f} GiB free, but {count} more checkpoint(s) of "
            f"~{checkpoint_bytes / 2**30:.2f} GiB are written before pruning (keep_checkpoints={keep}, "
            f"{existing} present); free space or use another run_dir")
