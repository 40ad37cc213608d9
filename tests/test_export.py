"""Hugging Face interop: logit parity both ways, export CLI round trip, init_from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from llmtrain.errors import ConfigError
from llmtrain.export import from_hf, load_init_weights, main, to_hf
from llmtrain.models import ModelConfig, build_model

SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

VARIANTS = {
    "llama_gqa_untied": dict(family="llama", n_kv_heads=2, tie_embeddings=False),
    "llama_mha_tied": dict(family="llama", n_kv_heads=None, tie_embeddings=True),
    "llama31_rope_scaling": dict(family="llama", n_kv_heads=2, rope_theta=500000.0, rope_scaling=SCALING),
    "gpt_tied": dict(family="gpt", tie_embeddings=True),
    "gpt_untied_custom_ffn": dict(family="gpt", tie_embeddings=False, ffn_hidden=48),
}


def small(**kw) -> ModelConfig:
    # init_std 0.2 makes logits large enough that a wrong mapping could not hide under 1e-4.
    return ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=61, max_seq_len=64, init_std=0.2, **kw)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_to_hf_and_back_keep_logits(variant):
    torch.manual_seed(0)
    model = build_model(small(**VARIANTS[variant])).eval()
    idx = torch.randint(0, 61, (2, 48))  # past original_max_position_embeddings=16
    ours = model(idx)
    hf = to_hf(model)
    torch.testing.assert_close(hf(idx).logits, ours, atol=1e-4, rtol=0)
    back = from_hf(hf)
    torch.testing.assert_close(back(idx), ours, atol=1e-4, rtol=0)
    assert back.cfg.tie_embeddings == model.cfg.tie_embeddings
    assert (back.lm_head.weight is back.embed.weight) == model.cfg.tie_embeddings


def test_from_hf_of_a_random_hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32,
                                      rms_norm_eps=1e-6, rope_theta=1234.0, initializer_range=0.2)).eval()
    ours = from_hf(hf)
    assert ours.cfg.n_kv_heads == 1 and ours.cfg.ffn_hidden == 40 and ours.cfg.rope_theta == 1234.0
    idx = torch.randint(0, 50, (3, 20))
    torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-4, rtol=0)


def test_rope_scaling_is_exported():
    hf = to_hf(build_model(small(**VARIANTS["llama31_rope_scaling"])))
    cfg = hf.config
    params = getattr(cfg, "rope_parameters", None) or {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    assert params["rope_type"] == "llama3" and params["factor"] == 8.0 and params["rope_theta"] == 500000.0


def _fake_run(tmp_path: Path, model, step_weights: dict[int, dict]) -> Path:
    """A run directory as the trainer writes it: config.yaml, tokenizer.json, checkpoints/step_N."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    run = tmp_path / "run"
    run.mkdir()
    cfg = {"model": OmegaConf.to_container(OmegaConf.structured(model.cfg)), "train": {"seq_len": 16}}
    OmegaConf.save(OmegaConf.create(cfg), run / "config.yaml")
    words = ["<|bos|>", "<|eos|>", "<|pad|>", "<unk>", "to", "be", "or", "not", "that", "is", "the", "question"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(run / "tokenizer.json"))
    for step, sd in step_weights.items():
        ckpt = run / "checkpoints" / f"step_{step}"
        ckpt.mkdir(parents=True)
        torch.save(sd, ckpt / "model.pt")
        (ckpt / "COMPLETE").write_text("")
    return run


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_export_cli_round_trip_through_from_pretrained(tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = build_model(small(family=family, n_kv_heads=2 if family == "llama" else None,
                              tie_embeddings=family == "gpt")).eval()
    stale = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    # step_2 is the newest complete checkpoint; step_3 lacks its COMPLETE marker.
    run = _fake_run(tmp_path, model, {1: stale, 2: model.state_dict()})
    (run / "checkpoints" / "step_3").mkdir()
    out = tmp_path / "hf"
    main([str(run), str(out)])

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok.encode("to be or not")])
    assert ids.tolist() == [[4, 5, 6, 7]]
    torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)
    assert tok.eos_token == "<|eos|>" and tok.pad_token == "<|pad|>"
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tok.eos_token_id


def test_export_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "missing"), str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "no such run directory" in err

    model = build_model(small(family="llama"))
    run = _fake_run(tmp_path, model, {})
    with pytest.raises(SystemExit) as exc:
        main([str(run), str(tmp_path / "out")])
    assert exc.value.code == 2 and "no complete checkpoint" in capsys.readouterr().err


def test_init_from_loads_hf_weights_and_checks_shapes(tmp_path):
    torch.manual_seed(0)
    source = build_model(small(family="llama", n_kv_heads=2)).eval()
    to_hf(source).save_pretrained(tmp_path / "hf")
    target = build_model(small(family="llama", n_kv_heads=2)).eval()
    idx = torch.randint(0, 61, (1, 12))
    assert not torch.allclose(target(idx), source(idx))
    load_init_weights(target, tmp_path / "hf")
    torch.testing.assert_close(target(idx), source(idx), atol=1e-5, rtol=0)

    wrong = build_model(small(family="llama", n_kv_heads=4))
    with pytest.raises(ConfigError, match="n_kv_heads=2 but model.n_kv_heads=4"):
        load_init_weights(wrong, tmp_path / "hf")
    with pytest.raises(ConfigError, match="not a Hugging Face model directory"):
        load_init_weights(target, tmp_path)
