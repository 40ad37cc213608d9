"""Fused Lion Triton kernel vs its PyTorch twin, and the twin vs lion_pytorch.Lion (CPU, interpreter)."""

from __future__ import annotations

import io

import pytest
import torch

pytest.importorskip("triton")

from llmtrain.optim.kernels.lion import fused_lion_  # noqa: E402
from llmtrain.optim.kernels.twins import fused_lion_reference  # noqa: E402

SHAPES = [(37,), (33, 29), (4099,)]


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _tensors(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_kernel_matches_twin_over_steps_with_state_reload(weight_decay):
    p_k = _tensors(SHAPES)
    p_t = [p.clone() for p in p_k]
    m_k, m_t = [torch.zeros_like(p) for p in p_k], [torch.zeros_like(p) for p in p_k]
    for i in range(12):
        grads = _tensors(SHAPES, seed=100 + i)
        fused_lion_(p_k, grads, m_k, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=weight_decay)
        fused_lion_reference(p_t, grads, m_t, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=weight_decay)
        for a, b in zip(p_k + m_k, p_t + m_t):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        if i == 5:
            buf = io.BytesIO()
            torch.save(m_k, buf)
            buf.seek(0)
            m_k = torch.load(buf, weights_only=True)


def test_twin_matches_lion_pytorch():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    params = _tensors(SHAPES)
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    opt = lion_pytorch.Lion(ref, lr=3e-4, betas=(0.9, 0.99), weight_decay=0.1)
    m = [torch.zeros_like(p) for p in params]
    for i in range(10):
        grads = _tensors(SHAPES, seed=200 + i)
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        opt.step()
        fused_lion_reference(params, grads, m, lr=3e-4, beta1=0.9, beta2=0.99, weight_decay=0.1)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r.data, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m[1], opt.state[ref[1]]["exp_avg"], atol=1e-6, rtol=1e-6)


def test_bf16_params_maximize_and_device_lr():
    p_k = _tensors(SHAPES, dtype=torch.bfloat16)
    p_t = [p.clone() for p in p_k]
    m_k = [torch.zeros_like(p, dtype=torch.float32) for p in p_k]
    m_t = [m.clone() for m in m_k]
    lr = torch.tensor(1e-2)
    for i in range(10):
        grads = _tensors(SHAPES, dtype=torch.bfloat16, seed=300 + i)
        fused_lion_(p_k, grads, m_k, lr=lr, beta1=0.95, beta2=0.98, weight_decay=0.1, maximize=True)
        fused_lion_reference(p_t, grads, m_t, lr=lr, beta1=0.95, beta2=0.98, weight_decay=0.1, maximize=True)
        lr.mul_(0.8)
    for a, b in zip(p_k + m_k, p_t + m_t):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
