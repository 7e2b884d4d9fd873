"""Tests of the itk engine: where its metric samples (the fixed object), how it runs (level by level), the crop
along each image's own axes, its affine guard and its object-size scaling (small images, exact transforms)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from MultimodalPrealignLib import crop
from MultimodalPrealignLib.engines import RegistrationSettings, guards, itk_engine, itk_preset
from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.geometry.resample import grid_for_box
from MultimodalPrealignLib.synthetic import phantoms


def _noise(seed: int) -> sitk.Image:
    image = sitk.GetImageFromArray(np.random.default_rng(seed).normal(size=(40, 40, 40)).astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    return image


def _scaling(factors) -> sitk.Transform:
    t = sitk.AffineTransform(3)
    t.SetMatrix(np.diag(factors).ravel().tolist())
    t.SetCenter((39.0, 39.0, 39.0))
    return t


def test_guard_rejects_an_affine_stage_without_a_real_gain():
    # two independent noise images: no transform changes the (near-zero) mutual information, so neither a
    # plausible nor an implausible scaling earns its six extra parameters
    fixed, moving = _noise(1), _noise(2)
    preset = itk_preset()
    plausible = guards.affine_guard(fixed, moving, sitk.Transform(3, sitk.sitkIdentity), _scaling([1.02, 1.0, 0.99]),
                                        None, preset)
    implausible = guards.affine_guard(fixed, moving, sitk.Transform(3, sitk.sitkIdentity),
                                          _scaling([1.09, 0.94, 0.87]), None, preset)
    assert plausible["scales_plausible"] and not plausible["accepted"]
    assert plausible["min_gain"] == preset["affine_guard_min_gain"]
    assert abs(plausible["mi_after"] - plausible["mi_before"]) < preset["affine_guard_min_gain"]
    assert not implausible["scales_plausible"] and not implausible["accepted"]
    assert abs(implausible["mi_after"] - implausible["mi_before"]) < preset["affine_guard_min_gain_outside_range"]


def test_guard_accepts_a_plausible_scale_with_a_real_gain():
    # the moving image IS the fixed one scaled by 0.97 along x: the true scaling raises MI clearly
    fixed = sitk.SmoothingRecursiveGaussian(_noise(4), 3.0)
    true = _scaling([0.97, 1.0, 1.0])
    moving = sitk.Resample(fixed, fixed, true.GetInverse(), sitk.sitkLinear, 0.0)
    check = guards.affine_guard(fixed, moving, sitk.Transform(3, sitk.sitkIdentity), true, None, itk_preset())
    assert check["scales_plausible"] and check["accepted"]
    assert check["mi_after"] - check["mi_before"] > itk_preset()["affine_guard_min_gain"]


def test_guard_accepts_implausible_scale_with_a_clear_gain():
    # the moving image IS the fixed one scaled by 0.9: the scaling transform raises MI a lot
    fixed = sitk.SmoothingRecursiveGaussian(_noise(3), 3.0)
    true = _scaling([0.9, 1.0, 1.0])
    moving = sitk.Resample(fixed, fixed, true.GetInverse(), sitk.sitkLinear, 0.0)
    check = guards.affine_guard(fixed, moving, sitk.Transform(3, sitk.sitkIdentity), true, None, itk_preset())
    assert not check["scales_plausible"] and check["accepted"]
    assert check["mi_after"] - check["mi_before"] > itk_preset()["affine_guard_min_gain_outside_range"]


def test_lengths_shrink_for_small_objects_only():
    preset = itk_preset()
    human = itk_engine.scaled_preset(preset, 1.0)
    mouse = itk_engine.scaled_preset(preset, 0.2)
    assert human["maximum_step_length"] == preset["maximum_step_length"]
    assert mouse["maximum_step_length"] == preset["maximum_step_length"] * 0.2
    assert mouse["coarsest_level_spacing_mm"] == preset["coarsest_level_spacing_mm"] * 0.2
    assert mouse["minimum_step_length"] == preset["minimum_step_length"]


def test_registration_guard_keeps_a_better_prealignment():
    pair = phantoms.make_pair(seed=2, labels=False, rotation_deg=8.0, translation_mm=10.0,
                              fixed_spacing=(3.0, 3.0, 3.0), moving_spacing=(3.0, 3.0, 4.0))
    truth = pair.fixed_to_moving
    worse = transforms.compose(sitk.TranslationTransform(3, (6.0, 0.0, 0.0)), truth)  # 6 mm off
    fixed = sitk.Cast(pair.fixed, sitk.sitkFloat32)
    moving = sitk.Cast(pair.moving, sitk.sitkFloat32)
    # a "registration" that moved a correct pre-alignment 6 mm away is rejected ...
    rejected = guards.registration_guard(fixed, moving, truth, worse, None)
    assert not rejected["accepted"] and rejected["mi_registered"] < rejected["mi_prealigned"]
    # ... and one that fixed a 6 mm pre-alignment error is accepted
    accepted = guards.registration_guard(fixed, moving, worse, truth, None)
    assert accepted["accepted"] and accepted["mi_registered"] > accepted["mi_prealigned"]


def _ct_with_table() -> sitk.Image:
    """CT-like 2 mm image: padding (-2048) outside a reconstruction circle, air, a body (40 HU) with a lung (-850)
    inside it and a plastic table (0 HU) below it, separated from the body by air."""
    z, y, x = np.mgrid[0:40, 0:64, 0:64]
    array = np.full(z.shape, -1000.0, np.float32)
    body = ((x - 32) / 20.0) ** 2 + ((y - 28) / 14.0) ** 2 <= 1.0
    array[body] = 40.0
    array[body & (((x - 24) / 6.0) ** 2 + ((y - 28) / 5.0) ** 2 <= 1.0) & (z > 8) & (z < 32)] = -850.0
    array[(y >= 46) & (y <= 48) & (x > 8) & (x < 56)] = 0.0
    array[(x - 32) ** 2 + (y - 32) ** 2 > 31**2] = -2048.0
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 2.0, 2.0))
    return image, body


def test_object_mask_is_the_body_not_air_padding_or_table():
    image, body = _ct_with_table()
    valid = crop.validity_mask(image, image)
    mask = sitk.GetArrayFromImage(crop.object_mask(image, valid)) > 0
    array = sitk.GetArrayFromImage(image)
    assert not mask[array <= -2048].any() and not mask[array == -1000.0].any()  # padding, air
    assert not mask[:, 46:49, 10:55].any()  # the table (a CT-only structure) is not the object
    eroded = sitk.BinaryErode(sitk.GetImageFromArray(body.astype(np.uint8)), [1] * 3)
    inner = body & (sitk.GetArrayFromImage(eroded) > 0)
    lung = array == -850.0
    assert mask[inner & ~lung].all() and not mask[lung].any()  # the body's tissue, the CT's air (lung) kept out
    # an MR-like image (no Hounsfield values): above the lowest Otsu class, holes filled
    mr = sitk.GetImageFromArray(np.where(body, 300.0, 5.0).astype(np.float32) + np.where(array == -850.0, -250.0, 0.0))
    mr_mask = sitk.GetArrayFromImage(crop.object_mask(mr)) > 0
    assert mr_mask[inner].all() and not mr_mask[~body].any()


def test_crop_follows_an_oblique_image_along_its_own_axes():
    pair = phantoms.make_pair(seed=3, labels=False, rotation_deg=35.0, translation_mm=20.0, moving_fov="slab",
                              slab_fraction=0.4, fixed_spacing=(4.0, 4.0, 4.0), moving_spacing=(4.0, 4.0, 4.0))
    moving = sitk.Image(pair.moving)  # its header turned 35 degrees: the same voxels, an oblique grid
    turn = phantoms.rotation_about_axis([1.0, 1.0, 0.0], 35.0)
    moving.SetDirection((turn @ np.asarray(pair.moving.GetDirection()).reshape(3, 3)).ravel().tolist())
    true = transforms.compose(pair.fixed_to_moving, transforms.affine_from_matrix(
        np.block([[turn, np.zeros((3, 1))], [np.zeros((1, 3)), np.ones((1, 1))]]) @ np.block(
            [[np.eye(3), -np.asarray(pair.moving.GetOrigin())[:, None]], [np.zeros((1, 3)), np.ones((1, 1))]])))
    true = transforms.compose(true, sitk.TranslationTransform(3, pair.moving.GetOrigin()))
    plan = crop.plan_crop(pair.fixed, moving, true, margin_mm=0.0, max_voxels=10**8)
    # the moving cut is the whole slab along its own axes, not the grid around the axis-aligned box of the turned
    # slab (a box of a box: 2-3 times the voxels, which the pyramid filters and the crop then pay for)
    size = np.asarray(plan.moving_grid["size"])
    assert np.all(size <= np.asarray(moving.GetSize()) + 1) and np.all(size >= np.asarray(moving.GetSize()) - 1)
    boxed = grid_for_box(plan.moving_box, plan.working_spacing_mm, np.asarray(moving.GetDirection()).reshape(3, 3))
    assert np.prod(boxed["size"]) > 2 * np.prod(size)
    _, moving_work = crop.apply_crop(pair.fixed, moving, plan)
    assert moving_work.GetDirection() == moving.GetDirection()
    assert np.allclose(moving_work.GetSpacing(), plan.working_spacing_mm)


def test_engine_samples_the_object_level_by_level_and_recovers_the_truth():
    pair = phantoms.make_pair(seed=2, labels=False, rotation_deg=8.0, translation_mm=10.0, supersample=2,
                              fixed_spacing=(3.0, 3.0, 3.0), moving_spacing=(3.0, 3.0, 4.0))
    start = transforms.compose(sitk.TranslationTransform(3, (4.0, -3.0, 2.0)), pair.fixed_to_moving)  # 5.4 mm off
    plan = crop.plan_crop(pair.fixed, pair.moving, start)
    fixed, moving = crop.apply_crop(pair.fixed, pair.moving, plan)
    fixed_mask, moving_mask = crop.validity_mask(fixed, pair.fixed), crop.validity_mask(moving, pair.moving)
    result = itk_engine.register_itk(fixed, moving, start, RegistrationSettings(stages=("rigid",)),
                                     fixed_mask=fixed_mask, moving_mask=moving_mask)
    points = phantoms.body_points(pair, 1500, seed=1)
    assert transforms.mean_point_error(result.transform, pair.fixed_to_moving, points) < 1.0
    preset = itk_preset()
    used, stage = result.settings_used, result.stages[0]
    assert used["metric_mask"] == "object" and used["level_step_factor"] == preset["level_step_factor"]
    # one optimizer run per pyramid level; at least min_samples_per_level samples inside the object at each
    assert len(stage["iterations_per_level"]) == len(stage["shrink_factors"]) >= 2
    inside = np.count_nonzero(sitk.GetArrayViewFromImage(guards.metric_mask(fixed, fixed_mask)))
    for share, factor in zip(stage["sampling_percentage_per_level"], stage["shrink_factors"]):
        assert share == 1.0 or share * inside / factor**3 >= 0.99 * preset["min_samples_per_level"]
