"""Pair diagnostics: numbers checked against values computed here from sizes, spacings and origins."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from dicom_synth import axial_positions, write_series

from MultimodalPrealignLib import cli, diagnose
from MultimodalPrealignLib.errors import EXIT_BAD_INPUT
from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.io import image_io
from MultimodalPrealignLib.pipeline.diagnosis import diagnose_with_prealign

# ------------------------------------------------------------------------------------------ helpers


def header_box(size, spacing, origin, direction):
    """(lower, upper) LPS corners of the voxel-edge box of an image whose direction is a signed permutation."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    assert np.allclose(np.abs(d).sum(0), 1) and np.allclose(np.abs(d).sum(1), 1), "signed permutation expected"
    lower, upper = np.zeros(3), np.zeros(3)
    for axis in range(3):
        column = int(np.argmax(np.abs(d[axis])))
        ends = origin[axis] + d[axis, column] * spacing[column] * np.array([-0.5, size[column] - 0.5])
        lower[axis], upper[axis] = ends.min(), ends.max()
    return lower, upper


def file_box(path):
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return header_box(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())


def image_box(image):
    return header_box(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def expected_overlap(box_a, box_b):
    """Share of box a inside box b, per axis and in total (header alignment)."""
    inter = np.maximum(np.minimum(box_a[1], box_b[1]) - np.maximum(box_a[0], box_b[0]), 0)
    per_axis = inter / (box_a[1] - box_a[0])
    return per_axis, float(np.prod(per_axis))


def ct_like(size=(48, 48, 60), spacing=(3.0, 3.0, 3.0), origin=(-72.0, -72.0, -90.0)):
    """Air (-1000 HU) around an ellipsoidal soft-tissue body (40 HU) with a bone rod (700 HU)."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    cx, cy = (size[0] - 1) / 2, (size[1] - 1) / 2
    body = ((x - cx) / (0.4 * size[0])) ** 2 + ((y - cy) / (0.3 * size[1])) ** 2 <= 1
    array = np.where(body, 40.0, -1000.0)
    array[(np.abs(x - cx - 4) < 3) & (np.abs(y - cy) < 3)] = 700.0
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def mr_like(ct: sitk.Image, box_lower, box_upper, spacing, origin_shift=(0.0, 0.0, 0.0)) -> sitk.Image:
    """An 'MR' of the CT's region [box_lower, box_upper] (LPS mm): body bright, bone dark, air 0."""
    size = [int(round((hi - lo) / s)) for lo, hi, s in zip(box_lower, box_upper, spacing)]
    reference = sitk.Image(size, sitk.sitkFloat32)
    reference.SetSpacing(spacing)
    reference.SetOrigin([lo + s / 2 for lo, s in zip(box_lower, spacing)])
    resampled = sitk.Resample(sitk.Cast(ct, sitk.sitkFloat32), reference, sitk.Transform(), sitk.sitkNearestNeighbor,
                              -1000.0)
    array = sitk.GetArrayFromImage(resampled)
    mr = np.where(array < -500, 0.0, np.where(array > 300, 60.0, 400.0)).astype(np.float32)
    image = sitk.GetImageFromArray(mr)
    image.CopyInformation(resampled)
    image.SetOrigin([o + s for o, s in zip(resampled.GetOrigin(), origin_shift)])
    return image


# ------------------------------------------------------------------------------------------ synthetic pairs


def test_partial_slab_with_shifted_header():
    ct = ct_like()
    # MR slab: 30 mm of the CT's 180 mm head-feet extent, 2 x 2 x 5 mm voxels, header 200 mm off along S.
    mr = mr_like(ct, (-60.0, -50.0, -10.0), (60.0, 50.0, 20.0), (2.0, 2.0, 5.0), origin_shift=(0.0, 0.0, 200.0))
    truth = transforms.translation((0.0, 0.0, 200.0))  # fixed point -> moving point
    d = diagnose.diagnose_pair(ct, mr, truth, "truth")
    assert d["fixed"]["extent_mm_lps"] == pytest.approx([144.0, 144.0, 180.0])
    assert d["moving"]["extent_mm_lps"] == pytest.approx([120.0, 100.0, 30.0])
    assert d["ratios"]["extent_ratio_moving_over_fixed"] == pytest.approx([120 / 144, 100 / 144, 30 / 180], abs=1e-3)
    assert d["ratios"]["spacing_ratio_moving_over_fixed"] == pytest.approx([2 / 3, 2 / 3, 5 / 3], abs=1e-3)
    header = d["overlap"]["header"]
    assert header["fixed_inside_moving"] == 0.0 and header["moving_inside_fixed"] == 0.0
    pre = d["overlap"]["prealigned"]
    fixed_share = expected_overlap(image_box(ct), [b - np.array([0, 0, 200.0]) for b in image_box(mr)])[1]
    assert pre["fixed_inside_moving"] == pytest.approx(fixed_share, abs=0.03)
    assert pre["moving_inside_fixed"] == pytest.approx(1.0, abs=1e-6)
    assert pre["per_axis"]["fixed_covered"] == pytest.approx([120 / 144, 100 / 144, 30 / 180], abs=1e-3)
    assert pre["mean_displacement_mm"] == pytest.approx(200.0, abs=1e-3)
    assert d["fixed"]["modality"]["guess"] == "CT" and d["moving"]["modality"]["guess"] == "MR"
    assert 0.1 < d["fixed"]["foreground"]["fraction"] < 0.6
    text = " ".join(d["advice"])
    assert "The moving MR covers 17% of the fixed CT's head-feet extent (30 of 180 mm)" in text
    assert "do not overlap" in text and "share no frame of reference" in text
    assert d["verdict_code"] == "prealign_and_crop"
    report = diagnose.format_diagnostics(d)
    assert "144.0 x 144.0 x 180.0" in report and "Verdict: Pre-alignment and cropping" in report
    json.dumps(d)  # JSON-ready


def test_voxel_volume_80x_and_head_first_feet_first():
    fixed = ct_like(size=(60, 60, 60), spacing=(0.5, 0.5, 0.5), origin=(-15.0, -15.0, -15.0))
    moving = ct_like(size=(14, 14, 12), spacing=(2.0, 2.0, 2.5), origin=(-13.0, -13.0, -13.75))
    fixed.SetMetaData("MultimodalPrealign.patient_position", "HFS")
    moving.SetMetaData("0018|5100", "FFS")
    d = diagnose_with_prealign(fixed, moving, "geometry")
    assert d["ratios"]["voxel_volume_ratio_moving_over_fixed"] == pytest.approx(80.0)
    assert d["suggested_working_spacing_mm"] == 2.0
    assert d["fixed"]["patient_position"] == "HFS" and d["moving"]["patient_position"] == "FFS"
    text = " ".join(d["advice"])
    assert "Voxel volume differs 80x" in text and "working spacing of about 2 mm" in text
    assert "head-first (HFS)" in text and "feet-first (FFS)" in text and "180 degree rotation" in text
    assert d["overlap"]["prealigned"]["method"] == "geometry"
    assert d["verdict_code"] == "prealign"  # positions differ: headers are not to be trusted


def test_well_aligned_pair_is_ready():
    ct = ct_like()
    mr = mr_like(ct, (-72.0, -72.0, -90.0), (72.0, 72.0, 90.0), (3.0, 3.0, 3.0))
    d = diagnose.diagnose_pair(ct, mr, transforms.identity(), "header")
    assert d["overlap"]["header"]["fixed_inside_moving"] == pytest.approx(1.0)
    assert d["verdict_code"] == "ready"
    assert not any("covers" in a for a in d["advice"])


def test_dicom_series_input_reports_patient_position_and_modality(tmp_path):
    folder = tmp_path / "ct"
    write_series(folder, axial_positions((-31.0, -31.0, -20.0), 2.5, 12), patient_position="FFS")
    fixed = image_io.load_image(folder, "fixed image")
    moving = ct_like(size=(24, 24, 20), spacing=(3.0, 3.0, 3.0), origin=(-36.0, -36.0, -30.0))
    moving.SetMetaData("0018|5100", "HFS")
    d = diagnose.diagnose_pair(fixed, moving, transforms.identity(), "header")
    assert d["fixed"]["patient_position"] == "FFS"
    assert d["fixed"]["modality"] == {"guess": "CT", "source": "DICOM Modality tag"}
    assert "12 slices" in d["fixed"]["dicom_volume"]
    assert d["fixed"]["extent_mm_lps"] == pytest.approx([64.0, 64.0, 30.0])
    assert any("180 degree rotation" in a for a in d["advice"])


def test_cli_handler_runs_without_the_main_parser(tmp_path, capsys):
    ct = ct_like()
    mr = mr_like(ct, (-60.0, -50.0, -30.0), (60.0, 50.0, 30.0), (3.0, 3.0, 3.0))
    sitk.WriteImage(ct, str(tmp_path / "ct.nrrd"))
    sitk.WriteImage(mr, str(tmp_path / "mr.nrrd"))
    parser = argparse.ArgumentParser()
    cli.add_diagnose_command(parser.add_subparsers())
    args = parser.parse_args(["diagnose", str(tmp_path / "ct.nrrd"), str(tmp_path / "mr.nrrd"), "--json",
                              "--prealign", "moments"])
    assert args.handler(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["overlap"]["prealigned"]["method"] == "moments"
    assert d["moving"]["extent_mm_lps"] == pytest.approx([120.0, 99.0, 60.0])


def _cli(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "MultimodalPrealignLib.cli", *argv], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_diagnose_bad_input_is_one_line(tmp_path):
    result = _cli("diagnose", str(tmp_path / "missing.nrrd"), str(tmp_path / "other.nrrd"))
    assert result.returncode == EXIT_BAD_INPUT
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and "Fix:" in lines[0]


# ------------------------------------------------------------------------------------------ real pairs


@pytest.mark.realdata
def test_phantom_pair_numbers_and_advice(phantom_pair):
    ct_path, mr_path = phantom_pair
    result = _cli("diagnose", str(ct_path), str(mr_path), "--json", "--prealign", "geometry")
    assert result.returncode == 0, result.stderr
    d = json.loads(result.stdout)
    # SOURCE.md: CT 512 x 512 x 409 at 0.390625 x 0.390625 x 0.625, MR 512 x 512 x 94 at 0.5 x 0.5 x 2.5.
    assert d["fixed"]["extent_mm_lps"] == pytest.approx([512 * 0.390625, 512 * 0.390625, 409 * 0.625], abs=1e-3)
    assert d["moving"]["extent_mm_lps"] == pytest.approx([256.0, 256.0, 235.0], abs=1e-3)
    assert d["ratios"]["extent_ratio_moving_over_fixed"] == pytest.approx([1.28, 1.28, 235 / 255.625], abs=1e-3)
    assert d["ratios"]["spacing_ratio_moving_over_fixed"] == pytest.approx([1.28, 1.28, 4.0], abs=1e-3)
    assert d["ratios"]["voxel_volume_ratio_moving_over_fixed"] == pytest.approx(
        (0.5 * 0.5 * 2.5) / (0.390625**2 * 0.625), rel=1e-3)
    ct_box, mr_box = file_box(ct_path), file_box(mr_path)
    ct_axes, ct_share = expected_overlap(ct_box, mr_box)
    mr_axes, mr_share = expected_overlap(mr_box, ct_box)
    header = d["overlap"]["header"]
    assert header["fixed_inside_moving"] == pytest.approx(ct_share, abs=0.03)  # 0.888
    assert header["moving_inside_fixed"] == pytest.approx(mr_share, abs=0.03)  # 0.59
    assert header["per_axis"]["fixed_covered"] == pytest.approx(ct_axes, abs=1e-3)
    assert header["per_axis"]["moving_covered"] == pytest.approx(mr_axes, abs=1e-3)
    assert d["fixed"]["modality"]["guess"] == "CT" and d["moving"]["modality"]["guess"] == "MR"
    assert d["fixed"]["intensity"]["padding_value"] == -2048
    text = " ".join(d["advice"])
    assert "Voxel volume differs 7x" in text
    assert "The moving MR has 2.5 mm between slices but 0.5 mm pixels" in text
    assert d["suggested_working_spacing_mm"] == 1.0
    assert d["verdict_code"] == "prealign"


@pytest.mark.realdata
def test_phantom_pair_best_prealignment_finds_the_flip(phantom_pair):
    """With the default (auto) pre-alignment the advice names the ~180 degree rotation between the headers."""
    ct = image_io.load_image(phantom_pair[0], "fixed image")
    mr = image_io.load_image(phantom_pair[1], "moving image")
    d = diagnose_with_prealign(ct, mr)
    pre = d["overlap"]["prealigned"]
    assert pre["method"] != "header"
    assert pre["rotation_deg"] > 150, pre
    assert pre["fixed_inside_moving"] >= d["overlap"]["header"]["fixed_inside_moving"] - 0.02
    assert any("rotates by 1" in a and "the headers do not align the images" in a for a in d["advice"])
    assert d["seconds"] < 60


@pytest.mark.realdata
def test_totalsegmentator_pair_numbers_and_advice(totalseg_examples):
    ct_path = totalseg_examples / "example_ct.nii.gz"
    mr_path = totalseg_examples / "example_mr_sm.nii.gz"
    ct = image_io.load_image(ct_path, "fixed image")
    mr = image_io.load_image(mr_path, "moving image")
    d = diagnose_with_prealign(ct, mr, "geometry")
    # SOURCE.md: CT 122 x 101 x 112, MR 117 x 91 x 20, both 3 mm.
    assert d["fixed"]["extent_mm_lps"] == pytest.approx([366.0, 303.0, 336.0], abs=1e-3)
    assert d["moving"]["extent_mm_lps"] == pytest.approx([351.0, 273.0, 60.0], abs=1e-3)
    assert d["ratios"]["extent_ratio_moving_over_fixed"] == pytest.approx([351 / 366, 273 / 303, 60 / 336], abs=1e-3)
    assert d["ratios"]["spacing_ratio_moving_over_fixed"] == [1.0, 1.0, 1.0]
    ct_box, mr_box = file_box(ct_path), file_box(mr_path)
    ct_axes, ct_share = expected_overlap(ct_box, mr_box)
    assert ct_share == 0.0  # the headers put the MR slab outside the CT along S
    header = d["overlap"]["header"]
    assert header["fixed_inside_moving"] == 0.0 and header["moving_inside_fixed"] == 0.0
    assert header["per_axis"]["fixed_covered"] == pytest.approx(ct_axes, abs=1e-3)
    centers = [(b[0] + b[1]) / 2 for b in (ct_box, mr_box)]
    assert header["center_distance_mm"] == pytest.approx(np.linalg.norm(centers[0] - centers[1]), abs=0.01)
    pre = d["overlap"]["prealigned"]
    assert pre["moving_inside_fixed"] == pytest.approx(1.0)  # box centres matched: the slab lies inside the CT
    assert d["fixed"]["orientation"]["axes_point_to"] == "RAS" and d["moving"]["orientation"]["axes_point_to"] == "LPS"
    assert d["fixed"]["modality"]["guess"] == "CT" and d["moving"]["modality"]["guess"] == "MR"
    text = " ".join(d["advice"])
    assert "The moving MR covers 18% of the fixed CT's head-feet extent (60 of 336 mm)" in text
    assert "do not overlap" in text
    assert d["verdict_code"] == "prealign_and_crop"
