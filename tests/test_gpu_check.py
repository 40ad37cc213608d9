"""scripts/gpu_check.sh on a machine without a GPU, and scripts/gpu_check.py's parts that need none:
the table from result files, a run's row from its run directory, the kernel and optimizer stages on
CPU (Triton's interpreter), and the training presets composing into configs that fit one GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _bash(tmp_path, *args, python=sys.executable):
    env = dict(os.environ, PYTHON=python, GPU_CHECK_OUT=str(tmp_path / "out"))
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------ no GPU: say so, stop, install nothing

@pytest.mark.skipif(sys.platform != "linux", reason="bash + coreutils")
def test_without_a_gpu_says_so_in_one_line_and_exits_1(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = _bash(tmp_path)
    assert proc.returncode == 1
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("no GPU found: torch ") and "nothing was run" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing installed, no results folder


def test_a_missing_python_is_no_gpu_either(tmp_path):
    proc = _bash(tmp_path, python=str(tmp_path / "no-such-python"))
    assert proc.returncode == 1
    assert proc.stdout.strip() == f"no GPU found: {tmp_path / 'no-such-python'} (the Python that should hold torch) " \
                                  "is not on PATH; nothing was run"


def test_unknown_option_is_a_usage_error(tmp_path):
    proc = _bash(tmp_path, "--fast")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown option --fast; expected --fetch-wheels, --install-only or nothing"


def test_install_without_wheels_names_the_fetch_step(tmp_path):
    env = dict(os.environ, PYTHON=str(tmp_path / "python-without-hydra"), GPU_CHECK_OUT=str(tmp_path / "out"),
               GPU_CHECK_WHEELS=str(tmp_path / "empty"))
    proc = subprocess.run(["bash", str(SCRIPT), "--install-only"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {tmp_path / 'empty'} has no wheels; run 'bash scripts/gpu_check.sh "
                                   "--fetch-wheels' where there is network and bring that folder along")


# ------------------------------------------------------------------ the table

ENV = {"gpu": "NVIDIA H100 80GB HBM3", "gpus": 1, "torch": "2.11.0+cu130", "cuda": "13.0", "triton": "3.6.0",
       "python": "3.12.3", "date": "2027-01-04"}


def _write(results: Path, name: str, rows: list[dict]) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps({"rows": rows}))


def test_table_from_result_files(gc, tmp_path, capsys):
    res = tmp_path / "res"
    res.mkdir()
    (res / "env.json").write_text(json.dumps(ENV))
    _write(res, "kernels", [gc.row("kernel vs twin", "adamw fp32, 5 tensors", True, "max |Δ| weights 1.2e-07")])
    _write(res, "optim", [gc.row("optimizer step", "adamw / triton kernel, 350M", True, "3.10 ms/step",
                                 gbps=3012.4, pct_of_copy=87.2)])
    _write(res, "train_llama_1b", [gc.row("train", "llama_1b (1.24B)", True, "bfloat16, whole run 21,000 tok/s",
                                          tokens_per_s=41234.5, mfu=0.4123, peak_mem_bytes=int(12.34 * 2**30))])
    _write(res, "nccl", [gc.row("nccl", "", None, "one GPU: the 2-rank NCCL run needs two")])
    assert gc.main(["table", str(res), "--elapsed", "431.2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == ("GPU check 2027-01-04: 1 x NVIDIA H100 80GB HBM3, torch 2.11.0+cu130 (CUDA 13.0), "
                        "triton 3.6.0, 431 s in all")
    assert lines[2] == "| check | configuration | result | tokens/s | MFU | GB/s | % of copy | peak mem | notes |"
    assert lines[4] == "| kernel vs twin | adamw fp32, 5 tensors | pass |  |  |  |  |  | max /Δ/ weights 1.2e-07 |"
    assert lines[5] == "| optimizer step | adamw / triton kernel, 350M | pass |  |  | 3,012 | 87% |  | 3.10 ms/step |"
    assert lines[6] == ("| train | llama_1b (1.24B) | pass | 41,234 | 41.2% |  |  | 12.3 GiB | "
                        "bfloat16, whole run 21,000 tok/s |")
    assert lines[7] == "| nccl |  | skipped |  |  |  |  |  | one GPU: the 2-rank NCCL run needs two |"
    assert lines[-1] == "3 passed, 0 failed, 1 skipped"
    assert (res / "table.md").read_text() == out


def test_a_failed_or_missing_stage_fails_the_table(gc, tmp_path, capsys):
    res = tmp_path / "res"
    _write(res, "kernels", [gc.row("kernel vs twin", "lion fp32", True)])
    assert gc.main(["missing", str(res), "train_llama_1b_compile", "--note", "no result (exit 124)"]) == 0
    assert gc.main(["table", str(res)]) == 1
    out = capsys.readouterr().out
    assert "| train llama 1b compile |  | FAIL |" in out and out.splitlines()[-1] == "1 passed, 1 failed, 0 skipped"
    assert gc.main(["table", str(tmp_path / "empty")]) == 1  # no results at all is no pass


# ------------------------------------------------------------------ a run's row

def _run_dir(tmp_path: Path, losses=(5.0, 4.0, 3.0), precision="bfloat16", status="completed", mfu=0.2) -> Path:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    rows = [{"step": 10 * (i + 1), "loss": loss, "tokens_per_s": 1000.0 * (i + 1)} for i, loss in enumerate(losses)]
    rows.append({"step": 30, "val_loss": 3.1})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({
        "status": status, "reason": "", "steps": 30, "tokens_per_s": 1500.0, "mfu": mfu, "precision": precision,
        "world_size": 1, "peak_mem_bytes": 2**30}))
    return run


def test_train_row_is_the_steady_window_with_the_whole_run_in_the_notes(gc, tmp_path):
    run = gc.Run("llama_1b", [], "bfloat16")
    r = gc.train_row(run, _run_dir(tmp_path))
    assert r["ok"] is True and r["tokens_per_s"] == 3000.0 and r["peak_mem_bytes"] == 2**30
    assert r["mfu"] == pytest.approx(0.2 * 3000 / 1500)  # MFU scales with tokens/s
    assert r["note"] == "bfloat16, 1 rank(s), whole run 1,500 tok/s, MFU 20.0%; loss 5.00 -> 3.00 in 30 steps"
    assert gc.train_row(run, _run_dir(tmp_path, mfu=None))["mfu"] is None  # a GPU torch cannot name


@pytest.mark.parametrize("change,problem", [
    (dict(precision="float32"), "ran in float32, expected bfloat16"),
    (dict(losses=(5.0, 5.5)), "loss did not go down"),
    (dict(losses=(5.0, float("nan"))), "loss did not go down"),
    (dict(status="diverged"), "status diverged"),
])
def test_train_row_fails_on_what_a_gpu_run_must_not_do(gc, tmp_path, change, problem):
    r = gc.train_row(gc.Run("x", [], "bfloat16"), _run_dir(tmp_path, **change))
    assert r["ok"] is False and problem in r["note"]


def test_train_row_without_a_summary_shows_the_last_log_line(gc, tmp_path):
    r = gc.train_row(gc.Run("x", [], None), tmp_path, log="building\nerror: model: llama_1b needs ~90 GiB\n\n")
    assert r["ok"] is False and r["note"] == "error: model: llama_1b needs ~90 GiB"
    warned = gc.train_row(gc.Run("x", [], None), _run_dir(tmp_path), log=f"UserWarning: ... {gc.FSDP_VIEW_WARNING}")
    assert warned["ok"] is False and "FSDP view-tensor warning" in warned["note"]


# ------------------------------------------------------------------ presets that will run on the GPU day

@pytest.mark.parametrize("name", ["llama_tiny", "llama_tiny_compile", "llama_1b", "llama_1b_compile",
                                  "llama_tiny_fp16", "nccl"])
def test_presets_compose_and_fit_one_80gb_gpu(gc, tmp_path, name):
    from llmtrain.cli import compose
    from llmtrain.plan import memory_per_rank

    run = gc.NCCL_RUN if name == "nccl" else gc.RUNS[name]
    cfg = compose(gc.run_overrides(tmp_path, name, run.overrides))
    world = 2 if name == "nccl" else 1
    assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * world) == 0
    assert cfg.train.max_steps // cfg.train.log_every >= 3  # a steady window after the first
    assert memory_per_rank(cfg, world, cfg.distributed.strategy, precision="bf16")["total"] < 0.9 * 80e9
    if name.startswith("llama_1b"):
        assert cfg.model.vocab_size == cfg.data.pad_vocab_to_multiple_of == 128256  # the published embedding


# ------------------------------------------------------------------ the stages, run on CPU

@pytest.fixture
def interpret(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


SMALL = [(37,), (33, 29), (4099,)]


@pytest.mark.slow
def test_kernel_stage_passes_on_cpu_and_catches_a_wrong_twin(gc, interpret, monkeypatch):
    rows = gc.kernel_rows("cpu", SMALL, steps=3)
    assert [r["ok"] for r in rows] == [True] * len(gc.KERNEL_CASES), rows
    assert rows[0]["config"] == "adamw fp32, 3 tensors, 5,093 elements, 3 steps"
    from llmtrain.optim.kernels import twins

    real = twins.fused_lion_reference
    monkeypatch.setattr(twins, "fused_lion_reference", lambda *a, **kw: real(*a, **{**kw, "beta1": 0.5}))
    lion = [r for r in gc.kernel_rows("cpu", SMALL, steps=3) if r["config"].startswith("lion")]
    assert [r["ok"] for r in lion] == [False, False]


def test_attention_row_names_the_fused_kernels_that_take_the_models_call(gc):
    r = gc.attention_row("cpu", seq=16)
    assert r["config"] == "SDPA causal, GQA 32/8 heads, head_dim 64, 16 tokens, float32"
    assert r["note"].startswith("fused kernels that take it: ") and r["ok"] is (r["note"][28:] != "none (math fallback only)")


def test_optim_stage_reports_bandwidth_against_a_copy(gc):
    rows = gc.optim_rows("cpu", sizes=("1M",), cases=("adamw / torch fused", "adamw / triton kernel"), warmup=0,
                         steps=1)
    by_case = {r["config"]: r for r in rows}
    fused = by_case["adamw / torch fused, 1M"]
    assert fused["ok"] is True and fused["gbps"] > 0 and fused["pct_of_copy"] > 0
    assert by_case["adamw / triton kernel, 1M"]["ok"] is None  # no CUDA here: skipped with the reason
    assert "needs CUDA + triton" in by_case["adamw / triton kernel, 1M"]["note"]
    assert by_case["device copy (baseline), 1M"]["pct_of_copy"] == 100.0
