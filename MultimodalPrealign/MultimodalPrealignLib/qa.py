"""Proof of the result: metrics before/after, verdict, pictures, report.html, and fallback decisions.

The pipeline calls :func:`evaluate` (the ``report["metrics"]`` block), then :func:`finish_report` (verdict +
pictures + report.html), and asks :func:`should_fall_back` whether to try the next attempt from
:func:`fallback_plan`. Every transform maps FIXED physical points to MOVING physical points (LPS mm):
``before`` is the pre-alignment alone, ``after`` the final (pre-alignment + registration) transform.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from . import transforms as tx
from .geometry import grid_points, inside_image, transform_points
from .landmarks import LandmarkPairs, target_registration_error
from .metrics import (
    alignment_metrics,
    jacobian_statistics,
    mutual_information,
    overlap_mask,
    structure_metrics,
)
from .resample import resample_to_spacing
from .verdict import FAIL, PASS, WARN, apply_verdict, judge, load_thresholds

PICTURES_DIR = "pictures"


def working_copy(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """Float32 copy no finer than ``spacing_mm`` per axis (anti-aliased); the image itself if already coarse."""
    image = image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    if np.all(spacing >= spacing_mm * 0.999):
        return image
    return resample_to_spacing(image, np.maximum(spacing, spacing_mm).tolist())


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
    idx = np.argwhere(mask)[:, ::-1].astype(float)
    if idx.shape[0] < 10:
        return None
    a = np.asarray(reference.GetDirection()).reshape(3, 3) @ np.diag(reference.GetSpacing())
    return idx.mean(0) @ a.T + np.asarray(reference.GetOrigin())


def turn_centre(fixed: sitk.Image, moving: sitk.Image, fixed_to_moving: sitk.Transform) -> np.ndarray:
    """Centre (fixed frame, LPS mm) for the half-turn probes: midway between the two objects' centroids.

    The fixed foreground (Otsu body mask, masks.foreground_mask) inside the overlap and the moving foreground
    warped onto the fixed grid. A half-turn about their midpoint sends one centroid onto the other, so a turned
    candidate differs from the result in orientation, not in where the object lands. Falls back to the centre
    of the overlap when a mask is empty.
    """
    from .masks import foreground_mask
    from .metrics import _mask_inside_moving

    fixed_mask = sitk.GetArrayFromImage(foreground_mask(fixed, working_spacing_mm=None)) > 0
    moving_mask = foreground_mask(moving, working_spacing_mm=None)
    warped = sitk.Resample(moving_mask, fixed, fixed_to_moving, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    inside = _mask_inside_moving(fixed, moving, fixed_to_moving)
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
    fixed_work = working_copy(fixed, working_spacing_mm)
    moving_work = working_copy(moving, working_spacing_mm)
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
        fixed_probe = working_copy(fixed_work, probe_spacing_mm)
        moving_probe = working_copy(moving_work, probe_spacing_mm)
        metrics["probes"] = run_probes(fixed_probe, moving_probe, after, float(t["probes"]["shift_mm"]))
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    return metrics


def should_fall_back(report: dict) -> bool:
    """True when this attempt's verdict is FAIL (judged now if the report has no verdict yet)."""
    verdict = report.get("verdict")
    if verdict is None:
        verdict, _ = judge(report)
    return verdict == FAIL


def fallback_plan(prealign_candidates: Sequence[str], engines: Sequence[str], max_attempts: int = 4) -> list[tuple]:
    """Order of (pre-alignment candidate, engine) attempts; the first entry is the normal run.

    After the normal run: the next pre-alignment candidate with the same engine, then the first candidate with
    the other engine, then the remaining combinations (candidates in their ranking order).
    """
    if not prealign_candidates or not engines:
        return []
    every = [(c, e) for e in engines for c in prealign_candidates]
    first = every[0]
    preferred = [(prealign_candidates[1], engines[0])] if len(prealign_candidates) > 1 else []
    preferred += [(prealign_candidates[0], engines[1])] if len(engines) > 1 else []
    ordered = [first] + preferred + [p for p in every if p != first and p not in preferred]
    return ordered[:max_attempts]


def prealign_candidate_transforms(candidates: Sequence[dict], max_count: int = 3, min_rotation_deg: float = 15.0,
                                  min_translation_mm: float = 15.0) -> list[tuple[str, sitk.Transform]]:
    """Distinct recorded poses of a pre-alignment (``PrealignResult.candidates``), best score first.

    Uses records that carry a pose (``matrix_4x4``: 3 or 4 rows, fixed->moving LPS mm) and a ``score``;
    prefers ``refined``/``local`` stages. Two poses are distinct when they differ by more than
    ``min_rotation_deg`` or ``min_translation_mm``. Returns (label, transform) pairs for fallback attempts.
    """
    posed = [c for c in candidates if isinstance(c, dict) and c.get("matrix_4x4") and c.get("score") is not None]
    rank = {"refined": 0, "local": 1}
    posed.sort(key=lambda c: (rank.get(c.get("stage"), 2), -float(c["score"])))
    chosen: list[tuple[str, np.ndarray]] = []
    for c in posed:
        m = np.eye(4)
        rows = np.asarray(c["matrix_4x4"], dtype=float)
        m[: rows.shape[0], :] = rows[:, :4]
        distinct = all(tx.rotation_angle_deg(np.linalg.inv(other) @ m) > min_rotation_deg
                       or np.linalg.norm(m[:3, 3] - other[:3, 3]) > min_translation_mm for _, other in chosen)
        if distinct:
            chosen.append((f"{c.get('stage', '?')} {c.get('source', '')} (score {float(c['score']):.3f})".strip(), m))
        if len(chosen) >= max_count:
            break
    return [(label, tx.affine_from_matrix(m)) for label, m in chosen]


