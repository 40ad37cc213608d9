"""A killed preparation continues where it got to, and ends byte for byte as an uninterrupted one."""

from __future__ import annotations

import json
import random
from pathlib import Path

from llmtrain.data.sources import BadUtf8, iter_documents

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
