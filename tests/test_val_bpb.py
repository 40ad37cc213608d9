"""Validation bits per byte: byte counts in meta.json, val_bpb in metrics, summary, plot and report."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from llmtrain.cli import compose
from llmtrain.data import DataConfig, build_data
from llmtrain.data.loader import ValBatches
from llmtrain.data.prepare import load_meta, prepare
from llmtrain.data.shards import TokenStream
from llmtrain.data.tokenizer import eos_id_of, train_bpe
from llmtrain.config import LoggerConfig, WandbConfig
from llmtrain.logging import RunLogger, loss_figure
from llmtrain.report import main as report_main
from llmtrain.trainer import Trainer

from conftest import REPO, tiny_overrides, torchrun_env

LN2 = math.log(2)


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: an oracle for the bytes a byte-level token stands for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tok: Tokenizer, ids, eos_id: int) -> bytes:
    decoder = gpt2_byte_decoder()
    return b"".join(bytes(decoder[ch] for ch in tok.id_to_token(i)) for i in ids if i != eos_id)


def data_cfg(tmp_path: Path, sources, **kw) -> DataConfig:
    base = dict(name="bpb", sources=sources, vocab_size=300, cache_dir=str(tmp_path / "cache"),
                num_proc=1, progress=False, val_fraction=0.25)
    base.update(kw)
    return DataConfig(**base)


def split_ids(folder: Path, meta: dict, source: int, split: str) -> np.ndarray:
    entry = meta["sources"][source]["splits"][split]
    stream = TokenStream(folder, entry["shards"], np.dtype(meta["dtype"]))
    return np.asarray(stream.read(0, stream.total)) if stream.total else np.zeros(0, dtype=np.int64)


# --- data side ---------------------------------------------------------------------------------

DOCS = ["naïve café", "日本語のテキスト", "plain ascii text", "emoji 🙂 ok"]


def test_meta_counts_the_utf8_bytes_routed_to_each_split(tmp_path):
    # val_fraction 0.25 of 4 documents: document 0 goes to validation (ceil(1·0.25) > ceil(0)).
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    folder = prepare(data_cfg(tmp_path, [{"path": str(path)}]))
    meta = load_meta(folder)
    splits = meta["sources"][0]["splits"]
    # naïve café: 10 characters, ï and é 2 bytes each; 日本語のテキスト 8 x 3; ascii 16; emoji 6 + 4 + 3.
    assert splits["val"]["bytes"] == 12
    assert splits["train"]["bytes"] == 24 + 16 + 13
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # EOS after each document is a token of no bytes.
    assert splits["val"]["tokens"] == len(tok.encode(DOCS[0]).ids) + 1
    assert splits["train"]["tokens"] == sum(len(tok.encode(d).ids) + 1 for d in DOCS[1:])


def test_single_document_tail_bytes_are_exact_when_the_cut_splits_a_character(tmp_path):
    text = "".join("日本語のテキストと漢字かな交じり文 "[i % 17] for i in range(200))
    tok = train_bpe([text], 300)
    eos = eos_id_of(tok, "test")
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    ids = tok.encode(text).ids + [eos]
    # A fraction whose held-out tail starts inside a character: decoding it would count U+FFFD.
    fraction = next(f for f in np.arange(0.05, 0.5, 0.01)
                    if tok.decode(ids[-max(1, math.ceil(len(ids) * f)):]).startswith("\ufffd"))
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    folder = prepare(data_cfg(tmp_path, [{"path": str(tmp_path / "one.txt")}], tokenizer=str(tok_path),
                              val_fraction=float(fraction)))
    meta = load_meta(folder)
    splits = meta["sources"][0]["splits"]
    tail = split_ids(folder, meta, 0, "val").tolist()
    head = split_ids(folder, meta, 0, "train").tolist()
    assert head + tail == ids
    total = len(text.encode("utf-8"))
    head_bytes = token_bytes(tok, head, eos)
    assert text.encode("utf-8").startswith(head_bytes)
    assert splits["val"]["bytes"] == total - len(head_bytes) == len(token_bytes(tok, tail, eos))
    assert splits["train"]["bytes"] + splits["val"]["bytes"] == total
    assert len(tok.decode(tail).encode("utf-8")) != splits["val"]["bytes"]  # the case decoding gets wrong


def test_a_cache_without_byte_counts_gets_them_on_load_and_keeps_them(tmp_path, corpus):
    cfg = data_cfg(tmp_path, [{"path": str(corpus)}], vocab_size=384, val_fraction=0.1)
    folder = prepare(cfg)
    meta = load_meta(folder)
    counted = [s["splits"]["val"]["bytes"] for s in meta["sources"]]
    for src in meta["sources"]:
        for split in src["splits"].values():
            del split["bytes"]
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    bundle = build_data(cfg, seq_len=32, seed=0, rank=0, world_size=1, micro_batch_size=4, global_batch_size=4)
    assert [s["splits"]["val"]["bytes"] for s in bundle.meta["sources"]] == counted
    stored = load_meta(folder)
    assert [s["splits"]["val"]["bytes"] for s in stored["sources"]] == counted
    assert "bytes" not in stored["sources"][0]["splits"]["train"]  # the train split is not decoded on load
    assert not list(folder.glob(".meta.json.*"))


def test_mixture_weights_each_source_by_the_windows_evaluated(tmp_path):
    ascii_docs = ["the quick brown fox jumps over the lazy dog " * 6 for _ in range(8)]
    cjk_docs = ["日本語のテキストと漢字かな交じり文です。" * 6 for _ in range(8)]
    paths = []
    for name, docs in (("a", ascii_docs), ("b", cjk_docs)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        paths.append({"path": str(path)})
    cfg = data_cfg(tmp_path, paths, val_fraction=0.5)
    bundle = build_data(cfg, seq_len=8, seed=0, rank=0, world_size=2, micro_batch_size=3, global_batch_size=6)
    index = bundle.val.index
    seen: list[int] = []
    read = index.read
    index.read = lambda window_ids: (seen.extend(window_ids.tolist()), read(window_ids))[1]
    for rank in (0, 1):
        ValBatches(index, rank=rank, world_size=2, micro_batch_size=3, seq_len=8)(5)
    windows = bundle.val.windows_per_source(5)
    sources = np.searchsorted(index.offsets, np.asarray(seen), side="right") - 1
    assert windows.tolist() == np.bincount(sources, minlength=2).tolist() and windows.sum() == 30
    assert min(windows) > 0
    t = [s["splits"]["val"]["tokens"] for s in bundle.meta["sources"]]
    b = [s["splits"]["val"]["bytes"] for s in bundle.meta["sources"]]
    expected = windows.sum() / sum(w * bi / ti for w, ti, bi in zip(windows, t, b))
    assert bundle.val_tokens_per_byte(5) == pytest.approx(expected, rel=1e-12)
    assert min(ti / bi for ti, bi in zip(t, b)) < expected < max(ti / bi for ti, bi in zip(t, b))
    assert bundle.val_bpb(2.0, 5) == pytest.approx(2.0 / LN2 * expected, rel=1e-12)


# --- eval side ---------------------------------------------------------------------------------

def test_val_bpb_in_metrics_summary_and_console(corpus, data_cache, tmp_path, capsys):
    run = tmp_path / "run"
    trainer = Trainer(compose(tiny_overrides(corpus, data_cache, run)), run)
    (src,) = trainer.data.meta["sources"]
    tokens, nbytes = src["splits"]["val"]["tokens"], src["splits"]["val"]["bytes"]
    # The default corpus is one document: train + val bytes are the file's, the tail's from its tokens.
    assert src["splits"]["train"]["bytes"] + nbytes == len(corpus.read_bytes())
    folder, meta = trainer.data.folder, trainer.data.meta
    assert nbytes == len(token_bytes(trainer.data.tokenizer, split_ids(folder, meta, 0, "val").tolist(), meta["eos_id"]))
    summary = trainer.fit()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [5, 10]
    for r in evals:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / LN2 * tokens / nbytes, rel=1e-12)
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["final_val_bpb"] == evals[-1]["val_bpb"] == summary["final_val_bpb"]
    assert on_disk["best_val_bpb"] == min(r["val_bpb"] for r in evals)
    out = capsys.readouterr().out
    assert f"step 10: val_loss {evals[-1]['val_loss']:.4f} | val_bpb {evals[-1]['val_bpb']:.4f}" in out


def test_loss_plot_has_a_bits_per_byte_axis():
    train = [{"step": s, "tokens": 100 * s, "loss": 5.0 - 0.1 * s} for s in range(1, 5)]
    evals = [{"step": 2, "tokens": 200, "val_loss": 4.0, "val_bpb": 1.5},
             {"step": 3, "tokens": 300, "val_loss": 3.9},  # a row logged before val_bpb existed
             {"step": 4, "tokens": 400, "val_loss": 3.5, "val_bpb": 1.25}]
    fig = loss_figure(train, evals, "run")
    right = [ax for ax in fig.axes if ax.get_ylabel() == "val bits per byte"]
    assert len(right) == 2  # against steps and against tokens
    (line,) = right[0].get_lines()
    assert list(line.get_xdata()) == [2, 4] and list(line.get_ydata()) == [1.5, 1.25]
    assert "val bpb" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    fig.clf()


def test_val_bpb_goes_to_wandb_rows_and_summary(tmp_path, monkeypatch):
    logged, summary = [], {}
    fake = types.ModuleType("wandb")
    fake.Settings = dict
    fake.init = lambda **kw: types.SimpleNamespace(id="x", summary=summary, finish=lambda: None,
                                                   log=lambda row, step=None: logged.append((step, row)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = LoggerConfig(wandb=WandbConfig(mode="offline"), plot=False)
    log = RunLogger(tmp_path, cfg, {}, enabled=True, total_steps=2, start_step=0, progress=False)
    log.log_eval({"step": 2, "tokens": 64, "time_s": 1.0, "val_loss": 3.0, "val_bpb": 1.25})
    log.close({"final_val_bpb": 1.25, "best_val_bpb": 1.25})
    assert logged == [(2, {"tokens": 64, "time_s": 1.0, "val_loss": 3.0, "val_bpb": 1.25})]
    assert summary == {"final_val_bpb": 1.25, "best_val_bpb": 1.25}


def test_report_tables_show_final_val_bpb(tmp_path):
    sweep = tmp_path / "sweep"
    for job, (optim, bpbs) in enumerate((("adamw", [2.0, 1.5]), ("lion", [1.9, 1.25]))):
        path = sweep / str(job)
        path.mkdir(parents=True)
        (path / "config.yaml").write_text(json.dumps({"optim": {"name": optim, "lr": 1e-3}}))
        rows = [{"step": 10 * i, "tokens": 1000 * i, "time_s": 2.0 * i, "val_loss": b * LN2 * 1.2, "val_bpb": b}
                for i, b in enumerate(bpbs, 1)]
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (path / "summary.json").write_text(json.dumps({"status": "completed", "optimizer": optim}))
    assert report_main([str(sweep)]) == 0
    text = (sweep / "report.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| optimizer |"))
    columns = [c.strip() for c in header.split("|")[1:-1]]
    assert columns[columns.index("final val loss") + 1] == "final val bpb"
    lion = next(line for line in text.splitlines() if line.startswith("| lion |"))
    assert [c.strip() for c in lion.split("|")[1:-1]][columns.index("final val bpb")] == "1.2500"
    all_runs = text.split("## All runs")[1]
    assert "final val bpb" in all_runs and "| 1.5000 |" in all_runs


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_log_val_bpb(corpus, data_cache, tmp_path, strategy):
    run = tmp_path / "run"
    args = tiny_overrides(corpus, data_cache, run, **{"train.micro_batch_size": 2, "train.max_steps": 4,
                                                      "train.eval_every": 2, "distributed.strategy": strategy})
    prepare(compose(args).data)  # once, before two ranks share the cache
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m", "llmtrain",
           *args]
    proc = subprocess.run(cmd, cwd=REPO, env=torchrun_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    meta = load_meta(prepare(compose(args).data))
    val = meta["sources"][0]["splits"]["val"]
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / LN2 * val["tokens"] / val["bytes"], rel=1e-12)
    assert json.loads((run / "summary.json").read_text())["final_val_bpb"] == evals[-1]["val_bpb"]
