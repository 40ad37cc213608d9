"""Progress that reads well both on a terminal and in a cluster job's log file.

On a terminal (stdout and stderr both): tqdm bars. Otherwise, as in every batch job whose output
goes to a file or a pipe: plain lines, flushed as they are written, never a carriage return.
Standard library only, so every layer (data preparation, the trainer's logger) can use it.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from typing import Callable, Optional, TextIO


def print_error(err: object) -> None:
    """``error: ...`` on stderr in one write: every rank of a torchrun job writes to the same pipe,
    and print()'s separate newline lets two ranks' lines run together. A pipe keeps one write of
    under PIPE_BUF (4 KiB) bytes whole."""
    sys.stderr.write(f"error: {err}\n")
    sys.stderr.flush()


def is_terminal(*streams: Optional[TextIO]) -> bool:
    """True when every stream (default: stdout and stderr) is an open terminal."""
    for stream in streams or (sys.stdout, sys.stderr):
        try:
            if stream is None or not stream.isatty():
                return False
        except (AttributeError, ValueError):  # no isatty, or a closed file
            return False
    return True


def format_eta(seconds: Optional[float]) -> str:
    """``1h12m`` / ``4m05s`` / ``12s``; ``?`` while no rate is known."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_count(value: float) -> str:
    """Short human count for token totals and rates: 950, 12.3K, 4.56M, 1.2B."""
    for threshold, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= threshold:
            return f"{value / threshold:.3g}{suffix}"
    return f"{value:.0f}"


class RecentRate:
    """Units per second over the last ``window`` updates of a running position (a step, a byte count)."""

    def __init__(self, start: float = 0.0, window: int = 10, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.points: deque[tuple[float, float]] = deque([(start, clock())], maxlen=window + 1)

    def add(self, position: float) -> None:
        self.points.append((position, self.clock()))

    def rate(self) -> Optional[float]:
        (first, t0), (last, t1) = self.points[0], self.points[-1]
        if t1 <= t0 or last <= first:
            return None
        return (last - first) / (t1 - t0)

    def eta(self, remaining: float) -> Optional[float]:
        if remaining <= 0:
            return 0.0
        rate = self.rate()
        return remaining / rate if rate else None


class ProgressLines:
    """Progress as plain periodic lines: at most one every ``every_s`` seconds, plus one at the end.

    ``update(n, work)`` counts ``n`` units (tokens) and ``work`` toward ``total_work`` (any measure of
    how far along the input is, e.g. characters read of a known corpus size); without a total the
    lines show counts and rates only. ``initial`` and ``initial_work`` are where a resumed job
    starts: counted in the totals, not in the rates.
    """

    def __init__(self, desc: str, *, unit: str = "tok", total_work: Optional[float] = None, every_s: float = 10.0,
                 file: Optional[TextIO] = None, clock: Callable[[], float] = time.monotonic,
                 initial: int = 0, initial_work: float = 0.0):
        self.desc, self.unit, self.total_work, self.every_s = desc, unit, total_work, every_s
        self.file = file
        self.clock = clock
        self.initial = initial
        self.count, self.work = initial, initial_work
        self.started = self.last_time = clock()
        self.last_count, self.last_work = initial, initial_work
        self.closed = False

    def _print(self, text: str) -> None:
        print(text, file=self.file or sys.stderr, flush=True)

    def update(self, n: int, work: float = 0.0) -> None:
        self.count += n
        self.work += work
        now = self.clock()
        if now - self.last_time < self.every_s:
            return
        elapsed = now - self.last_time
        rate = (self.count - self.last_count) / elapsed
        parts = [f"{self.desc}: {format_count(self.count)} {self.unit}", f"{format_count(rate)} {self.unit}/s"]
        if self.total_work:
            done = min(self.work / self.total_work, 0.99)  # an estimate: never claim the end before it comes
            work_rate = (self.work - self.last_work) / elapsed
            remaining = max(self.total_work - self.work, 0.0)
            parts += [f"{done:.0%}", f"eta {format_eta(remaining / work_rate if work_rate > 0 else None)}"]
        self._print(" | ".join(parts))
        self.last_time, self.last_count, self.last_work = now, self.count, self.work

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        elapsed = max(self.clock() - self.started, 1e-9)
        done = self.count - self.initial
        resumed = f" ({format_count(done)} this run)" if self.initial else ""
        self._print(f"{self.desc}: {format_count(self.count)} {self.unit}{resumed} in {elapsed:.1f}s "
                    f"({format_count(done / elapsed)} {self.unit}/s)")


class _Bar:
    """A tqdm counter with the ``ProgressLines`` interface (``work`` is not shown on the bar)."""

    def __init__(self, desc: str, unit: str, initial: int = 0):
        from tqdm.auto import tqdm

        self.bar = tqdm(desc=desc, unit=unit, unit_scale=True, file=sys.stderr, initial=initial)

    def update(self, n: int, work: float = 0.0) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class _Silent:
    def update(self, n: int, work: float = 0.0) -> None:
        pass

    def close(self) -> None:
        pass


def progress_counter(desc: str, *, enabled: bool, unit: str = "tok", total_work: Optional[float] = None,
                     initial: int = 0, initial_work: float = 0.0):
    """A bar on a terminal, periodic plain lines otherwise, nothing when not ``enabled``."""
    if not enabled:
        return _Silent()
    if is_terminal():
        return _Bar(desc, unit, initial)
    return ProgressLines(desc, unit=unit, total_work=total_work, initial=initial, initial_work=initial_work)
