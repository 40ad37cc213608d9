"""Resuming a run: try its checkpoints newest first (a damaged one is set aside, not fatal), check the
new config against the one the checkpoint was trained with, restore, and apply what may change.

Every rank takes the same decision: each checks a share of a checkpoint's files against its manifest
and the verdicts are gathered; rank 0 alone moves files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import yaml

from llmtrain import config_diff
from llmtrain.checkpoint import check_entries
from llmtrain.checkpoint_store import set_aside, verify
from llmtrain.distributed import DistEnv, all_gather_objects, barrier
from llmtrain.errors import CheckpointError, UserError
from llmtrain.lineage import ResumeChoice, saved_config

TRAINER_KEYS = ("step", "tokens", "elapsed", "nonfinite_total", "nonfinite_streak", "rng", "data", "scaler")


@dataclass
class Resumed:
    path: Path
    state: dict[str, Any]                                   # trainer.pt: step, RNG, data position ...
    saved_config: Optional[dict[str, Any]]                  # None: written before configs were saved
    changes: dict[str, config_diff.Change] = field(default_factory=dict)  # applied to the restored run


def _first(reasons: Iterable[Optional[str]]) -> Optional[str]:
    return next((r for r in reasons if r), None)


def _refusal(path: Path, refused: dict[str, config_diff.Change]) -> UserError:
    return UserError("resume", f"{path.name} was trained with other values of keys that cannot change on resume: "
                               f"{config_diff.describe(refused)}; start a new run_dir with model.init_from={path} "
                               f"(its weights, step 0, any optimizer), or drop these overrides")


def _try(path: Path, config: dict[str, Any], restore: Callable[[Path], dict[str, Any]],
         env: DistEnv) -> tuple[Optional[Resumed], Optional[str]]:
    """(Resumed, None) or (None, why the checkpoint is damaged); a refused config change raises."""
    reason = _first(all_gather_objects(verify(path, env.rank, env.world_size), env))
    if reason:
        return None, reason
    try:
        saved = saved_config(path)
    except (OSError, ValueError, yaml.YAMLError) as err:
        return None, f"damaged: unreadable config.yaml ({type(err).__name__})"
    changes = config_diff.diff(saved, config) if saved is not None else {}
    refused = config_diff.refused(changes)
    if refused:
        raise _refusal(path, refused)
    state, error = None, None
    try:
        state = restore(path)
        check_entries(state, TRAINER_KEYS, path / "trainer.pt")
    except CheckpointError as err:
        error = err.message
    reason = _first(all_gather_objects(error, env))
    return (None, reason) if reason else (Resumed(path, state, saved, changes), None)


def resume(choice: ResumeChoice, config: dict[str, Any], restore: Callable[[Path], dict[str, Any]], env: DistEnv,
           run_dir: Path, note: Callable[[str], None]) -> Optional[Resumed]:
    """Restore the first good checkpoint of ``choice``; None when there is none (a fresh start).

    ``restore(path)`` loads a checkpoint into the model and optimizer and returns its trainer state.
    A damaged checkpoint is moved under ``abandoned/`` with a one-line warning when ``resume=auto``
    chose it, and is an error when the user named it."""
    for path in choice.candidates:
        resumed, reason = _try(path, config, restore, env)
        if resumed is not None:
            return resumed
        if choice.explicit:
            raise CheckpointError("resume", f"{path}: {reason}")
        if env.is_main:
            dest = set_aside(run_dir, [path], f"damaged-{path.name}")
            note(f"warning: checkpoint {path.name} is {reason}; moved to {dest} and trying the one before it")
        barrier(env)
    if choice.candidates:
        raise CheckpointError("resume", f"every checkpoint in {run_dir / 'checkpoints'} is damaged and was moved under "
                                        f"{run_dir / 'abandoned'}; run again to start from step 0, or resume=PATH")
    return None


def hyperparameter_keys(optim: dict[str, Any]) -> set[str]:
    """Param-group entries that come from the config, so a changed value applies on resume."""
    from llmtrain.optim.param_groups import accepted_keys

    return {"lr", "initial_lr"} | set(accepted_keys(optim))
