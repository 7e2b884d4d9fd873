"""Fallback policy: which (pre-alignment candidate, engine) to try next when the verdict is FAIL, and which
attempt to keep. :mod:`pipeline.attempts` runs the attempts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from ..engines.settings import ELASTIX_INSTALL, engine_installed
from ..geometry import transforms as tx
from ..qa.verdict import FAIL, PASS, WARN, apply_verdict, judge

#: At most this many attempts (the normal run plus fallbacks) when the verdict is FAIL.
MAX_ATTEMPTS = 3


def should_fall_back(report: dict) -> bool:
    """True when this attempt's verdict is FAIL (judged now if the report has no verdict yet)."""
    verdict = report.get("verdict")
    if verdict is None:
        verdict, _ = judge(report)
    return verdict == FAIL


class FallbackPlan(list):
    """The planned (pre-alignment candidate, engine) attempts; ``skipped``: fallback engines left out because
    their package is not installed (elastix without itk-elastix)."""

    skipped: tuple = ()
    #: {engine: (reason, fix or None)} for engines left out for another reason than a missing package.
    skip_reasons: dict = {}


#: Why a fallback engine was skipped, and the fix.
NOT_INSTALLED = {"elastix": ("itk-elastix is not installed", ELASTIX_INSTALL)}
#: With --per-structure a global FAIL is expected when the parts move apart (a knee bent differently): each structure
#: then starts from the global result with its own local search, so the other engine's global attempt is not run.
PER_STRUCTURE_SKIP = ("with --per-structure each structure is registered on its own from the global result; a global "
                      "FAIL is expected when the parts move apart", "run without --per-structure to try it")


def fallback_plan(prealign_candidates: Sequence[str], engines: Sequence[str],
                  max_attempts: int = MAX_ATTEMPTS, left_out: dict | None = None) -> FallbackPlan:
    """Order of (pre-alignment candidate, engine) attempts, at most ``max_attempts``; the first is the normal run.

    After the normal run: the next pre-alignment candidate with the same engine, then the first candidate with
    the other engine, then the remaining combinations (candidates in their ranking order). Fallback engines
    (after the first) that are not installed, or named in ``left_out`` ({engine: (reason, fix)}), are left out and
    listed in ``skipped``.
    """
    engines, left_out = list(engines), dict(left_out or {})
    skipped = tuple(e for e in engines[1:] if e in left_out or not engine_installed(e))
    engines = engines[:1] + [e for e in engines[1:] if e not in skipped]
    plan = FallbackPlan(_ordered_plan(prealign_candidates, engines, max_attempts))
    plan.skipped = skipped
    plan.skip_reasons = {e: left_out[e] for e in skipped if e in left_out}
    return plan


def _ordered_plan(prealign_candidates: Sequence[str], engines: Sequence[str], max_attempts: int) -> list[tuple]:
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
    """Sort key (higher is better): a transform at all (an attempt whose engine failed has none and never beats one
    that has), verdict, fewer FAIL then WARN checks, closer structures, then NMI after."""
    produced = "error" not in report
    rank = {PASS: 2, WARN: 1, FAIL: 0}.get(report.get("verdict") or judge(report)[0], 0)
    statuses = [c.get("status") for c in report.get("qa_checks") or []]
    metrics = report.get("metrics") or {}
    structures = ((metrics.get("structures") or {}).get("after") or {}).get("summary") or {}
    distance = structures.get("median_centroid_distance_mm")
    nmi = (metrics.get("after") or {}).get("nmi", 0.0)
    return (produced, rank, -statuses.count(FAIL), -statuses.count(WARN),
            -float(distance) if distance is not None else 0.0, nmi)


def record_fallback(final_report: dict, attempts: Sequence[dict], chosen: int, skipped: Sequence[str] = (),
                    skip_reasons: dict | None = None) -> dict:
    """Store ``report["fallback"]``: every attempt's (prealign, engine, verdict, reasons) and the chosen one.

    ``attempts``: dicts with at least ``prealign``, ``engine`` and the attempt's ``verdict``/``verdict_reasons``.
    When more than one attempt ran, a WARN/FAIL reason says that the fallback was used. ``skipped``: fallback
    engines not installed or left out for ``skip_reasons`` ({engine: (reason, fix)}, :class:`FallbackPlan`);
    recorded, with a note, when the first attempt failed.
    """
    rows = [{"prealign": a.get("prealign"), "engine": a.get("engine"), "verdict": a.get("verdict"),
             "reasons": list(a.get("verdict_reasons", []))} for a in attempts]
    final_report["fallback"] = {"used": len(rows) > 1, "attempts": rows, "chosen": int(chosen)}
    if len(rows) > 1:
        note = (f"the first attempt ({rows[0]['prealign']} + {rows[0]['engine']}) failed its checks; "
                f"attempt {chosen + 1} ({rows[chosen]['prealign']} + {rows[chosen]['engine']}) was used")
        final_report.setdefault("verdict_reasons", []).append(f"NOTE: automatic fallback: {note}")
    if skipped and rows and rows[0].get("verdict") == FAIL:  # the fallback would have tried them
        final_report["fallback"]["skipped_engines"] = []
        for engine in skipped:
            reason, fix = (skip_reasons or {}).get(engine) or NOT_INSTALLED.get(engine, ("its package is not "
                                                                                        "installed", None))
            final_report["fallback"]["skipped_engines"].append({"engine": engine, "reason": reason, "fix": fix})
            why = f"{reason}; {fix}" if fix else reason
            final_report.setdefault("verdict_reasons", []).append(
                f"NOTE: automatic fallback: the {engine} engine was not tried ({why})")
    return final_report["fallback"]


def run_with_fallback(attempt, plan: Sequence[tuple], thresholds: dict | None = None) -> tuple[dict, object, int]:
    """Run ``attempt(prealign_choice, engine) -> (report, payload)`` for each plan entry until one does not FAIL.

    Each report must hold its ``metrics`` (see :func:`qa.measure.evaluate`); it is judged here. When every attempt
    fails, the best one by :func:`attempt_score` is kept. The chosen report gets ``report["fallback"]`` (all attempts'
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
    record_fallback(chosen, attempts, index, getattr(plan, "skipped", ()), getattr(plan, "skip_reasons", {}))
    return chosen, done[index][1], index
