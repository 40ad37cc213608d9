"""Every fused path (torch's kernels, compiled updates, batched Newton–Schulz) equals the eager rule.

The compiled updates (llmtrain.optim.compiled) take lr and step counts as 0-dim tensors: a test
changes the lr every step and checks with dynamo's counters that nothing recompiles.
"""

from __future__ import annotations

import pytest
import torch

from llmtrain.optim import OPTIMIZERS
from llmtrain.optim.compiled import compile_available
from optim_parity import max_trajectory_diff, moved

needs_compile = pytest.mark.skipif(not compile_available(), reason="torch.compile needs a C++ compiler")

# name -> constructor keywords that exercise weight decay and the non-default branches
ELEMENTWISE = {
    "lion": dict(lr=3e-3, weight_decay=0.1),
    "sgd": dict(lr=3e-2, momentum=0.9, weight_decay=0.01, nesterov=True),
    "adagrad": dict(lr=3e-2, lr_decay=0.01, weight_decay=0.01),
    "rmsprop": dict(lr=3e-3, momentum=0.5, centered=True, weight_decay=0.01),
    "adabelief": dict(lr=3e-3, weight_decay=0.1),
    "lamb": dict(lr=3e-3, weight_decay=0.1),
    "lars": dict(lr=3e-1, momentum=0.9, weight_decay=0.01, nesterov=True),
    "sophia": dict(lr=3e-3, weight_decay=0.1, bs=64),
    "schedulefree_adamw": dict(lr=3e-3, weight_decay=0.1, warmup_steps=3),
    "adam_mini": dict(lr=3e-3, weight_decay=0.1),
    "adafactor": dict(lr=3e-2, beta1=0.9, weight_decay=0.01),
    "adamw": dict(lr=3e-3, weight_decay=0.1),
    "adam": dict(lr=3e-3, weight_decay=0.1),
}
TORCH_FUSED = {"adam", "adamw", "sgd", "adagrad"}  # torch has a CPU kernel; no compile involved


def _factory(name: str, impl: str):
    return lambda params: OPTIMIZERS[name](params, impl=impl, **ELEMENTWISE[name])


def _check_fused_equals_eager(name: str, steps: int = 6) -> None:
    diff = max_trajectory_diff(_factory(name, "fused"), _factory(name, "eager"), steps=steps)
    assert diff < 1e-6, f"{name}: fused differs from eager by {diff}"
    assert moved(_factory(name, "fused"), steps=steps) > 1e-3


@pytest.mark.parametrize("name", sorted(TORCH_FUSED))
def test_torch_fused_equals_eager(name):
    _check_fused_equals_eager(name)


@needs_compile
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(ELEMENTWISE) - TORCH_FUSED))
def test_compiled_equals_eager(name):
    _check_fused_equals_eager(name)


@pytest.mark.parametrize("name,kw", [
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("adagrad", dict(lr=0.05, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1)),
    ("adamw", dict(lr=3e-3, weight_decay=0.1, amsgrad=True)),
])
def test_auto_is_torch_fused_kernel(name, kw):
    """impl=auto takes torch's fused CPU kernel; it matches torch.optim(fused=True) over 25 steps."""
    ref = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "adamw": torch.optim.AdamW}[name]
    assert OPTIMIZERS[name]([torch.nn.Parameter(torch.zeros(2))], **kw).impl == "fused"
    diff = max_trajectory_diff(lambda p: OPTIMIZERS[name](p, **kw), lambda p: ref(p, fused=True, **kw), steps=25)
    assert diff < 1e-6


