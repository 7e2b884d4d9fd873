"""Tests of the itk engine's affine guard and its object-size scaling (small images, exact transforms)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from MultimodalPrealignLib.engines import guards, itk_engine, itk_preset


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
    from MultimodalPrealignLib.geometry import transforms
    from MultimodalPrealignLib.synthetic import phantoms

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
