"""Progress reporting and cancellation shared by the CLI (text lines) and Slicer (progress bar)."""

from __future__ import annotations

import sys
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


def text_progress(stream=None) -> ProgressCallback:
    """A callback printing ``[ 42%] stage: message`` lines (to stderr by default)."""
    stream = stream or sys.stderr
    started = time.perf_counter()

    def callback(stage: str, fraction: float, message: str) -> None:
        elapsed = time.perf_counter() - started
        print(f"[{fraction * 100:3.0f}% {elapsed:6.1f}s] {stage}: {message}", file=stream, flush=True)

    return callback


SILENT = Progress()
