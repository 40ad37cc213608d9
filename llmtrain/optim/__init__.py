"""Optimizer registry: ``optim=NAME`` picks ``OPTIMIZERS[NAME]``; ``build_optimizer`` makes parameter groups."""

from llmtrain.optim.registry import OPTIMIZERS  # noqa: F401
from llmtrain.optim.param_groups import build_optimizer  # noqa: F401
