"""The validation split: too short for one window is refused at start-up, not at the first eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmtrain.cli import compose
from llmtrain.data import DataConfig, build_data
from llmtrain.errors import DataError
from llmtrain.trainer import Trainer

from conftest import REPO, tiny_overrides, write_corpus

WORDS = "the king queen lord lady speak night day love death sword crown heart fair good sweet".split()


def data_cfg(tmp_path: Path, sources, **kw) -> DataConfig:
    base = dict(name="val", sources=sources, vocab_size=300, cache_dir=str(tmp_path / "cache"),
                num_proc=1, progress=False, val_fraction=0.1)
    base.update(kw)
    return DataConfig(**base)


def short_val_run(tmp_path: Path, **extra):
    """A tiny run whose single-document corpus holds out only ~17 tokens, fewer than seq_len+1 = 33."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "run"
    overrides = {"data.val_fraction": 0.001, "train.max_steps": 3, "train.eval_every": 100, **extra}
    return compose(tiny_overrides(corpus, tmp_path / "cache", run, **overrides)), run


def test_short_val_split_is_refused_before_the_first_step(tmp_path):
    cfg, run = short_val_run(tmp_path)
    with pytest.raises(DataError, match=r"^data\.val_fraction: the validation split has \d+ tokens, fewer than "
                                        r"train\.seq_len\+1 = 33 .*data\.val_fraction \(now 0\.001\)"
                                        r".*train\.eval_every=0"):
        Trainer(cfg, run)
    assert not (run / "metrics.jsonl").is_file() or '"loss"' not in (run / "metrics.jsonl").read_text()


def test_short_val_split_refusal_via_cli_is_one_line(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    args = tiny_overrides(corpus, tmp_path / "cache", tmp_path / "run", **{"data.val_fraction": 0.001,
                                                                          "train.max_steps": 3})
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "llmtrain", *args], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "error: data.val_fraction: the validation split has" in proc.stderr
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not list((tmp_path / "run").rglob("step_*"))
    assert not metrics.is_file() or '"loss"' not in metrics.read_text()  # no training step ran


def val_corpus(folder: Path, val_words: int) -> list[str]:
    """Ten jsonl documents; with val_fraction=0.1 document 0 (``val_words`` words) is the whole val split."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = [" ".join(WORDS[:4] * (val_words // 4))] + [" ".join(WORDS * 8)] * 9
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs


def test_one_val_window_serves_every_rank(tmp_path):
    val_corpus(tmp_path / "src", val_words=8)
    cfg = data_cfg(tmp_path, [str(tmp_path / "src" / "docs.jsonl")], vocab_size=300)
    kw = dict(seq_len=8, seed=0, world_size=2, micro_batch_size=2, global_batch_size=4)
    bundles = [build_data(cfg, rank=r, **kw) for r in range(2)]
    assert bundles[0].val.index.total == 1  # about 10 tokens: one window of 9
    for b in bundles:
        (x, y), = b.val_batches(1)
        assert x.shape == y.shape == (2, 8)
    with pytest.raises(DataError, match=r"^data\.val_fraction: the validation split has \d+ tokens, fewer than "
                                        r"train\.seq_len\+1 = 33"):
        build_data(cfg, seq_len=32, seed=0, rank=1, world_size=2, micro_batch_size=2, global_batch_size=4)


def test_val_split_split_across_sources_names_the_largest(tmp_path):
    """Windows never span sources: 3 val pieces of ~20 tokens hold no 33-token window between them."""
    sources = []
    for i in range(3):
        val_corpus(tmp_path / f"src{i}", val_words=20)
        sources.append(str(tmp_path / f"src{i}" / "docs.jsonl"))
    cfg = data_cfg(tmp_path, sources, vocab_size=300)
    with pytest.raises(DataError, match=r"^data\.val_fraction: the validation split has \d+ tokens in 3 sources, "
                                        r"at most \d+ in one, fewer than train\.seq_len\+1 = 33"):
        build_data(cfg, seq_len=32, seed=0, rank=0, world_size=1, micro_batch_size=1, global_batch_size=1)


def test_short_val_split_is_allowed_when_nothing_evaluates(tmp_path):
    val_corpus(tmp_path / "src", val_words=16)
    cfg = data_cfg(tmp_path, [str(tmp_path / "src" / "docs.jsonl")], vocab_size=300)
    b = build_data(cfg, seq_len=32, seed=0, rank=0, world_size=1, micro_batch_size=1, global_batch_size=1,
                   evals=False)
    with pytest.raises(DataError, match=r"^data\.val_fraction: the validation split has no window"):
        b.val_batches(1)
