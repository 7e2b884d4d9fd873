"""Cohorts on Dask for real: a ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1 (free ports,
stopped at the end), and the default local cluster.

* a manifest of synthetic pairs through ``--scheduler tcp://...``: both workers work, every pair has its folder;
* a worker killed (SIGKILL, nanny included) in the middle of a pair: the pair runs again on the other worker and
  every pair ends with outputs;
* Ctrl-C in the middle of a run: exit 130, finished pairs kept and summed up, nothing half-written; ``--resume``
  then runs only the rest (counted, and the kept pairs' files are untouched);
* ``--scheduler local``: SIGTERM stops the batch and its worker processes (exit 130); ITK/OpenMP threads pinned.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import distributed  # the test extra installs Dask: these tests run in CI, they are not skipped
import psutil
import pytest
from batch_helpers import FAST_OPTIONS, DaskCluster, make_cohort

from MultimodalPrealignLib import cli
from MultimodalPrealignLib.batch import executors, record

CLI = [sys.executable, "-m", "MultimodalPrealignLib"]
REPO = Path(__file__).resolve().parents[1]
#: Pairs of this seed register with the itk engine at FAST_OPTIONS (PASS/WARN, measured for p01-p06). At seed 0, p04
#: FAILs there and falls back to elastix, whose first use costs a worker ~15 s of loading ITK: not what these tests are
#: about (a fallback inside Dask workers is in test_batch_summary's cohort).
SEED = 80


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("dask-logs")
    started = DaskCluster(workers=2, log_dir=logs)
    yield started
    started.close()


@pytest.fixture()
def client(cluster):
    cluster.ensure_workers(2)
    with distributed.Client(cluster.address, timeout="20s") as connected:
        yield connected


def start_batch(manifest: Path, out: Path, *options: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "MultimodalPrealign"),
                                                                      os.environ.get("PYTHONPATH")) if p)}
    return subprocess.Popen([*CLI, "batch", str(manifest), "--out", str(out), *options], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout_s: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def live_workers(client) -> dict:
    """The scheduler's workers now. ``client.scheduler_info()`` returns its cached identity when a fetch fails, and
    distributed's periodic refresh caches it without workers: right after a worker is killed that read {} once."""
    return client.scheduler_info(n_workers=-1)["workers"]


def finished_pairs(out: Path) -> set:
    if not out.is_dir():
        return set()
    return {p.name for p in out.iterdir() if p.is_dir() and (p / record.RECORD_FILE).is_file()}


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def assert_complete(out: Path, pair_id: str) -> None:
    saved = record.read_record(out / pair_id)
    assert saved["complete"] and saved["outputs"]
    assert all((out / pair_id / name).exists() for name in saved["outputs"])
    assert {"transform.h5", "moving_resampled.nrrd", "report.json"} <= set(saved["outputs"])


def test_a_cohort_on_a_running_cluster(cluster, client, tmp_path):
    manifest = make_cohort(tmp_path / "cohort", 4, seed=SEED)
    out = tmp_path / "out"
    code = cli.main(["batch", str(manifest), "--out", str(out), "--scheduler", cluster.address, "--quiet",
                     "--no-report", *FAST_OPTIONS])
    assert code == 0
    rows = summary(out)["pairs"]
    assert [row["id"] for row in rows] == ["p01", "p02", "p03", "p04"]
    assert {row["verdict"] for row in rows} <= {"PASS", "WARN"}
    workers = set(wait_for(lambda: live_workers(client), what="the live workers"))
    assert {row["worker"] for row in rows} == workers  # both workers took pairs
    for pair_id in ("p01", "p02", "p03", "p04"):
        assert_complete(out, pair_id)
    assert not (out / ".work").exists()
    assert summary(out)["scheduler"] == f"Dask cluster {cluster.address}"


