"""Measure a result: the ``report["metrics"]`` block (:func:`evaluate`).

Image similarity and overlap before and after (:mod:`.metrics`, on coarse working copies), structure Dice and
centroid distances with label maps, landmark TRE, the Jacobian of a deformable result, the determinant and
scales of the linear part, and the probes: small shifts and half-turns of the result that should not score
better than it. ``content`` says whether each image is plausible as a scan and rich enough to register
(:mod:`..io.plausibility`). Every transform maps FIXED physical points to MOVING physical points (LPS mm): ``before`` is
the pre-alignment alone, ``after`` the final (pre-alignment + registration) transform. Judging the numbers is
:mod:`.verdict`'s job.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from .. import parallel
from ..geometry import transforms as tx
from ..geometry.image_space import grid_points, index_to_physical_points, inside_image, object_scale
from ..geometry.masks import foreground_mask
from ..geometry.resample import coarse_copy
from ..geometry.transforms import transform_points
from ..io.landmarks import LandmarkPairs, target_registration_error
from ..io.plausibility import content_summary, structure_ratio
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


#: Mirror probes: name -> patient axis the mirror reverses (the mirror plane is normal to it).
MIRRORS = {"mirrored left-right": 0, "mirrored front-back": 1, "mirrored head-feet": 2}


def probe_transforms(centre_mm: np.ndarray, shift_mm: float, mirrors: bool = True) -> dict[str, sitk.Transform]:
    """Fixed->fixed perturbations applied before the result: 6 axis shifts, 3 half-turns about ``centre_mm`` and
    (``mirrors``) 3 mirror images across the patient planes through ``centre_mm``."""
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
    if mirrors:
        for name, axis in MIRRORS.items():
            matrix = np.eye(4)
            matrix[axis, axis] = -1.0
            probes[name] = tx.affine_from_matrix(matrix, [float(v) for v in centre_mm])
    return probes


def _probe_kind(name: str) -> str:
    return "shift" if name.startswith("shift") else "mirror" if name.startswith("mirrored") else "turn"


def run_probes(fixed: sitk.Image, moving: sitk.Image, after: sitk.Transform, shift_mm: float) -> dict:
    """NMI of the result and of each probe on the given (coarse) grids; the best shift, turn and mirror with their
    gain relative to (NMI - 1) of the result."""
    result = mutual_information(fixed, moving, after)["nmi"]
    centre = turn_centre(fixed, moving, after)
    rows = []
    for name, probe in probe_transforms(centre, shift_mm).items():
        nmi = mutual_information(fixed, moving, tx.compose(probe, after))["nmi"]
        rows.append({"name": name, "kind": _probe_kind(name), "nmi": nmi,
                     "relative_gain": round((nmi - result) / max(result - 1.0, 1e-9), 4)})
    out = {"result_nmi": result, "centre_mm_lps": [round(float(v), 2) for v in centre], "shift_mm": shift_mm,
           "probes": rows}
    for kind in ("shift", "turn", "mirror"):
        out[f"best_{kind}"] = max((r for r in rows if r["kind"] == kind), key=lambda r: r["nmi"])
    return out


def _nmi_samples(fixed: sitk.Image, moving: sitk.Image, matrix: np.ndarray) -> tuple[float, int]:
    found = mutual_information(fixed, moving, tx.affine_from_matrix(matrix))
    return found["nmi"], found["samples"]


def _about(rotation: np.ndarray, centre: np.ndarray, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 (fixed frame): rotate by ``rotation`` about ``centre``, then shift."""
    out = np.eye(4)
    out[:3, :3] = rotation
    out[:3, 3] = centre - rotation @ centre + np.asarray(shift, float)
    return out


def _euler(rx: float, ry: float, rz: float) -> np.ndarray:
    turn = sitk.Euler3DTransform()
    turn.SetRotation(rx, ry, rz)
    return np.asarray(turn.GetMatrix(), float).reshape(3, 3)


def refine_pose(fixed: sitk.Image, moving: sitk.Image, start: np.ndarray, centre: np.ndarray, scale: float,
                max_evaluations: int) -> tuple[float, np.ndarray, int]:
    """Coordinate ascent of NMI around ``start`` (4x4 fixed->moving): rotations about ``centre`` of 8, 4, 2 degrees
    and shifts of 8, 4, 2 mm x ``scale``. Returns (best NMI, its 4x4, evaluations)."""
    best, evaluations = _nmi_samples(fixed, moving, start)[0], 1
    params = np.zeros(6)

    def pose(p: np.ndarray) -> np.ndarray:
        return start @ _about(_euler(*p[:3]), centre, p[3:])

    for degrees, mm in ((8.0, 8.0), (4.0, 4.0), (2.0, 2.0)):
        improved = True
        while improved and evaluations < max_evaluations:
            improved = False
            for k in range(6):
                for sign in (1.0, -1.0):
                    trial = params.copy()
                    trial[k] += sign * (math.radians(degrees) if k < 3 else mm * scale)
                    value = _nmi_samples(fixed, moving, pose(trial))[0]
                    evaluations += 1
                    if value > best + 1e-6:
                        best, params, improved = value, trial, True
                        break
                if improved or evaluations >= max_evaluations:
                    break
    return best, pose(params), evaluations


