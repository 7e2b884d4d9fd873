"""A cohort in this process (no Dask): atomic pair folders, one pair's failure never stops the others, exit codes,
``--resume`` by recorded settings and input checksums, Ctrl-C keeps what finished."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import SimpleITK as sitk
from batch_helpers import FAST_OPTIONS, make_cohort

from MultimodalPrealignLib import batch, cli
from MultimodalPrealignLib.batch import record
from MultimodalPrealignLib.errors import RegistrationError
from MultimodalPrealignLib.pipeline import PipelineOptions

FAST = PipelineOptions.create(prealign="moments", stages=("rigid",), iterations=50, no_report=True)


class CountingRunner:
    """The core's runner (``pipeline.register_files``), counting the pairs it registers."""

    def __init__(self):
        self.ran = []

    def __call__(self, job, folder, progress):
        self.ran.append(job.id)
        return batch.register_runner(job, folder, progress)


def summary_rows(out: Path) -> dict:
    return {row["id"]: row for row in json.loads((out / "summary.json").read_text())["pairs"]}


def mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


def test_resume_runs_only_what_is_not_done_with_the_same_settings_and_inputs(tmp_path):
    manifest = make_cohort(tmp_path / "cohort", 3)
    out = tmp_path / "out"
    runner = CountingRunner()
    first = batch.run(manifest, out, FAST, pair_runner=runner, quiet=True)
    assert sorted(runner.ran) == ["p01", "p02", "p03"] and first.exit_code == 0 and first.ran == 3
    written = {pair_id: mtime(out / pair_id / "transform.h5") for pair_id in runner.ran}
    saved = record.read_record(out / "p01")
    assert saved["complete"] and saved["settings"] == record.settings_of(FAST)
    assert set(saved["input_fingerprints"]) == {"fixed", "moving"}
    assert saved["input_fingerprints"]["fixed"]["sha256"] == record.sha256_file(tmp_path / "cohort" / "images" /
                                                                                "p01_ct.nrrd")

    def resume(options=FAST):
        runner = CountingRunner()
        result = batch.run(manifest, out, options, pair_runner=runner, resume=True, quiet=True)
        return runner.ran, result

    ran, result = resume()
    assert ran == [] and result.resumed == 3 and result.exit_code == 0
    assert all(row["resumed"] for row in summary_rows(out).values())
    assert {pair_id: mtime(out / pair_id / "transform.h5") for pair_id in written} == written

    # Same content, new modification time (a copied cohort): hashed again, still done.
    image = tmp_path / "cohort" / "images" / "p01_mr.nrrd"
    os.utime(image, ns=(mtime(image) + 10**9, mtime(image) + 10**9))
    assert resume()[0] == []
    # Other content: that pair only.
    moving = sitk.ReadImage(str(tmp_path / "cohort" / "images" / "p03_mr.nrrd"))
    moving[1, 1, 1] = moving[1, 1, 1] + 5.0
    sitk.WriteImage(moving, str(tmp_path / "cohort" / "images" / "p03_mr.nrrd"), True)
    assert resume()[0] == ["p03"]
    # A row's own option changed: that pair only.
    text = manifest.read_text().replace("id,fixed,moving", "id,fixed,moving,iterations")
    lines = text.splitlines()
    manifest.write_text("\n".join([lines[0], lines[1] + ",", lines[2] + ",40", lines[3] + ","]) + "\n")
    assert resume()[0] == ["p02"]
    # An output missing: that pair only. A new default: the pairs that take it (p02 keeps its own iterations).
    (out / "p01" / "moving_resampled.nrrd").unlink()
    assert resume()[0] == ["p01"]
    assert resume(PipelineOptions.create(prealign="moments", stages=("rigid",), iterations=60,
                                         no_report=True))[0] == ["p01", "p03"]
    assert not (out / ".work").exists()


