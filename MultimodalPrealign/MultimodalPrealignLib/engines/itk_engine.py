"""Engine ``itk``: SimpleITK registration configured like BRAINSFit (Mattes MI, 50 bins, sampling
percentage, regular-step gradient descent, rigid -> affine [-> B-spline]).

The metric samples the fixed OBJECT (``guards.metric_mask``: ``crop.object_mask`` inside the valid voxels), at
least ``min_samples_per_level`` samples inside it per level, and rigid / affine stages run one pyramid level at a
time with shrinking first steps and a stall stop (:func:`_run_stage`). Both were found on the real phantom pair
(docs/benchmarks.md, 2026-11-30): over the whole crop the optimum lay 3.6-4.1 mm from the references, and
the multi-level optimizer restarted each level with a 2 mm step.

Each stage optimises a fresh transform ``T_stage`` (identity at start, centred on the fixed working image)
on top of everything found so far, set as the moving initial transform; ITK then maps a fixed point p to
``previous(T_stage(p))``, so the running total is ``compose(T_stage, previous)``. All fixed->moving, LPS mm.

An affine stage runs only when scaling the previous result can raise an independent dense MI estimate
(:func:`.guards.affine_can_help`, ``affine_precheck``), and is kept only when that estimate on a common voxel set
rises enough (:func:`.guards.affine_guard`): Mattes MI on random samples can drift into large volume changes on
partial overlaps. Seeds and a single ITK thread make a run bit-for-bit repeatable.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..errors import Cancelled, RegistrationError
from ..geometry import image_space, transforms
from ..progress import SILENT, Progress
from .guards import affine_can_help, guarded_stage, metric_mask
from .settings import EngineResult, RegistrationSettings, itk_preset


def pyramid(working_spacing_mm, coarsest_mm: float, max_levels: int) -> tuple[list[int], list[float]]:
    """Shrink factors and smoothing sigmas (mm) so the coarsest level has about ``coarsest_mm`` voxels."""
    finest = float(max(working_spacing_mm))
    levels = int(np.clip(round(math.log2(max(coarsest_mm / finest, 1.0))) + 1, 1, max_levels))
    shrink = [2 ** (levels - 1 - i) for i in range(levels)]
    sigmas = [0.5 * f * finest if f > 1 else 0.0 for f in shrink]
    return shrink, sigmas


@contextmanager
def single_threaded(enabled: bool = True):
    """Run ITK on one thread inside the block.

    ITK's threaded metric and pyramid filters add partial sums in a varying order, so two runs differ in
    the last digits (up to 1e-5 mm after an affine stage); one thread makes the same seed give the same
    transform, bit for bit.
    """
    if not enabled:
        yield
        return
    with _SINGLE_LOCK:  # blocks on two threads at once (--per-structure): the first sets, the last restores
        if _SINGLE["depth"] == 0:
            _SINGLE["previous"] = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        _SINGLE["depth"] += 1
    try:
        yield
    finally:
        with _SINGLE_LOCK:
            _SINGLE["depth"] -= 1
            if _SINGLE["depth"] == 0:
                sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(_SINGLE["previous"])


_SINGLE_LOCK = threading.Lock()
_SINGLE = {"depth": 0, "previous": 1}


def itk_seed(seed: int) -> int:
    """SimpleITK reads seed 0 as "seed from the wall clock" (sitkWallClock): shift ours to stay deterministic."""
    return int(seed) + 1


def scaled_preset(preset: dict, scale: float) -> dict:
    """The preset with its lengths (mm) multiplied by ``scale`` (image_space.object_scale; 1 for human anatomy)."""
    out = dict(preset)
    for key in ("maximum_step_length", "coarsest_level_spacing_mm", "bspline_grid_spacing_mm"):
        out[key] = preset[key] * scale
    out["object_scale"] = scale
    return out


def _sampling_per_level(fixed: sitk.Image, shrink: list[int], percentage: float, min_samples: int,
                        mask: sitk.Image | None = None) -> list[float]:
    """Metric sampling share of the working grid per level: ``percentage`` (BRAINSFit's samplingPercentage), raised
    so that at least ``min_samples`` samples fall inside ``mask`` (ITK draws over the whole grid and drops the
    samples outside the mask)."""
    voxels = float(np.prod(fixed.GetSize()))
    inside = voxels if mask is None else float(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    result = []
    for f in shrink:
        n = max(inside, 1.0) / f**3
        result.append(float(min(1.0, max(percentage, min_samples / n))))
    return result


def _stage_transform(stage: str, fixed: sitk.Image, preset: dict) -> sitk.Transform:
    center = image_space.image_center(fixed).tolist()
    if stage == "rigid":
        t = sitk.VersorRigid3DTransform()
        t.SetCenter(center)
        return t
    if stage == "affine":
        t = sitk.AffineTransform(3)
        t.SetCenter(center)
        return t
    extent = image_space.extent_mm(fixed)
    mesh = [max(1, int(round(e / preset["bspline_grid_spacing_mm"]))) for e in extent]
    return sitk.BSplineTransformInitializer(fixed, mesh, 3)


@dataclass
class _StagePlan:
    """Optimizer iterations (per level) and pyramid: shrink factors, smoothing sigmas (mm) and metric sampling
    shares per level. The run's plan holds the whole pyramid; an affine stage's its ``affine_levels`` finest levels
    and a B-spline stage's its two finest levels."""

    iterations: int
    shrink: list[int]
    sigmas: list[float]
    sampling: list[float]
    #: index of the plan's first level in the run's pyramid (its first step follows from it)
    first_level: int = 0


def _stage_plan(stage: str, settings: RegistrationSettings, preset: dict, iterations: int,
                pyramid_levels: _StagePlan) -> _StagePlan:
    """The plan of ``stage`` from the run's pyramid (``pyramid_levels``) and iteration count."""
    if stage == "bspline":
        bspline_iterations = settings.iterations if settings.iterations is not None else preset["bspline_iterations"]
        return _StagePlan(bspline_iterations, pyramid_levels.shrink[-2:], pyramid_levels.sigmas[-2:],
                          pyramid_levels.sampling[-2:])
    if stage == "affine":
        stage_iterations = iterations if settings.iterations is not None else int(preset["affine_iterations"])
        keep = -max(1, min(int(preset["affine_levels"]), len(pyramid_levels.shrink)))
        return _StagePlan(stage_iterations, pyramid_levels.shrink[keep:], pyramid_levels.sigmas[keep:],
                          pyramid_levels.sampling[keep:], len(pyramid_levels.shrink) + keep)
    return _StagePlan(iterations, pyramid_levels.shrink, pyramid_levels.sigmas, pyramid_levels.sampling)


def _registration_method(stage: str, plan: _StagePlan, settings: RegistrationSettings, preset: dict,
                         fixed_mask: sitk.Image | None, moving_mask: sitk.Image | None,
                         learning_rate: float | None = None) -> sitk.ImageRegistrationMethod:
    """Mattes MI on random samples, linear interpolation, the stage's optimizer and pyramid (BRAINSFit's set-up);
    ``learning_rate``: the regular-step optimizer's first step (default the preset's ``maximum_step_length``)."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(settings.histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentagePerLevel(plan.sampling, itk_seed(settings.seed))
    method.SetInterpolator(sitk.sitkLinear)
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        method.SetMetricMovingMask(moving_mask)
    if stage == "bspline":
        method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=plan.iterations,
                                    maximumNumberOfCorrections=5,
                                    maximumNumberOfFunctionEvaluations=4 * plan.iterations)
    else:
        method.SetOptimizerAsRegularStepGradientDescent(
            learningRate=learning_rate or preset["maximum_step_length"], minStep=preset["minimum_step_length"],
            numberOfIterations=plan.iterations, relaxationFactor=preset["relaxation_factor"],
            gradientMagnitudeTolerance=preset["gradient_magnitude_tolerance"])
        method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(plan.shrink)
    method.SetSmoothingSigmasPerLevel(plan.sigmas)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


def _execute(method: sitk.ImageRegistrationMethod, stage: str, fixed: sitk.Image, moving: sitk.Image,
             deterministic: bool, progress: Progress, stall_iterations: int = 0) -> dict:
    """Run one stage or level (cancellable at every iteration); returns {"n": iterations, "first_metric": value,
    "stalled": bool}.

    ``stall_iterations`` > 0: stop when the metric has not improved for that many iterations (the regular-step
    optimizer otherwise creeps on with ever smaller steps along a flat valley of the sampled metric: on a cropped
    phantom slab 570 iterations at the finest level changed the metric by 3e-4 and the pose by noise).
    An exception raised inside an ITK callback does not reach Python (SWIG prints it and ITK goes on), so a
    cancel request (or Ctrl-C) stops the optimizer from the callback and is raised after ``Execute`` returns.
    """
    evaluations = {"n": 0, "first_metric": None, "cancelled": False, "stalled": False}
    best = {"value": math.inf, "at": 0}

    def on_iteration():
        try:
            evaluations["n"] += 1
            value = float(method.GetMetricValue())
            if evaluations["first_metric"] is None:
                evaluations["first_metric"] = round(value, 6)
            if value < best["value"]:
                best["value"], best["at"] = value, evaluations["n"]
            elif stall_iterations and evaluations["n"] - best["at"] >= stall_iterations:
                evaluations["stalled"] = True
                method.StopRegistration()
            progress.check_cancelled()
        except (Cancelled, KeyboardInterrupt):
            evaluations["cancelled"] = True
            method.StopRegistration()

    method.AddCommand(sitk.sitkIterationEvent, on_iteration)
    try:
        with single_threaded(deterministic):
            method.Execute(fixed, moving)
    except RuntimeError as err:
        if evaluations["cancelled"]:
            raise Cancelled() from None
        raise RegistrationError(translate_itk_error(str(err), stage), _fix_for_itk_error(str(err))) from None
    if evaluations.pop("cancelled"):
        raise Cancelled()
    return evaluations


def _run_stage(stage: str, plan: _StagePlan, settings: RegistrationSettings, preset: dict, fixed: sitk.Image,
               moving: sitk.Image, total: sitk.Transform, fixed_mask: sitk.Image | None,
               moving_mask: sitk.Image | None, progress: Progress) -> tuple[sitk.Transform, dict]:
    """Optimise a fresh stage transform on top of ``total`` (fixed->moving, LPS mm); returns it and the record.

    Rigid and affine stages run ONE LEVEL AT A TIME, coarse to fine, each continuing from the previous level's
    pose with a first step ``level_step_factor`` times the previous level's: run as one multi-level ITK call the
    regular-step optimizer restarts every level at ``maximum_step_length`` and its first steps throw away what the
    coarser level found (on the phantom pair it jumped 2 mm off at the finest level's first iteration). A level
    also stops when its metric stalls (``stall_iterations``). An affine stage starts from the rigid result on
    the finer levels only (``affine_levels``), with the first step those levels have in the run's pyramid. A
    B-spline stage is one call (L-BFGS-B).
    """
    stage_transform = _stage_transform(stage, fixed, preset)
    if stage == "bspline":
        levels = [(plan, None)]
    else:
        levels = [(_StagePlan(plan.iterations, [f], [sigma], [share]),
                   preset["maximum_step_length"] * preset["level_step_factor"] ** (plan.first_level + level))
                  for level, (f, sigma, share) in enumerate(zip(plan.shrink, plan.sigmas, plan.sampling))]
    per_level, first_metric, method = [], None, None
    for level_plan, learning_rate in levels:
        method = _registration_method(stage, level_plan, settings, preset, fixed_mask, moving_mask, learning_rate)
        method.SetMovingInitialTransform(total)
        method.SetInitialTransform(stage_transform, inPlace=True)
        evaluations = _execute(method, stage, fixed, moving, settings.deterministic, progress,
                               0 if stage == "bspline" else int(preset["stall_iterations"]))
        first_metric = evaluations["first_metric"] if first_metric is None else first_metric
        per_level.append({"iterations": int(evaluations["n"]), "stalled": evaluations["stalled"],
                          "stop_condition": method.GetOptimizerStopConditionDescription()[:200]})
    record = {
        "iterations": sum(level["iterations"] for level in per_level),
        "max_iterations_per_level": int(plan.iterations),
        "iterations_per_level": [level["iterations"] for level in per_level],
        "stop_condition": "; ".join("stalled (no better metric for stall_iterations)" if level["stalled"]
                                    else level["stop_condition"] for level in per_level),
        # metric_start: the metric at the first iteration (coarsest level); a separate full evaluation before
        # the run cost more than a second per stage on large working images.
        "metric_start": first_metric, "metric_final": round(float(method.GetMetricValue()), 6),
        "shrink_factors": plan.shrink, "smoothing_sigmas_mm": [round(s, 3) for s in plan.sigmas],
        "sampling_percentage_per_level": [round(s, 6) for s in plan.sampling],
    }
    return stage_transform, record


def register_itk(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, settings: RegistrationSettings,
                 progress: Progress = SILENT, fixed_mask: sitk.Image | None = None,
                 moving_mask: sitk.Image | None = None) -> EngineResult:
    """Run ``settings.stages`` in order from ``initial``; the result (fixed->moving, LPS mm) includes ``initial``."""
    base = itk_preset()
    preset = scaled_preset(base, image_space.object_scale(fixed, moving, base["reference_extent_mm"]))
    percentage = settings.sampling_percentage if settings.sampling_percentage is not None \
        else preset["sampling_percentage"]
    iterations = settings.iterations if settings.iterations is not None else preset["iterations"]
    shrink, sigmas = pyramid(fixed.GetSpacing(), preset["coarsest_level_spacing_mm"], preset["max_levels"])
    fixed_mask = metric_mask(fixed, fixed_mask, preset, settings.fixed_mask_is_region)
    sampling = _sampling_per_level(fixed, shrink, percentage, preset["min_samples_per_level"], fixed_mask)
    pyramid_levels = _StagePlan(iterations, shrink, sigmas, sampling)
    total = initial
    records: list[dict] = []
    warnings: list[str] = []
    for index, stage in enumerate(settings.stages):
        progress.report("register", index / len(settings.stages), f"{stage} stage (itk)")
        started = time.perf_counter()
        precheck = None
        if stage == "affine" and index > 0 and preset.get("affine_precheck", True):
            precheck = affine_can_help(fixed, moving, total, fixed_mask, preset)
            if not precheck["worth_running"]:  # the guard would reject it: do not pay for it
                records.append(_skipped_stage(stage, precheck, time.perf_counter() - started))
                continue
        plan = _stage_plan(stage, settings, preset, iterations, pyramid_levels)
        stage_transform, record = _run_stage(stage, plan, settings, preset, fixed, moving, total, fixed_mask,
                                             moving_mask, progress)
        total, check = guarded_stage(stage, fixed, moving, total, transforms.compose(stage_transform, total),
                                     fixed_mask, preset, warnings)
        records.append({"stage": stage, "engine": "itk", "seconds": round(time.perf_counter() - started, 3), **record,
                        **({"guard": check} if check is not None else {}),
                        **({"precheck": precheck} if precheck is not None else {})})
    return EngineResult(total, records, _settings_used(settings, preset, percentage, pyramid_levels), warnings=warnings)


def _skipped_stage(stage: str, precheck: dict, seconds: float) -> dict:
    """The record of a stage that :func:`.guards.affine_can_help` found not worth running."""
    return {"stage": stage, "engine": "itk", "seconds": round(seconds, 3), "skipped": True, "iterations": 0,
            "stop_condition": f"not run: no scaling of the previous result by {precheck['probe_scale']:g} raised the "
                              f"dense mutual information by {precheck['min_gain']:g} nats (affine_precheck)",
            "precheck": precheck}


def _settings_used(settings: RegistrationSettings, preset: dict, percentage: float, pyramid_levels: _StagePlan) -> dict:
    """The ``settings_used`` record of the run (report.json)."""
    return {
        "engine": "itk", "metric": "MattesMutualInformation", "histogram_bins": settings.histogram_bins,
        "sampling_percentage": percentage, "min_samples_per_level": preset["min_samples_per_level"],
        "iterations": pyramid_levels.iterations, "seed": settings.seed,
        "deterministic_single_thread": settings.deterministic, "itk_random_seed": itk_seed(settings.seed),
        "stages": list(settings.stages),
        "shrink_factors": pyramid_levels.shrink, "smoothing_sigmas_mm": [round(s, 3) for s in pyramid_levels.sigmas],
        "optimizer": preset["optimizer"], "maximum_step_length": preset["maximum_step_length"],
        "minimum_step_length": preset["minimum_step_length"], "relaxation_factor": preset["relaxation_factor"],
        "level_step_factor": preset["level_step_factor"], "stall_iterations": preset["stall_iterations"],
        "metric_mask": preset.get("metric_mask", "object"), "object_scale": round(preset["object_scale"], 4),
    }


def translate_itk_error(message: str, stage: str) -> str:
    """One line for an ITK registration failure (the known overlap failure first)."""
    if "All samples map outside moving image buffer" in message or "Too many samples map outside" in message:
        return f"The {stage} stage lost the overlap: all metric samples mapped outside the moving image"
    last = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return f"The {stage} stage failed in ITK: {(last[-1] if last else 'unknown error')[:200]}"


def _fix_for_itk_error(message: str) -> str:
    if "outside moving image buffer" in message or "Too many samples" in message:
        return ("start closer: use --prealign search (or anatomy with label maps), a larger --crop-margin, "
                "or fewer stages (--stages rigid)")
    return "check the inputs with 'multimodal-prealign diagnose', or try --engine elastix"
