"""The small protocol between the trainer and an optimizer.

The trainer never asks which optimizer it runs. An optimizer opts into extra behaviour by
defining any of these attributes or methods (all optional, duck-typed):

``requires_closure: bool``
    The trainer calls ``optimizer.step(closure)``. ``closure()`` zeroes gradients, re-runs
    forward+backward over every micro-batch of the current step (with the same loss scaling
    and clipping as the main pass) and returns the mean loss as a tensor. SAM, L-BFGS.

``before_step(ctx: StepContext) -> None``
    Called when gradients are ready (after clipping), right before ``step()``.

``after_step(ctx: StepContext) -> None``
    Called right after ``step()``. Sophia refreshes its Hessian-diagonal estimate here every k
    steps by running ``ctx.forward`` on ``ctx.micro_batches`` with labels it samples itself; it
    must leave ``.grad`` zeroed or restored.

``train()`` / ``eval()``
    Schedule-Free keeps two weight sequences. The trainer calls ``eval()`` before evaluation,
    text sampling and checkpoint saving (so checkpoints hold the evaluation weights the reference
    implementation documents), and ``train()`` right after.

``owns_backward: bool`` and ``backward(loss) -> None``
    The optimizer performs the update during the backward pass (LOMO, AdaLomo). The trainer calls
    ``optimizer.backward(loss)`` instead of ``loss.backward()`` and does not call ``step()``;
    clipping is the optimizer's own business.

``refuse(strategy: str, grad_accum_steps: int) -> str | None``
    A one-line reason this optimizer cannot run with that distributed strategy or gradient
    accumulation, or None. The trainer turns a reason into a config error at start-up.

``state_bytes() -> int``
    Bytes of optimizer state held by this rank. Defaults to ``default_state_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class StepContext:
    """What the trainer hands to ``before_step`` / ``after_step`` hooks."""

    model: torch.nn.Module
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]]  # (inputs, targets) per micro-step
    forward: Callable[[torch.Tensor], torch.Tensor]        # inputs -> logits under the run's autocast
    step: int                                               # optimizer steps completed before this one


def default_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (local shards for DTensors), counted once."""
    seen: set[int] = set()
    total = 0
    for state in optimizer.state.values():
        stack = list(state.values()) if isinstance(state, dict) else [state]
        while stack:
            value = stack.pop()
            if isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, (list, tuple)):
                stack.extend(value)
            elif isinstance(value, torch.Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value
                if local.data_ptr() in seen and local.numel() > 0:
                    continue
                seen.add(local.data_ptr())
                total += local.numel() * local.element_size()
    return total


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    fn: Optional[Callable[[], int]] = getattr(optimizer, "state_bytes", None)
    return int(fn()) if callable(fn) else default_state_bytes(optimizer)
