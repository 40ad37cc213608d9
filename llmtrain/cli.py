"""Hydra entry point: compose -> validate -> Trainer(cfg).fit().

Hydra prints its own multi-line errors (exit 1) for a bad override. Users get one line and exit
code 2 instead: every override is composed once up front with Hydra's compose API (each
combination of a multirun sweep), and composition errors are translated to ``ConfigError``.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from llmtrain.console import print_error
from llmtrain.errors import ConfigError, UserError, choices


def config_dir() -> Path:
    """llmtrain's configs: $LLMTRAIN_CONFIG_DIR, else llmtrain/configs in an installed wheel (what
    ``pkg://llmtrain.configs`` names), else configs/ beside the package in a checkout (editable or not)."""
    env = os.environ.get("LLMTRAIN_CONFIG_DIR")
    package = Path(__file__).resolve().parent
    candidates = [Path(env)] if env else [package / "configs", package.parent / "configs"]
    for path in candidates:
        if (path / "train.yaml").is_file():
            return path
    if env:
        raise ConfigError("LLMTRAIN_CONFIG_DIR", f"no train.yaml in {env}; point it at llmtrain's configs/ folder")
    raise ConfigError("LLMTRAIN_CONFIG_DIR", f"llmtrain's configs are missing from {package} (reinstall llmtrain), "
                                             "or set it to a configs/ folder")


def split_config_dir(argv: Sequence[str]) -> tuple[Optional[Path], list[str]]:
    """Hydra's ``--config-dir DIR`` (or ``--config-dir=DIR``, ``-cd DIR``): a user's config folder that
    Hydra searches after llmtrain's, so its groups and options add to ours. Returns it and the rest."""
    user_dir, rest, args = None, [], iter(argv)
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag not in ("--config-dir", "-cd"):
            rest.append(arg)
            continue
        value = value if eq else next(args, "")
        user_dir = Path(os.path.abspath(value)) if value else None  # as Hydra resolves it; the last one wins
        if user_dir is None or not user_dir.is_dir():
            raise ConfigError("--config-dir", f"{user_dir or 'no folder given'} is not a folder; "
                                              "expected a folder of config groups (experiment/, model/, ...)")
    return user_dir, rest


def register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    from llmtrain.config import RootConfig

    ConfigStore.instance().store(name="llmtrain_schema", node=RootConfig)


def _group_options(group: str, user_config_dir: Optional[Path] = None) -> list[str]:
    folders = [config_dir() / group] + ([user_config_dir / group] if user_config_dir else [])
    return sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.yaml")})


def _schema_keys(dotted: str) -> list[str]:
    """Field names one level under ``dotted`` in the schema (for 'unknown key' messages)."""
    import dataclasses

    from llmtrain.config import RootConfig

    node = RootConfig
    for part in dotted.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return []
        node = fields[part].type if not isinstance(fields[part].type, str) else _resolve_type(node, part)
        if node is None:
            return []
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _resolve_type(owner, field_name: str):
    import typing

    try:
        hint = typing.get_type_hints(owner)[field_name]
    except Exception:
        return None
    return hint if isinstance(hint, type) else None


def translate_compose_error(err: BaseException, user_config_dir: Optional[Path] = None) -> ConfigError:
    """Turn a Hydra/OmegaConf composition error into one ConfigError line."""
    text = f"{err}\n{err.__cause__ or ''}"
    missing = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        where = f"configs/{group}/" + (f" or {user_config_dir / group}/" if user_config_dir else "")
        options = choices(_group_options(group, user_config_dir))
        return ConfigError(group, f"no config {option!r} in {where}; expected {options}")
    override = re.search(r"Could not (?:override|append to config)[^']*'([^']+)'", text)
    key = override.group(1) if override else ""
    full_key = re.search(r"full_key: (\S+)", text)
    key = (full_key.group(1) if full_key else key) or "config"
    if "not in struct" in text or "Could not append" in text or re.search(r"Key '[^']+' not in '", text):
        known = _schema_keys(key)
        hint = f"; expected {choices(known)}" if known else ""
        return ConfigError(key, f"unknown key{hint}")
    cause = err.__cause__ or err
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if "override" in first.lower() and "\n" in text:
        first = [line for line in text.splitlines() if line.strip()][-1].strip()
    return ConfigError(key, first)


def normalize_overrides(overrides: Sequence[str]) -> list[str]:
    """``optim.KEY=V`` -> ``++optim.KEY=V``: hyperparameters differ per optimizer, so a key absent
    from the optimizer's YAML is still settable; ``validate_optim`` checks it against the
    optimizer's constructor instead of Hydra's struct mode."""
    return [f"++{o}" if o.startswith("optim.") else o for o in overrides]


def _initialize_hydra(user_config_dir: Optional[Path]) -> None:
    """GlobalHydra on llmtrain's configs, with a user's folder where hydra.main puts ``--config-dir``
    (before the schema: after llmtrain's configs, which win a name both hold)."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery

    version.setbase(None)  # as initialize_config_dir(version_base=None) and hydra.main below
    search_path = create_config_search_path(str(config_dir()))
    if user_config_dir is not None:
        search_path.prepend("command-line", f"file://{user_config_dir}", anchor=SearchPathQuery(provider="schema"))
    Hydra.create_main_hydra2(task_name="llmtrain", config_search_path=search_path)


def compose(overrides: Sequence[str] = (), user_config_dir: str | Path | None = None):
    """Compose configs/train.yaml with overrides into a validated RootConfig (used by tests and tools);
    ``user_config_dir`` is a ``--config-dir`` folder searched after llmtrain's configs."""
    from hydra import compose as hydra_compose
    from hydra.core.global_hydra import GlobalHydra

    from llmtrain.config import load_config

    user_dir = Path(user_config_dir) if user_config_dir is not None else None
    register_schema()
    GlobalHydra.instance().clear()
    try:
        _initialize_hydra(user_dir)
        cfg = hydra_compose("train", overrides=normalize_overrides(overrides))
    except UserError:
        raise
    except Exception as err:  # Hydra raises a zoo of types; all are user input errors here
        raise translate_compose_error(err, user_dir) from None
    finally:
        GlobalHydra.instance().clear()
    return load_config(cfg, overrides)


