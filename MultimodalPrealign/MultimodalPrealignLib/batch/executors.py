"""Where the pairs run: one after another in this process, or as Dask tasks (a local cluster or a running one).

Both call :func:`pair.run_pair` per pair and hand each finished pair's row to ``on_row``; ``on_tick(running)``
is called about every ``TICK_S`` seconds while pairs run (the progress bar). Dask (``distributed``) is an
optional dependency (the ``batch`` extra), imported only here and only when used.

Dask: one task per pair (key ``pair-<id>-<token>``). A LocalCluster runs ``workers`` processes with one task
thread each (one pair at a time per worker) and pins ITK/OpenMP/BLAS to ``threads`` threads per worker (set
before the worker starts: ``distributed.nanny.pre-spawn-environ``). A worker that dies (killed, out of memory)
has its pair moved to another worker by the scheduler, up to ``distributed.scheduler.allowed-failures`` times
(``retries`` for a LocalCluster; a running cluster keeps its own setting, default 3); ``retries`` is also passed
to ``submit`` for errors of the batch machinery. A pair's own failure or FAIL verdict is not retried (it is
deterministic).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Callable

from ..errors import EXIT_FAILED, InputError
from . import pair, summary

TICK_S = 0.25
#: Seconds to wait for a running scheduler to answer (it may be starting, e.g. a job just submitted).
CONNECT_TIMEOUT_S = 20.0
THREAD_ENV = pair.THREAD_ENV
DASK_MISSING_FIX = "install the extra: pip install 'multimodal-prealign[batch]' (or pip install 'dask[distributed]')"


def run_sequential(jobs: list, out_dir: Path, token: str, on_row: Callable, on_tick: Callable,
                   runner: Callable | None = None, threads: int | None = None) -> None:
    """Every job in this process, in manifest order (the Slicer script's executor; ``--scheduler none``)."""
    for job in jobs:
        on_tick(1)
        on_row(pair.run_pair(job, out_dir, token, runner, threads))


def import_distributed():
    try:
        import distributed
    except ImportError:
        raise InputError("Dask is not installed, and batch runs pairs on Dask", DASK_MISSING_FIX) from None
    return distributed


def local_cluster(workers: int, threads: int, retries: int):
    """(cluster, client): a LocalCluster of ``workers`` processes, 1 task thread each, ``threads`` ITK/OpenMP
    threads each; dead workers' pairs are moved at most ``retries`` times."""
    distributed = import_distributed()
    import dask

    settings = {"distributed.scheduler.allowed-failures": int(retries)}
    settings.update({f"distributed.nanny.pre-spawn-environ.{name}": str(threads) for name in THREAD_ENV})
    # Workers started while SIGINT is ignored inherit that (Ctrl-C is the batch's); the preload covers restarts.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
    try:
        with dask.config.set(settings):
            cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                               dashboard_address=None, silence_logs=logging.ERROR,
                                               env={name: str(threads) for name in THREAD_ENV},
                                               preload=[f"{__package__}.worker_setup"])
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
    try:
        client = distributed.Client(cluster)
    except BaseException:
        cluster.close()
        raise
    return cluster, client


def connect(address: str, timeout_s: float | None = None):
    """A client of the running Dask scheduler at ``address`` (e.g. tcp://head-node:8786); waits at most
    ``timeout_s`` (default :data:`CONNECT_TIMEOUT_S`) for it to answer."""
    distributed = import_distributed()
    try:
        return distributed.Client(address, timeout=f"{timeout_s or CONNECT_TIMEOUT_S}s")
    except (OSError, TimeoutError) as err:
        raise InputError(f"Cannot reach the Dask scheduler at {address} ({type(err).__name__})",
                         "start it (dask scheduler), check the address and port, or use --scheduler local") from None


def worker_threads(client) -> int:
    """Task threads of the cluster's workers now (0 when none is connected)."""
    return sum(int(w.get("nthreads", 1)) for w in client.scheduler_info().get("workers", {}).values())


def run_on_dask(client, jobs: list, out_dir: Path, token: str, on_row: Callable, on_tick: Callable,
                threads: int | None, retries: int) -> None:
    """Submit one task per job and hand over each row as its task ends. On any exception (Ctrl-C) the pending
    tasks are cancelled before it propagates."""
    pending = {}
    for job in jobs:
        future = client.submit(pair.run_pair, job, str(out_dir), token, None, threads, key=f"pair-{job.id}-{token}",
                               retries=int(retries))
        pending[future] = job
    last_count = 0.0
    try:
        while pending:
            finished = [future for future in pending if future.done()]
            for future in finished:
                on_row(_row_of(future, pending.pop(future)))
            if time.monotonic() - last_count >= 1.0:
                last_count = time.monotonic()
                on_tick(_running(client, pending))
            if not finished:
                time.sleep(TICK_S)
    except BaseException:
        client.cancel(list(pending), force=True)
        raise


def _running(client, pending: dict) -> int:
    """Our tasks that workers hold now (at most one per worker thread)."""
    keys = {future.key for future in pending}
    try:
        held = sum(1 for tasks in client.processing().values() for key in tasks if key in keys)
        return min(held, worker_threads(client))
    except (OSError, TimeoutError):
        return 0


def _row_of(future, job) -> dict:
    """A finished task's row; a task that raised (batch machinery, dead workers) becomes an ERROR row."""
    if future.status == "finished":
        return future.result()
    if future.status == "cancelled":
        return summary.error_row(job, EXIT_FAILED, "the Dask scheduler cancelled this pair (scheduler restarted?). "
                                 "Fix: run the batch again with --resume")
    error = future.exception()
    if isinstance(error, ImportError):
        return summary.error_row(job, EXIT_FAILED, f"a worker cannot import what the batch needs ({error}). Fix: "
                                 "install this package (same version) and Dask on every worker (docs/batch.md)")
    if type(error).__name__ == "KilledWorker":
        return summary.error_row(job, EXIT_FAILED, "every worker that ran this pair died (killed, or out of memory; "
                                 "see the workers' logs). Fix: give the workers more memory, or register this pair "
                                 "alone with 'multimodal-prealign register'")
    return summary.error_row(job, EXIT_FAILED, f"batch error {type(error).__name__}: {error}. Fix: check that the "
                             "batch folder is writable from every worker (a shared filesystem)")
