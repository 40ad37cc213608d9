"""A folder written by ``datasets``' ``save_to_disk`` is a source: read with ``load_from_disk`` (a Dataset,
or a DatasetDict's ``split``), rows streamed by ``text_field``; nothing goes to the hub."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from llmtrain.data.prepare import load_meta, prepare
from llmtrain.data.sources import BadUtf8, iter_documents, resolve_sources
from llmtrain.errors import DataError

from conftest import REPO, torchrun_env
from test_data import cfg_for, documents_in

WORDS = "king queen lord lady sword crown night day love death fair foul thou thee art doth hath".split()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "\n" for _ in range(n)]


def saved_dataset(folder: Path, texts: list[str], column: str = "text") -> Path:
    import datasets

    datasets.Dataset.from_dict({column: texts, "id": list(range(len(texts)))}).save_to_disk(str(folder))
    return folder


def saved_dataset_dict(folder: Path, splits: dict[str, list[str]]) -> Path:
    import datasets

    datasets.DatasetDict({name: datasets.Dataset.from_dict({"text": texts}) for name, texts in splits.items()}
                         ).save_to_disk(str(folder))
    return folder


def read(spec) -> list[str]:
    return list(iter_documents(spec, BadUtf8("error")))


def test_a_saved_dataset_folder_is_read_row_by_row(tmp_path):
    texts = docs(11)
    (spec,) = resolve_sources([{"path": str(saved_dataset(tmp_path / "ds", texts))}])
    assert spec.type == "hf_disk"
    assert read(spec) == texts


def test_type_hf_on_a_saved_folder_reads_it_from_disk(tmp_path):
    texts = docs(5, seed=1)
    (spec,) = resolve_sources([{"path": str(saved_dataset(tmp_path / "ds", texts)), "type": "hf"}])
    assert read(spec) == texts


def test_a_dataset_dict_takes_its_split_and_names_the_others(tmp_path):
    train, val = docs(6, seed=2), docs(3, seed=3)
    folder = saved_dataset_dict(tmp_path / "dd", {"train": train, "validation": val})
    (spec,) = resolve_sources([{"path": str(folder)}])
    assert read(spec) == train
    (spec,) = resolve_sources([{"path": str(folder), "split": "validation"}])
    assert read(spec) == val
    (spec,) = resolve_sources([{"path": str(folder), "split": "test"}])
    with pytest.raises(DataError, match=r"no split 'test' \(splits: train, validation\); set split") as err:
        read(spec)
    assert "\n" not in str(err.value)


def test_text_field_and_max_documents(tmp_path):
    texts = docs(8, seed=4)
    folder = saved_dataset(tmp_path / "ds", texts, column="content")
    (spec,) = resolve_sources([{"path": str(folder), "text_field": "content", "max_documents": 3}])
    assert read(spec) == texts[:3]
    (spec,) = resolve_sources([{"path": str(folder)}])
    with pytest.raises(DataError, match=r"no column 'text' \(columns: content, id\); set text_field"):
        read(spec)


def test_a_damaged_saved_folder_is_one_line(tmp_path):
    folder = saved_dataset(tmp_path / "ds", docs(3))
    next(folder.glob("*.arrow")).write_bytes(b"not arrow")
    (spec,) = resolve_sources([{"path": str(folder)}])
    with pytest.raises(DataError, match=r"cannot load with datasets.load_from_disk") as err:
        read(spec)
    assert "\n" not in str(err.value)


def test_prepare_round_trips_and_an_edit_reprepares(tmp_path):
    texts = docs(20, seed=5)
    folder = saved_dataset(tmp_path / "ds", texts)
    prepared = prepare(cfg_for(tmp_path, [{"path": str(folder)}]))
    assert sorted(documents_in(prepared)) == sorted(texts)
    assert load_meta(prepared)["sources"][0]["type"] == "hf_disk"
    assert prepare(cfg_for(tmp_path, [{"path": str(folder)}])) == prepared  # unchanged: a cache hit
    saved_dataset(tmp_path / "ds2", texts[:10])
    import shutil

    shutil.rmtree(folder)
    shutil.move(str(tmp_path / "ds2"), str(folder))
    again = prepare(cfg_for(tmp_path, [{"path": str(folder)}]))
    assert again != prepared and sorted(documents_in(again)) == sorted(texts[:10])


def test_llmtrain_data_cli_prepares_a_saved_folder(tmp_path):
    folder = saved_dataset(tmp_path / "ds", docs(30, seed=6))
    env = dict(torchrun_env(), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "llmtrain.data.prepare", f"data.sources=[{{path: '{folder}'}}]",
         f"data.cache_dir='{tmp_path / 'cache'}'", "data.vocab_size=300", "data.num_proc=1", "data.progress=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "dataset_info" not in proc.stderr
