"""Checkpoint state: what a checkpoint holds, saving it, and restoring it on any world size.

Layout: ``RUN_DIR/checkpoints/step_N/`` with ``model.pt`` (the unwrapped model's fp32
state_dict), ``optim.pt`` (optimizer state_dict), ``trainer.pt`` (step, token count, RNG
states, data-loader position, counters, W&B run id), ``config.yaml`` (the resolved config the run
trained with) and a ``COMPLETE`` manifest written last (each file's size and sha256).
Multi-process runs write ``dcp/`` (torch.distributed.checkpoint shards, one set per rank) in place
of model.pt/optim.pt; ``restore`` loads either layout on any world size (see below). How a
checkpoint reaches the disk (temporary name, fsync, manifest, rename, pruning) is
``llmtrain.checkpoint_store``. Nothing in a checkpoint can run code when loaded: ``.pt`` files load
with ``weights_only=True``, DCP metadata and shards through ``llmtrain.checkpoint_safety``.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import yaml

from llmtrain.checkpoint_store import (  # noqa: F401  (re-exported: the checkpoint API users know)
    MARKER, checkpoint_root, commit, files_under, hash_files, latest_checkpoint, list_checkpoints, prune, tmp_dir,
    write_manifest,
)
from llmtrain.errors import CheckpointError, UserError

CONFIG_FILE = "config.yaml"


def resolve_resume(resume: str, run_dir: str | Path) -> Optional[Path]:
    """The checkpoint ``resume`` (auto | never | PATH) starts from in ``run_dir``, if any."""
    from llmtrain.lineage import choose

    candidates = choose(resume, Path(run_dir)).candidates
    return candidates[0] if candidates else None


def _load(path: Path) -> Any:
    from llmtrain.checkpoint_safety import load_weights_only

    return load_weights_only(path)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU of the saving machine; this one may have fewer
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _new_tmp(run_dir: str | Path, step: int) -> Path:
    tmp = tmp_dir(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _write_config(folder: Path, config: Optional[dict[str, Any]]) -> None:
    if config is not None:
        (folder / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int = 2,
    config: Optional[dict[str, Any]] = None,
) -> Path:
    """Write step_N (files, then manifest, then rename) and prune all but the newest ``keep``."""
    tmp, final = _new_tmp(run_dir, step), checkpoint_root(run_dir) / f"step_{step}"
    torch.save(model_state, tmp / "model.pt")
    torch.save(optim_state, tmp / "optim.pt")
    torch.save(trainer_state, tmp / "trainer.pt")
    _write_config(tmp, config)
    write_manifest(tmp, step, hash_files(tmp, files_under(tmp)))
    commit(tmp, final)
    prune(run_dir, keep, protect=final)
    return final


def load_checkpoint(ckpt_dir: str | Path) -> tuple[dict, dict, dict]:
    """(model_state, optim_state, trainer_state) of a complete checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    model_state = load_model_state(ckpt_dir)
    optim_state = _load(ckpt_dir / "optim.pt")
    check_entries(optim_state, ("state", "param_groups"), ckpt_dir / "optim.pt")
    return model_state, optim_state, _load(ckpt_dir / "trainer.pt")


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints (more than one process): torch.distributed.checkpoint (DCP).
#
# Layout: ``step_N/dcp/`` (each rank writes its own shards plus ``.metadata``), ``trainer.pt``
# (rank 0) and ``COMPLETE``. The DCP state is one flat dict keyed by parameter name, so it does
# not depend on the world size or the strategy that wrote it:
#   ``model/<fqn>``                        model tensors (DTensor shards under FSDP/HSDP)
#   ``optim/<fqn>/<state key>[/<sub>...]``  optimizer state of the parameter named <fqn>
# and ``optim_meta.pt`` (rank 0): the param groups' hyperparameters in build order and the
# optimizer's non-tensor state, loaded with weights_only=True like every other file.
# Resuming on any world size (including one process, without a process group) builds a template
# of the tensors this rank needs, sharded like its own parameters, and lets DCP reshard into it.
# ---------------------------------------------------------------------------------------------

DCP_DIR = "dcp"
OPTIM_META = "optim_meta.pt"  # param groups' hyperparameters and non-tensor optimizer state
_LIST_MARK = "#"  # marks a list index in a flattened optimizer-state key


def is_sharded_checkpoint(ckpt_dir: str | Path) -> bool:
    return (Path(ckpt_dir) / DCP_DIR / ".metadata").is_file()


def _is_dtensor(t: Any) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


