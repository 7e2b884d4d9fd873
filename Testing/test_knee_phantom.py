"""The synthetic knee (synthetic/knee.py): one exact transform per bone, distinct when the flexion differs."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.io import labels as io_labels
from MultimodalPrealignLib.synthetic import knee


@pytest.fixture(scope="module")
def pair():
    """1 mm microCT-like knee joint vs 3 x 2 x 2 mm MR-like leg; 12 degrees more flexion in the MR, moved header."""
    return knee.make_knee_pair(seed=4, fixed_spacing_mm=1.0, fixed_size=56, moving_spacing=(3.0, 2.0, 2.0),
                               flexion_fixed_deg=5.0, flexion_difference_deg=12.0, placement_rotation_deg=20.0,
                               placement_translation_mm=30.0, flip=True, moving_supersample=(2, 1, 1))


def test_images_are_int16_with_named_bone_labels(pair):
    assert pair.fixed.GetPixelID() == sitk.sitkInt16 and pair.moving.GetPixelID() == sitk.sitkInt16
    assert io_labels.read_segmentation_names(pair.fixed_labels) == {1: "femur", 2: "tibia", 3: "fibula",
                                                                    4: "patella"}
    present = set(np.unique(sitk.GetArrayViewFromImage(pair.fixed_labels)).tolist())
    assert {1, 2, 4} <= present  # the joint field of view shows femur, tibia and patella
    ct = sitk.GetArrayViewFromImage(pair.fixed)
    bone = sitk.GetArrayViewFromImage(pair.fixed_labels) > 0
    assert ct[bone].mean() > ct[~bone].mean() + 300  # bone bright in the microCT


def test_each_bone_has_its_own_exact_transform(pair):
    """Moving labels warped through a bone's truth land on that bone in the fixed labels (up to voxelisation), and
    the bones' truths differ by about the flexion difference."""
    for bone, value in (("femur", 1), ("tibia", 2), ("patella", 4)):
        warped = sitk.Resample(pair.moving_labels, pair.fixed_labels, pair.truths[bone], sitk.sitkNearestNeighbor, 0)
        fixed = sitk.GetArrayViewFromImage(pair.fixed_labels) == value
        moved = sitk.GetArrayViewFromImage(warped) == value
        dice = 2 * np.count_nonzero(fixed & moved) / (fixed.sum() + moved.sum())
        assert dice > 0.8, (bone, dice)
    relative = np.linalg.inv(transforms.to_matrix(pair.truths["femur"])) @ transforms.to_matrix(pair.truths["tibia"])
    assert abs(transforms.rotation_angle_deg(relative) - 12.0) < 2.5  # flexion plus the screw-home rotation
    patella = np.linalg.inv(transforms.to_matrix(pair.truths["femur"])) @ transforms.to_matrix(pair.truths["patella"])
    assert 5.0 < transforms.rotation_angle_deg(patella) < 11.0  # the patella turns less than the tibia


def test_bone_points_lie_in_both_images_and_generation_is_deterministic(pair):
    points = knee.bone_points(pair, "tibia", 300, seed=1)
    assert len(points) == 300
    truth = transforms.to_matrix(pair.truths["tibia"])
    from MultimodalPrealignLib.geometry.image_space import inside_image

    assert inside_image(pair.fixed, points).all()
    assert inside_image(pair.moving, transforms.apply_matrix(truth, points)).all()
    grid = knee.grid_centred([20, 20, 20], [1.0] * 3)
    a, _ = knee.render_knee("mr", grid, None, 10.0, anatomy_seed=3, noise_seed=1, bias_field=0.3, labels=False)
    b, _ = knee.render_knee("mr", grid, None, 10.0, anatomy_seed=3, noise_seed=1, bias_field=0.3, labels=False)
    assert np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))
