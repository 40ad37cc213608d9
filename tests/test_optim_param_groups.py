"""build_optimizer: weight-decay groups, lr multipliers, hybrid groups, config errors."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from llmtrain.errors import ConfigError
from llmtrain.models import build_model
from llmtrain.optim import OPTIMIZERS, build_optimizer
from llmtrain.optim.adam import AdamW
from llmtrain.optim.param_groups import classify_parameters


def tiny(family="llama", tie=True):
    return build_model(dict(name="t", family=family, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2 if family == "llama" else None,
                            vocab_size=64, max_seq_len=16, tie_embeddings=tie))


def ids(group):
    return {id(p) for p in group["params"]}


@pytest.mark.parametrize("family", ["llama", "gpt"])
@pytest.mark.parametrize("tie", [True, False])
def test_no_decay_on_bias_norm_embedding(family, tie):
    model = tiny(family, tie)
    opt = build_optimizer({"name": "adamw", "lr": 1e-3, "weight_decay": 0.1}, model)
    kinds = classify_parameters(model)
    decayed = set().union(*(ids(g) for g in opt.param_groups if g["weight_decay"] > 0))
    for name, (kind, p) in kinds.items():
        assert (id(p) in decayed) == (kind in ("hidden", "head")), (name, kind)
    assert {k for k, _ in kinds.values()} >= {"embedding", "norm", "hidden"}
    assert ("head" in {k for k, _ in kinds.values()}) == (not tie)
    if family == "gpt":
        assert "bias" in {k for k, _ in kinds.values()}
    # every parameter exactly once
    all_ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(model.parameters()))
    for g in opt.param_groups:
        assert g["initial_lr"] == g["lr"] == 1e-3


def test_no_decay_switches_off():
    model = tiny("gpt", tie=False)
    opt = build_optimizer({"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "no_decay_bias": False,
                           "no_decay_norm": False, "no_decay_embedding": False}, model)
    assert all(g["weight_decay"] == 0.1 for g in opt.param_groups)


def test_lr_multipliers_first_match_wins():
    model = tiny()
    opt = build_optimizer({"name": "adamw", "lr": 1e-3, "lr_multipliers": {r"layers\.0\.": 0.5, r"attn|attention": 2.0}}, model)
    named = dict(model.named_parameters())
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in named.items():
        expected = 0.5e-3 if "layers.0." in name else (2e-3 if ("attn" in name or "attention" in name) else 1e-3)
        assert lr_of[id(p)] == pytest.approx(expected), name
    assert any("attn" in n or "attention" in n for n in named)


class _Hybrid(AdamW):
    hybrid_flag = "use_matrix"

    def __init__(self, params, lr=1e-3, adamw_betas=(0.9, 0.95), adamw_eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr=lr, weight_decay=weight_decay)


def test_hybrid_groups(monkeypatch):
    monkeypatch.setitem(OPTIMIZERS, "hybrid_test", _Hybrid)
    model = tiny(tie=False)
    opt = build_optimizer({"name": "hybrid_test", "lr": 0.02, "adamw_lr": 1e-3, "weight_decay": 0.1,
                           "adamw_betas": [0.8, 0.9], "adamw_eps": 1e-10}, model)
    kinds = {id(p): k for k, p in classify_parameters(model).values()}
    for g in opt.param_groups:
        for p in g["params"]:
            assert g["use_matrix"] == (kinds[id(p)] == "hidden")
        if g["use_matrix"]:
            assert g["lr"] == g["initial_lr"] == 0.02 and g["weight_decay"] == 0.1
        else:
            assert g["lr"] == g["initial_lr"] == 1e-3
            assert g["adamw_betas"] == (0.8, 0.9) and g["adamw_eps"] == 1e-10
    head = model.lm_head.weight
    assert kinds[id(head)] == "head"


def test_accepts_root_config_like_and_dictconfig():
    model = tiny()

    class Root:
        optim = OmegaConf.create({"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.95]})

    opt = build_optimizer(Root(), model)
    assert isinstance(opt, AdamW) and opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_errors_name_the_key():
    model = tiny()
    with pytest.raises(ConfigError, match=r"optim.name: got 'nope', expected one of: .*adamw"):
        build_optimizer({"name": "nope", "lr": 1e-3}, model)
    with pytest.raises(ConfigError, match=r"optim.momentum: .*expected one of: .*betas"):
        build_optimizer({"name": "adamw", "lr": 1e-3, "momentum": 0.9}, model)
    with pytest.raises(ConfigError, match=r"optim.lr"):
        build_optimizer({"name": "adamw", "lr": "fast"}, model)
    with pytest.raises(ConfigError, match=r"optim.lr_multipliers"):
        build_optimizer({"name": "adamw", "lr": 1e-3, "lr_multipliers": {"(": 2.0}}, model)
    with pytest.raises(ConfigError, match=r"optim"):
        build_optimizer({"name": "adamw", "lr": 1e-3, "betas": [0.9, 1.5]}, model)
    with pytest.raises(ConfigError, match=r"optim.impl: shampoo has one implementation"):
        build_optimizer({"name": "shampoo", "lr": 1e-3, "impl": "triton"}, model)
    build_optimizer({"name": "shampoo", "lr": 1e-3, "impl": "auto"}, model)
    with pytest.raises(ConfigError, match=r"optim.impl: got 'triton' for sgd"):
        build_optimizer({"name": "sgd", "lr": 1e-3, "impl": "triton"}, model)


def test_model_argument_is_passed(monkeypatch):
    seen = {}

    class NeedsModel(AdamW):
        def __init__(self, params, lr=1e-3, model=None):
            seen["model"] = model
            super().__init__(params, lr=lr)

    monkeypatch.setitem(OPTIMIZERS, "needs_model", NeedsModel)
    model = tiny()
    build_optimizer({"name": "needs_model", "lr": 1e-3}, model)
    assert seen["model"] is model
