"""The QA verdict: PASS / WARN / FAIL with reasons, from the metrics block of report.json.

Reads ``report["metrics"]`` as written by :func:`.measure.evaluate` (``content`` of each image, ``before``/``after``
image similarity and overlap, optional ``structures``, ``landmarks``, ``jacobian``, ``transform``, ``probes``) and,
if present, ``report["error"]`` and ``report["inputs"]`` (the inputs' own voxel counts and sizes, for the content
check). Thresholds live in ``resources/verdict_thresholds.json`` (documented in docs/qa.md).
Transforms behind the metrics map fixed physical points to moving physical points (LPS mm).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from ..errors import EXIT_VERDICT_FAIL  # 4: the run finished but the verdict is FAIL (also read from here)
from ..io.plausibility import content_findings
from ..resource_files import RESOURCES

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
_RANK = {PASS: 0, SKIP: 0, WARN: 1, FAIL: 2}

THRESHOLDS_PATH = RESOURCES / "verdict_thresholds.json"


def load_thresholds(path: str | Path | None = None) -> dict:
    """The thresholds resource (or another JSON file with the same keys)."""
    return json.loads(Path(path or THRESHOLDS_PATH).read_text())


def exit_code_for(verdict: str) -> int:
    """0 for PASS and WARN, :data:`EXIT_VERDICT_FAIL` for FAIL."""
    return EXIT_VERDICT_FAIL if verdict == FAIL else 0


def _check(name: str, status: str, message: str) -> dict:
    return {"check": name, "status": status, "message": message}


def _pct(value: float) -> str:
    return f"{100.0 * value:.0f}%"


def check_error(report: dict, t: dict) -> list[dict]:
    error = report.get("error")
    if error:
        return [_check("run", FAIL, f"the run stopped with an error: {error}")]
    return []


def _original(report: dict, role: str) -> dict | None:
    """The input's own geometry (``size``, ``spacing_mm``) from report.json's ``inputs``, when recorded."""
    info = (report.get("inputs") or {}).get(role)
    return info if isinstance(info, dict) and info.get("size") and info.get("spacing_mm") else None


def check_content(report: dict, t: dict) -> list[dict]:
    """Each image plausible as a scan (size, voxel size) and rich enough to register (voxels, structure)."""
    content = (report.get("metrics") or {}).get("content") or {}
    if not content:
        return []
    limits = t["content"]
    checks = []
    for role in ("fixed", "moving"):
        if role in content:
            checks += [_check("content", status, text)
                       for status, text in content_findings(content[role], f"the {role} image", limits,
                                                            _original(report, role))]
    if all(role in content for role in ("fixed", "moving")) and not checks:
        volumes = {role: math.prod(float(v) for v in content[role]["extent_mm_lps"]) for role in ("fixed", "moving")}
        small, large = sorted(volumes, key=volumes.get)
        share = volumes[small] / max(volumes[large], 1e-12)
        if share < limits["warn_min_volume_share"]:
            checks.append(_check("content", WARN, f"the {small} image covers {share * 100:.2g}% of the {large} "
                                                  "image's volume: the alignment of so small a region is hard to "
                                                  "confirm; check the pictures"))
    if checks:
        return checks
    text = ", ".join(f"{role} {' x '.join(f'{v:.0f}' for v in content[role]['extent_mm_lps'])} mm, structure "
                     f"{content[role].get('structure', float('nan')):.1f}" for role in ("fixed", "moving")
                     if role in content)
    return [_check("content", PASS, f"both images are plausible scans with structure to align ({text})")]


def check_related(metrics: dict, t: dict) -> list[dict]:
    """The images share information after registration: NMI clearly above what unrelated images reach."""
    after = metrics.get("after") or {}
    if "nmi" not in after:
        return []
    limits = t["related"]
    samples = after.get("samples")
    if samples is not None and samples < limits["fail_min_samples"]:
        return [_check("related", FAIL, f"only {samples} voxels of the two images could be compared (at least "
                                        f"{limits['fail_min_samples']} needed): too few to tell whether they agree")]
    if "nmi_chance" not in after:
        return []
    above = float(after["nmi"]) - float(after["nmi_chance"])
    text = (f"normalised mutual information {float(after['nmi']):.4f}, {above:+.4f} above the "
            f"{float(after['nmi_chance']):.4f} that unrelated images reach on the same {samples} voxels")
    if above < limits["fail_min_nmi_above_chance"]:
        return [_check("related", FAIL, f"the images look unrelated ({text}): check that both show the same "
                                        "object and that neither is noise or empty")]
    if above < limits["warn_min_nmi_above_chance"]:
        return [_check("related", WARN, f"the images share little information ({text})")]
    return [_check("related", PASS, f"the images share information ({text})")]


def check_overlap(metrics: dict, t: dict) -> list[dict]:
    after = metrics.get("after") or {}
    if "overlap_fraction_fixed" not in after:
        return []
    covered = max(float(after["overlap_fraction_fixed"]), float(after.get("overlap_fraction_moving", 0.0)))
    limits = t["overlap"]
    text = f"the images overlap on {_pct(covered)} of the smaller one"
    if covered < limits["fail_below"]:
        return [_check("overlap", FAIL, f"{text} (at least {_pct(limits['fail_below'])} needed)")]
    if covered < limits["warn_below"]:
        return [_check("overlap", WARN, f"{text} (below {_pct(limits['warn_below'])}: partial field of view "
                                        "or misplacement)")]
    return [_check("overlap", PASS, text)]


def relative_change(after_nmi: float, before_nmi: float) -> float:
    """Relative change of (NMI - 1) from before to after; negative = worse."""
    base = max(float(before_nmi) - 1.0, 1e-9)
    return (float(after_nmi) - float(before_nmi)) / base


def check_similarity(metrics: dict, t: dict) -> list[dict]:
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    if "nmi" not in before or "nmi" not in after:
        return []
    change = relative_change(after["nmi"], before["nmi"])
    limits = t["similarity"]
    text = (f"normalised mutual information {before['nmi']:.4f} after pre-alignment -> {after['nmi']:.4f} after "
            f"registration ({change * 100:+.1f}% of NMI-1)")
    if change < -limits["fail_relative_drop"]:
        return [_check("similarity", FAIL, f"registration made the images agree less than pre-alignment: {text}")]
    if change < -limits["warn_relative_drop"]:
        return [_check("similarity", WARN, f"image similarity got slightly worse: {text}")]
    return [_check("similarity", PASS, text)]


def judged_structures(block: dict, t: dict) -> list[dict]:
    """Rows of a structure_metrics block that are large enough and inside the common region."""
    limits = t["structures"]
    return [r for r in (block or {}).get("structures", [])
            if r.get("dice") is not None and r.get("fixed_volume_ml", 0.0) >= limits["min_volume_ml"]
            and r.get("fraction_in_overlap", 0.0) >= limits["min_fraction_in_overlap"]]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


def check_structures(metrics: dict, t: dict) -> list[dict]:
    block = metrics.get("structures") or {}
    rows = judged_structures(block.get("after"), t)
    if not block.get("after"):
        return []
    if not rows:
        return [_check("structures", WARN, "no corresponding structure lies inside the common field of view: "
                                           "label maps could not confirm the alignment")]
    limits = t["structures"]
    distances = [float(r["centroid_distance_mm"]) for r in rows]
    dices = [float(r["dice"]) for r in rows]
    median = _median(distances)
    mean_dice = sum(dices) / len(dices)
    worst = max(rows, key=lambda r: r["centroid_distance_mm"])
    checks = []
    text = (f"{len(rows)} structures: median centroid distance {median:.1f} mm, mean Dice {mean_dice:.2f}, "
            f"worst {worst['name']} {worst['centroid_distance_mm']:.1f} mm")
    if median > limits["fail_median_centroid_mm"]:
        checks.append(_check("structures", FAIL, f"structures disagree by more than "
                                                 f"{limits['fail_median_centroid_mm']:g} mm: {text}"))
    elif median > limits["warn_median_centroid_mm"]:
        checks.append(_check("structures", WARN, f"structures disagree by more than "
                                                 f"{limits['warn_median_centroid_mm']:g} mm: {text}"))
    elif worst["centroid_distance_mm"] > limits["warn_max_centroid_mm"]:
        checks.append(_check("structures", WARN, f"one structure is off by more than "
                                                 f"{limits['warn_max_centroid_mm']:g} mm: {text}"))
    if mean_dice < limits["fail_mean_dice_below"]:
        checks.append(_check("dice", FAIL, f"structures barely overlap (mean Dice {mean_dice:.2f} < "
                                           f"{limits['fail_mean_dice_below']:g})"))
    elif mean_dice < limits["warn_mean_dice_below"]:
        checks.append(_check("dice", WARN, f"structures overlap poorly (mean Dice {mean_dice:.2f} < "
                                           f"{limits['warn_mean_dice_below']:g})"))
    before_rows = {r["name"]: r for r in judged_structures(block.get("before"), t)}
    common = [r for r in rows if r["name"] in before_rows]
    if common:
        median_before = _median([float(before_rows[r["name"]]["centroid_distance_mm"]) for r in common])
        median_after = _median([float(r["centroid_distance_mm"]) for r in common])
        worse = median_after - median_before
        compare = (f"median centroid distance {median_before:.1f} mm after pre-alignment -> "
                   f"{median_after:.1f} mm after registration")
        if worse > limits["fail_worse_than_before_mm"]:
            checks.append(_check("structures_vs_prealign", FAIL, f"registration moved structures apart: {compare}"))
        elif worse > limits["warn_worse_than_before_mm"]:
            checks.append(_check("structures_vs_prealign", WARN, f"registration moved structures apart: {compare}"))
        else:
            checks.append(_check("structures_vs_prealign", PASS, compare))
    if not any(c["status"] != PASS for c in checks):
        checks.insert(0, _check("structures", PASS, text))
    return checks


def check_landmarks(metrics: dict, t: dict) -> list[dict]:
    after = (metrics.get("landmarks") or {}).get("after")
    if not after or not after.get("count"):
        return []
    limits = t["landmarks"]
    mean, worst = float(after["mean_tre_mm"]), float(after["max_tre_mm"])
    text = f"target registration error over {after['count']} landmarks: mean {mean:.1f} mm, max {worst:.1f} mm"
    if mean > limits["fail_mean_tre_mm"] or worst > limits["fail_max_tre_mm"]:
        return [_check("landmarks", FAIL, f"landmarks disagree: {text}")]
    if mean > limits["warn_mean_tre_mm"] or worst > limits["warn_max_tre_mm"]:
        return [_check("landmarks", WARN, f"landmarks disagree somewhat: {text}")]
    return [_check("landmarks", PASS, text)]


def check_jacobian(metrics: dict, t: dict) -> list[dict]:
    jac = metrics.get("jacobian") or {}
    if "folding_percent" not in jac:
        return []
    limits = t["jacobian"]
    folding = float(jac["folding_percent"])
    text = (f"deformation Jacobian determinant min {jac['min']:.3f}, max {jac['max']:.3f}, "
            f"folding {folding:.3f}% of voxels")
    if folding > limits["fail_folding_percent"]:
        return [_check("jacobian", FAIL, f"the deformation folds tissue onto itself: {text}")]
    if folding > limits["warn_folding_percent"]:
        return [_check("jacobian", WARN, f"the deformation folds a few voxels: {text}")]
    if jac["min"] < limits["warn_min_determinant"] or jac["max"] > limits["warn_max_determinant"]:
        return [_check("jacobian", WARN, f"the deformation compresses or stretches strongly: {text}")]
    return [_check("jacobian", PASS, text)]


def check_transform(metrics: dict, t: dict) -> list[dict]:
    info = metrics.get("transform") or {}
    if "determinant" not in info:
        return []
    limits = t["transform"]
    det = float(info["determinant"])
    if det <= 0 and limits["fail_negative_determinant"]:
        return [_check("transform", FAIL, f"the transform mirrors the image (determinant {det:.3f}): "
                                          "left and right would be swapped")]
    scales = [float(v) for v in info.get("principal_scales") or [abs(det) ** (1.0 / 3.0)]]
    lo, hi = limits["warn_scale_outside"]
    if not all(lo <= s <= hi for s in scales):
        worst = max(scales, key=lambda s: abs(math.log(s)))
        change = "stretches" if worst > 1 else "compresses"
        return [_check("transform", WARN, f"the transform {change} the image by {abs(worst - 1) * 100:.0f}% along "
                                          "one direction (unexpected for one patient; check voxel sizes in the "
                                          "headers, or use rigid only); scales "
                                          f"{', '.join(f'{s:.3f}' for s in scales)}")]
    return [_check("transform", PASS, f"proper rotation, sizes kept (determinant {det:.3f})")]


def _probe_check(name: str, gain: float, limits: dict, key: str, text: str, fail: str, warn: str,
                 passed: str) -> dict:
    """PASS / WARN / FAIL of one probe: its relative NMI gain against ``limits["fail_" + key]`` and
    ``limits["warn_" + key]``; ``text`` (what the probe measured) ends the message."""
    if gain > limits[f"fail_{key}"]:
        return _check(name, FAIL, f"{fail}: {text}")
    if gain > limits[f"warn_{key}"]:
        return _check(name, WARN, f"{warn}: {text}")
    return _check(name, PASS, f"{passed} ({text})")


def check_probes(metrics: dict, t: dict) -> list[dict]:
    probes = metrics.get("probes") or {}
    if "result_nmi" not in probes:
        return []
    limits = t["probes"]
    checks = []
    shift = probes.get("best_shift") or {}
    if shift:
        gain = float(shift["relative_gain"])
        checks.append(_probe_check(
            "probe_shift", gain, limits, "shift_relative_gain",
            f"shifting the result by {shift['name']} changes NMI by {gain * 100:+.1f}% of NMI-1",
            "the result is not the best nearby alignment", "the result may not be fully converged",
            "no small shift aligns better"))
    turn = probes.get("best_turn") or {}
    if turn:
        gain = float(turn["relative_gain"])
        checks.append(_probe_check(
            "probe_turn", gain, limits, "turn_relative_gain",
            f"turning the result by {turn['name']} changes NMI by {gain * 100:+.1f}% of NMI-1",
            "a 180-degree turn of the result fits clearly better, so it may be upside down or reversed",
            "a 180-degree turn fits about as well", "no 180-degree turn fits better"))
    mirror = probes.get("best_mirror") or {}
    if mirror and "fail_mirror_relative_gain" in limits:
        gain = float(mirror["relative_gain"])
        checks.append(_probe_check(
            "probe_mirror", gain, limits, "mirror_relative_gain",
            f"the result {mirror['name']} changes NMI by {gain * 100:+.1f}% of NMI-1",
            "a mirror image of the result fits clearly better, so one image may be mirrored: check the signs of "
            "spacing / direction in its header (a registration cannot undo a mirror)",
            "a mirror image of the result fits about as well (a nearly symmetric object?)",
            "no mirror image fits better"))
    return checks + _wide_probe_checks(probes.get("wide") or {}, limits)


def _wide_probe_checks(wide: dict, limits: dict) -> list[dict]:
    """The wide probes: the result slid along the body, turned 180 degrees then refined, and refined itself
    (coarse grid)."""
    checks = []
    grid = f"({wide.get('grid_mm')} mm grid)"
    slide = wide.get("best_slide") or {}
    if slide and "fail_slide_relative_gain" in limits:
        gain = float(slide["relative_gain"])
        checks.append(_probe_check(
            "probe_slide", gain, limits, "slide_relative_gain",
            f"the result {slide['name']} changes NMI by {gain * 100:+.1f}% of NMI-1 {grid}",
            "the result may sit at the wrong place along the body (a slab or a partial field of view slides easily)",
            "a slid position fits about as well", "no slid position fits better"))
    turn = wide.get("best_refined_turn") or {}
    if turn and "fail_refined_turn_relative_gain" in limits:
        gain = float(turn["relative_gain"])
        checks.append(_probe_check(
            "probe_turn_refined", gain, limits, "refined_turn_relative_gain",
            f"{turn['name']}: NMI changes by {gain * 100:+.1f}% of NMI-1 {grid}",
            "a 180-degree turn of the result, refined, fits clearly better, so it may be upside down or reversed",
            "a refined 180-degree turn fits almost as well, so the object may look alike turned: check its "
            "orientation in the pictures", "no refined 180-degree turn fits as well"))
    refined = wide.get("refined_result") or {}
    if refined and "fail_refined_result_relative_gain" in limits:
        gain = float(refined["relative_gain"])
        checks.append(_probe_check(
            "probe_refined", gain, limits, "refined_result_relative_gain",
            f"a short search around the result raises NMI by {gain * 100:+.1f}% of NMI-1 {grid}",
            "a nearby pose fits clearly better, so the result is off", "a nearby pose fits better",
            "no nearby pose fits clearly better"))
    return checks


_METRIC_CHECKS: list[Callable[[dict, dict], list[dict]]] = [
    check_related, check_overlap, check_similarity, check_structures, check_landmarks, check_jacobian, check_transform,
    check_probes,
]


def checks(report: dict, thresholds: dict | None = None) -> list[dict]:
    """Every check with its status (PASS/WARN/FAIL) and a one-sentence message, in report order."""
    t = thresholds or load_thresholds()
    metrics = report.get("metrics") or {}
    out = check_error(report, t) + check_content(report, t)
    for check in _METRIC_CHECKS:
        out.extend(check(metrics, t))
    return out


def judge(report: dict, thresholds: dict | None = None) -> tuple[str, list[str]]:
    """(verdict, reasons): FAIL if any check fails, WARN if any warns, else PASS.

    Reasons list the failing and warning checks (worst first); for PASS they list what was checked.
    With no metrics at all the verdict is WARN ("nothing to judge").
    """
    results = checks(report, thresholds)
    if not results:
        return WARN, ["no quality metrics were computed, so the result could not be checked"]
    worst = max(results, key=lambda c: _RANK[c["status"]])["status"]
    if worst == PASS:
        return PASS, [c["message"] for c in results]
    bad = sorted((c for c in results if c["status"] in (WARN, FAIL)), key=lambda c: -_RANK[c["status"]])
    return worst, [f"{c['status']}: {c['message']}" for c in bad]


def apply_verdict(report: dict, thresholds: dict | None = None) -> str:
    """Judge ``report`` and store ``verdict``, ``verdict_reasons`` and ``qa_checks`` in it; return the verdict.

    Reasons starting with "NOTE:" (e.g. the automatic fallback) survive re-judging, once each.
    """
    verdict, reasons = judge(report, thresholds)
    notes = [r for r in report.get("verdict_reasons") or [] if str(r).startswith("NOTE:") and r not in reasons]
    report["verdict"] = verdict
    report["verdict_reasons"] = reasons + notes
    report["qa_checks"] = checks(report, thresholds)
    return verdict

