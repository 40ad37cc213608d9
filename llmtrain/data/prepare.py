"""Pre-tokenize a corpus into cached binary shards; also the ``llmtrain-data`` command.

Output: ``<data.cache_dir>/<name>-<key>/`` with ``tokenizer.json``, ``meta.json`` and per source
and split ``s<i>.<split>.<n>.bin`` token shards, each document followed by EOS. ``key`` hashes the
sources (paths, sizes, mtimes; dataset names), the tokenizer settings and the split settings, so
an unchanged config is a cache hit (no reading, no tokenizing) and any edited input re-prepares.
The folder is built under a temporary name and renamed when complete, under a file lock, so
concurrent ranks prepare once and a crash never leaves a half-written cache; a killed build
continues where it got to when run again (llmtrain/data/journal.py).

Validation split: by document, per source. With fraction f, document i goes to validation when
ceil((i+1)·f) > ceil(i·f): evenly spread, deterministic, decided while streaming, and at least one
document when f > 0. A source with a single document instead holds out its last f of tokens.

Bytes: each split records the UTF-8 bytes of the text routed to it (``bytes`` in meta.json), for
bits per byte. EOS tokens stand for no text. The held-out tail of a single document is counted
from its tokens (``TextBytes``: exact for a byte-level BPE), the train part takes the rest.

    llmtrain-data data=shakespeare data.vocab_size=2048
    python -m llmtrain.data.prepare data.sources='[{path: corpus/*.jsonl, text_field: content}]'
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from llmtrain.console import is_terminal, print_error, progress_counter
from llmtrain.data.config import DataConfig
from llmtrain.data.journal import Journal, Position, Resume, partial_folder
from llmtrain.data.shards import ShardStateError, ShardWriter, token_dtype
from llmtrain.data.sources import BadUtf8, SourceSpec, file_type, iter_documents, resolve_sources
from llmtrain.data.tokenizer import (
    SPECIAL_TOKENS, TextBytes, check_model_vocab, eos_id_of, is_hub_name, load_external, max_token_id, train_bpe,
)
from llmtrain.data.workers import EncoderPool, encode, init_worker, read_ahead
from llmtrain.errors import ConfigError, DataError, UnreachableError, UserError

FORMAT_VERSION = 1
BATCH_CHARS = 1 << 20  # documents are sent to workers in ~1 MB batches


def is_val_doc(index: int, fraction: float) -> bool:
    if fraction <= 0:
        return False
    return math.ceil(round((index + 1) * fraction, 9)) > math.ceil(round(index * fraction, 9))


def cache_key(cfg: DataConfig, specs: list[SourceSpec], tokenizer_identity: str) -> str:
    material = {
        "format": FORMAT_VERSION,
        "sources": [s.fingerprint() for s in specs],
        "tokenizer": tokenizer_identity,
        "val_fraction": cfg.val_fraction,
        "shard_tokens": cfg.shard_tokens,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def _check_settings(cfg: DataConfig) -> None:
    if cfg.on_bad_utf8 not in ("skip", "error"):
        raise ConfigError("data.on_bad_utf8", f"got {cfg.on_bad_utf8!r}, expected one of: skip, error")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError("data.val_fraction", f"got {cfg.val_fraction}, expected a value in [0, 1)")
    for key in ("shard_tokens", "tokenizer_train_bytes"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"data.{key}", f"got {getattr(cfg, key)}, expected > 0")


def prepare(cfg: DataConfig, progress: Optional[bool] = None, *, model_vocab_size: Optional[int] = None) -> Path:
    """Return the prepared folder for ``cfg``, building it first unless it is cached.

    With ``model_vocab_size``, a tokenizer that emits ids the model has no embedding for is a
    ConfigError as soon as the tokenizer is known, before any document is tokenized.
    """
    _check_settings(cfg)
    specs, external, key, final = _locate(cfg)
    cache_dir, stem = final.parent, final.name
    if (final / "meta.json").is_file() and not _wrapped_ids(final):
        return _checked(final, cfg, model_vocab_size)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError("data.cache_dir", f"cannot create {cache_dir} ({err.strerror})") from None
    with _file_lock(cache_dir / f".{stem}.lock"):
        if (final / "meta.json").is_file():  # another rank finished it while we waited, or an old cache
            wrapped = _wrapped_ids(final)
            if not wrapped:
                return _checked(final, cfg, model_vocab_size)
            print(f"llmtrain: {final} {wrapped}; preparing it again", file=sys.stderr)
        tmp, resume = partial_folder(cache_dir, stem, key)
        try:
            if external is None and cfg.tokenizer != "bpe" and resume is None:
                external = load_external(cfg.tokenizer)
            _build(cfg, specs, external, key, tmp, cfg.progress if progress is None else progress, model_vocab_size,
                   resume)
        except UserError as err:
            # Kept for a rerun (as after a kill, an interrupt or a full disk) unless the input or a data.*
            # setting is at fault: fixing those changes the key, so this folder would never be resumed.
            if (isinstance(err, DataError) and not isinstance(err, UnreachableError)) or err.key.startswith("data."):
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():  # a damaged folder without meta.json, or one with wrapped ids: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    return final


def _locate(cfg: DataConfig) -> tuple[list[SourceSpec], Optional[tuple], str, Path]:
    """The sources, the loaded external tokenizer (None for a BPE to train or a hub name), the cache
    key and the folder the prepared data has or will have. Reads file sizes only, never the text."""
    specs = resolve_sources(list(cfg.sources))
    external = None
    if cfg.tokenizer == "bpe":
        identity = f"bpe:{cfg.vocab_size}:{cfg.tokenizer_train_bytes}:{','.join(SPECIAL_TOKENS)}"
    elif is_hub_name(cfg.tokenizer):
        identity = f"hub:{cfg.tokenizer}"  # loaded only when building, so a cache hit needs no network
    else:
        external = load_external(cfg.tokenizer)
        identity = external[2]
    key = cache_key(cfg, specs, identity)
    stem = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', cfg.name)}-{key}"
    return specs, external, key, Path(cfg.cache_dir).expanduser() / stem


def prepared_folder(cfg: DataConfig) -> Optional[Path]:
    """The folder ``prepare(cfg)`` would return, if it is already prepared; None otherwise."""
    _check_settings(cfg)
    folder = _locate(cfg)[3]
    return folder if (folder / "meta.json").is_file() and not _wrapped_ids(folder) else None


def cached_max_token_id(folder: Path, meta: dict) -> int:
    """The largest id of a prepared folder's tokenizer; computed for caches that predate the field."""
    if "max_token_id" in meta:
        return int(meta["max_token_id"])
    from tokenizers import Tokenizer

    return max(max_token_id(Tokenizer.from_file(str(folder / meta["tokenizer"]))), int(meta["eos_id"]))


