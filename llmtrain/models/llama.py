"""LLaMA (Touvron et al. 2023; LLaMA-2, LLaMA-3): RMSNorm, rotary embeddings, SwiGLU,
grouped-query attention, no biases, untied output head unless ``tie_embeddings``.

Reference: meta-llama/llama ``model.py`` and ``transformers.LlamaForCausalLM`` (logit parity is
tested in tests/test_export.py).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from llmtrain.models.base import DecoderLM
from llmtrain.models.config import ModelConfig
from llmtrain.models.layers import Attention, KVCache, RMSNorm, SwiGLU, rope_cos_sin, swiglu_hidden
from llmtrain.models.linear import Linear


def llama_ffn_hidden(cfg: ModelConfig) -> int:
    return cfg.ffn_hidden or swiglu_hidden(cfg.d_model, cfg.multiple_of, cfg.ffn_dim_multiplier)


class LlamaBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, bias=False,
                              dropout=cfg.dropout)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, llama_ffn_hidden(cfg))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), rope, cache, layer))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Llama(DecoderLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.d_model // cfg.n_heads
        # _weight skips nn.Embedding's own normal_ init: init_weights does it, and on the meta
        # device the first normal_ costs seconds of lazy imports (the dry-run planner builds here).
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, _weight=torch.empty(cfg.vocab_size, cfg.d_model))
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # RoPE tables derive from the config, so they stay out of checkpoints (persistent=False);
        # reset_buffers fills them (on meta they stay empty until to_empty + init_weights).
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, self.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, self.head_dim), persistent=False)
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    def _embed(self, idx: torch.Tensor, start: int) -> torch.Tensor:
        return self.embed(idx)

    def _block_context(self, start: int, T: int):
        return self.rope_cos[start:start + T], self.rope_sin[start:start + T]

    def embedding_params(self) -> list[nn.Parameter]:
        return [self.embed.weight]

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) for matrices and embeddings; the projections that write into the
        residual stream (o_proj, down_proj) use init_std / sqrt(2 * n_layers) so the residual
        variance does not grow with depth (GPT-2's rule); norms start at 1. Also rebuilds the RoPE
        tables (``reset_buffers``)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.embed.weight, mean=0.0, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=std)
        for block in self.layers:
            for lin in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj,
                        block.mlp.gate_proj, block.mlp.up_proj):
                nn.init.normal_(lin.weight, mean=0.0, std=std)
            for lin in (block.attn.o_proj, block.mlp.down_proj):
                nn.init.normal_(lin.weight, mean=0.0, std=out_std)
            block.attn_norm.reset_parameters()
            block.mlp_norm.reset_parameters()
        self.norm.reset_parameters()
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the RoPE tables in place (after ``to_empty`` they hold garbage)."""
        cos, sin = rope_cos_sin(self.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta,
                                self.cfg.rope_scaling, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
