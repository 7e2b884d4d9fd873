"""Measure a result: the ``report["metrics"]`` block (:func:`evaluate`).

Image similarity and overlap before and after (:mod:`.metrics`, on coarse working copies), structure Dice and
centroid distances with label maps, landmark TRE, the Jacobian of a deformable result, the determinant and
scales of the linear part, and the probes: small shifts and half-turns of the result that should not score
better than it. Every transform maps FIXED physical points to MOVING physical points (LPS mm): ``before`` is
the pre-alignment alone, ``after`` the final (pre-alignment + registration) transform. Judging the numbers is
:mod:`.verdict`'s job.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from ..geometry import transforms as tx
from ..geometry.image_space import grid_points, index_to_physical_points, inside_image
from ..geometry.masks import foreground_mask
from ..geometry.resample import coarse_copy
from ..geometry.transforms import transform_points
from ..io.landmarks import LandmarkPairs, target_registration_error
from .metrics import (
    alignment_metrics,
    jacobian_statistics,
    mask_inside_moving,
    mutual_information,
    overlap_mask,
    structure_metrics,
)
from .verdict import load_thresholds


def linear_part_matrix(transform: sitk.Transform) -> np.ndarray | None:
    """4x4 matrix of the (composed) linear part of a transform, None if it has none."""
    info = tx.summarize(transform)
    if "matrix_4x4" in info:
        return np.asarray(info["matrix_4x4"], dtype=float)
    linear = info.get("linear_part") or {}
    return np.asarray(linear["matrix_4x4"], dtype=float) if "matrix_4x4" in linear else None


def transform_check(transform: sitk.Transform) -> dict | None:
    """Determinant, overall scale (cube root) and principal scales (singular values) of the linear part."""
    matrix = linear_part_matrix(transform)
    if matrix is None:
        return None
    determinant = float(np.linalg.det(matrix[:3, :3]))
    scales = np.linalg.svd(matrix[:3, :3], compute_uv=False)
    return {"determinant": round(determinant, 6), "scale": round(abs(determinant) ** (1 / 3), 4),
            "principal_scales": [round(float(v), 4) for v in scales]}


def _centroid_mm(reference: sitk.Image, mask: np.ndarray) -> np.ndarray | None:
    """Centroid (LPS mm) of the voxels set in ``mask`` (an array on ``reference``'s grid); None below 10 voxels."""
    idx = np.argwhere(mask)[:, ::-1].astype(float)
    if idx.shape[0] < 10:
        return None
    return index_to_physical_points(reference, idx.mean(0))


def turn_centre(fixed: sitk.Image, moving: sitk.Image, fixed_to_moving: sitk.Transform) -> np.ndarray:
    """Centre (fixed frame, LPS mm) for the half-turn probes: midway between the two objects' centroids.

    The fixed foreground (Otsu body mask, masks.foreground_mask) inside the overlap and the moving foreground
    warped onto the fixed grid. A half-turn about their midpoint sends one centroid onto the other, so a turned
    candidate differs from the result in orientation, not in where the object lands. Falls back to the centre
    of the overlap when a mask is empty.
    """
    fixed_mask = sitk.GetArrayFromImage(foreground_mask(fixed, working_spacing_mm=None)) > 0
    moving_mask = foreground_mask(moving, working_spacing_mm=None)
    warped = sitk.Resample(moving_mask, fixed, fixed_to_moving, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    inside = mask_inside_moving(fixed, moving, fixed_to_moving)
    fixed_centre = _centroid_mm(fixed, fixed_mask & inside)
    moving_centre = _centroid_mm(fixed, sitk.GetArrayFromImage(warped) > 0)
    if fixed_centre is None or moving_centre is None:
        points = grid_points(fixed, 12)
        keep = inside_image(moving, transform_points(fixed_to_moving, points))
        return points[keep].mean(0) if keep.any() else points.mean(0)
    return (fixed_centre + moving_centre) / 2.0


def probe_transforms(centre_mm: np.ndarray, shift_mm: float) -> dict[str, sitk.Transform]:
    """Fixed->fixed perturbations applied before the result: 6 axis shifts and 3 half-turns about ``centre_mm``."""
    probes: dict[str, sitk.Transform] = {}
    for axis, name in enumerate("LPS"):
        for sign in (1, -1):
            offset = [0.0, 0.0, 0.0]
            offset[axis] = sign * shift_mm
            probes[f"shift {'+' if sign > 0 else '-'}{shift_mm:g} mm along {name}"] = tx.translation(offset)
    for axis, name in enumerate(("L-R", "A-P", "S-I")):
        turn = sitk.Euler3DTransform()
        turn.SetCenter([float(v) for v in centre_mm])
        angles = [0.0, 0.0, 0.0]
        angles[axis] = math.pi
        turn.SetRotation(*angles)
        probes[f"180 degrees about the {name} axis"] = turn
    return probes


def run_probes(fixed: sitk.Image, moving: sitk.Image, after: sitk.Transform, shift_mm: float) -> dict:
    """NMI of the result and of each probe on the given (coarse) grids; best shift and best turn with their gain."""
    result = mutual_information(fixed, moving, after)["nmi"]
    centre = turn_centre(fixed, moving, after)
    rows = []
    for name, probe in probe_transforms(centre, shift_mm).items():
        nmi = mutual_information(fixed, moving, tx.compose(probe, after))["nmi"]
        rows.append({"name": name, "nmi": nmi,
                     "relative_gain": round((nmi - result) / max(result - 1.0, 1e-9), 4)})
    shifts = [r for r in rows if r["name"].startswith("shift")]
    turns = [r for r in rows if not r["name"].startswith("shift")]
    return {"result_nmi": result, "centre_mm_lps": [round(float(v), 2) for v in centre], "shift_mm": shift_mm,
            "probes": rows, "best_shift": max(shifts, key=lambda r: r["nmi"]),
            "best_turn": max(turns, key=lambda r: r["nmi"])}


def evaluate(fixed: sitk.Image, moving: sitk.Image, before: sitk.Transform, after: sitk.Transform,
             fixed_labels: sitk.Image | None = None, moving_labels: sitk.Image | None = None,
             landmarks: LandmarkPairs | None = None, pairs: Sequence | None = None,
             working_spacing_mm: float = 2.0, probes: bool = True, probe_spacing_mm: float = 4.0,
             thresholds: dict | None = None) -> dict:
    """The full metrics block for ``report["metrics"]``.

    Keys: ``before``/``after`` (:func:`alignment_metrics` on working copies no finer than
    ``working_spacing_mm``), ``structures`` {before, after} with both label maps (``pairs`` = (name, fixed_ids,
    moving_ids) triples; default: equal ids), ``landmarks`` {before, after} TRE, ``jacobian`` (non-linear
    ``after`` only, inside the overlap), ``transform`` (determinant of the linear part), ``probes``
    (:func:`run_probes` at ``probe_spacing_mm``) and ``seconds``.
    """
    started = time.perf_counter()
    t = thresholds or load_thresholds()
    fixed_work = coarse_copy(fixed, working_spacing_mm)
    moving_work = coarse_copy(moving, working_spacing_mm)
    metrics: dict = {"before": alignment_metrics(fixed_work, moving_work, before),
                     "after": alignment_metrics(fixed_work, moving_work, after),
                     "working_spacing_mm": working_spacing_mm}
    if fixed_labels is not None and moving_labels is not None:
        metrics["structures"] = {"before": structure_metrics(fixed_labels, moving_labels, before, pairs),
                                 "after": structure_metrics(fixed_labels, moving_labels, after, pairs)}
    if landmarks is not None and len(landmarks.labels):
        metrics["landmarks"] = {"before": target_registration_error(landmarks, before),
                                "after": target_registration_error(landmarks, after),
                                "sources": list(landmarks.sources)}
    if not tx.is_linear(after):
        mask = overlap_mask(fixed, moving, after, spacing_mm=max(probe_spacing_mm, 2.0))
        metrics["jacobian"] = jacobian_statistics(after, fixed, mask=mask, spacing_mm=max(probe_spacing_mm, 2.0))
    check = transform_check(after)
    if check is not None:
        metrics["transform"] = check
    if probes:
        fixed_probe = coarse_copy(fixed_work, probe_spacing_mm)
        moving_probe = coarse_copy(moving_work, probe_spacing_mm)
        metrics["probes"] = run_probes(fixed_probe, moving_probe, after, float(t["probes"]["shift_mm"]))
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    return metrics
