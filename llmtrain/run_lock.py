"""One run per run directory: rank 0 holds an exclusive lock on ``RUN_DIR/.lock`` for the whole run.

Two layers, because cluster filesystems differ: an ``flock`` (released by the kernel when its process
dies, so a crashed run never blocks the next one), and a holder record in the file (host, pid, start)
whose modification time a background thread refreshes. The record catches a second process on another
node where the filesystem's flock is node-local; a record whose heartbeat stopped, or whose process is
gone from this host, is stale and taken over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional

from llmtrain.errors import UserError

LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 180.0

_held: dict[str, "RunLock"] = {}  # resolved run_dir -> the lock this process holds on it


def _describe(holder: dict[str, Any], age_s: float) -> str:
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('started')}, "
            f"heartbeat {age_s:.0f} s ago")


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: Optional[int] = None
        self.count = 0
        self.took_over: Optional[str] = None  # the stale holder this lock replaced, for the log
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def acquire(cls, run_dir: str | Path) -> "RunLock":
        """The lock on ``run_dir`` (re-entrant within a process); raises UserError naming the holder."""
        key = str(Path(run_dir).resolve())
        lock = _held.get(key) or cls(run_dir)
        if lock.count == 0:
            lock._take()
            _held[key] = lock
        lock.count += 1
        return lock

    def release(self) -> None:
        self.count -= 1
        if self.count > 0 or self.fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        # No holder record once the run has ended: the next run would report it as a stale holder.
        # A process that dies keeps its record, which is what the next run should hear about.
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        _held.pop(str(self.run_dir.resolve()), None)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ internals
    def _refuse(self, holder: dict[str, Any], age_s: float) -> UserError:
        return UserError("run_dir", f"{self.run_dir} is in use by another llmtrain run ({_describe(holder, age_s)}); "
                                    f"wait for it to end or stop it, or use another run_dir")

    def _take(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder, age = self._read_holder()
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise self._refuse(holder, age) from None
            raise UserError("run_dir", f"cannot lock {self.path} ({err.strerror}); expected a directory on a "
                                       f"filesystem with file locks") from None
        holder, age = self._read_holder()
        if holder and not self._stale(holder, age):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise self._refuse(holder, age)
        if holder:
            self.took_over = _describe(holder, age)
        self.fd = fd
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._thread = threading.Thread(target=self._beat, name="llmtrain-run-lock", daemon=True)
        self._thread.start()

    def _read_holder(self) -> tuple[dict[str, Any], float]:
        try:
            text, age = self.path.read_text(), time.time() - self.path.stat().st_mtime
            holder = json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}, 0.0
        return (holder if isinstance(holder, dict) else {}), age

    @staticmethod
    def _stale(holder: dict[str, Any], age_s: float) -> bool:
        """We hold the flock, which one kernel enforces exactly: a holder on this host is gone. One on
        another host may sit behind a node-local flock: stale only once its heartbeat stopped."""
        return holder.get("host") == socket.gethostname() or age_s > STALE_AFTER_S

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass
