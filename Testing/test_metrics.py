"""QA metrics against independent computations: Dice/centroids of known boxes, TRE of known transforms,
Jacobian determinants of known scalings and of a constructed folding field, landmark file readers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from MultimodalPrealignLib.errors import InputError
from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.io import landmarks
from MultimodalPrealignLib.qa import metrics
from MultimodalPrealignLib.synthetic import phantoms


def _label_image(size, spacing, boxes, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    """UInt16 label map; ``boxes``: {label: ((x0, x1), (y0, y1), (z0, z1))} half-open voxel index ranges."""
    array = np.zeros(size[::-1], np.uint16)
    for label, ((x0, x1), (y0, y1), (z0, z1)) in boxes.items():
        array[z0:z1, y0:y1, x0:x1] = label
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def test_dice_and_centroid_of_shifted_boxes_match_analytic_values():
    spacing = (2.0, 2.0, 2.0)
    fixed = _label_image((30, 30, 30), spacing, {1: ((5, 15), (5, 15), (5, 15)), 2: ((18, 26), (4, 12), (10, 20))})
    moving = _label_image((30, 30, 30), spacing, {1: ((5, 15), (5, 15), (5, 15)), 2: ((18, 26), (4, 12), (10, 20))})
    # fixed point x shows moving point x + 6 mm: the moving boxes land 3 voxels lower in x on the fixed grid.
    result = metrics.structure_metrics(fixed, moving, transforms.translation((6.0, 0.0, 0.0)))
    rows = {r["name"]: r for r in result["structures"]}
    # Box 1: 10x10x10 voxels, overlap 7x10x10 -> Dice 2*700/2000 = 0.7; box 2: 8x8x10, overlap 5x8x10 -> 0.625.
    assert rows["1"]["dice"] == pytest.approx(0.7, abs=1e-9)
    assert rows["2"]["dice"] == pytest.approx(2 * 5 * 8 * 10 / (2 * 8 * 8 * 10), abs=1e-9)
    assert rows["1"]["centroid_distance_mm"] == pytest.approx(6.0, abs=1e-6)
    assert rows["1"]["fixed_volume_ml"] == pytest.approx(1000 * 8 / 1000)
    assert result["summary"]["max_centroid_distance_mm"] == pytest.approx(6.0, abs=1e-6)
    identity = metrics.structure_metrics(fixed, moving, transforms.identity())
    assert all(r["dice"] == 1.0 and r["centroid_distance_mm"] == 0.0 for r in identity["structures"])


def test_structures_are_compared_inside_the_common_field_of_view_only():
    fixed = _label_image((30, 30, 30), (2.0, 2.0, 2.0), {1: ((5, 25), (5, 15), (5, 15))})
    # The moving scan covers x < 30 mm only (15 voxels of 2 mm): half of the fixed structure (x voxels 5..14).
    moving = _label_image((15, 30, 30), (2.0, 2.0, 2.0), {1: ((5, 15), (5, 15), (5, 15))})
    row = metrics.structure_metrics(fixed, moving, transforms.identity())["structures"][0]
    assert row["fraction_in_overlap"] == pytest.approx(0.5)
    assert row["dice"] == pytest.approx(1.0)
    assert row["centroid_distance_mm"] == pytest.approx(0.0, abs=1e-9)


def test_extent_probe_matches_voxel_edges_of_an_oblique_image():
    image = sitk.Image([7, 5, 3], sitk.sitkUInt8)
    image.SetSpacing((1.5, 2.0, 3.0))
    image.SetOrigin((10.0, -5.0, 2.0))
    angle = np.radians(30)
    image.SetDirection([np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1])
    from MultimodalPrealignLib.geometry.image_space import physical_corners

    probe = metrics._extent_probe(image)
    assert np.allclose(np.sort(physical_corners(probe), 0), np.sort(physical_corners(image), 0), atol=1e-9)


def test_structure_pairs_match_by_name_across_tasks():
    pairs = {name: (f, m) for name, f, m in metrics.structure_pairs("total", "total_mr")}
    total, total_mr = phantoms.class_ids("total"), phantoms.class_ids("total_mr")
    assert pairs["aorta"] == ([total["aorta"]], [total_mr["aorta"]])  # 52 vs 23
    assert sorted(pairs["lung_left"][0]) == sorted([total["lung_upper_lobe_left"], total["lung_lower_lobe_left"]])
    assert "body_trunc" not in pairs
    assert metrics.structure_pairs("total", "no_such_task") is None


@pytest.fixture(scope="module")
def phantom():
    return phantoms.make_pair(seed=5, rotation_deg=15, translation_mm=25, fixed_spacing=(4.0, 4.0, 4.0),
                              moving_spacing=(4.0, 4.0, 5.0))


def test_phantom_structures_agree_under_the_true_transform_and_move_by_a_known_shift(phantom):
    pairs = metrics.structure_pairs(phantom.fixed_task, phantom.moving_task)
    good = metrics.structure_metrics(phantom.fixed_labels, phantom.moving_labels, phantom.fixed_to_moving, pairs)
    assert good["summary"]["measured"] >= 15
    assert good["summary"]["median_centroid_distance_mm"] < 1.5
    assert good["summary"]["mean_dice"] > 0.85
    # Result 30 mm off along S in the fixed frame: whole structures far from the field of view's edge
    # must be 30 mm apart (independent value: the size of the shift).
    shift = transforms.compose(transforms.translation((0.0, 0.0, 30.0)), phantom.fixed_to_moving)
    bad = metrics.structure_metrics(phantom.fixed_labels, phantom.moving_labels, shift, pairs)
    inner = [r for r in bad["structures"] if r["dice"] is not None and r["fraction_in_overlap"] > 0.99
             and r["fixed_volume_ml"] > 100 and r["name"] not in ("vertebrae", "autochthon_left", "autochthon_right")]
    assert inner
    distances = [r["centroid_distance_mm"] for r in inner]
    assert np.median(distances) == pytest.approx(30.0, abs=3.0)


def test_tre_of_known_translation_and_rotation():
    rng = np.random.default_rng(0)
    fixed_points = rng.uniform(-50, 50, size=(6, 3))
    offset = np.array([3.0, -4.0, 12.0])
    pairs = landmarks.LandmarkPairs([f"L{i}" for i in range(6)], fixed_points, fixed_points + offset)
    exact = landmarks.target_registration_error(pairs, transforms.translation(offset))
    assert exact["max_tre_mm"] == pytest.approx(0.0, abs=1e-9)
    off = landmarks.target_registration_error(pairs, transforms.translation(offset + [0.0, 3.0, 4.0]))
    assert all(p["tre_mm"] == pytest.approx(5.0) for p in off["points"])
    # Rotation by 10 degrees about z through the origin: TRE_i = |R p_i - p_i| = 2 r_i sin(5 deg).
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(0.0, 0.0, np.radians(10.0))
    same = landmarks.LandmarkPairs(pairs.labels, fixed_points, fixed_points)
    result = landmarks.target_registration_error(same, rotation)
    expected = 2 * np.hypot(fixed_points[:, 0], fixed_points[:, 1]) * np.sin(np.radians(5.0))
    assert [p["tre_mm"] for p in result["points"]] == pytest.approx(expected, abs=1e-3)
    assert result["mean_tre_mm"] == pytest.approx(expected.mean(), abs=1e-3)


def test_markups_json_and_fcsv_and_csv_readers_convert_to_lps(tmp_path):
    ras = {"markups": [{"type": "Fiducial", "coordinateSystem": "RAS", "controlPoints": [
        {"label": "a", "position": [1.0, 2.0, 3.0]}, {"label": "b", "position": [-4.0, 5.0, 6.0]}]}]}
    (tmp_path / "f.mrk.json").write_text(json.dumps(ras))
    points = landmarks.read_points(tmp_path / "f.mrk.json")
    assert points.labels == ["a", "b"]
    assert np.allclose(points.points_lps, [[-1, -2, 3], [4, -5, 6]])
    (tmp_path / "old.fcsv").write_text("# Markups fiducial file version = 4.4\n# CoordinateSystem = 0\n"
                                       "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
                                       "vtkMRMLMarkupsFiducialNode_0,1,2,3,0,0,0,1,1,1,0,a,,\n"
                                       "vtkMRMLMarkupsFiducialNode_1,-4,5,6,0,0,0,1,1,1,0,b,,\n")
    assert np.allclose(landmarks.read_points(tmp_path / "old.fcsv").points_lps, [[-1, -2, 3], [4, -5, 6]])
    (tmp_path / "new.fcsv").write_text("# Markups fiducial file version = 5.0\n# CoordinateSystem = LPS\n"
                                       "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
                                       "1,-1,-2,3,0,0,0,1,1,1,0,a,,\n1,4,-5,6,0,0,0,1,1,1,0,b,,\n")
    moving = landmarks.read_points(tmp_path / "new.fcsv")
    pairs = landmarks.pair_point_lists(points, moving)
    assert np.allclose(pairs.fixed_lps, pairs.moving_lps)
    (tmp_path / "paired.csv").write_text("# CoordinateSystem = RAS\nlabel,fixed_x,fixed_y,fixed_z,moving_x,moving_y,"
                                         "moving_z\ntip,1,2,3,11,12,13\n")
    paired = landmarks.load_landmark_pairs(tmp_path / "paired.csv")
    assert np.allclose(paired.fixed_lps, [[-1, -2, 3]]) and np.allclose(paired.moving_lps, [[-11, -12, 13]])
    (tmp_path / "column.csv").write_text("label,x,y,z,coordinate_system\np,1,2,3,LPS\nq,1,2,3,RAS\n")
    assert np.allclose(landmarks.read_points(tmp_path / "column.csv").points_lps, [[1, 2, 3], [-1, -2, 3]])
    (tmp_path / "unstated.csv").write_text("label,x,y,z\np,1,2,3\n")
    with pytest.raises(InputError, match="coordinate system"):
        landmarks.read_points(tmp_path / "unstated.csv")
    out = tmp_path / "written.mrk.json"
    landmarks.write_markups_json(moving, out)
    assert np.allclose(landmarks.read_points(out).points_lps, moving.points_lps)


def _reference(size=24, spacing=2.0) -> sitk.Image:
    image = sitk.Image([size] * 3, sitk.sitkFloat32)
    image.SetSpacing([spacing] * 3)
    image.SetOrigin([-size * spacing / 2] * 3)
    return image


def test_jacobian_of_known_scaling_is_the_product_of_the_scales():
    scale = sitk.ScaleTransform(3, (1.2, 0.9, 1.1))
    stats = metrics.jacobian_statistics(scale, _reference(), spacing_mm=4.0)
    assert stats["min"] == pytest.approx(1.2 * 0.9 * 1.1, abs=1e-6)
    assert stats["max"] == pytest.approx(1.188, abs=1e-6)
    assert stats["folding_percent"] == 0.0


def test_jacobian_folding_of_a_constructed_field_matches_an_independent_count():
    # u_x(x) = A sin(2 pi x / L) with 2 pi A / L = 2:  det = 1 + 2 cos(2 pi x / L), folding where cos < -1/2.
    reference = _reference(size=40, spacing=1.0)
    length = 20.0
    amplitude = 2.0 * length / (2 * np.pi)
    z, y, x = np.indices(reference.GetSize()[::-1]).astype(float)
    px = reference.GetOrigin()[0] + x * 1.0
    field = np.zeros(x.shape + (3,))
    field[..., 0] = amplitude * np.sin(2 * np.pi * px / length)
    field_image = sitk.GetImageFromArray(field, isVector=True)
    field_image.CopyInformation(reference)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field_image, sitk.sitkVectorFloat64))
    det = sitk.GetArrayFromImage(metrics.jacobian_determinant(transform, reference))
    # Independent: numpy central differences of the mapped x coordinate.
    independent = 1.0 + np.gradient(field[..., 0], 1.0, axis=2)
    inner = (slice(1, -1),) * 3
    assert np.allclose(det[inner], independent[inner], atol=1e-6)
    stats = metrics.jacobian_statistics(transform, reference, spacing_mm=1.0)
    analytic = 1.0 + 2.0 * np.cos(2 * np.pi * px / length)
    assert stats["folding_percent"] == pytest.approx(100.0 * np.mean(analytic[inner] <= 0), abs=6.0)
    assert stats["folding_percent"] == pytest.approx(100.0 * np.mean(independent[inner] <= 0), abs=1e-3)
    assert stats["min"] < -0.8


def test_overlap_mask_marks_where_fixed_points_land_in_the_moving_image():
    fixed = _reference(size=20, spacing=2.0)  # -20..20 mm
    moving = _reference(size=10, spacing=2.0)  # -10..10 mm
    mask = sitk.GetArrayFromImage(metrics.overlap_mask(fixed, moving, transforms.identity(), spacing_mm=2.0))
    assert mask.sum() == 10 ** 3
