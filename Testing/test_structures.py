"""Per-structure registration (structures/, ``--per-structure``) on a small synthetic knee with exact truths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from knee_helpers import bone_error, near_femur, small_knee

from MultimodalPrealignLib import cli, structures
from MultimodalPrealignLib.errors import InputError
from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.io.image_io import as_float32
from MultimodalPrealignLib.synthetic.phantoms import rigid_transform, rotation_about_axis


@pytest.fixture(scope="module")
def pair():
    """0.5 mm microCT-like joint vs 3 x 1 x 1 mm MR-like leg, 12 degrees more flexion in the MR."""
    return small_knee(0.5, 110)


@pytest.fixture(scope="module")
def start(pair):
    return near_femur(pair)


error = bone_error


@pytest.fixture(scope="module")
def registered(pair, start):
    labels = structures.from_label_image(pair.fixed_labels)
    return structures.run(as_float32(pair.fixed), as_float32(pair.moving), start, labels,
                          "tibia,patella,femur,meniscus,fibula")


def test_each_bone_is_registered_on_its_own(pair, start, registered):
    """From a global transform near the femur's truth, the tibia and patella (5-8 mm off under it) are found on their
    own; a structure is never left worse than the global transform (the guard), and no PASS is wrong."""
    results, block = registered
    by_name = {r.name: r for r in results}
    assert [r.name for r in results] == ["tibia", "patella", "femur", "meniscus", "fibula"]  # the order asked
    errors = {}
    for bone in ("tibia", "patella", "femur"):
        before, after = error(pair, start, bone), error(pair, by_name[bone].transform, bone)
        errors[bone] = (before, after)
        assert after <= before + 0.2, (bone, before, after)
        if by_name[bone].verdict == "PASS":
            assert after < 1.5, (bone, before, after)
    assert errors["tibia"][0] > 4.0 and errors["patella"][0] > 4.0
    recovered = [bone for bone in ("tibia", "patella") if errors[bone][1] < 1.5]
    # 0.5 mm microCT, 1 mm MR voxels: measured tibia 7.5 -> 0.46 mm, patella 5.2 -> 0.81 mm (before the engines
    # sampled the bone's mask as given, an intensity object mask cut the tibia's and it ended 5.8-7.5 mm off)
    assert recovered == ["tibia", "patella"], errors
    for bone in recovered:
        assert by_name[bone].motion["mean_displacement_mm"] > 2.0  # it moved away from the global transform
    assert block["summary"]["registered"] == 3 and block["summary"]["failed"] == 2
    # the resource values behind the search, the consistency check and the verdicts are recorded with the results
    assert block["thresholds"] == structures.verdict.thresholds() and block["thresholds"]["consistency_turn_deg"] == 8.0
    assert "consistency" in {e["name"]: e for e in block["results"]}["patella"]["metrics"]
    entry = {e["name"]: e for e in block["results"]}["femur"]
    assert entry["transform"]["convention"] == "fixed->moving, physical LPS mm"
    assert set(entry["motion_relative_to_global"]) >= {"rotation_deg", "mean_displacement_mm",
                                                       "translation_at_centroid_mm"}
    assert entry["metrics"]["mi"]["registered"] >= entry["metrics"]["mi"]["global"]
    json.dumps(block)  # report.json-ready


def test_missing_and_absent_structures_get_one_line_errors_the_others_run(registered):
    results, _ = registered
    by_name = {r.name: r for r in results}
    assert "not in the fixed label map" in by_name["meniscus"].error and "femur" in by_name["meniscus"].error
    assert "too small" in by_name["fibula"].error  # its head barely enters the microCT's field of view
    for name in ("meniscus", "fibula"):
        assert by_name[name].verdict == "FAIL" and by_name[name].transform is None
        assert "\n" not in by_name[name].error and "Fix:" in by_name[name].error


def test_too_small_and_out_of_view_structures_are_refused(pair, start):
    array = sitk.GetArrayFromImage(pair.fixed_labels)
    array[2:4, 2:4, 2:4] = 9  # 8 voxels: too small
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(pair.fixed_labels)
    far = transforms.compose(transforms.translation([400.0, 0.0, 0.0]), start)
    small, _ = structures.run(as_float32(pair.fixed), as_float32(pair.moving), start,
                              structures.from_label_image(labels), "9")
    assert "too small" in small[0].error and small[0].verdict == "FAIL"
    outside, _ = structures.run(as_float32(pair.fixed), as_float32(pair.moving), far,
                                structures.from_label_image(pair.fixed_labels), "patella")
    assert "outside the moving image's field of view" in outside[0].error


def test_label_names_are_kept_from_segmentations_folders_and_values(pair, tmp_path):
    segmentation = tmp_path / "bones.seg.nrrd"
    sitk.WriteImage(pair.fixed_labels, str(segmentation))
    read = structures.read_structure_labels(segmentation, pair.fixed)
    assert read.present() == {"femur": [1], "tibia": [2], "fibula": [3], "patella": [4]}  # femur kept
    folder = tmp_path / "masks"
    folder.mkdir()
    for name, value in (("femur", 1), ("patella", 4)):
        sitk.WriteImage(sitk.Cast(pair.fixed_labels == value, sitk.sitkUInt8), str(folder / f"{name}.nii.gz"))
    assert set(structures.read_structure_labels(folder, pair.fixed).present()) == {"femur", "patella"}
    plain = structures.from_label_image(sitk.Cast(pair.fixed_labels, sitk.sitkUInt16))  # no names: label values
    chosen, problems = structures.select(plain, "2,label_4")
    assert chosen == [("2", [2]), ("label_4", [4])] and not problems
    with pytest.raises(InputError, match="does not exist"):
        structures.read_structure_labels(tmp_path / "nope.nrrd", pair.fixed)


def test_threshold_bones_separates_the_knee_at_the_joint_space(pair):
    labels = structures.threshold_bone_labels(as_float32(pair.fixed), 300.0, working_spacing_mm=1.0)
    truth = sitk.GetArrayFromImage(sitk.Resample(pair.fixed_labels, labels.image, sitk.Transform(),
                                                 sitk.sitkNearestNeighbor, 0))
    auto = sitk.GetArrayViewFromImage(labels.image)
    found = {}
    for (value,) in labels.names.values():
        counts = np.bincount(truth[auto == value], minlength=5)
        counts[0] = 0
        found[int(np.argmax(counts))] = counts.max() / max((auto == value).sum(), 1)
    assert {1, 2, 4} <= set(found)  # femur, tibia and patella each got their own label
    assert min(found[b] for b in (1, 2, 4)) > 0.8
    with pytest.raises(InputError, match="No bone above"):
        structures.threshold_bone_labels(as_float32(pair.fixed), 5000.0)


def test_register_per_structure_writes_each_transform_atomically(pair, tmp_path, capsys):
    fixed, moving = tmp_path / "microct.nrrd", tmp_path / "mr.nrrd"
    sitk.WriteImage(pair.fixed, str(fixed))
    sitk.WriteImage(pair.moving, str(moving))
    segmentation = tmp_path / "bones.seg.nrrd"
    sitk.WriteImage(pair.fixed_labels, str(segmentation))
    out = tmp_path / "out"
    code = cli.main(["register", "--fixed", str(fixed), "--moving", str(moving), "--out", str(out), "--quiet",
                     "--fixed-labels", str(segmentation), "--per-structure", "tibia,patella,nope",
                     "--prealign", "moments", "--stages", "rigid", "--no-fallback"])
    printed = capsys.readouterr().out
    assert code in (0, 4)
    assert "structure tibia:" in printed and "structure nope: FAIL" in printed
    report = json.loads((out / "report.json").read_text())
    block = report["structures"]
    assert [e["name"] for e in block["results"]] == ["tibia", "patella", "nope"]
    assert block["names_from"] == "segment names" and report["outputs"]["structures"] == "structures/"
    for name in ("tibia", "patella"):
        files = {e["name"]: e for e in block["results"]}[name]["files"]
        assert transforms.read_transform(out / files["transform"]) is not None
        assert sitk.ReadImage(str(out / files["moving_resampled"])).GetPixelID() == pair.moving.GetPixelID()
        assert all((out / path).is_file() for path in files["pictures"].values())
    assert all((out / path).is_file() for path in block["composite"].values())
    html = (out / "report.html").read_text()
    assert "Per-structure registration" in html and "tibia" in html
    assert "--per-structure tibia,patella,nope" in report["reproduce"]["command_line"]
    assert not list(tmp_path.glob(".out.partial-*"))


def test_per_structure_bad_input_is_one_line_and_writes_nothing(pair, tmp_path, capsys):
    fixed, moving = tmp_path / "microct.nrrd", tmp_path / "mr.nrrd"
    sitk.WriteImage(pair.fixed, str(fixed))
    sitk.WriteImage(pair.moving, str(moving))
    segmentation = tmp_path / "bones.seg.nrrd"
    sitk.WriteImage(pair.fixed_labels, str(segmentation))
    base = ["register", "--fixed", str(fixed), "--moving", str(moving), "--quiet"]
    for extra, needle in ((["--per-structure", "femur"], "needs the structures of the fixed image"),
                          (["--structures-from-threshold", "300"], "--per-structure"),
                          (["--per-structure", "femur", "--structure-stages", "affine,rigid"], "order"),
                          (["--per-structure", "meniscus", "--fixed-labels", str(segmentation)], "meniscus")):
        out = tmp_path / f"out_{len(extra)}_{needle[:4]}"
        code = cli.main([*base, "--out", str(out), *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1 and "Fix:" in err and needle in err, err
        assert not out.exists()


def _disc_pair(bump: bool):
    """A flattened ellipsoid of revolution (semi-axes 14, 14, 5 mm; turns about its thin axis change nothing) in a
    CT-like fixed image (0.5 mm) and an MR-like moving image (0.45 mm, other contrast), the same physical place
    (truth: identity). ``bump``: a knob on its rim breaks the symmetry."""
    images, bodies = [], []
    # the two grids do not line up (0.5 mm and 0.45 mm, origins 0.13 mm apart): no pose is favoured by the grids
    for size, spacing, shift, inside, outside, texture in ((90, 0.5, 0.0, 1200.0, 0.0, 300.0),
                                                          (100, 0.45, 0.13, 150.0, 600.0, -80.0)):
        z, y, x = (np.indices((size,) * 3) - (size - 1) / 2.0) * spacing + shift
        body = (x / 14.0) ** 2 + (y / 14.0) ** 2 + (z / 5.0) ** 2 <= 1.0
        if bump:
            body |= (x - 13.0) ** 2 + y ** 2 + z ** 2 <= 4.0 ** 2
        array = np.where(body, inside + texture * np.cos(np.sqrt(x ** 2 + y ** 2) / 3.0), outside)
        image = sitk.GetImageFromArray(array.astype(np.float32))
        image.SetSpacing((spacing,) * 3)
        image.SetOrigin((-(size - 1) / 2.0 * spacing + shift,) * 3)
        images.append(sitk.SmoothingRecursiveGaussian(image, 0.5))
        bodies.append(body)
    labels = sitk.GetImageFromArray(bodies[0].astype(np.uint8))
    labels.CopyInformation(images[0])
    return images[0], images[1], structures.from_label_image(labels, table={1: "disc"})


@pytest.mark.parametrize("bump", [False, True])
def test_a_structure_the_metric_does_not_pin_down_is_not_pass(bump):
    """Started 12 degrees off about the disc's thin axis and 1.5 mm off (about 2 mm mean error): the symmetric disc
    cannot be turned back (every turn about that axis scores about the same), its small probes see nothing, and
    before the consistency check it was PASS; re-registrations from turned starts end as far apart: WARN. With a
    knob that breaks the symmetry the turn is found again: PASS."""
    fixed, moving, labels = _disc_pair(bump)
    turn = rigid_transform(rotation_about_axis([0.0, 0.0, 1.0], 12.0), [1.0, -1.0, 0.5], [0.0, 0.0, 0.0])
    settings = structures.StructureSettings()
    settings.registration.seed = 1
    results, _ = structures.run(fixed, moving, turn, labels, "disc", settings)
    result = results[0]
    points = result.points
    start_error = transforms.mean_point_error(turn, transforms.identity(), points)
    end_error = transforms.mean_point_error(result.transform, transforms.identity(), points)
    assert start_error > 1.2
    consistency = result.metrics.get("consistency") or {}
    if bump:
        assert end_error < 0.3, end_error
        assert consistency["disagreement_mm"] < 0.5 and result.verdict == "PASS", (result.reasons, consistency)
    else:
        assert end_error > 1.0, end_error  # the metric cannot see the turn
        assert result.metrics["probes"]["best_gain"] <= 0.01  # the small probes do not see it either
        assert result.verdict == "WARN" and "does not pin it down" in result.reasons[0], result.reasons
        assert consistency["disagreement_mm"] > 0.5


@pytest.mark.parametrize("shift", [0, 9])
def test_threshold_bones_split_two_bones_joined_by_a_thin_neck(shift):
    """Two balls (radius 5.5 and 6.5 mm) joined by a 1.5 mm neck, the smaller one touching the array's edge with
    ``shift`` 9: the joint-space separation erodes the neck away and gives two bones, larger first."""
    z, y, x = np.indices((60, 70, 80)).astype(float)
    small = (z - 30) ** 2 + (y - 35) ** 2 + (x - 20 + shift) ** 2 <= 11 ** 2
    large = (z - 30) ** 2 + (y - 35) ** 2 + (x - 60 + shift) ** 2 <= 13 ** 2
    neck = (abs(z - 30) <= 1) & (abs(y - 35) <= 1) & (x > 28 - shift) & (x < 50 - shift)
    image = sitk.GetImageFromArray(np.where(small | large | neck, 1000.0, 0.0).astype(np.float32))
    image.SetSpacing((0.5, 0.5, 0.5))
    labels = structures.threshold_bone_labels(image, 300.0, working_spacing_mm=0.5, min_volume_ml=0.01)
    found = sitk.GetArrayFromImage(labels.image)
    assert list(labels.names) == ["bone_1", "bone_2"]
    assert np.mean(found[large] == 1) > 0.99 and np.mean(found[small] == 2) > 0.99
