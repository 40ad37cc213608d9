"""name -> optimizer class. Each entry is a torch.optim.Optimizer subclass in its own module."""

from __future__ import annotations

import torch

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {}

# --- core registry (issue 6) ---------------------------------------------------------------
from llmtrain.optim.adam import Adam, AdamW  # noqa: E402

OPTIMIZERS.update({
    "adam": Adam,
    "adamw": AdamW,
})

# --- completed registry (issue 11) ---------------------------------------------------------
from llmtrain.optim.adam_variants import Adamax, NAdam, RAdam  # noqa: E402

OPTIMIZERS.update({
    "nadam": NAdam,
    "radam": RAdam,
    "adamax": Adamax,
})
