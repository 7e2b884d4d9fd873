"""Synthetic torso phantoms: exact known transforms, TotalSegmentator ids by name, determinism, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk

from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.geometry.image_space import inside_image
from MultimodalPrealignLib.geometry.transforms import transform_points
from MultimodalPrealignLib.synthetic import phantoms


def _centroid(labels: sitk.Image, task: str, name: str) -> np.ndarray | None:
    return phantoms.structure_centroid(labels, phantoms.class_ids(task)[name])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1))


@pytest.fixture(scope="module")
def rotated_pair():
    return phantoms.make_pair(seed=3, rotation_deg=30, translation_mm=80, flip=True,
                              fixed_spacing=(3.0, 3.0, 3.0), moving_spacing=(2.5, 2.5, 3.5))


def test_resource_maps_are_totalsegmentator_names():
    total = phantoms.class_ids("total")
    total_mr = phantoms.class_ids("total_mr")
    assert total["liver"] == 5 and total_mr["liver"] == 5
    assert total["aorta"] == 52 and total_mr["aorta"] == 23  # ids differ between tasks
    assert len(phantoms.structure_correspondence()["shared"]) == 46
    assert phantoms.name_in_task("lung_upper_lobe_left", "total_mr") == "lung_left"
    assert phantoms.name_in_task("vertebrae_L3", "total_mr") == "vertebrae"
    assert phantoms.name_in_task("vertebrae_L3", "total") == "vertebrae_L3"


def test_render_fast_enough():
    grid = phantoms.grid_for((400, 300, 500), (2.5, 2.5, 2.5), center=(0, 0, -10))
    assert grid["size"] == [160, 120, 200]
    phantoms.render("ct", grid, label_task="total")  # warm the caches
    start = time.perf_counter()
    image, labels = phantoms.render("mr", grid, label_task="total_mr", bias_field=0.3)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"render took {elapsed:.2f} s"
    assert image.GetSize() == (160, 120, 200) and labels.GetPixelID() == sitk.sitkUInt16


def test_labels_carry_task_ids_by_name():
    grid = phantoms.grid_for((340, 240, 540), (4.0, 4.0, 4.0), center=(0, 0, -10))
    _, ct_labels = phantoms.render("ct", grid, label_task="total", noise=0)
    _, mr_labels = phantoms.render("mr", grid, label_task="total_mr", noise=0)
    ct_ids = set(np.unique(sitk.GetArrayViewFromImage(ct_labels)).tolist()) - {0}
    mr_ids = set(np.unique(sitk.GetArrayViewFromImage(mr_labels)).tolist()) - {0}
    total, total_mr = phantoms.class_ids("total"), phantoms.class_ids("total_mr")
    for name in ("liver", "spleen", "kidney_left", "kidney_right", "aorta", "inferior_vena_cava",
                 "lung_upper_lobe_left", "lung_middle_lobe_right", "vertebrae_L1", "vertebrae_T10",
                 "urinary_bladder", "heart", "stomach", "pancreas", "gallbladder"):
        assert total[name] in ct_ids, name
    for name in ("liver", "aorta", "lung_left", "lung_right", "vertebrae", "heart", "kidney_left"):
        assert total_mr[name] in mr_ids, name
    assert max(mr_ids) <= max(phantoms.totalsegmentator_classes()["total_mr"])
    # the CT lobes of one lung are exactly the MR lung
    ct = sitk.GetArrayViewFromImage(ct_labels)
    mr = sitk.GetArrayViewFromImage(mr_labels)
    lobes = np.isin(ct, [total["lung_upper_lobe_left"], total["lung_lower_lobe_left"]])
    assert np.array_equal(lobes, mr == total_mr["lung_left"])


def test_contrasts_differ_between_ct_and_mr():
    grid = phantoms.grid_for((340, 240, 540), (4.0, 4.0, 4.0), center=(0, 0, -10))
    ct, ct_labels = phantoms.render("ct", grid, label_task="total", noise=0)
    mr, mr_labels = phantoms.render("mr", grid, label_task="total_mr", noise=0)
    ct_a, ct_l = sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(ct_labels)
    mr_a, mr_l = sitk.GetArrayViewFromImage(mr), sitk.GetArrayViewFromImage(mr_labels)
    total, total_mr = phantoms.class_ids("total"), phantoms.class_ids("total_mr")
    assert ct_a[ct_l == total["liver"]].mean() == pytest.approx(60)
    assert ct_a[ct_l == total["lung_lower_lobe_left"]].mean() < -800
    assert ct_a[ct_l == total["vertebrae_L2"]].mean() > 500
    assert ct_a.min() == -1000
    # MR: bone dark, lungs dark, liver brighter than muscle
    assert mr_a[mr_l == total_mr["vertebrae"]].mean() < mr_a[mr_l == total_mr["autochthon_left"]].mean()
    assert mr_a[mr_l == total_mr["lung_left"]].mean() < 50
    assert mr_a[mr_l == total_mr["liver"]].mean() > mr_a[mr_l == total_mr["autochthon_left"]].mean()


def test_known_transform_is_exact(rotated_pair):
    pair = rotated_pair
    assert transforms.rotation_angle_deg(transforms.to_matrix(pair.fixed_to_moving)) > 90  # flip included
    checked = 0
    for name in ("liver", "spleen", "kidney_left", "kidney_right", "heart", "stomach", "urinary_bladder"):
        fixed_c = _centroid(pair.fixed_labels, "total", name)
        moving_c = _centroid(pair.moving_labels, "total_mr", name)
        assert fixed_c is not None and moving_c is not None, name
        mapped = transform_points(pair.fixed_to_moving, fixed_c[None])[0]
        assert np.linalg.norm(mapped - moving_c) < 1.5, name  # under half a voxel in practice
        checked += 1
    assert checked == 7


def test_resampling_moving_through_true_transform_recovers_fixed_labels(rotated_pair):
    pair = rotated_pair
    warped = sitk.Resample(pair.moving_labels, pair.fixed_labels, pair.fixed_to_moving, sitk.sitkNearestNeighbor, 0)
    wrong = sitk.Resample(pair.moving_labels, pair.fixed_labels, transforms.identity(), sitk.sitkNearestNeighbor, 0)
    fixed = sitk.GetArrayViewFromImage(pair.fixed_labels)
    total, total_mr = phantoms.class_ids("total"), phantoms.class_ids("total_mr")
    for name in ("liver", "kidney_left", "spleen"):
        good = _dice(fixed == total[name], sitk.GetArrayViewFromImage(warped) == total_mr[name])
        bad = _dice(fixed == total[name], sitk.GetArrayViewFromImage(wrong) == total_mr[name])
        assert good > 0.9 and bad < 0.5, (name, good, bad)


def test_affine_pair_is_exact_too():
    pair = phantoms.make_pair(seed=5, rotation_deg=12, translation_mm=20, affine_scale=0.08,
                              fixed_spacing=(4.0, 4.0, 4.0), moving_spacing=(3.0, 3.0, 4.0), noise=0)
    det = np.linalg.det(transforms.to_matrix(pair.fixed_to_moving)[:3, :3])
    assert abs(det - 1) > 0.01
    for name in ("liver", "kidney_right", "heart"):
        mapped = transform_points(pair.fixed_to_moving, _centroid(pair.fixed_labels, "total", name)[None])[0]
        assert np.linalg.norm(mapped - _centroid(pair.moving_labels, "total_mr", name)) < 2.0, name


def test_same_seed_same_pair_and_different_seed_differs():
    kwargs = dict(rotation_deg=20, translation_mm=30, fixed_spacing=(5.0, 5.0, 5.0), moving_spacing=(5.0, 5.0, 5.0),
                  moving_fov="slab")
    a, b = phantoms.make_pair(seed=7, **kwargs), phantoms.make_pair(seed=7, **kwargs)
    c = phantoms.make_pair(seed=8, **kwargs)
    assert np.array_equal(sitk.GetArrayViewFromImage(a.moving), sitk.GetArrayViewFromImage(b.moving))
    assert np.array_equal(transforms.to_matrix(a.fixed_to_moving), transforms.to_matrix(b.fixed_to_moving))
    assert not np.allclose(transforms.to_matrix(a.fixed_to_moving), transforms.to_matrix(c.fixed_to_moving))


def test_slab_cuts_organs_and_is_thin():
    pair = phantoms.make_pair(seed=2, rotation_deg=0, translation_mm=0, moving_fov="slab", slab_fraction=0.3,
                              slab_center_z_mm=0.0, fixed_spacing=(4.0, 4.0, 4.0), moving_spacing=(3.0, 3.0, 5.0))
    extent_z = pair.moving.GetSize()[2] * pair.moving.GetSpacing()[2]
    assert extent_z == pytest.approx(0.3 * 520, abs=6)
    touching = pair.description["moving_structures_touching_border"]
    assert "liver" in touching and "vertebrae" in touching
    assert "urinary_bladder" not in pair.description["moving_structures_present"]
    assert pair.description["fixed_structures_touching_border"] == []


def test_random_rigid_respects_bounds():
    rng = np.random.default_rng(0)
    for _ in range(20):
        t = phantoms.random_rigid(rng, 40.0, 150.0, center=(0, 0, -10))
        m = transforms.to_matrix(t)
        assert transforms.rotation_angle_deg(m) <= 40.0 + 1e-6
        assert np.linalg.norm(np.asarray(t.GetTranslation())) <= 150.0 + 1e-6
        assert np.allclose(t.GetCenter(), (0, 0, -10))


def test_body_points_lie_in_the_overlap(rotated_pair):
    points = phantoms.body_points(rotated_pair, n=500, seed=1)
    assert points.shape == (500, 3)
    assert np.all(phantoms.inside_body(points))
    assert np.all(inside_image(rotated_pair.fixed, points))
    assert np.all(inside_image(rotated_pair.moving, transform_points(rotated_pair.fixed_to_moving, points)))
    mask = sitk.Cast(rotated_pair.fixed_labels > 0, sitk.sitkUInt8)
    from_mask = phantoms.body_points(mask, n=300, seed=1)
    assert from_mask.shape == (300, 3) and np.all(inside_image(rotated_pair.fixed, from_mask))


def test_supersampling_gives_partial_volume_and_ct_fov_padding():
    grid = phantoms.grid_for((340, 240, 60), (6.0, 6.0, 6.0), center=(0, 0, 0))
    sharp, _ = phantoms.render("ct", grid, noise=0)
    smooth, labels = phantoms.render("ct", grid, noise=0, supersample=3, label_task="total",
                                     ct_fov_radius_mm=150)
    values_sharp = set(np.unique(sitk.GetArrayViewFromImage(sharp)).tolist())
    values_smooth = set(np.unique(sitk.GetArrayViewFromImage(smooth)).tolist())
    assert len(values_smooth) > 3 * len(values_sharp)
    assert np.min(sitk.GetArrayViewFromImage(smooth)) == phantoms.CT_PADDING_HU


def test_grid_for_centres_the_grid():
    grid = phantoms.grid_for((100, 50, 30), (2.0, 2.0, 3.0), center=(10, -5, 7))
    image = sitk.Image(grid["size"], sitk.sitkUInt8)
    image.SetSpacing(grid["spacing"])
    image.SetOrigin(grid["origin"])
    image.SetDirection(grid["direction"])
    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in grid["size"]])
    assert np.allclose(centre, (10, -5, 7))