def _muon(impl):
    def make(params):  # two 2-D matrices of different shapes for Muon, the vector for AdamW
        return OPTIMIZERS["muon"]([dict(params=[params[0], params[2]], use_muon=True),
                                   dict(params=[params[1]], use_muon=False, lr=3e-3)],
                                  lr=0.02, weight_decay=0.1, impl=impl)
    return make


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_muon_batched_equals_reference_loop(impl):
    assert OPTIMIZERS["muon"]([torch.nn.Parameter(torch.zeros(2, 2))]).impl == "fused"
    assert max_trajectory_diff(_muon(impl), _muon("eager"), steps=8) < 1e-6
    # same-shape matrices share one stacked Newton–Schulz
    runs = []
    for run_impl in (impl, "eager"):
        gen = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(6, 5, generator=gen)) for _ in range(3)]
        opt = OPTIMIZERS["muon"](params, lr=0.02, weight_decay=0.1, impl=run_impl)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(6, 5, generator=gen)
            opt.step()
        runs.append(torch.stack([p.detach() for p in params]))
    assert (runs[0] - runs[1]).abs().max() < 1e-6


def test_stacked_newton_schulz_is_per_matrix():
    from llmtrain.optim.muon import zeropower_via_newtonschulz5

    x = torch.randn(4, 24, 16, generator=torch.Generator().manual_seed(0))
    per_matrix = torch.stack([zeropower_via_newtonschulz5(m) for m in x])
    assert torch.equal(zeropower_via_newtonschulz5(x), per_matrix)


def test_auto_compiles_only_big_groups(monkeypatch):
    from llmtrain.optim import _common, compiled

    small = [torch.zeros(8)]
    assert _common.group_impl("auto", small, "eager") == "eager"
    assert _common.group_impl("eager", small, "foreach") == "eager"
    monkeypatch.setattr(compiled, "AUTO_MIN_NUMEL", 8)
    assert _common.group_impl("auto", small, "eager") == ("fused" if compile_available() else "eager")
    monkeypatch.setenv("LLMTRAIN_NO_COMPILE", "1")
    assert _common.group_impl("auto", small, "eager") == "eager"


def test_compiled_impl_refused_without_compiler(monkeypatch):
    from llmtrain.errors import ConfigError

    monkeypatch.setenv("LLMTRAIN_NO_COMPILE", "1")
    with pytest.raises(ConfigError, match="optim.impl"):
        OPTIMIZERS["lion"]([torch.nn.Parameter(torch.zeros(2))], impl="fused")
    with pytest.raises(ConfigError, match="optim.impl: got 'triton' for adabelief"):
        OPTIMIZERS["adabelief"]([torch.nn.Parameter(torch.zeros(2))], impl="triton")


@needs_compile
@pytest.mark.slow
def test_lr_schedule_does_not_recompile():
    """lr and step enter the compiled graph as 0-dim tensors: a new lr every step, no new graph."""
    from torch._dynamo.utils import counters

    params = [torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(40))]
    opt = OPTIMIZERS["adabelief"](params, lr=1e-3, weight_decay=0.1, impl="fused")
    frames = []
    for step in range(5):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.param_groups[0]["lr"] = 1e-3 * (step + 1) / 5  # a warmup schedule
        opt.step()
        frames.append(counters["stats"]["unique_graphs"])
    assert frames[0] >= 1
    assert frames[1:] == [frames[0]] * 4, f"recompiled: unique graphs after each step {frames}"


def _hybrid(name, **kw):
    def make(params):
        return OPTIMIZERS[name]([dict(params=[params[0], params[2]], **{OPTIMIZERS[name].hybrid_flag: True}),
                                 dict(params=[params[1]], **{OPTIMIZERS[name].hybrid_flag: False})], **kw)
    return make


@pytest.mark.parametrize("name,kw,period", [
    ("shampoo", dict(lr=1e-3, precondition_frequency=3, start_preconditioning_step=2), 3),
    ("soap", dict(lr=1e-3, precondition_frequency=3), 3),
    ("galore_adamw", dict(lr=1e-3, rank=2, update_proj_gap=3), 3),
])
def test_refresh_cost_is_reported(name, kw, period):
    from optim_parity import loss_fn, make_params

    params = make_params()
    opt = _hybrid(name, **kw)(params)
    refreshed = []
    for step in range(7):
        opt.zero_grad()
        loss_fn(params, step).backward()
        before = opt.precondition_timer.total_ms
        opt.step()
        refreshed.append(opt.precondition_timer.total_ms > before)
    timer = opt.precondition_timer
    assert timer.steps == 7 and timer.last_refresh_ms > 0
    assert 0 < timer.amortised_ms < timer.total_ms
    # refreshes happen every `period` steps, not every step (2-4 of 7 depending on the first-step rule)
    assert 2 <= sum(refreshed) <= 4, refreshed