def _sweep_combinations(overrides: list[str], limit: int = 256) -> list[list[str]]:
    """Every job's overrides in a multirun sweep (a, b=1,2 -> [[a, b=1], [a, b=2]])."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices_per: list[list[str]] = []
    for o in parsed:
        if o.is_sweep_override():
            key = o.get_key_element()
            choices_per.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices_per.append([o.input_line])
    combos = list(itertools.islice(itertools.product(*choices_per), limit))
    return [list(c) for c in combos]


def prevalidate(argv: Sequence[str]) -> None:
    """Compose every job of the command line once so a mistake fails before Hydra starts."""
    user_config_dir, argv = split_config_dir(argv)
    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if not a.startswith("-")]
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return  # Hydra's own flags (--help, --cfg, -cn ...): let Hydra handle them
    if multirun:
        try:
            jobs = _sweep_combinations(overrides)
        except Exception as err:
            raise translate_compose_error(err, user_config_dir) from None
    else:
        jobs = [overrides]
    for job in jobs:
        compose(job, user_config_dir=user_config_dir)


def _fail(err: UserError) -> None:
    print_error(err)
    sys.exit(err.exit_code)


def run_job(cfg_node) -> Optional[dict]:
    """One Hydra job: validate, then plan (dry_run) or train."""
    from hydra.core.hydra_config import HydraConfig

    from llmtrain.config import load_config

    cfg = load_config(cfg_node, HydraConfig.get().overrides.task)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.dry_run:
        from llmtrain.plan import run_dry_run

        return run_dry_run(cfg, str(run_dir))
    from llmtrain.trainer import Trainer

    trainer = Trainer(cfg, run_dir)
    if cfg.run_dir is None and trainer.env.is_main:
        print(f"note: run_dir is not set, so this run writes to the new folder {run_dir}; running the same command "
              f"again starts another run instead of resuming this one (pass run_dir=PATH to make restarts resume)",
              file=sys.stderr)
    return trainer.fit()


def exit_code(summary: Optional[dict]) -> int:
    """0 when the run completed (or had nothing left to do); 1 diverged; 128 + N when stopped by signal N,
    so a scheduler never takes a pre-empted run for a finished one."""
    import signal

    status = (summary or {}).get("status")
    if status == "diverged":
        return 1
    if status == "stopped" and summary.get("signal"):
        return 128 + int(signal.Signals[summary["signal"]])
    return 0


def _record_failure(cfg_node, reason: str) -> None:
    import json

    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(cfg_node.get("run_dir") or HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    optim = cfg_node.get("optim") or {}
    summary = {"status": "failed", "reason": reason, "optimizer": optim.get("name"), "lr": optim.get("lr")}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> None:
    import hydra

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        register_schema()
        prevalidate(argv)
        path = config_dir()
    except UserError as err:
        _fail(err)
    multirun = any(a in ("-m", "--multirun") for a in argv)

    codes: list[int] = []

    @hydra.main(config_path=str(path), config_name="train", version_base=None)
    def _task(cfg_node):
        if multirun:
            from llmtrain.logging import print_job_header

            print_job_header(argv)
        try:
            summary = run_job(cfg_node)
        except UserError as err:
            if not multirun:
                _fail(err)
            # In a sweep one bad job is recorded and the sweep goes on (the report lists it).
            print_error(err)
            _record_failure(cfg_node, str(err))
            return None
        except Exception as err:
            if not multirun:
                raise
            import traceback

            traceback.print_exc()  # not a user mistake: show it, record it, keep sweeping
            _record_failure(cfg_node, f"{type(err).__name__}: {err}")
            return None
        code = exit_code(summary)
        codes.append(code)
        if multirun and code > 128:
            _finish(code)  # pre-empted: the rest of the sweep waits for the requeue
        return summary

    sys.argv = [sys.argv[0], *normalize_overrides(argv), *_hydra_dir_overrides(argv, multirun)]
    _task()
    _finish(max(codes, default=0) if not multirun else max((c for c in codes if c > 128), default=0))


def _hydra_dir_overrides(argv: Sequence[str], multirun: bool) -> list[str]:
    """A single run given ``run_dir=``: Hydra's job directory is that run_dir and it writes no
    ``.hydra/`` copy there (config.yaml is llmtrain's), so nothing lands in outputs/DATE/TIME of the
    working directory. A sweep keeps Hydra's per-job folders: llmtrain-report reads their .hydra/."""
    given_run_dir = any(a.startswith("run_dir=") for a in argv)
    own_hydra_dirs = any(a.startswith(("hydra.run.dir=", "hydra.output_subdir=")) for a in argv)
    if multirun or not given_run_dir or own_hydra_dirs:
        return []
    return ["hydra.run.dir=${run_dir}", "hydra.output_subdir=null"]


def _finish(code: int) -> None:
    """Exit with ``code``; a torchrun worker exits at once (see exit_torchrun_worker)."""
    from llmtrain.distributed import exit_torchrun_worker

    exit_torchrun_worker(code)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
