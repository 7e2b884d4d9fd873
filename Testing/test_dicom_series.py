"""DICOM series inspection and reconstruction on series written with pydicom (one per irregularity)."""

from __future__ import annotations

import argparse
import json
import math
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from dicom_synth import axial_positions, slice_pixels, uid, write_series, write_slice

from MultimodalPrealignLib.errors import InputError
from MultimodalPrealignLib.io import dicom_series, image_io

ORIGIN = (-31.0, -29.5, -20.25)


def _only_volume(inspection):
    volumes = inspection.volumes()
    assert len(volumes) == 1, [v.describe() for v in volumes]
    return volumes[0]


def _codes(candidate) -> set:
    return {f.code for f in candidate.findings}


def _finding(candidate, code):
    return next(f for f in candidate.findings if f.code == code)


def _sitk_series(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _assert_same_geometry_and_values(image, reference):
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).astype(np.int64),
                                  sitk.GetArrayFromImage(reference).astype(np.int64))


# ------------------------------------------------------------------------------------------ regular series


def test_regular_axial_series_matches_simpleitk(tmp_path):
    folder = tmp_path / "regular"
    paths = write_series(folder, axial_positions(ORIGIN, 2.5, 12), pixel_spacing=(2.0, 1.5), columns=24)
    inspection = dicom_series.inspect_dicom(folder)
    volume = _only_volume(inspection)
    assert volume.regular, volume.findings
    assert inspection.selection.volume is volume
    assert [s.path for s in volume.slices] == [str(p) for p in paths]  # sorted by position, not file name
    assert volume.spacing_histogram == [{"spacing_mm": 2.5, "count": 11}]
    image = dicom_series.read_dicom_volume(folder)
    _assert_same_geometry_and_values(image, _sitk_series(folder))
    # Rescale intercept applied: stored 1000 + ... minus 1024.
    array = sitk.GetArrayFromImage(image)
    assert array[0, 0, 0] == int(slice_pixels(32, 24, 1)[0, 0]) - 1024
    assert image.GetMetaData(dicom_series.META_PATIENT_POSITION) == "HFS"
    assert image.GetMetaData(dicom_series.META_MODALITY) == "CT"
    assert "12 slices" in image.GetMetaData(dicom_series.META_VOLUME)


def test_oblique_series_descending_file_order_matches_simpleitk(tmp_path):
    angle = math.radians(20.0)
    row = np.array([math.cos(angle), math.sin(angle), 0.0])
    col = np.array([0.0, math.cos(0.3), -math.sin(0.3)])
    col = col - np.dot(col, row) * row
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)
    positions = axial_positions((10.0, -5.0, 40.0), 3.0, 10, normal=normal)[::-1]
    folder = tmp_path / "oblique"
    write_series(folder, positions, orientation=tuple(row) + tuple(col), modality="MR", shuffle_seed=None)
    volume = _only_volume(dicom_series.inspect_dicom(folder))
    assert volume.regular, volume.findings
    image = dicom_series.read_dicom_volume(folder)
    _assert_same_geometry_and_values(image, _sitk_series(folder))
    assert image.GetSpacing()[2] == pytest.approx(3.0, abs=1e-4)
    assert image.GetPixelID() == sitk.sitkUInt16  # MR without rescale keeps the stored type


def test_image_io_reads_a_dicom_folder_through_this_module(tmp_path):
    folder = tmp_path / "io"
    write_series(folder, axial_positions(ORIGIN, 2.0, 6), patient_position="FFS")
    (folder / "notes.txt").write_text("not dicom")
    image = image_io.read_image_file(folder)
    assert image.GetSize() == (32, 32, 6)
    assert image.GetMetaData(dicom_series.META_PATIENT_POSITION) == "FFS"
    inspection = dicom_series.inspect_dicom(folder)
    assert inspection.non_dicom_files == [str(folder / "notes.txt")]


# ------------------------------------------------------------------------------------------ irregularities


