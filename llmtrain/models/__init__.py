"""Model zoo: ``build_model(cfg)`` returns a GPT or LLaMA decoder (presets in configs/model/)."""

from __future__ import annotations

from typing import Any, Mapping, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llmtrain.errors import ConfigError, choices
from llmtrain.models.base import DecoderLM
from llmtrain.models.config import ModelConfig
from llmtrain.models.gpt import GPT
from llmtrain.models.layers import KVCache
from llmtrain.models.llama import Llama

FAMILIES: dict[str, type[DecoderLM]] = {"llama": Llama, "gpt": GPT}

__all__ = ["FAMILIES", "GPT", "DecoderLM", "KVCache", "Llama", "ModelConfig", "build_model", "to_model_config"]


def to_model_config(cfg: Union[ModelConfig, Mapping[str, Any], DictConfig]) -> ModelConfig:
    """A ModelConfig from a ModelConfig, a plain dict or a DictConfig (unknown keys are errors)."""
    if isinstance(cfg, ModelConfig):
        return cfg
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "model"
        raise ConfigError(f"model.{key}" if not str(key).startswith("model") else key,
                          str(getattr(err, "msg", err)).splitlines()[0]) from None


def build_model(cfg: Union[ModelConfig, Mapping[str, Any], DictConfig]) -> DecoderLM:
    """Build the model described by ``cfg`` on the current default device.

    Under ``with torch.device("meta"):`` nothing is allocated; materialise later with
    ``model.to_empty(device=...)`` followed by ``model.init_weights()``.
    """
    mcfg = to_model_config(cfg)
    if mcfg.family not in FAMILIES:
        raise ConfigError("model.family", f"got {mcfg.family!r}, expected {choices(FAMILIES)}")
    if mcfg.d_model % mcfg.n_heads:
        raise ConfigError("model.n_heads", f"{mcfg.n_heads} does not divide model.d_model={mcfg.d_model}")
    kv = mcfg.n_kv_heads or mcfg.n_heads
    if mcfg.n_heads % kv:
        raise ConfigError("model.n_kv_heads", f"{kv} must divide model.n_heads={mcfg.n_heads}")
    if mcfg.activation_checkpointing not in ("none", "full", "selective"):
        raise ConfigError("model.activation_checkpointing",
                          f"got {mcfg.activation_checkpointing!r}, expected {choices(('none', 'full', 'selective'))}")
    return FAMILIES[mcfg.family](mcfg)
