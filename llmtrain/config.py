"""Structured config: every key has a type and a default; validation gives one clear error per mistake.

Hydra composes YAML from configs/; ``load_config`` merges it onto these dataclasses (so a wrong
type or an unknown key is caught) and ``validate`` checks what types cannot express: value sets,
batch divisibility, file paths, optimizer hyperparameter names. Every failure raises
``ConfigError(key, what is accepted)``, which the CLI prints as one line and exits 2.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llmtrain.cpu_matmul import check_cpu_matmul
from llmtrain.data.config import DataConfig
from llmtrain.data.hub import is_hub_id
from llmtrain.errors import ConfigError, choices
from llmtrain.models.config import ModelConfig

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SCHEDULES = ("constant", "linear", "cosine", "wsd", "inv_sqrt", "cosine_restarts")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
STRATEGIES = ("auto", "none", "ddp", "zero1", "zero2", "fsdp", "hsdp")
WANDB_MODES = ("auto", "online", "offline", "disabled")
IMPLS = ("auto", "triton", "fused", "foreach", "eager")
FAMILIES = ("llama", "gpt")
CHECKPOINTING = ("none", "full", "selective")


@dataclass
class TrainConfig:
    max_steps: int = 200
    global_batch_size: int = 16      # sequences per optimizer step
    micro_batch_size: int = 16       # sequences per device per forward/backward
    seq_len: int = 128
    grad_clip: float = 1.0           # 0 disables clipping
    precision: str = "auto"          # auto | bf16 | fp16 | fp32
    seed: int = 1337
    eval_every: int = 50
    eval_steps: int = 10
    save_every: int = 100            # 0 = only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    compile: bool = False
    max_nonfinite_in_a_row: int = 5  # consecutive non-finite losses before the run stops
    sample_tokens: int = 200         # tokens of text generated at the end (0 = none)
    sample_prompt: str = "ROMEO:"
    progress_bar: bool = True
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    cpu_matmul: str = "auto"         # auto | onednn | aten: fp32 CPU linears, SOAP/Shampoo products (llmtrain.cpu_matmul)


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_ratio: float = 0.2         # wsd: share of total steps spent decaying
    decay_shape: str = "linear"      # wsd: linear | cosine | 1-sqrt
    num_cycles: int = 4              # cosine_restarts: hard restarts over the run


@dataclass
class DistributedConfig:
    strategy: str = "auto"
    world_size: Optional[int] = None  # only used by dry_run planning
    gpus_per_node: int = 8            # hsdp / planning: shard within a node
    timeout_s: int = 600
    grad_compression: str = "none"    # none | powersgd
    powersgd_rank: int = 4


@dataclass
class WandbConfig:
    mode: str = "auto"
    project: str = "llmtrain"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    plot: bool = True


@dataclass
class PlanConfig:
    gpu: str = "auto"                        # a name in llmtrain.hardware.GPUS; auto = this machine's (else h100_sxm_80gb)
    mfu: Union[float, str] = "auto"          # auto = modelled step time; a number in (0, 1] overrides it
    check: bool = True                       # refuse at start-up a run whose modelled memory cannot fit
    gpu_memory_gb: Optional[float] = None    # overrides the named GPU's memory (decimal GB)
    gpu_peak_tflops: Optional[float] = None  # overrides its dense bf16 peak
    inter_node_gbps: Optional[float] = None  # overrides its network bandwidth per GPU between nodes


@dataclass
class RootConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # Optimizer hyperparameters differ per optimizer, so this group is an open dict checked
    # against the chosen optimizer's constructor signature in ``validate``.
    optim: dict[str, Any] = field(default_factory=lambda: {"name": "adamw", "lr": 3e-4})
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    resume: str = "auto"              # auto | never | PATH
    dry_run: bool = False
    run_dir: Optional[str] = None     # default: Hydra's output dir (outputs/DATE/TIME)
    experiment: Optional[str] = None  # set by experiment files, for the record


# Keys every optimizer config may carry besides its constructor's own arguments:
# they shape parameter groups (llmtrain.optim.build_optimizer), not the update rule.
OPTIM_GROUP_KEYS = {
    "name", "lr", "impl", "weight_decay", "no_decay_bias", "no_decay_norm", "no_decay_embedding",
    "lr_multipliers", "lr_scale", "adamw_lr", "adamw_betas", "adamw_eps", "adamw_weight_decay", "base",
}


def _one_line(err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = str(getattr(err, "msg", None) or err).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        return ConfigError(key or "config", f"unknown key{' under ' + parent if parent else ''}")
    return ConfigError(key or "config", msg)


def _unknown_key(node: Any, schema: type, prefix: str = "") -> Optional[tuple[str, list[str]]]:
    """The first key of ``node`` that ``schema`` (a dataclass) does not define, with the keys it does.
    Fields typed as dicts (``optim``, ``model.extra``) are open; ``+key=value`` cannot sneak past this."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    for key in node:
        if key not in hints:
            return f"{prefix}{key}", names
        child = node[key] if isinstance(node, (dict, DictConfig)) else None
        if dataclasses.is_dataclass(hints[key]) and isinstance(child, (dict, DictConfig)):
            found = _unknown_key(child, hints[key], f"{prefix}{key}.")
            if found:
                return found
    return None