def test_missing_slice_is_reported_and_refused(tmp_path):
    folder = tmp_path / "missing"
    positions = axial_positions(ORIGIN, 2.5, 12)
    del positions[5]
    paths = write_series(folder, positions)
    volume = _only_volume(dicom_series.inspect_dicom(folder))
    assert not volume.regular
    finding = _finding(volume, "missing_slices")
    assert "1 slice(s) missing" in finding.message
    assert set(finding.files) == {str(paths[4]), str(paths[5])}  # the neighbours of the gap
    assert finding.positions_mm == [pytest.approx(ORIGIN[2] + 4 * 2.5)]
    assert {"spacing_mm": 5.0, "count": 1} in volume.spacing_histogram
    with pytest.raises(InputError, match="missing") as err:
        dicom_series.read_dicom_volume(folder)
    assert "Fix:" in str(err.value) and "\n" not in str(err.value)


def test_duplicate_slice_is_reported_with_both_files(tmp_path):
    folder = tmp_path / "duplicate"
    positions = axial_positions(ORIGIN, 2.5, 10)
    paths = write_series(folder, positions)
    series_uid = dicom_series.read_header(str(paths[0])).series_uid
    extra = folder / "extra.dcm"
    write_slice(extra, position=positions[3], series_uid=series_uid, instance_number=99)
    volume = _only_volume(dicom_series.inspect_dicom(folder))
    finding = _finding(volume, "duplicate_slices")
    assert set(finding.files) == {str(paths[3]), str(extra)}
    assert "extra.dcm" in finding.message
    with pytest.raises(InputError, match="more than one slice"):
        dicom_series.read_dicom_volume(folder)


def test_the_same_instance_stored_twice_is_ignored(tmp_path):
    folder = tmp_path / "copy"
    paths = write_series(folder, axial_positions(ORIGIN, 2.5, 8))
    shutil.copy(paths[2], folder / "copy_of_slice3.dcm")
    volume = _only_volume(dicom_series.inspect_dicom(folder))
    assert volume.regular
    assert "same_instance_twice" in _codes(volume)
    image = dicom_series.read_dicom_volume(folder)
    assert image.GetSize()[2] == 8 and image.GetSpacing()[2] == pytest.approx(2.5)


def test_uneven_spacing_is_reported_with_histogram(tmp_path):
    folder = tmp_path / "uneven"
    positions = axial_positions(ORIGIN, 2.5, 12)
    for k in range(7, 12):
        positions[k] = positions[k] + np.array([0.0, 0.0, 0.6])  # one gap of 3.1 mm
    paths = write_series(folder, positions)
    volume = _only_volume(dicom_series.inspect_dicom(folder))
    finding = _finding(volume, "uneven_spacing")
    assert set(finding.files) == {str(paths[6]), str(paths[7])}
    assert volume.spacing_histogram == [{"spacing_mm": 2.5, "count": 10}, {"spacing_mm": 3.1, "count": 1}]
    assert "3.100" in finding.message
    with pytest.raises(InputError, match="differ from the typical"):
        dicom_series.read_dicom_volume(folder)


def test_overlapping_slice_is_reported(tmp_path):
    folder = tmp_path / "overlap"
    positions = axial_positions(ORIGIN, 2.5, 10)
    positions.insert(4, positions[3] + np.array([0.0, 0.0, 1.0]))
    write_series(folder, positions)
    volume = _only_volume(dicom_series.inspect_dicom(folder))
    assert "overlapping_slices" in _codes(volume)


def test_tilted_gantry_is_reported_with_its_angle(tmp_path):
    tilt = 15.0
    t = math.radians(tilt)
    folder = tmp_path / "tilt"
    write_series(folder, axial_positions(ORIGIN, 2.5, 12), orientation=(1, 0, 0, 0, math.cos(t), math.sin(t)),
                 extra={"GantryDetectorTilt": str(tilt)})
    volume = _only_volume(dicom_series.inspect_dicom(folder))
    finding = _finding(volume, "skewed_slices")
    assert volume.gantry_tilt_deg == pytest.approx(tilt, abs=0.01)
    assert finding.details["gantry_tilt_deg"] == pytest.approx(tilt, abs=0.01)
    assert "15.00 degrees" in finding.message and "GantryDetectorTilt tag 15" in finding.message
    with pytest.raises(InputError, match="sheared") as err:
        dicom_series.read_dicom_volume(folder)
    assert "regularization" in str(err.value)


