"""``Linear``: ``nn.Linear`` whose fp32 CPU matmuls go through oneDNN instead of the BLAS.

Which backend, and why, is ``llmtrain.cpu_matmul``'s (``train.cpu_matmul``). Measured on the 2-core
AMD EPYC (AVX-512) of the README, ``llama_tiny`` shapes: the forward matmul 4.67 → 1.76 ms, the input
gradient 3.92 → 1.86 ms, the weight gradient 4.06 → 2.95 ms; the whole training step 1.3-1.4x faster
(``scripts/bench_train.py``: 410 -> 308 ms). Parameter names and types are ``nn.Linear``'s, so
checkpoints, ``to_hf`` and FSDP see no difference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.cpu_matmul import onednn_mm_t, uses_onednn


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear``, through oneDNN for fp32 CPU tensors when the backend allows it."""
    if uses_onednn(x, weight):
        # _unsafe_view (what torch.matmul returns): the same reshape, but not a view, so a wrapper
        # that hooks module outputs (FSDP2's pre-backward hook) gets a tensor of its own
        out = torch.ops.aten._unsafe_view(onednn_mm_t(x.reshape(-1, x.shape[-1]), weight),
                                          (*x.shape[:-1], weight.shape[0]))
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` computed by ``linear`` (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
