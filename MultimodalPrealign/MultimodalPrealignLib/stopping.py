"""Stopping a command-line run cleanly on Ctrl-C (SIGINT) or SIGTERM: exit 130, nothing half-written.

The signal handler only sets a flag; the run polls it (``Progress.cancel_requested``) at its check points,
including every optimizer iteration, and raises ``errors.Cancelled``, which the command line turns into exit 130.
Some calls cannot be interrupted from Python (one elastix stage, a resampling, reading a file): when the run has
not stopped ``grace_s`` seconds after the signal, a watchdog removes the folders the run was writing (its
staging folders and temporary working folders, registered with :meth:`StopRequest.track`) and ends the process
with exit code 130. A commit (moving finished outputs into place) is never cut: the watchdog waits for it.
A second Ctrl-C ends the process at once, after the same cleanup.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

from .errors import EXIT_INTERRUPTED

#: Seconds between the signal and the forced exit when the run has not stopped by itself.
DEFAULT_GRACE_S = 1.0


class StopRequest:
    """The stop flag of one run, its signal handlers and its watchdog. Call it to ask whether to stop."""

    def __init__(self, grace_s: float = DEFAULT_GRACE_S, message: str = "interrupted: nothing was written",
                 stream=None):
        self.grace_s = grace_s
        self.message = message
        self.stream = stream or sys.stderr
        self.requested = threading.Event()
        self.finished = threading.Event()
        self.commit_lock = threading.RLock()
        self.paths: set = set()
        self._previous: dict = {}
        self._watchdog: threading.Thread | None = None

    def __call__(self) -> bool:
        return self.requested.is_set()

    # -- what to clean up when the process must be ended
    def track(self, path) -> None:
        self.paths.add(Path(path))

    def untrack(self, path) -> None:
        self.paths.discard(Path(path))

    @contextlib.contextmanager
    def committing(self):
        """Hold while finished outputs are moved into place: the watchdog waits instead of cutting it."""
        with self.commit_lock:
            yield

    def cleanup(self) -> None:
        for path in list(self.paths):
            shutil.rmtree(path, ignore_errors=True)
        self.paths.clear()

    # -- signals
    def install(self) -> StopRequest:
        """Route SIGINT and SIGTERM to this request (main thread only; elsewhere nothing is installed)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def restore(self) -> None:
        """Put the previous handlers back and stand the watchdog down (the run has ended)."""
        self.finished.set()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        if self.requested.is_set():  # second signal: do not wait for the grace period
            self._end_process()
        self.requested.set()
        self._watchdog = threading.Thread(target=self._watch, name="stop-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        if not self.finished.wait(self.grace_s):
            self._end_process()

    def _end_process(self) -> None:
        with self.commit_lock:
            if self.finished.is_set():
                return
            self.cleanup()
            with contextlib.suppress(Exception):
                print(f"multimodal-prealign: {self.message}", file=self.stream, flush=True)
            os._exit(EXIT_INTERRUPTED)


#: The request of the running command (None outside a command-line run): long steps register their folders here.
ACTIVE: StopRequest | None = None


def track(path) -> None:
    """Register a folder the run is writing, to be removed if the process must be ended (no-op without a run)."""
    if ACTIVE is not None:
        ACTIVE.track(path)


def untrack(path) -> None:
    if ACTIVE is not None:
        ACTIVE.untrack(path)


@contextlib.contextmanager
def committing():
    """Around moving finished outputs into place (see :meth:`StopRequest.committing`)."""
    if ACTIVE is None:
        yield
    else:
        with ACTIVE.committing():
            yield


@contextlib.contextmanager
def stop_on_signals(grace_s: float = DEFAULT_GRACE_S):
    """A :class:`StopRequest` with SIGINT/SIGTERM routed to it for the duration of a command."""
    global ACTIVE
    request = StopRequest(grace_s).install()
    previous, ACTIVE = ACTIVE, request
    try:
        yield request
    finally:
        ACTIVE = previous
        request.restore()
