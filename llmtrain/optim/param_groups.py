"""Build an optimizer from the ``optim`` config: parameter groups, then ``OPTIMIZERS[name](groups, ...)``.

Parameters are classified by the module that owns them, not by fragile names:

- ``embedding``: weights of ``nn.Embedding`` modules (a tied output head counts as embedding);
- ``head``: the output projection (``model.output`` / ``model.lm_head``, or a Linear whose weight is
  ``[vocab, d_model]`` for an embedding of ``vocab`` rows);
- ``norm``: parameters of normalisation layers (LayerNorm, RMSNorm, any ``*Norm`` module);
- ``bias``: biases and any other parameter with fewer than two dimensions;
- ``hidden``: every other weight (attention and MLP matrices).

Weight decay is off for biases, norms and embeddings unless ``no_decay_bias`` /
``no_decay_norm`` / ``no_decay_embedding`` is false. ``lr_multipliers: {regex: mult}`` scales the
lr of parameters whose qualified name matches (first match wins). Matrix optimizers (classes with
a ``hybrid_flag`` attribute such as Muon's ``use_muon``) get the 2-D hidden weights; everything
else goes to an AdamW group inside the same optimizer with ``adamw_lr`` (default: the class's
``default_adamw_lr``, else ``lr``), ``adamw_betas``,
``adamw_eps`` and ``adamw_weight_decay``. Every group carries ``initial_lr`` (its peak lr): the
trainer sets ``group["lr"] = group["initial_lr"] * lr_factor(step)``.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch
from torch import nn

from llmtrain.config import OPTIM_GROUP_KEYS
from llmtrain.errors import ConfigError, choices

# Keys that shape parameter groups rather than the update rule (validation uses the same set).
GROUP_KEYS = OPTIM_GROUP_KEYS



def _optim_mapping(cfg: Any) -> dict[str, Any]:
    optim = cfg.optim if hasattr(cfg, "optim") and not isinstance(cfg, dict) else cfg
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(optim, DictConfig):
            optim = OmegaConf.to_container(optim, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(optim, dict):
        raise ConfigError("optim", f"expected a mapping with at least 'name' and 'lr', got {type(optim).__name__}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in optim.items()}


def _signature_keys(cls: type) -> tuple[set[str], bool]:
    params = inspect.signature(cls.__init__).parameters
    names = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self", "params"}
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return names, takes_kwargs


def accepted_keys(optim: dict[str, Any]) -> set[str]:
    """Every key ``optim`` may carry for its ``name`` (constructor arguments plus group keys).

    A wrapper (SAM) that forwards ``**kwargs`` to ``optim.base`` also accepts the base's keys.
    """
    from llmtrain.optim.registry import OPTIMIZERS

    cls = lookup(optim.get("name"))
    own, takes_kwargs = _signature_keys(cls)
    return (own | GROUP_KEYS | _base_keys(optim, cls, own, takes_kwargs)) - {"model"}


def _base_keys(optim: dict[str, Any], cls: type, own: set[str], takes_kwargs: bool) -> set[str]:
    """Constructor arguments of a wrapper's base optimizer (``optim.base``), forwarded as kwargs."""
    from llmtrain.optim.registry import OPTIMIZERS

    if not (takes_kwargs and "base" in own):
        return set()
    base = optim.get("base") or inspect.signature(cls.__init__).parameters["base"].default
    if base not in OPTIMIZERS:
        raise ConfigError("optim.base", f"got {base!r}, expected {choices(sorted(OPTIMIZERS))}")
    return _signature_keys(OPTIMIZERS[base])[0] - {"model"}


def lookup(name: Any) -> type[torch.optim.Optimizer]:
    from llmtrain.optim.registry import OPTIMIZERS

    if name not in OPTIMIZERS:
        raise ConfigError("optim.name", f"got {name!r}, expected {choices(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[name]


def _is_norm(module: nn.Module) -> bool:
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, getattr(nn, "RMSNorm", nn.LayerNorm))
    return isinstance(module, norm_types) or type(module).__name__.lower().endswith("norm")


def _output_head(model: nn.Module, vocab_sizes: set[int]) -> nn.Module | None:
    for attr in ("output", "lm_head"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            return head
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.out_features in vocab_sizes:
            return module
    return None


def classify_parameters(model: nn.Module) -> dict[str, tuple[str, nn.Parameter]]:
    """``{qualified name: (kind, parameter)}`` for every trainable parameter, each tensor once."""
    vocab_sizes = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}
    head = _output_head(model, vocab_sizes)
    kinds: dict[int, str] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if isinstance(module, nn.Embedding):
                kinds.setdefault(id(p), "embedding")
            elif module is head and p.ndim >= 2:
                kinds.setdefault(id(p), "head")
            elif _is_norm(module):
                kinds.setdefault(id(p), "norm")
    out: dict[str, tuple[str, nn.Parameter]] = {}
    for name, p in model.named_parameters():  # named_parameters() yields a tied tensor once
        if not p.requires_grad:
            continue
        kind = kinds.get(id(p)) or ("bias" if p.ndim < 2 else "hidden")
        out[name] = (kind, p)
    return out


