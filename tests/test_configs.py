"""Every shipped config composes and validates; the default job is the tiny_shakespeare experiment."""

from __future__ import annotations

import dataclasses

import pytest

from llmtrain.cli import compose
from llmtrain.errors import ConfigError

from conftest import REPO


def _names(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "configs" / group).glob("*.yaml"))


def test_default_job_is_tiny_shakespeare():
    default = dataclasses.asdict(compose([]))
    experiment = dataclasses.asdict(compose(["+experiment=tiny_shakespeare"]))
    experiment.pop("experiment"), default.pop("experiment")
    assert default == experiment


@pytest.mark.parametrize("name", _names("experiment"))
def test_experiment_composes(name):
    cfg = compose([f"+experiment={name}"])
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0


@pytest.mark.parametrize("group", ["model", "optim", "schedule", "distributed", "logger", "data"])
def test_group_options_compose(group):
    names = _names(group)
    assert names, group
    for name in names:
        compose([f"{group}={name}"])


def test_llama7b_recipe():
    cfg = compose(["+experiment=llama7b_adamw"])
    assert cfg.model.name == "llama2_7b" and cfg.distributed.strategy == "fsdp"
    assert cfg.optim["lr"] == 3e-4 and list(cfg.optim["betas"]) == [0.9, 0.95]
    assert cfg.optim["eps"] == 1e-5 and cfg.optim["weight_decay"] == 0.1  # Llama 2 section 2.2 (was 1e-8)
    assert cfg.train.grad_clip == 1.0 and cfg.train.precision == "bf16"
    assert cfg.schedule.name == "cosine" and cfg.schedule.warmup_steps == 2000 and cfg.schedule.min_lr_ratio == 0.1


def test_tuned_lr_applies_only_to_its_model_and_optimizer():
    assert compose([]).optim["lr"] == 2e-3                          # tuned/llama_tiny_adamw.yaml
    assert compose(["model=gpt2_124m"]).optim["lr"] == 3e-4         # adamw.yaml reference default
    assert compose(["optim=lion"]).optim["lr"] != 2e-3
    assert compose(["optim.lr=0.01"]).optim["lr"] == 0.01           # the command line wins


def test_lr_scale_scales_every_group():
    import torch

    from llmtrain.models import build_model
    from llmtrain.optim import build_optimizer

    cfg = compose(["optim=muon", "optim.lr_scale=3", "model.n_layers=1", "model.d_model=32", "model.n_heads=2",
                   "model.n_kv_heads=1", "data.vocab_size=64"])
    model = build_model(cfg.model)
    scaled = build_optimizer(cfg, model)
    cfg.optim.pop("lr_scale")
    plain = build_optimizer(cfg, model)
    for a, b in zip(scaled.param_groups, plain.param_groups):
        assert a["initial_lr"] == pytest.approx(3 * b["initial_lr"])
    assert isinstance(scaled, torch.optim.Optimizer)
    with pytest.raises(ConfigError, match="optim.lr_scale"):
        build_optimizer({"name": "adamw", "lr": 1e-3, "lr_scale": -1}, model)
