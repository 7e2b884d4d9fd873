"""Wrong geometry never PASSes.

Invalid headers (zero or non-finite voxel size, singular direction, truncated data, a missing data file) are
refused with the header field or file named: exit code 2, one line, nothing from ITK on the terminal. Geometry
that is valid but suspicious makes the verdict FAIL: a mirrored header (NRRD ``spacings: -4``, NIfTI pixdim -4;
the mirror probe), a 5 x 5 x 5 voxel patch and nonsense voxel sizes (the content check), images in metres (the
size check); images in different units are refused and ``diagnose`` says the units may differ. An image of pure
noise against a CT FAILs (exit 4): unrelated images.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import SimpleITK as sitk

from MultimodalPrealignLib import cli, diagnose
from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.geometry.image_space import index_to_physical_matrix
from MultimodalPrealignLib.io import image_io
from MultimodalPrealignLib.qa import measure, verdict
from MultimodalPrealignLib.synthetic import phantoms

MISLEADING_FIX = "give a NRRD, NIfTI"  # the old fix of every unreadable file, whatever the cause


@pytest.fixture(scope="module")
def pair():
    return phantoms.make_pair(seed=5, rotation_deg=15, translation_mm=25, fixed_spacing=(4.0, 4.0, 4.0),
                              moving_spacing=(4.0, 4.0, 5.0), labels=False)


# ------------------------------------------------------------------------------------------------ file helpers
def write_nrrd(path, image: sitk.Image, fields: list[str], data: bytes | None = None) -> None:
    """A NRRD with exactly the given geometry fields (raw little-endian float voxels)."""
    size = image.GetSize()
    head = (f"NRRD0004\ntype: float\ndimension: 3\nsizes: {size[0]} {size[1]} {size[2]}\n"
            + "".join(field + "\n" for field in fields) + "endian: little\nencoding: raw\n\n")
    voxels = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32)).astype("<f4").tobytes()
    path.write_bytes(head.encode() + (voxels if data is None else data))


def write_nifti_with_pixdim(path, image: sitk.Image, axis: int, value: float) -> None:
    """An uncompressed NIfTI-1 file of ``image`` whose pixdim[axis] is ``value`` (everything else as written)."""
    sitk.WriteImage(image, str(path))
    raw = bytearray(path.read_bytes())
    raw[76 + 4 * axis:80 + 4 * axis] = struct.pack("<f", value)
    path.write_bytes(bytes(raw))


def _register(fixed, moving, out, *extra):
    return ["register", "--fixed", str(fixed), "--moving", str(moving), "--out", str(out), "--quiet", *extra]


def _refused(capfd, args, *needles) -> str:
    """Run the CLI; assert exit 2 and ONE line on the terminal (ITK's own warnings included) naming ``needles``."""
    code = cli.main([str(a) for a in args])
    captured = capfd.readouterr()
    err = captured.err.strip()
    assert code == 2, f"exit code {code}: {err}"
    assert len(err.splitlines()) == 1, err
    assert "WARNING" not in err and "ITK" not in err, err
    line = err.splitlines()[0]
    assert "Fix:" in line and MISLEADING_FIX not in line, line
    for needle in needles:
        assert needle.lower() in line.lower(), f"'{needle}' not in: {line}"
    return line


@pytest.fixture
def files(pair, tmp_path):
    fixed = tmp_path / "fixed.nrrd"
    sitk.WriteImage(pair.fixed, str(fixed))
    return fixed, tmp_path


# ------------------------------------------------------------------------------------------------ refused
def test_zero_pixdim_is_refused_with_the_field_named_and_no_itk_warning(capfd, pair, files):
    """Before: read as 1 mm voxels (ITK's 'unexpected scales in sform' warning on the terminal) and registered."""
    fixed, folder = files
    moving = folder / "zero_pixdim.nii"
    write_nifti_with_pixdim(moving, pair.moving, 1, 0.0)
    _refused(capfd, _register(fixed, moving, folder / "out"), "pixdim[1] is 0", "zero_pixdim.nii")
    assert not (folder / "out").exists()


def test_non_finite_pixdim_is_refused(capfd, pair, files):
    fixed, folder = files
    moving = folder / "nan_pixdim.nii"
    write_nifti_with_pixdim(moving, pair.moving, 3, float("nan"))
    _refused(capfd, _register(fixed, moving, folder / "out"), "pixdim[3]", "nan")


@pytest.mark.parametrize("fields, needles", [
    (["spacings: 0 4 5"], ("spacings", "axis 0", "0")),
    (["space: left-posterior-superior", "space directions: (4,0,0) (4,0,0) (0,0,5)",
      "space origin: (0,0,0)"], ("space directions", "singular")),
    (["space: left-posterior-superior", "space directions: (nan,0,0) (0,4,0) (0,0,5)",
      "space origin: (0,0,0)"], ("space directions", "nan")),
    (["space: left-posterior-superior", "space directions: (4,0,0) (0,4,0) (0,0,5)",
      "space origin: (inf,0,0)"], ("space origin",)),
])
def test_invalid_nrrd_header_fields_are_named(capfd, pair, files, fields, needles):
    """Before: 'Cannot read ... (0 0 1). Fix: give a NRRD, NIfTI, MHA/MHD file or a DICOM series folder'."""
    fixed, folder = files
    moving = folder / "bad_header.nrrd"
    write_nrrd(moving, pair.moving, fields)
    _refused(capfd, _register(fixed, moving, folder / "out"), "header", *needles)


def test_truncated_files_are_named_truncated(capfd, pair, files):
    fixed, folder = files
    for name in ("truncated.nrrd", "truncated.nii", "truncated.nii.gz", "truncated.mha"):
        whole = folder / f"whole_{name}"
        sitk.WriteImage(pair.moving, str(whole), name.endswith(".gz"))
        data = whole.read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
        line = _refused(capfd, _register(fixed, folder / name, folder / "out"), "truncated", name)
        assert "download" in line.lower() or "copy" in line.lower(), line


def test_missing_data_file_is_named(capfd, pair, files):
    fixed, folder = files
    header = folder / "detached.nhdr"
    size = pair.moving.GetSize()
    header.write_text(f"NRRD0004\ntype: float\ndimension: 3\nsizes: {size[0]} {size[1]} {size[2]}\n"
                      "spacings: 4 4 5\nendian: little\nencoding: raw\ndata file: missing.raw\n")
    _refused(capfd, _register(fixed, header, folder / "out"), "missing.raw", "data file")
    mhd = folder / "detached.mhd"
    sitk.WriteImage(pair.moving, str(mhd))
    (folder / "detached.raw").unlink()
    _refused(capfd, _register(fixed, mhd, folder / "out"), "detached.raw", "data file")


@pytest.mark.parametrize("factor, needle", [(1e-3, "metres"), (100.0, "voxel size")])
def test_images_in_different_units_are_refused(capfd, pair, files, factor, needle):
    """Before: metres vs millimetres and a x100 voxel size ended in the engine's raw ITK error (exit 3)."""
    fixed, folder = files
    scaled = sitk.Image(pair.moving)
    scaled.SetSpacing([s * factor for s in pair.moving.GetSpacing()])
    scaled.SetOrigin([v * factor for v in pair.moving.GetOrigin()])
    moving = folder / "scaled.nrrd"
    sitk.WriteImage(scaled, str(moving))
    _refused(capfd, _register(fixed, moving, folder / "out"), "units", needle)
    assert not (folder / "out").exists()
    findings = diagnose.diagnose_pair(pair.fixed, scaled)
    assert any("units" in sentence for sentence in findings["advice"]), findings["advice"]


# ------------------------------------------------------------------------------------------------ the verdict
def _affine(image: sitk.Image) -> np.ndarray:
    """4x4 voxel index -> physical (LPS mm)."""
    matrix, origin = index_to_physical_matrix(image)
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = matrix, origin
    return out


def _judged(fixed, moving, result, before=None) -> tuple[str, list[str]]:
    block = measure.evaluate(fixed, moving, before or result, result)
    return verdict.judge({"metrics": block})


@pytest.mark.parametrize("kind", ["nrrd spacings", "nifti pixdim"])
def test_a_mirrored_header_fails_the_verdict(pair, tmp_path, kind):
    """Before: PASS. The header mirrors the moving image; a rigid registration can only align its outline
    (the best rigid pose = the truth followed by a left-right mirror), so organs sit on the wrong side."""
    if kind == "nrrd spacings":
        path = tmp_path / "mirrored.nrrd"
        write_nrrd(path, pair.moving, ["spacings: -4 4 5"])
    else:
        path = tmp_path / "mirrored.nii"
        write_nifti_with_pixdim(path, pair.moving, 1, -4.0)
    mirrored = image_io.load_image(path, "moving image")
    header = _affine(mirrored) @ np.linalg.inv(_affine(pair.moving))  # old physical -> new physical
    assert np.linalg.det(header[:3, :3]) < 0
    truth = transforms.compose(pair.fixed_to_moving, transforms.affine_from_matrix(header))
    outline_fit = transforms.compose(transforms.affine_from_matrix(np.diag([-1.0, 1.0, 1.0, 1.0]),
                                                                   phantoms.body_box().center), truth)
    assert np.linalg.det(transforms.to_matrix(outline_fit)[:3, :3]) > 0  # what a rigid registration can reach
    result, reasons = _judged(pair.fixed, mirrored, outline_fit)
    assert result == "FAIL", reasons
    assert any("mirrored" in r and "spacing" in r for r in reasons), reasons


def test_a_five_voxel_patch_fails(pair):
    """Before: PASS, 13 mm off. 5 x 5 x 5 voxels hold too little to register or to judge."""
    centre = [s // 2 for s in pair.moving.GetSize()]
    patch = pair.moving[centre[0] - 2:centre[0] + 3, centre[1] - 2:centre[1] + 3, centre[2] - 2:centre[2] + 3]
    off = transforms.compose(transforms.translation((13.0, 0.0, 0.0)), pair.fixed_to_moving)
    result, reasons = _judged(pair.fixed, patch, off)
    assert result == "FAIL" and any("voxels" in r for r in reasons), reasons


def test_nonsense_voxel_sizes_on_ct_voxels_fail(pair):
    """Before: PASS ("overlap 100%"). CT voxels with a 0.1 x 0.1 x 20 mm header: an object 8.5 x 6 x 400 mm."""
    slab = pair.fixed[:, :, 60:80]
    nonsense = sitk.Image(slab)
    nonsense.SetSpacing((0.1, 0.1, 20.0))
    nonsense.SetOrigin((0.0, 0.0, -200.0))
    result, reasons = _judged(pair.fixed, nonsense, transforms.identity())
    assert result == "FAIL", reasons
    assert any("voxel size" in r for r in reasons), reasons


def test_a_body_ct_in_metres_fails(pair):
    """Before: PASS (1 voxel compared, NMI 1.0). A torso 0.34 mm across: the units are probably metres."""
    scale = np.diag([1e-3, 1e-3, 1e-3, 1.0])

    def in_metres(image):
        out = sitk.Image(image)
        out.SetSpacing([s * 1e-3 for s in image.GetSpacing()])
        out.SetOrigin([v * 1e-3 for v in image.GetOrigin()])
        return out

    truth = scale @ transforms.to_matrix(pair.fixed_to_moving) @ np.linalg.inv(scale)
    result, reasons = _judged(in_metres(pair.fixed), in_metres(pair.moving), transforms.affine_from_matrix(truth))
    assert result == "FAIL" and any("metres" in r for r in reasons), reasons


def test_ct_against_pure_noise_fails_as_unrelated(pair):
    """Before: WARN and exit 0 (NMI 1.0002, which the report's own scale calls unrelated)."""
    rng = np.random.default_rng(0)
    noise = sitk.GetImageFromArray(rng.normal(100.0, 30.0, sitk.GetArrayViewFromImage(pair.moving).shape)
                                   .astype(np.float32))
    noise.CopyInformation(pair.moving)
    result, reasons = _judged(pair.fixed, noise, pair.fixed_to_moving, before=transforms.identity())
    assert result == "FAIL" and verdict.exit_code_for(result) == 4
    assert any("unrelated" in r for r in reasons), reasons


def test_the_checks_pass_the_true_transform(pair):
    """The same checks do not fire on the correct result of an ordinary pair (the other side of the promise)."""
    block = measure.evaluate(pair.fixed, pair.moving, pair.fixed_to_moving, pair.fixed_to_moving)
    checks = {c["check"]: c["status"] for c in verdict.checks({"metrics": block})}
    for name in ("content", "related", "probe_mirror"):
        assert checks.get(name) == "PASS", checks