def _param_names(model: torch.nn.Module) -> dict[int, str]:
    """Parameter name by id. FSDP2 registers whole parameters while a forward's are kept (the
    root after an eval forward); resharding first puts back the DTensors the optimizer holds."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return {id(p): name for name, p in model.named_parameters(remove_duplicate=True)}


def _inner(optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "inner", optimizer)


def _model_param(optimizer, tensor: torch.Tensor) -> torch.Tensor:
    """The model parameter an optimizer tensor stands for (owner-rank wrappers keep copies)."""
    param_for = getattr(optimizer, "param_for", None)
    return param_for(tensor) if callable(param_for) else tensor


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}/{k}", v, out)
    elif isinstance(value, (list, tuple)) and value and any(isinstance(v, torch.Tensor) for v in value):
        for i, v in enumerate(value):
            _flatten(f"{prefix}/{_LIST_MARK}{i}", v, out)
    else:
        out[prefix] = value


def _unflatten(entries: dict[str, Any]) -> dict[str, Any]:
    """Inverse of _flatten for the part after ``optim/<fqn>/``; list marks rebuild lists."""
    root: dict[str, Any] = {}
    for path, value in entries.items():
        parts = path.split("/")
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    def fix(node):
        if not isinstance(node, dict):
            return node
        if node and all(k.startswith(_LIST_MARK) for k in node):
            return [fix(node[k]) for k in sorted(node, key=lambda k: int(k[len(_LIST_MARK):]))]
        return {_key(k): fix(v) for k, v in node.items()}

    return fix(root)


def _key(k: str) -> Any:
    return int(k) if k.lstrip("-").isdigit() else k


def _groups_hyperparams(optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in _inner(optimizer).param_groups]


def sharded_state(model: torch.nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's flat, name-keyed DCP tensors of ``model`` (unwrapped) and ``optimizer``, and
    the optimizer's non-tensor state (Python numbers per parameter), kept out of DCP because DCP
    unpickles non-tensor entries with weights_only=False."""
    names = _param_names(model)
    flat: dict[str, Any] = {f"model/{k}": v for k, v in model.state_dict().items()}
    scalars: dict[str, Any] = {}
    inner = _inner(optimizer)
    for group in inner.param_groups:
        for p in group["params"]:
            if p in inner.state and inner.state[p]:
                entries: dict[str, Any] = {}
                _flatten(f"optim/{names[id(_model_param(optimizer, p))]}", dict(inner.state[p]), entries)
                for key, value in entries.items():
                    (flat if isinstance(value, torch.Tensor) else scalars)[key] = value
    return flat, scalars


def _on_main(env, fn) -> Any:
    """Run ``fn`` on rank 0; an OSError there is raised on every rank (no rank left in a collective)."""
    from llmtrain.distributed import broadcast_object

    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except OSError as err:
            error = _os_error_text(err)
    error = broadcast_object(error, env)
    if error:
        raise OSError(error)
    return result


def _os_error_text(err: OSError) -> str:
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    return f"{err.strerror or err}{where}"


def _own_shard_files(folder: Path, rank: int) -> list[str]:
    """The files DCP's FileSystemWriter wrote for ``rank`` (``__<rank>_<i>.distcp``; rank 0 adds .metadata)."""
    names = [p.name for p in folder.iterdir() if p.name.startswith(f"__{rank}_") and p.name.endswith(".distcp")]
    if rank == 0:
        names.append(".metadata")
    return [f"{DCP_DIR}/{n}" for n in sorted(names)]


