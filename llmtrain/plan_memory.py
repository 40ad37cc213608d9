"""Modelled peak memory per GPU of a training step (``Layout`` -> bytes by part).

Parts, each at its own full size:

- ``weights``: fp32 master weights, 4 B/param, over the parameter-sharding factor.
- ``gradients``: fp32 gradients, 4 B/param, over the gradient-sharding factor.
- ``optimizer``: the optimizer's ``state_bytes_per_param`` over the optimizer-sharding factor.
- ``working``: copies that live only through forward and backward. Autocast keeps a 2 B/param
  low-precision copy of every weight (none/ddp/zero1), DDP its fp32 gradient buckets (4 B/param);
  zero2 holds every parameter unsharded in the compute dtype; fsdp/hsdp hold the root module
  (embeddings, final norm, head) unsharded, two blocks (the current and the prefetched one), the
  head's unsharded gradient and one block's gradient in the compute dtype and in fp32 for the
  reduce-scatter.
- ``accumulated_gradients``: with gradient accumulation, the gradients kept between micro-batches:
  ddp/zero1 keep their fp32 gradients, FSDP2 without gradient sync keeps them unsharded in fp32.
- ``activations``: what autograd saves for backward. Per token and block, counted on llmtrain's
  own blocks (tests re-measure them with ``saved_tensors_hooks``), in bytes, with d = d_model,
  k = the key/value width, f = the FFN width, h = heads:

  ==========================  ===============================  ========================
  block                       llama                            gpt
  ==========================  ===============================  ========================
  fp32                        32d + 8k + 16f + 8 + 4h          32d + 8f + 16 + 4h
  bf16, bf16 params (FSDP2)   20d + 4k + 8f + 8 + 4h           16d + 4f + 8 + 4h
  bf16 autocast, fp32 params  30d + 4k + 8f + 8 + 4h           24d + 4f + 16 + 4h
  compiled, fp32              24d + 8k + 12f + 8 + 4h          (eager's)
  compiled, bf16              12d + 4k + 6f + 8 + 4h           (eager's)
  ==========================  ===============================  ========================

  The fp32 norm statistics are why a bf16 block saves more than half an fp32 one. The final
  norm and the head's input add 12d/8d/10d (llama) or 8d/4d/6d (gpt) and the targets 8-16 B.
  Checkpointing ``full`` keeps only each block's input; ``selective`` (llmtrain: every other
  block, 0, 2, 4, ...) keeps full activations for the others; ``selective_op`` (torchtitan's per-op
  policy) keeps every other matmul output (q, v, gate, down), attention's output and the input.
  Compiled llama blocks save less (inductor recomputes the cheap ops in backward).
- ``recompute``: one block's full activations, rebuilt during its backward when checkpointing.
- ``loss``: the logits and the cross-entropy's buffers at the start of backward: the logits the
  trainer holds (2 B, fp32 4 B), log_softmax's fp32 output, the fp32 gradient of nll_loss and that
  of log_softmax's input: 14 B per token and vocabulary entry (16 B in fp32).
- ``allocator``: what the caching allocator reserves beyond what is allocated (fragmentation), a
  share of the memory that comes and goes within a step, calibrated on one published run.

``total`` is the peak of two moments, not the sum of the parts: the start of backward (weights,
optimizer, working, accumulated gradients, activations and the larger of loss and recompute) and
the optimizer step (weights, optimizer, gradients, DDP buckets), plus the allocator's share. It is
comparable with ``torch.cuda.max_memory_reserved``; the CUDA context and NCCL buffers come on top
(``runtime_reserve_bytes``).
"""

from __future__ import annotations

import math

from llmtrain.plan_layout import Layout, kv_width, ffn_width, param_counts

MASTER_BYTES = 4    # fp32 master weights
GRAD_BYTES = 4      # fp32 gradients (FSDP reduces in fp32)
# Caching-allocator reserve beyond allocation, as a share of the memory that comes and goes in a
# step: eager backward frees and allocates many odd-sized temporaries, compiled blocks few.
# Calibrated on torchtitan's Llama 3.1 8B 8xH100 FSDP rows (scripts/validate_planner.py --calibrate).
ALLOCATOR_FRACTION_EAGER = 0.186
ALLOCATOR_FRACTION_COMPILED = 0.096
CUDA_CONTEXT_BYTES = 1 << 30   # CUDA context, cuBLAS workspaces
NCCL_BYTES = 1 << 29           # NCCL communicator buffers, when distributed

