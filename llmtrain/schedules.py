"""LR schedules as pure functions of the step: ``lr = peak_lr * lr_factor(...)``.

With W warmup steps, T total steps and floor m = ``min_lr_ratio``: warmup f = s/W for s < W
(0 at step 0); then, with p = (s-W)/(T-W) the post-warmup progress:

- constant:        1
- linear:          m + (1-m)(1-p)
- cosine:          m + (1-m)·½(1+cos πp)           (transformers' cosine-with-warmup, floored at m)
- wsd:             1 until T-D, D = round(decay_ratio·T); then q = (s-(T-D))/D and
                   m + (1-m)·g(q), g = 1-q | ½(1+cos πq) | 1-√q      (transformers.get_wsd_schedule)
- inv_sqrt:        max(m, 1/√(s/W))                  (transformers' inverse-sqrt with timescale W)
- cosine_restarts: m + (1-m)·½(1+cos π((num_cycles·p) mod 1))   (hard restarts)

After T every schedule returns its value at T (m for the decaying ones).
"""

from __future__ import annotations

import math

from llmtrain.errors import ConfigError, choices

SCHEDULE_NAMES = ("constant", "linear", "cosine", "wsd", "inv_sqrt", "cosine_restarts")
_DECAY_SHAPES = {
    "linear": lambda q: 1.0 - q,
    "cosine": lambda q: 0.5 * (1.0 + math.cos(math.pi * q)),
    "1-sqrt": lambda q: 1.0 - math.sqrt(q),
}


def lr_factor(
    name: str,
    step: int,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    decay_ratio: float = 0.2,
    decay_shape: str = "linear",
    num_cycles: int = 1,
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if name not in SCHEDULE_NAMES:
        raise ConfigError("schedule.name", f"got {name!r}, expected {choices(SCHEDULE_NAMES)}")
    if decay_shape not in _DECAY_SHAPES:
        raise ConfigError("schedule.decay_shape", f"got {decay_shape!r}, expected {choices(_DECAY_SHAPES)}")
    m = min_lr_ratio
    s = min(step, total_steps)
    if name == "wsd":
        # WSD's decay window is measured from the end, independent of warmup.
        if s < warmup_steps:
            return s / warmup_steps
        decay = round(decay_ratio * total_steps)
        start = total_steps - decay
        if s < start or decay == 0:
            return 1.0 if s < total_steps or decay == 0 else m
        return m + (1.0 - m) * _DECAY_SHAPES[decay_shape]((s - start) / decay)
    if s < warmup_steps:
        return s / warmup_steps
    if name == "constant":
        return 1.0
    if name == "inv_sqrt":
        return max(m, 1.0 / math.sqrt(s / warmup_steps)) if warmup_steps > 0 else 1.0
    p = (s - warmup_steps) / max(1, total_steps - warmup_steps)
    if name == "linear":
        return m + (1.0 - m) * (1.0 - p)
    if name == "cosine":
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))
    # cosine_restarts
    if p >= 1.0:
        return m
    return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * p) % 1.0)))
