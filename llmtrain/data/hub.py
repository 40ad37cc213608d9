"""Hugging Face hub access that fails fast and in one line.

``hub_reachable`` is asked before any hub call, because huggingface_hub retries an unreachable host
for about a minute before it gives up; offline we fail in a few seconds. ``is_hub_id`` tells a hub
model id (``org/name``) from a local path, and ``hub_download`` takes a model's files from the hub or,
offline, from the local Hugging Face cache.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from llmtrain.errors import ConfigError

# The hub's repository id: a namespace and a name of letters, digits, '-', '_' and '.'.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    return _can_connect(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@functools.lru_cache(maxsize=4)
def _can_connect(endpoint: str, timeout_s: float = 3.0) -> bool:
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def is_hub_id(value: str) -> bool:
    """``org/name`` in the hub's alphabet and no such local path. A mistyped relative path can look
    the same, so every error about a hub id also says it is not a local path."""
    return (_HUB_ID.fullmatch(value) is not None and ".." not in value and not value.endswith((".", "-"))
            and not os.path.exists(os.path.expanduser(value)))


def hub_download(repo_id: str, key: str, *, filename: Optional[str] = None, patterns: Sequence[str] = ()) -> Path:
    """The file ``filename``, or else the snapshot folder of the files matching ``patterns``, of the hub
    model ``repo_id``: downloaded when the hub is reachable (a cached file is not fetched again),
    else from the local Hugging Face cache. Every failure is one ConfigError on ``key``."""
    import huggingface_hub

    def fetch(local_only: bool) -> Path:
        if filename is not None:
            return Path(huggingface_hub.hf_hub_download(repo_id, filename, local_files_only=local_only))
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=list(patterns),
                                                      local_files_only=local_only))

    online_error: Optional[Exception] = None
    if hub_reachable():
        try:
            return fetch(local_only=False)
        except Exception as err:  # noqa: BLE001 - the cache may still have it; else reported below
            online_error = err
    try:
        return fetch(local_only=True)
    except Exception:  # noqa: BLE001 - not cached: the online error (or being offline) is the reason
        pass
    if online_error is None:
        raise ConfigError(key, f"{repo_id!r} is not a local path, and as a Hugging Face hub id it is not in the "
                               f"local cache while the hub is unreachable (offline, or HF_HUB_OFFLINE=1); download "
                               f"it where there is network (hf download {repo_id} --local-dir DIR) and set "
                               f"{key}=/path/to/DIR")
    raise ConfigError(key, _hub_failure(repo_id, key, filename, online_error))


def _hub_failure(repo_id: str, key: str, filename: Optional[str], err: Exception) -> str:
    from huggingface_hub import errors

    if isinstance(err, errors.GatedRepoError):
        return (f"the hub model {repo_id!r} is gated: accept its terms on huggingface.co and log in "
                f"(hf auth login), or download it and set {key}=/path/to/that/folder")
    if isinstance(err, errors.RepositoryNotFoundError):
        return (f"{repo_id!r} is not a local path, and the hub has no model of that name "
                f"(a private one needs hf auth login)")
    if isinstance(err, (errors.EntryNotFoundError, errors.RemoteEntryNotFoundError)) and filename:
        return f"the hub model {repo_id!r} has no {filename}"
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"cannot download {repo_id!r} from the Hugging Face hub ({first[:200]})"
