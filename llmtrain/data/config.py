"""The data config; presets live in configs/data/."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class DataConfig:
    name: str = "shakespeare"
    # Sources: a list of {path, weight, text_field, type, doc_separator, max_documents, name, split,
    # revision} or plain paths (see llmtrain/data/sources.py); empty = the Shakespeare default corpus.
    # Weights: all unset = natural shares; otherwise the share of training windows per source.
    sources: list[Any] = field(default_factory=list)
    tokenizer: str = "bpe"              # bpe (train one) | a path to tokenizer.json / HF dir | an HF name
    vocab_size: int = 4096              # BPE vocab when training a tokenizer
    cache_dir: str = "data_cache"       # prepared shards land here, keyed by a content hash
    val_fraction: float = 0.05          # held-out share of documents
    num_proc: int = 2                   # tokenisation worker processes (1 = in-process, tokenizers' threads)
    num_workers: int = 0                # loader background prefetch threads (0 = synchronous)
    on_bad_utf8: str = "skip"           # skip | error
    pad_vocab_to_multiple_of: int = 0   # 0 = model.vocab_size must match the tokenizer exactly
    seed: Optional[int] = None          # window order; None = train.seed
    shard_tokens: int = 100_000_000     # tokens per shard file (a new file starts after this many)
    tokenizer_train_bytes: int = 200_000_000  # text sampled (round-robin over sources) to train the BPE
    progress: bool = True               # tqdm bar with tokens/s while preparing
