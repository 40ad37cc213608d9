"""What the planner models: one run's shape (model, batch, strategy, precision, GPU) and its counts.

``Layout`` is everything the memory and step-time models read, so they can be pointed at a
published run (``scripts/validate_planner.py``) as easily as at an llmtrain config
(``layout_from_config``). Parameter counts come from the model built on the meta device; the
matmul shapes of one block are written out per family so the FLOPs can be checked by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from llmtrain.errors import ConfigError
from llmtrain.hardware import GpuSpec
from llmtrain.models import build_model
from llmtrain.models.config import ModelConfig
from llmtrain.models.llama import llama_ffn_hidden

DEFAULT_STATE_BYTES_PER_PARAM = 8.0  # AdamW's two fp32 moments, when an optimizer does not say
# torchtitan's per-op policy (save every matmul output but every second, and attention's): not an
# llmtrain option, modelled so the planner can be checked against torchtitan's published runs.
CHECKPOINT_MODES = ("none", "selective", "full", "selective_op")


@dataclass(frozen=True)
class Layout:
    model: ModelConfig
    gpu: GpuSpec
    world_size: int = 1
    strategy: str = "none"           # none | ddp | zero1 | zero2 | fsdp | hsdp (resolved)
    gpus_per_node: int = 8
    micro_batch_size: int = 1
    seq_len: int = 2048
    grad_accum_steps: int = 1
    precision: str = "bf16"          # bf16 | fp16 | fp32
    checkpointing: str = "none"      # one of CHECKPOINT_MODES
    compile: bool = False
    optimizer_state_bytes: float = DEFAULT_STATE_BYTES_PER_PARAM  # per parameter, before sharding
    # llmtrain's trainer holds the logits until its micro-batch ends; torchtitan deletes them first
    logits_held_in_backward: bool = True

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch on one GPU."""
        return self.micro_batch_size * self.seq_len

    @property
    def low_precision(self) -> bool:
        return self.precision in ("bf16", "fp16")

    @property
    def nodes(self) -> int:
        return max(1, -(-self.world_size // max(1, self.gpus_per_node)))


def _meta_model(mcfg: ModelConfig):
    with torch.device("meta"):
        return build_model(mcfg)


_COUNTS: dict[str, dict[str, int]] = {}


def param_counts(mcfg: ModelConfig) -> dict[str, int]:
    """total, embedding (input token/position tables), non_embedding, per_block, matmul."""
    key = repr(mcfg)
    if key not in _COUNTS:
        _COUNTS[key] = _count(mcfg)
    return dict(_COUNTS[key])


def _count(mcfg: ModelConfig) -> dict[str, int]:
    model = _meta_model(mcfg)
    total = model.num_params()
    non_embedding = model.num_params(exclude_embeddings=True)
    per_block = sum(p.numel() for p in model.layers[0].parameters())
    head = mcfg.vocab_size * mcfg.d_model
    return {
        "total": total,
        "embedding": total - non_embedding,
        "non_embedding": non_embedding,
        "per_block": per_block,
        # weights that multiply every token: the non-embedding ones plus the head (tied heads
        # were excluded with the embedding they share)
        "matmul": non_embedding + (head if mcfg.tie_embeddings else 0),
    }


def flops_per_token(mcfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6·N_matmul + 12·n_layers·d_model·seq_len (PaLM App. B)."""
    return 6 * param_counts(mcfg)["matmul"] + 12 * mcfg.n_layers * mcfg.d_model * seq_len


def kv_width(mcfg: ModelConfig) -> int:
    return (mcfg.n_kv_heads or mcfg.n_heads) * (mcfg.d_model // mcfg.n_heads)


def ffn_width(mcfg: ModelConfig) -> int:
    return llama_ffn_hidden(mcfg) if mcfg.family == "llama" else (mcfg.ffn_hidden or 4 * mcfg.d_model)


def block_matmuls(mcfg: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of every weight matrix of one block, in the order the forward runs them."""
    d, dkv, f = mcfg.d_model, kv_width(mcfg), ffn_width(mcfg)
    attention = [(d, d), (d, dkv), (d, dkv), (d, d)]  # q, k, v, o
    if mcfg.family == "llama":
        return attention + [(d, f), (d, f), (f, d)]    # gate, up, down
    return attention + [(d, f), (f, d)]                # fc, proj


def optimizer_state_bytes_per_param(optim: dict[str, Any]) -> tuple[float, Optional[str]]:
    """The optimizer class's ``state_bytes_per_param``, or 8.0 and a note saying it was assumed.

    A wrapper whose constructor takes ``base`` (SAM) holds its base optimizer's state.
    """
    import inspect

    from llmtrain.optim import OPTIMIZERS

    name = optim.get("name")
    cls = OPTIMIZERS.get(name)
    base = inspect.signature(cls.__init__).parameters.get("base") if cls is not None else None
    if base is not None:
        name = optim.get("base") or base.default
        cls = OPTIMIZERS.get(name)
    value = getattr(cls, "state_bytes_per_param", None) if cls is not None else None
    if value is None:
        return DEFAULT_STATE_BYTES_PER_PARAM, (
            f"optimizer {name!r} does not declare state_bytes_per_param; "
            f"assumed {DEFAULT_STATE_BYTES_PER_PARAM} (AdamW)")
    return float(value), None


def check_layout(layout: Layout) -> None:
    if layout.checkpointing not in CHECKPOINT_MODES:
        raise ConfigError("model.activation_checkpointing",
                          f"got {layout.checkpointing!r}, expected none, selective or full")
    if layout.world_size < 1:
        raise ConfigError("distributed.world_size", f"got {layout.world_size}, expected >= 1")
