"""Engine ``itk``: SimpleITK registration configured like BRAINSFit (Mattes MI, 50 bins, sampling
percentage, regular-step gradient descent, rigid -> affine [-> B-spline]).

Each stage optimises a fresh transform ``T_stage`` (identity at start, centred on the fixed working image)
on top of everything found so far, set as the moving initial transform; ITK then maps a fixed point p to
``previous(T_stage(p))``, so the running total is ``compose(T_stage, previous)``. All fixed->moving, LPS mm.

An affine stage is kept only when an independent dense MI estimate on a common voxel set does not drop
(:func:`affine_guard`): Mattes MI on random samples can drift into large volume changes on partial overlaps.
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
from .masks import foreground_mask
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


def scaled_preset(preset: dict, scale: float) -> dict:
    """The preset with its lengths (mm) multiplied by ``scale`` (geometry.object_scale; 1 for human anatomy)."""
    out = dict(preset)
    for key in ("maximum_step_length", "coarsest_level_spacing_mm", "bspline_grid_spacing_mm"):
        out[key] = preset[key] * scale
    out["object_scale"] = scale
    return out


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
    base = itk_preset()
    preset = scaled_preset(base, geometry.object_scale(fixed, moving, base["reference_extent_mm"]))
    percentage = settings.sampling_percentage if settings.sampling_percentage is not None else preset["sampling_percentage"]
    iterations = settings.iterations if settings.iterations is not None else preset["iterations"]
    shrink, sigmas = pyramid(fixed.GetSpacing(), preset["coarsest_level_spacing_mm"], preset["max_levels"])
    sampling = _sampling_per_level(fixed, shrink, percentage, preset["min_samples_per_level"])
    total = initial
    records: list[dict] = []
    warnings: list[str] = []
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
        if stage == "affine" and settings.iterations is None:
            stage_iterations = int(preset.get("affine_iterations", iterations))
        if stage == "bspline":
            stage_iterations = settings.iterations if settings.iterations is not None else preset["bspline_iterations"]
            method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=stage_iterations,
                                        maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * stage_iterations)
            stage_shrink, stage_sigmas, stage_sampling = shrink[-2:], sigmas[-2:], sampling[-2:]
            method.SetMetricSamplingPercentagePerLevel(stage_sampling, itk_seed(settings.seed))
        else:
            method.SetOptimizerAsRegularStepGradientDescent(
                learningRate=preset["maximum_step_length"], minStep=preset["minimum_step_length"],
                numberOfIterations=stage_iterations, relaxationFactor=preset["relaxation_factor"],
                gradientMagnitudeTolerance=preset["gradient_magnitude_tolerance"])
            method.SetOptimizerScalesFromPhysicalShift()
            stage_shrink, stage_sigmas, stage_sampling = shrink, sigmas, sampling
        method.SetShrinkFactorsPerLevel(stage_shrink)
        method.SetSmoothingSigmasPerLevel(stage_sigmas)
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        method.SetMovingInitialTransform(total)
        stage_transform = _stage_transform(stage, fixed, preset)
        method.SetInitialTransform(stage_transform, inPlace=True)
        evaluations = {"n": 0, "first_metric": None}

        def on_iteration(method=method, evaluations=evaluations):
            evaluations["n"] += 1
            if evaluations["first_metric"] is None:
                evaluations["first_metric"] = round(float(method.GetMetricValue()), 6)
            if evaluations["n"] % 25 == 0:
                progress.check_cancelled()

        method.AddCommand(sitk.sitkIterationEvent, on_iteration)
        try:
            with single_threaded(settings.deterministic):
                method.Execute(fixed, moving)
        except RuntimeError as err:
            raise RegistrationError(translate_itk_error(str(err), stage), _fix_for_itk_error(str(err))) from None
        total, check = guarded_stage(stage, fixed, moving, total, transforms.compose(stage_transform, total),
                                     fixed_mask, preset, warnings)
        records.append({
            "stage": stage, "engine": "itk", "seconds": round(time.perf_counter() - started, 3),
            "iterations": int(evaluations["n"]), "max_iterations_per_level": int(stage_iterations),
            "stop_condition": method.GetOptimizerStopConditionDescription()[:300],
            # metric_start: the metric at the first iteration (coarsest level); a separate full evaluation before
            # the run cost more than a second per stage on large working images.
            "metric_start": evaluations["first_metric"], "metric_final": round(float(method.GetMetricValue()), 6),
            "shrink_factors": stage_shrink, "smoothing_sigmas_mm": [round(s, 3) for s in stage_sigmas],
            "sampling_percentage_per_level": [round(s, 6) for s in stage_sampling],
            **({"guard": check} if check is not None else {}),
        })
    settings_used = {
        "engine": "itk", "metric": "MattesMutualInformation", "histogram_bins": settings.histogram_bins,
        "sampling_percentage": percentage, "min_samples_per_level": preset["min_samples_per_level"],
        "iterations": iterations, "seed": settings.seed, "deterministic_single_thread": settings.deterministic, "itk_random_seed": itk_seed(settings.seed), "stages": list(settings.stages),
        "shrink_factors": shrink, "smoothing_sigmas_mm": [round(s, 3) for s in sigmas],
        "optimizer": preset["optimizer"], "maximum_step_length": preset["maximum_step_length"],
        "minimum_step_length": preset["minimum_step_length"], "relaxation_factor": preset["relaxation_factor"],
        "object_scale": round(preset["object_scale"], 4),
    }
    return EngineResult(total, records, settings_used, warnings=warnings)


def _common_samples(fixed: sitk.Image, moving: sitk.Image, transforms_list, fixed_mask: sitk.Image | None,
                    max_samples: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Fixed values and the moving values under each transform, on ONE voxel set: fixed voxels (inside
    ``fixed_mask``) that map inside the moving image under every transform, regularly subsampled."""
    f = sitk.GetArrayViewFromImage(fixed).ravel()
    keep = np.ones(f.shape, bool) if fixed_mask is None else sitk.GetArrayViewFromImage(fixed_mask).ravel() > 0
    warped = []
    for t in transforms_list:
        w = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, t, sitk.sitkLinear, float("nan"), sitk.sitkFloat32))
        w = w.ravel()
        keep &= np.isfinite(w)
        warped.append(w)
    index = np.flatnonzero(keep)
    index = index[:: max(1, index.size // max_samples)]
    return f[index], [w[index] for w in warped]


def _histogram_mi(f: np.ndarray, m: np.ndarray, f_range, m_range, bins: int) -> float:
    """Mutual information (nats) of two value arrays from a bins x bins joint histogram on fixed ranges."""
    fi = np.clip(((f - f_range[0]) * (bins / (f_range[1] - f_range[0]))).astype(np.int64), 0, bins - 1)
    mi = np.clip(((m - m_range[0]) * (bins / (m_range[1] - m_range[0]))).astype(np.int64), 0, bins - 1)
    p = np.bincount(fi * bins + mi, minlength=bins * bins).reshape(bins, bins).astype(np.float64)
    p /= max(p.sum(), 1.0)
    pf, pm = p.sum(1), p.sum(0)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / np.outer(pf, pm)[nz])))


