"""Geometry and transform conventions, checked against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from MultimodalPrealignLib.geometry import image_space, transforms


def _image(size=(10, 20, 30), spacing=(1.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0), direction=None):
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(np.asarray(direction, float).ravel().tolist())
    return image


def test_bounding_box_uses_voxel_edges_and_direction():
    flipped = np.diag([-1.0, -1.0, 1.0])  # e.g. a NIfTI-style RAS-stored grid seen in LPS
    image = _image(origin=(100.0, 50.0, -10.0), direction=flipped)
    box = image_space.bounding_box(image)
    # x runs from 100 + 0.5 down to 100 - 9.5; y from 50 + 1 down to 50 - 39; z from -11.5 to 78.5
    assert box.lower == pytest.approx((90.5, 11.0, -11.5))
    assert box.upper == pytest.approx((100.5, 51.0, 78.5))
    assert image_space.extent_mm(image) == pytest.approx([10, 40, 90])


def test_spacing_along_patient_axes_follows_permuted_direction():
    permuted = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float)  # grid k axis points along L
    image = _image(spacing=(0.5, 0.7, 3.0), direction=permuted)
    assert image_space.spacing_along_patient_axes(image) == pytest.approx([3.0, 0.5, 0.7])


def test_overlap_fractions_under_translation():
    fixed = _image(size=(10, 10, 10), spacing=(1, 1, 1))
    moving = _image(size=(10, 10, 10), spacing=(1, 1, 1))
    shift = transforms.translation((5.0, 0.0, 0.0))  # fixed x maps to moving x+5: half overlaps
    overlap = image_space.overlap_fractions(fixed, moving, shift, per_axis=20)
    assert overlap["fixed"] == pytest.approx(0.5, abs=0.01)
    assert overlap["moving"] == pytest.approx(0.5, abs=0.01)
    far = transforms.translation((50.0, 0.0, 0.0))
    assert image_space.overlap_fractions(fixed, moving, far)["fixed"] == 0.0


def test_compose_applies_in_the_given_order():
    rotation = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.0, 0.0, np.pi / 2, (0.0, 0.0, 0.0))
    shift = transforms.translation((10.0, 0.0, 0.0))
    p = np.array([[2.0, 2.0, 3.0]])
    # rotate about (1,2,3) by 90 deg around z: (2,2,3) -> (1,3,3); then shift -> (11,3,3)
    assert transforms.transform_points(transforms.compose(rotation, shift), p)[0] == pytest.approx([11, 3, 3])
    # shift first: (12,2,3) -> rotated -> (1,13,3)
    assert transforms.transform_points(transforms.compose(shift, rotation), p)[0] == pytest.approx([1, 13, 3])


def test_compose_with_nonlinear_keeps_order():
    field = sitk.Image([5, 5, 5], sitk.sitkVectorFloat64, 3)
    field.SetOrigin((-10, -10, -10))
    field.SetSpacing((5, 5, 5))
    arr = np.zeros((5, 5, 5, 3))
    arr[..., 1] = 2.0  # +2 mm along y everywhere
    field = sitk.GetImageFromArray(arr, isVector=True)
    field.SetOrigin((-10, -10, -10))
    field.SetSpacing((5, 5, 5))
    displacement = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    shift = transforms.translation((1.0, 0.0, 0.0))
    composed = transforms.compose(displacement, shift)
    assert not transforms.is_linear(composed)
    assert composed.TransformPoint((0.0, 0.0, 0.0)) == pytest.approx((1.0, 2.0, 0.0))


def test_matrix_round_trip_and_rigid_projection():
    euler = sitk.Euler3DTransform((5.0, -3.0, 8.0), 0.2, -0.1, 0.4, (7.0, 8.0, -9.0))
    m = transforms.to_matrix(euler)
    points = np.random.default_rng(0).uniform(-50, 50, (20, 3))
    assert transforms.mean_point_error(euler, transforms.affine_from_matrix(m, (1, 2, 3)), points) < 1e-9
    assert transforms.mean_point_error(euler, transforms.rigid_from_matrix(m, (4, 4, 4)), points) < 1e-9
    assert transforms.rotation_angle_deg(m) == pytest.approx(np.degrees(np.arccos((np.trace(m[:3, :3]) - 1) / 2)))


def test_slicer_ras_matrix_moves_moving_points_onto_fixed():
    fixed_to_moving = transforms.to_matrix(sitk.Euler3DTransform((0, 0, 0), 0.1, 0.2, 0.3, (10.0, -20.0, 5.0)))
    to_parent_ras = transforms.fixed_to_moving_lps_to_slicer_to_parent_ras(fixed_to_moving)
    fixed_lps = np.array([12.0, -7.0, 30.0, 1.0])
    moving_lps = fixed_to_moving @ fixed_lps
    moving_ras = transforms.LPS_TO_RAS @ moving_lps
    # Slicer moves the moving volume's RAS point onto the fixed RAS point
    assert to_parent_ras @ moving_ras == pytest.approx(transforms.LPS_TO_RAS @ fixed_lps)
    back = transforms.slicer_to_parent_ras_to_fixed_to_moving_lps(to_parent_ras)
    assert back == pytest.approx(fixed_to_moving)


def test_transform_file_round_trip(tmp_path):
    affine = transforms.affine_from_matrix(np.array([[1.1, 0.1, 0, 5], [0, 0.9, 0.05, -3], [0, 0, 1.0, 2],
                                                     [0, 0, 0, 1]]))
    transforms.write_transform(affine, tmp_path / "t.h5")
    back = transforms.read_transform(tmp_path / "t.h5")
    points = np.random.default_rng(1).uniform(-100, 100, (10, 3))
    assert transforms.mean_point_error(affine, back, points) < 1e-9
