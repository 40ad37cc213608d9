"""scripts/bench_optim.py runs end to end on CPU and reports every case (numbers are not asserted)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_optim", REPO / "scripts" / "bench_optim.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_llama_shapes_reach_their_labels(bench):
    for label, target in [("10M", 10e6), ("25M", 25e6), ("125M", 125e6), ("350M", 350e6), ("1B", 1e9)]:
        n = sum(math.prod(s) for s in bench.llama_shapes(label))
        assert 0.75 * target < n < 1.35 * target, (label, n)


def test_bytes_moved_rules(bench):
    assert bench.adamw_bytes([10, 20]) == 28 * 30
    assert bench.lion_bytes([10]) == 200
    # 8-bit: 16 B/param + 16 B per 256-block above the threshold, fp32 AdamW below it
    assert bench.adamw8bit_bytes([4096, 100]) == 16 * 4096 + 16 * 16 + 28 * 100


def test_table_has_a_row_per_case_on_cpu(bench, tmp_path, capsys):
    out = tmp_path / "bench.md"
    assert bench.main(["--device", "cpu", "--sizes", "1M", "--cases", "torch fused,triton kernel,lion-pytorch",
                       "--warmup", "0", "--steps", "1", "--markdown", str(out)]) == 0
    table = out.read_text()
    assert "device copy (baseline)" in table
    fused = next(line for line in table.splitlines() if "adamw / torch fused" in line)
    cells = [c.strip() for c in fused.split("|")]
    assert float(cells[3]) > 0 and float(cells[6]) == 8.0  # ms/step measured; AdamW keeps 8 B/param
    assert "needs CUDA + triton" in table  # the triton rows say why they are empty on CPU
    assert "lion / lion-pytorch" in table
    assert bench.main(["--sizes", "3M"]) == 2
