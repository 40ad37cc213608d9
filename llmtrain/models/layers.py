"""Layers shared by the GPT and LLaMA families: norms, rotary embeddings, attention, MLPs, KV cache.

Parameter names follow Hugging Face ``transformers`` (``q_proj``, ``gate_proj``, ...) so that
``llmtrain.export`` maps weights one to one, and RoPE uses the rotate-half convention of
``LlamaForCausalLM`` for the same reason (no q/k permutation on export).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.models.linear import Linear


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 as LLaMA's reference does."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


# ---------------------------------------------------------------------------------------------
# Rotary position embeddings
# ---------------------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict[str, Any]] = None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d); with ``scaling`` the LLaMA-3.1 rule stretches the low ones.

    LLaMA-3.1 keeps wavelengths shorter than original_context/high_freq_factor, divides those
    longer than original_context/low_freq_factor by ``factor``, and interpolates in between.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(head_dim: int, max_seq_len: int, theta: float, scaling=None, device=None):
    """cos/sin tables [max_seq_len, head_dim] in fp32, frequencies repeated for the two halves."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling).to(device)
    pos = torch.arange(max_seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [T, D] for the positions of x."""
    return (x * cos + _rotate_half(x) * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Attention with grouped-query heads and an optional KV cache
# ---------------------------------------------------------------------------------------------


class KVCache:
    """Per-layer key/value buffers for incremental decoding; ``pos`` is the number of cached tokens.

    Buffers are allocated on first use with the dtype of the keys, so a cache filled under bf16
    autocast holds bf16 and matches the queries it is attended with.
    """

    def __init__(self, n_layers: int, max_len: int):
        self.k: list[Optional[torch.Tensor]] = [None] * n_layers
        self.v: list[Optional[torch.Tensor]] = [None] * n_layers
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, Hkv, T, D] at positions pos..pos+T and return everything cached so far."""
        if self.k[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k[layer] = k.new_zeros(shape)
            self.v[layer] = v.new_zeros(shape)
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Causal multi-head attention with ``n_kv_heads`` key/value heads (GQA when fewer than heads).

    Runs through ``F.scaled_dot_product_attention`` so GPUs pick the flash or memory-efficient
    kernel. ``rope`` applies rotary embeddings to q and k (LLaMA); GPT passes ``None``.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, bias: bool, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.q_proj = Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(n_heads * self.head_dim, d_model, bias=bias)

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(layer, k, v)
        mask, causal = None, True
        if start > 0:
            # SDPA's is_causal aligns the mask top-left; queries that continue a cache need it
            # bottom-right: query i (absolute position start+i) sees keys 0..start+i.
            causal = False
            if T > 1:
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


# ---------------------------------------------------------------------------------------------
# MLPs
# ---------------------------------------------------------------------------------------------


def swiglu_hidden(d_model: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """LLaMA's FFN width: 2/3 of 4d (so SwiGLU's three matrices cost what a 4d GELU MLP does),
    times ``ffn_dim_multiplier``, rounded up to ``multiple_of``."""
    hidden = int(2 * 4 * d_model / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020), as in LLaMA."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(d_model, hidden, bias=False)
        self.up_proj = Linear(d_model, hidden, bias=False)
        self.down_proj = Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """proj(gelu_tanh(fc(x))), GPT-2's MLP (its "gelu_new" is the tanh approximation)."""

    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc = Linear(d_model, hidden)
        self.proj = Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V]; temperature <= 0 means greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