def _wrapped_ids(folder: Path) -> Optional[str]:
    """Why a cached folder must be prepared again: shards written before the dtype followed the largest id."""
    meta = load_meta(folder)
    top = cached_max_token_id(folder, meta)
    if top <= np.iinfo(np.dtype(meta["dtype"])).max:
        return None
    return f"holds {meta['dtype']} shards but its tokenizer emits ids up to {top} (those ids were wrapped)"


def describe_tokenizer(requested_vocab_size: Optional[int], vocab_size: int, tokenizer: str) -> str:
    """For error messages: the BPE and the data.vocab_size it was trained for, or the tokenizer's file or name."""
    if requested_vocab_size:
        return f"a {vocab_size}-token BPE, data.vocab_size={requested_vocab_size}"
    return tokenizer


def _checked(folder: Path, cfg: DataConfig, model_vocab_size: Optional[int]) -> Path:
    if model_vocab_size is not None:
        meta = load_meta(folder)
        where = describe_tokenizer(meta.get("requested_vocab_size"), meta["vocab_size"], cfg.tokenizer)
        check_model_vocab(model_vocab_size, cfg.pad_vocab_to_multiple_of, cached_max_token_id(folder, meta), where)
    return folder


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sample_for_tokenizer(specs: list[SourceSpec], cfg: DataConfig) -> Iterator[str]:
    """Documents taken round-robin across sources, so every source of a mixture shapes the merges."""
    budget = cfg.tokenizer_train_bytes
    utf8 = BadUtf8(cfg.on_bad_utf8)
    active = [iter_documents(spec, utf8) for spec in specs]
    while active and budget > 0:
        for docs in list(active):
            text = next(docs, None)
            if text is None:
                active.remove(docs)
                continue
            yield text[:budget]
            budget -= len(text)
            if budget <= 0:
                return


