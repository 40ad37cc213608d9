"""Token ids: shards are as wide as the tokenizer's largest id, and the model has a row for every id."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from llmtrain.data import DataConfig, build_data, check_vocab
from llmtrain.data.prepare import load_meta, prepare
from llmtrain.data.shards import ShardWriter, TokenStream
from llmtrain.errors import ConfigError, DataError

from conftest import REPO, write_corpus

WORDS = "the king queen lord lady speak night day love death sword crown heart fair good sweet".split()
HIGH = 1 << 16  # the second half of WORDS gets ids from here: uint16 would wrap them onto the first half


def wide_tokenizer(folder: Path) -> tuple[Path, int]:
    """A word-level tokenizer with 18 entries whose ids reach past 65,535 -> (tokenizer.json, largest id)."""
    vocab = {"<|eos|>": 0, "<unk>": 1}
    half = len(WORDS) // 2
    vocab.update({w: 2 + i for i, w in enumerate(WORDS[:half])})
    vocab.update({w: HIGH + 2 + i for i, w in enumerate(WORDS[half:])})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path, max(vocab.values())


def write_docs(folder: Path, n: int = 12, words: int = 60) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    docs = [" ".join(WORDS[(d * 7 + k * 3) % len(WORDS)] for k in range(words)) for d in range(n)]
    for i, doc in enumerate(docs):
        (folder / f"doc{i:02d}.txt").write_text(doc)
    return docs


def data_cfg(tmp_path: Path, sources, **kw) -> DataConfig:
    base = dict(name="checks", sources=sources, vocab_size=300, cache_dir=str(tmp_path / "cache"),
                num_proc=1, progress=False, val_fraction=0.1)
    base.update(kw)
    return DataConfig(**base)


def all_ids(folder: Path) -> list[int]:
    meta = load_meta(folder)
    ids: list[int] = []
    for src in meta["sources"]:
        for split in ("train", "val"):
            stream = TokenStream(folder, src["splits"][split]["shards"], np.dtype(meta["dtype"]))
            ids += stream.read(0, stream.total).tolist() if stream.total else []
    return ids


def test_ids_above_uint16_are_stored_in_uint32_shards_unchanged(tmp_path):
    tok_path, max_id = wide_tokenizer(tmp_path / "tok")
    docs = write_docs(tmp_path / "txt")
    folder = prepare(data_cfg(tmp_path, [str(tmp_path / "txt")], tokenizer=str(tok_path)))
    meta = load_meta(folder)
    assert meta["dtype"] == "uint32" and meta["max_token_id"] == max_id
    tok = Tokenizer.from_file(str(tok_path))
    expected = Counter(i for doc in docs for i in tok.encode(doc).ids + [0])
    assert Counter(all_ids(folder)) == expected


def test_shard_writer_refuses_an_id_its_dtype_cannot_hold(tmp_path):
    writer = ShardWriter(tmp_path, "s0.train", np.dtype(np.uint16), 1000, source="corpus.txt", max_id=2**16 - 1)
    writer.write(np.array([5, 7], dtype=np.uint32))
    writer.write(np.array([3, 70000], dtype=np.uint32))
    with pytest.raises(DataError, match=r"^corpus\.txt: token id 70000 .*65535.*uint16"):
        writer.close()


def test_shard_writer_refuses_an_id_beyond_the_tokenizer(tmp_path):
    writer = ShardWriter(tmp_path, "s0.val", np.dtype(np.uint16), 1000, source="a.jsonl", max_id=299)
    writer.write(np.array([299, 300], dtype=np.uint32))
    with pytest.raises(DataError, match=r"^a\.jsonl: token id 300 .*299"):
        writer.close()


def test_model_vocab_must_cover_the_largest_id(tmp_path):
    tok_path, max_id = wide_tokenizer(tmp_path / "tok")
    write_docs(tmp_path / "txt")
    bundle = build_data(data_cfg(tmp_path, [str(tmp_path / "txt")], tokenizer=str(tok_path)), seq_len=8, seed=0,
                        rank=0, world_size=1, micro_batch_size=2, global_batch_size=2)
    count = Tokenizer.from_file(str(tok_path)).get_vocab_size(with_added_tokens=True)
    assert bundle.max_token_id == max_id and bundle.vocab_size == max_id + 1
    with pytest.raises(ConfigError, match=rf"^model\.vocab_size: {count} is too small.* ids up to {max_id}.*"
                                          rf"model\.vocab_size={max_id + 1}"):
        check_vocab(count, bundle, 0)
    assert check_vocab(max_id + 1, bundle, 0) == max_id + 1
    assert check_vocab(count, bundle, 64) == -(-(max_id + 1) // 64) * 64


def test_bpe_larger_than_the_model_names_both_vocab_keys(tmp_path):
    write_corpus(tmp_path / "corpus.txt")
    bundle = build_data(data_cfg(tmp_path, [str(tmp_path / "corpus.txt")], vocab_size=384), seq_len=8, seed=0,
                        rank=0, world_size=1, micro_batch_size=2, global_batch_size=2)
    assert bundle.max_token_id == bundle.vocab_size - 1 == 383
    with pytest.raises(ConfigError, match=r"^model\.vocab_size: 300 is too small.* ids up to 383 "
                                          r"\(a 384-token BPE, data\.vocab_size=384\)"):
        check_vocab(300, bundle, 0)


def test_old_cache_without_max_id_still_loads(tmp_path):
    write_corpus(tmp_path / "corpus.txt")
    cfg = data_cfg(tmp_path, [str(tmp_path / "corpus.txt")], vocab_size=384)
    folder = prepare(cfg)
    meta = load_meta(folder)
    del meta["max_token_id"]
    (folder / "meta.json").write_text(json.dumps(meta))
    stamp = (folder / "meta.json").stat().st_mtime_ns
    bundle = build_data(cfg, seq_len=8, seed=0, rank=0, world_size=1, micro_batch_size=2, global_batch_size=2)
    assert bundle.folder == folder and (folder / "meta.json").stat().st_mtime_ns == stamp  # a cache hit
    assert bundle.max_token_id == 383 and bundle.train.next_batch()[0].shape == (2, 8)


def test_old_cache_with_wrapped_ids_is_prepared_again(tmp_path, capsys):
    """A cache written before the fix: uint16 shards of a tokenizer whose ids reach past 65,535."""
    tok_path, _ = wide_tokenizer(tmp_path / "tok")
    write_docs(tmp_path / "txt")
    cfg = data_cfg(tmp_path, [str(tmp_path / "txt")], tokenizer=str(tok_path))
    folder = prepare(cfg)
    good = Counter(all_ids(folder))
    meta = load_meta(folder)
    for src in meta["sources"]:
        for split in src["splits"].values():
            for shard in split["shards"]:
                path = folder / shard["file"]
                path.write_bytes(np.fromfile(path, dtype=np.uint32).astype(np.uint16).tobytes())
    meta["dtype"] = "uint16"
    del meta["max_token_id"]
    (folder / "meta.json").write_text(json.dumps(meta))
    assert Counter(all_ids(folder)) != good

    assert prepare(cfg) == folder
    assert load_meta(folder)["dtype"] == "uint32" and Counter(all_ids(folder)) == good
    assert "uint16" in capsys.readouterr().err


def _prepare_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "llmtrain.data.prepare", f"data.cache_dir={tmp_path / 'cache'}",
                           "data.progress=false", "data.num_proc=1", *overrides],
                          capture_output=True, text=True, env=env, cwd=tmp_path)


def test_prepare_cli_refuses_a_model_vocab_below_the_largest_id(tmp_path):
    tok_path, max_id = wide_tokenizer(tmp_path / "tok")
    write_docs(tmp_path / "txt")
    args = (f"data.sources=[{tmp_path / 'txt'}]", f"data.tokenizer={tok_path}")
    bad = _prepare_cli(tmp_path, *args, "model.vocab_size=50000")
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: model.vocab_size: 50000 is too small") and str(max_id) in bad.stderr
    assert not list((tmp_path / "cache").glob("*/meta.json"))  # refused before tokenizing anything
    ok = _prepare_cli(tmp_path, *args, f"model.vocab_size={max_id + 1}")
    assert ok.returncode == 0, ok.stderr
    assert f"ids up to {max_id}" in ok.stdout and "uint32" in ok.stdout
