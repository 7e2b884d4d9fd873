"""The cohort manifest: paths relative to it, per-row options read like register's, every bad row refused at once.

No registration runs here (except one tiny --skip-bad-rows run); the Dask runs are in test_batch_dask.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from MultimodalPrealignLib import cli
from MultimodalPrealignLib.batch import ROW_OPTIONS, ManifestError, read_manifest
from MultimodalPrealignLib.pipeline import PipelineOptions


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture()
def cohort(tmp_path) -> Path:
    """A folder with a manifest's inputs (empty files: the manifest checks existence only)."""
    for name in ("a_ct.nrrd", "a_mr.nrrd", "b_ct.nrrd", "b_mr.nrrd", "lm.csv"):
        write(tmp_path / "data" / "images" / name, "x")
    (tmp_path / "data" / "dicom_ct").mkdir()
    write(tmp_path / "data" / "dicom_ct" / "1.dcm", "x")
    return tmp_path / "data"


def test_paths_are_relative_to_the_manifest_and_option_columns_override_the_defaults(cohort, tmp_path):
    manifest = write(cohort / "cohort.csv",
                     "# a comment line\n"
                     "id,fixed,moving,landmarks,Sampling-Percentage,--iterations,stages,no_fallback,crop_margin\n"
                     "a,images/a_ct.nrrd,images/a_mr.nrrd,images/lm.csv,0.05,300,\"rigid,affine,bspline\",yes,\n"
                     "\n"
                     f"b,dicom_ct,{cohort / 'images' / 'b_mr.nrrd'},,,,rigid,,5\n")
    defaults = PipelineOptions.create(prealign="moments", iterations=100)
    before = defaults.to_dict()
    jobs = read_manifest(manifest, defaults).jobs
    assert defaults.to_dict() == before  # the defaults are not modified
    a, b = jobs
    assert (a.id, a.line, b.line) == ("a", 3, 5)
    assert a.fixed == str(cohort / "images" / "a_ct.nrrd") and a.landmarks == str(cohort / "images" / "lm.csv")
    assert b.fixed == str(cohort / "dicom_ct")  # a DICOM folder
    assert a.options.registration.sampling_percentage == 0.05 and a.options.registration.iterations == 300
    assert a.options.registration.stages == ("rigid", "affine", "bspline") and a.options.fallback is False
    assert a.options.prealign == "moments" and a.options.crop_margin_mm == 20.0  # defaults kept
    assert b.options.registration.iterations == 100 and b.options.registration.stages == ("rigid",)
    assert b.options.crop_margin_mm == 5.0 and b.options.fallback is True
    assert a.overrides == {"stages": "rigid,affine,bspline", "sampling_percentage": "0.05", "iterations": "300",
                           "no_fallback": "yes"}


def test_semicolon_separated_manifest_from_a_spreadsheet(cohort):
    manifest = write(cohort / "cohort.csv", "\ufeffid;fixed;moving;prealign\na;images/a_ct.nrrd;images/a_mr.nrrd;"
                     "header\n")
    (job,) = read_manifest(manifest).jobs
    assert job.options.prealign == "header"


def test_every_bad_row_is_named_at_once(cohort):
    manifest = write(cohort / "cohort.csv", "\n".join([
        "id,fixed,moving,prealign,sampling_percentage,iterations",
        "a,images/a_ct.nrrd,images/a_mr.nrrd,,,",            # 2: good
        "b,images/b_ct.nrrd,images/missing_mr.nrrd,,,",      # 3: missing file
        "a,images/b_ct.nrrd,images/b_mr.nrrd,,,",            # 4: duplicate id
        "../evil,images/b_ct.nrrd,images/b_mr.nrrd,,,",      # 5: id is not a folder name
        "c,images/b_ct.nrrd,images/b_mr.nrrd,sideways,,",    # 6: unknown pre-alignment
        "d,images/b_ct.nrrd,images/b_mr.nrrd,,2.5,many",     # 7: out of range + not a number
        ",images/b_ct.nrrd,,,,",                             # 8: no id, no moving
    ]) + "\n")
    with pytest.raises(ManifestError) as caught:
        read_manifest(manifest)
    err = caught.value
    assert [bad.line for bad in err.bad_rows] == [3, 4, 5, 6, 7, 8]
    text = {bad.line: bad.one_line() for bad in err.bad_rows}
    assert "missing_mr.nrrd' does not exist" in text[3]
    assert "duplicate id (also on line 2)" in text[4]
    assert "cannot be a folder name" in text[5]
    assert "prealign: 'sideways' is not one of" in text[6]
    assert "iterations: 'many' is not a whole number" in text[7]
    assert "empty id" in text[8] and "no moving image given" in text[8]
    assert err.exit_code == 2 and "Fix:" in err.one_line() and "\n" not in err.one_line()
    assert "lines 3, 4, 5, 6, 7, 8" in err.headline
    # The sampling percentage of row 7 is checked by the pipeline's own option check, once "many" is fixed.
    write(manifest, "id,fixed,moving,sampling_percentage\nd,images/b_ct.nrrd,images/b_mr.nrrd,2.5\n")
    with pytest.raises(ManifestError, match=r"Sampling percentage must be in \(0, 1\], got 2.5"):
        read_manifest(manifest)
    # With skip_bad_rows the good rows come back and the bad ones are listed.
    write(manifest, "id,fixed,moving\na,images/a_ct.nrrd,images/a_mr.nrrd\nb,images/x.nrrd,images/b_mr.nrrd\n")
    result = read_manifest(manifest, skip_bad_rows=True)
    assert [job.id for job in result.jobs] == ["a"] and [bad.line for bad in result.bad_rows] == [3]