def _batches(specs: list[SourceSpec], utf8: BadUtf8, start: Position) -> Iterator[tuple[list, list, Position]]:
    """Batches of documents from ``start`` on, each with the input position just after it."""
    ids: list[int] = []
    texts: list[str] = []
    chars, read = 0, start.chars
    for si in range(start.source, len(specs)):
        n = start.documents if si == start.source else 0
        for text in iter_documents(specs[si], utf8, skip=n):
            n += 1
            if not text:
                continue
            ids.append(si)
            texts.append(text)
            chars += len(text)
            if chars >= BATCH_CHARS:
                read += chars
                yield ids, texts, Position(si, n, utf8.skipped, utf8.first, read)
                ids, texts, chars = [], [], 0
    if texts:
        yield ids, texts, Position(si, n, utf8.skipped, utf8.first, read + chars)


class _SourceSplitter:
    """Routes one source's documents to its train/val writers (see the module docstring)."""

    def __init__(self, folder: Path, index: int, spec: SourceSpec, dtype: np.dtype, max_id: int, cfg: DataConfig):
        self.fraction = cfg.val_fraction
        kw = dict(source=spec.path, max_id=max_id)
        self.train = ShardWriter(folder, f"s{index}.train", dtype, cfg.shard_tokens, **kw)
        self.val = ShardWriter(folder, f"s{index}.val", dtype, cfg.shard_tokens, **kw)
        self.docs = {"train": 0, "val": 0}
        self.bytes = {"train": 0, "val": 0}
        self.seen = 0
        self.first: Optional[tuple[np.ndarray, int]] = None  # held back until the source has a second document

    def add(self, tokens: np.ndarray, nbytes: int) -> None:
        index, self.seen = self.seen, self.seen + 1
        if index == 0 and self.fraction > 0:
            self.first = (tokens.copy(), int(nbytes))
            return
        if index == 1 and self.first is not None:
            self._put(*self.first, val=True)
            self.first = None
        self._put(tokens, nbytes, val=is_val_doc(index, self.fraction))

    def _put(self, tokens: np.ndarray, nbytes: int, val: bool) -> None:
        (self.val if val else self.train).write(tokens)
        self.docs["val" if val else "train"] += 1
        self.bytes["val" if val else "train"] += int(nbytes)

    def sync(self) -> None:
        self.train.sync()
        self.val.sync()

    def state(self) -> dict:
        """All a resumed build needs to go on exactly as this splitter would (after ``sync``)."""
        first, first_bytes = self.first if self.first is not None else (None, 0)
        return {"docs": dict(self.docs), "bytes": dict(self.bytes), "seen": self.seen, "first": first,
                "first_bytes": first_bytes, "train": self.train.state(), "val": self.val.state()}

    def restore(self, state: dict) -> None:
        self.docs, self.bytes, self.seen = dict(state["docs"]), dict(state["bytes"]), int(state["seen"])
        self.first = None if state["first"] is None else (state["first"], int(state["first_bytes"]))
        self.train.restore(state["train"])
        self.val.restore(state["val"])

    def close(self, text_bytes: TextBytes) -> None:
        if self.first is not None:  # a single-document source: hold out its tail instead
            tokens, nbytes = self.first
            n_val = max(1, math.ceil(len(tokens) * self.fraction))
            self.train.write(tokens[:-n_val])
            self.val.write(tokens[-n_val:])
            self.docs = {"train": 1, "val": 1}
            val_bytes = min(nbytes, text_bytes(tokens[-n_val:]))
            self.bytes = {"train": nbytes - val_bytes, "val": val_bytes}
            self.first = None
        self.train.close()
        self.val.close()


def _text_size(specs: list[SourceSpec]) -> Optional[float]:
    """Bytes in the text files: the progress ETA's estimate of the characters to tokenize; None if unknown."""
    if any(s.type == "hf" or s.max_documents is not None for s in specs):
        return None
    files = [(s, f) for s in specs for f in s.files]
    if any(file_type(s, f) not in ("txt", "jsonl", "json") for s, f in files):
        return None  # parquet/arrow: compressed columns, their size says little about the text
    return float(sum(f.stat().st_size for _, f in files)) or None


