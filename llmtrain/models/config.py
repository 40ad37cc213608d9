"""The model config: one dataclass for both families; presets live in configs/model/."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModelConfig:
    name: str = "llama_tiny"          # preset name (a file in configs/model/)
    family: str = "llama"             # llama | gpt
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 8
    n_kv_heads: Optional[int] = None  # None = n_heads (no GQA)
    ffn_hidden: Optional[int] = None  # None = family default (4*d for gpt, SwiGLU 8/3*d rounded for llama)
    multiple_of: int = 256            # llama: round ffn_hidden up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    vocab_size: int = 4096
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    # LLaMA-3.1 style frequency scaling, e.g. {factor: 8, low_freq_factor: 1, high_freq_factor: 4,
    # original_max_position_embeddings: 8192}; None disables it.
    rope_scaling: Optional[dict[str, Any]] = None
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    dropout: float = 0.0
    init_std: float = 0.02
    activation_checkpointing: str = "none"  # none | full | selective
    # Weights to start from (step 0, any optimizer): a Hugging Face model folder, a hub id (org/name;
    # downloaded, or read from the local HF cache offline), or an llmtrain checkpoint or run directory.
    init_from: Optional[str] = None
    # Take the architecture (family, shapes, rope, norm eps, tie, vocab, context) from this Hugging Face
    # folder's or hub id's config.json instead of the preset; model.KEY=VALUE on the command line still wins.
    from_hf: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)
