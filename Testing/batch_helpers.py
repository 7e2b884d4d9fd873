"""Small synthetic cohorts for the batch tests and benchmarks/batch_scaling.py, and a throwaway Dask cluster.

* ``make_cohort``: N synthetic CT/MR pairs (``synthetic.phantoms``, coarse voxels so a pair registers quickly)
  written as NRRD under ``folder/images/`` with a manifest ``folder/cohort.csv`` (relative paths).
* ``DaskCluster``: a real ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1 (free ports), each in
  its own process group so a test can kill one worker (nanny included); stopped at the end.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import SimpleITK as sitk

from MultimodalPrealignLib.synthetic import phantoms

#: Coarse grids: a pair takes about 3 s of one core with FAST_OPTIONS (measured 2026-11-30: registration 0.2-0.8 s,
#: the verdict's probes ~2 s, pictures 0.3-0.5 s). At seed 0, p04, p09, p12, p14 and p17 FAIL the itk attempt and fall
#: back to elastix: a process's first elastix run loads ITK's wrapped modules, ~15 s of CPU.
FIXED_SPACING_MM = (10.0, 10.0, 10.0)
MOVING_SPACING_MM = (10.0, 10.0, 11.0)
#: Options that keep a test pair fast (moments pre-alignment, rigid, 50 iterations).
FAST_OPTIONS = ["--prealign", "moments", "--stages", "rigid", "--iterations", "50"]


def make_cohort(folder: Path, n: int, seed: int = 0, extra_columns: dict | None = None,
                fixed_spacing=FIXED_SPACING_MM, moving_spacing=MOVING_SPACING_MM, flipped=()) -> Path:
    """Write ``n`` pairs (ids p01..pNN; seeds ``seed + i``; rotation 4-12 deg, shift 5-20 mm) and return the manifest.

    ``extra_columns``: {column: {id: text}} added to the manifest (per-pair options); ``flipped``: ids whose
    moving image is turned head/feet (with ``prealign none`` and ``no_fallback`` such a pair ends FAIL)."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    extra_columns = extra_columns or {}
    rows = []
    for index in range(n):
        pair_id = f"p{index + 1:02d}"
        flip = pair_id in flipped
        suffix = "_flipped" if flip else ""
        fixed_path, moving_path = images / f"{pair_id}{suffix}_ct.nrrd", images / f"{pair_id}{suffix}_mr.nrrd"
        if not (fixed_path.exists() and moving_path.exists()):
            pair = phantoms.make_pair(seed=seed + index, rotation_deg=4.0 + 8.0 * (index % 3) / 2,
                                      translation_mm=5.0 + 15.0 * (index % 4) / 3, fixed_spacing=fixed_spacing,
                                      moving_spacing=moving_spacing, labels=False, flip=flip)
            sitk.WriteImage(pair.fixed, str(fixed_path), True)
            sitk.WriteImage(pair.moving, str(moving_path), True)
        row = {"id": pair_id, "fixed": f"images/{fixed_path.name}", "moving": f"images/{moving_path.name}"}
        row.update({column: values.get(pair_id, "") for column, values in extra_columns.items()})
        rows.append(row)
    manifest = folder / "cohort.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dask_command(name: str) -> list:
    """``dask <name>`` of this Python's environment."""
    script = Path(sys.executable).with_name("dask")
    return [str(script), name] if script.exists() else [sys.executable, "-m", "distributed.cli.dask_" + name]


class DaskCluster:
    """A scheduler and ``workers`` worker processes (1 thread each) on 127.0.0.1; ``address`` is tcp://..."""

    def __init__(self, workers: int = 2, log_dir: Path | None = None):
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.log_dir = log_dir
        self.scheduler = self._start([*dask_command("scheduler"), "--host", "127.0.0.1", "--port", str(self.port),
                                      "--dashboard-address", ":0", "--no-show"], "scheduler")
        self.workers = []
        self._wait(lambda info: True, what="the scheduler")
        self.add_workers([f"w{index}" for index in range(workers)])

    def _start(self, command: list, name: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab") if self.log_dir else subprocess.DEVNULL
        core = str(Path(__file__).resolve().parents[1] / "MultimodalPrealign")  # importable without pip install -e
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (core, os.environ.get("PYTHONPATH")) if p)}
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def add_workers(self, names: list) -> None:
        """Start a worker (1 thread) per name, all at once, and wait until the scheduler knows them all."""
        for name in names:
            self.workers.append(self._start([*dask_command("worker"), self.address, "--nthreads", "1", "--name",
                                             name, "--host", "127.0.0.1", "--no-dashboard"], name))
        self._wait(lambda info: set(names) <= {w.get("name") for w in info.get("workers", {}).values()},
                   what="workers " + ", ".join(names))

    def name_of(self, process: subprocess.Popen) -> str:
        return process.args[process.args.index("--name") + 1]

    def ensure_workers(self, count: int) -> None:
        """Start workers until ``count`` are running (after a test killed one)."""
        alive = [p for p in self.workers if p.poll() is None]
        self.workers = alive
        missing = count - len(alive)
        if missing > 0:
            self.add_workers([f"w{len(alive) + i}-{time.monotonic_ns()}" for i in range(missing)])

    def info(self) -> dict:
        from distributed import Client

        with Client(self.address, timeout="10s") as client:
            return client.scheduler_info()

    def _wait(self, ready, what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if ready(self.info()):
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{what} did not start within {timeout_s} s")

    def kill(self, process: subprocess.Popen) -> None:
        """SIGKILL a worker and its nanny (its process group)."""
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)

    def close(self) -> None:
        for process in [*self.workers, self.scheduler]:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for process in [*self.workers, self.scheduler]:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)


def dom_after_script(html_path: Path, script: str, chromium: str) -> str:
    """The DOM Chromium dumps after the load event ran ``script`` (JavaScript) on a copy of ``html_path``."""
    from report_helpers import _run_chromium

    probe = html_path.with_name(html_path.stem + ".probe.html")
    text = html_path.read_text(encoding="utf-8")
    probe.write_text(text.replace("</body>", f"<script>window.addEventListener('load', function () {{{script}}});"
                                             "</script></body>"), encoding="utf-8")
    try:
        return _run_chromium(chromium, ["--virtual-time-budget=5000", "--dump-dom", probe.resolve().as_uri()]).stdout
    finally:
        probe.unlink(missing_ok=True)
