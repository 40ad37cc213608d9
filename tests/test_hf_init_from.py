"""``model.init_from`` with a Hugging Face hub id: validated by shape, checked at the trainer's start-up
before any data preparation (not in a dry run, not on resume), weights downloaded through huggingface_hub
(safetensors first) or taken from the local hub cache; offline and not cached is one line naming the id
and a local copy."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from llmtrain.cli import compose
from llmtrain.errors import ConfigError
from llmtrain.export import check_init_from, load_init_weights
from llmtrain.models import build_model, to_model_config

from conftest import REPO, torchrun_env, write_corpus
from hf_fixtures import FakeHub, hub_cache, llama_config, save_model, tokenizer_size, word_tokenizer


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def ours(config) -> torch.nn.Module:
    """An llmtrain model of the HF config's architecture, randomly initialised."""
    from llmtrain.export import model_config_from_hf

    torch.manual_seed(123)
    return build_model(to_model_config(model_config_from_hf(config))).eval()


def hf_logits(folder, idx):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(idx).logits


def test_a_hub_id_passes_validation_in_a_dry_run():
    cfg = compose(["model.init_from=acme/tiny-llama", "dry_run=true"])
    assert cfg.model.init_from == "acme/tiny-llama"


@pytest.mark.parametrize("value", ["./runs/missing", "/no/such/run", "missing_run", "a/../b"])
def test_a_path_that_cannot_be_a_hub_id_is_no_such_file(value):
    with pytest.raises(ConfigError, match=rf"^model.init_from: no such file or directory: {value}; expected"):
        compose([f"model.init_from='{value}'", "dry_run=true"])


