"""Pre-emption that schedulers understand: SIGUSR1, SIGTERM and SIGINT finish the step, save, and
the process exits with 128 + the signal number (138, 143, 130), so a stopped run never looks finished.

SIGUSR1 is SLURM's advance warning (``#SBATCH --signal=B:USR1@N``); SIGTERM comes from a scheduler
or ``kill``; SIGINT from Ctrl-C, where a second Ctrl-C aborts at once. The handler only records the
signal: the training loop agrees on it across ranks at the end of each step (a rank that got it tells
the others), saves and stops.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
    return 128 + int(signum)


class StopRequest:
    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS}
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handler(self, signum: int, _frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            self.uninstall()
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
        if self.signum is None:
            self.signum = signum

    @property
    def name(self) -> Optional[str]:
        return signal.Signals(self.signum).name if self.signum else None
