"""Packed, sharded, exactly resumable batches from memory-mapped token streams.

Windows: each source's train stream is cut into windows of ``seq_len + 1`` tokens with stride
``seq_len`` (the last token of one window is the first of the next, so every token is a target
exactly once); windows never span two sources. Window ids are global across sources.

Global order: epoch ``e`` is a permutation of the window ids keyed by ``(seed, e)`` and evaluated
pointwise (``permutation.permute``: O(1) memory, no startup cost at any corpus size); the
training stream is epoch 0, then epoch 1, ... Each optimizer step takes the next
``global_batch_size`` positions of that stream; rank ``r`` of ``W`` takes the contiguous slice
``[r·G/W, (r+1)·G/W)`` of the step, in micro-batches of ``micro_batch_size``. The order depends
only on the seed and the data, never on the world size, so the loader state is one number, the
global position ("cursor") at the start of the current step, and a run resumed on any number of
ranks continues at the exact next window. Mixtures: with weights, an epoch still has as many
windows as all sources together, but source i supplies a share w_i/Σw of them (a small source
repeats, reshuffled; a large one contributes a fresh random subset every epoch).
"""

from __future__ import annotations

import collections
import queue
import threading
from typing import Optional, Sequence

import numpy as np
import torch

from llmtrain.data.permutation import permute
from llmtrain.data.shards import TokenStream
from llmtrain.errors import ConfigError, DataError


