"""The worker side of ``prepare``: one tokenizer per process, built once from its JSON, and the
pool that feeds them."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
from multiprocessing.connection import Connection, wait
from typing import Any, Iterable, Iterator, Optional

import numpy as np

WORKER: dict = {}


def init_worker(tokenizer_json: str, eos_id: int, parent: Optional[int] = None) -> None:
    """Build this process's tokenizer; ``parent`` is the pool's process, None when run in-process."""
    if parent is not None:  # a pool worker
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; no nested threads
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the pool
        die_with(parent)
    from tokenizers import Tokenizer

    WORKER["tok"] = Tokenizer.from_str(tokenizer_json)
    WORKER["eos"] = eos_id


def die_with(parent: int) -> None:
    """A killed parent must leave no worker behind: each holds the cache lock, inherited by fork."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def encode(batch: tuple[list[int], list[str]]) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """Token ids of a batch of documents, each followed by EOS, as one flat array plus lengths,
    and each document's UTF-8 bytes (for bits per byte)."""
    source_ids, texts = batch
    parts = [np.array(e.ids, dtype=np.uint32) for e in WORKER["tok"].encode_batch_fast(texts, add_special_tokens=False)]
    lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    flat = np.insert(np.concatenate(parts), np.cumsum(lengths), WORKER["eos"])  # EOS after every document
    nbytes = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
    return source_ids, flat, lengths + 1, nbytes


def read_ahead(batches: Iterator, depth: int = 2) -> Iterator:
    """Run the reader in a thread so file reading and JSON parsing overlap tokenization (which
    releases the GIL); exceptions are handed over and re-raised here, in order."""
    q: queue.Queue = queue.Queue(depth)
    done = object()

    def produce() -> None:
        try:
            for item in batches:
                q.put(item)
            q.put(done)
        except BaseException as err:
            q.put(err)

    threading.Thread(target=produce, daemon=True, name="llmtrain-prepare-reader").start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


class EncoderPool:
    """``encode`` in ``num_proc`` forked processes, results in input order, at most ``depth`` batches
    per process in flight (memory stays flat). Any idle worker takes the next batch from one shared
    pipe. Leaving the ``with`` block on an exception kills the workers at once: multiprocessing.Pool's
    terminate can hang forever on a half-written batch of a megabyte, which an interrupt must not.
    """

    def __init__(self, num_proc: int, tokenizer_json: str, eos_id: int, depth: int = 2):
        ctx = mp.get_context("fork")
        self.slots = threading.Semaphore(num_proc * depth)
        self.stopping = False
        task_r, self.tasks = ctx.Pipe(duplex=False)
        lock = ctx.Lock()  # one reader at a time on the shared pipe
        self.procs: list = []
        self.results: list[Connection] = []
        for _ in range(num_proc):
            result_r, result_w = ctx.Pipe(duplex=False)
            inherited = [self.tasks, result_r, *self.results]  # ours: held open by a child they would hide EOF
            proc = ctx.Process(target=_serve, args=(task_r, result_w, lock, inherited, tokenizer_json, eos_id,
                                                    os.getpid()), daemon=True, name="llmtrain-tokenizer")
            proc.start()
            result_w.close()
            self.procs.append(proc)
            self.results.append(result_r)
        task_r.close()  # the workers' now: when they are gone, the feeder's next send fails instead of blocking

    def imap(self, batches: Iterable) -> Iterator:
        """Encoded batches in order; a reader exception is raised in its place in that order."""
        threading.Thread(target=self._feed, args=(batches,), daemon=True, name="llmtrain-prepare-reader").start()
        pending: dict[int, Any] = {}
        live = dict(zip(self.results, self.procs))
        result_of = {p.sentinel: conn for conn, p in live.items()}
        index = 0
        while live or pending:
            while index in pending:
                item = pending.pop(index)
                index += 1
                self.slots.release()
                if isinstance(item, BaseException):
                    raise item
                yield item
            if not live:
                break
            for ready in wait([*live, *(p.sentinel for p in live.values())]):
                if isinstance(ready, Connection):
                    message = ready.recv()
                    if message is None:  # that worker saw the end of the input
                        live.pop(ready)
                    else:
                        pending[message[0]] = message[1]
                elif result_of[ready] in live and not result_of[ready].poll():  # read what it sent first
                    code = live[result_of[ready]].exitcode
                    why = "was killed (out of memory?)" if code == -signal.SIGKILL else f"exited with code {code}"
                    raise RuntimeError(f"a tokenizer worker {why}")
        if pending:
            raise RuntimeError(f"tokenizer workers lost batches {sorted(pending)[:3]}...")

    def _feed(self, batches: Iterable) -> None:
        batches, index = iter(batches), 0
        while True:
            self.slots.acquire()
            if self.stopping:
                return
            try:
                message = (index, next(batches))
            except StopIteration:
                break
            except BaseException as err:  # a reader error: imap raises it where this batch would be
                message = (index, None, _picklable(err))
            if not self._send(message):
                return
            index += 1
            if len(message) == 3:
                break
        for _ in self.procs:
            self._send(None)

    def _send(self, message) -> bool:
        try:
            self.tasks.send(message)
            return True
        except (OSError, ValueError):  # closed by __exit__: the pool is stopping
            return False

    def __enter__(self) -> "EncoderPool":
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.stopping = True
        for _ in range(len(self.procs) * 4):  # wake a feeder waiting for a slot, so it sees the stop
            self.slots.release()
        for proc in self.procs:
            if kind is not None:
                proc.kill()
            proc.join()
        for conn in (self.tasks, *self.results):
            conn.close()


def _picklable(err: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


def _serve(tasks: Connection, results: Connection, lock, inherited: list[Connection], tokenizer_json: str,
           eos_id: int, parent: int) -> None:
    for conn in inherited:
        conn.close()
    init_worker(tokenizer_json, eos_id, parent)
    while True:
        try:
            with lock:
                message = tasks.recv()
        except EOFError:  # the parent is gone
            return
        if message is None:
            results.send(None)
            return
        if len(message) == 3:  # a reader error, passed through to keep its place in the order
            results.send((message[0], message[2]))
            continue
        index, batch = message
        try:
            results.send((index, encode(batch)))
        except BrokenPipeError:
            return
        except Exception as err:  # a bug, not the input's fault: let the parent show it
            results.send((index, RuntimeError(f"tokenizer worker: {type(err).__name__}: {err}")))
