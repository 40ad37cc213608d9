"""``build_data``: the one call the trainer makes; prepares (or finds) the shards and wires loaders."""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from tokenizers import Tokenizer

from llmtrain.data.budget import source_weights
from llmtrain.data.config import DataConfig
from llmtrain.data.loader import EpochOrder, PackedLoader, ValBatches, WindowIndex
from llmtrain.data.prepare import cached_max_token_id, describe_tokenizer, load_meta, prepare
from llmtrain.data.shards import TokenStream
from llmtrain.data.tokenizer import TextBytes, check_model_vocab
from llmtrain.errors import ConfigError, DataError


@dataclass
class DataBundle:
    tokenizer: Tokenizer
    tokenizer_path: str
    vocab_size: int     # embedding rows the tokenizer needs: its entry count, or its largest id + 1 if more
    eos_id: int
    train: PackedLoader
    val: ValBatches
    folder: Path
    meta: dict
    max_token_id: int   # the largest id the tokenizer emits (ids can have gaps)
    _per_byte: dict = field(default_factory=dict, repr=False)

    def val_batches(self, n: int) -> list:
        """n validation micro-batches for this rank, identical on every call."""
        return self.val(n)

    def val_tokens_per_byte(self, n: int) -> Optional[float]:
        """Tokens (EOS included) per UTF-8 byte of the validation text that ``n`` eval micro-batches
        per rank cover; None when a source's bytes are unknown.

        Each source's whole val split gives its ratio, and sources count by how many of the
        evaluated windows they supply (ValBatches samples windows of all sources alike), so the
        loss times this ratio is total nats over the bytes those windows stand for.
        """
        if n not in self._per_byte:
            windows = self.val.windows_per_source(n).tolist()
            used = [(w, src["splits"]["val"]) for w, src in zip(windows, self.meta["sources"]) if w]
            known = used and all(split.get("bytes") and split.get("tokens") for _, split in used)
            self._per_byte[n] = sum(w for w, _ in used) / sum(w * s["bytes"] / s["tokens"] for w, s in used) \
                if known else None
        return self._per_byte[n]

    def val_bpb(self, val_loss: float, n: int) -> Optional[float]:
        """Bits per byte from a mean val loss in nats per token over ``n`` eval micro-batches per rank."""
        per_byte = self.val_tokens_per_byte(n)
        return None if per_byte is None else val_loss / math.log(2) * per_byte


def _streams(folder: Path, meta: dict, split: str, dtype: np.dtype) -> list[TokenStream]:
    streams = []
    for src in meta["sources"]:
        entry = src["splits"][split]
        stream = TokenStream(folder, entry["shards"], dtype)
        if stream.total != entry["tokens"]:
            raise DataError(str(folder / "meta.json"), f"{src['path']} {split}: shards hold {stream.total} tokens, "
                            f"metadata says {entry['tokens']}; delete {folder} to re-prepare")
        streams.append(stream)
    return streams


def _with_val_bytes(folder: Path, meta: dict, streams: list[TokenStream], tokenizer: Tokenizer, write: bool) -> dict:
    """A cache prepared before meta.json counted bytes: count its val splits' bytes from their
    tokens (small), and store them so the next run reads them. The train split stays uncounted."""
    missing = [i for i, src in enumerate(meta["sources"]) if "bytes" not in src["splits"]["val"]]
    if not missing:
        return meta
    count = TextBytes(tokenizer, meta["eos_id"])
    for i in missing:
        meta["sources"][i]["splits"]["val"]["bytes"] = sum(count(np.asarray(m)) for m in streams[i].maps)
    if write:
        tmp = folder / f".meta.json.{socket.gethostname()}.{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, folder / "meta.json")  # atomic: a reader sees the old or the new file
        except OSError:
            pass  # a read-only cache: counted again by the next run
        finally:
            tmp.unlink(missing_ok=True)
    return meta


def _check_val_windows(index: WindowIndex, seq_len: int, val_fraction: float) -> None:
    """Evaluation needs one window of seq_len+1 tokens inside one source. ValBatches wraps around a
    short split, so that one window already gives every data-parallel rank full micro-batches."""
    if index.total:
        return
    sizes = [s.total for s in index.streams]
    spread = f" in {len(sizes)} sources, at most {max(sizes)} in one," if len(sizes) > 1 else ","
    raise DataError(
        "data.val_fraction",
        f"the validation split has {sum(sizes)} tokens{spread} fewer than train.seq_len+1 = {seq_len + 1} that one "
        f"evaluation window needs; raise data.val_fraction (now {val_fraction}) or set train.eval_every=0",
    )


