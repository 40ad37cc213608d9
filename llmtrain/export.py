"""Hugging Face interop: ``to_hf`` / ``from_hf`` convert models, ``load_init_weights`` starts a run
from HF weights (``model.init_from=PATH|ID``), ``apply_from_hf`` takes a run's architecture from an
HF config.json (``model.from_hf=PATH|ID``), and ``llmtrain-export RUN_DIR OUT_DIR`` turns a run's
newest checkpoint into a directory ``AutoModelForCausalLM`` and ``AutoTokenizer`` load.

Our parameter names mirror HF's, so LLaMA maps one to one (both use rotate-half RoPE). GPT-2 in
HF keeps q/k/v fused in ``c_attn`` and stores every projection as ``Conv1D`` ([in, out]), so its
matrices are concatenated and transposed on the way out.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from llmtrain.console import print_error
from llmtrain.errors import CheckpointError, ConfigError, UserError
from llmtrain.models import DecoderLM, ModelConfig, build_model, to_model_config
from llmtrain.models.llama import llama_ffn_hidden

# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def hf_config(cfg: ModelConfig):
    """The ``transformers`` config of the same architecture."""
    from transformers import GPT2Config, LlamaConfig

    if cfg.family == "llama":
        rope_scaling = None
        if cfg.rope_scaling:
            rope_scaling = {"rope_type": "llama3", **{k: float(v) if k != "original_max_position_embeddings" else int(v)
                                                      for k, v in cfg.rope_scaling.items() if k != "rope_type"}}
        return LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=llama_ffn_hidden(cfg),
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads or cfg.n_heads, max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, rope_scaling=rope_scaling,
            tie_word_embeddings=cfg.tie_embeddings, attention_dropout=cfg.dropout,
            initializer_range=cfg.init_std, hidden_act="silu", bos_token_id=None, eos_token_id=None,
        )
    if (cfg.n_kv_heads or cfg.n_heads) != cfg.n_heads:
        raise ConfigError("model.n_kv_heads", "GPT-2 in transformers has no grouped-query attention; use n_kv_heads: null")
    return GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=cfg.ffn_hidden, activation_function="gelu_new",
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        layer_norm_epsilon=cfg.norm_eps, initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None, eos_token_id=None,
    )


def _hf_rope(config, key: str) -> tuple[float, Optional[dict[str, Any]]]:
    """(rope_theta, LLaMA-3.1 scaling or None) from a transformers v4 or v5 LlamaConfig."""
    params = getattr(config, "rope_parameters", None)
    if params is None:  # transformers < 5
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", 10000.0))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(key, f"rope_type {rope_type!r} is not supported (only default and llama3)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {k: params[k] for k in keys}


def model_config_from_hf(config, key: str = "model.init_from") -> ModelConfig:
    """Our ModelConfig for a ``transformers`` LlamaConfig or GPT2Config; what does not map is an error on ``key``."""
    if config.model_type == "llama":
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise ConfigError(key, "LLaMA checkpoints with attention or MLP biases are not supported")
        head_dim = getattr(config, "head_dim", None)
        if head_dim not in (None, config.hidden_size // config.num_attention_heads):
            raise ConfigError(key, f"head_dim={head_dim} differs from hidden_size/num_heads; not supported")
        theta, scaling = _hf_rope(config, key)
        return ModelConfig(
            name=getattr(config, "name_or_path", "") or "hf_llama", family="llama",
            n_layers=config.num_hidden_layers, d_model=config.hidden_size, n_heads=config.num_attention_heads,
            n_kv_heads=config.num_key_value_heads, ffn_hidden=config.intermediate_size,
            vocab_size=config.vocab_size, max_seq_len=config.max_position_embeddings, rope_theta=theta,
            rope_scaling=scaling, tie_embeddings=bool(config.tie_word_embeddings), norm_eps=config.rms_norm_eps,
            dropout=float(config.attention_dropout or 0.0), init_std=config.initializer_range,
        )
    if config.model_type == "gpt2":
        if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(key, f"GPT-2 activation {config.activation_function!r} is not supported (gelu_new)")
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise ConfigError(key, "scale_attn_by_inverse_layer_idx is not supported")
        return ModelConfig(
            name=getattr(config, "name_or_path", "") or "hf_gpt2", family="gpt",
            n_layers=config.n_layer, d_model=config.n_embd, n_heads=config.n_head, n_kv_heads=None,
            ffn_hidden=config.n_inner, vocab_size=config.vocab_size, max_seq_len=config.n_positions,
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)), norm_eps=config.layer_norm_epsilon,
            dropout=float(config.resid_pdrop), init_std=config.initializer_range,
        )
    raise ConfigError(key, f"model_type {config.model_type!r} is not supported (llama, gpt2)")


# ---------------------------------------------------------------------------------------------
# State dicts
# ---------------------------------------------------------------------------------------------

_LLAMA_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{p}.weight": f"self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{f"mlp.{p}.weight": f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")},
}


def _llama_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["lm_head.weight"] if "lm_head.weight" in sd else sd["embed.weight"]}
    for i in range(cfg.n_layers):
        for ours, theirs in _LLAMA_NAMES.items():
            out[f"model.layers.{i}.{theirs}"] = sd[f"layers.{i}.{ours}"]
    return out


def _llama_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    out["lm_head.weight"] = sd["model.embed_tokens.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        for ours, theirs in _LLAMA_NAMES.items():
            out[f"layers.{i}.{ours}"] = sd[f"model.layers.{i}.{theirs}"]
    return out


def _gpt_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"transformer.wte.weight": sd["embed.weight"], "transformer.wpe.weight": sd["pos_embed.weight"],
           "transformer.ln_f.weight": sd["norm.weight"], "transformer.ln_f.bias": sd["norm.bias"],
           "lm_head.weight": sd["lm_head.weight"] if "lm_head.weight" in sd else sd["embed.weight"]}
    for i in range(cfg.n_layers):
        p, h = f"layers.{i}.", f"transformer.h.{i}."
        qkv = [f"{p}attn.{n}_proj" for n in "qkv"]
        out[h + "attn.c_attn.weight"] = torch.cat([sd[n + ".weight"] for n in qkv], 0).t().contiguous()
        out[h + "attn.c_attn.bias"] = torch.cat([sd[n + ".bias"] for n in qkv], 0)
        for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            out[h + theirs + ".weight"] = sd[p + ours + ".weight"].t().contiguous()
            out[h + theirs + ".bias"] = sd[p + ours + ".bias"]
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[h + theirs + ".weight"] = sd[p + ours + ".weight"]
            out[h + theirs + ".bias"] = sd[p + ours + ".bias"]
    return out


def _gpt_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"embed.weight": sd["transformer.wte.weight"], "pos_embed.weight": sd["transformer.wpe.weight"],
           "norm.weight": sd["transformer.ln_f.weight"], "norm.bias": sd["transformer.ln_f.bias"]}
    out["lm_head.weight"] = sd["transformer.wte.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        p, h = f"layers.{i}.", f"transformer.h.{i}."
        w = sd[h + "attn.c_attn.weight"].t()
        b = sd[h + "attn.c_attn.bias"]
        for j, n in enumerate("qkv"):
            rows = slice(j * cfg.d_model, (j + 1) * cfg.d_model)
            out[f"{p}attn.{n}_proj.weight"] = w[rows].contiguous()
            out[f"{p}attn.{n}_proj.bias"] = b[rows]
        for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            out[p + ours + ".weight"] = sd[h + theirs + ".weight"].t().contiguous()
            out[p + ours + ".bias"] = sd[h + theirs + ".bias"]
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[p + ours + ".weight"] = sd[h + theirs + ".weight"]
            out[p + ours + ".bias"] = sd[h + theirs + ".bias"]
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return (_llama_to_hf if cfg.family == "llama" else _gpt_to_hf)(sd, cfg)


def state_dict_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return (_llama_from_hf if cfg.family == "llama" else _gpt_from_hf)(sd, cfg)


def clean_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (torch.compile's ``_orig_mod.``, DDP's ``module.``)."""
    out = {}
    for key, value in sd.items():
        for prefix in ("_orig_mod.", "module."):
            key = key.replace(prefix, "")
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


