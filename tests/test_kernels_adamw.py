"""Fused AdamW Triton kernel vs its PyTorch twin (and the twin vs torch.optim.AdamW), on CPU.

The kernels run under triton's interpreter: ``TRITON_INTERPRET=1`` is set per test with
monkeypatch, which is enough because llmtrain's kernels are handed to ``triton.jit`` at launch
time, not at import, so nothing leaks into other test files.
"""

from __future__ import annotations

import io

import pytest
import torch

pytest.importorskip("triton")

from llmtrain.optim.kernels import adamw as adamw_kernels  # noqa: E402
from llmtrain.optim.kernels.adamw import fused_adamw_  # noqa: E402
from llmtrain.optim.kernels.twins import fused_adamw_reference  # noqa: E402

# Not multiples of the block, the chunk, or each other; 4099 spans two interpreter chunks.
SHAPES = [(37,), (33, 29), (4099,)]
HYPER = dict(beta1=0.9, beta2=0.95, eps=1e-8)


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _tensors(shapes, dtype=torch.float32, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * scale).to(dtype) for s in shapes]


def _roundtrip(tensors):
    buf = io.BytesIO()
    torch.save([t.clone() for t in tensors], buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_kernel_matches_twin_over_steps_with_state_reload(weight_decay):
    p_k = _tensors(SHAPES)
    p_t = [p.clone() for p in p_k]
    m_k, v_k = [torch.zeros_like(p) for p in p_k], [torch.zeros_like(p) for p in p_k]
    m_t, v_t = [torch.zeros_like(p) for p in p_k], [torch.zeros_like(p) for p in p_k]
    step = torch.zeros(())
    for i in range(12):
        grads = _tensors(SHAPES, seed=100 + i)
        step += 1
        fused_adamw_(p_k, grads, m_k, v_k, step, lr=1e-2, weight_decay=weight_decay, **HYPER)
        fused_adamw_reference(p_t, grads, m_t, v_t, step, lr=1e-2, weight_decay=weight_decay, **HYPER)
        for a, b in zip(p_k + m_k + v_k, p_t + m_t + v_t):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        if i == 5:  # resume the kernel run from a saved copy of its state
            m_k, v_k, (step,) = _roundtrip(m_k), _roundtrip(v_k), _roundtrip([step])
    assert not torch.equal(p_k[0], _tensors(SHAPES)[0])


def test_twin_matches_torch_adamw():
    """The oracle itself is torch.optim.AdamW's maths (tensor lr, several param shapes)."""
    params = [torch.nn.Parameter(p) for p in _tensors(SHAPES)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = torch.optim.AdamW(ref, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    step = torch.zeros(())
    for i in range(10):
        grads = _tensors(SHAPES, seed=200 + i)
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        opt.step()
        step += 1
        fused_adamw_reference([p.data for p in params], grads, m, v, step, lr=torch.tensor(3e-3),
                              weight_decay=0.1, **HYPER)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.data, r.data, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(m[0], opt.state[ref[0]]["exp_avg"], atol=1e-6, rtol=1e-6)


def test_bf16_params_with_fp32_master_written_in_same_pass():
    master_k = _tensors(SHAPES, scale=0.5)
    master_t = [w.clone() for w in master_k]
    p_k = [w.to(torch.bfloat16) for w in master_k]
    p_t = [w.to(torch.bfloat16) for w in master_t]
    m_k, v_k = [torch.zeros_like(w) for w in master_k], [torch.zeros_like(w) for w in master_k]
    m_t, v_t = [torch.zeros_like(w) for w in master_k], [torch.zeros_like(w) for w in master_k]
    step = torch.zeros(())
    for i in range(10):
        grads = _tensors(SHAPES, dtype=torch.bfloat16, seed=300 + i)
        step += 1
        fused_adamw_(p_k, grads, m_k, v_k, step, lr=1e-2, weight_decay=0.1, master_params=master_k, **HYPER)
        fused_adamw_reference(p_t, grads, m_t, v_t, step, lr=1e-2, weight_decay=0.1, master_params=master_t, **HYPER)
    for w_k, w_t, pk in zip(master_k, master_t, p_k):
        torch.testing.assert_close(w_k, w_t, atol=1e-6, rtol=1e-6)
        assert pk.dtype == torch.bfloat16
        torch.testing.assert_close(pk, w_k.to(torch.bfloat16), atol=0, rtol=0)


def test_bf16_moments_maximize_and_device_lr():
    p_k = _tensors(SHAPES)
    p_t = [p.clone() for p in p_k]
    m_k = [torch.zeros_like(p, dtype=torch.bfloat16) for p in p_k]
    v_k = [torch.zeros_like(p, dtype=torch.bfloat16) for p in p_k]
    m_t, v_t = [m.clone() for m in m_k], [v.clone() for v in v_k]
    lr = torch.tensor(5e-3)
    steps = [torch.zeros(()) for _ in SHAPES]  # one step counter per tensor is accepted too
    for i in range(10):
        grads = _tensors(SHAPES, seed=400 + i)
        for s in steps:
            s += 1
        lr.mul_(0.9)  # a schedule changing a device lr between steps
        fused_adamw_(p_k, grads, m_k, v_k, steps, lr=lr, weight_decay=0.0, maximize=True, **HYPER)
        fused_adamw_reference(p_t, grads, m_t, v_t, steps, lr=lr, weight_decay=0.0, maximize=True, **HYPER)
    for a, b in zip(p_k, p_t):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for a, b in zip(m_k + v_k, m_t + v_t):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2 * b.abs().max().item(), rtol=0)


def test_one_launch_per_dtype_group(monkeypatch):
    launches = []
    real = adamw_kernels._KERNEL

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(adamw_kernels, "_KERNEL", Counting())
    shapes = [(5,), (7, 3), (300,), (2, 2, 2), (1,)]
    params = _tensors(shapes)
    grads = _tensors(shapes, seed=1)
    fused_adamw_(params, grads, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                 torch.ones(()), lr=1e-3, weight_decay=0.0, **HYPER)
    assert len(launches) == 1
    mixed = params[:2] + [p.to(torch.bfloat16) for p in params[2:]]
    fused_adamw_(mixed, [g.to(p.dtype) for g, p in zip(grads, mixed)], [torch.zeros_like(p) for p in params],
                 [torch.zeros_like(p) for p in params], torch.ones(()), lr=1e-3, weight_decay=0.0, **HYPER)
    assert len(launches) == 3


def test_strided_grad_and_empty_tensor():
    p_k = _tensors([(16, 9), (0,)])
    p_t = [p.clone() for p in p_k]
    grads = [torch.randn(9, 16).t(), torch.zeros(0)]  # transposed: not contiguous
    m_k, v_k = [torch.zeros_like(p) for p in p_k], [torch.zeros_like(p) for p in p_k]
    m_t, v_t = [torch.zeros_like(p) for p in p_k], [torch.zeros_like(p) for p in p_k]
    fused_adamw_(p_k, grads, m_k, v_k, torch.ones(()), lr=1e-2, weight_decay=0.0, **HYPER)
    fused_adamw_reference(p_t, grads, m_t, v_t, torch.ones(()), lr=1e-2, weight_decay=0.0, **HYPER)
    torch.testing.assert_close(p_k[0], p_t[0], atol=1e-6, rtol=1e-6)


def test_dtensor_local_shards(tmp_path):
    """FSDP2 hands the optimizer DTensors: the kernel updates each rank's local shard in place."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        full = _tensors(SHAPES)
        params = [distribute_tensor(p.clone(), mesh, [Shard(0)]) for p in full]
        grads = [distribute_tensor(g, mesh, [Shard(0)]) for g in _tensors(SHAPES, seed=7)]
        m = [distribute_tensor(torch.zeros_like(p), mesh, [Shard(0)]) for p in full]
        v = [distribute_tensor(torch.zeros_like(p), mesh, [Shard(0)]) for p in full]
        fused_adamw_(params, grads, m, v, torch.ones(()), lr=1e-2, weight_decay=0.1, **HYPER)
        ref_m, ref_v = [torch.zeros_like(p) for p in full], [torch.zeros_like(p) for p in full]
        fused_adamw_reference(full, [g.to_local() for g in grads], ref_m, ref_v, torch.ones(()), lr=1e-2,
                              weight_decay=0.1, **HYPER)
        for p, r in zip(params, full):
            torch.testing.assert_close(p.to_local(), r, atol=1e-6, rtol=1e-6)
    finally:
        dist.destroy_process_group()
