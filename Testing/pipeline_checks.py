"""The recovery checks of the synthetic pipeline tests, one body for both engines: test_pipeline_synthetic.py runs
them with the itk engine, test_pipeline_elastix.py with elastix (two files, so the two test processes share them)."""

from __future__ import annotations

import numpy as np

from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.pipeline import PipelineOptions, run_pipeline
from MultimodalPrealignLib.synthetic import phantoms

SPACING = dict(fixed_spacing=(3.0, 3.0, 3.0), moving_spacing=(3.0, 3.0, 4.0))


def make_pair(seed, **kwargs):
    return phantoms.make_pair(seed=seed, labels=False, **SPACING, **kwargs)


def check_rigid_offsets_up_to_15mm_15deg_are_recovered(engine: str, seed: int) -> None:
    pair = make_pair(seed, rotation_deg=15.0, translation_mm=15.0)
    options = PipelineOptions.create(prealign="header", engine=engine, stages=("rigid",))
    result = run_pipeline(pair.fixed, pair.moving, options)
    error = transforms.mean_point_error(result.transform, pair.fixed_to_moving, phantoms.body_points(pair, n=1000))
    assert error < 1.0, f"{engine} seed {seed}: mean point error {error:.2f} mm"
    # the initial error was large, so the test can fail
    assert transforms.mean_point_error(transforms.identity(), pair.fixed_to_moving, phantoms.body_points(pair)) > 15


def check_affine_transform_is_recovered(engine: str) -> None:
    pair = make_pair(3, rotation_deg=10.0, translation_mm=12.0, affine_scale=0.06)
    result = run_pipeline(pair.fixed, pair.moving, PipelineOptions.create(prealign="header", engine=engine))
    points = phantoms.body_points(pair, n=1000)
    error = transforms.mean_point_error(result.transform, pair.fixed_to_moving, points)
    assert error < 1.0, f"{engine}: mean point error {error:.2f} mm"
    m = transforms.to_matrix(result.transform)
    assert abs(np.linalg.det(m[:3, :3]) - np.linalg.det(transforms.to_matrix(pair.fixed_to_moving)[:3, :3])) < 0.02
    # both engines' affine stages pass the same guard, and a real 6% scale clears its minimum gain
    affine = [s for s in result.report["registration"]["stages"] if s["stage"] == "affine"][0]
    assert affine["guard"]["accepted"] and affine["guard"]["mi_after"] - affine["guard"]["mi_before"] > 0.05
