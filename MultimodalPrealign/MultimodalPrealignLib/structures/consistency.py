"""Is a structure's result the one pose its masked MI points to? Re-registration from turned starts.

A structure that is nearly symmetric about one of its axes (the synthetic knee's patella: a flattened ellipsoid,
cut by the microCT's field of view) leaves its turn about that axis weakly constrained: the masked MI over the
structure dilated by 3 mm changes by under 1% over a 10 degree turn about its thin axis, the soft tissue in that
shell pulls the optimum 5-11 degrees (1-2.5 mm) off, and the verdict's small probes (2 degrees, one voxel) see
nothing. :func:`check` climbs two masked MIs (the structure dilated by ``consistency_mask_dilation_mm``, which
sees the bone's edge, and the registration's metric mask) from the result and from the result turned by
+-``consistency_turn_deg`` about the principal axis whose turns lower that MI least, and from the local search's
pose (an engine may leave a good start for another optimum: the real BRAINSFit ended a synthetic patella 3.1 mm
off); the first metric's best end replaces the result when it scores clearly higher, and poses that score within
``consistency_mi_tolerance`` of their metric's best but lie more than ``consistency_max_disagreement_mm`` from the
chosen pose make the verdict WARN (the metrics do not pin the structure down).

Every transform maps FIXED physical points to MOVING physical points (LPS mm).
"""

from __future__ import annotations

import math
import time

import numpy as np
import SimpleITK as sitk

from ..geometry import transforms


