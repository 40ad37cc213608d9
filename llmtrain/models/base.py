"""What GPT and LLaMA share: the forward loop over blocks, activation checkpointing, parameter
counting and KV-cached generation. Each family supplies its embedding, blocks and init."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmtrain.models.config import ModelConfig
from llmtrain.models.layers import KVCache, sample_next


class DecoderLM(nn.Module):
    """A decoder-only language model: ``embed -> layers -> norm -> lm_head``.

    Subclasses define ``embed``, ``layers`` (an ``nn.ModuleList`` of blocks; the distributed code
    wraps each one with FSDP), ``norm``, ``lm_head``, ``_embed(idx, start)``,
    ``_block_context(start, T)`` (what every block needs besides x, e.g. RoPE tables),
    ``embedding_params()``, ``init_weights()`` and, if it has derived buffers, ``reset_buffers()``.

    Activation checkpointing (``cfg.activation_checkpointing``): ``full`` recomputes every block
    in the backward pass; ``selective`` recomputes every other block (blocks 0, 2, 4, ...), which
    roughly halves activation memory at half of full checkpointing's recompute cost.
    """

    cfg: ModelConfig
    layers: nn.ModuleList

    def _embed(self, idx: torch.Tensor, start: int) -> torch.Tensor:
        raise NotImplementedError

    def _block_context(self, start: int, T: int):
        return None

    def embedding_params(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def init_weights(self) -> None:
        raise NotImplementedError

    def reset_buffers(self) -> None:
        """Recompute buffers derived from the config (none unless a family has some)."""

    def _apply(self, fn, *args, **kwargs):
        # .to()/.to_empty() may replace parameters one module at a time, which unties a shared
        # embedding/head pair; tie them again so the head keeps following the embedding.
        out = super()._apply(fn, *args, **kwargs)
        if self.cfg.tie_embeddings and self.lm_head.weight is not self.embed.weight:
            self.lm_head.weight = self.embed.weight
        return out

    def _checkpointed(self, i: int) -> bool:
        mode = self.cfg.activation_checkpointing
        if not (self.training and torch.is_grad_enabled()) or mode == "none":
            return False
        return mode == "full" or (mode == "selective" and i % 2 == 0)

    def forward(self, idx: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        """Token ids [B, T] -> logits [B, T, vocab]. With ``cache``, idx continues the cached tokens."""
        T = idx.shape[1]
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self._embed(idx, start)
        ctx = self._block_context(start, T)
        for i, layer in enumerate(self.layers):
            if cache is None and self._checkpointed(i):
                x = checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx, cache, i)
        if cache is not None:
            cache.pos += T
        return self.lm_head(self.norm(x))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters; ``exclude_embeddings`` drops the input token/position tables
        (a tied output head shares the token table and is dropped with it, as in Kaplan et al.)."""
        skip = {id(p) for p in self.embedding_params()} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, use_cache: bool = True) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` [B, T]; temperature 0 is greedy.

        Decodes one token at a time from a KV cache. Once the sequence is longer than
        ``max_seq_len``, each step recomputes the last ``max_seq_len`` tokens without a cache
        (what an uncached sliding window computes), so cached and uncached outputs agree.
        """
        was_training = self.training
        self.eval()
        limit = self.cfg.max_seq_len
        cache = None
        if use_cache and idx.shape[1] < limit:
            cache = KVCache(len(self.layers), min(limit, idx.shape[1] + max_new_tokens))
        for _ in range(max_new_tokens):
            if cache is not None and cache.pos == 0:
                logits = self(idx, cache)
            elif cache is not None and cache.pos < cache.max_len:
                logits = self(idx[:, -1:], cache)
            else:
                cache = None
                logits = self(idx[:, -limit:])
            nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            idx = torch.cat([idx, nxt.to(idx.dtype)], dim=1)
        self.train(was_training)
        return idx
