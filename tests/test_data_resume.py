"""A killed preparation continues where it got to, and ends byte for byte as an uninterrupted one."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import llmtrain.data.prepare as prepare_mod
from llmtrain.data import DataConfig
from llmtrain.data.journal import Journal
from llmtrain.data.prepare import prepare
from llmtrain.data.shards import ShardWriter
from llmtrain.data.sources import BadUtf8, iter_documents, resolve_sources
from llmtrain.data.tokenizer import eos_id_of, train_bpe
from llmtrain.data.workers import EncoderPool, encode, init_worker
from llmtrain.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
WORDS = "king queen lord lady sword crown night day love death thou thee hath speak é ñ 王 — ! ? , .".split()


def make_docs(n: int, seed: int, words: tuple[int, int] = (20, 200)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(*words))) + "\n" for _ in range(n)]


def cfg_for(tmp_path: Path, sources, cache: str = "cache", **kw) -> DataConfig:
    base = dict(name="r", sources=sources, vocab_size=300, cache_dir=str(tmp_path / cache), num_proc=1,
                progress=False, val_fraction=0.1, shard_tokens=700, tokenizer_train_bytes=100_000)
    base.update(kw)
    return DataConfig(**base)


def assert_same_folders(a: Path, b: Path) -> None:
    """Every file byte for byte; meta.json equal but for its timing."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert not [n for n in names if n.startswith("journal")]
    for name in names:
        if name == "meta.json":
            ma, mb = (json.loads((f / name).read_text()) for f in (a, b))
            ma.pop("tokenize_seconds"), mb.pop("tokenize_seconds")
            assert ma == mb
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


class Killed(BaseException):
    """Stands in for SIGKILL in-process: not an Exception, so nothing cleans up after it."""


def kill_after(monkeypatch, batches: int, save_every: int) -> None:
    """Save the journal every ``save_every`` batches and die at batch ``batches``, with whatever the
    writers held flushed into the shard files first (as the page cache keeps it after a kill)."""
    count = itertools.count()

    def tick(self, position, splitters, shards):
        n = next(count)
        if n == batches:
            for s in splitters:
                for w in (s.train, s.val):
                    w._flush()
                    if w._fh is not None:
                        w._fh.flush()
            raise Killed
        if n % save_every == 0:
            self.save(position, splitters, shards)

    monkeypatch.setattr(Journal, "tick", tick)


