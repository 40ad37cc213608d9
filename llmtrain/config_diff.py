"""What changed between the config a checkpoint was trained with and the config resuming it.

Every differing key is either refused (it cannot apply to the saved state: the weights' shapes,
the optimizer whose state is saved, what the token ids and the data position mean) or applied to the
restored run and recorded. Nothing is silently ignored.
"""

from __future__ import annotations

from typing import Any

# Prefixes whose change cannot apply to a checkpoint's state, and the keys under them that can.
_REFUSED = ("model.", "optim.name", "data.", "train.seq_len", "train.seed")
_APPLIES = ("model.activation_checkpointing", "model.dropout", "model.name",
            "data.cache_dir", "data.num_proc", "data.num_workers", "data.progress", "data.name")
# Keys that say how this process was started, not what the run is.
_IGNORED = ("resume", "run_dir", "dry_run", "experiment", "distributed.world_size", "model.init_from")

Change = tuple[Any, Any]


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys; lists (and tuples) stay values."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = list(value) if isinstance(value, tuple) else value
    return out


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) or key.startswith(p + ".") for p in patterns)


def diff(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Change]:
    """Differing dotted keys -> (saved value, current value); a key absent on one side is None there."""
    old, new = flatten(saved), flatten(current)
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if not _matches(k, _IGNORED) and old.get(k) != new.get(k)}


def refused(changes: dict[str, Change]) -> dict[str, Change]:
    return {k: v for k, v in changes.items() if _matches(k, _REFUSED) and not _matches(k, _APPLIES)}


def describe(changes: dict[str, Change]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