def test_header_problems_name_every_column(cohort):
    manifest = write(cohort / "cohort.csv", "id,fixed,movng,sampling,out,quiet\na,images/a_ct.nrrd,,,,\n")
    with pytest.raises(ManifestError) as caught:
        read_manifest(manifest)
    text = caught.value.one_line()
    assert "missing column moving" in text
    assert "unknown columns 'movng', 'sampling'" in text
    assert "column 'out' is not a per-pair option" in text and "column 'quiet' is not a per-pair option" in text


@pytest.mark.parametrize("text, expected", [
    (None, "does not exist"),
    ("", "is empty"),
    ("# only a comment\n\n", "is empty"),
    ("id,fixed,moving\n", "has a header but no pairs"),
])
def test_unusable_manifests(tmp_path, text, expected):
    path = tmp_path / "cohort.csv"
    if text is not None:
        write(path, text)
    with pytest.raises(ManifestError, match=expected):
        read_manifest(path)


def test_row_options_read_every_register_option_like_the_command_line(cohort):
    """ROW_OPTIONS covers each option of cli.add_registration_arguments and gives the options register would."""
    parser = argparse.ArgumentParser()
    cli.add_registration_arguments(parser)
    destinations = {a.dest for a in parser._actions if a.dest != "help"}
    per_pair_only = {"fixed_labels_task", "moving_labels_task"}  # register's own options, not the shared ones
    assert destinations - {"quiet"} == set(ROW_OPTIONS) - per_pair_only
    samples = {"prealign": "search", "engine": "elastix", "brainsfit": "/opt/BRAINSFit",
               "stages": "rigid,affine,bspline", "sampling_percentage": "0.01", "iterations": "77", "seed": "5",
               "crop_margin": "12.5",
               "spacing_scale": "1.5", "no_isotropic": "true", "max_working_voxels": "250000",
               "anatomy_transform": "similarity", "anatomy_refine": "1", "no_fallback": "yes", "no_report": "on",
               "per_structure": "femur,tibia", "structure_stages": "rigid,affine", "structures_from_threshold": "300"}
    assert set(samples) == destinations - {"quiet"}
    defaults = ["--prealign", "moments", "--iterations", "10"]
    for name, value in samples.items():
        # --structures-from-threshold makes the structures of --per-structure: test it with that option set
        base = [*defaults, "--per-structure", "all"] if name == "structures_from_threshold" else defaults
        flag = "--" + name.replace("_", "-")
        argv = [*base, flag] if parser._option_string_actions[flag].nargs == 0 else [*base, flag, value]
        expected = cli.options_from_args(parser.parse_args(argv)).to_dict()
        manifest = write(cohort / "one.csv", f"id,fixed,moving,{name}\na,images/a_ct.nrrd,images/a_mr.nrrd,"
                                             f"\"{value}\"\n")
        (job,) = read_manifest(manifest, cli.options_from_args(parser.parse_args(base))).jobs
        assert job.options.to_dict() == expected, name