def attempt_score(report: dict) -> tuple:
    """Sort key (higher is better): verdict, fewer FAIL then WARN checks, closer structures, then NMI after."""
    rank = {PASS: 2, WARN: 1, FAIL: 0}.get(report.get("verdict") or judge(report)[0], 0)
    statuses = [c.get("status") for c in report.get("qa_checks") or []]
    metrics = report.get("metrics") or {}
    structures = ((metrics.get("structures") or {}).get("after") or {}).get("summary") or {}
    distance = structures.get("median_centroid_distance_mm")
    nmi = (metrics.get("after") or {}).get("nmi", 0.0)
    return (rank, -statuses.count(FAIL), -statuses.count(WARN),
            -float(distance) if distance is not None else 0.0, nmi)


def record_fallback(final_report: dict, attempts: Sequence[dict], chosen: int) -> dict:
    """Store ``report["fallback"]``: every attempt's (prealign, engine, verdict, reasons) and the chosen one.

    ``attempts``: dicts with at least ``prealign``, ``engine`` and the attempt's ``verdict``/``verdict_reasons``.
    When more than one attempt ran, a WARN/FAIL reason says that the fallback was used.
    """
    rows = [{"prealign": a.get("prealign"), "engine": a.get("engine"), "verdict": a.get("verdict"),
             "reasons": list(a.get("verdict_reasons", []))} for a in attempts]
    final_report["fallback"] = {"used": len(rows) > 1, "attempts": rows, "chosen": int(chosen)}
    if len(rows) > 1:
        note = (f"the first attempt ({rows[0]['prealign']} + {rows[0]['engine']}) failed its checks; "
                f"attempt {chosen + 1} ({rows[chosen]['prealign']} + {rows[chosen]['engine']}) was used")
        final_report.setdefault("verdict_reasons", []).append(f"NOTE: automatic fallback: {note}")
    return final_report["fallback"]


def run_with_fallback(attempt, plan: Sequence[tuple], thresholds: dict | None = None) -> tuple[dict, object, int]:
    """Run ``attempt(prealign_choice, engine) -> (report, payload)`` for each plan entry until one does not FAIL.

    Each report must hold its ``metrics`` (see :func:`evaluate`); it is judged here. When every attempt fails,
    the best one by :func:`attempt_score` is kept. The chosen report gets ``report["fallback"]`` (all attempts'
    verdicts and reasons, via :func:`record_fallback`). Returns (chosen report, its payload, its index).
    """
    done: list[tuple[dict, object, str, str]] = []
    for choice, engine in plan:
        report, payload = attempt(choice, engine)
        apply_verdict(report, thresholds)
        label = choice[0] if isinstance(choice, tuple) else str(choice)
        done.append((report, payload, label, str(engine)))
        if report["verdict"] != FAIL:
            break
    if not done:
        raise ValueError("run_with_fallback needs at least one planned attempt")
    index = max(range(len(done)), key=lambda i: (attempt_score(done[i][0]), -i))
    attempts = [{"prealign": label, "engine": engine, "verdict": r["verdict"],
                 "verdict_reasons": r.get("verdict_reasons", [])} for r, _, label, engine in done]
    chosen = done[index][0]
    record_fallback(chosen, attempts, index)
    return chosen, done[index][1], index


def finish_report(report: dict, out_dir: str | os.PathLike, fixed: sitk.Image, moving: sitk.Image,
                  before: sitk.Transform, after: sitk.Transform, fixed_labels: sitk.Image | None = None,
                  moving_labels: sitk.Image | None = None, pairs: Sequence | None = None,
                  write_pictures: bool = True, html_name: str = "report.html") -> dict:
    """Judge ``report`` (its ``metrics`` must be filled), then write pictures and ``out_dir/report.html``.

    Returns {"verdict", "pictures": {name: path relative to out_dir}, "html": path or None}. Also stores
    ``report["pictures"]`` (relative paths) and ``report["verdict"]``/``["verdict_reasons"]``/``["qa_checks"]``.
    With ``write_pictures=False`` (``--no-report``) only the verdict is computed.
    """
    out_dir = Path(out_dir)
    verdict = apply_verdict(report)
    if not write_pictures:
        return {"verdict": verdict, "pictures": {}, "html": None}
    from .pictures import render_pictures
    from .report_html import write_report_html

    names = render_pictures(fixed, moving, {"before": before, "after": after}, out_dir / PICTURES_DIR,
                            fixed_labels, moving_labels, pairs)
    pictures = {key: f"{PICTURES_DIR}/{name}" for key, name in names.items()}
    report["pictures"] = pictures
    html = write_report_html(report, pictures, out_dir / html_name)
    return {"verdict": verdict, "pictures": pictures, "html": str(html)}


