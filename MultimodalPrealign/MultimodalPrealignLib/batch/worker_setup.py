"""Dask preload of the local cluster's workers: Ctrl-C belongs to the batch, not to its workers.

A terminal sends Ctrl-C (SIGINT) to every process of the batch, the workers included; the batch stops them in
order (their pairs leave nothing), so a worker ignores SIGINT instead of dying with a traceback.
"""

from __future__ import annotations

import signal
import threading


def dask_setup(worker) -> None:  # noqa: ARG001 - Dask's preload hook
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