def build_data(
    data_cfg: DataConfig, *, seq_len: int, seed: int, rank: int, world_size: int,
    micro_batch_size: int, global_batch_size: int, evals: bool = True,
) -> DataBundle:
    """Prepare (or find) the shards and wire this rank's loaders.

    ``evals``: the run will ask for validation batches, so a validation split without a single
    window is refused here rather than at the first eval (``data.val_fraction=0`` says there is
    no split on purpose and is never refused).
    """
    folder = prepare(data_cfg, progress=data_cfg.progress and rank == 0)
    meta = load_meta(folder)
    tokenizer_path = folder / meta["tokenizer"]
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    count = tokenizer.get_vocab_size(with_added_tokens=True)
    max_id = cached_max_token_id(folder, meta)
    dtype = np.dtype(meta["dtype"])
    if count != meta["vocab_size"] or max_id > np.iinfo(dtype).max:
        raise DataError(str(folder / "meta.json"), f"says vocab {meta['vocab_size']} ({meta['dtype']}) but "
                        f"{tokenizer_path} has {count} (ids up to {max_id}); delete {folder} to re-prepare")

    train_index = WindowIndex(_streams(folder, meta, "train", dtype), seq_len)
    sources = list(data_cfg.sources)
    weights = source_weights(sources) if sources else None
    if weights is not None:
        for src, count in zip(meta["sources"], train_index.counts.tolist()):
            if count == 0:
                raise DataError(src["path"], f"has a weight but fewer than train.seq_len+1 = {seq_len + 1} training tokens")
    if train_index.total == 0:
        tokens = sum(s.total for s in train_index.streams)
        raise DataError(", ".join(s["path"] for s in meta["sources"]),
                        f"the training split has {tokens} tokens, fewer than train.seq_len+1 = {seq_len + 1}")
    data_seed = data_cfg.seed if data_cfg.seed is not None else seed
    order = EpochOrder(train_index.counts, weights, data_seed)
    train = PackedLoader(
        train_index, order, seed=data_seed, rank=rank, world_size=world_size,
        micro_batch_size=micro_batch_size, global_batch_size=global_batch_size, num_workers=data_cfg.num_workers,
    )
    val_streams = _streams(folder, meta, "val", dtype)
    meta = _with_val_bytes(folder, meta, val_streams, tokenizer, write=rank == 0)
    val_index = WindowIndex(val_streams, seq_len)
    if evals and data_cfg.val_fraction > 0:
        _check_val_windows(val_index, seq_len, data_cfg.val_fraction)
    val = ValBatches(val_index, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size, seq_len=seq_len)
    return DataBundle(tokenizer, str(tokenizer_path), max(count, max_id + 1), meta["eos_id"], train, val, folder, meta,
                      max_id)


def check_vocab(model_vocab_size: int, bundle: DataBundle, pad_to_multiple_of: int = 0) -> int:
    """The embedding size the model must have for this tokenizer.

    With ``pad_to_multiple_of`` > 0 it is the tokenizer's size rounded up to that multiple (faster
    matmuls; the extra rows are never targets) and ``model.vocab_size`` is ignored; otherwise
    ``model.vocab_size`` must equal the tokenizer's size, which covers its largest id.
    """
    if pad_to_multiple_of < 0:
        raise ConfigError("data.pad_vocab_to_multiple_of", f"got {pad_to_multiple_of}, expected >= 0")
    if pad_to_multiple_of:
        return -(-bundle.vocab_size // pad_to_multiple_of) * pad_to_multiple_of
    requested = bundle.meta.get("requested_vocab_size")
    where = describe_tokenizer(requested, bundle.meta["vocab_size"], bundle.tokenizer_path)
    check_model_vocab(model_vocab_size, pad_to_multiple_of, bundle.max_token_id, where)
    if requested and requested > bundle.vocab_size and model_vocab_size == requested:
        raise ConfigError(
            "data.vocab_size",
            f"the corpus only supports a {bundle.vocab_size}-token BPE ({requested} asked for); set "
            f"data.vocab_size={bundle.vocab_size} or data.pad_vocab_to_multiple_of=64",
        )
    if model_vocab_size != bundle.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"{model_vocab_size} does not match the tokenizer's {bundle.vocab_size} tokens ({bundle.tokenizer_path}); "
            f"set model.vocab_size={bundle.vocab_size} or data.pad_vocab_to_multiple_of=64",
        )
    return model_vocab_size
