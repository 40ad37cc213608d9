"""8-bit AdamW: both moments stored in one byte per parameter.

Paper: Dettmers, Lewis, Shleifer & Zettlemoyer, "8-bit Optimizers via Block-wise Quantization"
(ICLR 2022). Reference implementation: ``bitsandbytes.optim.AdamW8bit``, which this matches within
the tolerance bitsandbytes' own tests allow between its 8-bit and 32-bit optimizers
(tests/test_kernels_adamw8bit.py).

Each moment is quantised per block of 256 elements: an fp32 absmax per block and, per element,
the index of the nearest value in the dynamic (exponent + fraction) code map, signed for m and
unsigned for v. Tensors with fewer than ``min_8bit_size`` (4096) elements keep fp32 moments, as
bitsandbytes does: their memory is negligible and norms/biases are the tensors most sensitive to
quantisation. State is ~2 bytes per parameter (+ 8 bytes of absmax per 256) instead of AdamW's 8.

``impl``: ``triton`` runs the fused multi-tensor kernel (CUDA, or TRITON_INTERPRET=1 for tests);
``bnb`` calls bitsandbytes' own functional update (it has CPU 8-bit kernels); ``eager`` runs the
pure-PyTorch twin; ``auto`` picks triton on CUDA, else bnb where it runs, else eager. All three
share one state layout, so a checkpoint saved with one impl resumes on another.
Meant for every parameter of a transformer when optimizer memory is the limit.
"""

from __future__ import annotations

import functools

import torch

from llmtrain.errors import ConfigError, choices
from llmtrain.optim.kernels import require_triton, triton_usable
from llmtrain.optim.kernels._launch import local_tensor
from llmtrain.optim.kernels.twins import (
    create_dynamic_map, fused_adamw8bit_reference, fused_adamw_reference, num_quant_blocks,
)
from llmtrain.optim.protocol import default_state_bytes

IMPLS = ("auto", "triton", "bnb", "eager")
_QUANT_KEYS = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax")


@functools.lru_cache(maxsize=None)
def bnb_runs_on(device_type: str) -> bool:
    """Whether bitsandbytes' blockwise 8-bit optimizer update runs on this device type (probed once)."""
    try:
        import bitsandbytes.functional as F
    except Exception:  # bitsandbytes raises more than ImportError when its native library is missing
        return False
    try:
        device = torch.device(device_type)
        p, g = torch.zeros(256, device=device), torch.ones(256, device=device)
        q1, q2 = torch.zeros(256, dtype=torch.uint8, device=device), torch.zeros(256, dtype=torch.uint8, device=device)
        a1, a2 = torch.zeros(1, device=device), torch.zeros(1, device=device)
        F.optimizer_update_8bit_blockwise(
            "adam", g, p, q1, q2, 0.9, 0.999, 0.0, 0.0, 1e-8, 1, 1e-3,
            create_dynamic_map(True).to(device), create_dynamic_map(False).to(device), a1, a2, 0.0, 1.0,
        )
    except Exception:
        return False
    return bool(torch.isfinite(p).all())


def _bnb_installed() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    except Exception:  # installed, but its native library failed to load
        pass
    return True


def resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ConfigError("optim.impl", f"got {impl!r} for adamw8bit, expected {choices(IMPLS)}")
    if impl == "auto":
        if triton_usable(device):
            return "triton"
        return "bnb" if bnb_runs_on(device.type) else "eager"
    if impl == "triton":
        require_triton(device, accepted=("auto", "bnb", "eager"))
    if impl == "bnb" and not bnb_runs_on(device.type):
        why = (f"bitsandbytes' 8-bit optimizer does not run on {device.type} here" if _bnb_installed()
               else 'bitsandbytes is not installed (pip install "llmtrain[bnb]")')
        raise ConfigError("optim.impl", f"{why}; accepted here: auto, eager")
    return impl


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with blockwise 8-bit moments (defaults as ``bitsandbytes.optim.AdamW8bit``)."""

    state_bytes_per_param: float = 2.0  # uint8 m and v; absmax adds 8 bytes per 256 (see state_bytes())

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, maximize: bool = False, min_8bit_size: int = 4096,
                 impl: str = "auto"):
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(tuple(betas)) != 2:
            raise ValueError(f"Invalid betas: {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults)
        self.min_8bit_size = int(min_8bit_size)
        first = next((p for g in self.param_groups for p in g["params"]), None)
        device = first.device if first is not None else torch.device("cpu")
        self.impl = resolve_impl(impl, device)

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            if p.numel() >= self.min_8bit_size:
                # blocks tile this rank's shard: FSDP2 hands the kernels DTensors' local tensors
                blocks = num_quant_blocks(local_tensor(p).numel())
                state["exp_avg_q"] = torch.zeros_like(p, dtype=torch.uint8, memory_format=torch.contiguous_format)
                state["exp_avg_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                state["exp_avg_sq_q"] = torch.zeros_like(p, dtype=torch.uint8, memory_format=torch.contiguous_format)
                state["exp_avg_sq_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
            else:
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            quantised: list[tuple[torch.Tensor, torch.Tensor, dict]] = []
            full: list[tuple[torch.Tensor, torch.Tensor, dict]] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                state = self._init_state(p)
                state["step"].add_(1)
                (quantised if "exp_avg_q" in state else full).append((p, p.grad, state))
            beta1, beta2 = group["betas"]
            hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"], maximize=group["maximize"])
            if self.impl == "bnb":
                _bnb_step(quantised, full, **hyper)
            else:
                _fused_step(quantised, full, triton=self.impl == "triton", **hyper)
        return loss

    def state_bytes(self) -> int:
        """Codes (1 byte each per moment) + absmax (4 bytes per 256 per moment) + fp32 moments of small tensors."""
        return default_state_bytes(self)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but keep saved dtypes: torch casts floating state to the param dtype, which would
        turn the uint8 codes into floats and round fp32 absmax/moments of bf16 params."""
        saved = {pid: {k: v for k, v in s.items() if isinstance(v, torch.Tensor)}
                 for pid, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = {pid: p for saved_group, group in zip(state_dict["param_groups"], self.param_groups)
                  for pid, p in zip(saved_group["params"], group["params"])}
        for pid, tensors in saved.items():
            p = params.get(pid)
            if p is None:
                continue
            for key, value in tensors.items():
                dtype = torch.float32 if key == "step" else value.dtype
                self.state[p][key] = value.to(device=p.device, dtype=dtype, copy=True)


def _fused_step(quantised, full, *, triton: bool, **hyper) -> None:
    if triton:
        from llmtrain.optim.kernels.adamw import fused_adamw_ as adamw
        from llmtrain.optim.kernels.adamw8bit import fused_adamw8bit_ as adamw8bit
    else:
        adamw, adamw8bit = fused_adamw_reference, fused_adamw8bit_reference
    if quantised:
        ps, gs, ss = zip(*quantised)
        adamw8bit(list(ps), list(gs), *([s[k] for s in ss] for k in _QUANT_KEYS), [s["step"] for s in ss], **hyper)
    if full:
        ps, gs, ss = zip(*full)
        adamw(list(ps), list(gs), [s["exp_avg"] for s in ss], [s["exp_avg_sq"] for s in ss],
              [s["step"] for s in ss], **hyper)


def _bnb_step(quantised, full, *, lr, beta1, beta2, eps, weight_decay, maximize) -> None:
    """bitsandbytes' functional updates; they take the step and lr as host numbers."""
    import bitsandbytes.functional as F

    lr = float(lr)
    for p, g, state in quantised:
        signed, unsigned = _bnb_maps(p.device)
        g = (-g if maximize else g).contiguous()
        F.optimizer_update_8bit_blockwise(
            "adam", g, p, state["exp_avg_q"], state["exp_avg_sq_q"], beta1, beta2, 0.0, 0.0, eps,
            int(state["step"].item()), lr, signed, unsigned, state["exp_avg_absmax"], state["exp_avg_sq_absmax"],
            weight_decay, 1.0,
        )
    for p, g, state in full:
        g = (-g if maximize else g).contiguous()
        F.optimizer_update_32bit(
            "adam", g, p, state["exp_avg"], beta1, eps, int(state["step"].item()), lr, state["exp_avg_sq"],
            beta2, 0.0, 0.0, weight_decay, 1.0,
        )


@functools.lru_cache(maxsize=None)
def _bnb_maps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return create_dynamic_map(True).to(device), create_dynamic_map(False).to(device)
