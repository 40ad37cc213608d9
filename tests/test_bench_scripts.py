"""scripts/bench_optim_registry.py (also run as bench_optim.py --registry) and scripts/bench_train.py
run end to end on CPU and fill their tables (the numbers are measurements, not asserted; their
README copies are from real runs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def load(monkeypatch):
    """Import a script by name; afterwards sys.path (the scripts put their own folders on it) and
    sys.modules are as before."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    loaded = []

    def _load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
        loaded.append(name)
        spec.loader.exec_module(module)
        return module

    before = set(sys.modules)
    yield _load
    for name in set(sys.modules) - before:
        if name in (*loaded, "bench_optim", "reference_muon"):
            sys.modules.pop(name, None)


def _row(table: str, name: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.split("|")[1:-1]]


def test_registry_bench_table(tmp_path, load):
    bench = load("bench_optim_registry")
    out = tmp_path / "registry.md"
    assert bench.main(["--size", "1M", "--only", "adamw,lion,muon", "--repeats", "1", "--warmup", "1",
                       "--steps", "1", "--markdown", str(out)]) == 0
    table = out.read_text()
    for name in ("adamw", "lion", "muon"):
        cells = _row(table, name)
        assert float(cells[2]) > 0 and float(cells[5]) > 0, cells  # ours and the reference both measured
    assert "KellerJordan MuonWithAuxAdam" in _row(table, "muon")[4]
    assert "Newton–Schulz is" in table and "GFLOP/s" in table


def test_bench_optim_registry_flag(tmp_path, load):
    """``bench_optim.py --registry`` (the issue's name for the registry table) runs the registry bench."""
    bench = load("bench_optim")
    out = tmp_path / "registry.md"
    assert bench.main(["--registry", "--size", "1M", "--only", "adamw", "--repeats", "1", "--warmup", "1",
                       "--steps", "1", "--markdown", str(out)]) == 0
    assert "| adamw | fused |" in out.read_text()


def test_newton_schulz_flops_by_hand(load):
    bench = load("bench_optim_registry")
    # 5 iterations on a 2x3 matrix: 4*2*2*3 + 2*2^3 = 64 FLOPs each; transposed shapes count the same
    assert bench.newton_schulz_gflop([(2, 3)]) == bench.newton_schulz_gflop([(3, 2)]) == 5 * 64 / 1e9


def test_train_bench_table(tmp_path, load):
    bench = load("bench_train")
    out = tmp_path / "train.md"
    assert bench.main(["--batch", "1", "--seq", "16", "--vocab", "256", "--rounds", "1", "--steps", "1",
                       "--compile", "off", "--threads", "1", "--markdown", str(out)]) == 0
    table = out.read_text()
    assert "HF LlamaForCausalLM + torch AdamW (foreach)" in table
    rows = [line for line in table.splitlines() if line.startswith("| llmtrain")]
    assert len(rows) == 2  # eager model with oneDNN linears (auto) and with aten's matmuls
    assert "target ≥ 1.2×" in table
