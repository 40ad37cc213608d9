"""Binary token shards: a writer that rolls files at ``shard_tokens``, and a memory-mapped reader.

A split of a source is one logical token stream stored as consecutive ``.bin`` files of raw
little-endian uint16 (vocab < 65536) or uint32 ids. ``meta.json`` beside them lists every file
with its token count; the reader refuses files whose size disagrees with it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmtrain.errors import DataError


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends token arrays to ``<prefix>.00000.bin``, ``<prefix>.00001.bin``, ...

    Documents arrive one at a time; they are buffered to ~1M tokens so the file sees few, large writes.
    """

    BUFFER_TOKENS = 1 << 20

    def __init__(self, folder: Path, prefix: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.prefix, self.dtype, self.shard_tokens = folder, prefix, dtype, shard_tokens
        self.shards: list[dict] = []
        self.total = 0
        self._fh = None
        self._in_current = 0
        self._buffer: list[np.ndarray] = []
        self._buffered = 0

    def write(self, tokens: np.ndarray) -> None:
        self._buffer.append(tokens.astype(self.dtype))
        self._buffered += len(tokens)
        if self._buffered >= self.BUFFER_TOKENS:
            self._flush()

    def _flush(self) -> None:
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

    def _roll(self) -> None:
        if self._fh is not None:
            self._fh.close()
        name = f"{self.prefix}.{len(self.shards):05d}.bin"
        self._fh = open(self.folder / name, "wb")
        self._in_current = 0
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        self._flush()
        if self._fh is not None:
            self._fh.close()
            self._fh = None


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