def _dense_mi_pair(fixed: sitk.Image, moving: sitk.Image, before: sitk.Transform, after: sitk.Transform,
                   fixed_mask: sitk.Image | None, max_samples: int, bins: int) -> tuple[int, float | None, float | None]:
    """(samples, MI before, MI after): joint-histogram MI of the same fixed voxels under both transforms, on
    fixed intensity ranges (0.5-99.5 percentiles); MI is None with fewer than 1000 samples or a flat range."""
    f, (m0, m1) = _common_samples(fixed, moving, [before, after], fixed_mask, max_samples)
    if f.size < 1000:
        return int(f.size), None, None
    f_range = tuple(np.percentile(f, [0.5, 99.5]))
    m_range = tuple(np.percentile(np.concatenate([m0, m1]), [0.5, 99.5]))
    if f_range[1] <= f_range[0] or m_range[1] <= m_range[0]:
        return int(f.size), None, None
    return int(f.size), _histogram_mi(f, m0, f_range, m_range, bins), _histogram_mi(f, m1, f_range, m_range, bins)


def affine_guard(fixed: sitk.Image, moving: sitk.Image, before: sitk.Transform, after: sitk.Transform,
                 fixed_mask: sitk.Image | None, preset: dict) -> dict:
    """Independent check of an affine stage: dense histogram MI on one common voxel set, before vs after.

    Mattes MI on random samples can prefer shrinking or stretching the overlap (partial fields of view,
    cut-off objects); a dense estimate on the SAME voxels under both transforms has no such overlap bias.
    The affine result must earn its six extra parameters: it is accepted when it raises this MI by at least
    ``affine_guard_min_gain`` (nats). A real affine difference raises it by far more (a 6% scale: +0.22);
    on rigidly related synthetic pairs the affine stage gained 0.0002 while moving points 1.5 mm away from the
    truth. A result that scales some direction outside ``affine_guard_scale_range`` (the verdict's
    "unexpected for one patient" range) must raise it by at least ``affine_guard_min_gain_outside_range``:
    on a thin slab the affine stage can trade 10-15% of scale along the slab normal for a negligible gain.
    """
    samples, before_mi, after_mi = _dense_mi_pair(fixed, moving, before, after, fixed_mask,
                                                  int(preset.get("affine_guard_samples", 400000)),
                                                  int(preset.get("affine_guard_bins", 32)))
    linear = transforms.to_matrix(after)[:3, :3] @ np.linalg.inv(transforms.to_matrix(before)[:3, :3])
    scales = np.linalg.svd(linear, compute_uv=False)
    result = {"mi_before": None, "mi_after": None, "samples": samples,
              "determinant": round(float(np.linalg.det(linear)), 5),
              "principal_scales": [round(float(v), 4) for v in scales], "accepted": True}
    if before_mi is None:
        return result
    lo, hi = preset.get("affine_guard_scale_range", (0.95, 1.05))
    plausible = bool(np.all((scales >= lo) & (scales <= hi)))
    needed = float(preset.get("affine_guard_min_gain", 0.005)) if plausible \
        else float(preset.get("affine_guard_min_gain_outside_range", 0.01))
    result.update(mi_before=round(before_mi, 5), mi_after=round(after_mi, 5), scales_plausible=plausible,
                  min_gain=needed, accepted=bool(after_mi - before_mi >= needed))
    return result