# bytes per token and block: (d, k, f, 1, h) coefficients, see the module docstring
_BLOCK_BYTES = {
    ("llama", "fp32"): (32, 8, 16, 8, 4),
    ("llama", "bf16_params"): (20, 4, 8, 8, 4),
    ("llama", "autocast"): (30, 4, 8, 8, 4),
    ("llama", "fp32_compiled"): (24, 8, 12, 8, 4),
    ("llama", "low_compiled"): (12, 4, 6, 8, 4),
    ("gpt", "fp32"): (32, 0, 8, 16, 4),
    ("gpt", "bf16_params"): (16, 0, 4, 8, 4),
    ("gpt", "autocast"): (24, 0, 4, 16, 4),
}
# final norm and the head's input, per token: (d, 1)
_HEAD_BYTES = {
    ("llama", "fp32"): (12, 12), ("llama", "bf16_params"): (8, 12), ("llama", "autocast"): (10, 12),
    ("gpt", "fp32"): (8, 24), ("gpt", "bf16_params"): (4, 20), ("gpt", "autocast"): (6, 24),
}


def shard_factors(strategy: str, world_size: int, gpus_per_node: int) -> tuple[int, int, int]:
    """How many ways weights, gradients and optimizer state are split (see distributed.py)."""
    n = world_size
    s = max(1, min(gpus_per_node, n))
    return {
        "none": (1, 1, 1), "ddp": (1, 1, 1), "zero1": (1, 1, n),
        "zero2": (n, n, n), "fsdp": (n, n, n), "hsdp": (s, s, s),
    }[strategy]


def params_sharded(layout: Layout) -> bool:
    """FSDP2 strategies hand the blocks compute-dtype parameters; the others run autocast on fp32."""
    return layout.strategy in ("zero2", "fsdp", "hsdp") and layout.world_size > 1


def _dtype_key(layout: Layout) -> str:
    if not layout.low_precision:
        return "fp32"
    return "bf16_params" if params_sharded(layout) else "autocast"


def block_activation_bytes_per_token(layout: Layout) -> int:
    """Bytes autograd saves per token in one block without checkpointing."""
    m = layout.model
    key = _dtype_key(layout)
    if layout.compile and m.family == "llama":
        key = "fp32_compiled" if key == "fp32" else "low_compiled"  # inductor recomputes the cheap ops
    cd, ck, cf, c1, ch = _BLOCK_BYTES[(m.family, key)]
    return cd * m.d_model + ck * kv_width(m) + cf * ffn_width(m) + c1 + ch * m.n_heads


def _act_bytes(layout: Layout) -> int:
    return 2 if layout.low_precision else 4


def saved_block_bytes_per_token(layout: Layout) -> float:
    """Bytes per token all blocks keep for backward under the checkpointing mode (averaged)."""
    m, L = layout.model, layout.model.n_layers
    full = block_activation_bytes_per_token(layout)
    boundary = _act_bytes(layout) * m.d_model  # a checkpointed block keeps its input
    mode = layout.checkpointing
    if mode == "full":
        return L * boundary
    if mode == "selective":
        checkpointed = math.ceil(L / 2)
        return checkpointed * boundary + (L - checkpointed) * full
    if mode == "selective_op":
        d, k, f = m.d_model, kv_width(m), ffn_width(m)
        # q, v, gate/fc and down/proj outputs, attention's output, the block's input (gpt: no down)
        kept = (4 * d + k + f) if m.family == "llama" else (3 * d + k + f)
        return L * (_act_bytes(layout) * kept + 4 * m.n_heads)
    return L * full


def activation_bytes(layout: Layout) -> int:
    """Saved activations of one micro-batch: the blocks, the final norm and the head's input."""
    m = layout.model
    hd, h1 = _HEAD_BYTES[(m.family, _dtype_key(layout))]
    per_token = saved_block_bytes_per_token(layout) + hd * m.d_model + h1
    return int(layout.tokens * per_token)


