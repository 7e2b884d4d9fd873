"""Engine-neutral guards and the metric's mask: a registration result is kept only when a dense
mutual-information estimate inside the fixed object agrees.

:func:`metric_mask`: where every engine's metric samples the fixed working image (the fixed object,
``crop.object_mask``, inside the valid voxels). :func:`affine_guard` / :func:`guarded_stage`: an affine stage (of
either engine) must raise dense MI on one common voxel set by enough to earn its extra parameters, else the
previous stage's result is kept; :func:`affine_can_help` decides before an affine stage whether it is worth running
at all. :func:`registration_guard`: the pipeline keeps the pre-alignment when
registration lowers dense MI inside the fixed object. Every transform maps fixed physical points to moving
physical points (LPS mm); settings come from the itk preset (``resources/presets/itk.json``, ``metric_mask``,
``affine_guard_*`` and ``registration_guard_*``).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .. import crop
from ..geometry import image_space, transforms
from .settings import itk_preset


def metric_mask(fixed: sitk.Image, fixed_mask: sitk.Image | None, preset: dict | None = None,
                is_region: bool = False) -> sitk.Image | None:
    """The mask of the fixed working image where the metrics sample: with the preset's ``metric_mask``
    "object" (default) the fixed object inside ``fixed_mask`` (:func:`crop.object_mask`), else (or when no object
    is found) ``fixed_mask`` itself (every valid voxel). ``is_region``: ``fixed_mask`` is already the region to
    sample (a structure's mask, ``RegistrationSettings.fixed_mask_is_region``) and is returned as given: an
    intensity object mask inside it would cut the structure (on a knee microCT crop the tibia's mask lost 60%).

    Over the whole crop, mutual information is dominated by the object/background edge and by what only one scan
    shows there; inside the object it measures the alignment of the anatomy. On the real phantom pair the itk
    engine's whole-crop optimum lay 3.6-4.1 mm from the references, the object's 1.5-2.0 mm
    (docs/benchmarks.md, 2026-11-30).
    """
    preset = preset or itk_preset()
    if is_region or preset.get("metric_mask", "object") != "object":
        return fixed_mask
    found = crop.object_mask(fixed, fixed_mask)
    return fixed_mask if found is None else found


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
                   fixed_mask: sitk.Image | None, max_samples: int,
                   bins: int) -> tuple[int, float | None, float | None]:
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


def affine_can_help(fixed: sitk.Image, moving: sitk.Image, previous: sitk.Transform,
                    fixed_mask: sitk.Image | None, preset: dict) -> dict:
    """Before an affine stage: can an affine result pass :func:`affine_guard` at all?

    Probes: ``previous`` (fixed->moving, LPS mm) after a scaling by 1 -/+ ``affine_precheck_scale`` along each axis
    of the fixed working grid about its centre (six poses), scored like the guard (dense joint-histogram MI on ONE
    voxel set). ``worth_running`` is True when some probe raises the MI by at least ``affine_precheck_min_gain``
    nats (half the guard's ``affine_guard_min_gain``): a real scale difference does (a 6% scale: +0.22 for the
    exact one), a rigidly related pair does not, and the stage (2-5 s on the phantom pair's working grid) would
    only be rejected. Costs seven resamplings of the moving working image (about 0.3 s on 1.5 M voxels).
    """
    scale = float(preset.get("affine_precheck_scale", 0.03))
    needed = float(preset.get("affine_precheck_min_gain", 0.0025))
    centre = image_space.image_center(fixed).tolist()
    axes = np.asarray(fixed.GetDirection(), float).reshape(3, 3)
    probes = []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            factors = np.ones(3)
            factors[axis] += sign * scale
            scaling = sitk.AffineTransform((axes @ np.diag(factors) @ axes.T).ravel().tolist(), (0.0, 0.0, 0.0),
                                           centre)
            probes.append(transforms.compose(scaling, previous))
    f, warped = _common_samples(fixed, moving, [previous, *probes], fixed_mask,
                                int(preset.get("affine_guard_samples", 400000)))
    result = {"probe_scale": scale, "min_gain": needed, "samples": int(f.size), "best_gain": None,
              "worth_running": True}
    if f.size < 1000:
        return result
    f_range = tuple(np.percentile(f, [0.5, 99.5]))
    m_range = tuple(np.percentile(np.concatenate(warped), [0.5, 99.5]))
    if f_range[1] <= f_range[0] or m_range[1] <= m_range[0]:
        return result
    bins = int(preset.get("affine_guard_bins", 32))
    values = [_histogram_mi(f, m, f_range, m_range, bins) for m in warped]
    gains = [v - values[0] for v in values[1:]]
    result.update(mi_previous=round(values[0], 5), gains=[round(g, 5) for g in gains],
                  best_gain=round(max(gains), 5), worth_running=bool(max(gains) >= needed))
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
        why = (f"it raised the dense mutual information by less than {check['min_gain']:g} nats, "
               "too little for six more parameters")
    else:
        why = "it scaled a direction by more than 5% for a negligible gain in dense mutual information"
    return (f"affine stage rejected: {why} ({check['mi_before']:.4f} -> {check['mi_after']:.4f}; principal scales "
            f"{', '.join(f'{v:.3f}' for v in check['principal_scales'])}); kept the previous stage's result "
            "(use --stages rigid to skip the affine stage)")


def registration_guard(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, final: sitk.Transform,
                       fixed_mask: sitk.Image | None, preset: dict | None = None) -> dict:
    """Did the registration make the alignment worse than the pre-alignment it started from?

    Dense joint-histogram MI (``registration_guard_bins``) on ONE voxel set: fixed voxels inside the fixed
    object (``crop.object_mask``, the mask the engines' metrics sample; until 2026-11-30 a foreground mask that on
    a CT working grid with padding was the whole reconstruction circle) and ``fixed_mask`` that map inside the
    moving image under both transforms. Unlike the engines' metrics over the whole crop, whose value is dominated by the
    object/background edge, this measures the alignment of what is inside the object. On cropped MR
    slabs of the phantom the itk engine lowered it by 0.004-0.044 nats while moving 1-4 mm away from the
    reference (docs/search.md, the cropped phantom slabs). ``accepted`` is False when the final
    transform lowers it by more than ``registration_guard_tolerance``; the pipeline then keeps the
    pre-alignment.
    """
    preset = preset or itk_preset()
    mask = crop.object_mask(fixed, fixed_mask)
    samples, before, after = _dense_mi_pair(fixed, moving, initial, final, fixed_mask if mask is None else mask,
                                            int(preset["affine_guard_samples"]), int(preset["registration_guard_bins"]))
    result = {"measure": "dense MI inside the fixed object, same voxels for both", "mi_prealigned": None,
              "mi_registered": None, "samples": samples, "accepted": True}
    if before is None:
        return result
    result.update(mi_prealigned=round(before, 5), mi_registered=round(after, 5),
                  accepted=bool(after >= before - float(preset["registration_guard_tolerance"])))
    return result
