"""A wall-clock bound on a block of Python code running in the current thread.

Capturing a model can take unboundedly long: ``torch.export``'s symbolic shapes have been
seen to spend more than 13 minutes inside sympy on a small vision transformer. A capture
attempt therefore runs under :func:`time_bound`, and the caller falls back to a cheaper
strategy when it expires.

The bound is enforced by a watchdog thread that, at the deadline, raises
:class:`CaptureTimeout` asynchronously in the bounded thread
(``PyThreadState_SetAsyncExc``). The exception is delivered at the next Python bytecode,
so a long computation inside one C call ends when that call returns; sympy and tracing
code are Python, and return quickly. It works in any thread, not only the main one, and
needs no signals. :class:`CaptureTimeout` derives from ``BaseException`` so that generic
``except Exception`` handlers inside the bounded code cannot swallow it; ``finally``
blocks and context managers still run.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from typing import Iterator

__all__ = ["CaptureTimeout", "time_bound"]


class CaptureTimeout(BaseException):
    """Raised inside a :func:`time_bound` block when its time is up."""


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> int:
    return ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else ctypes.c_void_p(0)
    )


@contextlib.contextmanager
def time_bound(seconds: float | None) -> Iterator[None]:
    """Raise :class:`CaptureTimeout` in the enclosed block after ``seconds`` (None or a
    non-positive value: no bound)."""
    if seconds is None or seconds <= 0:
        yield
        return
    target = threading.get_ident()
    done = threading.Event()
    fired = threading.Event()

    def watchdog() -> None:
        if not done.wait(seconds):
            fired.set()
            _raise_in(target, CaptureTimeout)

    thread = threading.Thread(target=watchdog, name="fxfreeze-capture-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        if fired.is_set():
            # The block may have finished just as the deadline passed: drop an exception
            # that is still pending so that it cannot surface later, elsewhere.
            _raise_in(target, None)