def guarded_stage(stage: str, fixed: sitk.Image, moving: sitk.Image, previous: sitk.Transform,
                  candidate: sitk.Transform, fixed_mask: sitk.Image | None, preset: dict,
                  warnings: list) -> tuple[sitk.Transform, dict | None]:
    """A stage's result and its guard record: ``previous`` instead (and a warning) when an affine stage fails
    :func:`affine_guard`. Used by both engines."""
    if stage != "affine" or not preset.get("affine_guard", True):
        return candidate, None
    check = affine_guard(fixed, moving, previous, candidate, fixed_mask, preset)
    if check["accepted"]:
        return candidate, check
    warnings.append(affine_rejection_warning(check))
    return previous, check


def affine_rejection_warning(check: dict) -> str:
    """The one-line warning for an affine stage that :func:`affine_guard` rejected."""
    if check["mi_after"] < check["mi_before"]:
        why = "it lowered the dense mutual information"
    elif check["scales_plausible"]:
        why = f"it raised the dense mutual information by less than {check['min_gain']:g} nats, too little for six more parameters"
    else:
        why = "it scaled a direction by more than 5% for a negligible gain in dense mutual information"
    return (f"affine stage rejected: {why} ({check['mi_before']:.4f} -> {check['mi_after']:.4f}; principal scales "
            f"{', '.join(f'{v:.3f}' for v in check['principal_scales'])}); kept the previous stage's result "
            "(use --stages rigid to skip the affine stage)")


def registration_guard(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, final: sitk.Transform,
                       fixed_mask: sitk.Image | None, preset: dict | None = None) -> dict:
    """Did the registration make the alignment worse than the pre-alignment it started from?

    Dense joint-histogram MI (``registration_guard_bins``) on ONE voxel set: fixed voxels inside the fixed
    object (``masks.foreground_mask``, holes filled) and ``fixed_mask`` that map inside the moving image
    under both transforms. Unlike the engines' metrics over the whole crop, whose value is dominated by the
    object/background edge, this measures the alignment of what is inside the object. On cropped MR
    slabs of the phantom the itk engine lowered it by 0.004-0.044 nats while moving 1-4 mm away from the
    reference (benchmarks/reference/phantom_slab_diagnosis.py). ``accepted`` is False when the final
    transform lowers it by more than ``registration_guard_tolerance``; the pipeline then keeps the
    pre-alignment.
    """
    preset = preset or itk_preset()
    body = foreground_mask(fixed, working_spacing_mm=None)
    mask = body if fixed_mask is None else sitk.And(body, sitk.Cast(fixed_mask > 0, sitk.sitkUInt8))
    samples, before, after = _dense_mi_pair(fixed, moving, initial, final, mask, int(preset["affine_guard_samples"]),
                                            int(preset["registration_guard_bins"]))
    result = {"measure": "dense MI inside the fixed object, same voxels for both", "mi_prealigned": None,
              "mi_registered": None, "samples": samples, "accepted": True}
    if before is None:
        return result
    result.update(mi_prealigned=round(before, 5), mi_registered=round(after, 5),
                  accepted=bool(after >= before - float(preset["registration_guard_tolerance"])))
    return result


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
