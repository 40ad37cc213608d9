"""GPT-2 (Radford et al. 2019): learned positions, LayerNorm, GELU MLP, biases everywhere,
output head tied to the token embedding.

Reference: openai/gpt-2 ``model.py``, nanoGPT, and ``transformers.GPT2LMHeadModel`` (logit parity
is tested in tests/test_export.py). Attention uses separate q/k/v projections; export splits and
joins them to GPT-2's fused ``c_attn``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from llmtrain.models.base import DecoderLM
from llmtrain.models.config import ModelConfig
from llmtrain.models.layers import Attention, GeluMLP, KVCache
from llmtrain.models.linear import Linear


class GPTBlock(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, bias=True,
                              dropout=cfg.dropout)
        self.mlp_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = GeluMLP(cfg.d_model, cfg.ffn_hidden or 4 * cfg.d_model, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, ctx=None, cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), None, cache, layer))
        return x + self.mlp(self.mlp_norm(x))


class GPT(DecoderLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # _weight skips nn.Embedding's own normal_ init: init_weights does it, and on the meta
        # device the first normal_ costs seconds of lazy imports (the dry-run planner builds here).
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, _weight=torch.empty(cfg.vocab_size, cfg.d_model))
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model, _weight=torch.empty(cfg.max_seq_len, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(GPTBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    def _embed(self, idx: torch.Tensor, start: int) -> torch.Tensor:
        pos = torch.arange(start, start + idx.shape[1], device=idx.device)
        return self.drop(self.embed(idx) + self.pos_embed(pos))

    def embedding_params(self) -> list[nn.Parameter]:
        return [self.embed.weight, self.pos_embed.weight]

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2's init: Normal(0, init_std) for matrices and embeddings, zero biases, LayerNorm
        (1, 0), and init_std / sqrt(2 * n_layers) for the residual output projections."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        for block in self.layers:
            nn.init.normal_(block.attn.o_proj.weight, mean=0.0, std=out_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=out_std)
