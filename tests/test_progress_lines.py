"""Logs for clusters: plain lines when output is a file or a pipe, bars on a terminal."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import time

import pytest

from llmtrain.config import LoggerConfig, WandbConfig
from llmtrain.console import ProgressLines, RecentRate, format_count, format_eta, is_terminal
from llmtrain.logging import ProgressBar, RunLogger

from conftest import REPO, tiny_overrides, torchrun_env

STEP_LINE = re.compile(r"^step (\d+)/(\d+) \| loss (\S+) \| lr (\S+) \| ([\d,]+) tok/s \| eta (\S+)$", re.M)
ETA = re.compile(r"\d+h\d\dm|\d+m\d\ds|\d+s")


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def row(step: int, loss: float = 3.4123, lr: float = 6e-4, tokens_per_s: float = 52310.4) -> dict:
    return {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s}


def test_eta_format():
    assert format_eta(72 * 60 + 10) == "1h12m"
    assert format_eta(4 * 60 + 5) == "4m05s"
    assert format_eta(12.4) == "12s"
    assert format_eta(59.6) == "1m00s"
    assert format_eta(0) == "0s"
    assert format_eta(None) == "?" and format_eta(float("inf")) == "?"
    assert [format_count(x) for x in (950, 12_345, 4_560_000, 1.2e9)] == ["950", "12.3K", "4.56M", "1.2B"]


def test_recent_rate_follows_the_last_updates_not_the_start():
    clock = FakeClock()
    rate = RecentRate(start=0, window=2, clock=clock)
    assert rate.eta(100) is None  # nothing measured yet
    for step in (10, 20, 30):  # 10 steps per second, then a slowdown to 1 step per second
        clock.t += 1
        rate.add(step)
    for step in (31, 32):
        clock.t += 1
        rate.add(step)
    assert rate.rate() == pytest.approx(1.0)
    assert rate.eta(68) == pytest.approx(68.0)
    assert rate.eta(0) == 0.0


def test_plain_progress_line_per_logged_step(capsys):
    clock = FakeClock()
    bar = ProgressBar(5000, 0, enabled=True, bar=False, clock=clock)
    clock.t += 120 * 0.9  # 120 steps in 108 s: 4880 remaining steps take 4392 s = 1h13m
    bar.update(120, row(120))
    clock.t += 10 * 0.9
    bar.update(130, row(130, loss=float("nan")))
    bar.write("step 130: val_loss 3.5000")
    bar.close()
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "step 120/5000 | loss 3.412 | lr 6.0e-04 | 52,310 tok/s | eta 1h13m",
        "step 130/5000 | loss nan | lr 6.0e-04 | 52,310 tok/s | eta 1h13m",
        "step 130: val_loss 3.5000",
    ]


def test_resumed_run_counts_eta_from_the_resume_step(capsys):
    clock = FakeClock()
    bar = ProgressBar(300, 200, enabled=True, bar=False, clock=clock)
    clock.t += 20.0
    bar.update(210, row(210))  # 2 s a step since the resume at 200: 90 steps left = 3m00s
    assert capsys.readouterr().out.strip().endswith("eta 3m00s")


def test_progress_goes_to_lines_unless_both_streams_are_terminals(tmp_path, monkeypatch):
    cfg = LoggerConfig(wandb=WandbConfig(mode="disabled"), plot=False)

    def run(stdout, stderr, progress: bool) -> str:
        monkeypatch.setattr(sys, "stdout", stdout)
        monkeypatch.setattr(sys, "stderr", stderr)
        log = RunLogger(tmp_path, cfg, {}, enabled=True, total_steps=4, start_step=0, progress=progress)
        for step in (2, 4):
            log.log_train(row(step))
        log.close({})
        monkeypatch.undo()
        return stdout.getvalue() + stderr.getvalue()

    assert is_terminal(Terminal(), Terminal()) and not is_terminal(Terminal(), io.StringIO())
    drawn = run(Terminal(), Terminal(), progress=True)
    assert "\r" in drawn and "4/4" in drawn and not STEP_LINE.search(drawn)
    for out, err, progress in ((io.StringIO(), io.StringIO(), True), (Terminal(), io.StringIO(), True),
                               (Terminal(), Terminal(), False)):
        text = run(out, err, progress)
        assert "\r" not in text
        assert [int(m[0]) for m in STEP_LINE.findall(out.getvalue())] == [2, 4], (progress, text)


def test_periodic_lines_are_rate_limited_with_tokens_per_s_and_eta():
    clock, out = FakeClock(), io.StringIO()
    lines = ProgressLines("tokenizing corpus", total_work=1000.0, every_s=10.0, file=out, clock=clock)
    for _ in range(9):  # 100 chars and 5,000 tokens a second: a line once 10 s have passed
        clock.t += 1
        lines.update(5000, work=100.0)
    assert out.getvalue() == ""
    clock.t += 1
    lines.update(5000, work=100.0)  # at 10 s all the work is read, the tokens not yet written
    clock.t += 2
    lines.update(10, work=0.0)
    lines.close()
    lines.close()
    text = out.getvalue()
    assert "\r" not in text
    assert text.splitlines() == [
        "tokenizing corpus: 50K tok | 5K tok/s | 99% | eta 0s",
        "tokenizing corpus: 50K tok in 12.0s (4.17K tok/s)",
    ]
    half = ProgressLines("x", total_work=1000.0, every_s=5.0, file=io.StringIO(), clock=clock)
    clock.t += 5
    half.update(1000, work=250.0)
    assert half.file.getvalue().strip() == "x: 1K tok | 200 tok/s | 25% | eta 15s"
    unknown = ProgressLines("x", every_s=1.0, file=io.StringIO(), clock=clock)
    clock.t += 2
    unknown.update(3000)
    assert unknown.file.getvalue().strip() == "x: 3K tok | 1.5K tok/s"


def test_resumed_lines_start_at_the_earlier_position():
    clock, out = FakeClock(), io.StringIO()
    lines = ProgressLines("x", total_work=1000.0, every_s=10.0, file=out, clock=clock, initial=40_000,
                          initial_work=500.0)
    clock.t += 10
    lines.update(10_000, work=100.0)  # the rate is this run's; the share done counts the earlier run
    clock.t += 2
    lines.close()
    assert out.getvalue().splitlines() == [
        "x: 50K tok | 1K tok/s | 60% | eta 40s",
        "x: 50K tok (10K this run) in 12.0s (833 tok/s)",
    ]


@pytest.mark.slow
def test_piped_run_prints_plain_lines_without_carriage_returns(corpus, tmp_path):
    cache = tmp_path / "cache"  # fresh: the trainer prepares the data, so that progress is in the output too
    extra = {"train.max_steps": 6, "train.log_every": 2, "train.eval_every": 3, "train.progress_bar": "true"}
    cmd = [sys.executable, "-m", "llmtrain", *tiny_overrides(corpus, cache, tmp_path / "run", **extra)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=600, env=torchrun_env())
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, err[-2000:]
    assert "\r" not in out + err
    steps = STEP_LINE.findall(out)
    assert [(int(s), int(total)) for s, total, *_ in steps] == [(2, 6), (4, 6), (6, 6)], out
    assert all(ETA.fullmatch(eta) for *_, eta in steps) and steps[-1][-1] == "0s"
    assert "step 3: val_loss" in out
    assert re.search(r"^tokenizing .*: [\d.]+K? tok in [\d.]+s \([\d.]+[KM]? tok/s\)$", err, re.M), err


@pytest.mark.slow
def test_llmtrain_data_to_a_pipe_prints_plain_lines(corpus, tmp_path):
    cmd = [sys.executable, "-m", "llmtrain.data.prepare", f"data.sources=[{{path:'{corpus}'}}]",
           f"data.cache_dir='{tmp_path / 'cache'}'", "data.vocab_size=384", "data.num_proc=2"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=600, env=torchrun_env())
    assert result.returncode == 0, result.stderr[-2000:]
    text = (result.stdout + result.stderr).decode()
    assert "\r" not in text and "training a 384-token byte-level BPE" in text
    assert len(result.stdout.decode().splitlines()) == 1  # the summary; no blank lines from the BPE trainer
    assert re.search(r"^tokenizing .*: [\d.]+K? tok in [\d.]+s", text, re.M), text


def _run_in_terminal(cmd: list[str], timeout: float) -> tuple[int, str]:
    """Run ``cmd`` with stdout and stderr on a pseudo-terminal 120 columns wide; return (rc, output)."""
    import fcntl
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=torchrun_env())
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1.0)[0]:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_terminal_run_draws_the_bar(corpus, data_cache, tmp_path):
    extra = {"train.max_steps": 6, "train.log_every": 2, "train.eval_every": 3, "train.progress_bar": "true"}
    rc, text = _run_in_terminal([sys.executable, "-m", "llmtrain",
                                 *tiny_overrides(corpus, data_cache, tmp_path / "run", **extra)], timeout=600)
    assert rc == 0, text[-2000:]
    assert re.search(r"\r(?!\n)", text), "a terminal bar redraws its line with a bare carriage return"
    assert re.search(r"6/6 \[.*loss \d\.\d{4} lr \d\.\d\de-\d\d [\d,]+ tok/s", text), text[-2000:]
    assert not STEP_LINE.search(text.replace("\r\n", "\n"))
    assert "step 3: val_loss" in text
