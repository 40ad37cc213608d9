"""Triton fused optimizer kernels and their pure-PyTorch twins.

Kernel modules (``adamw``, ``lion``, ``adamw8bit``) import triton; import them only after
``triton_usable`` (or ``require_triton``) said yes. ``twins`` needs only torch.
"""

from __future__ import annotations

from typing import Sequence

import torch

from llmtrain.errors import ConfigError
from llmtrain.optim.kernels._launch import interpret_mode

TRITON_MISSING = 'triton is not installed (pip install "llmtrain[triton]")'


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def triton_usable(device: torch.device | str) -> bool:
    """Whether ``impl="auto"`` should pick the Triton kernels for tensors on ``device``.

    True on CUDA with triton importable. The CPU interpreter is for tests, never picked by auto.
    """
    return torch.device(device).type == "cuda" and triton_importable()


def require_triton(device: torch.device | str, accepted: Sequence[str]) -> None:
    """Raise the config error for ``optim.impl=triton`` where the kernels cannot run.

    They run on CUDA, or anywhere under ``TRITON_INTERPRET=1`` (slow; meant for tests).
    """
    if not triton_importable():
        raise ConfigError("optim.impl", f"{TRITON_MISSING}; accepted here: " + ", ".join(accepted))
    if torch.device(device).type != "cuda" and not interpret_mode():
        raise ConfigError(
            "optim.impl",
            "triton needs a CUDA GPU (or TRITON_INTERPRET=1 for testing); accepted here: " + ", ".join(accepted),
        )


__all__ = ["TRITON_MISSING", "interpret_mode", "require_triton", "triton_importable", "triton_usable"]
