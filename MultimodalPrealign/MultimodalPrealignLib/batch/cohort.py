"""A whole cohort: read the manifest, skip finished pairs (``resume``), run the rest, keep the summary current.

:func:`run` is the Python API behind ``multimodal-prealign batch`` and the Slicer script
``docs/examples/register_cohort.py``; see docs/batch.md.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import EXIT_BAD_INPUT, EXIT_FAILED, InputError
from ..pipeline import OUTPUT_FILES, PipelineOptions
from . import executors, pair, record, summary
from .manifest import PairJob, read_manifest

#: What a batch folder may hold besides pair folders.
BATCH_FILES = (*summary.SUMMARY_FILES, pair.WORK_FOLDER)
#: How often (s) summary.html is rewritten while pairs finish (csv and json: after every pair).
HTML_INTERVAL_S = 5.0
SCHEDULERS = ("local", "none")


@dataclass
class BatchResult:
    """What :func:`run` returns: one row per pair (manifest order), verdict counts, the batch's exit code
    (0 all PASS/WARN, 4 some FAIL or error), how many pairs ran now and how many were already done."""

    out_dir: Path
    rows: list
    counts: dict
    exit_code: int
    ran: int
    resumed: int
    skipped_bad_rows: int
    seconds: float
    summary_files: dict = field(default_factory=dict)


class BatchProgress:
    """The terminal's progress line: pairs done / failed / running and the time left.

    On a terminal one line is redrawn in place; otherwise (a log file) a line is printed whenever a pair
    finishes, so the counts only grow. ``callback(done, failed, running, total, eta_s)`` replaces the printing.
    """

    def __init__(self, total: int, already_done: int = 0, already_failed: int = 0, stream=None,
                 callback: Callable | None = None, enabled: bool = True):
        self.total, self.done, self.failed, self.running = total, already_done, already_failed, 0
        self.first_done = already_done
        self.stream = stream or sys.stderr
        self.callback = callback
        self.enabled = enabled
        self.started = time.monotonic()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._drawn = 0.0

    def eta_s(self) -> float | None:
        ran = self.done - self.first_done
        if ran <= 0:
            return None
        return (time.monotonic() - self.started) / ran * (self.total - self.done)

    def finished(self, row: dict) -> None:
        self.done += 1
        self.failed += row.get("verdict") in ("FAIL", summary.ERROR)
        self.running = max(0, self.running - 1)
        self.show(force=True)

    def tick(self, running: int) -> None:
        self.running = running
        self.show()

    def line(self) -> str:
        width = 30
        filled = int(width * self.done / self.total) if self.total else width
        eta = self.eta_s()
        eta_text = "ETA --" if eta is None else f"ETA {_duration(eta)}"
        return (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} done, {self.failed} failed, "
                f"{self.running} running, {eta_text}")

    def show(self, force: bool = False) -> None:
        if self.callback is not None:
            self.callback(self.done, self.failed, self.running, self.total, self.eta_s())
            return
        if not self.enabled:
            return
        if self.tty:
            if force or time.monotonic() - self._drawn >= 0.5:
                self._drawn = time.monotonic()
                print("\r" + self.line() + "\033[K", end="", file=self.stream, flush=True)
        elif force:
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty and self.callback is None:
            print(file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def check_batch_dir(out_dir: Path) -> None:
    """Refuse a batch folder that holds anything but summary files, its work folder and pair folders
    (a folder with a batch record or only ``register``'s outputs)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"The output path '{out_dir}' exists and is a file", "give a folder path to --out")
    if not out_dir.is_dir():
        return
    other = []
    for item in sorted(out_dir.iterdir()):
        if item.name in BATCH_FILES or item.name.startswith(".summary."):
            continue
        ours = item.is_dir() and all(p.name in (*OUTPUT_FILES, record.RECORD_FILE) for p in item.iterdir())
        if not ours:
            other.append(item.name)
    if other:
        shown = ", ".join(other[:3]) + (" ..." if len(other) > 3 else "")
        raise InputError(f"The output folder '{out_dir}' holds files that are not a batch's ({shown})",
                         "give a new or empty folder to --out, or the folder of an earlier batch run")


def _clean_work(out_dir: Path, keep: str | None = None) -> None:
    """Remove the staging folders and stop files of earlier (or, with ``keep`` None, all) runs."""
    work = out_dir / pair.WORK_FOLDER
    if not work.is_dir():
        return
    for item in work.iterdir():
        if keep is not None and item.name in (keep, f"{keep}.stop"):
            continue
        if item.is_dir():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
    try:
        work.rmdir()
    except OSError:
        pass  # not empty: this run's folder, or a stop file kept for a remote cluster's running tasks


def run(manifest, out_dir, options: PipelineOptions | None = None, client=None, *, scheduler: str = "local",
        workers: int | None = None, threads_per_worker: int = 1, resume: bool = False, retries: int = 2,
        skip_bad_rows: bool = False, pair_runner: Callable | None = None, progress: Callable | None = None,
        quiet: bool = False) -> BatchResult:
    """Register every pair of the ``manifest`` (a CSV path) into ``out_dir/<id>/`` and write
    ``out_dir/summary.{csv,json,html}``.

    ``options``: the defaults (``PipelineOptions``), overridden per row by the manifest's option columns.
    Where pairs run: ``client`` (a ``distributed.Client``) when given; else ``scheduler`` 'local' (a
    LocalCluster of ``workers`` processes, default cores // ``threads_per_worker``), 'none' (this process,
    one pair after another, no Dask) or a scheduler address such as ``tcp://host:8786``. ``pair_runner``
    (``runner(job, folder, progress) -> report dict``, see :mod:`batch.pair`) runs in this process, one pair
    after another. ``resume``: skip pairs already finished with the same settings and inputs.
    ``progress(done, failed, running, total, eta_s)`` replaces the terminal progress line (``quiet``: none).
    Raises InputError (exit code 2) for a bad manifest, options or folder, before any pair runs; on Ctrl-C
    (KeyboardInterrupt) the running pairs are stopped, the summary of the finished ones is written, and the
    KeyboardInterrupt propagates.
    """
    started = time.monotonic()
    options = (options or PipelineOptions()).validate()
    out_dir = Path(out_dir).expanduser().absolute()
    scheduler = str(scheduler)
    remote = client is None and pair_runner is None and scheduler not in SCHEDULERS
    if remote and "://" not in scheduler and ":" not in scheduler:
        raise InputError(f"Unknown scheduler '{scheduler}'",
                         "use --scheduler local, --scheduler none or a Dask scheduler address (tcp://HOST:8786)")
    if threads_per_worker < 1:
        raise InputError(f"Threads per worker must be >= 1, got {threads_per_worker}",
                         "use e.g. --threads-per-worker 1")
    if workers is not None and workers < 1:
        raise InputError(f"Workers must be >= 1, got {workers}", "use e.g. --workers 2")
    if workers is not None and (remote or client is not None):
        raise InputError("--workers sets the size of a local cluster only",
                         "drop --workers: a running cluster has the workers started with 'dask worker'")
    if retries < 0:
        raise InputError(f"Retries must be >= 0, got {retries}", "use e.g. --retries 2")
    check_batch_dir(out_dir)
    cohort = read_manifest(manifest, options, skip_bad_rows)
    rows = {}
    for bad in cohort.bad_rows:
        job = PairJob(id=bad.id or f"line-{bad.line}", line=bad.line, fixed="", moving="", options=options)
        rows[job.id] = summary.error_row(job, EXIT_BAD_INPUT, "bad manifest row, not run: " + "; ".join(bad.problems))
    todo = []
    for job in cohort.jobs:
        if resume and record.done_reason(job, out_dir / job.id) is None:
            try:
                rows[job.id] = summary.row_from_folder(job, out_dir / job.id, out_dir, resumed=True)
                continue
            except (OSError, ValueError):  # report.json unreadable: run the pair again
                pass
        todo.append(job)
    total = len(cohort.jobs) + len(cohort.bad_rows)
    resumed = len(rows) - len(cohort.bad_rows)
    sequential = pair_runner is not None or scheduler == "none"
    own_client = cluster = None
    if todo and not sequential and client is None:  # bad input (exit 2) before anything is written
        executors.import_distributed()
        if remote:
            own_client = executors.connect(scheduler)

    token = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    where = _describe(client, scheduler, pair_runner, workers, threads_per_worker)
    meta = {"manifest": str(Path(manifest).expanduser().absolute()), "out_dir": str(out_dir),
            "scheduler": where, "pairs_total": total, "pairs_resumed": resumed,
            "pairs_bad_rows": len(cohort.bad_rows), "run_token": token}
    thumbnails = {}
    bar = BatchProgress(total, len(rows), sum(r["verdict"] in ("FAIL", summary.ERROR) for r in rows.values()),
                        callback=progress, enabled=not quiet)
    last_html = [0.0]

    def write(final: bool = False, **state) -> None:
        for row in rows.values():
            if row["id"] not in thumbnails and row.get("folder"):
                thumbnails[row["id"]] = summary.thumbnail(out_dir / row["folder"])
        page = final or time.monotonic() - last_html[0] >= HTML_INTERVAL_S
        if page:
            last_html[0] = time.monotonic()
        summary.write_summary(out_dir, list(rows.values()), {**meta, "pairs_finished": len(rows), **state},
                              thumbnails, html_page=page)

    def on_row(row: dict) -> None:
        if row.get("folder") and not (out_dir / row["folder"] / record.RECORD_FILE).is_file():
            job = next(j for j in todo if j.id == row["id"])
            row = summary.error_row(job, EXIT_FAILED, f"the worker ({row.get('worker')}) wrote this pair where this "
                                    f"machine does not see it. Fix: put {out_dir} on a filesystem every worker "
                                    "shares, at the same path", row.get("seconds"), row.get("worker"))
        rows[row["id"]] = row
        bar.finished(row)
        write(running=True)

    stop = pair.StopSignal(out_dir, token)
    interrupted = False
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _clean_work(out_dir)
        if not quiet and progress is None:
            print(f"batch: {total} pairs ({resumed} already done, {len(cohort.bad_rows)} bad rows skipped, "
                  f"{len(todo)} to run) on {where}; outputs in {out_dir}", file=sys.stderr, flush=True)
        write(final=True, running=True)
        bar.show(force=True)
        if sequential:
            executors.run_sequential(todo, out_dir, token, on_row, bar.tick, pair_runner, threads_per_worker)
        elif todo:
            if client is None and own_client is None:
                cluster, own_client = executors.local_cluster(
                    min(workers or default_workers(threads_per_worker), len(todo)), threads_per_worker, retries)
            executors.run_on_dask(client or own_client, todo, out_dir, token, on_row, bar.tick, threads_per_worker,
                                  retries)
    except KeyboardInterrupt:
        interrupted = True
        stop.request()  # first: running pairs then discard their work instead of moving it into place
        raise
    finally:
        if own_client is not None:
            own_client.close()
        if cluster is not None:
            cluster.close()
        bar.close()
        if out_dir.is_dir():
            if interrupted:  # pairs this run finished whose rows had not come back yet
                for job in todo:
                    if job.id not in rows and _finished_by(out_dir / job.id, token):
                        rows[job.id] = summary.row_from_folder(job, out_dir / job.id, out_dir)
                if not quiet and progress is None:
                    print(f"batch: interrupted; {len(rows) - len(cohort.bad_rows)} finished pairs kept, summary "
                          f"in {out_dir / 'summary.html'}; run again with --resume to do the rest", file=sys.stderr,
                          flush=True)
            # a running cluster may still run stopped pairs for a moment: keep their stop file, they see it and end
            _clean_work(out_dir, keep=token if interrupted and not sequential and cluster is None else None)
            if interrupted:
                shutil.rmtree(out_dir / pair.WORK_FOLDER / token, ignore_errors=True)
            write(final=True, interrupted=interrupted, running=False,
                  exit_code=pair.EXIT_INTERRUPTED if interrupted else summary.batch_exit_code(list(rows.values()),
                                                                                             total))
    ordered = sorted(rows.values(), key=lambda r: (r.get("manifest_line") or 0, r["id"]))
    result = BatchResult(out_dir, ordered, summary.counts(ordered), summary.batch_exit_code(ordered, total),
                         ran=len(rows) - resumed - len(cohort.bad_rows), resumed=resumed,
                         skipped_bad_rows=len(cohort.bad_rows), seconds=round(time.monotonic() - started, 2),
                         summary_files={name: out_dir / name for name in summary.SUMMARY_FILES})
    if not quiet and progress is None:
        tally = ", ".join(f"{count} {verdict}" for verdict, count in result.counts.items() if count)
        print(f"batch: {tally} in {_duration(result.seconds)}; summary: {out_dir / 'summary.html'}",
              file=sys.stderr, flush=True)
    return result


def _describe(client, scheduler: str, pair_runner, workers, threads: int) -> str:
    if pair_runner is not None or scheduler == "none":
        return "this process (one pair after another)"
    if client is not None:
        return f"Dask cluster {getattr(client, 'scheduler', None) and client.scheduler.address}"
    if scheduler == "local":
        n = workers or default_workers(threads)
        return f"local Dask cluster ({n} worker{'s' if n != 1 else ''} x {threads} thread{'s' if threads != 1 else ''})"
    return f"Dask cluster {scheduler}"


def default_workers(threads_per_worker: int) -> int:
    """Cores of this machine (those this process may use) // threads per worker, at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, threads_per_worker))


def _finished_by(pair_dir: Path, token: str) -> bool:
    found = record.read_record(pair_dir)
    return bool(found and found.get("complete") and found.get("run_token") == token)