@contextmanager
def _skip_hf_init():
    """Build an HF model without its random init (its weights are overwritten right after)."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4.x
    with no_init_weights():
        yield


def to_hf(model: DecoderLM):
    """A ``transformers`` GPT2LMHeadModel / LlamaForCausalLM with the same weights (and logits)."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    cfg = model.cfg
    config = hf_config(cfg)
    cls = LlamaForCausalLM if cfg.family == "llama" else GPT2LMHeadModel
    with _skip_hf_init():
        hf = cls(config)
    dtype = next(model.parameters()).dtype
    hf.to(dtype)
    sd = {k: v.detach() for k, v in clean_state_dict(model.state_dict()).items()}
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(sd, cfg), strict=False)
    # HF may list the tied head as missing (it follows wte), and GPT-2 its causal-mask buffers.
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings) and not k.endswith(".attn.bias")
               and not k.endswith(".attn.masked_bias")]
    if missing or unexpected:
        raise RuntimeError(f"HF conversion mismatch: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


def _materialise(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> DecoderLM:
    """Build on meta, allocate on CPU and load ``sd`` without paying for a random init."""
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    model.reset_buffers()
    model.load_state_dict(sd, strict=True)
    return model


def from_hf(hf_model) -> DecoderLM:
    """The llmtrain model of a ``transformers`` LlamaForCausalLM / GPT2LMHeadModel, same weights."""
    cfg = model_config_from_hf(hf_model.config)
    sd = state_dict_from_hf({k: v.detach() for k, v in hf_model.state_dict().items()}, cfg)
    dtype = next(hf_model.parameters()).dtype
    return _materialise(cfg, {k: v.float() for k, v in sd.items()}).to(dtype)


_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _from_pretrained(cls, path: Path, blame: Path, **kwargs):
    """``cls.from_pretrained(path)`` that never imports the folder's own code (``auto_map``); weights
    load as safetensors or with weights_only=True. A failure is a one-line CheckpointError on ``blame``."""
    from llmtrain.checkpoint_safety import quiet_load_warnings, reason

    try:
        with quiet_load_warnings():
            return cls.from_pretrained(path, trust_remote_code=False, **kwargs)
    except Exception as err:
        raise CheckpointError(str(blame), reason(err)) from None


_SHAPE_FIELDS = ("family", "n_layers", "d_model", "n_heads", "n_kv_heads", "vocab_size", "tie_embeddings")
# What ``model.from_hf`` takes from config.json: the architecture. Dropout and init_std are training choices.
ARCHITECTURE_FIELDS = ("family", "n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size",
                       "max_seq_len", "rope_theta", "rope_scaling", "tie_embeddings", "norm_eps")
# Weights of a hub model, safetensors first (no pickle, and often the only ones); consolidated/original
# layouts beside them are not downloaded.
_HUB_WEIGHTS = (["model*.safetensors", "model.safetensors.index.json"],
                ["pytorch_model*.bin", "pytorch_model.bin.index.json"])


def hf_folder(value: str, key: str, weights: bool) -> Path:
    """The local folder behind ``model.from_hf`` / ``model.init_from``: the path itself, or for a hub id
    the folder holding its config.json (and with ``weights`` its weights), from the hub or the HF cache."""
    from llmtrain.data.hub import hub_download, hub_reachable, is_hub_id

    path = Path(value).expanduser()
    if path.exists() or not is_hub_id(value):
        return path
    if not weights:
        return hub_download(value, key, filename="config.json").parent
    for patterns in _HUB_WEIGHTS:
        folder = hub_download(value, key, patterns=["config.json", "generation_config.json", *patterns])
        if any((folder / name).is_file() for name in _HF_WEIGHTS):
            return folder
    where = "on the hub" if hub_reachable() else "in the local Hugging Face cache (the hub is unreachable)"
    raise ConfigError(key, f"{value!r} has no weights llmtrain reads {where}: expected {', '.join(_HF_WEIGHTS)}")


def apply_from_hf(model_cfg: ModelConfig, overrides: Sequence[str] = ()) -> None:
    """Set ``model_cfg``'s architecture (and name) from its ``from_hf`` config.json, except the ``model.*``
    keys that ``overrides`` (the command line's) set: those win."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    explicit = {k[len("model."):] for k in keys if k.startswith("model.")}
    source = architecture_from_hf(model_cfg.from_hf)
    for field in ARCHITECTURE_FIELDS + ("name",):
        if field not in explicit:
            setattr(model_cfg, field, getattr(source, field))


def check_init_from(value: str) -> None:
    """A hub id in ``model.init_from`` can be had (in the HF cache, or the hub reachable and holding it):
    asked at start-up, so that a run fails in seconds rather than after preparing its data."""
    from llmtrain.data.hub import is_hub_id

    if is_hub_id(value):
        hf_folder(value, "model.init_from", weights=False)


def architecture_from_hf(value: str) -> ModelConfig:
    """The ModelConfig of the Hugging Face folder or hub id ``value`` (reads config.json only); its
    name is the hub id, or the folder's name."""
    from transformers import AutoConfig

    folder = hf_folder(value, "model.from_hf", weights=False)
    if not (folder / "config.json").is_file():
        raise ConfigError("model.from_hf", f"{folder} has no config.json; expected a Hugging Face model folder "
                                           f"or a hub id (org/name)")
    mcfg = model_config_from_hf(_from_pretrained(AutoConfig, folder, folder / "config.json"), "model.from_hf")
    mcfg.name = value if not Path(value).expanduser().exists() else Path(value).expanduser().resolve().name
    return mcfg


def load_init_weights(model: DecoderLM, path: str | Path) -> None:
    """Copy the weights at ``path`` into ``model`` (``model.init_from``): a Hugging Face model
    directory or hub id (downloaded through huggingface_hub, or taken from its cache offline), or an
    llmtrain checkpoint (``step_N``) or run directory (its newest checkpoint); only the weights are
    taken, so the run starts at step 0 with any optimizer.

    Call it on the unwrapped, materialised model before sharding. The architecture must match the
    run's ``model`` config; a mismatch names the first differing field.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    source = str(path)  # what the user named: a hub id's weights lie in the HF cache
    path = hf_folder(source, "model.init_from", weights=True)
    ckpt = _llmtrain_checkpoint(path)
    if ckpt is not None:
        return _load_checkpoint_weights(model, ckpt)
    if not (path / "config.json").is_file():
        raise ConfigError("model.init_from", f"{path} is not a Hugging Face model directory (no config.json), "
                                             f"nor an llmtrain checkpoint or run directory")
    hf_cfg = model_config_from_hf(_from_pretrained(AutoConfig, path, path / "config.json"))
    _check_same_shape(hf_cfg, model.cfg, source, hf=True)
    weights = next((path / name for name in _HF_WEIGHTS if (path / name).is_file()), path)
    hf = _from_pretrained(AutoModelForCausalLM, path, weights, dtype=torch.float32)
    sd = state_dict_from_hf({k: v.detach() for k, v in hf.state_dict().items()}, hf_cfg)
    model.load_state_dict(sd, strict=True)


def _llmtrain_checkpoint(path: Path) -> Optional[Path]:
    from llmtrain.checkpoint import MARKER, latest_checkpoint

    return path if (path / MARKER).is_file() else latest_checkpoint(path)


def _load_checkpoint_weights(model: DecoderLM, ckpt: Path) -> None:
    from omegaconf import OmegaConf

    from llmtrain.checkpoint import load_model_state

    saved = ckpt / "config.yaml"
    if saved.is_file():
        theirs = to_model_config(OmegaConf.to_container(OmegaConf.load(saved).model, resolve=True))
        _check_same_shape(theirs, model.cfg, ckpt)
    sd = clean_state_dict(load_model_state(ckpt))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise ConfigError("model.init_from", f"{ckpt}: its weights do not fit the model: {detail}") from None


def _check_same_shape(source: ModelConfig, ours: ModelConfig, path: str | Path, hf: bool = False) -> None:
    """The weights at ``path`` (architecture ``source``) fit the run's model; else name the first field."""
    pairs = {f: (getattr(source, f), getattr(ours, f)) for f in _SHAPE_FIELDS}
    pairs["n_kv_heads"] = (source.n_kv_heads or source.n_heads, ours.n_kv_heads or ours.n_heads)
    if ours.family == "llama":
        pairs["ffn_hidden"] = (llama_ffn_hidden(source), llama_ffn_hidden(ours))
    else:
        pairs["ffn_hidden"] = (source.ffn_hidden or 4 * source.d_model, ours.ffn_hidden or 4 * ours.d_model)
        pairs["max_seq_len"] = (source.max_seq_len, ours.max_seq_len)
    for field, (theirs, mine) in pairs.items():
        if theirs != mine:
            fix = f"set model.{field}={theirs}" + (" and data.pad_vocab_to_multiple_of=0 (padding grows the "
                                                  "embedding)" if field == "vocab_size" else "")
            raise ConfigError("model.init_from", f"{path} has {field}={theirs} but model.{field}={mine}; "
                                                 f"pick the matching model preset, "
                                                 f"{f'model.from_hf={path}, ' if hf else ''}or {fix}")


# ---------------------------------------------------------------------------------------------
# CLI: llmtrain-export RUN_DIR OUT_DIR
# ---------------------------------------------------------------------------------------------


def load_run_model(run_dir: str | Path) -> tuple[DecoderLM, Path]:
    """The model of a run directory at its newest complete checkpoint, and that checkpoint."""
    from omegaconf import OmegaConf

    from llmtrain.checkpoint import latest_checkpoint, load_model_state

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError("RUN_DIR", f"no such run directory: {run_dir}")
    if not (run_dir / "config.yaml").is_file():
        raise UserError("RUN_DIR", f"{run_dir} has no config.yaml; is it a llmtrain run directory?")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserError("RUN_DIR", f"{run_dir} has no complete checkpoint under checkpoints/")
    # The config the checkpoint was trained with (config.yaml is what runs now, maybe not yet saved).
    config_path = ckpt / "config.yaml" if (ckpt / "config.yaml").is_file() else run_dir / "config.yaml"
    cfg = OmegaConf.load(config_path)
    if "model" not in cfg:
        raise UserError("RUN_DIR", f"{config_path} has no model section")
    mcfg = to_model_config(OmegaConf.to_container(cfg.model, resolve=True))
    sd = clean_state_dict(load_model_state(ckpt))
    sd = {k: v.float() for k, v in sd.items() if not k.startswith("rope_")}
    if mcfg.tie_embeddings:
        sd.setdefault("lm_head.weight", sd.get("embed.weight"))
    try:
        model = _materialise(mcfg, sd)
    except RuntimeError as err:
        raise UserError(str(ckpt), f"weights do not match config.yaml's model: {str(err).splitlines()[0]}") from None
    return model, ckpt


def save_tokenizer(tokenizer_file: Path, out_dir: Path, hf_model: Optional[nn.Module] = None) -> None:
    """Wrap a ``tokenizers`` JSON as a PreTrainedTokenizerFast with its bos/eos/pad tokens."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    vocab = tok.get_vocab()
    special = {}
    for role, names in (("bos_token", ("<|bos|>", "<s>", "<|begin_of_text|>")),
                        ("eos_token", ("<|eos|>", "<|endoftext|>", "</s>", "<|end_of_text|>")),
                        ("pad_token", ("<|pad|>", "<pad>"))):
        found = next((n for n in names if n in vocab), None)
        if found:
            special[role] = found
    tok.add_special_tokens(special)
    tok.save_pretrained(str(out_dir))
    if hf_model is not None:
        for role, token in special.items():
            setattr(hf_model.config, role.replace("_token", "_token_id"), vocab[token])
            if getattr(hf_model, "generation_config", None) is not None:
                setattr(hf_model.generation_config, role.replace("_token", "_token_id"), vocab[token])


def export_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the newest checkpoint of ``run_dir`` as an HF model (+ tokenizer) into ``out_dir``."""
    model, ckpt = load_run_model(run_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = to_hf(model)
    tokenizer_file = Path(run_dir) / "tokenizer.json"
    if tokenizer_file.is_file():
        save_tokenizer(tokenizer_file, out_dir, hf)
    hf.save_pretrained(str(out_dir))
    return ckpt


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="llmtrain-export",
        description="Export a run's newest checkpoint as a Hugging Face model directory "
                    "(loadable with AutoModelForCausalLM / AutoTokenizer.from_pretrained).")
    parser.add_argument("run_dir", help="llmtrain run directory (holds config.yaml and checkpoints/)")
    parser.add_argument("out_dir", help="where to write the Hugging Face model")
    args = parser.parse_args(argv)
    try:
        ckpt = export_run(args.run_dir, args.out_dir)
    except UserError as err:
        print_error(err)
        sys.exit(2)
    print(f"exported {ckpt} -> {args.out_dir}")


if __name__ == "__main__":
    main()