def run_wide_probes(fixed: sitk.Image, moving: sitk.Image, after: sitk.Transform, settings: dict) -> dict:
    """Probes far from the result, on coarse grids (``settings``: the "probes" thresholds' wide_* values).

    Slides: the result shifted along each patient axis in steps of ``wide_slide_step_mm`` (x the object's scale)
    while at least half of the compared voxels remain (a slab slid along the body). Refined turns: the result
    turned 180 degrees about each patient axis, then refined by :func:`refine_pose` (a turn about a tilted axis,
    as a box-shaped object allows). Gains are relative to (NMI - 1) of the result on the same grid.
    """
    started = time.perf_counter()
    scale = object_scale(fixed, moving, float(settings.get("reference_extent_mm", 200.0)))
    spacing = max(float(settings["wide_grid_mm"]) * scale, max(fixed.GetSpacing()), 2.0)
    fixed_grid, moving_grid = coarse_copy(fixed, spacing), coarse_copy(moving, spacing)
    matrix = tx.to_matrix(after) if tx.is_linear(after) else None
    if matrix is None:
        return {}
    result, samples = _nmi_samples(fixed_grid, moving_grid, matrix)

    def gain(value: float) -> float:
        return round((value - result) / max(result - 1.0, 1e-9), 4)

    step = float(settings["wide_slide_step_mm"]) * scale
    slides, evaluations = [], 1
    for axis, name in enumerate("LPS"):
        for sign in (1, -1):
            for k in range(1, int(settings["wide_slide_steps"]) + 1):
                offset = np.zeros(3)
                offset[axis] = sign * k * step
                value, count = _nmi_samples(fixed_grid, moving_grid, matrix @ _about(np.eye(3), np.zeros(3), offset))
                evaluations += 1
                if count < 0.5 * samples:
                    break
                slides.append({"name": f"slid {sign * k * step:+.0f} mm along {name}", "nmi": value,
                               "relative_gain": gain(value)})
    centre = turn_centre(fixed_grid, moving_grid, after)
    budget = int(settings["wide_refine_evaluations"])
    # the turns are refined, so they are compared with the result refined the same way (fair to both)
    refined, _pose, count = refine_pose(fixed_grid, moving_grid, matrix, centre, scale, budget)
    evaluations += count
    turns = []
    for axis, name in enumerate(("L-R", "A-P", "S-I")):
        flip = -np.eye(3)
        flip[axis, axis] = 1.0
        value, _pose, count = refine_pose(fixed_grid, moving_grid, matrix @ _about(flip, centre), centre, scale,
                                          budget)
        evaluations += count
        turns.append({"name": f"180 degrees about the {name} axis, then refined", "nmi": value,
                      "relative_gain": round((value - refined) / max(refined - 1.0, 1e-9), 4)})
    out = {"grid_mm": round(spacing, 2), "result_nmi": result, "result_refined_nmi": refined,
           "refined_result": {"name": "the result refined", "nmi": refined, "relative_gain": gain(refined)},
           "slide_step_mm": round(step, 2), "slides": slides, "refined_turns": turns, "evaluations": evaluations,
           "seconds": round(time.perf_counter() - started, 2)}
    if slides:
        out["best_slide"] = max(slides, key=lambda r: r["nmi"])
    out["best_refined_turn"] = max(turns, key=lambda r: r["nmi"])
    return out


def content_block(fixed: sitk.Image, moving: sitk.Image, fixed_work: sitk.Image, moving_work: sitk.Image) -> dict:
    """``metrics["content"]``: each image's extent and voxels (as given), structure ratio (on its coarse copy)."""
    return {role: {**content_summary(image, structure=False), "structure": round(structure_ratio(work), 3)}
            for role, image, work in (("fixed", fixed, fixed_work), ("moving", moving, moving_work))}


def evaluate(fixed: sitk.Image, moving: sitk.Image, before: sitk.Transform, after: sitk.Transform,
             fixed_labels: sitk.Image | None = None, moving_labels: sitk.Image | None = None,
             landmarks: LandmarkPairs | None = None, pairs: Sequence | None = None,
             working_spacing_mm: float = 2.0, probes: bool = True, probe_spacing_mm: float = 4.0,
             thresholds: dict | None = None) -> dict:
    """The full metrics block for ``report["metrics"]``.

    Keys: ``content`` (:func:`content_block`), ``before``/``after`` (:func:`alignment_metrics` on working copies
    no finer than ``working_spacing_mm``), ``structures`` {before, after} with both label maps (``pairs`` =
    (name, fixed_ids, moving_ids) triples; default: equal ids), ``landmarks`` {before, after} TRE, ``jacobian``
    (non-linear ``after`` only, inside the overlap), ``transform`` (determinant of the linear part), ``probes``
    (:func:`run_probes` at ``probe_spacing_mm``, with ``wide``: :func:`run_wide_probes`) and ``seconds``.
    """
    started = time.perf_counter()
    t = thresholds or load_thresholds()
    fixed_work = coarse_copy(fixed, working_spacing_mm)
    moving_work = coarse_copy(moving, working_spacing_mm)

    def measured() -> dict:
        metrics: dict = {"content": content_block(fixed, moving, fixed_work, moving_work),
                         "before": alignment_metrics(fixed_work, moving_work, before),
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
            metrics["jacobian"] = jacobian_statistics(after, fixed, mask=mask,
                                                      spacing_mm=max(probe_spacing_mm, 2.0))
        check = transform_check(after)
        if check is not None:
            metrics["transform"] = check
        if probes:
            fixed_probe = coarse_copy(fixed_work, probe_spacing_mm)
            moving_probe = coarse_copy(moving_work, probe_spacing_mm)
            metrics["probes"] = run_probes(fixed_probe, moving_probe, after, float(t["probes"]["shift_mm"]))
        return metrics

    # the wide probes (the longest part) share nothing with the rest: measured at the same time
    metrics, wide = parallel.both(measured, lambda: run_wide_probes(fixed_work, moving_work, after, t["probes"])
                                  if probes else {})
    if wide:
        metrics["probes"]["wide"] = wide
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    return metrics
