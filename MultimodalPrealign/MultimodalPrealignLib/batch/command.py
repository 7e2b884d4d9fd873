"""``multimodal-prealign batch MANIFEST --out DIR [...]``: the command line of :func:`batch.run`.

The registration options (their names, types, defaults) are ``register``'s: ``cli.py`` hands over its
``add_registration_arguments`` and ``options_from_args`` (this package may not import the command line).
Exit codes: 0 every pair PASS or WARN, 4 some pair FAIL or errored (or a bad row skipped), 2 bad manifest or
options, 130 interrupted (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Callable

from ..errors import EXIT_INTERRUPTED
from .manifest import ManifestError


def add_cli(subparsers, add_registration_arguments: Callable, options_from_args: Callable) -> None:
    """Register ``batch`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "batch", help="register every pair of a manifest (CSV), locally or on a Dask cluster",
        description="Register a cohort: one row per pair in MANIFEST (columns id, fixed, moving; optional "
                    "fixed_labels, moving_labels, landmarks, moving_landmarks and any per-pair register option; "
                    "paths relative to the manifest). Each pair writes DIR/<id>/ as register does; DIR/summary.csv, "
                    "summary.json and summary.html sum up the verdicts. The registration options below are the "
                    "defaults of every row. Exit codes: 0 every pair PASS or WARN, 4 some pair FAIL or errored, "
                    "2 bad manifest or options, 130 interrupted. See docs/batch.md.")
    p.add_argument("manifest", metavar="MANIFEST", help="CSV file, one row per pair")
    p.add_argument("--out", required=True, metavar="DIR", help="batch folder (new, empty, or an earlier batch's)")
    p.add_argument("--scheduler", default="local", metavar="local|none|ADDRESS",
                   help="local (default): a Dask cluster of processes on this machine; none: this process, one "
                        "pair after another, no Dask; ADDRESS: a running Dask scheduler, e.g. tcp://head:8786 "
                        "(inputs and DIR on a filesystem every worker sees)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="local cluster: worker processes, each runs one pair at a time (default: cores // T)")
    p.add_argument("--threads-per-worker", type=int, default=1, metavar="T",
                   help="threads each pair may use (ITK, OpenMP, BLAS; default 1)")
    p.add_argument("--resume", action="store_true",
                   help="skip pairs whose outputs exist with the same settings and input checksums")
    p.add_argument("--retries", type=int, default=2, metavar="K",
                   help="run a pair again up to K times when its worker dies (default 2); a FAIL verdict or a "
                        "pair's own error is not retried")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="run the good rows of a manifest with bad rows (the bad ones are listed in the summary)")
    add_registration_arguments(p)
    p.set_defaults(handler=lambda args: run_batch_command(args, options_from_args))


def run_batch_command(args: argparse.Namespace, options_from_args: Callable) -> int:
    from .cohort import run

    options = options_from_args(args)
    try:
        with StopOnSignals():
            result = run(args.manifest, args.out, options, scheduler=args.scheduler, workers=args.workers,
                         threads_per_worker=args.threads_per_worker, resume=args.resume, retries=args.retries,
                         skip_bad_rows=args.skip_bad_rows, quiet=args.quiet)
    except ManifestError as err:
        if not err.bad_rows:
            raise
        for bad in err.bad_rows:  # one line per bad row, then the one-line error naming their lines
            print(f"multimodal-prealign batch: bad row: {bad.one_line()}", file=sys.stderr)
        raise ManifestError(err.headline, err.fix, err.bad_rows) from None
    except KeyboardInterrupt:  # the batch has said what it kept (finished pairs, summary): not "nothing written"
        return EXIT_INTERRUPTED
    return result.exit_code


class StopOnSignals:
    """While a batch runs, the first Ctrl-C (SIGINT) or SIGTERM raises KeyboardInterrupt in the main thread;
    later ones are ignored so that stopping in order (pairs stopped, workers closed, summary written) completes.

    A batch is not stopped by a flag and a short grace period like a single ``register``: closing a cluster
    takes seconds. Outside the main thread nothing is installed."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.previous = {}
        self.fired = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._on_signal) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False

    def _on_signal(self, signum, frame):
        if self.fired:
            print("multimodal-prealign batch: stopping, please wait", file=sys.stderr, flush=True)
            return
        self.fired = True
        raise KeyboardInterrupt
