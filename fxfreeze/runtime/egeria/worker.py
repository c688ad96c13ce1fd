"""The asynchronous reference worker: CPU jobs off the training thread.

Egeria runs its reference model on the CPU next to training and never makes training wait
for it. :class:`ReferenceWorker` is a daemon thread with its own PyTorch thread count
(OpenMP's thread count is per calling thread, so ``torch.set_num_threads`` inside the worker
does not change the training thread's; the process-wide default it also sets, which threads
started later begin from, is put back once the worker has its own). Jobs are callables run
in submission order; their results are collected with :meth:`ReferenceWorker.poll` whenever
the training thread looks, so a slow reference only delays decisions.

Failures: a job that raises produces a result carrying the error. A worker thread that
dies (something escaped the job, the interpreter killed it) is restarted on the next
:meth:`submit` / :meth:`poll`, up to ``max_restarts`` times; after that the worker is
*disabled*, which the caller reports, and training goes on without it. A job that runs
longer than ``job_timeout`` seconds (a hang) disables the worker too, with one warning: a
thread cannot be killed, so it is left to finish (or not) on its own.
"""

from __future__ import annotations

import atexit
import itertools
import os
import sys
import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["ReferenceWorker", "JobResult"]


def _lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value by ``nice`` (Linux applies setpriority to one
    thread when given its id; other systems, or a refusal, leave it as it is)."""
    if nice <= 0 or not hasattr(os, "setpriority") or not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError:
        pass

logger = logging.getLogger("fxfreeze")


@dataclass
class JobResult:
    """What one job returned (``value``) or raised (``error``), its wall seconds on the
    worker (``seconds``, which include the time the worker waited for a core) and the CPU
    seconds its thread used (``cpu_seconds``: what it took from the cores training uses)."""

    job_id: int
    tag: Any
    value: Any = None
    error: str | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0


class _Stop:
    pass


_LIVE: "weakref.WeakSet[ReferenceWorker]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # a daemon thread still inside a PyTorch kernel when the interpreter exits aborts the
    # process ("terminate called without an active exception"): stop them first, dropping
    # queued jobs so that only the running one has to finish
    for w in list(_LIVE):
        w.close(timeout=60.0, drop_queued=True)


class ReferenceWorker:
    """One background thread running submitted jobs in order."""

    def __init__(self, num_threads: int = 1, max_restarts: int = 3, name: str = "fxfreeze-reference",
                 job_timeout: float = 120.0, nice: int = 10) -> None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, got {num_threads}")
        self.num_threads = num_threads
        self.max_restarts = max_restarts
        self.job_timeout = job_timeout
        #: how much lower than training the worker thread's CPU priority is (Linux: the
        #: thread's own nice value; elsewhere ignored): the reference takes idle cores, and
        #: when training needs them all, training comes first
        self.nice = nice
        self.name = name
        self.restarts = 0
        self.disabled = False
        self.failures: list[str] = []
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._results: queue.Queue[JobResult] = queue.Queue()
        self._ids = itertools.count()
        self._pending: set[int] = set()
        self._running: tuple[int, Any] | None = None
        self._running_since = 0.0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        #: wall seconds the worker spent in jobs (at its lower priority, mostly waiting for a
        #: core while training keeps them busy)
        self.busy_seconds = 0.0
        #: CPU seconds the worker's thread used in jobs: the core time it took from training
        self.cpu_seconds = 0.0
        _LIVE.add(self)

    # -- lifecycle -----------------------------------------------------------------------------
    def _start(self) -> None:
        # ``torch.set_num_threads`` sets the calling thread's OpenMP count and also the process's
        # default, which every thread that first uses PyTorch later starts from (a DataLoader's
        # pin-memory thread, the user's threads, a GPU training thread that has not run a CPU
        # parallel op yet). The worker sets its own count, then the default is put back here.
        before = torch.get_num_threads()  # also fixes this thread's count before the change
        ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(ready,), name=self.name, daemon=True)
        self._thread.start()
        if ready.wait(10.0):
            torch.set_num_threads(before)

    def _loop(self, ready: threading.Event) -> None:
        # PyTorch initialises a thread's count from the process default on the thread's first
        # use; done first here, so that putting the default back later does not reach this thread
        torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        ready.set()
        _lower_priority(self.nice)
        while True:
            item = self._jobs.get()
            if isinstance(item, _Stop):
                return
            job_id, tag, fn = item
            with self._lock:
                self._running = (job_id, tag)
                self._running_since = time.monotonic()
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                value = fn()
                res = JobResult(job_id, tag, value=value)
            except Exception as e:  # noqa: BLE001 - reported to the caller, never raised here
                res = JobResult(job_id, tag, error=f"{type(e).__name__}: {e}")
            res.seconds = time.perf_counter() - t0
            res.cpu_seconds = time.thread_time() - c0
            with self._lock:
                self._running = None
                self._pending.discard(job_id)
                self.busy_seconds += res.seconds
                self.cpu_seconds += res.cpu_seconds
            self._results.put(res)

    def check(self) -> bool:
        """Restart a dead thread if allowed; return whether the worker can take jobs."""
        if self._closed or self.disabled:
            return False
        if self._thread is None:
            self._start()
            return True
        if self._thread.is_alive():
            with self._lock:
                running, since = self._running, self._running_since
            if running is not None and time.monotonic() - since > self.job_timeout:
                self.disabled = True
                self.failures.append(f"job {running[0]} has not returned after {self.job_timeout:g} s")
                logger.warning(
                    "reference job %d has not returned after %.0f s (a hang?); giving up on the reference: freezing "
                    "decisions stop, training goes on", running[0], self.job_timeout,
                )
                return False
            return True
        # the thread died: the job it was running is lost
        with self._lock:
            lost = self._running
            self._running = None
            if lost is not None:
                self._pending.discard(lost[0])
        reason = f"reference worker thread died (job {lost[0]})" if lost is not None else "reference worker thread died"
        self.failures.append(reason)
        if lost is not None:
            self._results.put(JobResult(lost[0], lost[1], error=reason))
        if self.restarts >= self.max_restarts:
            self.disabled = True
            logger.warning("%s; restarted %d times already, giving up: freezing decisions stop, training goes on", reason, self.restarts)
            return False
        self.restarts += 1
        logger.warning("%s; restarting it (%d of %d)", reason, self.restarts, self.max_restarts)
        self._start()
        return True

    def close(self, timeout: float | None = 5.0, drop_queued: bool = False) -> None:
        """Stop after the queued jobs (or, ``drop_queued``, after the running one only);
        results already in stay pollable."""
        if self._closed:
            return
        self._closed = True
        if drop_queued:
            while True:
                try:
                    item = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(item, _Stop):
                    with self._lock:
                        self._pending.discard(item[0])
        if self._thread is not None and self._thread.is_alive():
            self._jobs.put(_Stop())
            self._thread.join(timeout)

    # -- jobs ----------------------------------------------------------------------------------
    def submit(self, fn: Callable[[], Any], tag: Any = None) -> int | None:
        """Queue ``fn``; returns its job id, or None when the worker is closed or disabled."""
        if not self.check():
            return None
        job_id = next(self._ids)
        with self._lock:
            self._pending.add(job_id)
        self._jobs.put((job_id, tag, fn))
        return job_id

    def poll(self) -> list[JobResult]:
        """Results finished since the last poll, in completion order (never blocks)."""
        self.check()
        out: list[JobResult] = []
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                return out

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the queue is empty; False when the worker is disabled meanwhile (a
        job ran past ``job_timeout``) or ``timeout`` (default: ``job_timeout``) passes."""
        deadline = time.monotonic() + (self.job_timeout if timeout is None else timeout)
        while self.pending:
            if not self.check():
                return False
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True
