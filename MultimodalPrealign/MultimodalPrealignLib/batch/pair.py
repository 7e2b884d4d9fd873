"""One pair of a cohort: run it into a staging folder, record it, move it into ``<batch folder>/<id>/`` at once.

:func:`run_pair` never raises for the pair's own failure (bad input, a failed stage, a FAIL verdict): it returns
the pair's summary row with the verdict or the one-line error and the exit code ``register`` would have
returned. It raises only when the batch machinery itself fails (the batch folder unwritable, the batch stopped):
that is what Dask's ``retries`` re-run.

Atomic: the runner writes into ``<batch folder>/.work/<run token>/<id>-<random>/out``; the batch record is
added; then the folder is renamed to ``<batch folder>/<id>`` (a previous result of that id is replaced). A pair
killed at any point leaves only the staging folder, which the batch removes.

``runner(job, folder, progress) -> report`` does the registration: :func:`register_runner` (the core's
``pipeline.register_files``) by default; the Slicer script passes one that goes through the module's logic.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Callable

from ..errors import EXIT_FAILED, Cancelled, PrealignError
from ..progress import Progress
from . import record, summary

WORK_FOLDER = ".work"
#: Environment variables that cap a worker's threads (ITK, OpenMP, BLAS).
THREAD_ENV = ("OMP_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
              "MULTIMODAL_PREALIGN_THREADS")
#: Exit code of a pair stopped because the batch was interrupted.
EXIT_INTERRUPTED = 130
#: How often (s) a running pair looks for the batch's stop file.
STOP_CHECK_INTERVAL_S = 0.5


class BatchStopped(Exception):
    """The batch was interrupted while this pair ran; its staging folder was removed."""


class StopSignal:
    """The batch's stop file (``.work/<token>.stop``), looked for at most every ``STOP_CHECK_INTERVAL_S`` s.

    A file on the shared filesystem works the same for this process, local workers and a remote cluster.
    """

    def __init__(self, out_dir: Path, token: str):
        self.path = Path(out_dir) / WORK_FOLDER / f"{token}.stop"
        self._checked = 0.0
        self._stopped = False

    def requested(self, now: bool = False) -> bool:
        if self._stopped:
            return True
        moment = time.monotonic()
        if now or moment - self._checked >= STOP_CHECK_INTERVAL_S:
            self._checked = moment
            self._stopped = self.path.exists()
        return self._stopped

    def request(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()


def register_runner(job, folder: Path, progress: Progress) -> dict:
    """The core's runner: ``pipeline.register_files`` into ``folder``; returns report.json's content."""
    from ..pipeline import register_files

    command = ["multimodal-prealign", "batch", f"(manifest line {job.line}, id {job.id})"]
    result = register_files(job.fixed, job.moving, folder, copy.deepcopy(job.options), job.fixed_labels,
                            job.moving_labels, progress, command=command, landmarks_path=job.landmarks,
                            moving_landmarks_path=job.moving_landmarks)
    return result.report


def worker_name() -> str:
    """The Dask worker's address when running on one, else 'host pid N'."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError, AttributeError):
        return f"{socket.gethostname()} pid {os.getpid()}"


@contextlib.contextmanager
def pinned_threads(threads: int | None):
    """Inside the block, at most ``threads`` threads in this process's ITK and in libraries loaded meanwhile
    (OpenMP, BLAS); the previous settings come back after it (a Slicer session or a caller keeps its own).

    The itk engine still registers single-threaded (determinism, docs/architecture.md). None: unchanged."""
    import SimpleITK as sitk

    if not threads:
        yield
        return
    previous_itk = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    previous_env = {name: os.environ.get(name) for name in THREAD_ENV}
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, int(threads)))
    os.environ.update({name: str(max(1, int(threads))) for name in THREAD_ENV})
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous_itk)
        for name, value in previous_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def thread_settings() -> dict:
    """The threads this process gives a pair: ITK's default and the variables of :data:`THREAD_ENV`."""
    import SimpleITK as sitk

    return {"itk_default_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
            **{name: os.environ.get(name) for name in THREAD_ENV}}


def run_pair(job, out_dir, token: str, runner: Callable | None = None, threads: int | None = None) -> dict:
    """Run ``job`` into ``out_dir/<id>`` atomically; returns its summary row (never raises for the pair's failure).

    ``token``: the batch run's token (staging folder and stop file); ``threads``: pin ITK/OpenMP threads.
    """
    with pinned_threads(threads):
        return _run_pair(job, Path(out_dir), token, runner or register_runner)


def _run_pair(job, out_dir: Path, token: str, runner: Callable) -> dict:
    started, started_utc, worker = time.perf_counter(), summary.utc_now(), worker_name()
    cpu_started = time.process_time()
    stop = StopSignal(out_dir, token)
    staging = out_dir / WORK_FOLDER / token / f"{job.id}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    folder = staging / "out"
    settings = record.settings_of(job.options)
    try:
        try:
            fingerprints = record.input_fingerprints(job)
            runner(job, folder, Progress(None, cancel_requested=stop.requested))
        except Cancelled:
            if stop.requested(now=True):
                raise BatchStopped(job.id) from None
            return summary.error_row(job, EXIT_FAILED, "Cancelled", time.perf_counter() - started, worker,
                                     started_utc)
        except PrealignError as err:
            return summary.error_row(job, err.exit_code, err.one_line(), time.perf_counter() - started, worker,
                                     started_utc)
        except Exception as err:  # noqa: BLE001 - the pair's own failure, whatever it is, ends in its row
            text = f"unexpected {type(err).__name__}: {err}. Fix: see this pair's inputs; report it if they are fine"
            return summary.error_row(job, EXIT_FAILED, text, time.perf_counter() - started, worker, started_utc)
        if not (folder / "report.json").is_file():
            return summary.error_row(job, EXIT_FAILED, "the run wrote no report.json", time.perf_counter() - started,
                                     worker, started_utc)
        seconds = time.perf_counter() - started
        outputs = sorted(p.name for p in folder.iterdir())
        pair_record = record.make_record(job, fingerprints, settings, worker, started_utc, summary.utc_now(),
                                         outputs, seconds, token, thread_settings(),
                                         cpu_seconds=time.process_time() - cpu_started)
        (folder / record.RECORD_FILE).write_text(json.dumps(pair_record, indent=2) + "\n", encoding="utf-8")
        if stop.requested(now=True):
            raise BatchStopped(job.id)
        target = out_dir / job.id
        commit(folder, target, staging)
        return summary.row_from_folder(job, target, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def commit(folder: Path, target: Path, staging: Path, attempts: int = 5) -> None:
    """Rename ``folder`` to ``target``; an existing ``target`` is moved into ``staging`` first and deleted after."""
    for attempt in range(attempts):
        if target.exists():
            old = staging / f"previous-{attempt}"
            try:
                os.replace(target, old)
            except FileNotFoundError:
                pass  # another run of this pair moved it away just now
        try:
            os.replace(folder, target)
            return
        except OSError:  # target re-created in between (two runs of one pair finishing together)
            if attempt == attempts - 1:
                raise