def principal_axes(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centroid, 3 x 3 matrix whose columns are the principal axes of ``points``, smallest spread first, and the
    spreads: standard deviations along them, mm)."""
    centre = points.mean(0)
    variances, vectors = np.linalg.eigh(np.cov((points - centre).T))
    return centre, vectors, np.sqrt(np.maximum(variances, 0.0))


def turn_about(centre, axes: np.ndarray, rotation_deg, shift_mm) -> sitk.Euler3DTransform:
    """Fixed->fixed: a turn given as a rotation vector in the ``axes`` frame (degrees) about ``centre``, then a
    shift along ``axes`` (mm)."""
    matrix = transforms.rotation_vector_matrix(axes @ np.radians(np.asarray(rotation_deg, float)))
    turn = sitk.Euler3DTransform()
    turn.SetCenter([float(v) for v in centre])
    turn.SetMatrix(matrix.ravel().tolist(), 1e-6)
    turn.SetTranslation([float(v) for v in axes @ np.asarray(shift_mm, float)])
    return turn


def climb(score, start: sitk.Transform, centre, axes, step: float, min_step: float,
          poll=None) -> tuple[sitk.Transform, int]:
    """Greedy ascent of ``score`` (transform -> value or None) over turns (degrees) about and shifts (mm) along the
    principal ``axes`` through ``centre``, steps halved from ``step`` to ``min_step``; (end, evaluations).
    ``poll()``: called before each sweep of the 12 moves (a cancel check that raises)."""
    rotation, shift = np.zeros(3), np.zeros(3)

    def at(r, s):
        return transforms.compose(turn_about(centre, axes, r, s), start)

    value, count = score(at(rotation, shift)), 1
    value = -math.inf if value is None else value
    directions = np.vstack([np.eye(3), -np.eye(3)])
    while step >= min_step - 1e-9:
        moved = True
        while moved:
            moved = False
            if poll is not None:
                poll()
            for d in directions * step:
                for r, s in ((rotation + d, shift), (rotation, shift + d)):
                    trial = score(at(r, s))
                    count += 1
                    if trial is not None and trial > value + 1e-7:
                        rotation, shift, value, moved = r, s, trial, True
        step /= 2.0
    return at(rotation, shift), count


def check(metrics: list, result: sitk.Transform, points: np.ndarray, limits: dict,
          other_starts: tuple = (), poll=None) -> tuple[sitk.Transform, dict]:
    """(the structure's transform: ``result``, or the end that raises the first metric by more than
    ``consistency_switch_gain`` (a share of its value) over the result; the record for report.json and the verdict).

    ``metrics``: (name, measure, climb measure) per masked MI, each transform -> (MI, samples): the first (the
    structure's tight mask) chooses, every one climbs from the result and from the result turned by
    +-``consistency_turn_deg`` about its flattest principal axis, and from each of ``other_starts`` ((label,
    transform) pairs: the local search's pose). ``poll()``: a cancel check (raises). The disagreement: the largest
    mean displacement
    of the structure's ``points`` (fixed LPS mm) between the chosen pose and any pose (result or end) whose MI is
    within ``consistency_mi_tolerance`` (a share) of the best of its metric (an end from ``other_starts``: and at
    least the chosen pose's MI)."""
    started = time.perf_counter()
    centre, axes, spreads = principal_axes(points)
    turn = float(limits["consistency_turn_deg"])
    step, min_step = float(limits["consistency_step"]), float(limits["consistency_min_step"])
    share = float(limits["consistency_mi_tolerance"])
    evaluations, per_metric = 0, []
    for name, measure, climb_measure in metrics:
        def score(transform, climb_measure=climb_measure):
            return climb_measure(transform)[0]

        mi_result = measure(result)[0]
        if mi_result is None:
            continue
        turned = []  # the flattest principal axis: turns about it lower the masked MI least
        for k in range(3):
            values = [score(transforms.compose(turn_about(centre, axes, np.eye(3)[k] * s * turn, np.zeros(3)),
                                               result)) for s in (1.0, -1.0)]
            turned.append(np.mean([-math.inf if v is None else v for v in values]))
        evaluations += 6
        flattest = int(np.argmax(turned))
        rows = [{"start_turn_deg": None, "transform": result, "mi": mi_result}]
        starts = [(sign * turn, None, transforms.compose(
            turn_about(centre, axes, np.eye(3)[flattest] * sign * turn, np.zeros(3)), result))
            for sign in (0.0, 1.0, -1.0)] + [(None, label, start) for label, start in other_starts]
        for turn_deg, label, start in starts:
            end, count = climb(score, start, centre, axes, step, min_step, poll)
            evaluations += count
            value = measure(end)[0]
            if value is not None:
                rows.append({"start_turn_deg": turn_deg, "start": label, "transform": end, "mi": value})
        best = max(rows, key=lambda r: r["mi"])
        per_metric.append({"metric": name, "measure": measure, "rows": rows, "best": best, "mi_result": mi_result,
                           "axis": [round(float(v), 4) for v in axes[:, flattest]],
                           "axis_spread_mm": round(float(spreads[flattest]), 2)})
    if not per_metric:
        return result, {}
    first = per_metric[0]
    switched = first["best"]["transform"] is not result and \
        first["best"]["mi"] > first["mi_result"] + float(limits["consistency_switch_gain"]) * abs(first["mi_result"])
    chosen = first["best"]["transform"] if switched else result
    disagreement = 0.0
    for entry in per_metric:
        floor = entry["best"]["mi"] - share * abs(entry["best"]["mi"])
        chosen_mi = next((r["mi"] for r in entry["rows"] if r["transform"] is chosen), None)
        if chosen_mi is None:
            chosen_mi = entry["measure"](chosen)[0]
        for r in entry["rows"]:
            r["displacement_mm"] = transforms.mean_point_error(r["transform"], chosen, points)
            # an end from another start (the search's pose) that scores below the chosen pose stopped short of the
            # chosen pose's optimum; it is a rival only when it scores at least as high
            higher = not r.get("start") or chosen_mi is None or r["mi"] >= chosen_mi
            r["rival"] = bool(r["mi"] >= floor and higher)
            if r["rival"]:
                disagreement = max(disagreement, r["displacement_mm"])
    switch = {}
    if switched:  # how far the registration's own result was from the pose kept, and where that pose came from
        switch = {"switched_mm": round(float(transforms.mean_point_error(result, chosen, points)), 3),
                  "switched_from": first["best"].get("start") or f"the result turned by "
                                                                   f"{first['best']['start_turn_deg']:+.0f} degrees",
                  "switch_gain": round(float(first["best"]["mi"] / first["mi_result"] - 1.0), 4)
                  if first["mi_result"] else None}
    record = {"turn_deg": turn, "evaluations": evaluations, "switched": bool(switched), **switch,
              "disagreement_mm": round(float(disagreement), 3),
              "metrics": [{"metric": e["metric"], "axis": e["axis"], "axis_spread_mm": e["axis_spread_mm"],
                           "mi_result": round(float(e["mi_result"]), 5),
                           "ends": [{"start_turn_deg": r["start_turn_deg"],
                                     **({"start": r["start"]} if r.get("start") else {}),
                                     "mi": round(float(r["mi"]), 5),
                                     "displacement_mm": round(float(r["displacement_mm"]), 3), "rival": r["rival"]}
                                    for r in e["rows"]]} for e in per_metric],
              "seconds": round(time.perf_counter() - started, 3)}
    return chosen, record
