"""Each structure's verdict (PASS / WARN / FAIL) with reasons, from its own measurements.

Thresholds: ``resources/structure_thresholds.json`` (docs/per_structure.md). The checks, worst first:

* FAIL: no transform (the structure was missing, too small, outside the moving field of view, or the engine
  failed); with moving labels of the same name, Dice below ``fail_dice`` or centroid distance above
  ``fail_centroid_mm`` after registration;
* WARN: the registration lowered the masked mutual information, so the global transform (or the local search's
  pose) was kept; the structure's mask holds fewer than ``warn_mask_voxels`` voxels (its MI is uncertain); a small
  shift or turn of the result scores higher (not at the optimum); re-registrations from the result turned about its
  flattest principal axis end elsewhere with as high a masked MI (``consistency_*``: not pinned down); the
  consistency check replaced the registration's result by a pose more than ``consistency_max_disagreement_mm`` away
  (the registration missed the optimum); the structure lies partly outside the moving image; a large motion
  relative to the global transform, or a move of more than ``motion_needs_gain_mm`` for a negligible MI gain; Dice /
  centroid distance between the warn and fail limits;
* PASS otherwise: the structure's own registration is at a local optimum of the masked MI, no worse than the global
  transform, consistent with the moving labels when there are some.

Transforms behind the numbers map FIXED physical points to MOVING physical points (LPS mm).
"""

from __future__ import annotations

from ..resource_files import load_settings

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
_RANK = {PASS: 0, WARN: 1, FAIL: 2}


def thresholds() -> dict:
    """``resources/structure_thresholds.json`` without its comment keys."""
    return load_settings("structure_thresholds.json")


def judge(record: dict, limits: dict | None = None) -> tuple[str, list[str]]:
    """(verdict, reasons) of one structure's record (:meth:`register.StructureResult.to_report` without the
    verdict): ``error``, ``metrics`` (``mi``, ``probes``, ``inside_fraction``, ``labels``),
    ``motion_relative_to_global`` and ``guard``."""
    t = limits or thresholds()
    if record.get("error"):
        return FAIL, [record["error"]]
    checks: list[tuple[str, str]] = []
    metrics = record.get("metrics") or {}
    guard = record.get("guard") or {}
    if guard.get("kept") == "global":
        checks.append((WARN, f"its registration lowered the masked mutual information ({guard['mi_global']:.4f} -> "
                             f"{guard['mi_registered']:.4f} nats): the global transform was kept"))
    elif guard.get("kept") == "search":
        checks.append((WARN, f"its registration lowered the masked mutual information from where the local search "
                             f"started it ({guard['mi_search']:.4f} -> {guard['mi_registered']:.4f} nats): the "
                             "search's pose was kept and refined; check the pictures"))
    probes = metrics.get("probes") or {}
    if probes.get("best_gain") is not None and probes["best_gain"] > t["probe_tolerance"]:
        checks.append((WARN, f"a small change of the result ({probes['best']}) raises the masked mutual information by "
                             f"{probes['best_gain']:.3f} nats: the registration may have stopped short of the optimum"))
    consistency = metrics.get("consistency") or {}
    if consistency.get("switched") and (consistency.get("switched_mm") or 0.0) > t["consistency_max_disagreement_mm"]:
        gain = consistency.get("switch_gain")
        checks.append((WARN, f"its registration ended {consistency['switched_mm']:.2f} mm (mean displacement) from a "
                             f"pose that scores higher ({'+' + format(gain * 100, '.1f') + '% ' if gain else ''}masked "
                             f"mutual information, re-registered from {consistency.get('switched_from')}), which was "
                             "kept: the registration missed the optimum, and a greedy re-registration does not prove "
                             "the pose; check the pictures"))
    if consistency.get("disagreement_mm") is not None and \
            consistency["disagreement_mm"] > t["consistency_max_disagreement_mm"]:
        also = sorted({end["start"] for m in consistency.get("metrics", []) for end in m.get("ends", [])
                       if end.get("start")})
        checks.append((WARN, f"re-registered from turns of {consistency['turn_deg']:.0f} degrees about its flattest "
                             f"axis{''.join(' and from ' + start for start in also)}, poses up to "
                             f"{consistency['disagreement_mm']:.2f} mm (mean displacement) from the "
                             "result score within tolerance of the best masked mutual information: the metric does not "
                             "pin it down; check the pictures"))
    voxels = (record.get("crop") or {}).get("mask_voxels")
    if voxels is not None and voxels < t["warn_mask_voxels"]:
        checks.append((WARN, f"a small region ({voxels} voxels in its mask at the working spacing): the masked "
                             "mutual information of so few voxels is uncertain; check the pictures"))
    inside = metrics.get("inside_fraction")
    if inside is not None and inside < t["warn_inside_fraction"]:
        checks.append((WARN, f"only {inside * 100:.0f}% of the structure lies inside the moving image: the part "
                             "outside is not checked"))
    motion = record.get("motion_relative_to_global") or {}
    if motion.get("rotation_deg", 0.0) > t["warn_rotation_deg"] or \
            motion.get("mean_displacement_mm", 0.0) > t["warn_mean_displacement_mm"]:
        checks.append((WARN, f"it moved far from the global transform ({motion['rotation_deg']:.1f} degrees, "
                             f"{motion['mean_displacement_mm']:.1f} mm mean displacement): check the pictures"))
    mi = metrics.get("mi") or {}
    if motion.get("mean_displacement_mm", 0.0) > t["motion_needs_gain_mm"] and mi.get("gain") is not None \
            and mi["gain"] < t["min_mi_gain_for_motion"]:
        checks.append((WARN, f"it moved {motion['mean_displacement_mm']:.1f} mm from the global transform for a "
                             f"masked MI gain of only {mi['gain']:.4f} nats: check the pictures"))
    labels = (metrics.get("labels") or {}).get("after") or {}
    dice, distance = labels.get("dice"), labels.get("centroid_distance_mm")
    if dice is not None:
        if dice < t["fail_dice"] or (distance is not None and distance > t["fail_centroid_mm"]):
            checks.append((FAIL, f"the moving labels disagree: Dice {dice:.2f}, centroid distance {distance:.1f} mm"))
        elif dice < t["warn_dice"] or (distance is not None and distance > t["warn_centroid_mm"]):
            checks.append((WARN, f"the moving labels agree only partly: Dice {dice:.2f}, centroid distance "
                                 f"{distance:.1f} mm"))
    if not checks:
        gain = mi.get("gain")
        text = "its own registration is at an optimum of the masked mutual information"
        if gain is not None:
            text += f" ({mi['global']:.3f} -> {mi['registered']:.3f} nats against the global transform)"
        if dice is not None:
            text += f"; moving labels: Dice {dice:.2f}, centroid distance {distance:.1f} mm"
        return PASS, [text]
    worst = max(_RANK[status] for status, _ in checks)
    verdict = next(status for status, rank in _RANK.items() if rank == worst)
    return verdict, [text for status, text in checks if _RANK[status] == worst] + \
        [text for status, text in checks if _RANK[status] < worst]
