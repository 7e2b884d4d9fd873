"""The pipeline recovers known transforms on synthetic CT/MR phantoms with the elastix engine (the same checks as
test_pipeline_synthetic.py's itk runs, from pipeline_checks.py), and a FAIL of the itk engine falls back to elastix.
A file of its own: the two halves of the synthetic pipeline tests run in the two test processes at once."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from pipeline_checks import (
    check_affine_transform_is_recovered,
    check_rigid_offsets_up_to_15mm_15deg_are_recovered,
    make_pair,
)

from MultimodalPrealignLib.pipeline import PipelineOptions


@pytest.mark.parametrize("seed", [0, 1])
def test_rigid_offsets_up_to_15mm_15deg_are_recovered(seed):
    check_rigid_offsets_up_to_15mm_15deg_are_recovered("elastix", seed)


def test_affine_transform_is_recovered():
    check_affine_transform_is_recovered("elastix")


def test_fail_verdict_triggers_fallback_to_the_other_engine_and_is_reported(tmp_path):
    from MultimodalPrealignLib.pipeline import register_files, resample_moving

    pair = make_pair(6, rotation_deg=0.0, translation_mm=0.0, flip=True)
    sitk.WriteImage(pair.fixed, str(tmp_path / "fixed.nrrd"))
    sitk.WriteImage(pair.moving, str(tmp_path / "moving.nrrd"))
    options = PipelineOptions.create(prealign="geometry", stages=("rigid",), iterations=50, no_report=True)
    result = register_files(tmp_path / "fixed.nrrd", tmp_path / "moving.nrrd", tmp_path / "out", options)
    # the image resampled ahead for the failed first attempt is not the one written: the kept transform's is
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "moving_resampled.nrrd")))
    kept = sitk.ReadTransform(str(tmp_path / "out" / "transform.h5"))
    np.testing.assert_array_equal(written, sitk.GetArrayFromImage(resample_moving(pair.fixed, pair.moving, kept)))
    fallback = result.report["fallback"]
    assert fallback["used"] is True
    assert [a["engine"] for a in fallback["attempts"]][:2] == ["itk", "elastix"]
    assert fallback["attempts"][0]["verdict"] == "FAIL"
    assert any("fallback" in w for w in result.warnings) or fallback["chosen"] == 0
