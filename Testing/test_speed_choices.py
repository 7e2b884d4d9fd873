"""The speed choices of issue 19, for correctness (small synthetic images, no timing): the affine stage's pre-check,
the written pixel type and encoding of moving_resampled.nrrd, and the search's budget counted as work (the same
transform however busy the machine is)."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import SimpleITK as sitk

from MultimodalPrealignLib import crop, prealign
from MultimodalPrealignLib.engines import RegistrationSettings, guards, itk_engine, itk_preset
from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.pipeline import outputs
from MultimodalPrealignLib.prealign import search
from MultimodalPrealignLib.synthetic import phantoms


def _working_pair(affine_scale: float):
    """Working grids (crop.apply_crop) and validity masks of a 4 mm CT/MR-like pair, and its truth (fixed->moving)."""
    pair = phantoms.make_pair(seed=2, labels=False, rotation_deg=8.0, translation_mm=10.0, affine_scale=affine_scale,
                              fixed_spacing=(4.0, 4.0, 4.0), moving_spacing=(4.0, 4.0, 5.0))
    plan = crop.plan_crop(pair.fixed, pair.moving, pair.fixed_to_moving)
    fixed, moving = crop.apply_crop(pair.fixed, pair.moving, plan)
    return pair, fixed, moving, crop.validity_mask(fixed, pair.fixed), crop.validity_mask(moving, pair.moving)


def _rigid_part(matrix: np.ndarray) -> sitk.Transform:
    """The nearest rigid transform (polar decomposition) of a 4x4 fixed->moving matrix."""
    u, _, vt = np.linalg.svd(matrix[:3, :3])
    rigid = np.eye(4)
    rigid[:3, :3] = u @ vt
    rigid[:3, 3] = matrix[:3, 3]
    return transforms.affine_from_matrix(rigid)


def test_affine_stage_is_not_run_on_a_rigid_pair():
    pair, fixed, moving, fixed_mask, moving_mask = _working_pair(affine_scale=0.0)
    check = guards.affine_can_help(fixed, moving, pair.fixed_to_moving, guards.metric_mask(fixed, fixed_mask),
                                   itk_preset())
    assert not check["worth_running"] and check["best_gain"] < itk_preset()["affine_precheck_min_gain"]
    assert len(check["gains"]) == 6  # -/+ a scale along each axis of the fixed grid
    result = itk_engine.register_itk(fixed, moving, pair.fixed_to_moving, RegistrationSettings(),
                                     fixed_mask=fixed_mask, moving_mask=moving_mask)
    rigid, affine = result.stages
    assert rigid["stage"] == "rigid" and "skipped" not in rigid
    assert affine["stage"] == "affine" and affine["skipped"] and affine["iterations"] == 0
    assert affine["precheck"] == {**affine["precheck"], "worth_running": False}
    assert abs(np.linalg.det(transforms.to_matrix(result.transform)[:3, :3]) - 1.0) < 1e-9  # the rigid result


def test_affine_stage_runs_when_a_scale_raises_the_dense_mi():
    pair, fixed, moving, fixed_mask, _ = _working_pair(affine_scale=0.06)
    start = _rigid_part(transforms.to_matrix(pair.fixed_to_moving))  # the truth without its scales and shears
    check = guards.affine_can_help(fixed, moving, start, guards.metric_mask(fixed, fixed_mask), itk_preset())
    assert check["worth_running"] and check["best_gain"] >= itk_preset()["affine_precheck_min_gain"]


def test_precheck_can_be_switched_off(monkeypatch):
    pair, fixed, moving, fixed_mask, moving_mask = _working_pair(affine_scale=0.0)
    monkeypatch.setattr(itk_engine, "itk_preset", lambda: {**itk_preset(), "affine_precheck": False})
    result = itk_engine.register_itk(fixed, moving, pair.fixed_to_moving, RegistrationSettings(iterations=5),
                                     fixed_mask=fixed_mask, moving_mask=moving_mask)
    affine = result.stages[1]
    assert "skipped" not in affine and "precheck" not in affine and affine["iterations"] > 0 and "guard" in affine


@pytest.mark.parametrize("pixel_id", [sitk.sitkInt16, sitk.sitkFloat32])
def test_resampled_moving_keeps_its_pixel_type_uncompressed(tmp_path, pixel_id):
    pair = phantoms.make_pair(seed=1, labels=False, fixed_spacing=(6.0, 6.0, 6.0), moving_spacing=(6.0, 6.0, 8.0))
    moving = sitk.Cast(pair.moving, pixel_id)
    path = tmp_path / "moving_resampled.nrrd"
    seconds = outputs.write_resampled(pair.fixed, moving, pair.fixed_to_moving, path)
    assert seconds >= 0.0
    written = sitk.ReadImage(str(path))
    assert written.GetPixelID() == pixel_id and written.GetSize() == pair.fixed.GetSize()
    assert written.GetOrigin() == pair.fixed.GetOrigin() and written.GetSpacing() == pair.fixed.GetSpacing()
    expected = outputs.resample_moving(pair.fixed, moving, pair.fixed_to_moving)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(expected))
    header = path.read_bytes()[:2000].split(b"\n\n")[0].decode()
    assert "encoding: raw" in header  # outputs.RESAMPLED_COMPRESSION = 0


def test_resampled_moving_can_be_compressed(tmp_path):
    pair = phantoms.make_pair(seed=1, labels=False, fixed_spacing=(6.0, 6.0, 6.0), moving_spacing=(6.0, 6.0, 8.0))
    path = tmp_path / "moving_resampled.nrrd"
    outputs.write_resampled(pair.fixed, pair.moving, pair.fixed_to_moving, path, compression=1)
    assert "encoding: gzip" in path.read_bytes()[:2000].split(b"\n\n")[0].decode()


def test_resampled_moving_made_ahead_is_used_only_for_the_transform_it_was_made_for(tmp_path):
    pair = phantoms.make_pair(seed=1, labels=False, fixed_spacing=(6.0, 6.0, 6.0), moving_spacing=(6.0, 6.0, 8.0))
    first = pair.fixed_to_moving
    other = transforms.affine_from_matrix(transforms.to_matrix(first) @ np.array(
        [[1, 0, 0, 12.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    ahead = outputs.ResampleAhead(pair.fixed, pair.moving)
    try:
        ahead.start(first)
        assert ahead.take(other) is None  # made for another transform
        made = ahead.take(first)
        expected = outputs.resample_moving(pair.fixed, pair.moving, first)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(made[0]), sitk.GetArrayFromImage(expected))
        assert made[1] > 0.0 and ahead.take(first) is None  # handed over once
    finally:
        ahead.close()
    ahead = outputs.ResampleAhead(pair.fixed, pair.moving)
    try:
        ahead.start(first)
        ahead.start(other)  # a fallback attempt: the first image is dropped; nothing is made for the fallback
        assert ahead.take(first) is None and ahead.take(other) is None
        for kept, name in ((other, "other.nrrd"), (first, "first.nrrd")):  # made at write time
            outputs.write_resampled(pair.fixed, pair.moving, kept, tmp_path / name, ahead=ahead)
            expected = outputs.resample_moving(pair.fixed, pair.moving, kept)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name))),
                                          sitk.GetArrayFromImage(expected))
    finally:
        ahead.close()


def test_register_files_writes_the_kept_transforms_resampled_moving(tmp_path):
    from MultimodalPrealignLib import pipeline

    pair = phantoms.make_pair(seed=1, labels=False, rotation_deg=6.0, translation_mm=8.0,
                              fixed_spacing=(5.0, 5.0, 5.0), moving_spacing=(5.0, 5.0, 6.0))
    sitk.WriteImage(pair.fixed, str(tmp_path / "f.nrrd"))
    sitk.WriteImage(pair.moving, str(tmp_path / "m.nrrd"))
    result = pipeline.register_files(tmp_path / "f.nrrd", tmp_path / "m.nrrd", tmp_path / "out",
                                     pipeline.PipelineOptions.create(no_report=True, prealign="geometry",
                                                                     stages=("rigid",)))
    written = sitk.ReadImage(str(tmp_path / "out" / "moving_resampled.nrrd"))
    kept = sitk.ReadTransform(str(tmp_path / "out" / "transform.h5"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written),
                                  sitk.GetArrayFromImage(outputs.resample_moving(pair.fixed, pair.moving, kept)))
    assert result.report["timings_s"]["write_resampled"] > 0.0


@pytest.fixture(scope="module")
def search_pair():
    return phantoms.make_pair(seed=3, labels=False, rotation_deg=25.0, translation_mm=60.0, flip=True,
                              fixed_spacing=(4.0, 4.0, 4.0), moving_spacing=(4.0, 4.0, 5.0))


def _search(pair, **options) -> prealign.PrealignResult:
    return search.prealign(prealign.PrealignInputs(fixed=pair.fixed, moving=pair.moving, seed=0, options=options))


def test_search_budget_is_work_not_time(search_pair, monkeypatch):
    # a budget that binds (the search stops early), run twice: once as it is, once on a "busy machine" whose CPU
    # clock races ahead; the budget counts scored sample points, so both stop at the same step with the same pose
    quiet = _search(search_pair, budget_s=0.2)
    assert any("budget" in w for w in quiet.warnings)
    work = quiet.details["budget_work"]
    assert work["limit"] == round(0.2 * search.WORK_PER_SECOND) and work["spent"] >= 0.5 * work["limit"]
    racing = itertools.count(step=7.0)
    monkeypatch.setattr(time, "process_time", lambda: float(next(racing)))
    busy = _search(search_pair, budget_s=0.2)
    np.testing.assert_array_equal(transforms.to_matrix(busy.transform), transforms.to_matrix(quiet.transform))
    assert busy.details["budget_work"] == work and busy.warnings == quiet.warnings
    assert busy.details["global_scored"] == quiet.details["global_scored"]


def test_work_budget_counts_scored_sample_points():
    budget = search.WorkBudget.from_seconds(1.0)
    assert budget.limit == search.WORK_PER_SECOND and budget.left()
    pair = phantoms.make_pair(seed=5, labels=False, fixed_spacing=(6.0, 6.0, 6.0), moving_spacing=(6.0, 6.0, 6.0))
    fixed = search.make_level(pair.fixed, 6.0, 16, 500, 10.0, 0)
    moving = search.make_level(pair.moving, 6.0, 16, 500, 10.0, 1)
    scorer = search.Scorer(fixed, moving, 16, 0.5, budget)
    scorer.score(np.stack([np.eye(4)] * 3))
    assert budget.spent == 3 * (fixed.points.shape[0] + moving.points.shape[0])
    assert not budget.left(budget.spent) and budget.left(budget.spent + 1)


# ------------------------------------------------------------------------------------------------ two threads
def _search_and_metrics(monkeypatch, threads: str):
    """The search's result and the QA metrics block of a small pair, with ``threads`` (1: serial, 2: two threads)."""
    from MultimodalPrealignLib.qa import measure

    monkeypatch.setenv("MULTIMODAL_PREALIGN_THREADS", threads)
    pair = phantoms.make_pair(seed=3, labels=False, rotation_deg=20.0, translation_mm=40.0,
                              fixed_spacing=(6.0, 6.0, 6.0), moving_spacing=(6.0, 6.0, 7.0))
    found = search.prealign(prealign.PrealignInputs(fixed=pair.fixed, moving=pair.moving, seed=0,
                                                    options={"rotation_grid_size": 24}))
    plan = crop.plan_crop(pair.fixed, pair.moving, found.transform)
    fixed_work, moving_work = crop.apply_crop(pair.fixed, pair.moving, plan)
    metrics = measure.evaluate(pair.fixed, pair.moving, sitk.Transform(), found.transform, working_spacing_mm=6.0,
                               probe_spacing_mm=8.0)
    metrics.pop("seconds")
    metrics["probes"]["wide"].pop("seconds")
    arrays = [sitk.GetArrayFromImage(image) for image in (fixed_work, moving_work)]
    return transforms.to_matrix(found.transform), found.candidates, metrics, arrays