def test_batch_command_refuses_a_bad_manifest_before_any_work(cohort, tmp_path, capsys):
    manifest = write(cohort / "cohort.csv", "id,fixed,moving\na,images/a_ct.nrrd,images/nope.nrrd\n"
                                            "a,images/b_ct.nrrd,images/b_mr.nrrd\n")
    out = tmp_path / "out"
    assert cli.main(["batch", str(manifest), "--out", str(out), "--scheduler", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("multimodal-prealign batch: bad row: line 2 (id a): moving 'images/nope.nrrd'")
    assert err[1] == "multimodal-prealign batch: bad row: line 3 (id a): duplicate id (also on line 2)"
    assert err[2].startswith("multimodal-prealign batch: error: 2 of 2 rows of the manifest") and "Fix:" in err[2]
    assert len(err) == 3 and not out.exists()  # nothing was written


@pytest.mark.parametrize("argv, expected", [
    (["--workers", "0"], "Workers must be >= 1"),
    (["--scheduler", "sideways"], "Unknown scheduler 'sideways'"),
    (["--scheduler", "tcp://127.0.0.1:9", "--workers", "2"], "--workers sets the size of a local cluster only"),
    (["--threads-per-worker", "0"], "Threads per worker must be >= 1"),
    (["--retries", "-1"], "Retries must be >= 0"),
    (["--sampling-percentage", "3"], "Sampling percentage must be in (0, 1]"),
])
def test_bad_batch_options_are_one_line_errors(cohort, tmp_path, capsys, argv, expected):
    manifest = write(cohort / "cohort.csv", "id,fixed,moving\na,images/a_ct.nrrd,images/a_mr.nrrd\n")
    assert cli.main(["batch", str(manifest), "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "Fix:" in err[0]


def test_a_folder_with_other_files_is_refused(cohort, tmp_path, capsys):
    manifest = write(cohort / "cohort.csv", "id,fixed,moving\na,images/a_ct.nrrd,images/a_mr.nrrd\n")
    out = tmp_path / "out"
    write(out / "notes.txt", "mine")
    assert cli.main(["batch", str(manifest), "--out", str(out), "--scheduler", "none"]) == 2
    assert "holds files that are not a batch's (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_skip_bad_rows_runs_the_good_ones_and_lists_the_bad_ones(tmp_path):
    from batch_helpers import FAST_OPTIONS, make_cohort

    manifest = make_cohort(tmp_path / "cohort", 1)
    with open(manifest, "a", encoding="utf-8") as f:
        f.write("p02,images/none_ct.nrrd,images/p01_mr.nrrd\n")
    out = tmp_path / "out"
    code = cli.main(["batch", str(manifest), "--out", str(out), "--scheduler", "none", "--skip-bad-rows", "--quiet",
                     "--no-report", *FAST_OPTIONS])
    assert code == 4  # a row did not end PASS/WARN
    summary = json.loads((out / "summary.json").read_text())
    rows = {row["id"]: row for row in summary["pairs"]}
    assert rows["p01"]["verdict"] in ("PASS", "WARN") and (out / "p01" / "transform.h5").is_file()
    assert rows["p02"]["verdict"] == "ERROR" and rows["p02"]["exit_code"] == 2
    assert "bad manifest row, not run" in rows["p02"]["error"] and not (out / "p02").exists()
    assert summary["pairs_bad_rows"] == 1 and summary["exit_code"] == 4


def test_without_dask_the_batch_says_how_to_install_it_before_writing_anything(cohort, tmp_path, capsys,
                                                                                monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "distributed", None)  # as if the batch extra were not installed
    manifest = write(cohort / "cohort.csv", "id,fixed,moving\na,images/a_ct.nrrd,images/a_mr.nrrd\n")
    out = tmp_path / "out"
    for scheduler in ("local", "tcp://127.0.0.1:9"):
        assert cli.main(["batch", str(manifest), "--out", str(out), "--scheduler", scheduler]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Dask is not installed" in err[0] and "multimodal-prealign[batch]" in err[0]
    assert not out.exists()


def test_an_unreachable_scheduler_is_bad_input_before_anything_is_written(cohort, tmp_path, capsys, monkeypatch):
    from batch_helpers import free_port

    from MultimodalPrealignLib.batch import executors

    monkeypatch.setattr(executors, "CONNECT_TIMEOUT_S", 1.0)
    manifest = write(cohort / "cohort.csv", "id,fixed,moving\na,images/a_ct.nrrd,images/a_mr.nrrd\n")
    out = tmp_path / "out"
    code = cli.main(["batch", str(manifest), "--out", str(out), "--scheduler", f"tcp://127.0.0.1:{free_port()}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Cannot reach the Dask scheduler" in err[0] and "Fix:" in err[0]
    assert not out.exists()


def test_a_row_asking_for_a_brainsfit_that_does_not_exist_is_a_bad_row(cohort, tmp_path):
    manifest = write(cohort / "cohort.csv", "id,fixed,moving,engine,brainsfit\n"
                                            "a,images/a_ct.nrrd,images/a_mr.nrrd,brainsfit,/nowhere/BRAINSFit\n"
                                            "b,images/b_ct.nrrd,images/b_mr.nrrd,itk,/nowhere/BRAINSFit\n")
    with pytest.raises(ManifestError) as caught:
        read_manifest(manifest)
    (bad,) = caught.value.bad_rows
    assert bad.line == 2 and "no BRAINSFit executable there" in bad.one_line()
