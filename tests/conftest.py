"""Shared fixtures: a generated corpus and the overrides of a tiny, fast training run."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _default_cpu_matmul():
    """``train.cpu_matmul`` is a process-wide switch; a test that sets it (directly or through a
    trainer) leaves the next test on the default, even when it fails."""
    yield
    from llmtrain.cpu_matmul import set_cpu_matmul

    set_cpu_matmul("auto")


def torchrun_env() -> dict[str, str]:
    """Environment for launching llmtrain or tests/dist_worker.py as a subprocess: one thread per
    rank, no W&B, the repo importable, no WORLD_SIZE leaking in. PYTHONFAULTHANDLER: a rank that
    aborts in C++ still prints where Python was."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(REPO), PYTHONFAULTHANDLER="1")
    env.pop("WORLD_SIZE", None)
    return env

_WORDS = (
    "the king queen lord lady speak night day love death sword crown heart fair good sweet "
    "come go know thou thee thy shall will not what why how where here there now then and "
    "but with from upon against before after never ever more most much little great noble"
).split()


def write_corpus(path: Path, n_docs: int = 40, words_per_doc: int = 300, seed: int = 0) -> Path:
    """Deterministic English-like text: documents separated by blank lines."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = [rng.choice(_WORDS) for _ in range(words_per_doc)]
        lines = [" ".join(words[i : i + 12]).capitalize() + "." for i in range(0, len(words), 12)]
        docs.append("\n".join(lines))
    path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


def tiny_overrides(corpus: Path, cache: Path, run_dir: Path, **extra) -> list[str]:
    """A ~100K-parameter LLaMA on the generated corpus: a step takes milliseconds on CPU."""
    base = {
        "data.sources": f"[{{path:'{corpus}'}}]",
        "data.cache_dir": f"'{cache}'",
        "data.vocab_size": 384,
        "data.num_proc": 1,
        "model.n_layers": 2,
        "model.d_model": 64,
        "model.n_heads": 4,
        "model.n_kv_heads": 2,
        "model.max_seq_len": 64,
        "train.seq_len": 32,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 8,
        "train.max_steps": 10,
        "train.eval_every": 5,
        "train.eval_steps": 2,
        "train.save_every": 0,
        "train.log_every": 1,
        "train.progress_bar": "false",
        "train.sample_tokens": 0,
        "logger.wandb.mode": "disabled",
        "logger.plot": "false",
        "run_dir": f"'{run_dir}'",
        "optim.lr": 3e-3,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