def _noted(batches: Iterator[tuple[list[int], list[str], Position]], positions: collections.deque) -> Iterator:
    """Pass batches on without their positions, which are queued for the main loop to take in order."""
    for ids, texts, position in batches:
        positions.append(position)
        yield ids, texts


def _tokenizer(cfg: DataConfig, specs: list[SourceSpec], external, folder: Path, progress: bool,
               resume: Optional[Resume]) -> tuple:
    """(tokenizer, eos id), saved as ``folder/tokenizer.json``; a resumed build reloads that file."""
    from tokenizers import Tokenizer

    if resume is not None:  # the journalled shards were written with exactly this one: never retrain
        return Tokenizer.from_file(str(folder / "tokenizer.json")), resume.eos_id
    if external is None:
        if progress:
            print(f"llmtrain: training a {cfg.vocab_size}-token byte-level BPE on up to "
                  f"{cfg.tokenizer_train_bytes / 1e6:.0f} MB of {cfg.name}", file=sys.stderr)
        # tokenizers' own bar only on a terminal: into a file it leaves blank lines on stdout
        tok = train_bpe(_sample_for_tokenizer(specs, cfg), cfg.vocab_size, show_progress=progress and is_terminal())
        eos_id = eos_id_of(tok, "tokenizer")
    else:
        tok, eos_id, _ = external
    tok.save(str(folder / "tokenizer.json"))
    return tok, eos_id


def _restored(cfg: DataConfig, folder: Path, splitters: list[_SourceSplitter], resume: Resume) -> bool:
    """Bring the splitters to the journalled state; False (and no shards left) if the files disagree."""
    try:
        for s, state in zip(splitters, resume.splitters, strict=True):
            s.restore(state)
    except (ShardStateError, KeyError, TypeError, ValueError) as why:
        print(f"llmtrain: the partial shards of {cfg.name} do not match their journal ({why}); "
              "tokenizing again from the start with the same tokenizer", file=sys.stderr)
        for path in folder.glob("*.bin"):
            path.unlink()
        return False
    writers = [w for s in splitters for w in (s.train, s.val)]
    done = sum(shard["tokens"] >= cfg.shard_tokens for w in writers for shard in w.shards)
    print(f"llmtrain: resuming preparation of {cfg.name} from {sum(w.total for w in writers):,} tokens "
          f"({done} shards done)", file=sys.stderr)
    return True


