"""Progress reporting and cancellation shared by the CLI (text lines) and Slicer (progress bar)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable

from .errors import Cancelled

#: callback(stage, fraction 0..1 of the whole run, message)
ProgressCallback = Callable[[str, float, str], None]


class Progress:
    """Reports pipeline progress; ``cancel_requested()`` returning True stops the run at the next check.

    Fractions reach the callback monotonic: a step that reports a smaller fraction than one already shown (a
    fallback attempt starting over, a sub-step counting from 0) is shown at the fraction already reached.
    :meth:`span` gives a step its own 0..1 scale inside a window of the run's.
    """

    def __init__(self, callback: ProgressCallback | None = None,
                 cancel_requested: Callable[[], bool] | None = None):
        self.callback = callback
        self.cancel_requested = cancel_requested
        self.started = time.perf_counter()
        self.fraction_done = 0.0  # the highest fraction shown so far (kept on the root Progress)
        self._root = self
        self._window = (0.0, 1.0)

    def span(self, start: float, end: float) -> Progress:
        """A Progress for one step whose fractions 0..1 map onto [start, end] of this one's scale."""
        child = Progress(self.callback, self.cancel_requested)
        child.started, child._root = self.started, self._root
        low, high = self._window
        child._window = (low + (high - low) * start, low + (high - low) * end)
        return child

    def report(self, stage: str, fraction: float, message: str = "") -> None:
        self.check_cancelled()
        low, high = self._window
        value = max(self._root.fraction_done, low + (high - low) * max(0.0, min(1.0, fraction)))
        self._root.fraction_done = value
        if self.callback is not None:
            self.callback(stage, value, message)

    def check_cancelled(self) -> None:
        if self.cancel_requested is not None and self.cancel_requested():
            raise Cancelled()

    def relayed(self) -> tuple[Progress, Relay]:
        """This Progress for work spread over threads (:func:`parallel.each`): its reports and cancel checks made on
        other threads reach the callback and ``cancel_requested`` only through the thread calling this (a Slicer
        progress bar and Cancel button live on the GUI thread), when it reports or calls ``Relay.flush``."""
        relay = Relay(self.callback, self.cancel_requested)
        child = Progress(relay.report, relay.cancel_requested)
        child.started, child._root, child._window = self.started, self._root, self._window
        return child, relay


class Relay:
    """Forwards progress reports and cancel checks made on worker threads through the thread that made it."""

    def __init__(self, callback: ProgressCallback | None, cancel_requested: Callable[[], bool] | None):
        self.callback, self._cancel_requested = callback, cancel_requested
        self.owner = threading.current_thread()
        self.lock = threading.Lock()
        self.pending: list[tuple[str, float, str]] = []
        self.shown = 0.0
        self.cancelled = False

    def report(self, stage: str, fraction: float, message: str) -> None:
        with self.lock:
            self.pending.append((stage, fraction, message))
        if threading.current_thread() is self.owner:
            self.flush()

    def cancel_requested(self) -> bool:
        """On the owner thread: asks the real check; elsewhere: what the owner saw last (or :meth:`stop`)."""
        if threading.current_thread() is self.owner and not self.cancelled and self._cancel_requested is not None:
            self.cancelled = bool(self._cancel_requested())
        return self.cancelled

    def flush(self) -> None:
        """On the owner thread: show the pending reports (never a smaller fraction than one shown) and poll cancel."""
        with self.lock:
            items, self.pending = self.pending, []
        for stage, fraction, message in items:
            self.shown = max(self.shown, fraction)
            if self.callback is not None:
                self.callback(stage, self.shown, message)
        self.cancel_requested()

    def stop(self) -> None:
        """Make every later cancel check on any thread return True (the owner's own work failed or was cancelled)."""
        self.cancelled = True


def text_progress(stream=None) -> ProgressCallback:
    """A callback printing ``[ 42%] stage: message`` lines (to stderr by default)."""
    stream = stream or sys.stderr
    started = time.perf_counter()

    def callback(stage: str, fraction: float, message: str) -> None:
        elapsed = time.perf_counter() - started
        print(f"[{fraction * 100:3.0f}% {elapsed:6.1f}s] {stage}: {message}", file=stream, flush=True)

    return callback


SILENT = Progress()
