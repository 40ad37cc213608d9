"""Modelled time of one optimizer step per GPU: compute, memory-bound work and communication.

Compute (per micro-batch, m = tokens on the GPU):

- every matmul of m x k by k x n: forward once, backward twice (input and weight gradient), each
  taking the soft maximum (2-norm) of ``2mkn / (peak * matmul_efficiency)`` and its operands'
  traffic over the HBM bandwidth (what makes thin matmuls slower than large ones);
- causal flash attention: forward ``2 * b * s^2 * d`` FLOPs (half of the 4bs²d a full score
  matrix costs), backward 2.5 times that (FlashAttention-2 recomputes the scores), at
  ``attention_efficiency * s / (s + 256)`` of peak (short sequences fill the GPU less);
- in fp32 both run at the GPU's fp32 rate: llmtrain leaves TF32 off;
- recompute: ``full`` reruns every block's forward, ``selective`` every other block's,
  ``selective_op`` the unsaved matmuls (the 2nd, 4th and 6th) and every elementwise op.

Memory-bound work, at ``HBM_EFFICIENCY`` of the datasheet bandwidth:

- the elementwise kernels of a block (norms, RoPE, residual adds, activations, the attention
  output's copy), counted per token in bytes read and written; eager PyTorch runs each op as its
  own kernel (bf16 forward: llama 124d + 36k + 10f, of which the fp32 RMSNorms 72d and RoPE
  36(d + k); gpt 68d + 4f; backward twice that), ``train.compile`` fuses them (llama
  24d + 4k + 6f, gpt 20d + 4f); fp32 doubles them;
- the loss: the fp32 copy of the logits, log_softmax and their backward, 44 B per logit
  (not compiled: the loss runs outside the compiled blocks);
- the optimizer step on this GPU's shard: read and write master weights and state, read the
  gradient: 12 + 2 x state bytes per parameter, plus 12 for gradient clipping; FSDP also casts
  the full gradient to fp32 for its reduce-scatter (6 B/param).

Communication per step and GPU (ring collectives move (N-1)/N of the buffer), at
``LINK_EFFICIENCY`` of NVLink within a node or of the NIC across nodes:

- ddp: all-reduce of fp32 gradients, 2 x 4 B/param, overlapped with the last backward;
- zero1: that, plus the owners' broadcast of updated fp32 weights (4 B/param), not overlapped;
- zero2: all-gather of compute-dtype weights once per micro-batch, reduce-scatter of fp32
  gradients once per step;
- fsdp: all-gather before forward and again before backward of every block, per micro-batch;
  reduce-scatter once per step;
- hsdp: fsdp's within a node, plus an all-reduce of each shard's gradient across nodes.

FSDP prefetches the next block's all-gather and reduces a block while the previous one computes,
so communication is exposed only where a phase's collectives outlast its compute, plus the
all-gather of the root and first block that starts every forward and the reduce-scatter of the
first block and the root that ends the backward.
"""

from __future__ import annotations

from llmtrain.hardware import HBM_EFFICIENCY, LINK_EFFICIENCY
from llmtrain.plan_layout import Layout, block_matmuls, ffn_width, kv_width, param_counts

ATTENTION_HALF_EFFICIENCY_SEQ = 256  # flash attention reaches half its efficiency at this length
P_ROOF = 2.0  # a matmul takes the p-norm of its compute time and its traffic time (a soft roofline)
LOSS_BYTES_PER_LOGIT = 44
CLIP_BYTES_PER_PARAM = 12
FSDP_GRAD_CAST_BYTES = 6
DDP_BUCKET_BYTES = 25 * 2**20
GRAD_BYTES = 4  # fp32 gradients

# elementwise bytes per token of one block's forward in bf16: (d, k, f) coefficients
_EAGER_BYTES = {"llama": (124, 36, 10), "gpt": (68, 0, 4)}
_COMPILED_BYTES = {"llama": (24, 4, 6), "gpt": (20, 0, 4)}


def gemm_seconds(m: int, k: int, n: int, layout: Layout) -> float:
    """One m x k by k x n matmul: FLOPs at the GPU's matmul efficiency plus its operands' traffic."""
    gpu, b = layout.gpu, (2 if layout.low_precision else 4)
    flops = 2.0 * m * k * n
    traffic = b * (m * k + k * n + m * n)
    peak = gpu.peak_flops if layout.low_precision else gpu.fp32_flops
    t_flops, t_bytes = flops / (peak * gpu.matmul_efficiency), traffic / (gpu.hbm_bytes_per_s * HBM_EFFICIENCY)
    return (t_flops**P_ROOF + t_bytes**P_ROOF) ** (1 / P_ROOF)