def save_sharded_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer,
                            trainer_state: dict[str, Any], env, keep: int = 2,
                            config: Optional[dict[str, Any]] = None) -> Path:
    """Every rank writes and hashes its shards; rank 0 writes the rest and the manifest, then renames.

    A write error on any rank is raised as OSError on every rank, with the previous checkpoints untouched."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from llmtrain.distributed import all_gather_objects, broadcast_object

    # Rank 0's run_dir for everyone: Hydra's default dir is a timestamp each process takes itself.
    run_dir = Path(broadcast_object(str(run_dir), env))
    final, tmp = checkpoint_root(run_dir) / f"step_{step}", tmp_dir(run_dir, step)
    _on_main(env, lambda: _new_tmp(run_dir, step))
    tensors, scalars = sharded_state(model, optimizer)
    try:
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp / DCP_DIR)))  # fsyncs its files
    except CheckpointException as err:  # DCP gathers every rank's failure and raises it on all
        rank, (cause, _) = min(err.failures.items())
        text = _os_error_text(cause) if isinstance(cause, OSError) else f"{type(cause).__name__}: {cause}"
        raise OSError(f"rank {rank} could not write its shards: {text}") from None
    try:
        mine, error = hash_files(tmp, _own_shard_files(tmp / DCP_DIR, env.rank)), None
    except OSError as err:
        mine, error = {}, _os_error_text(err)
    parts = all_gather_objects((mine, scalars, error), env)
    errors = [e for _, _, e in parts if e]
    if errors:
        raise OSError(errors[0])

    def finish() -> Path:
        merged = {k: v for _, part, _ in parts for k, v in part.items()}
        torch.save({"param_groups": _groups_hyperparams(optimizer), "scalars": merged}, tmp / OPTIM_META)
        torch.save(trainer_state, tmp / "trainer.pt")
        _write_config(tmp, config)
        files = {k: v for part, _, _ in parts for k, v in part.items()}
        files.update(hash_files(tmp, [f for f in files_under(tmp) if not f.startswith(f"{DCP_DIR}/")]))
        write_manifest(tmp, step, files, world_size=env.world_size, strategy=env.strategy)
        commit(tmp, final)
        prune(run_dir, keep, protect=final)
        return final

    _on_main(env, finish)
    return final


def _read_metadata(ckpt_dir: Path):
    from llmtrain.checkpoint_safety import read_dcp_metadata

    return read_dcp_metadata(ckpt_dir / DCP_DIR)


def _dcp_load(template: dict[str, Any], ckpt_dir: Path, no_dist: bool = False) -> None:
    import torch.distributed as dist

    from llmtrain.checkpoint_safety import dcp_load

    no_dist = no_dist or not (dist.is_available() and dist.is_initialized())
    dcp_load(template, ckpt_dir / DCP_DIR, no_dist=no_dist)


def _empty_like_target(size, dtype, target: torch.Tensor) -> torch.Tensor:
    """A tensor to load a saved value into: sharded like ``target`` when it has target's shape."""
    if _is_dtensor(target) and tuple(size) == tuple(target.shape):
        from torch.distributed.tensor import empty as dtensor_empty

        return dtensor_empty(tuple(size), dtype=dtype, device_mesh=target.device_mesh, placements=target.placements)
    device = target.to_local().device if _is_dtensor(target) else target.device
    return torch.empty(tuple(size), dtype=dtype, device=device)


def load_model_state(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The consolidated model state_dict of a checkpoint (for export and init), either layout.

    A sharded checkpoint is stitched together from every rank's shards in this one process.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / MARKER).is_file():
        raise UserError(str(ckpt_dir), f"not a complete checkpoint (no {MARKER} marker)")
    if not is_sharded_checkpoint(ckpt_dir):
        return _load(ckpt_dir / "model.pt")
    meta = _read_metadata(ckpt_dir)
    template = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
                if k.startswith("model/") and isinstance(m, TensorStorageMetadata)}
    _dcp_load(template, ckpt_dir, no_dist=True)  # every rank stitches the whole model itself
    return {k[len("model/"):]: v for k, v in template.items()}