def test_ctrl_c_then_resume_runs_only_the_rest(cluster, client, tmp_path):
    manifest = make_cohort(tmp_path / "cohort", 6, seed=SEED)
    out = tmp_path / "out"
    batch = start_batch(manifest, out, "--scheduler", cluster.address, *FAST_OPTIONS)  # with pictures: ~3 s a pair
    wait_for(lambda: len(finished_pairs(out)) >= 2, what="two finished pairs")
    batch.send_signal(signal.SIGINT)
    _, err = batch.communicate(timeout=60)
    assert batch.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert "nothing was written" not in err  # finished pairs were kept: the batch says so, not register's line
    first = summary(out)
    assert first["interrupted"] is True and first["exit_code"] == 130
    # The pairs still running on the cluster see the stop file and end without writing.
    wait_for(lambda: not any(client.processing().values()), what="idle workers")
    kept = finished_pairs(out)
    assert 2 <= len(kept) < 6 and {row["id"] for row in first["pairs"]} <= kept
    for pair_id in kept:
        assert_complete(out, pair_id)
    assert sorted(p.name for p in out.iterdir() if not p.is_dir()) == ["summary.csv", "summary.html", "summary.json"]
    assert not [p for p in (out / ".work").rglob("*") if p.is_dir()]  # only the stop file may wait there
    written = {pair_id: (out / pair_id / "transform.h5").stat().st_mtime_ns for pair_id in kept}

    code = cli.main(["batch", str(manifest), "--out", str(out), "--scheduler", cluster.address, "--resume", "--quiet",
                     *FAST_OPTIONS])
    assert code == 0
    second = summary(out)
    assert second["pairs_resumed"] == len(kept) and second["interrupted"] is False
    rows = {row["id"]: row for row in second["pairs"]}
    assert {pair_id for pair_id, row in rows.items() if row["resumed"]} == kept
    assert len([row for row in rows.values() if not row["resumed"]]) == 6 - len(kept)  # the rest, once each
    assert {pair_id: (out / pair_id / "transform.h5").stat().st_mtime_ns for pair_id in kept} == written
    tokens = {pair_id: record.read_record(out / pair_id)["run_token"] for pair_id in rows}
    assert {tokens[pair_id] for pair_id in kept} == {first["run_token"]}
    assert {tokens[p] for p in rows if p not in kept} == {second["run_token"]}
    assert not (out / ".work").exists()


def test_a_killed_worker_has_its_pair_run_again_on_the_other(cluster, client, tmp_path):
    # p01 runs the global search (a few seconds): long enough to kill its worker in the middle of it.
    manifest = make_cohort(tmp_path / "cohort", 3, extra_columns={"prealign": {"p01": "search"}})
    out = tmp_path / "out"
    batch = start_batch(manifest, out, "--scheduler", cluster.address, "--no-report", *FAST_OPTIONS)

    def worker_running_p01():
        started = list((out / ".work").glob("*/p01-*")) if (out / ".work").is_dir() else []
        holders = [address for address, keys in client.processing().items()
                   if any(str(key).startswith("pair-p01-") for key in keys)]
        return holders[0] if started and len(holders) == 1 else None

    address = wait_for(worker_running_p01, what="p01 running")
    name = wait_for(lambda: live_workers(client).get(address, {}).get("name"), what="p01's worker's name")
    cluster.kill(next(p for p in cluster.workers if cluster.name_of(p) == name))
    _, err = batch.communicate(timeout=120)
    assert batch.returncode == 0, err
    rows = {row["id"]: row for row in summary(out)["pairs"]}
    assert set(rows) == {"p01", "p02", "p03"} and {row["verdict"] for row in rows.values()} <= {"PASS", "WARN"}
    assert rows["p01"]["worker"] != address
    wait_for(lambda: rows["p01"]["worker"] in live_workers(client), what="p01's new worker among the live ones")
    for pair_id in rows:
        assert_complete(out, pair_id)
    assert not (out / ".work").exists()


def test_local_cluster_pins_threads_and_sigterm_stops_everything(tmp_path):
    manifest = make_cohort(tmp_path / "cohort", 4)
    out = tmp_path / "out"
    batch = start_batch(manifest, out, "--workers", "1", "--threads-per-worker", "2", "--no-report", *FAST_OPTIONS)
    first = wait_for(lambda: finished_pairs(out), timeout_s=90, what="a finished pair")
    children = psutil.Process(batch.pid).children(recursive=True)
    assert children  # the local cluster's worker process
    batch.send_signal(signal.SIGTERM)
    _, err = batch.communicate(timeout=60)
    assert batch.returncode == 130, err
    assert "Traceback" not in err
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert not alive
    result = summary(out)
    assert result["interrupted"] is True and result["scheduler"] == "local Dask cluster (1 worker x 2 threads)"
    threads = record.read_record(out / sorted(first)[0])["threads"]  # what the worker gave the pair
    assert threads["itk_default_threads"] == 2 and {threads[name] for name in executors.THREAD_ENV} == {"2"}
    kept = finished_pairs(out)
    assert {row["id"] for row in result["pairs"]} == kept
    for pair_id in kept:
        assert_complete(out, pair_id)
    assert not (out / ".work").exists()