def load_config(cfg: DictConfig | dict, overrides: Sequence[str] = ()) -> RootConfig:
    """Merge a composed config onto the schema, apply ``model.from_hf`` (``overrides``, the command
    line's, say which model keys the user set and keep) and validate it; raises ConfigError."""
    unknown = _unknown_key(cfg, RootConfig)
    if unknown:
        key, known = unknown
        raise ConfigError(key, f"unknown key; expected {choices(known)}")
    schema = OmegaConf.structured(RootConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
        obj: RootConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise _one_line(err) from None
    if obj.model.from_hf:
        from llmtrain.export import apply_from_hf

        _check_hf_sources(obj.model)
        apply_from_hf(obj.model, overrides)
    validate(obj)
    return obj


def _check_choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(key, f"got {value!r}, expected {choices(allowed)}")


def _check_positive(key: str, value, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"got {value!r}, expected {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: RootConfig, dp_world_size: int = 1) -> None:
    """Cross-field checks; raises ConfigError naming the key and what it accepts."""
    t = cfg.train
    for key in ("max_steps", "global_batch_size", "micro_batch_size", "seq_len", "log_every"):
        _check_positive(f"train.{key}", getattr(t, key))
    for key in ("eval_every", "eval_steps", "save_every", "max_nonfinite_in_a_row", "sample_tokens"):
        _check_positive(f"train.{key}", getattr(t, key), allow_zero=True)
    _check_positive("train.grad_clip", t.grad_clip, allow_zero=True)
    _check_choice("train.precision", t.precision, PRECISIONS)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(t.device)):
        raise ConfigError("train.device", f"got {t.device!r}, expected auto, cpu, cuda or cuda:N")
    check_cpu_matmul(t.cpu_matmul)
    per_step = t.micro_batch_size * dp_world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            "train.global_batch_size",
            f"{t.global_batch_size} is not divisible by train.micro_batch_size x data-parallel ranks"
            f" = {t.micro_batch_size} x {dp_world_size}; use a multiple of {per_step}",
        )

    m = cfg.model
    _check_choice("model.family", m.family, FAMILIES)
    _check_choice("model.activation_checkpointing", m.activation_checkpointing, CHECKPOINTING)
    for key in ("n_layers", "d_model", "n_heads", "vocab_size", "max_seq_len"):
        _check_positive(f"model.{key}", getattr(m, key))
    if m.d_model % m.n_heads:
        raise ConfigError("model.n_heads", f"{m.n_heads} does not divide model.d_model={m.d_model}")
    if m.n_kv_heads is not None and (m.n_kv_heads <= 0 or m.n_heads % m.n_kv_heads):
        raise ConfigError("model.n_kv_heads", f"{m.n_kv_heads} must be > 0 and divide model.n_heads={m.n_heads}")
    if t.seq_len > m.max_seq_len:
        raise ConfigError("train.seq_len", f"{t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    _check_hf_sources(m)

    s = cfg.schedule
    _check_choice("schedule.name", s.name, SCHEDULES)
    _check_choice("schedule.decay_shape", s.decay_shape, DECAY_SHAPES)
    _check_positive("schedule.warmup_steps", s.warmup_steps, allow_zero=True)
    if not 0.0 <= s.min_lr_ratio <= 1.0:
        raise ConfigError("schedule.min_lr_ratio", f"got {s.min_lr_ratio}, expected a value in [0, 1]")
    if not 0.0 <= s.decay_ratio <= 1.0:
        raise ConfigError("schedule.decay_ratio", f"got {s.decay_ratio}, expected a value in [0, 1]")

    _check_choice("distributed.strategy", cfg.distributed.strategy, STRATEGIES)
    _check_choice("distributed.grad_compression", cfg.distributed.grad_compression, ("none", "powersgd"))
    _check_choice("logger.wandb.mode", cfg.logger.wandb.mode, WANDB_MODES)
    if cfg.resume not in ("auto", "never") and not os.path.exists(cfg.resume):
        raise ConfigError("resume", f"no such checkpoint: {cfg.resume} (expected auto, never or an existing path)")

    _validate_data(cfg.data)
    if cfg.data.val_fraction == 0 and t.eval_every > 0:
        raise ConfigError("data.val_fraction", "is 0, so there is no validation split; set it > 0 or train.eval_every=0")
    validate_optim(cfg.optim)


def _check_hf_sources(m: ModelConfig) -> None:
    """``model.init_from`` / ``model.from_hf``: an existing path, or shaped like a hub id (org/name)."""
    for key, value in (("model.init_from", m.init_from), ("model.from_hf", m.from_hf)):
        if value is not None and not os.path.exists(os.path.expanduser(value)) and not is_hub_id(value):
            raise ConfigError(key, f"no such file or directory: {value}; expected a local path or a Hugging Face "
                                   f"hub id (org/name)")


def _validate_data(d: DataConfig) -> None:
    for i, src in enumerate(d.sources):
        path = src.get("path") if isinstance(src, dict) else src
        if not path:
            raise ConfigError(f"data.sources[{i}]", "each source needs a path (a file, glob or dataset name)")
        if isinstance(src, dict) and src.get("type") == "hf":
            continue
        import glob

        if not glob.glob(os.path.expanduser(str(path))):
            raise ConfigError(f"data.sources[{i}].path", f"no such file: {path}")
    _check_choice("data.on_bad_utf8", d.on_bad_utf8, ("skip", "error"))
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError("data.val_fraction", f"got {d.val_fraction}, expected a value in [0, 1)")


def validate_optim(optim: dict[str, Any]) -> None:
    """The optimizer name must be registered and every key a constructor or group argument."""
    from llmtrain.optim import OPTIMIZERS

    name = optim.get("name")
    if name not in OPTIMIZERS:
        raise ConfigError("optim.name", f"got {name!r}, expected {choices(sorted(OPTIMIZERS))}")
    if "impl" in optim:
        # Any implementation name some optimizer has; the class itself says which of them it runs.
        _check_choice("optim.impl", optim["impl"], IMPLS + ("bnb",))
    lr = optim.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr < 0:
        raise ConfigError("optim.lr", f"got {lr!r}, expected a number >= 0")
    from llmtrain.optim.param_groups import accepted_keys

    accepted = accepted_keys(optim)  # constructor args + OPTIM_GROUP_KEYS (+ a wrapper's base's, for sam)
    for key in optim:
        if key not in accepted:
            raise ConfigError(f"optim.{key}", f"not a hyperparameter of {name}; expected {choices(sorted(accepted))}")