def _axpy_(x, y, alpha, *, beta):
    x.add_(y * alpha * beta)
    return x.sum()


@needs_compile
def test_same_layout_tensors_share_chunked_graphs():
    """apply_updates: one graph per (layout, chunk length); every entry gets its own per-tensor
    scalar and result; eager and fused agree; a second call with new values compiles nothing."""
    from llmtrain.optim.compiled import CHUNK, apply_updates, cached_graphs

    def entries():
        xs = [torch.zeros(5) for _ in range(CHUNK + 2)] + [torch.zeros(3, 2)]
        return [((x, torch.ones_like(x)), (float(i + 1),)) for i, x in enumerate(xs)]

    eager, fused = entries(), entries()
    before = cached_graphs(_axpy_)
    want = apply_updates(_axpy_, eager, fused=False, static=dict(beta=0.5))
    got = apply_updates(_axpy_, fused, fused=True, static=dict(beta=0.5))
    # a chunk of CHUNK and one of 2 for the 5-element tensors, one for the 3x2 matrix
    assert cached_graphs(_axpy_) - before == 3
    for (e, _), (f, _), w, g in zip(eager, fused, want, got):
        assert torch.equal(e[0], f[0]) and torch.equal(w, g)
    assert torch.equal(fused[3][0][0], torch.full((5,), 2.0))  # entry 3 used its own scalar 4.0 * 0.5
    apply_updates(_axpy_, entries(), fused=True, static=dict(beta=0.5))
    assert cached_graphs(_axpy_) - before == 3


@pytest.mark.parametrize("n", [300, 4099, 147456])
def test_float64_accumulated_norm(n):
    """``norm`` (float64 accumulation, which keeps inductor off its slow cascade sum) gives float32
    inputs their exact norm rounded to float32, eagerly and compiled."""
    from llmtrain.optim._common import norm, sum_sq

    x = torch.randn(n, generator=torch.Generator().manual_seed(0)) * 3.0
    exact = torch.linalg.vector_norm(x.double())
    assert norm(x).dtype == sum_sq(x).dtype == torch.float32
    torch.testing.assert_close(norm(x).double(), exact, rtol=1.2e-7, atol=0)
    compiled = torch.compile(norm, dynamic=False)
    torch.testing.assert_close(compiled(x).double(), exact, rtol=1.2e-7, atol=0)


@needs_compile
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(ELEMENTWISE) - TORCH_FUSED))
def test_compiled_update_allocates_no_parameter_sized_buffer(name):
    """A compiled step allocates nothing the size of a parameter: the CPU allocator hands such a
    buffer out as fresh pages that the OS zeroes on every step (it made LAMB's step 1.7x slower)."""
    from torch._inductor.utils import run_and_get_code

    rows, cols = 96, 160
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(rows, cols, generator=gen)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn(rows, cols, generator=gen)
    opt = OPTIMIZERS[name](params, impl="fused", **ELEMENTWISE[name])
    torch._dynamo.reset()
    opt.step()  # state allocation is the first step's, outside the compiled update
    for p in params:
        p.grad = torch.randn(rows, cols, generator=gen)
    _, sources = run_and_get_code(opt.step)
    code = "\n".join(sources)
    assert "empty_strided" in code or "kernel(" in code  # the compiled update did run
    for shape in (f"({rows * cols}, )", f"({rows}, {cols})"):
        assert f"empty_strided_cpu({shape}" not in code, f"{name} allocates a {shape} buffer per step"
