"""Bad input: one clear line naming the cause and the fix, exit code 2, no outputs left behind."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from MultimodalPrealignLib import cli


def _blob(size=(24, 24, 24), spacing=(4.0, 4.0, 4.0), origin=(0.0, 0.0, 0.0), seed=0):
    z, y, x = np.mgrid[: size[2], : size[1], : size[0]].astype(np.float32)
    c = np.array(size[::-1]) / 2
    array = 100.0 * (((z - c[0]) / 6) ** 2 + ((y - c[1]) / 8) ** 2 + ((x - c[2]) / 5) ** 2 < 1)
    array += np.random.default_rng(seed).normal(0, 2, array.shape).astype(np.float32)
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


@pytest.fixture
def good_pair(tmp_path):
    fixed, moving = tmp_path / "fixed.nrrd", tmp_path / "moving.nrrd"
    sitk.WriteImage(_blob(), str(fixed))
    sitk.WriteImage(_blob(seed=1, origin=(3.0, -2.0, 1.0)), str(moving))
    return fixed, moving


def _run(capsys, *args):
    code = cli.main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_one_line_error(code, err, *needles):
    assert code == 2, f"exit code {code}, stderr: {err}"
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "error:" in lines[0] and "Fix:" in lines[0], err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"'{needle}' not in: {lines[0]}"


def _register(fixed, moving, out, *extra):
    return ["register", "--fixed", str(fixed), "--moving", str(moving), "--out", str(out), "--quiet", *extra]


def test_missing_file(capsys, good_pair, tmp_path):
    out = tmp_path / "out"
    code, err = _run(capsys, *_register(tmp_path / "nope.nrrd", good_pair[1], out))
    _assert_one_line_error(code, err, "does not exist", "nope.nrrd")
    assert not out.exists()


def test_unreadable_file(capsys, good_pair, tmp_path):
    garbage = tmp_path / "garbage.nrrd"
    garbage.write_bytes(b"this is not an image\n" * 10)
    code, err = _run(capsys, *_register(good_pair[0], garbage, tmp_path / "out"))
    _assert_one_line_error(code, err, "cannot read", "garbage.nrrd")
    assert not (tmp_path / "out").exists()


def test_2d_image(capsys, good_pair, tmp_path):
    flat = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((20, 20)).astype(np.float32)), str(flat))
    code, err = _run(capsys, *_register(flat, good_pair[1], tmp_path / "out"))
    _assert_one_line_error(code, err, "2D")
    assert not (tmp_path / "out").exists()


def test_4d_image(capsys, good_pair, tmp_path):
    series = tmp_path / "series.nii.gz"
    image = sitk.JoinSeries([_blob(), _blob(seed=2)])
    sitk.WriteImage(image, str(series))
    code, err = _run(capsys, *_register(good_pair[0], series, tmp_path / "out"))
    _assert_one_line_error(code, err, "4D", "time point")
    assert not (tmp_path / "out").exists()


def test_empty_image(capsys, good_pair, tmp_path):
    empty = tmp_path / "empty.nrrd"
    sitk.WriteImage(sitk.Image([16, 16, 16], sitk.sitkInt16), str(empty))
    code, err = _run(capsys, *_register(good_pair[0], empty, tmp_path / "out"))
    _assert_one_line_error(code, err, "empty", "moving image")
    assert not (tmp_path / "out").exists()


def test_nan_voxels(capsys, good_pair, tmp_path):
    image = _blob()
    array = sitk.GetArrayFromImage(image)
    array[3, 4, 5] = np.nan
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(image)
    path = tmp_path / "nan.nrrd"
    sitk.WriteImage(bad, str(path))
    code, err = _run(capsys, *_register(path, good_pair[1], tmp_path / "out"))
    _assert_one_line_error(code, err, "NaN", "fixed image")
    assert not (tmp_path / "out").exists()


def test_zero_overlap_even_after_prealignment(capsys, good_pair, tmp_path):
    far = tmp_path / "far.nrrd"
    sitk.WriteImage(_blob(origin=(5000.0, 0.0, 0.0)), str(far))
    code, err = _run(capsys, *_register(good_pair[0], far, tmp_path / "out", "--prealign", "header"))
    _assert_one_line_error(code, err, "do not overlap", "header")
    assert not (tmp_path / "out").exists()


def test_label_map_on_another_grid(capsys, good_pair, tmp_path):
    labels = tmp_path / "labels.nrrd"
    sitk.WriteImage(sitk.Image([10, 10, 10], sitk.sitkUInt8) + 1, str(labels))
    code, err = _run(capsys, *_register(good_pair[0], good_pair[1], tmp_path / "out", "--fixed-labels", str(labels)))
    _assert_one_line_error(code, err, "grid", "does not match")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value, needle", [
    ("--engine", "ants", "invalid choice"),
    ("--prealign", "magic", "invalid choice"),
    ("--stages", "rigid,warp", "unknown stage"),
    ("--stages", "affine,rigid", "order"),
    ("--sampling-percentage", "0", "sampling percentage"),
    ("--sampling-percentage", "abc", "invalid float"),
    ("--iterations", "0", "iterations"),
    ("--crop-margin", "-5", "margin"),
])
def test_unknown_or_invalid_option_values(capsys, good_pair, tmp_path, option, value, needle):
    code, err = _run(capsys, *_register(good_pair[0], good_pair[1], tmp_path / "out", option, value))
    _assert_one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_output_folder_with_other_content(capsys, good_pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = _run(capsys, *_register(good_pair[0], good_pair[1], out))
    _assert_one_line_error(code, err, "already holds other files", "notes.txt")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_failure_mid_run_leaves_no_partial_outputs(capsys, good_pair, tmp_path, monkeypatch):
    from MultimodalPrealignLib.errors import InputError
    from MultimodalPrealignLib.io import image_io

    def broken_write(*args, **kwargs):
        raise InputError("Disk full while writing", "free some space")

    monkeypatch.setattr(image_io, "write_image", broken_write)
    out = tmp_path / "out"
    # The blob pair FAILs its verdict (a symmetric blob turned fits as well): without --no-fallback the run would
    # first retry with the elastix engine (~15 s of loading ITK) before it reaches the same failing write.
    code, err = _run(capsys, *_register(good_pair[0], good_pair[1], out, "--stages", "rigid", "--prealign", "geometry",
                                        "--no-fallback"))
    assert code == 2 and "Disk full" in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_installed_command_exit_code(good_pair, tmp_path):
    env = dict(os.environ)
    command = [sys.executable, "-m", "MultimodalPrealignLib", *_register(tmp_path / "missing.nrrd", good_pair[1],
                                                                         tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "does not exist" in done.stderr


@pytest.mark.parametrize("extra, needle", [
    (["--report-only"], "needs the transform"),
    (["--transform", "t.h5"], "only used with --report-only"),
    (["--moving-landmarks", "m.fcsv"], "needs --landmarks"),
    (["--report-only", "--transform", "missing.h5"], "does not exist"),
])
def test_report_and_landmark_option_mistakes(capsys, good_pair, tmp_path, extra, needle):
    code, err = _run(capsys, *_register(good_pair[0], good_pair[1], tmp_path / "out", *extra))
    _assert_one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_landmark_csv_without_coordinate_system(capsys, good_pair, tmp_path):
    csv = tmp_path / "points.csv"
    csv.write_text("label,fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z\np1,0,0,0,1,1,1\n")
    code, err = _run(capsys, *_register(good_pair[0], good_pair[1], tmp_path / "out", "--landmarks", str(csv)))
    _assert_one_line_error(code, err, "points.csv")
    assert not (tmp_path / "out").exists()


def _labels_like(image: sitk.Image, value: int) -> sitk.Image:
    array = (sitk.GetArrayFromImage(image) > 50).astype(np.uint8) * value
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(image)
    return labels


def test_empty_label_map_names_the_cause_not_the_task_option(capsys, good_pair, tmp_path):
    """Before: 'Cannot tell the TotalSegmentator task of the fixed label map (the label map is empty). Fix: pass
    --fixed-labels-task' (no task makes an empty label map usable)."""
    empty, labels = tmp_path / "empty_labels.nrrd", tmp_path / "labels.nrrd"
    sitk.WriteImage(_labels_like(_blob(), 0), str(empty))
    sitk.WriteImage(_labels_like(_blob(seed=1, origin=(3.0, -2.0, 1.0)), 5), str(labels))
    code, err = _run(capsys, *_register(good_pair[0], good_pair[1], tmp_path / "out", "--fixed-labels", str(empty),
                                        "--moving-labels", str(labels)))
    _assert_one_line_error(code, err, "fixed label map", "empty")
    assert "labels-task" not in err
    assert not (tmp_path / "out").exists()


def test_a_lone_fixed_label_map_is_not_silently_ignored(capsys, good_pair, tmp_path, monkeypatch):
    """Before: --fixed-labels without --moving-labels was read and then not used, without a word."""
    from types import SimpleNamespace

    from MultimodalPrealignLib import pipeline

    labels = tmp_path / "labels.nrrd"
    sitk.WriteImage(_labels_like(_blob(), 5), str(labels))
    given = {}

    def stand_in(*args, **kwargs):  # the run itself is not the point here
        given["labels"] = args[4:6]
        return SimpleNamespace(report={"verdict": "PASS"})

    monkeypatch.setattr(pipeline, "register_files", stand_in)
    monkeypatch.setattr(cli, "_summary", lambda result, out: "verdict: PASS")
    code = cli.main(_register(good_pair[0], good_pair[1], tmp_path / "out", "--fixed-labels", str(labels)))
    out = capsys.readouterr().out
    assert code == 0 and given["labels"][0] is not None
    note = next((line for line in out.splitlines() if "--fixed-labels" in line), "")
    assert "--moving-labels" in note and "not used" in note and "'search'" in note, out
    assert cli.lone_label_map_note(labels, labels, "auto") is None  # both given: nothing to say