def write_sources(folder: Path) -> list:
    """Four source types, bad UTF-8 among the lines, and a last source of few documents (a checkpoint
    after its first one finds that document held back by its splitter)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    docs = make_docs(60, seed=1)
    with open(folder / "a.jsonl", "wb") as fh:
        for i, d in enumerate(docs[:30]):
            fh.write(json.dumps({"text": d}).encode() + b"\n")
            if i in (7, 19):
                fh.write(b'{"text": "bad \xff\xfe"}\n')
    (folder / "b.txt").write_text("\n\n\n".join(docs[30:40]))
    pq.write_table(pa.table({"text": docs[40:55]}), folder / "c.parquet", row_group_size=4)
    (folder / "d.json").write_text(json.dumps([{"text": d} for d in docs[55:]]))
    return [str(folder / "a.jsonl"), {"path": str(folder / "b.txt"), "doc_separator": "\n\n\n"},
            str(folder / "c.parquet"), str(folder / "d.json")]


def reference_build(tmp_path: Path, sources, monkeypatch) -> tuple[Path, int]:
    """The uninterrupted build, and how many batches it took."""
    batches = itertools.count()
    with monkeypatch.context() as m:
        real_tick = Journal.tick
        m.setattr(Journal, "tick", lambda self, *a: (next(batches), real_tick(self, *a)))
        folder = prepare(cfg_for(tmp_path, sources, cache="ref"))
    return folder, next(batches)


def test_skipping_documents_matches_reading_and_dropping_them(tmp_path):
    import pyarrow as pa
    import pyarrow.ipc as ipc

    sources = write_sources(tmp_path / "src")
    table = pa.table({"text": make_docs(9, seed=2)})
    with ipc.new_stream(tmp_path / "s.arrow", table.schema) as w:
        w.write_batch(table.to_batches(max_chunksize=4)[0])
        for batch in table.to_batches(max_chunksize=4)[1:]:
            w.write_batch(batch)
    sources += [str(tmp_path / "s.arrow"), {"path": str(tmp_path / "src" / "a.jsonl"), "max_documents": 12}]
    for spec in resolve_sources(sources):
        everything = BadUtf8("skip")
        docs = list(iter_documents(spec, everything))
        for n in range(len(docs) + 2):
            utf8 = BadUtf8("skip")
            assert list(iter_documents(spec, utf8, skip=n)) == docs[n:], (spec.path, n)
            assert utf8.skipped <= everything.skipped
    jsonl = resolve_sources([sources[0]])[0]
    counted = BadUtf8("skip")
    list(iter_documents(jsonl, counted, skip=9))  # the first bad line lies among the skipped, the second after
    assert counted.skipped == 1


@pytest.mark.parametrize("kill_at", [0.0, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, "last"])
def test_interrupted_build_resumes_to_the_same_bytes(tmp_path, monkeypatch, capsys, kill_at):
    sources = write_sources(tmp_path / "src")
    monkeypatch.setattr(prepare_mod, "BATCH_CHARS", 500)  # about two documents per batch: many resume points
    reference, batches = reference_build(tmp_path, sources, monkeypatch)
    assert json.loads((reference / "meta.json").read_text())["skipped_bad_utf8"] == 2 and batches > 30

    cfg = cfg_for(tmp_path, sources)
    with monkeypatch.context() as m:
        # "last": saved after the last source's first document, which is held back then
        last = kill_at == "last"
        kill_after(m, batches - 2 if last else int(kill_at * batches), save_every=1 if last else 3)
        with pytest.raises(Killed):
            prepare(cfg)
    partial = Path(cfg.cache_dir) / f".tmp-{reference.name}"
    assert (partial / "journal.json").is_file() and not (Path(cfg.cache_dir) / reference.name).exists()
    if last:
        held = json.loads((partial / "journal.json").read_text())["splitters"][3]["first"]
        assert held == {"npy": "journal.s3.first.npy"}
    capsys.readouterr()

    monkeypatch.setattr(prepare_mod, "train_bpe", lambda *a, **k: pytest.fail("the BPE was trained again"))
    folder = prepare(cfg)
    resumed = re.findall(r"^llmtrain: resuming preparation of r from ([\d,]+) tokens \((\d+) shards done\)$",
                         capsys.readouterr().err, re.M)
    assert len(resumed) == 1
    assert_same_folders(folder, reference)
    assert not partial.exists()


def test_shard_restore_cuts_back_what_was_written_after_the_state(tmp_path):
    tokens = np.arange(1000, dtype=np.uint32) % 300
    whole = ShardWriter(tmp_path, "whole", np.dtype(np.uint16), 128, source="s", max_id=300)
    whole.write(tokens)
    whole.close()

    first = ShardWriter(tmp_path, "part", np.dtype(np.uint16), 128, source="s", max_id=300)
    first.write(tokens[:300])
    first.sync()
    state = first.state()
    assert [s["tokens"] for s in state["shards"]] == [128, 128, 44]
    first.write(tokens[300:700])  # written after the state, then the process dies
    first._flush()
    first._fh.flush()
    assert len(list(tmp_path.glob("part.*.bin"))) == 6

    second = ShardWriter(tmp_path, "part", np.dtype(np.uint16), 128, source="s", max_id=300)
    second.restore(json.loads(json.dumps(state)))
    assert (tmp_path / "part.00002.bin").stat().st_size == 44 * 2
    assert len(list(tmp_path.glob("part.*.bin"))) == 3
    second.write(tokens[300:])
    second.close()
    assert second.shards == [{"file": s["file"].replace("whole", "part"), "tokens": s["tokens"]} for s in whole.shards]
    for i in range(len(whole.shards)):
        assert (tmp_path / f"part.{i:05d}.bin").read_bytes() == (tmp_path / f"whole.{i:05d}.bin").read_bytes()


@pytest.mark.parametrize("damage", ["key", "tokenizer", "unreadable", "shard"])
def test_a_journal_that_does_not_match_is_not_resumed(tmp_path, monkeypatch, capsys, damage):
    sources = write_sources(tmp_path / "src")
    monkeypatch.setattr(prepare_mod, "BATCH_CHARS", 500)
    reference, _ = reference_build(tmp_path, sources, monkeypatch)
    cfg = cfg_for(tmp_path, sources)
    with monkeypatch.context() as m:
        kill_after(m, 20, save_every=5)
        with pytest.raises(Killed):
            prepare(cfg)
    partial = Path(cfg.cache_dir) / f".tmp-{reference.name}"
    journal = json.loads((partial / "journal.json").read_text())
    if damage == "key":
        journal["key"] = "0123456789abcdef"
    elif damage == "tokenizer":
        journal["tokenizer_sha256"] = "0" * 64
    elif damage == "shard":
        shard = next(f for s in journal["splitters"] for f in s["train"]["shards"])
        (partial / shard["file"]).write_bytes(b"")
    (partial / "journal.json").write_text("{not json" if damage == "unreadable" else json.dumps(journal))
    capsys.readouterr()

    folder = prepare(cfg)
    err = capsys.readouterr().err
    assert "resuming preparation" not in err
    assert ("do not match their journal" if damage == "shard" else "not resuming the partial preparation") in err
    assert_same_folders(folder, reference)


def test_a_partial_build_for_changed_settings_is_pointed_out(tmp_path, monkeypatch, capsys):
    sources = write_sources(tmp_path / "src")
    monkeypatch.setattr(prepare_mod, "BATCH_CHARS", 500)
    with monkeypatch.context() as m:
        kill_after(m, 5, save_every=1)
        with pytest.raises(Killed):
            prepare(cfg_for(tmp_path, sources))
    capsys.readouterr()
    prepare(cfg_for(tmp_path, sources, val_fraction=0.2))
    assert re.search(r"\.tmp-r-[0-9a-f]{16} is a partial preparation of r with other settings", capsys.readouterr().err)
    assert len(list((tmp_path / "cache").glob(".tmp-r-*"))) == 1  # pointed out, not deleted


def test_model_vocab_error_keeps_the_trained_tokenizer(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.txt").write_text("\n\n".join(make_docs(30, seed=3)))
    cfg = cfg_for(tmp_path, [{"path": str(tmp_path / "a.txt"), "doc_separator": "\n\n"}])
    with pytest.raises(ConfigError, match="^model.vocab_size"):
        prepare(cfg, model_vocab_size=100)
    monkeypatch.setattr(prepare_mod, "train_bpe", lambda *a, **k: pytest.fail("the BPE was trained again"))
    capsys.readouterr()
    prepare(cfg, model_vocab_size=300)
    assert "resuming preparation of r from 0 tokens (0 shards done)" in capsys.readouterr().err


def test_encoder_pool_keeps_the_order_and_stops_at_once(tmp_path):
    tok = train_bpe(make_docs(50, seed=4), 300)
    eos = eos_id_of(tok, "tokenizer")
    batches = [([0] * 3, make_docs(3, seed=10 + i, words=(1, 2000))) for i in range(12)]

    def reader():
        yield from batches
        raise DataError("corpus.jsonl:99", "invalid JSON")

    init_worker(tok.to_str(), eos)
    expected = [encode(b) for b in batches]
    got = []
    with pytest.raises(DataError, match="corpus.jsonl:99"):
        with EncoderPool(3, tok.to_str(), eos) as pool:
            for result in pool.imap(reader()):
                got.append(result)
    assert len(got) == len(expected)
    for (_, a, la, ba), (_, b, lb, bb) in zip(got, expected):
        assert a.tolist() == b.tolist() and la.tolist() == lb.tolist() and ba.tolist() == bb.tolist()

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):  # an interrupt while batches are in flight: nothing waits on them
        with EncoderPool(2, tok.to_str(), eos) as pool:
            results = pool.imap(itertools.cycle(batches))
            next(results)
            raise KeyboardInterrupt
    assert time.monotonic() - started < 10
    assert all(p.exitcode is not None for p in pool.procs)


def _cli(tmp_path: Path, corpus: Path) -> list[str]:
    return [sys.executable, "-m", "llmtrain.data.prepare", "data.name=big", f"data.sources=[{corpus}]",
            "data.vocab_size=300", f"data.cache_dir={tmp_path / 'cache'}", "data.num_proc=2",
            "data.shard_tokens=100000", "data.tokenizer_train_bytes=300000", "data.val_fraction=0.01"]


def _journal_shards(partial: Path) -> int:
    try:
        journal = json.loads((partial / "journal.json").read_text())
    except (OSError, ValueError):
        return 0
    return sum(len(s[split]["shards"]) for s in journal["splitters"] for split in ("train", "val"))


def _wait_for_shards(proc: subprocess.Popen, partial: Path, shards: int) -> None:
    deadline = time.monotonic() + 120
    while _journal_shards(partial) < shards and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.mark.slow
def test_interrupted_then_killed_llmtrain_data_resumes_without_tokenizing_again(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as fh:
        for d in make_docs(8000, seed=5, words=(50, 400)):
            fh.write(json.dumps({"text": d}) + "\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = _cli(tmp_path, corpus)
    reference = prepare(DataConfig(name="big", sources=[str(corpus)], vocab_size=300, cache_dir=str(tmp_path / "ref"),
                                   num_proc=2, shard_tokens=100_000, tokenizer_train_bytes=300_000,
                                   val_fraction=0.01, progress=False))
    total = sum(s["splits"][k]["tokens"] for s in json.loads((reference / "meta.json").read_text())["sources"]
                for k in ("train", "val"))
    partial = tmp_path / "cache" / f".tmp-{reference.name}"

    # Ctrl-C: the whole process group gets SIGINT; one line, exit 130, the partial build kept
    ctrl_c = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    _wait_for_shards(ctrl_c, partial, 4)
    os.killpg(ctrl_c.pid, signal.SIGINT)
    assert ctrl_c.wait(timeout=60) == 130, "finished before it could be interrupted: make the corpus larger"
    assert "interrupted; the same command continues the preparation" in ctrl_c.stderr.read()
    first_stop = _journal_shards(partial)

    killed = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_shards(killed, partial, first_stop + 4)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "finished before it could be killed: make the corpus larger"
    assert (partial / "journal.json").is_file() and list(partial.glob("*.bin"))
    assert not (tmp_path / "cache" / reference.name).exists()

    rerun = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    resumed = re.findall(r"^llmtrain: resuming preparation of big from ([\d,]+) tokens \((\d+) shards done\)$",
                         rerun.stderr, re.M)
    assert len(resumed) == 1 and int(resumed[0][1]) >= first_stop - 2, rerun.stderr
    assert "training a" not in rerun.stderr  # the BPE came from the partial folder
    this_run = re.search(r"tokenizing big: \S+ tok \(([\d.]+)([KM]?) this run\)", rerun.stderr)
    assert this_run, rerun.stderr
    tokenized = float(this_run[1]) * {"": 1, "K": 1e3, "M": 1e6}[this_run[2]]
    assert tokenized + int(resumed[0][0].replace(",", "")) == pytest.approx(total, rel=0.01)
    assert tokenized < 0.9 * total
    assert_same_folders(tmp_path / "cache" / reference.name, reference)
    assert not partial.exists()