def test_two_threads_give_the_serial_results_bit_for_bit(monkeypatch):
    serial = _search_and_metrics(monkeypatch, "1")
    threaded = _search_and_metrics(monkeypatch, "2")
    assert np.array_equal(serial[0], threaded[0])  # the search's pose
    assert serial[1] == threaded[1]  # every candidate's score
    assert serial[2] == threaded[2] and "wide" in threaded[2]["probes"]  # the metrics and probes
    for a, b in zip(serial[3], threaded[3]):  # the crop's working grids
        assert np.array_equal(a, b)


def test_two_threads_run_at_once_and_pass_errors_on(monkeypatch):
    import threading

    from MultimodalPrealignLib import parallel

    monkeypatch.setenv("MULTIMODAL_PREALIGN_THREADS", "2")
    barrier = threading.Barrier(2, timeout=10)  # both must be running at the same time to pass it
    names = parallel.both(lambda: (barrier.wait(), threading.current_thread().name)[1],
                          lambda: (barrier.wait(), threading.current_thread().name)[1])
    assert names[0] == threading.current_thread().name and names[1].startswith("mmp-second")
    # nested: the worker's own call runs serially instead of waiting on itself
    assert parallel.both(lambda: 1, lambda: parallel.both(lambda: 2, lambda: 3)) == (1, (2, 3))
    with pytest.raises(ZeroDivisionError):
        parallel.both(lambda: 1, lambda: 1 / 0)
    with pytest.raises(KeyError):
        parallel.both(lambda: {}["x"], lambda: 1)
    monkeypatch.setenv("MULTIMODAL_PREALIGN_THREADS", "1")
    assert parallel.both(threading.current_thread, threading.current_thread) == (threading.current_thread(),) * 2
