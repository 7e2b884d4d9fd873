"""The wide probes of the verdict: a result far from the truth in a way the small probes cannot see.

Found by the verdict study (docs/qa.md, "The verdict, measured"): a thin slab (a partial field of view) slid along
the body by tens of millimetres sits in a local optimum of NMI, so +-6 mm shifts and exact half-turns do not
improve it and the run PASSed or WARNed. Sliding the result in 15 mm steps sees the better place.
"""

from __future__ import annotations

import numpy as np
import pytest

from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.geometry.resample import coarse_copy
from MultimodalPrealignLib.qa import measure, verdict
from MultimodalPrealignLib.synthetic import phantoms


@pytest.fixture(scope="module")
def slab_pair():
    return phantoms.make_pair(seed=7, rotation_deg=10, translation_mm=20, moving_fov="slab", slab_fraction=0.35,
                              fixed_spacing=(4.0, 4.0, 4.0), moving_spacing=(4.0, 4.0, 5.0), labels=False)


def _checks(pair, result) -> tuple[str, dict, list[str]]:
    block = measure.evaluate(pair.fixed, pair.moving, result, result)  # pre-alignment = result: no NMI drop
    report = {"metrics": block}
    return verdict.judge(report)[0], {c["check"]: c["status"] for c in verdict.checks(report)}, verdict.judge(report)[1]


def test_a_slab_slid_along_the_body_fails(slab_pair):
    """Before: WARN (the best +-6 mm shift gained 5%, every other check passed), for a result 40 mm off."""
    slid = transforms.compose(transforms.translation((0.0, 0.0, 40.0)), slab_pair.fixed_to_moving)
    points = phantoms.body_points(slab_pair, 500)
    assert transforms.mean_point_error(slid, slab_pair.fixed_to_moving, points) > 30.0
    result, checks, reasons = _checks(slab_pair, slid)
    assert result == "FAIL" and checks["probe_slide"] == "FAIL", reasons
    assert any("wrong place along the body" in r for r in reasons), reasons


def test_the_true_slab_passes_every_probe(slab_pair):
    result, checks, reasons = _checks(slab_pair, slab_pair.fixed_to_moving)
    assert result == "PASS", reasons
    assert {checks[name] for name in ("probe_slide", "probe_turn_refined", "probe_mirror")} == {"PASS"}


def test_refine_pose_climbs_back_to_the_truth(slab_pair):
    """The refinement behind the refined-turn probe: from the truth 6 degrees and 8 mm off, it finds a pose with
    a higher NMI than where it started, closer to the truth."""
    fixed = coarse_copy(slab_pair.fixed, 8.0)
    moving = coarse_copy(slab_pair.moving, 8.0)
    truth = transforms.to_matrix(slab_pair.fixed_to_moving)
    centre = np.asarray(phantoms.body_box().center)
    off = truth @ measure._about(measure._euler(0.0, 0.0, np.radians(6.0)), centre, (8.0, 0.0, 0.0))
    start = measure._nmi_samples(fixed, moving, off)[0]
    best, pose, evaluations = measure.refine_pose(fixed, moving, off, centre, 1.0, 60)
    assert best > start and evaluations <= 60
    points = phantoms.body_points(slab_pair, 300)
    before = transforms.mean_point_error(transforms.affine_from_matrix(off), slab_pair.fixed_to_moving, points)
    after = transforms.mean_point_error(transforms.affine_from_matrix(pose), slab_pair.fixed_to_moving, points)
    assert after < before, (before, after)
