"""Reading checkpoint files so that nothing in them can run code.

``torch.load(weights_only=True)`` already refuses code in ``.pt`` files. DCP (torch.distributed.
checkpoint) does not: its ``.metadata`` is read with a bare ``pickle.load``, and an entry the
metadata declares as bytes is loaded with ``torch.load(weights_only=False)``. So DCP metadata is
read here with an unpickler that resolves only the classes DCP metadata is made of (found by
pickling the metadata of 1- and 2-rank saves under every strategy, FSDP DTensor shards included),
llmtrain's checkpoints hold tensors only, and the load planner refuses anything that is not one.
Every refusal is a one-line ``CheckpointError`` naming the file, which ``resume=auto`` can act on.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PosixPath, PurePosixPath
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import LoadItemType

from llmtrain.errors import CheckpointError

_METADATA_CLASSES = ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
                     "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(dcp_metadata.__name__, name): getattr(dcp_metadata, name) for name in _METADATA_CLASSES},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # name -> torch.layout, nothing else
    ("pathlib", "PosixPath"): PosixPath,  # StorageMeta.checkpoint_id
    ("pathlib", "PurePosixPath"): PurePosixPath,
}
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)
# torch.load's explanation around the reason it refused a file.
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals DCP metadata is made of; any other global is refused unloaded."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS):
            return getattr(torch, name)  # dtypes (torch.float32 ...), layouts, memory formats: values
        raise pickle.UnpicklingError(f"refused: pickle global {module}.{name} is not checkpoint metadata")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused: a persistent id is not checkpoint metadata")


def reason(err: BaseException) -> str:
    """One line saying why a checkpoint file was refused or could not be read."""
    text = str(err)
    if text.startswith("refused: "):
        return text
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"refused: pickle global {found.group(1)} is not allowed in a weights-only checkpoint file"
    if "Weights only load failed" in text:
        lines = [line.strip() for line in text.splitlines()]
        detail = next((line for line in lines if line and not line.startswith(_TORCH_BOILERPLATE)), "")
        return f"damaged: not a loadable weights file ({detail})" if detail else "damaged: not a loadable weights file"
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    return f"damaged: unreadable ({type(err).__name__}{': ' + first if first else ''})"


@contextmanager
def quiet_load_warnings() -> Iterator[None]:
    """Hide torch's warnings about crafted pickles and DCP's notice that one process loads alone."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._weights_only_unpickler")
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def load_weights_only(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; a missing, damaged or refused file is a CheckpointError."""
    try:
        with quiet_load_warnings():
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(str(path), "damaged: missing from the checkpoint") from None
    except Exception as err:
        raise CheckpointError(str(path), reason(err)) from None


def _check_metadata(meta: Any, path: Path) -> None:
    """A Metadata of tensors only, whose shards are files inside the checkpoint directory."""
    if not isinstance(meta, dcp_metadata.Metadata):
        raise CheckpointError(str(path), f"refused: holds a {type(meta).__name__}, not DCP metadata")
    if not isinstance(meta.state_dict_metadata, dict) or not isinstance(meta.storage_data, dict):
        raise CheckpointError(str(path), "refused: malformed DCP metadata")
    if not isinstance(meta.storage_meta, (dcp_metadata.StorageMeta, type(None))):
        raise CheckpointError(str(path), "refused: malformed DCP metadata (storage_meta)")
    for key, entry in meta.state_dict_metadata.items():
        if not isinstance(entry, dcp_metadata.TensorStorageMetadata):
            raise CheckpointError(str(path), f"refused: entry {key!r} is a pickled object, not a tensor "
                                             "(llmtrain checkpoints hold tensors only)")
        properties = getattr(entry, "properties", None)
        if not isinstance(getattr(properties, "dtype", None), torch.dtype) or not isinstance(entry.size, torch.Size):
            raise CheckpointError(str(path), f"refused: entry {key!r} has no tensor dtype and size")
    for info in meta.storage_data.values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(info, _StorageInfo) or not isinstance(rel, str):
            raise CheckpointError(str(path), "refused: malformed DCP metadata (storage_data)")
        if rel in ("", ".", "..") or Path(rel).name != rel:
            raise CheckpointError(str(path), f"refused: shard path {rel!r} points outside the checkpoint directory")


def read_dcp_metadata(dcp_dir: Path) -> dcp_metadata.Metadata:
    """The checked ``.metadata`` of a DCP directory, unpickled without running anything in it."""
    path = Path(dcp_dir) / ".metadata"
    try:
        with open(path, "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(str(path), "damaged: missing from the checkpoint") from None
    except Exception as err:
        raise CheckpointError(str(path), reason(err)) from None
    _check_metadata(meta, path)
    return meta


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that it never unpickles a byte entry (DCP would, unrestricted)."""

    def __init__(self, source: str = "dcp") -> None:
        super().__init__()
        self.source = source

    def create_local_plan(self):
        plan = super().create_local_plan()
        for item in plan.items:
            if item.type != LoadItemType.TENSOR:
                self._refuse(item.dest_index.fqn)
        return plan

    def load_bytes(self, read_item, value) -> None:
        self._refuse(read_item.dest_index.fqn)

    def _refuse(self, fqn: str) -> None:
        raise CheckpointError(self.source, f"refused: entry {fqn!r} is not a tensor (DCP would unpickle it "
                                           "with weights_only=False)")


class _CheckedReader(dcp.FileSystemReader):
    """A FileSystemReader that hands DCP metadata read by ``read_dcp_metadata`` and names the shard
    file a failed read came from (tensor records themselves are loaded with weights_only=True)."""

    def __init__(self, dcp_dir: Path) -> None:
        super().__init__(str(dcp_dir))
        self.dcp_dir = Path(dcp_dir)
        self.metadata = read_dcp_metadata(self.dcp_dir)
        self.reading = ""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        if self.metadata.storage_meta is None:
            self.metadata.storage_meta = dcp_metadata.StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata

    def _slice_file(self, file, sinfo):
        self.reading = sinfo.relative_path
        return super()._slice_file(file, sinfo)

    def read_data(self, plan, planner):
        try:
            return super().read_data(plan, planner)
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(str(self.dcp_dir / self.reading), reason(err)) from None


def dcp_load(state: dict[str, Any], dcp_dir: Path, no_dist: bool) -> None:
    """``dcp.load`` of tensors only into ``state``, in place; refusals are one CheckpointError."""
    reader = _CheckedReader(Path(dcp_dir))
    try:
        with quiet_load_warnings():
            dcp.load(state, storage_reader=reader, planner=TensorOnlyLoadPlanner(str(dcp_dir)), no_dist=no_dist)
    except CheckpointException as err:  # DCP gathers each rank's exception; any one tells why
        failures = [exc for _, (exc, _) in sorted(err.failures.items())] or [err]
        refused = next((exc for exc in failures if isinstance(exc, CheckpointError)), None)
        raise refused or CheckpointError(str(dcp_dir), reason(failures[0])) from None
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(str(dcp_dir), reason(err)) from None