def test_offline_and_not_cached_fails_before_data_preparation_in_one_line(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=5)
    env = dict(torchrun_env(), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    proc = subprocess.run([sys.executable, "-m", "llmtrain", "model.init_from=acme/tiny-llama",
                           f"data.sources=[{{path:'{corpus}'}}]", f"data.cache_dir='{tmp_path / 'cache'}'",
                           f"run_dir='{tmp_path / 'run'}'"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: model.init_from: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "'acme/tiny-llama'" in proc.stderr and "unreachable" in proc.stderr
    assert "model.init_from=/path/to/" in proc.stderr
    assert not (tmp_path / "cache").exists()  # nothing was prepared first


def test_a_hub_id_downloads_safetensors_weights_only(tmp_path, monkeypatch):
    config = llama_config()
    repo = save_model(tmp_path / "repo", config)
    (repo / "original").mkdir()
    (repo / "original" / "consolidated.00.pth").write_bytes(b"the same weights, another layout")
    hub = FakeHub(tmp_path / "downloads", {"acme/tiny-llama": repo}).install(monkeypatch)
    model = ours(config)
    load_init_weights(model, "acme/tiny-llama")
    idx = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(model(idx), hf_logits(repo, idx), atol=1e-4, rtol=0)
    got = sorted(p.relative_to(tmp_path / "downloads" / "acme" / "tiny-llama").as_posix()
                 for p in (tmp_path / "downloads").rglob("*") if p.is_file())
    assert got == ["config.json", "generation_config.json", "model.safetensors"]
    assert all(c[0] == "snapshot" for c in hub.calls)


def test_a_hub_id_with_only_pickled_weights_falls_back_to_bin(tmp_path, monkeypatch):
    config = llama_config(tie_word_embeddings=True)
    repo = save_model(tmp_path / "repo", config, safetensors=False)
    assert (repo / "pytorch_model.bin").is_file()
    hub = FakeHub(tmp_path / "downloads", {"acme/old-llama": repo}).install(monkeypatch)
    model = ours(config)
    load_init_weights(model, "acme/old-llama")
    idx = torch.randint(0, 97, (1, 12))
    torch.testing.assert_close(model(idx), hf_logits(repo, idx), atol=1e-4, rtol=0)
    assert [c[0] for c in hub.calls if not c[3]] == ["snapshot", "snapshot"]


def test_a_hub_id_in_the_local_cache_loads_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    config = llama_config()
    repo = save_model(tmp_path / "repo", config, seed=7)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache(tmp_path / "cache", "acme/x", repo)))
    model = ours(config)
    load_init_weights(model, "acme/x")
    idx = torch.randint(0, 97, (1, 12))
    torch.testing.assert_close(model(idx), hf_logits(repo, idx), atol=1e-4, rtol=0)
    check_init_from("acme/x")  # start-up check: in the cache, so no network is needed


def test_a_hub_id_the_hub_does_not_have_is_one_line_at_start_up(tmp_path, monkeypatch):
    FakeHub(tmp_path / "downloads", {}).install(monkeypatch)
    with pytest.raises(ConfigError, match=r"^model.init_from: .*'acme/typo'.* the hub has no model of that name") as e:
        check_init_from("acme/typo")
    assert "\n" not in str(e.value)


def test_shapes_are_still_checked_against_the_hub_model(tmp_path, monkeypatch):
    repo = save_model(tmp_path / "repo", llama_config())
    FakeHub(tmp_path / "downloads", {"acme/tiny-llama": repo}).install(monkeypatch)
    model = ours(llama_config(num_hidden_layers=2))
    with pytest.raises(ConfigError, match=r"^model.init_from: acme/tiny-llama has n_layers=3 but model.n_layers=2; "
                                          r".*model.from_hf=acme/tiny-llama"):
        load_init_weights(model, "acme/tiny-llama")


def test_a_run_begun_from_a_hub_id_resumes_without_the_hub(tmp_path, monkeypatch):
    """The checkpoint's weights are used on resume, so a restart needs neither the hub nor the cache."""
    import huggingface_hub.constants

    from llmtrain.trainer import Trainer

    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=30)
    tokenizer = word_tokenizer(corpus, tmp_path / "tok")
    repo = save_model(tmp_path / "repo", llama_config(vocab_size=tokenizer_size(tokenizer)))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache(tmp_path / "cache", "acme/x", repo)))
    run = tmp_path / "run"
    overrides = ["model.init_from=acme/x", "model.n_layers=3", "model.d_model=64", "model.n_heads=4",
                 "model.n_kv_heads=2", "model.ffn_hidden=160", f"model.vocab_size={tokenizer_size(tokenizer)}",
                 "model.max_seq_len=128", "model.rope_theta=500000.0", "model.norm_eps=1e-6",
                 "model.tie_embeddings=false",
                 f"data.tokenizer='{tokenizer}'", f"data.sources=[{{path:'{corpus}'}}]",
                 f"data.cache_dir='{tmp_path / 'data'}'", "data.num_proc=1", "train.seq_len=32",
                 "train.global_batch_size=4", "train.micro_batch_size=4", "train.max_steps=2", "train.eval_every=0",
                 "train.save_every=0", "train.sample_tokens=0", "train.progress_bar=false",
                 "logger.wandb.mode=disabled", "logger.plot=false", f"run_dir='{run}'"]
    assert Trainer(compose(overrides), run).fit()["status"] == "completed"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError, match="unreachable"):
        check_init_from("acme/x")
    summary = Trainer(compose([*overrides, "train.max_steps=3"]), run).fit()
    assert summary["status"] == "completed" and summary["steps"] == 3


def test_a_vocab_mismatch_names_from_hf_and_padding(tmp_path):
    folder = save_model(tmp_path / "hf", llama_config())
    model = ours(llama_config(vocab_size=128))  # what data.pad_vocab_to_multiple_of=64 makes of 97 tokens
    with pytest.raises(ConfigError, match=r"has vocab_size=97 but model.vocab_size=128; .*model.from_hf=.*hf, or set "
                                          r"model.vocab_size=97 and data.pad_vocab_to_multiple_of=0"):
        load_init_weights(model, folder)
