"""QA verdict: correct registrations PASS, deliberately broken ones (wrong flip, 30 mm shift, mirror) FAIL,
each rule fires on hand-made metric blocks, and the fallback/exit-code helpers behave as documented."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.pipeline import fallback
from MultimodalPrealignLib.qa import measure, metrics, verdict
from MultimodalPrealignLib.synthetic import phantoms


def _turn_about_ap(center) -> sitk.Euler3DTransform:
    """180 degrees about the A-P axis: the head-first / feet-first mistake (also swaps left and right)."""
    turn = sitk.Euler3DTransform()
    turn.SetCenter([float(v) for v in center])
    turn.SetRotation(0.0, np.pi, 0.0)
    return turn


def _broken(pair, kind: str) -> sitk.Transform:
    center = phantoms.body_box().center
    if kind == "shift30":
        return transforms.compose(transforms.translation((30.0, 0.0, 0.0)), pair.fixed_to_moving)
    if kind == "shift30_S":
        return transforms.compose(transforms.translation((0.0, 0.0, 30.0)), pair.fixed_to_moving)
    if kind == "flip":
        return transforms.compose(_turn_about_ap(center), pair.fixed_to_moving)
    if kind == "mirror":
        return transforms.compose(transforms.affine_from_matrix(np.diag([-1.0, 1, 1, 1]), center),
                                  pair.fixed_to_moving)
    return pair.fixed_to_moving


def _prealigned(pair) -> sitk.Transform:
    """A plausible pre-alignment: the truth, 7 mm off."""
    return transforms.compose(transforms.translation((3.0, -4.0, 5.0)), pair.fixed_to_moving)


@pytest.fixture(scope="module")
def full_pair():
    return phantoms.make_pair(seed=5, rotation_deg=15, translation_mm=25, fixed_spacing=(4.0, 4.0, 4.0),
                              moving_spacing=(4.0, 4.0, 5.0))


@pytest.fixture(scope="module")
def slab_pair():
    return phantoms.make_pair(seed=7, rotation_deg=20, translation_mm=40, flip=True, moving_fov="slab",
                              fixed_spacing=(4.0, 4.0, 4.0), moving_spacing=(4.0, 4.0, 5.0))


@pytest.mark.parametrize("kind,expected", [("true", "PASS"), ("shift30", "FAIL"), ("flip", "FAIL"),
                                           ("mirror", "FAIL")])
def test_images_only_verdict_on_full_field_of_view(full_pair, kind, expected):
    block = measure.evaluate(full_pair.fixed, full_pair.moving, _prealigned(full_pair), _broken(full_pair, kind))
    result, reasons = verdict.judge({"metrics": block})
    assert result == expected, reasons
    if expected == "PASS":
        assert block["after"]["nmi"] > block["before"]["nmi"]


@pytest.mark.parametrize("kind,expected", [("true", "PASS"), ("shift30_S", "FAIL"), ("flip", "FAIL")])
def test_label_verdict_on_a_partial_field_of_view(slab_pair, kind, expected):
    pairs = metrics.structure_pairs(slab_pair.fixed_task, slab_pair.moving_task)
    block = measure.evaluate(slab_pair.fixed, slab_pair.moving, _prealigned(slab_pair), _broken(slab_pair, kind),
                        slab_pair.fixed_labels, slab_pair.moving_labels, pairs=pairs, probes=False)
    result, reasons = verdict.judge({"metrics": block})
    assert result == expected, reasons
    if kind == "shift30_S":
        assert any("structures" in r for r in reasons)


def _metrics(**extra) -> dict:
    block = {"before": {"mi": 0.30, "nmi": 1.20, "overlap_fraction_fixed": 0.9, "overlap_fraction_moving": 1.0},
             "after": {"mi": 0.40, "nmi": 1.25, "overlap_fraction_fixed": 0.9, "overlap_fraction_moving": 1.0}}
    block.update(extra)
    return {"metrics": block}


def test_each_rule_fires_on_its_own():
    assert verdict.judge(_metrics())[0] == "PASS"
    small = _metrics(after={"nmi": 1.25, "overlap_fraction_fixed": 0.1, "overlap_fraction_moving": 0.15})
    assert verdict.judge(small)[0] == "FAIL"
    worse = _metrics(after={"nmi": 1.15, "overlap_fraction_fixed": 0.9, "overlap_fraction_moving": 1.0})
    result, reasons = verdict.judge(worse)
    assert result == "FAIL" and "agree less than pre-alignment" in reasons[0]
    slightly = _metrics(after={"nmi": 1.195, "overlap_fraction_fixed": 0.9, "overlap_fraction_moving": 1.0})
    assert verdict.judge(slightly)[0] == "WARN"
    folding = _metrics(jacobian={"min": -0.3, "max": 2.0, "folding_percent": 1.2})
    assert verdict.judge(folding)[0] == "FAIL"
    few = _metrics(jacobian={"min": -0.1, "max": 2.0, "folding_percent": 0.01})
    assert verdict.judge(few)[0] == "WARN"
    mirrored = _metrics(transform={"determinant": -1.0})
    assert verdict.judge(mirrored)[0] == "FAIL"
    shrunk = _metrics(transform={"determinant": 0.8})  # 7% smaller along each axis
    assert verdict.judge(shrunk)[0] == "WARN"
    assert verdict.judge(_metrics(transform={"determinant": 0.98}))[0] == "PASS"
    tre = _metrics(landmarks={"after": {"count": 3, "mean_tre_mm": 9.0, "max_tre_mm": 12.0, "points": []}})
    assert verdict.judge(tre)[0] == "FAIL"
    assert verdict.judge({"error": "engine crashed", **_metrics()})[0] == "FAIL"
    assert verdict.judge({})[0] == "WARN"


def test_structure_rule_uses_median_distance_and_compares_with_prealignment():
    def rows(distance):
        return {"structures": [{"name": f"s{i}", "dice": 0.8, "centroid_distance_mm": distance + 0.1 * i,
                                "fixed_volume_ml": 50.0, "fraction_in_overlap": 1.0} for i in range(5)]}

    good = _metrics(structures={"before": rows(2.0), "after": rows(1.0)})
    assert verdict.judge(good)[0] == "PASS"
    far = _metrics(structures={"before": rows(2.0), "after": rows(12.0)})
    result, reasons = verdict.judge(far)
    assert result == "FAIL" and any("more than 10 mm" in r for r in reasons)
    moved_apart = _metrics(structures={"before": rows(0.5), "after": rows(4.0)})
    assert verdict.judge(moved_apart)[0] == "WARN"
    tiny = {"structures": [{"name": "x", "dice": 0.0, "centroid_distance_mm": 50.0, "fixed_volume_ml": 0.2,
                            "fraction_in_overlap": 1.0}]}
    assert verdict.judge(_metrics(structures={"after": tiny}))[0] == "WARN"  # nothing judged -> WARN


def test_thresholds_resource_is_complete_and_documented():
    t = verdict.load_thresholds()
    for section in ("overlap", "similarity", "structures", "landmarks", "jacobian", "transform", "probes"):
        assert "_about" in t[section]
    assert t["structures"]["fail_median_centroid_mm"] > t["structures"]["warn_median_centroid_mm"]


def test_apply_verdict_stores_top_level_keys_and_exit_codes():
    report = _metrics(transform={"determinant": -1.0})
    assert verdict.apply_verdict(report) == "FAIL"
    assert report["verdict"] == "FAIL" and report["verdict_reasons"] and report["qa_checks"]
    assert verdict.exit_code_for("FAIL") == verdict.EXIT_VERDICT_FAIL != 0
    assert verdict.exit_code_for("WARN") == 0 and verdict.exit_code_for("PASS") == 0
    assert fallback.should_fall_back(report)
    assert not fallback.should_fall_back(_metrics())


def test_fallback_plan_and_record():
    plan = fallback.fallback_plan(["anatomy", "search", "moments"], ["itk", "elastix"], max_attempts=4)
    assert plan == [("anatomy", "itk"), ("search", "itk"), ("anatomy", "elastix"), ("moments", "itk")]
    assert fallback.fallback_plan(["moments"], ["itk"]) == [("moments", "itk")]
    final = _metrics()
    verdict.apply_verdict(final)
    attempts = [{"prealign": "anatomy", "engine": "itk", "verdict": "FAIL", "verdict_reasons": ["FAIL: x"]},
                {"prealign": "search", "engine": "itk", "verdict": "PASS", "verdict_reasons": []}]
    record = fallback.record_fallback(final, attempts, chosen=1)
    assert record["used"] and record["chosen"] == 1
    assert any("automatic fallback" in r for r in final["verdict_reasons"])
    best = max([{"verdict": "FAIL", **_metrics()}, {"verdict": "WARN", **_metrics()}], key=fallback.attempt_score)
    assert best["verdict"] == "WARN"


def test_prealign_candidates_become_distinct_fallback_transforms():
    flip = np.diag([-1.0, 1.0, -1.0, 1.0])
    flip[:3, 3] = [5.0, 0.0, 2.0]
    records = [{"stage": "global", "source": "grid", "score": 0.9},  # no pose: ignored
               {"stage": "refined", "source": "a", "score": 0.55, "matrix_4x4": np.eye(4)[:3].tolist()},
               {"stage": "refined", "source": "b", "score": 0.50,
                "matrix_4x4": (np.eye(4) + np.diag([0, 0, 0, 0]))[:3].tolist()},  # same pose as a
               {"stage": "refined", "source": "c", "score": 0.40, "matrix_4x4": flip[:3].tolist()}]
    found = fallback.prealign_candidate_transforms(records)
    assert [label.split()[1] for label, _ in found] == ["a", "c"]
    assert np.allclose(transforms.to_matrix(found[1][1]), flip)


def test_run_with_fallback_stops_at_the_first_attempt_that_does_not_fail():
    calls = []

    def attempt(choice, engine):  # stands in for one pipeline run (pre-alignment + registration + metrics)
        calls.append((choice, engine))
        nmi = {"anatomy": 1.10, "search": 1.26, "moments": 1.30}[choice]  # anatomy made things worse
        return _metrics(after={"nmi": nmi, "overlap_fraction_fixed": 0.9, "overlap_fraction_moving": 1.0}), choice

    plan = fallback.fallback_plan(["anatomy", "search", "moments"], ["itk", "elastix"])
    report, payload, index = fallback.run_with_fallback(attempt, plan)
    assert calls == [("anatomy", "itk"), ("search", "itk")] and payload == "search" and index == 1
    assert report["verdict"] == "PASS" and report["fallback"]["used"]
    assert report["fallback"]["attempts"][0]["verdict"] == "FAIL"

    def always_fails(choice, engine):
        return _metrics(after={"nmi": 1.0 + 0.01 * len(engine), "overlap_fraction_fixed": 0.1,
                               "overlap_fraction_moving": 0.1}), (choice, engine)

    report, payload, index = fallback.run_with_fallback(always_fails, plan)
    assert report["verdict"] == "FAIL" and len(report["fallback"]["attempts"]) == len(plan)
    assert payload[1] == "elastix"  # best NMI among the failures (longer engine name -> higher NMI here)


def _folding_bspline(image: sitk.Image, amplitude_mm: float) -> sitk.BSplineTransform:
    """B-spline over ``image`` with a seeded random field; large amplitudes fold (independently checked)."""
    bspline = sitk.BSplineTransformInitializer(image, [4, 4, 4])
    rng = np.random.default_rng(1)
    bspline.SetParameters((rng.normal(0.0, amplitude_mm, bspline.GetNumberOfParameters())).tolist())
    return bspline


def test_folding_deformation_fails_and_smooth_one_passes(full_pair):
    block_ok = None
    for amplitude, expected in ((0.5, "PASS"), (80.0, "FAIL")):
        deform = _folding_bspline(full_pair.fixed, amplitude)
        after = transforms.compose(deform, full_pair.fixed_to_moving)  # deform in fixed space, then the truth
        block = measure.evaluate(full_pair.fixed, full_pair.moving, _prealigned(full_pair), after, probes=False)
        result, reasons = verdict.judge({"metrics": block})
        assert "jacobian" in block
        if expected == "PASS":
            block_ok = block
            assert block["jacobian"]["folding_percent"] == 0.0
        else:
            assert block["jacobian"]["folding_percent"] > 0.5 and result == "FAIL"
            assert any("folds" in r for r in reasons)
    assert block_ok["jacobian"]["min"] > 0.5


def test_anisotropic_scaling_warns_even_when_the_volume_is_kept():
    matrix = np.diag([1.1, 1.0, 1.0 / 1.1, 1.0])  # determinant 1, but 10% stretch along x
    check = measure.transform_check(transforms.affine_from_matrix(matrix))
    assert check["determinant"] == pytest.approx(1.0) and max(check["principal_scales"]) == pytest.approx(1.1)
    result, reasons = verdict.judge(_metrics(transform=check))
    assert result == "WARN" and "stretches the image by 10%" in reasons[0]
    rigid = measure.transform_check(transforms.rigid_from_matrix(np.eye(4)))
    assert verdict.judge(_metrics(transform=rigid))[0] == "PASS"


def test_a_failing_fallback_attempt_never_discards_an_earlier_result():
    """Before: two FAIL attempts with transforms, then an elastix fallback whose engine died ("Too many samples map
    outside moving image buffer"): the errored attempt (no checks, so no FAIL checks) scored best and the run
    ended with exit 3 and no outputs."""

    def attempt(choice, engine):  # stands in for one pipeline run
        if engine == "elastix":
            return {"error": "elastix lost the overlap. Fix: start closer.", "metrics": {}}, None
        return _metrics(after={"nmi": 1.01, "overlap_fraction_fixed": 0.2, "overlap_fraction_moving": 0.2}), choice

    plan = [("search", "itk"), ("candidate", "itk"), ("search", "elastix")]
    report, payload, index = fallback.run_with_fallback(attempt, plan)
    assert payload in ("search", "candidate") and index in (0, 1)  # an attempt that produced a transform
    assert [a["verdict"] for a in report["fallback"]["attempts"]] == ["FAIL", "FAIL", "FAIL"]
    assert len(report["fallback"]["attempts"]) == 3  # all attempts reported
