"""Model zoo: shapes, causality, preset parameter counts, meta-device init, checkpointing, KV cache."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from llmtrain.errors import ConfigError
from llmtrain.models import ModelConfig, build_model
from llmtrain.models.layers import rope_inv_freq, sample_next, swiglu_hidden

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"

PUBLISHED = {
    "gpt2_124m": 124_439_808,
    "gpt2_350m": 354_823_168,
    "gpt2_774m": 774_030_080,
    "gpt2_1558m": 1_557_611_200,
    "llama2_7b": 6_738_415_616,
    "llama2_13b": 13_015_864_320,
    "llama2_70b": 68_976_648_192,
    "llama3_8b": 8_030_261_248,
    "llama3_70b": 70_553_706_496,
    "llama_1b": 1_235_814_400,  # Llama-3.2-1B
    # llama_tiny with a 4096-token vocabulary, tied: 4096*256 + 4*(4*256*256 - 2*256*128 + 3*256*768 + 2*256) + 256
    "llama_tiny": 4_196_608,
}


def tiny(family: str, **kw) -> ModelConfig:
    base = dict(family=family, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2 if family == "llama" else None,
                vocab_size=61, max_seq_len=24, tie_embeddings=family == "gpt")
    base.update(kw)
    return ModelConfig(**base)


def load_preset(path: Path) -> dict:
    cfg = OmegaConf.merge({"data": {"vocab_size": 4096}}, {"model": OmegaConf.load(path)})
    return OmegaConf.to_container(cfg.model, resolve=True)


def test_every_preset_is_tested_and_named_after_its_file():
    files = sorted(CONFIG_DIR.glob("*.yaml"))
    assert {f.stem for f in files} == set(PUBLISHED)
    for f in files:
        assert OmegaConf.load(f).name == f.stem


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count_matches_published(name):
    with torch.device("meta"):
        model = build_model(load_preset(CONFIG_DIR / f"{name}.yaml"))
    assert model.num_params() == PUBLISHED[name]


def test_llama_ffn_rule():
    assert swiglu_hidden(4096, 256, None) == 11008
    assert swiglu_hidden(8192, 4096, 1.3) == 28672
    assert swiglu_hidden(4096, 1024, 1.3) == 14336


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_forward_shape_and_causality(family):
    torch.manual_seed(0)
    model = build_model(tiny(family)).eval()
    idx = torch.randint(0, 61, (3, 20))
    logits = model(idx)
    assert logits.shape == (3, 20, 61) and logits.dtype == torch.float32
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, 61, (3, 8))
    logits2 = model(changed)
    torch.testing.assert_close(logits[:, :12], logits2[:, :12])
    assert not torch.allclose(logits[:, 12:], logits2[:, 12:])


def test_build_model_accepts_dicts_and_rejects_bad_fields():
    model = build_model({"family": "gpt", "n_layers": 1, "d_model": 16, "n_heads": 2, "vocab_size": 11, "max_seq_len": 8})
    assert model.cfg.family == "gpt"
    with pytest.raises(ConfigError, match="model.family"):
        build_model(dict(family="mamba"))
    with pytest.raises(ConfigError, match="n_kv_heads"):
        build_model(dict(family="llama", n_heads=8, n_kv_heads=3))
    with pytest.raises(ConfigError):
        build_model(dict(family="llama", n_layerz=3))


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_meta_build_then_to_empty_and_init_weights(family):
    cfg = tiny(family, tie_embeddings=True)
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    assert model.lm_head.weight is model.embed.weight
    torch.manual_seed(0)
    model.init_weights()
    eager = build_model(cfg)
    torch.manual_seed(0)
    eager.init_weights()  # constructors draw from the RNG too; re-init from the same seed
    for (name, a), (_, b) in zip(model.state_dict().items(), eager.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    idx = torch.randint(0, 61, (2, 10))
    torch.testing.assert_close(model(idx), eager(idx))


def test_gpt_init_scales_residual_projections():
    torch.manual_seed(0)
    model = build_model(tiny("gpt", n_layers=8, d_model=256, n_heads=4))
    std = model.layers[0].attn.o_proj.weight.std().item()
    assert abs(std - 0.02 / 4.0) < 0.0005  # 0.02 / sqrt(2 * 8)
    assert abs(model.layers[0].attn.q_proj.weight.std().item() - 0.02) < 0.001
    assert model.layers[0].attn.q_proj.bias.abs().sum() == 0


def test_num_params_excludes_embeddings():
    model = build_model(tiny("gpt", tie_embeddings=True))
    assert model.num_params() - model.num_params(exclude_embeddings=True) == 61 * 32 + 24 * 32
    untied = build_model(tiny("llama", tie_embeddings=False))
    assert untied.num_params() - untied.num_params(exclude_embeddings=True) == 61 * 32


@pytest.mark.parametrize("family", ["llama", "gpt"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_same_grads(family, mode):
    torch.manual_seed(0)
    plain = build_model(tiny(family, n_layers=3))
    ckpt = copy.deepcopy(plain)
    ckpt.cfg = ModelConfig(**{**plain.cfg.__dict__, "activation_checkpointing": mode})
    idx = torch.randint(0, 61, (2, 16))
    for m in (plain, ckpt):
        m(idx).float().logsumexp(-1).mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_checkpointing_modes_pick_blocks():
    model = build_model(tiny("llama", n_layers=4, activation_checkpointing="selective"))
    assert [model._checkpointed(i) for i in range(4)] == [True, False, True, False]
    model.cfg.activation_checkpointing = "full"
    assert all(model._checkpointed(i) for i in range(4))
    model.eval()
    assert not any(model._checkpointed(i) for i in range(4))


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_kv_cache_greedy_equals_uncached(family):
    torch.manual_seed(0)
    model = build_model(tiny(family, init_std=0.2))
    prompt = torch.randint(0, 61, (2, 5))
    # 30 new tokens run past max_seq_len=24, exercising the sliding-window fallback too.
    cached = model.generate(prompt, 30, temperature=0)
    uncached = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert cached.shape == (2, 35)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :5], prompt)


def test_kv_cache_continuation_matches_full_forward():
    torch.manual_seed(0)
    model = build_model(tiny("llama")).eval()
    from llmtrain.models import KVCache

    idx = torch.randint(0, 61, (2, 12))
    cache = KVCache(len(model.layers), 12)
    parts = [model(idx[:, :5], cache), model(idx[:, 5:9], cache), model(idx[:, 9:], cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), model(idx), atol=1e-5, rtol=1e-5)


def test_sampling_is_seeded_and_filters():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_next(logits, top_k=1, generator=g).item() == 2
        assert sample_next(logits, top_p=0.5, generator=g).item() == 2
        assert sample_next(logits, top_k=2, generator=g).item() in (2, 3)
    model = build_model(tiny("gpt"))
    prompt = torch.zeros(1, 3, dtype=torch.long)
    a = model.generate(prompt, 8, temperature=0.8, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 8, temperature=0.8, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_llama31_rope_scaling_matches_reference_rule():
    plain = rope_inv_freq(64, 500000.0)
    scaled = rope_inv_freq(64, 500000.0, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    wavelen = 2 * torch.pi / plain
    high = wavelen < 8192 / 4
    low = wavelen > 8192 / 1
    torch.testing.assert_close(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / 8)
    mid = ~high & ~low
    assert mid.any() and torch.all(scaled[mid] < plain[mid]) and torch.all(scaled[mid] > plain[mid] / 8)


def test_forward_rejects_sequences_past_max_seq_len():
    model = build_model(tiny("llama"))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 25, dtype=torch.long))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_compiles_without_graph_breaks(family):
    """train.compile relies on one graph per forward, checkpointed blocks included."""
    model = build_model(tiny(family, activation_checkpointing="selective"))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    idx = torch.randint(0, 61, (2, 16))
    out = compiled(idx)
    out.sum().backward()
    torch.testing.assert_close(out, model(idx))