def test_two_orientations_in_one_series_are_two_candidates_and_refused(tmp_path):
    folder = tmp_path / "two_orientations"
    series_uid = uid("two orientations")
    write_series(folder, axial_positions(ORIGIN, 2.5, 12), series_uid=series_uid, name_prefix="ax")
    write_series(folder, axial_positions((-15.0, -30.0, 30.0), 2.0, 10, normal=(1, 0, 0)), series_uid=series_uid,
                 orientation=(0, 1, 0, 0, 0, -1), name_prefix="sag")
    inspection = dicom_series.inspect_dicom(folder)
    assert len(inspection.series) == 1
    volumes = inspection.volumes()
    assert [len(v.slices) for v in volumes] == [12, 10]
    assert all(v.regular for v in volumes)
    assert "sagittal" in volumes[1].describe() and "axial" in volumes[0].describe()
    assert inspection.selection.volume is None
    assert "different orientation" in inspection.selection.reason
    with pytest.raises(InputError, match="2 volumes of different orientation"):
        dicom_series.read_dicom_volume(folder)


def test_two_time_points_are_split_and_the_first_is_used(tmp_path):
    folder = tmp_path / "two_times"
    series_uid = uid("two times")
    positions = axial_positions(ORIGIN, 2.5, 8)
    for tp in (2, 1):  # write the second time point first: order must come from the tag
        write_series(folder, positions, series_uid=series_uid, name_prefix=f"t{tp}_", modality="MR",
                     extra={"TemporalPositionIdentifier": tp},
                     per_slice=[{"pixels": slice_pixels(32, 32, k) + 7 * tp, "sop_uid": uid(tp, k)}
                                for k in range(len(positions))])
    inspection = dicom_series.inspect_dicom(folder)
    series = inspection.series[0]
    assert [v.time_key for v in series.volumes] == [(("TemporalPositionIdentifier", "1"),),
                                                    (("TemporalPositionIdentifier", "2"),)]
    assert "multiple_time_points" in {f.code for f in series.findings}
    assert inspection.selection.volume is series.volumes[0]
    image = dicom_series.read_dicom_volume(folder)
    assert image.GetSize() == (32, 32, 8)
    assert "TemporalPositionIdentifier 1" in image.GetMetaData(dicom_series.META_VOLUME)
    assert "first of 2 time points" in image.GetMetaData(dicom_series.META_VOLUME)
    assert int(sitk.GetArrayFromImage(image)[0, 0, 0]) == int(slice_pixels(32, 32, 0)[0, 0]) + 7


def test_repeated_positions_without_a_time_tag_are_refused(tmp_path):
    folder = tmp_path / "repeated"
    series_uid = uid("repeated")
    positions = axial_positions(ORIGIN, 2.5, 6)
    for copy in (1, 2):
        write_series(folder, positions, series_uid=series_uid, name_prefix=f"c{copy}_",
                     per_slice=[{"sop_uid": uid("rep", copy, k)} for k in range(len(positions))])
    volume = _only_volume(dicom_series.inspect_dicom(folder))
    assert "repeated_positions" in _codes(volume)
    with pytest.raises(InputError, match="appears 2 times"):
        dicom_series.read_dicom_volume(folder)


def test_mixed_pixel_spacing_names_the_odd_file(tmp_path):
    folder = tmp_path / "mixed_spacing"
    per_slice = [{} for _ in range(10)]
    per_slice[6] = {"pixel_spacing": (2.2, 2.2)}
    paths = write_series(folder, axial_positions(ORIGIN, 2.5, 10), per_slice=per_slice)
    volume = _only_volume(dicom_series.inspect_dicom(folder))
    finding = _finding(volume, "mixed_pixel_spacing")
    assert finding.files == [str(paths[6])]
    assert "2.2 x 2.2 mm: 1 slices" in finding.message
    with pytest.raises(InputError, match="pixel spacing differs"):
        dicom_series.read_dicom_volume(folder)