def _lr_multiplier(name: str, patterns: list[tuple[re.Pattern, float]]) -> float:
    for pattern, mult in patterns:
        if pattern.search(name):
            return mult
    return 1.0


def _compile_multipliers(spec: Any) -> list[tuple[re.Pattern, float]]:
    if not spec:
        return []
    if not isinstance(spec, dict):
        raise ConfigError("optim.lr_multipliers", "expected a mapping {regex: multiplier}")
    out = []
    for pattern, mult in spec.items():
        try:
            out.append((re.compile(str(pattern)), float(mult)))
        except re.error as err:
            raise ConfigError("optim.lr_multipliers", f"bad regex {pattern!r}: {err}") from None
        except (TypeError, ValueError):
            raise ConfigError("optim.lr_multipliers", f"multiplier for {pattern!r} must be a number, got {mult!r}") from None
    return out


def _lr_scale(optim: dict[str, Any]) -> float:
    """``lr_scale`` multiplies every group's lr: one knob for per-optimizer lr grids in a sweep
    (``llmtrain -m optim=adamw,lion optim.lr_scale=0.3,1,3`` tries each optimizer around its own lr)."""
    scale = optim.get("lr_scale", 1.0)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
        raise ConfigError("optim.lr_scale", f"got {scale!r}, expected a number > 0")
    return float(scale)


def param_groups(optim: dict[str, Any], model: nn.Module, cls: type) -> list[dict[str, Any]]:
    """The parameter groups ``build_optimizer`` hands to ``cls`` (see the module docstring)."""
    scale = _lr_scale(optim)
    lr = float(optim["lr"]) * scale
    signature_defaults = {
        n: p.default for n, p in inspect.signature(cls.__init__).parameters.items() if p.default is not p.empty
    }
    weight_decay = float(optim.get("weight_decay", signature_defaults.get("weight_decay", 0.0)) or 0.0)
    no_decay = {
        "bias": bool(optim.get("no_decay_bias", True)),
        "norm": bool(optim.get("no_decay_norm", True)),
        "embedding": bool(optim.get("no_decay_embedding", True)),
    }
    multipliers = _compile_multipliers(optim.get("lr_multipliers"))
    hybrid_flag = getattr(cls, "hybrid_flag", None)
    # The AdamW side defaults to the class's ``default_adamw_lr`` (Muon: 3e-4, its reference's value
    # for embeddings and head), else to the main lr (GaLore, SOAP, Shampoo use one lr for all).
    # lr_scale scales the AdamW side too.
    adamw_lr = scale * float(optim.get("adamw_lr", getattr(cls, "default_adamw_lr", optim["lr"])))
    adamw_wd = float(optim.get("adamw_weight_decay", weight_decay))

    buckets: dict[tuple[bool, bool, float], list[nn.Parameter]] = {}
    for name, (kind, p) in classify_parameters(model).items():
        matrix = hybrid_flag is not None and kind == "hidden" and p.ndim == 2
        decays = not no_decay.get(kind, False)
        buckets.setdefault((matrix, decays, _lr_multiplier(name, multipliers)), []).append(p)

    groups = []
    for (matrix, decays, mult), params in buckets.items():
        if hybrid_flag is None or matrix:
            group_lr, group_wd = lr * mult, weight_decay if decays else 0.0
        else:
            group_lr, group_wd = adamw_lr * mult, adamw_wd if decays else 0.0
        group: dict[str, Any] = {"params": params, "lr": group_lr, "initial_lr": group_lr, "weight_decay": group_wd}
        if hybrid_flag is not None:
            group[hybrid_flag] = matrix
            if not matrix:
                for key in ("adamw_betas", "adamw_eps"):
                    if key in optim:
                        group[key] = optim[key]
        groups.append(group)
    return groups


def build_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    """``OPTIMIZERS[optim.name]`` over ``model``'s parameter groups; raises ConfigError on bad keys.

    ``cfg`` is the ``optim`` mapping (dict or DictConfig) or an object with an ``.optim``
    attribute (RootConfig).
    """
    optim = _optim_mapping(cfg)
    cls = lookup(optim.get("name"))
    lr = optim.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr < 0:
        raise ConfigError("optim.lr", f"got {lr!r}, expected a number >= 0")
    accepted = accepted_keys(optim)
    for key in optim:
        if key not in accepted:
            raise ConfigError(f"optim.{key}", f"not a hyperparameter of {optim['name']}; expected {choices(sorted(accepted))}")

    own, takes_kwargs = _signature_keys(cls)
    passed = own | _base_keys(optim, cls, own, takes_kwargs)  # SAM forwards its base's arguments
    if optim.get("impl", "auto") != "auto" and "impl" not in passed:
        raise ConfigError("optim.impl", f"{optim['name']} has one implementation; expected one of: auto")
    kwargs = {k: v for k, v in optim.items() if k in passed}
    kwargs["lr"] = float(lr) * _lr_scale(optim)
    if "model" in own:
        kwargs["model"] = model
    groups = param_groups(optim, model, cls)
    try:
        return cls(groups, **kwargs)
    except ValueError as err:
        # torch.optim convention: constructors raise ValueError("Invalid <what>: <value>").
        raise ConfigError("optim", f"{optim['name']}: {err}") from None