def _load_model_values(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy full or already-sharded values into the model (shards of a DTensor kept locally)."""
    from torch.distributed.tensor import distribute_tensor

    current = model.state_dict()
    if not isinstance(values, dict) or not all(isinstance(v, torch.Tensor) for v in values.values()):
        raise CheckpointError("resume", "damaged: the checkpoint's model state is not a mapping of tensors")
    missing = sorted(set(current) - set(values))
    if missing:
        raise UserError("resume", f"checkpoint lacks model tensors {missing[:3]} (a different model config?)")
    out = {}
    for name, target in current.items():
        value = values[name]
        if tuple(value.shape) != tuple(target.shape):
            raise UserError("resume", f"checkpoint tensor {name} has shape {tuple(value.shape)}, model has {tuple(target.shape)}")
        if _is_dtensor(target) and not _is_dtensor(value):
            value = distribute_tensor(value.to(target.to_local().device, target.dtype), target.device_mesh,
                                      target.placements, src_data_rank=None)
        out[name] = value
    model.load_state_dict(out)


def _load_optimizer_values(optimizer, model: torch.nn.Module, state: dict[str, dict], groups: list[dict],
                           keep_current: Iterable[str] = ()) -> None:
    """Load name-keyed optimizer state (full or sharded values) into this rank's optimizer. Group
    entries named in ``keep_current`` (the config's hyperparameters) keep this run's values."""
    from torch.distributed.tensor import distribute_tensor

    inner = _inner(optimizer)
    names = _param_names(model)
    if len(groups) != len(inner.param_groups):
        raise UserError("resume", f"checkpoint has {len(groups)} optimizer param groups, this optimizer {len(inner.param_groups)} (a different optim config?)")

    def place(value: Any, target: torch.Tensor) -> Any:
        if isinstance(value, dict):
            return {k: place(v, target) for k, v in value.items()}
        if isinstance(value, list):
            return [place(v, target) for v in value]
        if _is_dtensor(target) and isinstance(value, torch.Tensor) and not _is_dtensor(value) \
                and tuple(value.shape) == tuple(target.shape) and value.ndim > 0:
            return distribute_tensor(value.to(target.to_local().device), target.device_mesh, target.placements, src_data_rank=None)
        return value

    native_state, native_groups, index = {}, [], 0
    for saved, group in zip(groups, inner.param_groups):
        ids = []
        for p in group["params"]:
            name = names[id(_model_param(optimizer, p))]
            if name in state:
                native_state[index] = place(state[name], p)
            ids.append(index)
            index += 1
        native_groups.append({**saved, "params": ids})
    current = [{k: g[k] for k in keep_current if k in g} for g in inner.param_groups]
    inner.load_state_dict({"state": native_state, "param_groups": native_groups})
    for group, values in zip(inner.param_groups, current):
        group.update(values)


def _full_param_order(optimizer) -> list[torch.Tensor]:
    """Parameters in build order, as a one-process optimizer enumerates them in its state_dict."""
    all_params = getattr(optimizer, "all_params", None)
    return list(all_params) if all_params is not None else [p for g in optimizer.param_groups for p in g["params"]]


def restore(ckpt_dir: str | Path, model: torch.nn.Module, optimizer,
            keep_current: Iterable[str] = ()) -> dict[str, Any]:
    """Load a checkpoint of either layout into ``model`` (unwrapped) and ``optimizer`` on any
    world size, and return the trainer state (step, RNG, data position ...). Param-group entries
    named in ``keep_current`` keep the values this run's config gave them (a changed lr applies)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ckpt_dir = Path(ckpt_dir)
    if not is_sharded_checkpoint(ckpt_dir):
        model_state, optim_state, trainer_state = load_checkpoint(ckpt_dir)
        _load_model_values(model, model_state)
        names = _param_names(model)
        order = [names[id(p)] for p in _full_param_order(optimizer)]
        state = {order[i]: v for i, v in optim_state["state"].items()}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optim_state["param_groups"]]
        _load_optimizer_values(optimizer, model, state, groups, keep_current)
        return trainer_state

    meta = _read_metadata(ckpt_dir)
    names = _param_names(model)
    inner = _inner(optimizer)
    mine = {names[id(_model_param(optimizer, p))]: p for g in inner.param_groups for p in g["params"]}
    template: dict[str, Any] = {f"model/{k}": v for k, v in model.state_dict().items()}
    missing = [k for k in template if k not in meta.state_dict_metadata]
    if missing:
        raise UserError("resume", f"checkpoint lacks model tensors {[k[6:] for k in missing[:3]]} (a different model config?)")
    for key, m in meta.state_dict_metadata.items():
        name = key.split("/")[1] if key.startswith("optim/") else None
        if name in mine and isinstance(m, TensorStorageMetadata):  # else another rank owns it
            template[key] = _empty_like_target(m.size, m.properties.dtype, mine[name])
    _dcp_load(template, ckpt_dir)
    _load_model_values(model, {k[len("model/"):]: v for k, v in template.items() if k.startswith("model/")})
    optim_meta = _load(ckpt_dir / OPTIM_META)
    check_entries(optim_meta, ("param_groups", "scalars"), ckpt_dir / OPTIM_META)
    per_param: dict[str, dict[str, Any]] = {}
    for key, value in [*template.items(), *optim_meta["scalars"].items()]:
        if key.startswith("optim/") and key.split("/")[1] in mine:
            _, name, rest = key.split("/", 2)
            per_param.setdefault(name, {})[rest] = value
    state = {name: _unflatten(entries) for name, entries in per_param.items()}
    _load_optimizer_values(optimizer, model, state, optim_meta["param_groups"], keep_current)
    return _load(ckpt_dir / "trainer.pt")


def check_entries(state: Any, keys: Iterable[str], path: Path) -> None:
    """A loaded file holds every entry the caller reads (a damaged one is a CheckpointError, not a KeyError)."""
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(str(path), f"damaged: {path.name} lacks {', '.join(missing)}")