def test_one_pair_failing_never_stops_the_others_and_leaves_nothing(tmp_path, capsys):
    manifest = make_cohort(tmp_path / "cohort", 4, flipped=("p04",),
                           extra_columns={"prealign": {"p04": "none"}, "no_fallback": {"p04": "yes"}})
    (tmp_path / "cohort" / "images" / "p02_mr.nrrd").write_bytes(b"NRRD0004\nnot an image\n")  # unreadable
    out = tmp_path / "out"
    code = cli.main(["batch", str(manifest), "--out", str(out), "--scheduler", "none", "--no-report", *FAST_OPTIONS])
    assert code == 4
    rows = summary_rows(out)
    assert {rows[i]["verdict"] for i in ("p01", "p03")} <= {"PASS", "WARN"}
    assert rows["p02"]["verdict"] == "ERROR" and rows["p02"]["exit_code"] == 2
    assert "Fix:" in rows["p02"]["error"] and "\n" not in rows["p02"]["error"]
    assert rows["p04"]["verdict"] == "FAIL" and rows["p04"]["exit_code"] == 4  # judged, outputs kept
    assert rows["p04"]["reasons"] and (out / "p04" / "transform.h5").is_file()
    assert not (out / "p02").exists() and not (out / ".work").exists()
    assert sorted(p.name for p in out.iterdir()) == ["p01", "p03", "p04", "summary.csv", "summary.html",
                                                     "summary.json"]
    csv_lines = (out / "summary.csv").read_text().splitlines()
    assert csv_lines[0].split(",")[:4] == ["id", "verdict", "exit_code", "reasons"] and len(csv_lines) == 5
    assert " 1 FAIL, 1 ERROR in " in capsys.readouterr().err.splitlines()[-1]
    counts = json.loads((out / "summary.json").read_text())["counts"]
    assert counts["PASS"] + counts["WARN"] == 2 and counts["FAIL"] == 1 and counts["ERROR"] == 1


def test_a_runner_that_dies_half_way_leaves_no_folder(tmp_path):
    manifest = make_cohort(tmp_path / "cohort", 2)

    def half_way(job, folder, progress):
        if job.id == "p02":
            folder.mkdir(parents=True)
            (folder / "transform.h5").write_text("half")
            raise RegistrationError("the engine lost the overlap", "start closer")
        return batch.register_runner(job, folder, progress)

    result = batch.run(manifest, tmp_path / "out", FAST, pair_runner=half_way, quiet=True)
    assert result.exit_code == 4 and [row["verdict"] for row in result.rows][1] == "ERROR"
    assert result.rows[0]["verdict"] in ("PASS", "WARN")
    assert result.rows[1]["error"] == "the engine lost the overlap. Fix: start closer."
    assert result.rows[1]["exit_code"] == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p01", "summary.csv", "summary.html",
                                                                    "summary.json"]


def test_ctrl_c_keeps_the_finished_pairs_and_writes_their_summary(tmp_path):
    manifest = make_cohort(tmp_path / "cohort", 3)
    out = tmp_path / "out"

    def interrupted_at_p02(job, folder, progress):
        if job.id == "p02":
            folder.mkdir(parents=True)
            (folder / "report.json").write_text("{}")
            raise KeyboardInterrupt
        return batch.register_runner(job, folder, progress)

    with pytest.raises(KeyboardInterrupt):
        batch.run(manifest, out, FAST, pair_runner=interrupted_at_p02, quiet=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["exit_code"] == 130
    assert [row["id"] for row in summary["pairs"]] == ["p01"]
    assert sorted(p.name for p in out.iterdir()) == ["p01", "summary.csv", "summary.html", "summary.json"]
    runner = CountingRunner()
    assert batch.run(manifest, out, FAST, pair_runner=runner, resume=True, quiet=True).exit_code == 0
    assert runner.ran == ["p02", "p03"]


def test_fingerprint_of_a_folder_covers_every_file(tmp_path):
    folder = tmp_path / "series"
    (folder / "sub").mkdir(parents=True)
    (folder / "1.dcm").write_bytes(b"a" * 10)
    (folder / "sub" / "2.dcm").write_bytes(b"b" * 10)
    first = record.fingerprint(folder)
    assert sorted(first["files"]) == ["1.dcm", "sub/2.dcm"]
    (folder / "sub" / "2.dcm").write_bytes(b"c" * 10)  # same size, other content
    assert not record._same_content(record.fingerprint(folder), first)
    (folder / "sub" / "2.dcm").write_bytes(b"b" * 10)
    assert record._same_content(record.fingerprint(folder, first), first)


def test_threads_are_pinned_for_each_pair_and_given_back_after(tmp_path, monkeypatch):
    from MultimodalPrealignLib.batch import pair

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    seen = []

    def runner(job, folder, progress):
        seen.append((sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(), os.environ.get("OMP_NUM_THREADS")))
        return batch.register_runner(job, folder, progress)

    manifest = make_cohort(tmp_path / "cohort", 1)
    batch.run(manifest, tmp_path / "out", FAST, pair_runner=runner, threads_per_worker=3, quiet=True)
    assert seen == [(3, "3")]
    assert record.read_record(tmp_path / "out" / "p01")["threads"]["itk_default_threads"] == 3
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == before and "OMP_NUM_THREADS" not in os.environ
    assert all(name not in os.environ or os.environ[name] != "3" for name in pair.THREAD_ENV)
