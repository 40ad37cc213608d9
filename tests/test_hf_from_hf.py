"""``model.from_hf=PATH|ID``: the model's architecture comes from a Hugging Face config.json (a folder,
the local hub cache, or a download of that one file); ``model.*`` keys on the command line still win."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llmtrain.cli import compose
from llmtrain.errors import ConfigError

from conftest import REPO, torchrun_env, write_corpus
from hf_fixtures import (FakeHub, gpt2_config, hub_cache, llama_config, save_config, save_model, tokenizer_size,
                         word_tokenizer)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_a_local_llama_config_sets_the_architecture(tmp_path):
    folder = save_config(tmp_path / "hf", llama_config())
    m = compose([f"model.from_hf='{folder}'", "train.seq_len=64"]).model
    got = {k: getattr(m, k) for k in ("family", "n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden",
                                      "vocab_size", "max_seq_len", "rope_theta", "rope_scaling", "tie_embeddings",
                                      "norm_eps")}
    assert got == dict(family="llama", n_layers=3, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=160, vocab_size=97,
                       max_seq_len=128, rope_theta=500000.0, rope_scaling=None, tie_embeddings=False, norm_eps=1e-6)
    assert m.name == "hf" and m.from_hf == str(folder)
    assert m.dropout == 0.0 and m.init_std == 0.02  # training choices stay the preset's, not HF's


def test_a_gpt2_config_keeps_the_presets_dropout(tmp_path):
    folder = save_config(tmp_path / "gpt2", gpt2_config())
    m = compose([f"model.from_hf='{folder}'", "train.seq_len=64"]).model
    assert (m.family, m.n_layers, m.d_model, m.n_heads, m.vocab_size, m.max_seq_len, m.tie_embeddings) == (
        "gpt", 2, 48, 4, 101, 64, True)
    assert m.dropout == 0.0  # HF's resid_pdrop=0.1 is a training choice


def test_model_keys_on_the_command_line_win(tmp_path):
    folder = save_config(tmp_path / "hf", llama_config())
    m = compose([f"model.from_hf='{folder}'", "model.n_layers=1", "++model.max_seq_len=64", "model.name=mine",
                 "train.seq_len=64"]).model
    assert (m.n_layers, m.max_seq_len, m.name) == (1, 64, "mine")
    assert (m.d_model, m.n_kv_heads, m.ffn_hidden) == (64, 2, 160)


def test_a_model_preset_is_replaced_but_its_checks_still_apply(tmp_path):
    folder = save_config(tmp_path / "hf", llama_config(max_position_embeddings=32))
    m = compose(["model=gpt2_124m", f"model.from_hf='{folder}'", "train.seq_len=32"]).model
    assert (m.family, m.d_model) == ("llama", 64)
    with pytest.raises(ConfigError, match=r"train.seq_len: 128 exceeds model.max_seq_len=32"):
        compose([f"model.from_hf='{folder}'", "train.seq_len=128"])


@pytest.mark.parametrize("override, hf_layers", [(None, 3), ("model.n_layers=1", 1)])
def test_dry_run_plans_the_hf_models_parameters_from_config_json_alone(tmp_path, override, hf_layers):
    from transformers import LlamaForCausalLM

    folder = save_config(tmp_path / "hf", llama_config())
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "llmtrain", f"model.from_hf='{folder}'", "dry_run=true",
                           "train.seq_len=64", f"run_dir='{run}'", *([override] if override else [])],
                          cwd=REPO, env=dict(torchrun_env(), HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    with torch.device("meta"):
        expected = LlamaForCausalLM(llama_config(num_hidden_layers=hf_layers)).num_parameters()
    assert json.loads((run / "plan.json").read_text())["params"]["total"] == expected


def test_a_hub_id_in_the_local_cache_needs_no_network(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = hub_cache(tmp_path / "cache", "acme/tiny-llama", save_config(tmp_path / "hf", llama_config()))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    m = compose(["model.from_hf=acme/tiny-llama", "train.seq_len=64"]).model
    assert (m.n_layers, m.d_model, m.vocab_size, m.name) == (3, 64, 97, "acme/tiny-llama")


def test_a_hub_id_downloads_config_json_only(tmp_path, monkeypatch):
    repo = save_model(tmp_path / "repo", llama_config())
    hub = FakeHub(tmp_path / "downloads", {"acme/tiny-llama": repo}).install(monkeypatch)
    m = compose(["model.from_hf=acme/tiny-llama", "train.seq_len=64"]).model
    assert (m.n_layers, m.vocab_size) == (3, 97)
    fetched = {c[2] for c in hub.calls if not c[3]}
    assert fetched == {"config.json"} and all(c[0] == "file" for c in hub.calls)


def test_a_hub_id_the_hub_does_not_have_is_one_line(tmp_path, monkeypatch):
    FakeHub(tmp_path / "downloads", {}).install(monkeypatch)
    with pytest.raises(ConfigError, match=r"^model.from_hf: .*'acme/nope'.* the hub has no model of that name") as err:
        compose(["model.from_hf=acme/nope"])
    assert "\n" not in str(err.value)


def test_offline_and_not_cached_is_one_line_naming_a_local_copy(tmp_path):
    env = dict(torchrun_env(), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    proc = subprocess.run([sys.executable, "-m", "llmtrain", "model.from_hf=acme/tiny-llama", "dry_run=true",
                           f"run_dir='{tmp_path / 'run'}'"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: model.from_hf: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "'acme/tiny-llama'" in proc.stderr and "unreachable" in proc.stderr
    assert "model.from_hf=/path/to/" in proc.stderr


@pytest.mark.parametrize("value, message", [
    ("./no/such/folder", r"no such file or directory: ./no/such/folder; expected a local .* or a Hugging Face hub id"),
    ("nosuchfolder", r"no such file or directory: nosuchfolder; expected a local .* or a Hugging Face hub id"),
])
def test_a_mistyped_path_is_one_line(value, message):
    with pytest.raises(ConfigError, match=f"^model.from_hf: {message}"):
        compose([f"model.from_hf={value}"])


def test_a_folder_without_config_json_or_of_another_model_type(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^model.from_hf: .*empty has no config.json"):
        compose([f"model.from_hf='{tmp_path / 'empty'}'"])
    from transformers import BertConfig

    folder = save_config(tmp_path / "bert", BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                                       intermediate_size=37))
    with pytest.raises(ConfigError, match=r"^model.from_hf: model_type 'bert' is not supported \(llama, gpt2\)"):
        compose([f"model.from_hf='{folder}'"])


def test_from_hf_and_init_from_one_folder_start_from_the_hf_model(tmp_path):
    """Fine-tune-style start: the architecture and the weights of one HF folder, its tokenizer for the data."""
    from transformers import AutoModelForCausalLM

    from llmtrain.distributed import unwrap
    from llmtrain.trainer import Trainer

    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=30)
    folder = word_tokenizer(corpus, tmp_path / "hf")
    vocab_size = tokenizer_size(folder)
    save_model(folder, llama_config(vocab_size=vocab_size))
    run = tmp_path / "run"
    cfg = compose([f"model.from_hf='{folder}'", f"model.init_from='{folder}'", f"data.tokenizer='{folder}'",
                   f"data.sources=[{{path:'{corpus}'}}]", f"data.cache_dir='{tmp_path / 'cache'}'", "data.num_proc=1",
                   "train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=4", "train.max_steps=2",
                   "train.eval_every=0", "train.save_every=0", "train.sample_tokens=0", "train.progress_bar=false",
                   "logger.wandb.mode=disabled", "logger.plot=false", f"run_dir='{run}'"])
    trainer = Trainer(cfg, run)
    model = unwrap(trainer.model)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    idx = torch.randint(0, vocab_size, (2, 16))
    torch.testing.assert_close(model.eval()(idx), hf(idx).logits, atol=1e-4, rtol=0)
    model.train()
    summary = trainer.fit()
    assert summary["status"] == "completed"
