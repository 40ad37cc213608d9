"""``llmtrain.models.linear``: fp32 CPU linears through oneDNN compute what ``F.linear`` does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmtrain.cpu_matmul import cpu_matmul, onednn_available, set_cpu_matmul
from llmtrain.errors import ConfigError
from llmtrain.models import ModelConfig, build_model
from llmtrain.models.linear import Linear, linear

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


def _grads(fn, *tensors):
    for t in tensors:
        t.grad = None
    out = fn(*tensors)
    # a loss whose gradient is not constant, so the backward matmuls see varied values
    out.pow(2).sum().backward()
    return out.detach(), [t.grad.clone() for t in tensors]


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(7, 13), (3, 5, 13), (2, 1, 13)])
def test_forward_and_grads_match_f_linear(shape, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    w = torch.randn(11, 13, generator=gen, requires_grad=True)
    b = torch.randn(11, generator=gen, requires_grad=True) if bias else None
    tensors = (x, w) if b is None else (x, w, b)
    set_cpu_matmul("onednn")
    out, grads = _grads(linear, *tensors)
    ref_out, ref_grads = _grads(F.linear, *tensors)
    assert out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_strided_input():
    """Views that are not contiguous (a transposed activation) give F.linear's result."""
    x = torch.randn(13, 6).t()
    w = torch.randn(4, 13)
    set_cpu_matmul("onednn")
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_aten_backend_and_autocast_take_f_linear():
    x, w = torch.randn(5, 8), torch.randn(3, 8)
    set_cpu_matmul("aten")
    assert cpu_matmul() == "aten"
    assert torch.equal(linear(x, w), F.linear(x, w))
    set_cpu_matmul("auto")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(x, w)
    assert out.dtype == torch.bfloat16  # autocast's cast happened: F.linear was called
    assert linear(x.double(), w.double()).dtype == torch.float64


@needs_onednn
def test_onednn_op_is_used_when_selected(monkeypatch):
    """The switch really changes the path: count calls of the custom op."""
    from llmtrain.models import linear as module

    calls = []
    real = module.onednn_mm_t
    monkeypatch.setattr(module, "onednn_mm_t", lambda a, b: calls.append(a.shape) or real(a, b))
    x, w = torch.randn(5, 8), torch.randn(3, 8)
    set_cpu_matmul("aten")
    linear(x, w)
    assert calls == []
    set_cpu_matmul("onednn")
    linear(x, w)
    assert calls == [(5, 8)]


def test_bad_backend_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        set_cpu_matmul("mkl")
    assert info.value.key == "train.cpu_matmul" and "onednn" in str(info.value)


@needs_onednn
@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_model_logits_and_grads_match_aten(family):
    cfg = ModelConfig(family=family, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2 if family == "llama" else None,
                      vocab_size=61, max_seq_len=24, tie_embeddings=family == "gpt")
    torch.manual_seed(0)
    model = build_model(cfg)
    assert all(type(m) is Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    idx = torch.randint(0, 61, (2, 16))
    results = {}
    for backend in ("aten", "onednn"):
        set_cpu_matmul(backend)
        model.zero_grad()
        logits = model(idx)
        F.cross_entropy(logits.reshape(-1, 61), idx.reshape(-1)).backward()
        results[backend] = (logits.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(results["onednn"][0], results["aten"][0], rtol=1e-5, atol=1e-5)
    for got, want in zip(results["onednn"][1], results["aten"][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@needs_onednn
@pytest.mark.slow
def test_compiles_and_matches_eager():
    """train.compile: inductor keeps the op as one extern call (its own mkldnn lowering rejects
    trainable weights), forward and gradients equal eager."""
    set_cpu_matmul("onednn")
    torch.manual_seed(0)
    layer = Linear(16, 8)
    x = torch.randn(4, 3, 16)
    eager_out, eager_grads = _grads(lambda t: layer(t), x.clone().requires_grad_())
    eager_wgrad = layer.weight.grad.clone()
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True)
    out, grads = _grads(lambda t: compiled(t), x.clone().requires_grad_())
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(grads[0], eager_grads[0])
    torch.testing.assert_close(layer.weight.grad, eager_wgrad)


def test_onednn_request_without_onednn_fails_at_validation(monkeypatch):
    """config validation (before any data is prepared) refuses onednn on a torch without it;
    auto falls back to F.linear there."""
    from llmtrain import cpu_matmul as module
    from llmtrain.cli import compose

    monkeypatch.setattr(module, "_ONEDNN", False)
    with pytest.raises(ConfigError) as info:
        compose(["train.cpu_matmul=onednn"])
    assert info.value.key == "train.cpu_matmul" and "no oneDNN" in str(info.value)
    compose(["train.cpu_matmul=auto"])
    assert cpu_matmul() == "aten"


@needs_onednn
def test_cpu_mm_takes_onednn_only_for_whole_matrices(monkeypatch):
    """``cpu_matmul.mm`` equals ``a @ b``; it takes oneDNN for row- or column-major matrices and the
    BLAS for a strided submatrix (oneDNN's slow path for those took 550 ms a product)."""
    from llmtrain import cpu_matmul as module

    calls = []
    real = module.onednn_mm_t
    monkeypatch.setattr(module, "onednn_mm_t", lambda a, b: calls.append(a.shape) or real(a, b))
    set_cpu_matmul("onednn")
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=gen), torch.randn(5, 6, generator=gen)
    for x, y in ((a, b), (a.t().contiguous().t(), b), (a, b.t().contiguous().t())):
        torch.testing.assert_close(module.mm(x, y), x @ y)
    assert len(calls) == 3
    square = torch.randn(6, 6, generator=gen).t()  # column-major
    sliced = square[:4]  # rows of a column-major matrix: neither row- nor column-major as a whole
    other = torch.randn(6, 3, generator=gen)
    torch.testing.assert_close(module.mm(sliced, other), sliced @ other)
    torch.testing.assert_close(module.mm(other.t(), sliced.t()), other.t() @ sliced.t())
    assert len(calls) == 3
