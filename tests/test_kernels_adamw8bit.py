"""8-bit blockwise AdamW: quantisation, the Triton kernel vs its twin, and AdamW8bit vs bitsandbytes.

Kernels run under triton's interpreter (``TRITON_INTERPRET=1`` set per test with monkeypatch:
llmtrain's kernels are jitted at launch, so the setting does not leak into other test files).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("triton")

from llmtrain.errors import ConfigError  # noqa: E402
from llmtrain.optim.adamw8bit import AdamW8bit, bnb_runs_on  # noqa: E402
from llmtrain.optim.kernels import triton_usable  # noqa: E402
from llmtrain.optim.kernels.adamw8bit import fused_adamw8bit_  # noqa: E402
from llmtrain.optim.kernels.twins import (  # noqa: E402
    create_dynamic_map, dequantize_blockwise, fused_adamw8bit_reference, num_quant_blocks, quantize_blockwise,
)

REPO = Path(__file__).resolve().parent.parent
SHAPES = [(4099,), (45, 113)]  # 17 and 20 blocks of 256, both with a partial last block
HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-8)


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _tensors(shapes, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) * scale for s in shapes]


def _states(shapes):
    q = [torch.zeros(s, dtype=torch.uint8) for s in shapes]
    a = [torch.zeros(num_quant_blocks(torch.Size(s).numel())) for s in shapes]
    return q, a


# --- quantisation --------------------------------------------------------------------------------

def test_dynamic_maps_equal_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(create_dynamic_map(signed=True), F.create_dynamic_map(signed=True))
    assert torch.equal(create_dynamic_map(signed=False), F.create_dynamic_map(signed=False))


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_picks_the_nearest_code_per_block(signed):
    x = torch.randn(1000) * torch.logspace(-6, 0, 1000)  # magnitudes over six decades
    if not signed:
        x = x.abs()
    code = create_dynamic_map(signed)
    q, absmax = quantize_blockwise(x, code)
    assert q.dtype == torch.uint8 and absmax.shape == (4,)
    torch.testing.assert_close(absmax, torch.nn.functional.pad(x.abs(), (0, 24)).reshape(4, 256).amax(1))
    scale = absmax.repeat_interleave(256)[:1000]
    dist = (x[:, None] / scale[:, None] - code[None, :]).abs()
    chosen = (x / scale - code[q.long()]).abs()
    assert torch.all(chosen <= dist.min(dim=1).values + 1e-7)
    err = (dequantize_blockwise(q, absmax, code) - x).abs()
    assert torch.all(err <= (chosen + 2e-7) * scale)  # the error is the distance to the chosen code


# --- kernel vs twin --------------------------------------------------------------------------------

def _roundtrip(tensors):
    buf = io.BytesIO()
    torch.save([t.clone() for t in tensors], buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_kernel_matches_twin_over_steps_with_state_reload(interpret, weight_decay):
    signed, unsigned = create_dynamic_map(True), create_dynamic_map(False)
    p_k = _tensors(SHAPES, scale=0.1)
    p_t = [p.clone() for p in p_k]
    (mq_k, ma_k), (vq_k, va_k) = _states(SHAPES), _states(SHAPES)
    (mq_t, ma_t), (vq_t, va_t) = _states(SHAPES), _states(SHAPES)
    steps = [torch.zeros(()) for _ in SHAPES]
    for i in range(10):
        grads = _tensors(SHAPES, scale=0.01, seed=10 + i)
        for s in steps:
            s += 1
        fused_adamw8bit_(p_k, grads, mq_k, ma_k, vq_k, va_k, steps, lr=1e-3, weight_decay=weight_decay, **HYPER)
        fused_adamw8bit_reference(p_t, grads, mq_t, ma_t, vq_t, va_t, steps, lr=1e-3, weight_decay=weight_decay,
                                  **HYPER)
        for a, b in zip(p_k, p_t):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        for qk, ak, qt, at, code in [(mq_k, ma_k, mq_t, ma_t, signed), (vq_k, va_k, vq_t, va_t, unsigned)]:
            for j in range(len(SHAPES)):
                torch.testing.assert_close(ak[j], at[j], atol=0, rtol=1e-6)
                # fp32 rounding may put a value on the other side of a midpoint: neighbouring codes only
                assert (qk[j].int() - qt[j].int()).abs().max() <= 1
                assert (qk[j] != qt[j]).float().mean() < 0.01
                gap = (code[1:] - code[:-1]).max()
                deq_k, deq_t = dequantize_blockwise(qk[j], ak[j], code), dequantize_blockwise(qt[j], at[j], code)
                assert torch.all((deq_k - deq_t).abs() <= gap * at[j].repeat_interleave(256)[: deq_t.numel()]
                                 .reshape(deq_t.shape) + 1e-12)
        if i == 4:
            mq_k, ma_k, vq_k, va_k = (_roundtrip(x) for x in (mq_k, ma_k, vq_k, va_k))
            assert mq_k[0].dtype == torch.uint8


# --- the optimizer vs bitsandbytes.optim.AdamW8bit -------------------------------------------------

def _bnb_tolerance_check(mine: AdamW8bit, ours: list, bnb_opt, theirs: list, check_all: bool) -> None:
    """bitsandbytes tests/test_optim.py::test_optimizer8bit tolerances (fp32): dequantised states
    isclose(atol=3e-3, rtol=1e-3) with fewer than 20 misses; parameter error mean < 6e-5 and
    relative error mean < 6e-4; every 10 steps all parameters within atol=1e-5, rtol=1e-3."""
    F = pytest.importorskip("bitsandbytes.functional")
    for p, r in zip(ours, theirs):
        st, ref = mine.state[p], bnb_opt.state[r]
        if "exp_avg_q" not in st:
            continue
        for q, a, rq, rmap, ra in [("exp_avg_q", "exp_avg_absmax", "state1", "qmap1", "absmax1"),
                                   ("exp_avg_sq_q", "exp_avg_sq_absmax", "state2", "qmap2", "absmax2")]:
            s_ref = F.dequantize_blockwise(ref[rq], absmax=ref[ra], code=ref[rmap], blocksize=256)
            code = create_dynamic_map(signed=q == "exp_avg_q")
            s_mine = dequantize_blockwise(st[q], st[a], code)
            assert (~torch.isclose(s_mine, s_ref, atol=3e-3, rtol=1e-3)).sum().item() < 20
        err = (p.detach() - r.detach()).abs()
        assert err.mean() < 6e-5
        assert (err / (r.detach().abs() + 1e-9)).mean() < 6e-4
        if check_all:
            torch.testing.assert_close(p.detach(), r.detach(), atol=1e-5, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_training_matches_bitsandbytes_adamw8bit(monkeypatch, impl):
    bnb = pytest.importorskip("bitsandbytes")
    if not bnb_runs_on("cpu"):
        pytest.skip("bitsandbytes' 8-bit optimizer does not run on this CPU")
    if impl == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    shapes = [(64, 80), (4097,), (37,)]  # the last stays 32-bit (< 4096 elements), as in bitsandbytes
    init = _tensors(shapes, scale=0.1)
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    mine = AdamW8bit(ours, lr=1e-3, weight_decay=1e-2, impl=impl)
    ref = bnb.optim.AdamW8bit(theirs, lr=1e-3, weight_decay=1e-2)
    assert mine.impl == impl
    for i in range(1, 21):
        for p, r, g in zip(ours, theirs, _tensors(shapes, scale=0.01, seed=100 + i)):
            p.grad, r.grad = g.clone(), g.clone()
        mine.step()
        ref.step()
        _bnb_tolerance_check(mine, ours, ref, theirs, check_all=i % 10 == 0)
        with torch.no_grad():  # as bitsandbytes' test: keep parameters together, compare the updates
            for p, r in zip(ours, theirs):
                p.copy_(r)
    assert mine.state[ours[0]]["exp_avg_q"].dtype == torch.uint8
    assert mine.state[ours[2]]["exp_avg"].dtype == torch.float32


# --- the optimizer class ----------------------------------------------------------------------------

def _train(opt, params, steps, seed):
    for i in range(steps):
        for p, g in zip(params, _tensors([tuple(p.shape) for p in params], scale=0.01, seed=seed + i)):
            p.grad = g.to(p.dtype)
        opt.step()


def test_state_dict_round_trip_resumes_exactly():
    shapes = [(50, 90), (10,)]
    init = _tensors(shapes)
    a = [torch.nn.Parameter(t.clone()) for t in init]
    opt_a = AdamW8bit(a, lr=1e-2, impl="eager")
    _train(opt_a, a, 3, seed=0)
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = AdamW8bit(b, lr=1e-2, impl="eager")
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    state = opt_b.state[b[0]]
    assert state["exp_avg_q"].dtype == torch.uint8 and state["exp_avg_sq_q"].dtype == torch.uint8
    assert state["exp_avg_absmax"].dtype == torch.float32 and state["exp_avg_absmax"].shape == (18,)
    for key, value in opt_a.state[a[0]].items():
        assert torch.equal(value, state[key]), key
    _train(opt_a, a, 3, seed=10)
    _train(opt_b, b, 3, seed=10)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_bf16_params_keep_fp32_state_through_load():
    p = torch.nn.Parameter(torch.randn(64, 70).to(torch.bfloat16))
    opt = AdamW8bit([p], lr=1e-2, impl="eager")
    _train(opt, [p], 2, seed=0)
    absmax = opt.state[p]["exp_avg_absmax"].clone()
    opt.load_state_dict(opt.state_dict())
    assert opt.state[p]["exp_avg_q"].dtype == torch.uint8
    assert opt.state[p]["exp_avg_absmax"].dtype == torch.float32
    assert torch.equal(opt.state[p]["exp_avg_absmax"], absmax)


def test_checkpoint_moves_between_impls():
    """bnb and eager share the state layout: a bnb checkpoint resumes on eager and stays close
    (they can pick neighbouring codes: bitsandbytes' CPU quantiser is not always round-to-nearest)."""
    if not bnb_runs_on("cpu"):
        pytest.skip("bitsandbytes' 8-bit optimizer does not run on this CPU")
    init = _tensors([(64, 80)], scale=0.1)
    a = [torch.nn.Parameter(init[0].clone())]
    opt_a = AdamW8bit(a, lr=1e-3, impl="bnb")
    _train(opt_a, a, 3, seed=0)
    b = [torch.nn.Parameter(a[0].detach().clone())]
    opt_b = AdamW8bit(b, lr=1e-3, impl="eager")
    opt_b.load_state_dict(opt_a.state_dict())
    _train(opt_a, a, 3, seed=5)
    _train(opt_b, b, 3, seed=5)
    err = (a[0] - b[0]).detach().abs()
    assert err.mean() < 6e-5 and (err / (a[0].detach().abs() + 1e-9)).mean() < 6e-4  # bitsandbytes' 8-bit bounds
    assert opt_b.state[b[0]]["step"].item() == 6


def test_state_bytes_about_two_per_param():
    big, small = torch.nn.Parameter(torch.randn(256, 64)), torch.nn.Parameter(torch.randn(100))
    opt = AdamW8bit([big, small], impl="eager")
    _train(opt, [big, small], 1, seed=0)
    n = big.numel()
    expected = 2 * n + 2 * 4 * (n // 256) + 2 * 4 * small.numel() + 2 * 4  # codes, absmax, fp32 small, steps
    assert opt.state_bytes() == expected
    assert AdamW8bit.state_bytes_per_param == 2.0
    assert opt.state_bytes() / (n + small.numel()) < 2.2


def test_triton_impl_without_gpu_or_interpreter_is_a_config_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError) as err:
        AdamW8bit([torch.nn.Parameter(torch.zeros(4))], impl="triton")
    assert str(err.value) == ("optim.impl: triton needs a CUDA GPU (or TRITON_INTERPRET=1 for testing); "
                              "accepted here: auto, bnb, eager")
    with pytest.raises(ConfigError, match="expected one of: auto, triton, bnb, eager"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(4))], impl="fused")


def test_auto_impl_on_cpu_prefers_bitsandbytes_then_eager():
    assert not triton_usable("cpu")
    opt = AdamW8bit([torch.nn.Parameter(torch.zeros(4))])
    assert opt.impl == ("bnb" if bnb_runs_on("cpu") else "eager")


def test_registered_and_config_keys_accepted():
    from llmtrain.optim import OPTIMIZERS

    assert OPTIMIZERS["adamw8bit"] is AdamW8bit
    cfg = yaml.safe_load((REPO / "configs/optim/adamw8bit.yaml").read_text())
    assert cfg.pop("name") == "adamw8bit"
    cfg["betas"] = tuple(cfg["betas"])
    opt = AdamW8bit([torch.nn.Parameter(torch.zeros(5000))], **cfg)
    assert opt.min_8bit_size == 4096 and opt.defaults["weight_decay"] == 0.1