def _build(cfg: DataConfig, specs: list[SourceSpec], external, key: str, folder: Path, progress: bool,
           model_vocab_size: Optional[int] = None, resume: Optional[Resume] = None) -> None:
    tok, eos_id = _tokenizer(cfg, specs, external, folder, progress, resume)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    requested = cfg.vocab_size if cfg.tokenizer == "bpe" else None
    max_id = max(max_token_id(tok), eos_id)  # ids can have gaps: the count does not bound them
    dtype = token_dtype(max_id)

    def new_splitters() -> list[_SourceSplitter]:
        return [_SourceSplitter(folder, i, spec, dtype, max_id, cfg) for i, spec in enumerate(specs)]

    journal = Journal(folder, key, eos_id, resume.seconds if resume else 0.0)
    splitters = new_splitters()
    if resume is not None and _restored(cfg, folder, splitters, resume):
        position = resume.position
    else:
        splitters, position = new_splitters(), Position()  # a failed restore may have half-filled them
        journal.save(position, splitters, 0)  # a rerun keeps the tokenizer even if no batch is done
    if model_vocab_size is not None:
        where = describe_tokenizer(requested, vocab_size, cfg.tokenizer)
        check_model_vocab(model_vocab_size, cfg.pad_vocab_to_multiple_of, max_id, where)
    writers = [w for s in splitters for w in (s.train, s.val)]
    utf8 = BadUtf8(cfg.on_bad_utf8)
    utf8.skipped, utf8.first = position.bad_utf8, position.first_bad_utf8
    total_chars = _text_size(specs) if progress else None
    bar = progress_counter(f"tokenizing {cfg.name}", enabled=progress, total_work=total_chars,
                           initial=sum(w.total for w in writers), initial_work=position.chars)
    positions: collections.deque = collections.deque()
    with contextlib.ExitStack() as stack:
        stack.callback(bar.close)
        batches = _noted(_batches(specs, utf8, position), positions)
        if cfg.num_proc > 1:
            # Set before forking: otherwise tokenizers warns in every child that BPE training already
            # used its thread pool. The workers are single-threaded on purpose anyway.
            user_set = "TOKENIZERS_PARALLELISM" in os.environ
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            try:  # the workers are forked here, with the variable in their environment
                pool = stack.enter_context(EncoderPool(cfg.num_proc, tok.to_str(), eos_id))
            finally:
                if not user_set:
                    os.environ.pop("TOKENIZERS_PARALLELISM", None)
            results = pool.imap(batches)
        else:
            init_worker(tok.to_str(), eos_id)  # tokenizers uses its own threads
            results = map(encode, read_ahead(batches))
        for source_ids, flat, lengths, nbytes in results:
            ends = np.cumsum(lengths)
            for si, end, n, b in zip(source_ids, ends, lengths, nbytes):
                splitters[si].add(flat[end - n:end], b)
            reached = positions.popleft()
            bar.update(len(flat), work=reached.chars - position.chars)
            position = reached
            journal.tick(position, splitters, sum(len(w.shards) for w in writers))
    text_bytes = TextBytes(tok, eos_id)
    for s in splitters:
        s.close(text_bytes)
    elapsed = journal.elapsed()

    for spec, s in zip(specs, splitters):
        if s.seen == 0:
            raise DataError(spec.path, "empty corpus: no text in this source")
    if utf8.skipped:
        print(f"llmtrain: skipped {utf8.skipped} non-UTF-8 file(s)/line(s) (first: {utf8.first}); "
              "data.on_bad_utf8=error makes this an error", file=sys.stderr)
    meta = {
        "format": FORMAT_VERSION,
        "key": key,
        "name": cfg.name,
        "vocab_size": vocab_size,
        "requested_vocab_size": requested,
        "max_token_id": max_id,
        "eos_id": eos_id,
        "dtype": dtype.name,
        "tokenizer": "tokenizer.json",
        "val_fraction": cfg.val_fraction,
        "skipped_bad_utf8": utf8.skipped,
        "tokenize_seconds": round(elapsed, 3),
        "sources": [
            {
                "path": spec.path, "type": spec.type, "fingerprint": spec.fingerprint(),
                "splits": {
                    split: {"documents": s.docs[split], "tokens": w.total, "bytes": s.bytes[split], "shards": w.shards}
                    for split, w in (("train", s.train), ("val", s.val))
                },
            }
            for spec, s in zip(specs, splitters)
        ],
    }
    journal.remove()
    # meta.json last: its presence is what marks a prepared folder as complete.
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def load_meta(folder: Path) -> dict:
    path = folder / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(str(path), f"unreadable metadata ({err}); delete {folder} to re-prepare") from None
    if meta.get("format") != FORMAT_VERSION:
        raise DataError(str(path), f"format {meta.get('format')} but this llmtrain reads {FORMAT_VERSION}; delete {folder}")
    return meta


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``llmtrain-data [hydra overrides]``: prepare (or find cached) shards for the composed config."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print("usage: llmtrain-data [overrides...]   e.g. llmtrain-data data=shakespeare data.vocab_size=2048")
        return
    try:
        from llmtrain.cli import compose

        cfg = compose(argv)
        started = time.perf_counter()
        folder = prepare(cfg.data, progress=True, model_vocab_size=cfg.model.vocab_size)
        meta = load_meta(folder)
        max_id = cached_max_token_id(folder, meta)
    except UserError as err:
        print_error(err)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("llmtrain: interrupted; the same command continues the preparation", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    train = sum(s["splits"]["train"]["tokens"] for s in meta["sources"])
    val = sum(s["splits"]["val"]["tokens"] for s in meta["sources"])
    print(f"{folder}: {train:,} train + {val:,} val tokens, vocab {meta['vocab_size']} (ids up to {max_id}), "
          f"{meta['dtype']} ({time.perf_counter() - started:.1f}s)")


if __name__ == "__main__":
    main()