class WindowIndex:
    """Global window ids over several token streams -> token slices."""

    def __init__(self, streams: Sequence[TokenStream], seq_len: int):
        self.streams, self.seq_len = list(streams), seq_len
        self.counts = np.array([max(0, (s.total - 1) // seq_len) for s in self.streams], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.total = int(self.offsets[-1])

    def read(self, window_ids: np.ndarray) -> np.ndarray:
        """[len(window_ids), seq_len + 1] token ids."""
        out = np.empty((len(window_ids), self.seq_len + 1), dtype=np.int64)
        sources = np.searchsorted(self.offsets, window_ids, side="right") - 1
        for si in np.unique(sources).tolist():
            rows = np.flatnonzero(sources == si)
            starts = (window_ids[rows] - self.offsets[si]) * self.seq_len
            block = np.empty((len(rows), self.seq_len + 1), dtype=np.int64)
            self.streams[si].read_many(starts, self.seq_len + 1, block)
            out[rows] = block
        return out


class EpochOrder:
    """Which window sits at each position of the training stream, from (seed, epoch) alone.

    Without weights, epoch e is the permutation of all window ids keyed by (seed, e). With
    weights, position p of epoch e first maps through a permutation of [0, size) to a slot q;
    slots are laid out as source 0's quota, then source 1's, ...; the k-th slot of source i is
    window ``perm_{seed,e,i,k // count_i}(k % count_i)`` of that source, so a source smaller than
    its quota is replayed in a fresh order each pass and a larger one yields a fresh subset.
    Nothing is materialised: any position is computed on demand (see ``permutation``).
    """

    CHUNK = 8192

    def __init__(self, counts: np.ndarray, weights: Optional[Sequence[float]], seed: int):
        self.counts, self.seed = np.asarray(counts, dtype=np.int64), seed
        self.size = int(self.counts.sum())
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.quota = None if weights is None else self._quota(np.asarray(weights, dtype=np.float64))
        self._chunks: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()
        if self.quota is not None:
            if np.any((self.quota > 0) & (self.counts == 0)):
                raise ValueError("a weighted source has no windows")
            self.slots = np.concatenate([[0], np.cumsum(self.quota)])

    def _quota(self, weights: np.ndarray) -> np.ndarray:
        """Windows per source per epoch: largest-remainder rounding of size·w/Σw."""
        exact = self.size * weights / weights.sum()
        quota = np.floor(exact).astype(np.int64)
        for i in np.argsort(-(exact - quota), kind="stable")[: self.size - int(quota.sum())]:
            quota[i] += 1
        return quota

    def epoch(self, e: int) -> np.ndarray:
        """All window ids of epoch e in order (for inspection and tests; the loader never needs it)."""
        return self._ids(np.arange(e * self.size, (e + 1) * self.size, dtype=np.int64))

    def window_ids(self, positions: np.ndarray) -> np.ndarray:
        """Window ids at these stream positions, computed CHUNK positions at a time and memoised:
        a Feistel evaluation costs the same few hundred microseconds for 16 positions or 16K."""
        positions = np.asarray(positions, dtype=np.int64)
        chunks = positions // self.CHUNK
        out = np.empty(len(positions), dtype=np.int64)
        for c in np.unique(chunks).tolist():
            sel = np.flatnonzero(chunks == c)
            out[sel] = self._chunk(c)[positions[sel] - c * self.CHUNK]
        return out

    def _chunk(self, c: int) -> np.ndarray:
        with self._lock:
            ids = self._chunks.get(c)
            if ids is None:
                ids = self._ids(np.arange(c * self.CHUNK, (c + 1) * self.CHUNK, dtype=np.int64))
                self._chunks[c] = ids
                if len(self._chunks) > 4:
                    self._chunks.popitem(last=False)
            return ids

    def _ids(self, positions: np.ndarray) -> np.ndarray:
        epochs, within = np.divmod(positions, self.size)
        out = np.empty(len(within), dtype=np.int64)
        for e in np.unique(epochs).tolist():
            sel = np.flatnonzero(epochs == e)
            out[sel] = self._epoch_ids(e, within[sel])
        return out

    def _epoch_ids(self, e: int, within: np.ndarray) -> np.ndarray:
        slots = permute(within, self.size, (self.seed, e))
        if self.quota is None:
            return slots
        source = np.searchsorted(self.slots, slots, side="right") - 1
        k = slots - self.slots[source]
        passes, j = np.divmod(k, self.counts[source])
        out = np.empty(len(slots), dtype=np.int64)
        group = source * (int(passes.max()) + 1) + passes
        for g in np.unique(group).tolist():
            sel = np.flatnonzero(group == g)
            si, rep = int(source[sel[0]]), int(passes[sel[0]])
            out[sel] = self.offsets[si] + permute(j[sel], int(self.counts[si]), (self.seed, e, si, rep))
        return out


def _to_xy(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(windows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class PackedLoader:
    """``next_batch() -> (x, y)`` for one rank; ``state_dict()`` is plain ints."""

    def __init__(
        self, index: WindowIndex, order: EpochOrder, *, seed: int, rank: int, world_size: int,
        micro_batch_size: int, global_batch_size: int, num_workers: int = 0, prefetch: int = 4,
    ):
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ConfigError("distributed.world_size", f"rank {rank} is outside world size {world_size}")
        if micro_batch_size <= 0 or global_batch_size % (micro_batch_size * world_size):
            raise ConfigError(
                "train.global_batch_size",
                f"{global_batch_size} is not divisible by train.micro_batch_size x ranks = {micro_batch_size} x {world_size}",
            )
        self.index, self.order, self.seed = index, order, seed
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.per_rank = global_batch_size // world_size
        self.accum_steps = self.per_rank // micro_batch_size
        self.cursor = 0  # global stream position at the start of the current optimizer step
        self.micro = 0   # micro-batches this rank already took in the current step
        self.last_window_ids: Optional[np.ndarray] = None
        self.num_workers, self.prefetch = num_workers, max(1, prefetch)
        self._threads: list[threading.Thread] = []
        self._queues: list[queue.Queue] = []
        self._stop = threading.Event()
        self._served = 0

    @property
    def windows_per_epoch(self) -> int:
        return self.order.size

    @property
    def epoch(self) -> int:
        return self.cursor // self.order.size

    def _position_after(self, k: int) -> tuple[int, int]:
        """(cursor, micro) after k more micro-batches from the current state."""
        steps, micro = divmod(self.micro + k, self.accum_steps)
        return self.cursor + steps * self.global_batch_size, micro

    def _make(self, cursor: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        first = cursor + self.rank * self.per_rank + micro * self.micro_batch_size
        ids = self.order.window_ids(np.arange(first, first + self.micro_batch_size, dtype=np.int64))
        x, y = _to_xy(self.index.read(ids))
        return x, y, ids

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_workers > 0:
            if not self._threads:
                self._start_workers()
            item = self._queues[self._served % self.num_workers].get()
            if isinstance(item, BaseException):
                raise item
            self._served += 1
            x, y, ids = item
        else:
            x, y, ids = self._make(self.cursor, self.micro)
        self.last_window_ids = ids
        self.cursor, self.micro = self._position_after(1)
        return x, y

    def __iter__(self):
        while True:
            yield self.next_batch()

    # --- background prefetch: worker k makes micro-batches k, k+n, k+2n, ... from the start state
    def _start_workers(self) -> None:
        self._stop.clear()
        self._served = 0
        base_cursor, base_micro = self.cursor, self.micro
        self._queues = [queue.Queue(self.prefetch) for _ in range(self.num_workers)]

        def work(k: int) -> None:
            j = k
            while not self._stop.is_set():
                steps, micro = divmod(base_micro + j, self.accum_steps)
                try:
                    item = self._make(base_cursor + steps * self.global_batch_size, micro)
                except BaseException as err:  # surfaced to the consumer, which re-raises it
                    item = err
                while not self._stop.is_set():
                    try:
                        self._queues[k].put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                j += self.num_workers

        self._threads = [threading.Thread(target=work, args=(k,), daemon=True, name=f"llmtrain-data-{k}")
                         for k in range(self.num_workers)]
        for t in self._threads:
            t.start()

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        self._threads, self._queues = [], []

    def __del__(self):
        if getattr(self, "_threads", None):
            self.close()

    # --- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "cursor": self.cursor, "micro": self.micro, "epoch": self.epoch,
            "windows_per_epoch": self.order.size, "seed": self.seed,
            "world_size": self.world_size, "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("windows_per_epoch") != self.order.size:
            raise DataError(
                "data", f"checkpoint's loader saw {state.get('windows_per_epoch')} windows per epoch, this data has "
                f"{self.order.size}; the corpus, tokenizer or train.seq_len changed since the checkpoint",
            )
        if state.get("seed") != self.seed:
            raise ConfigError("train.seed", f"checkpoint's data order used seed {state.get('seed')}, this run {self.seed}")
        micro = int(state.get("micro", 0))
        if micro and (state.get("world_size") != self.world_size or state.get("global_batch_size") != self.global_batch_size):
            raise DataError("data", "checkpoint was taken in the middle of an optimizer step; it can only resume "
                                    "with the same world size and train.global_batch_size")
        self.close()
        self.cursor, self.micro = int(state["cursor"]), micro


class ValBatches:
    """A fixed list of validation windows: the same micro-batches on every call."""

    def __init__(self, index: WindowIndex, *, rank: int, world_size: int, micro_batch_size: int, seq_len: int):
        self.index, self.rank, self.world_size, self.micro_batch_size = index, rank, world_size, micro_batch_size
        self.seq_len = seq_len
        # A fixed seed, not train.seed: runs with different seeds are evaluated on the same windows.
        self.order = np.random.default_rng(0).permutation(index.total) if index.total else None

    def windows_per_source(self, n: int) -> np.ndarray:
        """How many windows of each source ``n`` calls hand out, summed over all ranks."""
        if self.order is None:
            return np.zeros(len(self.index.counts), dtype=np.int64)
        positions = np.arange(n * self.world_size * self.micro_batch_size) % len(self.order)
        sources = np.searchsorted(self.index.offsets, self.order[positions], side="right") - 1
        return np.bincount(sources, minlength=len(self.index.counts))

    def __call__(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.order is None:
            raise DataError("data.val_fraction", f"the validation split has no window of {self.seq_len + 1} tokens; "
                            "raise data.val_fraction or lower train.seq_len")
        batches = []
        for i in range(n):
            first = (i * self.world_size + self.rank) * self.micro_batch_size
            positions = np.arange(first, first + self.micro_batch_size) % len(self.order)
            x, y = _to_xy(self.index.read(self.order[positions]))
            batches.append((x, y))
        return batches
