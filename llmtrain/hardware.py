"""GPUs the planner and the trainer's MFU can name: peak FLOP/s, memory, bandwidths, efficiencies.

Each spec is the vendor datasheet's dense bf16 tensor peak (half the "with sparsity" figure), HBM
capacity and bandwidth, and the link bandwidth per GPU and direction inside a node (NVLink or
PCIe) and between nodes (the NIC a typical server gives each GPU; override it with
``plan.inter_node_gbps``). The two efficiencies are what the step-time model divides the peak by:
``matmul_efficiency`` is the share of peak a large bf16 GEMM sustains in a training step and
``attention_efficiency`` the share FlashAttention-2 (PyTorch SDPA's flash kernel) sustains,
forward plus backward, at long sequences. The matmul efficiency is calibrated once per generation
(Hopper, Ampere) on one published run (``scripts/validate_planner.py --calibrate``) and checked on
the others; a GPU without published runs takes its generation's and says it is not validated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from llmtrain.errors import ConfigError, choices

DEFAULT_GPU = "h100_sxm_80gb"  # what a dry run plans for on a machine without a GPU
HBM_EFFICIENCY = 0.8           # share of datasheet bandwidth that elementwise kernels reach
LINK_EFFICIENCY = 0.8          # NCCL bus bandwidth / line rate (nccl-tests on NVLink and InfiniBand)


@dataclass(frozen=True)
class GpuSpec:
    name: str
    peak_flops: float            # dense bf16 tensor FLOP/s
    fp32_flops: float            # fp32 FLOP/s without TF32 (llmtrain leaves TF32 off)
    memory_bytes: int            # HBM capacity
    hbm_bytes_per_s: float
    intra_node_bytes_per_s: float  # per GPU and direction, to the other GPUs of its node
    inter_node_bytes_per_s: float  # per GPU and direction, across nodes
    matmul_efficiency: float
    attention_efficiency: float
    device_names: tuple[str, ...] = ()  # substrings of torch.cuda.get_device_name that select it
    validated: bool = False      # checked against published runs in scripts/validate_planner.py


GB, TB = 1e9, 1e12
GBIT = 1e9 / 8

# Share of peak a bf16 GEMM of a training step sustains, one per GPU generation; calibrated on one
# published run each (scripts/validate_planner.py --calibrate): Hopper on torchtitan's Llama 3.1 8B
# 8xH100 FSDP row, Ampere on torchtitan's Llama 3 8B 64xA100 selective-layer row.
HOPPER_MATMUL_EFFICIENCY = 0.574
AMPERE_MATMUL_EFFICIENCY = 0.706

# FlashAttention-2 efficiencies: "50-73% of the theoretical maximum FLOPs/s on A100" (Dao 2023,
# arXiv:2307.08691, abstract; fwd+bwd sits at the low end) and "only 35% utilization on the
# H100" (Shah et al. 2024, FlashAttention-3, arXiv:2407.08608, abstract).
_FA2_AMPERE, _FA2_HOPPER = 0.6, 0.35
_HOPPER = (HOPPER_MATMUL_EFFICIENCY, _FA2_HOPPER)
_AMPERE = (AMPERE_MATMUL_EFFICIENCY, _FA2_AMPERE)

GPUS: dict[str, GpuSpec] = {spec.name: spec for spec in (
    # NVIDIA H100 datasheet (SXM5): bf16 1,979 TFLOP/s with sparsity, fp32 67, 80 GB HBM3 at 3.35 TB/s,
    # NVLink 900 GB/s (both directions); DGX H100: one 400 Gb/s ConnectX-7 per GPU.
    GpuSpec("h100_sxm_80gb", 989e12, 67e12, 80 * GB, 3.35 * TB, 450 * GB, 400 * GBIT, *_HOPPER,
            ("H100", "H100 80GB HBM3", "H100 SXM"), validated=True),
    # The H100 of torchtitan's benchmarks (Meta Grand Teton): 96 GB HBM2e at 2.4 TB/s, 500 W
    # limit; "the actual peak TFLOPs number is between SXM and NVL" (torchtitan
    # benchmarks/llama3_h100_202412_torchtitan.md), so the midpoint of 989 and 835 (fp32: of 67 and 60).
    GpuSpec("h100_96gb", 912e12, 63.5e12, 96 * GB, 2.4 * TB, 450 * GB, 400 * GBIT, *_HOPPER, validated=True),
    # NVIDIA H100 PCIe: bf16 1,513 TFLOP/s with sparsity, fp32 51, 80 GB HBM2e at 2 TB/s, PCIe Gen5 (64 GB/s
    # a direction). Efficiency: H100's.
    GpuSpec("h100_pcie_80gb", 756e12, 51e12, 80 * GB, 2.0 * TB, 64 * GB, 400 * GBIT, *_HOPPER, ("H100 PCIe",)),
    # NVIDIA H100 NVL: bf16 1,671 TFLOP/s with sparsity, fp32 60, 94 GB HBM3 at 3.9 TB/s, NVLink bridge
    # 600 GB/s (pairs of GPUs; the rest over PCIe Gen5, 64 GB/s a direction). Efficiency: H100's.
    GpuSpec("h100_nvl_94gb", 835e12, 60e12, 94 * GB, 3.9 * TB, 64 * GB, 400 * GBIT, *_HOPPER,
            ("H100 NVL",)),
    # NVIDIA H200 datasheet (SXM): bf16 1,979 TFLOP/s with sparsity, fp32 67, 141 GB HBM3e at 4.8 TB/s,
    # NVLink 900 GB/s; same silicon as H100 SXM, so its efficiencies.
    GpuSpec("h200_141gb", 989e12, 67e12, 141 * GB, 4.8 * TB, 450 * GB, 400 * GBIT, *_HOPPER, ("H200",)),
    # NVIDIA A100 datasheet (SXM 80GB): bf16 312 TFLOP/s, fp32 19.5, HBM2e 2,039 GB/s, NVLink 600 GB/s;
    # DGX A100: one 200 Gb/s HDR InfiniBand port per GPU.
    GpuSpec("a100_80gb", 312e12, 19.5e12, 80 * GB, 2.039 * TB, 300 * GB, 200 * GBIT, *_AMPERE,
            ("A100", "A100-SXM4-80GB", "A100 80GB", "A100-80GB"), validated=True),
    # A100 SXM 40GB: the same compute, HBM2 at 1,555 GB/s.
    GpuSpec("a100_40gb", 312e12, 19.5e12, 40 * GB, 1.555 * TB, 300 * GB, 200 * GBIT, *_AMPERE,
            ("A100-SXM4-40GB", "A100-PCIE-40GB", "A100 40GB"), validated=True),
    # NVIDIA L40S datasheet: bf16 733 TFLOP/s with sparsity, fp32 91.6, 48 GB GDDR6 at 864 GB/s, no NVLink
    # (PCIe Gen4 x16, 32 GB/s a direction). Not validated: Ada's efficiency taken as Ampere's.
    GpuSpec("l40s", 362e12, 91.6e12, 48 * GB, 0.864 * TB, 32 * GB, 100 * GBIT, *_AMPERE, ("L40S",)),
    # NVIDIA A10 datasheet: bf16 250 TFLOP/s with sparsity, fp32 31.2, 24 GB GDDR6 at 600 GB/s, PCIe Gen4.
    # Not validated; AWS's A10G is taken to be an A10.
    GpuSpec("a10_24gb", 125e12, 31.2e12, 24 * GB, 0.6 * TB, 32 * GB, 100 * GBIT, *_AMPERE, ("A10",)),
    # AMD Instinct MI300X datasheet: bf16 2,614.9 TFLOP/s with sparsity, fp32 163.4, 192 GB HBM3 at 5.3 TB/s,
    # Infinity Fabric 896 GB/s (both directions, to 7 peers). Not validated: Hopper's efficiencies.
    GpuSpec("mi300x", 1307e12, 163.4e12, 192 * GB, 5.3 * TB, 448 * GB, 400 * GBIT, *_HOPPER, ("MI300X",)),
)}


def gpu_spec(name: str, *, memory_gb: Optional[float] = None, peak_tflops: Optional[float] = None,
             inter_node_gbps: Optional[float] = None) -> GpuSpec:
    """The named GPU with any of the ``plan.gpu_memory_gb`` / ``gpu_peak_tflops`` /
    ``inter_node_gbps`` overrides applied; an unknown name is a ConfigError listing the known ones."""
    if name not in GPUS:
        raise ConfigError("plan.gpu", f"got {name!r}, expected auto or {choices(sorted(GPUS))}")
    spec = GPUS[name]
    changes: dict[str, float] = {}
    if memory_gb is not None:
        changes["memory_bytes"] = int(memory_gb * GB)
    if peak_tflops is not None:
        changes["peak_flops"] = peak_tflops * 1e12
    if inter_node_gbps is not None:
        changes["inter_node_bytes_per_s"] = inter_node_gbps * GBIT
    return dataclasses.replace(spec, **changes) if changes else spec


def spec_for_device_name(device_name: str) -> Optional[GpuSpec]:
    """The spec whose ``device_names`` occur in a CUDA device name, longest match first."""
    matches = [(len(pattern), spec) for spec in GPUS.values() for pattern in spec.device_names
               if pattern.lower() in device_name.lower()]
    return max(matches, key=lambda m: m[0])[1] if matches else None


def detect_gpu(device: Optional[torch.device] = None) -> Optional[GpuSpec]:
    """This machine's GPU as a spec (capacity from the driver), or None without a CUDA device."""
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return None
    props = torch.cuda.get_device_properties(device or torch.cuda.current_device())
    spec = spec_for_device_name(props.name)
    if spec is None:
        return None
    return dataclasses.replace(spec, memory_bytes=int(props.total_memory))


def peak_flops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak of ``device`` for MFU, or None for a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    spec = spec_for_device_name(torch.cuda.get_device_name(device))
    return spec.peak_flops if spec else None


def available_memory_bytes(device: torch.device) -> int:
    """What a run on ``device`` may use: the GPU's memory, or the host's MemAvailable on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62
