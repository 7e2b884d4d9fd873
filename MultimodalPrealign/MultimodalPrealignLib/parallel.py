"""Two independent computations at once, with the same results as one after the other.

The search scores each pose both ways (fixed samples into the moving image, moving samples into the fixed one),
builds the two images' coarse copies, and measures independent probes: pairs of computations that share nothing.
:func:`both` runs the second on one worker thread while the calling thread runs the first (scipy's interpolation,
numpy's large array operations and SimpleITK's filters release the GIL, so two cores do both at once). Each result
is computed by the same code on the same inputs as in a serial run, so the outputs are bit-identical whatever the
machine's core count or load: nothing is summed across threads.

``MULTIMODAL_PREALIGN_THREADS=1`` (or a one-core machine) runs everything in the calling thread.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

A = TypeVar("A")
B = TypeVar("B")

_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None
_IN_WORKER = threading.local()
#: Held while the worker runs a caller's second computation.
_BUSY = threading.Lock()


def enabled() -> bool:
    """True when a second thread may be used (more than one core, not switched off by the environment)."""
    setting = os.environ.get("MULTIMODAL_PREALIGN_THREADS", "").strip()
    if setting:
        try:
            return int(setting) > 1
        except ValueError:
            return False
    return (os.cpu_count() or 1) > 1


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmp-second",
                                       initializer=lambda: setattr(_IN_WORKER, "active", True))
        return _POOL


def both(first: Callable[[], A], second: Callable[[], B]) -> tuple[A, B]:
    """``(first(), second())``, the second on the worker thread while this thread runs the first.

    Serial when threads are off, or when called from the worker thread itself or while the worker is busy (nested
    or concurrent callers never wait on each other). An exception of either is raised after both have finished.
    """
    if not enabled() or getattr(_IN_WORKER, "active", False):
        return first(), second()
    pool = _pool()
    if not _BUSY.acquire(blocking=False):
        return first(), second()
    try:
        future = pool.submit(second)
        try:
            a = first()
        except BaseException:
            future.exception()  # wait for the worker before the error leaves (its result is not needed)
            raise
        return a, future.result()
    finally:
        _BUSY.release()
