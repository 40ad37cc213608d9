"""Is the Hugging Face hub reachable? Asked before any hub call, because huggingface_hub retries
an unreachable host for about a minute before it gives up; offline we fail in a few seconds."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


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