def recompute_bytes(layout: Layout) -> int:
    if layout.checkpointing == "none":
        return 0
    return layout.tokens * block_activation_bytes_per_token(layout)


def loss_bytes(layout: Layout) -> int:
    logits = _act_bytes(layout) if layout.logits_held_in_backward else 0
    return layout.tokens * layout.model.vocab_size * (logits + 12)


def working_bytes(layout: Layout) -> int:
    counts = param_counts(layout.model)
    P, block = counts["total"], counts["per_block"]
    compute = _act_bytes(layout)
    strategy = layout.strategy if layout.world_size > 1 else "none"
    if strategy in ("none", "ddp", "zero1"):
        autocast_copies = 2 * P if layout.low_precision else 0
        buckets = GRAD_BYTES * P if strategy in ("ddp", "zero1") else 0
        return autocast_copies + buckets
    grad_transient = block * (compute + (GRAD_BYTES if layout.low_precision else 0))
    if strategy == "zero2":
        return compute * P + grad_transient
    root = P - layout.model.n_layers * block
    head_grad = 0 if layout.model.tie_embeddings else compute * layout.model.vocab_size * layout.model.d_model
    return compute * (root + 2 * block) + head_grad + grad_transient


def accumulated_gradient_bytes(layout: Layout) -> int:
    if layout.grad_accum_steps <= 1:
        return 0
    return GRAD_BYTES * param_counts(layout.model)["total"]


def runtime_reserve_bytes(layout: Layout) -> int:
    """CUDA context and NCCL buffers: GPU memory outside PyTorch's allocator."""
    return CUDA_CONTEXT_BYTES + (NCCL_BYTES if layout.world_size > 1 else 0)


def memory_parts(layout: Layout) -> dict[str, int]:
    """Every part at its own full size (see the module docstring)."""
    P = param_counts(layout.model)["total"]
    strategy = layout.strategy if layout.world_size > 1 else "none"
    w_shard, g_shard, o_shard = shard_factors(strategy, layout.world_size, layout.gpus_per_node)
    return {
        "weights": math.ceil(MASTER_BYTES * P / w_shard),
        "gradients": math.ceil(GRAD_BYTES * P / g_shard),
        "optimizer": math.ceil(layout.optimizer_state_bytes * P / o_shard),
        "working": working_bytes(layout),
        "accumulated_gradients": accumulated_gradient_bytes(layout),
        "activations": activation_bytes(layout),
        "recompute": recompute_bytes(layout),
        "loss": loss_bytes(layout),
    }


def peak_allocated(parts: dict[str, int], layout: Layout) -> tuple[int, int, str]:
    """(bytes allocated at the peak, the transient part of them, which moment is the peak)."""
    transient = parts["activations"] + max(parts["loss"], parts["recompute"]) + parts["working"]
    backward = parts["weights"] + parts["optimizer"] + parts["accumulated_gradients"] + transient
    buckets = GRAD_BYTES * param_counts(layout.model)["total"] if layout.strategy in ("ddp", "zero1") else 0
    step = parts["weights"] + parts["optimizer"] + parts["gradients"] + buckets
    return (backward, transient, "backward") if backward >= step else (step, transient, "optimizer step")


def allocator_fraction(layout: Layout) -> float:
    return ALLOCATOR_FRACTION_COMPILED if layout.compile else ALLOCATOR_FRACTION_EAGER


def memory_per_gpu(layout: Layout) -> dict[str, int]:
    """Bytes per GPU by part, ``allocator`` and ``total``, the peak (see the module docstring)."""
    parts = memory_parts(layout)
    allocated, transient, _ = peak_allocated(parts, layout)
    allocator = int(allocator_fraction(layout) * transient)
    return {**parts, "allocator": allocator, "total": allocated + allocator}


def peak_moment(layout: Layout) -> str:
    """When the peak happens: "backward" (its start) or "optimizer step"."""
    return peak_allocated(memory_parts(layout), layout)[2]