def attention_seconds(layout: Layout) -> tuple[float, float]:
    """(forward, backward) seconds of causal flash attention in one block for one micro-batch."""
    m, s = layout.model, layout.seq_len
    gpu = layout.gpu
    forward_flops = 2.0 * layout.micro_batch_size * s * s * m.d_model
    efficiency = gpu.attention_efficiency * s / (s + ATTENTION_HALF_EFFICIENCY_SEQ)
    peak = gpu.peak_flops if layout.low_precision else gpu.fp32_flops
    forward = forward_flops / (peak * efficiency)
    return forward, 2.5 * forward


def elementwise_bytes_per_token(layout: Layout) -> float:
    """Bytes one block's forward elementwise kernels move per token (backward moves twice this)."""
    m = layout.model
    cd, ck, cf = (_COMPILED_BYTES if layout.compile else _EAGER_BYTES)[m.family]
    scale = 1 if layout.low_precision else 2
    return scale * (cd * m.d_model + ck * kv_width(m) + cf * ffn_width(m))


def recompute_shares(layout: Layout) -> tuple[float, float, float]:
    """Shares of a block's forward matmuls, attention and elementwise work rerun in backward."""
    mode, m = layout.checkpointing, layout.model
    if mode == "full":
        return 1.0, 1.0, 1.0
    if mode == "selective":
        share = -(-m.n_layers // 2) / m.n_layers
        return share, share, share
    if mode == "selective_op":
        d, k, f = m.d_model, kv_width(m), ffn_width(m)
        rerun = d * k + d * d + d * f  # the 2nd, 4th and 6th matmul: k, o and up (llama) or proj (gpt)
        return rerun / sum(a * b for a, b in block_matmuls(m)), 0.0, 1.0
    return 0.0, 0.0, 0.0


def compute_seconds(layout: Layout) -> dict[str, float]:
    """Per micro-batch: matmul, attention, elementwise and loss seconds, and the forward and
    backward phases they make up (recompute runs in backward)."""
    m, L, tokens = layout.model, layout.model.n_layers, layout.tokens
    block_gemm = sum(gemm_seconds(tokens, k, n, layout) for k, n in block_matmuls(m))
    head_gemm = gemm_seconds(tokens, m.d_model, m.vocab_size, layout)
    attn_fwd, attn_bwd = attention_seconds(layout)
    bandwidth = layout.gpu.hbm_bytes_per_s * HBM_EFFICIENCY
    elem_fwd = tokens * elementwise_bytes_per_token(layout) / bandwidth
    mm_share, attn_share, elem_share = recompute_shares(layout)
    loss = tokens * m.vocab_size * LOSS_BYTES_PER_LOGIT / bandwidth
    forward = L * (block_gemm + attn_fwd + elem_fwd) + head_gemm
    backward = L * (block_gemm * (2 + mm_share) + attn_bwd + attn_share * attn_fwd + elem_fwd * (2 + elem_share))
    return {
        "matmul": L * block_gemm * (3 + mm_share) + 3 * head_gemm,
        "attention": L * (attn_fwd * (1 + attn_share) + attn_bwd),
        "elementwise": L * elem_fwd * (3 + elem_share),
        "loss": loss,
        "forward": forward,
        "backward": backward + 2 * head_gemm + loss,
    }


def optimizer_seconds(layout: Layout) -> float:
    """The optimizer step, clipping and gradient casts on this GPU's share of the parameters."""
    from llmtrain.plan_memory import shard_factors

    P = param_counts(layout.model)["total"]
    strategy = layout.strategy if layout.world_size > 1 else "none"
    _, g_shard, o_shard = shard_factors(strategy, layout.world_size, layout.gpus_per_node)
    step = P / o_shard * (12 + 2 * layout.optimizer_state_bytes)
    clip = P / g_shard * CLIP_BYTES_PER_PARAM
    cast = P * FSDP_GRAD_CAST_BYTES if strategy in ("zero2", "fsdp", "hsdp") and layout.low_precision else 0
    return (step + clip + cast) / (layout.gpu.hbm_bytes_per_s * HBM_EFFICIENCY)


def _link_bandwidth(layout: Layout, crosses_nodes: bool, nic_per_rank: bool = False) -> float:
    """Bytes/s a rank moves in a ring collective. A ring over several nodes enters each node once
    per channel and NCCL runs one channel per NIC, so a node's GPUs share all its NICs and the
    per-rank rate is the smaller of NVLink and gpus_per_node x one NIC (``nic_per_rank``: each
    rank's ring uses only its own NIC, as HSDP's cross-node all-reduce does)."""
    gpu = layout.gpu
    bandwidth = gpu.intra_node_bytes_per_s
    if crosses_nodes:
        nics = 1 if nic_per_rank else max(1, min(layout.gpus_per_node, layout.world_size))
        bandwidth = min(bandwidth, nics * gpu.inter_node_bytes_per_s)
    return bandwidth * LINK_EFFICIENCY


def _ring(nbytes: float, group: int) -> float:
    """Bytes each rank sends in a ring all-gather or reduce-scatter of an ``nbytes`` buffer."""
    return nbytes * (group - 1) / group if group > 1 else 0.0


def communication_seconds(layout: Layout, compute: dict[str, float]) -> dict[str, float]:
    """Per step: seconds of collectives in all, and the part compute does not hide."""
    N, strategy = layout.world_size, layout.strategy
    if N <= 1 or strategy == "none":
        return {"total": 0.0, "exposed": 0.0}
    counts = param_counts(layout.model)
    P, block, L = counts["total"], counts["per_block"], layout.model.n_layers
    micro, fwd, bwd = layout.grad_accum_steps, compute["forward"], compute["backward"]
    if strategy in ("ddp", "zero1"):
        bw = _link_bandwidth(layout, crosses_nodes=layout.nodes > 1)
        allreduce = 2 * _ring(GRAD_BYTES * P, N) / bw
        exposed = max(0.0, allreduce - bwd) + 2 * _ring(DDP_BUCKET_BYTES, N) / bw
        broadcast = _ring(GRAD_BYTES * P, N) / bw if strategy == "zero1" else 0.0
        return {"total": allreduce + broadcast, "exposed": exposed + broadcast}
    group = min(layout.gpus_per_node, N) if strategy == "hsdp" else N
    bw = _link_bandwidth(layout, crosses_nodes=group > layout.gpus_per_node)
    weight_bytes = 2 if layout.low_precision else 4
    root = P - L * block
    edge_gather = _ring(weight_bytes * (root + block), group) / bw
    edge_scatter = _ring(GRAD_BYTES * (root + block), group) / bw
    fwd_gather = _ring(weight_bytes * (L - 1) * block, group) / bw
    # fsdp gathers again for backward, except the last block (kept) and the first (the edge)
    bwd_gather = 0.0 if strategy == "zero2" else _ring(weight_bytes * max(0, L - 2) * block, group) / bw
    scatter = _ring(GRAD_BYTES * (L - 1) * block, group) / bw
    replicas = N // group
    cross = 0.0
    if strategy == "hsdp" and replicas > 1:
        nic = _link_bandwidth(layout, crosses_nodes=True, nic_per_rank=True)
        cross = 2 * _ring(GRAD_BYTES * P / group, replicas) / nic
    per_micro = edge_gather + max(0.0, fwd_gather - fwd)
    exposed = micro * per_micro + (micro - 1) * max(0.0, bwd_gather - bwd)
    exposed += max(0.0, bwd_gather + scatter + cross - bwd) + edge_scatter  # the last micro-batch reduces
    total = micro * (edge_gather + fwd_gather + bwd_gather) + scatter + edge_scatter + cross
    return {"total": total, "exposed": exposed}


def step_time(layout: Layout) -> dict[str, float | str]:
    """Seconds per optimizer step by part, tokens/s per GPU and what bounds the step."""
    compute = compute_seconds(layout)
    comm = communication_seconds(layout, compute)
    micro = layout.grad_accum_steps
    compute_s = micro * (compute["matmul"] + compute["attention"])
    memory_s = micro * (compute["elementwise"] + compute["loss"]) + optimizer_seconds(layout)
    step_s = compute_s + memory_s + comm["exposed"]
    parts = {"compute": compute_s, "memory_bound": memory_s, "communication": comm["exposed"]}
    return {
        "step_s": step_s,
        "compute_s": compute_s,
        "matmul_s": micro * compute["matmul"],
        "attention_s": micro * compute["attention"],
        "memory_bound_s": memory_s,
        "communication_s": comm["total"],
        "exposed_communication_s": comm["exposed"],
        "tokens_per_s_per_gpu": micro * layout.tokens / step_s,
        "bound": max(parts, key=parts.get),
    }
