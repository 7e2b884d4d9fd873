"""Two independent computations at once, with the same results as one after the other.

The search scores each pose both ways (fixed samples into the moving image, moving samples into the fixed one),
builds the two images' coarse copies, and measures independent probes: pairs of computations that share nothing.
:func:`both` runs the second on one worker thread while the calling thread runs the first (scipy's interpolation,
numpy's large array operations and SimpleITK's filters release the GIL, so two cores do both at once). Each result
is computed by the same code on the same inputs as in a serial run, so the outputs are bit-identical whatever the
machine's core count or load: nothing is summed across threads. :func:`each` runs a list of independent jobs
(the structures of ``--per-structure``) two at a time the same way.

``MULTIMODAL_PREALIGN_THREADS=1`` (or a one-core machine) runs everything in the calling thread.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

A = TypeVar("A")
B = TypeVar("B")
T = TypeVar("T")

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


def each(items: Sequence[T], fn: Callable[[T], B], idle: Callable[[], None] | None = None,
         on_error: Callable[[], None] | None = None, idle_every_s: float = 0.2) -> list[B]:
    """``[fn(item) for item in items]``, two at a time: this thread and the worker each take the next item in order.

    Each item is computed whole on one thread, so the results are the serial ones. Serial under the same conditions
    as :func:`both`. ``idle()``: called on this thread every ``idle_every_s`` seconds while it waits for the
    worker's last item (forward the worker's progress, poll a Cancel button). When ``fn`` raises, no further item is
    started; ``on_error()`` is called on this thread first when its own item raised (tell the worker's item to
    stop), and the error is raised after the worker has finished.
    """
    items = list(items)
    if len(items) < 2 or not enabled() or getattr(_IN_WORKER, "active", False):
        return [fn(item) for item in items]
    pool = _pool()
    if not _BUSY.acquire(blocking=False):
        return [fn(item) for item in items]
    results: list = [None] * len(items)
    taken, lock = [0], threading.Lock()
    failed, worker_done = threading.Event(), threading.Event()

    def run_items() -> None:
        while True:
            with lock:
                if failed.is_set() or taken[0] >= len(items):
                    return
                index = taken[0]
                taken[0] += 1
            try:
                results[index] = fn(items[index])
            except BaseException:
                failed.set()
                raise

    def second() -> None:
        try:
            run_items()
        finally:
            worker_done.set()

    try:
        future = pool.submit(second)
        try:
            run_items()
            while not worker_done.wait(idle_every_s):
                if idle is not None:
                    idle()
        except BaseException:
            failed.set()
            if on_error is not None:
                on_error()
            future.exception()  # wait for the worker's item to end before the error leaves
            raise
        future.result()
        if idle is not None:
            idle()
        return results
    finally:
        _BUSY.release()
