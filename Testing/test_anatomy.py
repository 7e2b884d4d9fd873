"""Anatomy pre-alignment from TotalSegmentator label maps: phantoms with exact truth, and real TotalSegmentator
output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from MultimodalPrealignLib import prealign
from MultimodalPrealignLib.errors import InputError
from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.io import labels
from MultimodalPrealignLib.prealign import PrealignInputs, anatomy, simple
from MultimodalPrealignLib.synthetic import phantoms


def _inputs(pair, **options) -> PrealignInputs:
    return PrealignInputs(pair.fixed, pair.moving, pair.fixed_labels, pair.moving_labels, pair.fixed_task,
                          pair.moving_task, options=options)


def _error_mm(pair, transform) -> float:
    return transforms.mean_point_error(transform, pair.fixed_to_moving, phantoms.body_points(pair, 1500, seed=2))


@pytest.fixture(scope="module")
def hard_pair():
    """40 degrees + head/feet flip + 150 mm, MR slab that cuts organs."""
    return phantoms.make_pair(seed=11, rotation_deg=40, translation_mm=150, flip=True, moving_fov="slab",
                              slab_fraction=0.35, slab_center_z_mm=40.0, fixed_spacing=(4.0, 4.0, 4.0),
                              moving_spacing=(3.0, 3.0, 5.0))


@pytest.fixture(scope="module")
def hard_result(hard_pair):
    return anatomy.prealign(_inputs(hard_pair))


def test_recovers_large_rotation_flip_and_translation(hard_pair, hard_result):
    assert _error_mm(hard_pair, hard_result.transform) < 2.0
    assert hard_result.details["transform_type"] == "rigid"
    assert hard_result.transform.GetName() == "Euler3DTransform"


def test_report_lists_structures_truncation_residuals_and_dice(hard_pair, hard_result):
    d = hard_result.details
    assert d["fixed_task"] == "total" and d["moving_task"] == "total_mr"
    assert len(d["used"]) >= 5
    names = {s["name"]: s for s in d["structures"]}
    assert "lung_left" in names and "vertebrae" in names  # grouped: CT lobes / CT vertebra levels
    cut = set(hard_pair.description["moving_structures_touching_border"]) & set(names)
    assert cut and set(d["truncated"]) >= cut
    for name in cut:
        entry = names[name]
        assert entry["cut_in_moving"]
        assert entry["status"] == "rejected" or "cut by a field of view" in entry["handling"]
    for entry in d["structures"]:
        assert {"residual_mm", "dice_before", "dice_after", "centroid_distance_mm", "fixed", "moving"} <= set(entry)
        assert "principal_axes" in entry["fixed"] and "volume_ml" in entry["moving"]
    used = [names[n] for n in d["used"]]
    assert np.median([e["residual_mm"] for e in used]) < 3.0
    assert d["mean_dice_common_fov_after"] > 0.8 > d["mean_dice_common_fov_before"]
    assert any("cut by a field of view" in w for w in hard_result.warnings)
    json.dumps(d)  # report.json-ready: plain Python types only


def test_deterministic(hard_pair, hard_result):
    again = anatomy.prealign(_inputs(hard_pair))
    assert np.allclose(transforms.to_matrix(again.transform), transforms.to_matrix(hard_result.transform))


def test_mr_fixed_ct_moving_and_task_inference():
    pair = phantoms.make_pair(seed=4, fixed_modality="mr", moving_modality="ct", rotation_deg=25, translation_mm=60,
                              fixed_spacing=(4.0, 4.0, 4.0), moving_spacing=(4.0, 4.0, 4.0))
    inputs = PrealignInputs(pair.fixed, pair.moving, pair.fixed_labels, pair.moving_labels)  # tasks not given
    result = anatomy.prealign(inputs)
    assert result.details["fixed_task"] == "total_mr" and result.details["moving_task"] == "total"
    assert _error_mm(pair, result.transform) < 2.0


def test_outlier_structure_is_rejected():
    pair = phantoms.make_pair(seed=5, rotation_deg=15, translation_mm=40, fixed_spacing=(4.0, 4.0, 4.0),
                              moving_spacing=(4.0, 4.0, 4.0), noise=0)
    ids = labels.task_ids("total_mr")
    moving = sitk.GetArrayFromImage(pair.moving_labels)
    moving[moving == ids["gallbladder"]] = 0
    moving[moving == ids["spleen"]] = ids["gallbladder"]  # mislabelled: "gallbladder" sits where the spleen is
    wrong = sitk.GetImageFromArray(moving)
    wrong.CopyInformation(pair.moving_labels)
    inputs = PrealignInputs(pair.fixed, pair.moving, pair.fixed_labels, wrong, "total", "total_mr")
    result = anatomy.prealign(inputs)
    assert "gallbladder" in result.details["rejected"]
    assert "outlier" in result.details["rejected"]["gallbladder"]
    assert _error_mm(pair, result.transform) < 2.0


def _keep_only(image: sitk.Image, task: str, names) -> sitk.Image:
    ids = labels.task_ids(task)
    array = sitk.GetArrayFromImage(image)
    keep = np.isin(array, [ids[n] for n in names])
    out = sitk.GetImageFromArray(np.where(keep, array, 0).astype(np.uint16))
    out.CopyInformation(image)
    return out


def test_two_structures_fall_back_to_translation_with_warning():
    pair = phantoms.make_pair(seed=6, rotation_deg=0, translation_mm=50, fixed_spacing=(4.0, 4.0, 4.0),
                              moving_spacing=(4.0, 4.0, 4.0), noise=0)
    fixed = _keep_only(pair.fixed_labels, "total", ["liver", "spleen"])
    moving = _keep_only(pair.moving_labels, "total_mr", ["liver", "spleen"])
    result = anatomy.prealign(PrealignInputs(pair.fixed, pair.moving, fixed, moving, "total", "total_mr"))
    assert result.details["transform_type"] == "translation"
    assert any("translation only" in w for w in result.warnings)
    assert _error_mm(pair, result.transform) < 2.0  # pure translation truth


def test_similarity_option_recovers_a_scale():
    grid = phantoms.grid_for((360, 260, 540), (4.0, 4.0, 4.0), center=(0, 0, -10))
    fixed, fixed_labels = phantoms.render("ct", grid, label_task="total", noise=0)
    truth = np.eye(4)
    truth[:3, :3] = 1.08 * phantoms.rotation_about_axis([0.2, 1.0, 0.1], 12)
    truth[:3, 3] = [10, -20, 15]
    moving_grid = phantoms.grid_for((420, 320, 620), (4.0, 4.0, 4.0), center=truth[:3, :3] @ [0, 0, -10] + truth[:3, 3])
    moving, moving_labels = phantoms.render("mr", moving_grid, np.linalg.inv(truth), label_task="total_mr", noise=0)
    inputs = PrealignInputs(fixed, moving, fixed_labels, moving_labels, "total", "total_mr",
                            options={"anatomy": {"transform": "similarity"}})
    result = anatomy.prealign(inputs)
    m = transforms.to_matrix(result.transform)
    assert result.details["transform_type"] == "similarity"
    assert np.cbrt(np.linalg.det(m[:3, :3])) == pytest.approx(1.08, abs=0.01)
    points = phantoms.body_points(sitk.Cast(fixed_labels > 0, sitk.sitkUInt8), 1000)
    true = transforms.affine_from_matrix(truth)
    assert transforms.mean_point_error(result.transform, true, points) < 2.0


def test_label_overlap_refinement_runs_and_reports():
    pair = phantoms.make_pair(seed=8, rotation_deg=20, translation_mm=30, fixed_spacing=(5.0, 5.0, 5.0),
                              moving_spacing=(5.0, 5.0, 5.0))
    result = anatomy.prealign(_inputs(pair, anatomy_refine_labels=True))
    refinement = result.details["refinement"]
    assert refinement["requested"] is True and "kept" in refinement
    assert refinement["mean_dice_used_after"] > 0.8
    assert _error_mm(pair, result.transform) < 2.0


@pytest.fixture(scope="module")
def thin_slab_pair():
    """A 16% MR slab (15 degrees, 26 mm): every structure it shows is cut at both slab ends, and the long ones
    (aorta, vertebrae, autochthon, vena cava) pin the rotation poorly by their centroids."""
    return phantoms.make_pair(seed=777_011, rotation_deg=14.7, translation_mm=26.4, moving_fov="slab",
                              slab_fraction=0.157, slab_center_z_mm=-99.6, fixed_spacing=(3.0, 3.0, 3.0),
                              moving_spacing=(2.5, 2.5, 5.0), supersample=2)


def test_label_refinement_in_the_common_fov_recovers_a_thin_slab(thin_slab_pair):
    pair = thin_slab_pair
    centroids_only = anatomy.prealign(_inputs(pair, anatomy_refine_labels=False))
    assert _error_mm(pair, centroids_only.transform) > 10.0  # measured 20.7 mm, 18.7 degrees off
    assert centroids_only.details["refinement"] == {"requested": False, "why": "not requested"}
    result = anatomy.prealign(_inputs(pair))  # default "auto": structures are cut, so it refines
    refinement = result.details["refinement"]
    assert refinement["requested"] and refinement["why"].startswith("auto") and refinement["kept"]
    assert refinement["mean_dice_used_after"] > refinement["mean_dice_used_before"] + 0.2
    assert _error_mm(pair, result.transform) < 2.5  # measured 0.7 mm


def test_common_fov_dice_compares_only_where_both_images_exist(thin_slab_pair):
    pair = thin_slab_pair
    fixed_map, moving_map = anatomy.canonical_maps(labels.names_in(pair.fixed_labels, pair.fixed_task),
                                                   labels.names_in(pair.moving_labels, pair.moving_task))
    numbers = {name: i + 1 for i, name in enumerate(sorted(set(fixed_map.values()) & set(moving_map.values())))}
    fixed = anatomy._label_side(anatomy.canonical_image(pair.fixed_labels, fixed_map, numbers), numbers.values(),
                                1.5, 600)
    moving = anatomy._label_side(anatomy.canonical_image(pair.moving_labels, moving_map, numbers), numbers.values(),
                                 1.5, 600)
    truth = transforms.to_matrix(pair.fixed_to_moving)
    at_truth = anatomy.common_fov_dice(fixed, moving, truth)
    # the slab cuts the liver, kidneys, aorta ...: inside the common field of view they still overlap well
    assert len(at_truth) >= 5 and np.mean(list(at_truth.values())) > 0.8
    slid = truth.copy()
    slid[:3, 3] += truth[:3, :3] @ np.array([0.0, 0.0, 10.0])  # 10 mm along the body
    assert np.mean(list(anatomy.common_fov_dice(fixed, moving, slid).values())) < np.mean(list(at_truth.values()))


def test_no_common_structure_is_a_clear_input_error():
    pair = phantoms.make_pair(seed=9, fixed_spacing=(5.0, 5.0, 5.0), moving_spacing=(5.0, 5.0, 5.0), noise=0)
    fixed = _keep_only(pair.fixed_labels, "total", ["liver"])
    moving = _keep_only(pair.moving_labels, "total_mr", ["spleen"])
    with pytest.raises(InputError, match="share no usable structure"):
        anatomy.prealign(PrealignInputs(pair.fixed, pair.moving, fixed, moving, "total", "total_mr"))
    with pytest.raises(InputError, match="Unknown TotalSegmentator task"):
        anatomy.prealign(PrealignInputs(pair.fixed, pair.moving, pair.fixed_labels, pair.moving_labels, "totl", None))


def test_registry_runs_anatomy_and_auto_picks_it():
    pair = phantoms.make_pair(seed=10, rotation_deg=10, translation_mm=20, fixed_spacing=(5.0, 5.0, 5.0),
                              moving_spacing=(5.0, 5.0, 5.0))
    assert "anatomy" in prealign.available_methods()
    result = prealign.run_prealign("auto", _inputs(pair))
    assert result.method == "anatomy" and result.details["requested"] == "auto"
    assert _error_mm(pair, result.transform) < 2.5


def test_kabsch_handles_flips_exactly():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(6, 3)) * 50
    r = phantoms.rotation_about_axis([0.3, 0.9, -0.2], 170) @ phantoms.FLIP_HEAD_FEET
    q = p @ r.T + [5, -7, 9]
    m = anatomy.kabsch(p, q)
    assert np.allclose(m[:3, :3], r, atol=1e-9) and np.allclose(m[:3, 3], [5, -7, 9], atol=1e-9)


# ------------------------------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def real_result(totalseg_examples):
    names = ["example_ct_sm.nii.gz", "example_seg.nii.gz", "example_mr_sm.nii.gz", "example_seg_mr.nii.gz"]
    if not all((totalseg_examples / n).exists() for n in names):
        pytest.skip("totalseg-examples absent")
    fixed = sitk.Cast(sitk.ReadImage(str(totalseg_examples / names[0])), sitk.sitkFloat32)
    moving = sitk.Cast(sitk.ReadImage(str(totalseg_examples / names[2])), sitk.sitkFloat32)
    fixed_labels, fixed_task = labels.load_labels(totalseg_examples / names[1], fixed, "fixed label map")
    moving_labels, moving_task = labels.load_labels(totalseg_examples / names[3], moving, "moving label map")
    inputs = PrealignInputs(fixed, moving, fixed_labels, moving_labels, fixed_task, moving_task)
    return inputs, anatomy.prealign(inputs)


@pytest.mark.realdata
def test_real_totalsegmentator_slabs_align_key_organs(real_result):
    inputs, result = real_result
    d = result.details
    entries = {s["name"]: s for s in d["structures"]}
    key = ["liver", "spleen", "kidney_left", "kidney_right"]
    after = np.mean([entries[n]["centroid_distance_mm"] for n in key])
    before = np.mean([entries[n]["centroid_distance_before_mm"] for n in key])
    assert before > 140 and after < 20, (before, after)
    # which structures were used and which were rejected (and why) is in the report
    assert {"liver", "kidney_left", "kidney_right"} <= set(d["used"])
    assert d["rejected"] and all(reason for reason in d["rejected"].values())
    assert any("cut by a field of view" in reason for reason in d["rejected"].values())
    assert "liver" in d["truncated"]
    assert d["fit"]["converged"]


@pytest.mark.realdata
def test_real_dice_beats_header_and_geometry(real_result):
    inputs, result = real_result
    d = result.details
    fixed_names = labels.names_in(inputs.fixed_labels, d["fixed_task"])
    moving_names = labels.names_in(inputs.moving_labels, d["moving_task"])
    fixed_map, moving_map = anatomy.canonical_maps(fixed_names, moving_names)
    shared = sorted(set(fixed_map.values()) & set(moving_map.values()))
    numbers = {n: i + 1 for i, n in enumerate(shared)}
    f = anatomy.canonical_image(inputs.fixed_labels, fixed_map, numbers)
    m = anatomy.canonical_image(inputs.moving_labels, moving_map, numbers)
    key = ["liver", "spleen", "kidney_left", "kidney_right"]

    def mean_dice(transform) -> float:
        whole, _ = anatomy.dice_scores(f, m, transforms.to_matrix(transform), numbers)
        return float(np.mean([whole[n] for n in key]))

    header = mean_dice(simple.prealign_header(inputs).transform)
    geometry = mean_dice(simple.prealign_geometry(inputs).transform)
    ours = mean_dice(result.transform)
    assert ours > max(header, geometry) + 0.05, (header, geometry, ours)  # measured 0.00 / 0.34 / 0.46


def test_full_pipeline_with_anatomy_prealignment():
    """Anatomy pre-alignment + crop + itk rigid registration on a rotated MR slab (tasks inferred)."""
    from MultimodalPrealignLib.pipeline import PipelineOptions, run_pipeline

    pair = phantoms.make_pair(seed=12, rotation_deg=30, translation_mm=100, moving_fov="slab", slab_fraction=0.45,
                              fixed_spacing=(4.0, 4.0, 4.0), moving_spacing=(4.0, 4.0, 4.0), supersample=2)
    result = run_pipeline(pair.fixed, pair.moving, PipelineOptions.create(prealign="anatomy", stages=("rigid",)),
                          fixed_labels=pair.fixed_labels, moving_labels=pair.moving_labels)
    details = result.report["prealign"]["details"]
    assert details["fixed_task"] == "total" and details["moving_task"] == "total_mr"
    assert _error_mm(pair, result.prealign.transform) < 2.0
    assert _error_mm(pair, result.transform) < 2.0


def test_body_task_labels_are_refused_with_a_fix():
    pair = phantoms.make_pair(seed=13, fixed_spacing=(6.0, 6.0, 6.0), moving_spacing=(6.0, 6.0, 6.0), noise=0,
                              labels=False)
    body_fixed = sitk.Cast(pair.fixed > -500, sitk.sitkUInt16)  # body_trunc = 1 in tasks `body` / `body_mr`
    body_moving = sitk.Cast(pair.moving > 100, sitk.sitkUInt16)
    with pytest.raises(InputError, match="body-wide labels"):
        anatomy.prealign(PrealignInputs(pair.fixed, pair.moving, body_fixed, body_moving, "body", "body_mr"))