def test_non_parallel_slice_is_reported(tmp_path):
    folder = tmp_path / "non_parallel"
    t = math.radians(2.0)
    per_slice = [{} for _ in range(10)]
    per_slice[4] = {"orientation": (1, 0, 0, 0, math.cos(t), math.sin(t))}
    paths = write_series(folder, axial_positions(ORIGIN, 2.5, 10), per_slice=per_slice)
    volume = _only_volume(dicom_series.inspect_dicom(folder))
    finding = _finding(volume, "non_parallel_slices")
    assert str(paths[4]) in finding.files
    assert finding.details["max_angle_deg"] == pytest.approx(2.0, abs=0.01)


def test_localizer_slices_next_to_a_volume_are_skipped(tmp_path):
    folder = tmp_path / "with_localizer"
    series_uid = uid("with localizer")
    write_series(folder, axial_positions(ORIGIN, 2.5, 10), series_uid=series_uid)
    write_slice(folder / "scout.dcm", position=(0, -100, 100), orientation=(0, 1, 0, 0, 0, -1), rows=64,
                series_uid=series_uid, instance_number=50)
    inspection = dicom_series.inspect_dicom(folder)
    assert [len(v.slices) for v in inspection.volumes()] == [10, 1]
    assert "too_few_slices" in _codes(inspection.volumes()[1])
    assert dicom_series.read_dicom_volume(folder).GetSize() == (32, 32, 10)


def test_two_series_in_one_folder_are_refused(tmp_path):
    folder = tmp_path / "two_series"
    write_series(folder, axial_positions(ORIGIN, 2.5, 6), name_prefix="a", series_number=1)
    write_series(folder, axial_positions(ORIGIN, 2.5, 6), name_prefix="b", series_number=2, modality="MR")
    with pytest.raises(InputError, match="2 series"):
        dicom_series.read_dicom_volume(folder)


def test_folder_without_dicom_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(InputError, match="none of the 1 files"):
        dicom_series.read_dicom_volume(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        dicom_series.inspect_dicom(tmp_path / "nope")


# ------------------------------------------------------------------------------------------ CLI


def _parse(argv):
    parser = argparse.ArgumentParser()
    dicom_series.add_cli(parser.add_subparsers())
    return parser.parse_args(argv)


def test_cli_inspect_dicom_text_and_json(tmp_path, capsys):
    good = tmp_path / "good"
    write_series(good, axial_positions(ORIGIN, 2.5, 6))
    args = _parse(["inspect-dicom", str(good)])
    assert args.handler(args) == 0
    text = capsys.readouterr().out
    assert "regular" in text and "Registration input: used" in text
    bad = tmp_path / "bad"
    positions = axial_positions(ORIGIN, 2.5, 8)
    del positions[3]
    write_series(bad, positions)
    args = _parse(["inspect-dicom", str(bad), "--json"])
    assert args.handler(args) == 2  # a documented code: bad input (it was 1, undocumented)
    report = json.loads(capsys.readouterr().out)
    assert report["selection"]["usable"] is False
    codes = [f["code"] for f in report["series"][0]["volumes"][0]["findings"]]
    assert codes == ["missing_slices"]


def test_installed_cli_inspect_dicom_and_refusal_exit_codes(tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "tilted"
    t = math.radians(12.0)
    write_series(folder, axial_positions(ORIGIN, 2.5, 8), orientation=(1, 0, 0, 0, math.cos(t), math.sin(t)))
    command = [sys.executable, "-m", "MultimodalPrealignLib.cli"]
    result = subprocess.run([*command, "inspect-dicom", str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "gantry tilt 12.00 degrees" in result.stdout and "REFUSED" in result.stdout
    # register refuses the same folder as bad input (exit 2) with the reason on one line.
    result = subprocess.run([*command, "register", "--fixed", str(folder), "--moving", str(folder),
                             "--out", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "sheared" in lines[0] and "Fix:" in lines[0]
    assert not (tmp_path / "out" / "report.json").exists()
