"""Engine ``itk``: SimpleITK registration configured like BRAINSFit (Mattes MI, 50 bins, sampling
percentage, regular-step gradient descent, rigid -> affine [-> B-spline]).

Each stage optimises a fresh transform ``T_stage`` (identity at start, centred on the fixed working image)
on top of everything found so far, set as the moving initial transform; ITK then maps a fixed point p to
``previous(T_stage(p))``, so the running total is ``compose(T_stage, previous)``. All fixed->moving, LPS mm.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import numpy as np
import SimpleITK as sitk

from . import geometry, transforms
from .engines import EngineResult, RegistrationSettings, itk_preset
from .errors import RegistrationError
from .progress import SILENT, Progress


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
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    if enabled:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def itk_seed(seed: int) -> int:
    """SimpleITK reads seed 0 as "seed from the wall clock" (sitkWallClock): shift ours to stay deterministic."""
    return int(seed) + 1


def _sampling_per_level(fixed: sitk.Image, shrink: list[int], percentage: float, min_samples: int) -> list[float]:
    voxels = float(np.prod(fixed.GetSize()))
    result = []
    for f in shrink:
        n = voxels / f**3
        result.append(float(min(1.0, max(percentage, min_samples / max(n, 1.0)))))
    return result


def _stage_transform(stage: str, fixed: sitk.Image, preset: dict) -> sitk.Transform:
    center = geometry.image_center(fixed).tolist()
    if stage == "rigid":
        t = sitk.VersorRigid3DTransform()
        t.SetCenter(center)
        return t
    if stage == "affine":
        t = sitk.AffineTransform(3)
        t.SetCenter(center)
        return t
    extent = geometry.extent_mm(fixed)
    mesh = [max(1, int(round(e / preset["bspline_grid_spacing_mm"]))) for e in extent]
    return sitk.BSplineTransformInitializer(fixed, mesh, 3)


def register_itk(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, settings: RegistrationSettings,
                 progress: Progress = SILENT, fixed_mask: sitk.Image | None = None,
                 moving_mask: sitk.Image | None = None) -> EngineResult:
    preset = itk_preset()
    percentage = settings.sampling_percentage if settings.sampling_percentage is not None else preset["sampling_percentage"]
    iterations = settings.iterations if settings.iterations is not None else preset["iterations"]
    shrink, sigmas = pyramid(fixed.GetSpacing(), preset["coarsest_level_spacing_mm"], preset["max_levels"])
    sampling = _sampling_per_level(fixed, shrink, percentage, preset["min_samples_per_level"])
    total = initial
    records = []
    n_stages = len(settings.stages)
    for index, stage in enumerate(settings.stages):
        progress.report("register", 0.5 + 0.4 * index / n_stages, f"{stage} stage (itk)")
        started = time.perf_counter()
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(settings.histogram_bins)
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentagePerLevel(sampling, itk_seed(settings.seed))
        method.SetInterpolator(sitk.sitkLinear)
        if fixed_mask is not None:
            method.SetMetricFixedMask(fixed_mask)
        if moving_mask is not None:
            method.SetMetricMovingMask(moving_mask)
        stage_iterations = iterations
        if stage == "bspline":
            stage_iterations = settings.iterations if settings.iterations is not None else preset["bspline_iterations"]
            method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=stage_iterations,
                                        maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * stage_iterations)
            stage_shrink, stage_sigmas = shrink[-2:], sigmas[-2:]
            method.SetMetricSamplingPercentagePerLevel(sampling[-2:], itk_seed(settings.seed))
        else:
            method.SetOptimizerAsRegularStepGradientDescent(
                learningRate=preset["maximum_step_length"], minStep=preset["minimum_step_length"],
                numberOfIterations=stage_iterations, relaxationFactor=preset["relaxation_factor"],
                gradientMagnitudeTolerance=preset["gradient_magnitude_tolerance"])
            method.SetOptimizerScalesFromPhysicalShift()
            stage_shrink, stage_sigmas = shrink, sigmas
        method.SetShrinkFactorsPerLevel(stage_shrink)
        method.SetSmoothingSigmasPerLevel(stage_sigmas)
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        method.SetMovingInitialTransform(total)
        stage_transform = _stage_transform(stage, fixed, preset)
        method.SetInitialTransform(stage_transform, inPlace=True)
        evaluations = {"n": 0}

        def on_iteration(method=method, evaluations=evaluations):
            evaluations["n"] += 1
            if evaluations["n"] % 25 == 0:
                progress.check_cancelled()

        method.AddCommand(sitk.sitkIterationEvent, on_iteration)
        try:
            with single_threaded(settings.deterministic):
                metric_before = _safe_metric(method, fixed, moving)
                method.Execute(fixed, moving)
        except RuntimeError as err:
            raise RegistrationError(translate_itk_error(str(err), stage), _fix_for_itk_error(str(err))) from None
        total = transforms.compose(stage_transform, total)
        records.append({
            "stage": stage, "engine": "itk", "seconds": round(time.perf_counter() - started, 3),
            "iterations": int(evaluations["n"]), "max_iterations_per_level": int(stage_iterations),
            "stop_condition": method.GetOptimizerStopConditionDescription()[:300],
            "metric_start": metric_before, "metric_final": round(float(method.GetMetricValue()), 6),
            "shrink_factors": stage_shrink, "smoothing_sigmas_mm": [round(s, 3) for s in stage_sigmas],
            "sampling_percentage_per_level": [round(s, 6) for s in (sampling if stage != "bspline" else sampling[-2:])],
        })
    settings_used = {
        "engine": "itk", "metric": "MattesMutualInformation", "histogram_bins": settings.histogram_bins,
        "sampling_percentage": percentage, "min_samples_per_level": preset["min_samples_per_level"],
        "iterations": iterations, "seed": settings.seed, "deterministic_single_thread": settings.deterministic, "itk_random_seed": itk_seed(settings.seed), "stages": list(settings.stages),
        "shrink_factors": shrink, "smoothing_sigmas_mm": [round(s, 3) for s in sigmas],
        "optimizer": preset["optimizer"], "maximum_step_length": preset["maximum_step_length"],
        "minimum_step_length": preset["minimum_step_length"], "relaxation_factor": preset["relaxation_factor"],
    }
    return EngineResult(total, records, settings_used)


def _safe_metric(method: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image) -> float | None:
    try:
        return round(float(method.MetricEvaluate(fixed, moving)), 6)
    except RuntimeError:
        return None


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
