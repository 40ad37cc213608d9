"""Binary token shards: a writer that rolls files at ``shard_tokens``, and a memory-mapped reader.

A split of a source is one logical token stream stored as consecutive ``.bin`` files of raw
little-endian uint16 (every id the tokenizer can emit is < 65536) or uint32 ids. ``meta.json``
beside them lists every file with its token count; the reader refuses files whose size disagrees.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from llmtrain.errors import DataError


def token_dtype(max_token_id: int) -> np.dtype:
    """The narrowest shard dtype that holds every id up to ``max_token_id``."""
    return np.dtype(np.uint16) if max_token_id < 2**16 else np.dtype(np.uint32)


class ShardStateError(Exception):
    """Shard files on disk that do not match the writer state meant to continue them."""


class ShardWriter:
    """Appends token arrays to ``<prefix>.00000.bin``, ``<prefix>.00001.bin``, ...

    Documents arrive one at a time; they are buffered to ~1M tokens (at most a shard) so the file
    sees few, large writes. A shard is fsynced when it is closed; ``sync``/``state``/``restore``
    let an interrupted writer continue (see ``llmtrain/data/journal.py``).
    Every ~64K tokens of documents are checked against ``max_id`` (the tokenizer's largest id, which
    ``dtype`` holds) in one pass and only then narrowed to ``dtype``: an id that does not fit is a
    DataError naming ``source``, never a silent wrap-around.
    """

    BUFFER_TOKENS = 1 << 20
    CHECK_TOKENS = 1 << 16  # few numpy calls per document, and few pinned batches behind the views

    def __init__(self, folder: Path, prefix: str, dtype: np.dtype, shard_tokens: int, *, source: str, max_id: int):
        if max_id > np.iinfo(dtype).max:
            raise ValueError(f"max_id {max_id} does not fit {dtype.name}")
        self.folder, self.prefix, self.dtype, self.shard_tokens = folder, prefix, dtype, shard_tokens
        self.source, self.max_id = source, max_id
        self.shards: list[dict] = []
        self.total = 0
        self._fh = None
        self._in_current = 0
        self._unchecked: list[np.ndarray] = []  # documents as given (often views into a tokenized batch)
        self._unchecked_tokens = 0
        self._buffer: list[np.ndarray] = []  # checked, narrowed to dtype
        self._buffered = 0

    def write(self, tokens: np.ndarray) -> None:
        self._unchecked.append(tokens)
        self._unchecked_tokens += len(tokens)
        if self._unchecked_tokens >= self.CHECK_TOKENS:
            self._narrow()
        if self._buffered >= min(self.BUFFER_TOKENS, self.shard_tokens):
            self._flush()

    def _narrow(self) -> None:
        if not self._unchecked:
            return
        tokens = np.concatenate(self._unchecked)
        self._unchecked, self._unchecked_tokens = [], 0
        top = int(tokens.max()) if len(tokens) else 0
        if top > self.max_id:
            raise DataError(self.source, f"token id {top} is above {self.max_id}, the largest id the tokenizer lists "
                            f"and these {self.dtype.name} shards were sized for")
        self._buffer.append(tokens.astype(self.dtype))
        self._buffered += len(tokens)

    def _flush(self) -> None:
        self._narrow()
        if not self._buffer:
            return
        tokens = np.concatenate(self._buffer)
        self._buffer, self._buffered = [], 0
        while len(tokens):
            if self._fh is None or self._in_current >= self.shard_tokens:
                self._roll()
            take = min(len(tokens), self.shard_tokens - self._in_current)
            tokens[:take].tofile(self._fh)
            self._in_current += take
            self.shards[-1]["tokens"] += take
            self.total += take
            tokens = tokens[take:]

    def _name(self, index: int) -> str:
        return f"{self.prefix}.{index:05d}.bin"

    def _roll(self) -> None:
        self._close_file()
        name = self._name(len(self.shards))
        self._fh = open(self.folder / name, "wb")
        self._in_current = 0
        self.shards.append({"file": name, "tokens": 0})

    def _close_file(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def sync(self) -> None:
        """Write every buffered token and fsync the open shard, so ``state()`` describes the disk."""
        self._flush()
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def state(self) -> dict:
        """The shards written so far with their token counts (the last one still open); after ``sync``."""
        assert not (self._unchecked or self._buffer), "state() of a writer with unsynced tokens"
        return {"shards": [dict(shard) for shard in self.shards]}

    def restore(self, state: dict) -> None:
        """Continue after ``state``: its last shard is cut back to the recorded length and later
        shards are deleted, dropping what was written after that state was taken."""
        shards = [{"file": str(s["file"]), "tokens": int(s["tokens"])} for s in state["shards"]]
        for i, shard in enumerate(shards):
            path = self.folder / shard["file"]
            want = shard["tokens"] * self.dtype.itemsize
            size = path.stat().st_size if path.is_file() else -1
            if shard["file"] != self._name(i) or size < want or (size != want and i < len(shards) - 1):
                raise ShardStateError(f"{path} has {max(size, 0)} bytes, expected {want}")
        keep = {shard["file"] for shard in shards}
        for path in self.folder.glob(f"{self.prefix}.*.bin"):
            if path.name not in keep:
                path.unlink()
        self.shards, self.total = shards, sum(s["tokens"] for s in shards)
        if shards:
            path = self.folder / shards[-1]["file"]
            os.truncate(path, shards[-1]["tokens"] * self.dtype.itemsize)
            self._fh = open(path, "ab")
            self._in_current = shards[-1]["tokens"]

    def close(self) -> None:
        self._flush()
        self._close_file()


class TokenStream:
    """Read-only view over one split's shards as if they were one array of token ids."""

    def __init__(self, folder: Path, shards: list[dict], dtype: np.dtype):
        self.maps: list[np.ndarray] = []
        starts = [0]
        for shard in shards:
            path = folder / shard["file"]
            if not path.is_file():
                raise DataError(str(path), f"shard listed in {folder / 'meta.json'} is missing; delete {folder} to re-prepare")
            expected = shard["tokens"] * dtype.itemsize
            size = path.stat().st_size
            if size != expected:
                raise DataError(
                    str(path),
                    f"{size} bytes but meta.json says {shard['tokens']} {dtype.name} tokens ({expected} bytes); "
                    f"delete {folder} to re-prepare",
                )
            if shard["tokens"]:
                self.maps.append(np.memmap(path, dtype=dtype, mode="r"))
                starts.append(starts[-1] + shard["tokens"])
        self.starts = np.asarray(starts[:-1], dtype=np.int64)
        self.ends = np.asarray(starts[1:], dtype=np.int64)
        self.total = int(starts[-1])

    def read_many(self, starts: np.ndarray, length: int, out: np.ndarray) -> None:
        """out[k] = tokens [starts[k], starts[k]+length): one fancy-indexed gather per shard file."""
        first = np.searchsorted(self.ends, starts, side="right")
        last = np.searchsorted(self.ends, starts + length - 1, side="right")
        offsets = np.arange(length)
        for shard in np.unique(first).tolist():
            rows = np.flatnonzero((first == shard) & (last == shard))
            if len(rows):
                local = starts[rows] - self.starts[shard]
                out[rows] = self.maps[shard][local[:, None] + offsets]
        for row in np.flatnonzero(first != last).tolist():  # the rare window that spans two files
            out[row] = self.read(int(starts[row]), length)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length); crosses shard files when it has to."""
        i = int(np.searchsorted(self.ends, start, side="right"))
        offset = start - int(self.starts[i])
        if start + length <= self.ends[i]:
            return self.maps[i][offset:offset + length]
        parts, need = [], length
        while need:
            piece = self.maps[i][offset:offset + need]
            parts.append(piece)
            need -= len(piece)
            i, offset = i + 1, 0
        return np.concatenate(parts)
