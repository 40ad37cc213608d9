"""Tokenizers: train a byte-level BPE on the corpus, or load an existing one.

``data.tokenizer`` is ``bpe`` (train one with ``data.vocab_size`` entries, special tokens
``<|bos|>``, ``<|eos|>``, ``<|pad|>`` = ids 0, 1, 2), a path to a ``tokenizer.json`` or a
Hugging Face tokenizer folder, or a ``transformers`` hub name (needs the hub to be reachable or
the name in the local HF cache). Whatever the origin, the prepared data folder holds the
``tokenizer.json`` the shards were made with, and that file is what the trainer copies.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from tokenizers import Tokenizer

from llmtrain.errors import ConfigError, DataError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]
# End-of-document tokens of common pretrained tokenizers, tried in order when no config names one.
KNOWN_EOS = [EOS, "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]"]


def train_bpe(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
    """A GPT-2-style byte-level BPE: every byte is in the alphabet, so no input is unknown."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ConfigError("data.vocab_size", f"got {vocab_size}, a byte-level BPE needs at least {256 + len(SPECIAL_TOKENS) + 1}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def max_token_id(tok: Tokenizer) -> int:
    """The largest id ``tok`` can emit; it can exceed ``get_vocab_size() - 1`` when the ids have gaps."""
    return max(tok.get_vocab(with_added_tokens=True).values(), default=0)


class TextBytes:
    """``counter(ids) -> int``: UTF-8 bytes of the text that token ids stand for (EOS and other
    special tokens stand for none).

    Exact for a byte-level BPE, where each character of a token string is one byte: also for a
    run of ids cut inside a multi-byte character, which decoding would turn into U+FFFD. Other
    tokenizers are decoded one document (EOS to EOS) at a time, exact up to such a cut.
    """

    CHUNK = 1 << 22

    def __init__(self, tok: Tokenizer, eos_id: int):
        self.tok, self.eos_id = tok, eos_id
        self._table: Optional[np.ndarray] = None
        self._looked = False

    def __call__(self, ids: np.ndarray) -> int:
        if not self._looked:
            self._table, self._looked = byte_level_lengths(self.tok), True
            if self._table is not None:
                self._table[self.eos_id] = 0  # EOS stands for no text, even where it is no special token
        if self._table is not None:
            return sum(int(self._table[ids[i:i + self.CHUNK]].sum()) for i in range(0, len(ids), self.CHUNK))
        pieces = np.split(ids, np.flatnonzero(ids == self.eos_id))
        docs = [pieces[0].tolist()] + [p[1:].tolist() for p in pieces[1:]]
        total = 0
        for i in range(0, len(docs), 1024):
            total += sum(len(text.encode("utf-8")) for text in self.tok.decode_batch(docs[i:i + 1024]))
        return total


def byte_level_lengths(tok: Tokenizer) -> Optional[np.ndarray]:
    """Bytes per id of a byte-level BPE (0 for special tokens); None for any other tokenizer."""
    from tokenizers import decoders, pre_tokenizers

    if not isinstance(tok.decoder, decoders.ByteLevel):
        return None
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    vocab = tok.get_vocab(with_added_tokens=False)
    if not all(alphabet.issuperset(token) for token in vocab):
        return None
    table = np.zeros(max_token_id(tok) + 1, dtype=np.int64)
    for token, i in vocab.items():
        table[i] = len(token)
    for i, added in tok.get_added_tokens_decoder().items():  # matched in the raw text, not byte-mapped
        table[i] = 0 if added.special else len(added.content.encode("utf-8"))
    return table


def check_model_vocab(model_vocab_size: int, pad_to_multiple_of: int, max_id: int, tokenizer: str) -> None:
    """ConfigError unless the model's embedding has a row for every id the tokenizer emits.

    ``tokenizer`` describes where the ids come from (a path, or the BPE and its data.vocab_size).
    With ``data.pad_vocab_to_multiple_of`` > 0 the embedding is sized from the tokenizer instead.
    """
    if pad_to_multiple_of > 0 or model_vocab_size > max_id:
        return
    raise ConfigError(
        "model.vocab_size",
        f"{model_vocab_size} is too small: the tokenizer emits ids up to {max_id} ({tokenizer}); "
        f"set model.vocab_size={max_id + 1} or data.pad_vocab_to_multiple_of=64",
    )


def _eos_from_config(folder: Path) -> Optional[str]:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = folder / name
        if cfg.is_file():
            try:
                eos = json.loads(cfg.read_text()).get("eos_token")
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str):
                return eos
    return None


def eos_id_of(tok: Tokenizer, where: str, eos_token: Optional[str] = None) -> int:
    """The id placed between documents; DataError if the tokenizer has none."""
    for candidate in ([eos_token] if eos_token else []) + KNOWN_EOS:
        idx = tok.token_to_id(candidate)
        if idx is not None:
            return idx
    raise DataError(where, f"tokenizer has no end-of-document token (looked for {', '.join(KNOWN_EOS)})")


def is_hub_name(spec: str) -> bool:
    """Not a local path: no such file, and it does not look like one."""
    return not (Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")) or spec.endswith(".json"))


def load_external(spec: str) -> tuple[Tokenizer, int, str]:
    """Load a tokenizer.json path, an HF tokenizer folder, or a hub name -> (tokenizer, eos_id, identity).

    ``identity`` goes into the cache key: a content hash for local files, the name otherwise.
    """
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path_json, eos_token = path / "tokenizer.json", _eos_from_config(path)
    elif path.is_file():
        path_json, eos_token = path, _eos_from_config(path.parent)
    elif is_hub_name(spec):
        return _load_from_hub(spec)
    else:
        raise DataError(spec, "no tokenizer.json here (expected a tokenizer.json file or a folder holding one)")
    try:
        tok = Tokenizer.from_file(str(path_json))
    except Exception as err:
        raise DataError(str(path_json), f"not a tokenizers JSON file ({str(err).splitlines()[0]})") from None
    digest = hashlib.sha256(path_json.read_bytes()).hexdigest()[:16]
    eos_id = eos_id_of(tok, str(path_json), eos_token)
    return tok, eos_id, f"file:{digest}:eos={eos_id}"


def _load_from_hub(name: str) -> tuple[Tokenizer, int, str]:
    from transformers import AutoTokenizer

    from llmtrain.data.hub import hub_reachable

    try:
        try:
            hf = AutoTokenizer.from_pretrained(name, local_files_only=True)  # the HF cache, no network
        except Exception:
            if not hub_reachable():
                raise OSError("the hub is unreachable and the name is not in the local Hugging Face cache") from None
            hf = AutoTokenizer.from_pretrained(name)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(
            "data.tokenizer",
            f"cannot load {name!r}: not a local tokenizer.json/folder and not loadable from the "
            f"Hugging Face hub ({first[:200]}); point data.tokenizer=PATH at a local copy (a tokenizer.json or "
            f"a folder holding one, e.g. from `hf download {name} --include 'tokenizer*' --local-dir DIR`)",
        ) from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise DataError("data.tokenizer", f"{name!r} has no fast (tokenizers) implementation")
    tok = Tokenizer.from_str(backend.to_str())
    eos_id = hf.eos_token_id if hf.eos_token_id is not None else eos_id_of(tok, name)
    return tok, eos_id, f"hub:{name}:{getattr(hf, 'init_kwargs', {}).get('_commit_hash', '')}:eos={eos_id}"
