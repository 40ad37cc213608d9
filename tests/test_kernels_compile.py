"""The Triton kernels compile for an H100 (sm_90) down to a cubin, without a GPU.

The interpreter tests check the arithmetic; this checks what the interpreter cannot: that the
GPU code path (fp64 bias corrections, pointer tables, the 8-bit gathers, dead-code-eliminated
interpreter branches) type-checks and lowers through triton's real compiler and ptxas.
"""

from __future__ import annotations

import inspect

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from llmtrain.optim.kernels import adamw, adamw8bit, lion  # noqa: E402


def _signature(fn, constexprs: dict):
    sig = {}
    for name, param in inspect.signature(fn).parameters.items():
        if param.annotation in (tl.constexpr, "tl.constexpr"):
            sig[name] = "constexpr"
        elif name.endswith("_table"):
            sig[name] = "*i64"
        elif name.endswith("_ptr") or name.startswith(("code_", "bounds_")):
            sig[name] = "*fp32"
        else:
            sig[name] = "fp32"
    names = list(sig)
    assert set(constexprs) == {n for n, t in sig.items() if t == "constexpr"}
    return sig, {(names.index(k),): v for k, v in constexprs.items()}


def _compile(fn, **constexprs):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts = _signature(fn, constexprs)
    kernel = triton.compile(ASTSource(fn=triton.jit(fn), signature=sig, constexprs=consts),
                            target=GPUTarget("cuda", 90, 32))
    assert kernel.asm["cubin"]
    return kernel


@pytest.fixture(autouse=True)
def compiled_mode(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("triton's NVIDIA backend is not installed")


@pytest.mark.slow
@pytest.mark.parametrize("p_dtype,m_dtype,master", [("float32", "float32", False), ("bfloat16", "float32", True),
                                                    ("bfloat16", "bfloat16", False)])
def test_adamw_kernel_compiles(p_dtype, m_dtype, master):
    _compile(adamw._adamw_kernel, P_DTYPE=getattr(tl, p_dtype), G_DTYPE=getattr(tl, p_dtype),
             M_DTYPE=getattr(tl, m_dtype), HAS_MASTER=master, LR_ON_DEVICE=master, MAXIMIZE=False, SOFT_BF16=False,
             CHUNK=8192, BLOCK=1024)


@pytest.mark.slow
def test_lion_kernel_compiles():
    _compile(lion._lion_kernel, P_DTYPE=tl.bfloat16, G_DTYPE=tl.bfloat16, M_DTYPE=tl.float32, LR_ON_DEVICE=True,
             MAXIMIZE=True, SOFT_BF16=False, CHUNK=8192, BLOCK=1024)


@pytest.mark.slow
def test_adamw8bit_kernel_compiles():
    _compile(adamw8bit._adamw8bit_kernel, P_DTYPE=tl.bfloat16, G_DTYPE=tl.bfloat16, LR_ON_DEVICE=True,
             MAXIMIZE=True, SOFT_BF16=False, QBLOCK=256, ROWS=4, CHUNK=8192)
