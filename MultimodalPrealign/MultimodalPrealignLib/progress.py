"""Progress reporting and cancellation shared by the CLI (text lines) and Slicer (progress bar)."""

from __future__ import annotations

import sys
import time
from typing import Callable

from .errors import Cancelled

#: callback(stage, fraction 0..1 of the whole run, message)
ProgressCallback = Callable[[str, float, str], None]


class Progress:
    """Reports pipeline progress; ``cancel_requested()`` returning True stops the run at the next check."""

    def __init__(self, callback: ProgressCallback | None = None,
                 cancel_requested: Callable[[], bool] | None = None):
        self.callback = callback
        self.cancel_requested = cancel_requested
        self.started = time.perf_counter()

    def report(self, stage: str, fraction: float, message: str = "") -> None:
        self.check_cancelled()
        if self.callback is not None:
            self.callback(stage, max(0.0, min(1.0, fraction)), message)

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
