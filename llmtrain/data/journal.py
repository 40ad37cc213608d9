"""Resumable preparation: what a partial build has safely written, so that a rerun continues it.

A build happens in ``<cache_dir>/.tmp-<name>-<key>``, a name every run of the same config shares
(the cache folder's lock keeps runs apart). At every shard roll, and at least every ``EVERY_S``
seconds, the open shards are fsynced and ``journal.json`` is replaced atomically. It records how
far the input had been read (all sources before one, and that many documents of it, with the
bad-UTF-8 counts at that point) and the state of every splitter then. A rerun with the same key
reloads the tokenizer from the folder (a trained BPE is not trained again), cuts each shard back
to its journalled length, skips the input already read without tokenizing it, and goes on: the
output is byte for byte what an uninterrupted run writes. Arrays in a state (a held-back first
document) go beside the journal as ``.npy`` files, loaded without pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional, Protocol, Sequence

import numpy as np

FILE = "journal.json"
VERSION = 1
EVERY_S = 30.0  # a kill loses at most this much tokenizing; each save costs one fsync per open shard


@dataclass(frozen=True)
class Position:
    """How far the input was read: every source before ``source``, and ``documents`` of that one."""

    source: int = 0
    documents: int = 0
    bad_utf8: int = 0                     # BadUtf8 counters as they stood after those documents
    first_bad_utf8: Optional[str] = None
    chars: int = 0                        # characters read so far: where a resumed progress display starts


@dataclass
class Resume:
    """A journal that matches the config: the point a rerun continues from."""

    position: Position
    eos_id: int
    seconds: float                        # tokenizing time of the earlier runs
    splitters: list[dict] = field(default_factory=list)


class Checkpointed(Protocol):
    def sync(self) -> None: ...
    def state(self) -> dict: ...


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def partial_folder(cache_dir: Path, stem: str, key: str) -> tuple[Path, Optional[Resume]]:
    """The build folder for ``stem`` and what to resume from; emptied unless its journal matches.

    Call with the cache folder's lock held.
    """
    for old in cache_dir.glob(f".tmp-{stem}-*"):  # per-process folders of llmtrain before resuming
        shutil.rmtree(old, ignore_errors=True)
    folder = cache_dir / f".tmp-{stem}"
    resume, why = _load(folder, key)
    if resume is None:
        if why:
            print(f"llmtrain: not resuming the partial preparation in {folder} ({why}); starting over",
                  file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
    name = stem[:-len(key) - 1]
    for other in cache_dir.glob(f".tmp-{name}-*"):  # left by a killed run whose settings were changed since
        if other != folder and re.fullmatch(rf"\.tmp-{re.escape(name)}-[0-9a-f]{{16}}", other.name):
            size = sum(f.stat().st_size for f in other.iterdir() if f.is_file())
            print(f"llmtrain: {other} is a partial preparation of {name} with other settings ({size / 1e9:.2f} GB); "
                  "delete it unless you go back to them", file=sys.stderr)
    return folder, resume


def _load(folder: Path, key: str) -> tuple[Optional[Resume], Optional[str]]:
    path = folder / FILE
    if not path.is_file():
        return None, None  # killed before its first save (training the BPE, say): nothing to keep
    try:
        data = json.loads(path.read_text())
        if data.get("version") != VERSION:
            return None, f"journal version {data.get('version')}, this llmtrain writes {VERSION}"
        if data.get("key") != key:
            return None, "its journal is for other settings"
        if file_sha256(folder / "tokenizer.json") != data["tokenizer_sha256"]:
            return None, "its tokenizer.json is not the one its journal records"
        splitters = [{k: _load_array(folder, v) for k, v in s.items()} for s in data["splitters"]]
        return Resume(Position(**data["position"]), int(data["eos_id"]), float(data["seconds"]), splitters), None
    except (OSError, ValueError, KeyError, TypeError) as err:  # damaged: json, npy or fields
        return None, f"unreadable journal: {type(err).__name__}: {err}"


def _load_array(folder: Path, value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"npy"}:
        return np.load(folder / Path(value["npy"]).name, allow_pickle=False)
    return value


class Journal:
    """Saves checkpoints of a build in ``folder`` when one is due, and keeps its tokenizing time."""

    def __init__(self, folder: Path, key: str, eos_id: int, seconds: float = 0.0, every_s: float = EVERY_S):
        self.folder, self.key, self.eos_id, self.every_s = folder, key, eos_id, every_s
        self.tokenizer_sha256 = file_sha256(folder / "tokenizer.json")
        self.seconds_before = seconds
        self.started = self.saved_at = time.perf_counter()
        self.shards = -1
        self._arrays: dict[str, int] = {}  # sidecars already on disk: their content never changes

    def elapsed(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def tick(self, position: Position, splitters: Sequence[Checkpointed], shards: int) -> None:
        """After a batch: save if a shard was opened since the last save, or ``every_s`` passed."""
        if shards != self.shards or time.perf_counter() - self.saved_at >= self.every_s:
            self.save(position, splitters, shards)

    def save(self, position: Position, splitters: Sequence[Checkpointed], shards: int) -> None:
        for s in splitters:
            s.sync()  # shards on disk first: the journal must never be ahead of them
        states = [{k: self._store_array(f"s{i}.{k}", v) for k, v in s.state().items()}
                  for i, s in enumerate(splitters)]
        data = {"version": VERSION, "key": self.key, "tokenizer_sha256": self.tokenizer_sha256,
                "eos_id": self.eos_id, "position": asdict(position), "seconds": round(self.elapsed(), 3),
                "splitters": states}
        _write_atomically(self.folder / FILE, lambda fh: fh.write(json.dumps(data).encode()))
        self.saved_at, self.shards = time.perf_counter(), shards

    def _store_array(self, name: str, value: Any) -> Any:
        if not isinstance(value, np.ndarray):
            return value
        file = f"journal.{name}.npy"
        if self._arrays.get(file) != len(value):
            _write_atomically(self.folder / file, lambda fh: np.save(fh, value, allow_pickle=False))
            self._arrays[file] = len(value)
        return {"npy": file}

    def remove(self) -> None:
        """Drop the journal once the build is complete: the finished folder holds no resume state."""
        for path in self.folder.glob("journal.*"):
            path.unlink()


def _write_atomically(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Replace ``path`` by what ``write`` writes, durably: a reader sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash of the machine
    finally:
        os.close(dir_fd)