def rewrite_report_html(out_dir: str | os.PathLike, report_name: str = "report.json",
                        html_name: str = "report.html") -> Path:
    """``--report-only`` helper: rebuild report.html from an existing ``report.json`` and its pictures."""
    from .report_html import write_report_html

    out_dir = Path(out_dir)
    report = json.loads((out_dir / report_name).read_text())
    if "verdict" not in report:
        apply_verdict(report)
    return write_report_html(report, report.get("pictures") or {}, out_dir / html_name)


# ----------------------------------------------------------------------------------------------------------
# The same numbers as a table (Slicer table node, CSV)
# ----------------------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("Measure", "After pre-alignment", "After registration", "Result")


def _cell(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def metrics_table(report: dict) -> tuple[tuple[str, ...], list[list[str]]]:
    """(columns, rows of strings) summarising the verdict, metrics and checks, for a Slicer table node or CSV.

    Rows: verdict; NMI, MI and overlap before/after; structure summary (median centroid distance, mean Dice);
    landmark TRE; Jacobian folding; then one row per check with its status and message.
    """
    metrics = report.get("metrics") or {}
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    rows = [["Verdict", "", "", str(report.get("verdict") or judge(report)[0])]]
    for key, label in (("nmi", "Normalised mutual information"), ("mi", "Mutual information (nats)"),
                       ("overlap_fraction_fixed", "Share of fixed covered"),
                       ("overlap_fraction_moving", "Share of moving covered")):
        if key in before or key in after:
            rows.append([label, _cell(before.get(key)), _cell(after.get(key)), ""])
    structures = metrics.get("structures") or {}
    if structures.get("after"):
        b = (structures.get("before") or {}).get("summary", {})
        a = structures["after"].get("summary", {})
        rows.append(["Structures: median centroid distance (mm)", _cell(b.get("median_centroid_distance_mm")),
                     _cell(a.get("median_centroid_distance_mm")), ""])
        rows.append(["Structures: mean Dice", _cell(b.get("mean_dice")), _cell(a.get("mean_dice")), ""])
    landmark_block = metrics.get("landmarks") or {}
    if landmark_block.get("after"):
        rows.append(["Landmarks: mean TRE (mm)", _cell((landmark_block.get("before") or {}).get("mean_tre_mm")),
                     _cell(landmark_block["after"].get("mean_tre_mm")), ""])
        rows.append(["Landmarks: max TRE (mm)", _cell((landmark_block.get("before") or {}).get("max_tre_mm")),
                     _cell(landmark_block["after"].get("max_tre_mm")), ""])
    jac = metrics.get("jacobian") or {}
    if "folding_percent" in jac:
        rows.append(["Jacobian: folding voxels (%)", "", _cell(jac["folding_percent"]), ""])
        rows.append(["Jacobian: min determinant", "", _cell(jac["min"]), ""])
    checks_done = report.get("qa_checks")
    if checks_done is None:
        from .verdict import checks as compute_checks

        checks_done = compute_checks(report)
    for check in checks_done:
        rows.append([f"Check: {check['check']}", "", check["message"], check["status"]])
    return TABLE_COLUMNS, rows


def fill_table_node(table_node, report: dict) -> None:
    """Fill a Slicer ``vtkMRMLTableNode`` (string columns) with :func:`metrics_table` (no slicer import here)."""
    columns, rows = metrics_table(report)
    table_node.RemoveAllColumns()
    for name in columns:
        table_node.AddColumn().SetName(name)
    for row in rows:
        index = table_node.AddEmptyRow()
        for column, text in enumerate(row):
            table_node.SetCellText(index, column, text)


def report_for_transform(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform,
                         out_dir: str | os.PathLike, before: sitk.Transform | None = None,
                         fixed_labels: sitk.Image | None = None, moving_labels: sitk.Image | None = None,
                         pairs: Sequence | None = None, landmarks: LandmarkPairs | None = None,
                         write_pictures: bool = True, extra: dict | None = None) -> dict:
    """``--report-only`` with a given transform: judge an existing registration without re-running it.

    ``before`` defaults to the identity (trust both headers). Writes ``out_dir/report.json``, the pictures and
    report.html (atomically per file) and returns the report dict.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    before = before if before is not None else tx.identity()
    report = dict(extra or {})
    report.setdefault("mode", "report-only: the given transform was judged, nothing was registered")
    report["transform"] = {"summary": tx.summarize(transform)}
    report["metrics"] = evaluate(fixed, moving, before, transform, fixed_labels, moving_labels, landmarks, pairs)
    finish_report(report, out_dir, fixed, moving, before, transform, fixed_labels, moving_labels, pairs,
                  write_pictures=write_pictures)
    temporary = out_dir / "report.json.part"
    temporary.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(temporary, out_dir / "report.json")
    return report
