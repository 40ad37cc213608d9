"""A killed preparation continues where it got to, and ends byte for byte as an uninterrupted one."""

from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest

from llmtrain.data.shards import ShardWriter
from llmtrain.data.sources import BadUtf8, iter_documents
from llmtrain.data.tokenizer import eos_id_of, train_bpe
from llmtrain.data.workers import EncoderPool, encode, init_worker
from llmtrain.errors import DataError

WORDS = "king queen lord lady sword crown night day love death thou thee hath speak é ñ 王 — ! ? , .".split()


def make_docs(n: int, seed: int, words: tuple[int, int] = (20, 200)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(*words))) + "\n" for _ in range(n)]


def write_sources(folder: Path) -> list:
    """Four source types, bad UTF-8 in the middle, and a second source whose first document is held back."""
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


def specs_of(sources) -> list:
    from llmtrain.data.sources import resolve_sources

    return resolve_sources(sources)


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
    for spec in specs_of(sources):
        everything = BadUtf8("skip")
        docs = list(iter_documents(spec, everything))
        for n in range(len(docs) + 2):
            utf8 = BadUtf8("skip")
            assert list(iter_documents(spec, utf8, skip=n)) == docs[n:], (spec.path, n)
            assert utf8.skipped <= everything.skipped
    jsonl = specs_of([sources[0]])[0]
    counted = BadUtf8("skip")
    list(iter_documents(jsonl, counted, skip=9))  # the first bad line lies among the skipped, the second after
    assert counted.skipped == 1


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
    for (_, a, la), (_, b, lb) in zip(got, expected):
        assert a.tolist() == b.tolist() and la.tolist() == lb.tolist()

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):  # an interrupt while batches are in flight: nothing waits on them
        with EncoderPool(2, tok.to_str(), eos) as pool:
            results = pool.imap(itertools.cycle(batches))
            next(results)
            raise KeyboardInterrupt
    assert time.monotonic() - started < 10
    assert all(p.exitcode is not None for p in pool.procs)
