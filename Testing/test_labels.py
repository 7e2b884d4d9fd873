"""Label inputs (multi-label files, mask folders, Slicer .seg.nrrd, task inference) and the TotalSegmentator runner."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

from MultimodalPrealignLib.errors import InputError
from MultimodalPrealignLib.io import labels, modality
from MultimodalPrealignLib.prealign import totalseg
from MultimodalPrealignLib.synthetic import phantoms


@pytest.fixture(scope="module")
def ct_and_mr():
    grid = phantoms.grid_for((340, 240, 300), (5.0, 5.0, 5.0), center=(0, 0, 0))
    ct, ct_labels = phantoms.render("ct", grid, label_task="total", noise=0)
    mr, mr_labels = phantoms.render("mr", grid, label_task="total_mr", noise=5)
    return ct, ct_labels, mr, mr_labels


def test_task_tables_come_from_the_resource():
    assert labels.task_names("total")[52] == "aorta"
    assert labels.task_names("total_mr")[23] == "aorta"
    assert labels.task_ids("body")["body_trunc"] == 1
    assert {"total", "total_mr", "body", "appendicular_bones", "vertebrae_mr"} <= set(labels.known_tasks())
    with pytest.raises(InputError):
        labels.task_names("no_such_task")


def test_infer_task_from_names():
    assert labels.infer_task_from_names(["liver", "lung_left", "vertebrae"])[0] == "total_mr"
    assert labels.infer_task_from_names(["liver", "lung_upper_lobe_left", "vertebrae_L1"])[0] == "total"
    assert labels.infer_task_from_names(["tibia", "fibula"])[0] in ("appendicular_bones", "appendicular_bones_mr")
    assert labels.infer_task_from_names(["tibia", "carpal"])[0] == "appendicular_bones"
    task, missing = labels.infer_task_from_names(["liver", "my_tumour"], "ct")
    assert task == "total" and missing == ["my_tumour"]
    assert labels.infer_task_from_names(["nothing_known"])[0] is None


def test_infer_task_from_values_and_intensities(ct_and_mr):
    ct, ct_labels, mr, mr_labels = ct_and_mr
    assert labels.infer_task(ct_labels)[0] == "total"  # ids above 50 exist only in `total`
    assert labels.infer_task(mr_labels, mr)[0] == "total_mr"
    assert labels.infer_task(mr_labels)[0] is None  # ids 1..50 alone are ambiguous
    small = sitk.Cast(ct_labels == 5, sitk.sitkUInt16) * 5  # only liver (id 5 in both tasks)
    assert labels.infer_task(small, ct)[0] == "total"
    assert modality.ct_or_mr(ct) == "CT" and modality.ct_or_mr(mr) == "MR"


def test_load_multilabel_file_without_names(tmp_path, ct_and_mr):
    ct, ct_labels, mr, mr_labels = ct_and_mr
    sitk.WriteImage(sitk.Cast(mr_labels, sitk.sitkUInt8), str(tmp_path / "mr_seg.nrrd"))
    loaded, task = labels.load_labels(tmp_path / "mr_seg.nrrd", mr, "moving label map")
    assert task == "total_mr"
    assert loaded.GetPixelID() == sitk.sitkUInt16
    assert np.array_equal(sitk.GetArrayViewFromImage(loaded), sitk.GetArrayViewFromImage(mr_labels))


def test_load_refuses_wrong_grid(tmp_path, ct_and_mr):
    ct, ct_labels, _, _ = ct_and_mr
    shifted = sitk.Image(ct_labels)
    shifted.SetOrigin([o + 30 for o in ct_labels.GetOrigin()])
    sitk.WriteImage(shifted, str(tmp_path / "seg.nrrd"))
    with pytest.raises(InputError, match="does not match"):
        labels.load_labels(tmp_path / "seg.nrrd", ct, "fixed label map")


def test_mask_folder_like_totalsegmentator_output(tmp_path, ct_and_mr):
    ct, ct_labels, _, _ = ct_and_mr
    ids = labels.task_ids("total")
    array = sitk.GetArrayViewFromImage(ct_labels)
    for name in ("liver", "spleen", "kidney_left", "aorta", "lung_upper_lobe_left", "brain"):
        mask = sitk.GetImageFromArray((array == ids[name]).astype(np.uint8))  # brain: empty, as TS writes it
        mask.CopyInformation(ct_labels)
        sitk.WriteImage(mask, str(tmp_path / f"{name}.nii.gz"))
    (tmp_path / "notes.txt").write_text("not a mask")
    loaded, task = labels.load_labels(tmp_path, ct, "fixed label folder")
    assert task == "total"
    got = sitk.GetArrayViewFromImage(loaded)
    for name in ("liver", "spleen", "kidney_left", "aorta", "lung_upper_lobe_left"):
        assert np.array_equal(got == ids[name], array == ids[name]), name
    assert set(np.unique(got)) == {0, ids["liver"], ids["spleen"], ids["kidney_left"], ids["aorta"],
                                   ids["lung_upper_lobe_left"]}


def test_empty_or_foreign_folder_is_refused(tmp_path, ct_and_mr):
    ct = ct_and_mr[0]
    with pytest.raises(InputError, match="no mask files"):
        labels.load_labels(tmp_path, ct, "fixed label folder")
    blank = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    blank.CopyInformation(ct)
    sitk.WriteImage(blank, str(tmp_path / "tumour_xyz.nii.gz"))
    with pytest.raises(InputError, match="TotalSegmentator structure"):
        labels.load_labels(tmp_path, ct, "fixed label folder")


def test_named_masks_from_slicer_segments(ct_and_mr):
    _, _, mr, mr_labels = ct_and_mr
    ids = labels.task_ids("total_mr")
    masks = {name: sitk.Cast(mr_labels == ids[name], sitk.sitkUInt8) for name in ("liver", "vertebrae", "heart")}
    merged, task = labels.labels_from_masks(masks, mr)
    assert task == "total_mr"
    assert set(np.unique(sitk.GetArrayViewFromImage(merged))) == {0, ids["liver"], ids["vertebrae"], ids["heart"]}


def test_slicer_seg_nrrd_names_are_used(tmp_path, ct_and_mr):
    ct, ct_labels, _, _ = ct_and_mr
    ids = labels.task_ids("total")
    array = sitk.GetArrayViewFromImage(ct_labels)
    # a Slicer segmentation numbering its segments 1, 2 in its own order
    seg = np.zeros(array.shape, np.uint8)
    seg[array == ids["spleen"]] = 1
    seg[array == ids["liver"]] = 2
    image = sitk.GetImageFromArray(seg)
    image.CopyInformation(ct_labels)
    for key, value in {"Segment0_Name": "spleen", "Segment0_LabelValue": "1", "Segment0_Layer": "0",
                       "Segment1_Name": "liver", "Segment1_LabelValue": "2", "Segment1_Layer": "0"}.items():
        image.SetMetaData(key, value)
    sitk.WriteImage(image, str(tmp_path / "ct.seg.nrrd"))
    loaded, task = labels.load_labels(tmp_path / "ct.seg.nrrd", ct, "fixed segmentation")
    assert task == "total"
    got = sitk.GetArrayViewFromImage(loaded)
    assert np.array_equal(got == ids["spleen"], seg == 1) and np.array_equal(got == ids["liver"], seg == 2)


def test_relabel_to_task_by_name():
    image = sitk.GetImageFromArray(np.array([[[0, 1, 2, 3]]], dtype=np.uint8))
    out, dropped = labels.relabel_to_task(image, {1: "aorta", 2: "lung_left", 3: "my_tumour"}, "total_mr")
    assert sitk.GetArrayViewFromImage(out).ravel().tolist() == [0, 23, 10, 0]
    assert dropped == ["my_tumour"]


def test_real_totalsegmentator_files_carry_their_label_table(totalseg_examples):
    ct_seg = totalseg_examples / "example_seg.nii.gz"
    if not ct_seg.exists():
        pytest.skip("totalseg-examples absent")
    table = labels.read_nifti_label_table(ct_seg)
    assert table[5] == "liver" and table[52] == "aorta"
    mr_table = labels.read_nifti_label_table(totalseg_examples / "example_seg_mr.nii.gz")
    assert mr_table[23] == "aorta" and mr_table[10] == "lung_left"
    mr = sitk.ReadImage(str(totalseg_examples / "example_mr_sm.nii.gz"))
    loaded, task = labels.load_labels(totalseg_examples / "example_seg_mr.nii.gz", mr, "moving label map")
    assert task == "total_mr"  # from the names in the file, not from guessing
    assert labels.read_nifti_label_table(totalseg_examples / "example_mr_sm.nii.gz") is None


# ------------------------------------------------------------------------------------------- TotalSegmentator
def test_one_modality_rule_and_its_totalsegmentator_task():
    assert modality.totalsegmentator_task("CT") == "total"
    assert modality.totalsegmentator_task("mr_t2") == "total_mr"
    assert modality.totalsegmentator_task("MR") == "total_mr"
    assert modality.totalsegmentator_task("t1") == "total_mr"
    with pytest.raises(InputError, match="No TotalSegmentator task for modality 'pet'"):
        modality.totalsegmentator_task("pet")
    ct = sitk.GetImageFromArray(np.full((4, 4, 4), -1000, np.int16))
    mr = sitk.GetImageFromArray(np.full((4, 4, 4), 200, np.int16))
    assert modality.image_modality(ct) == "CT" and modality.image_modality(mr) == "MR"
    mr.SetMetaData("0008|0060", "CT")  # the DICOM Modality tag wins over the intensities
    assert modality.image_modality(mr) == "CT"


def test_missing_weights_message_names_both_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    assert totalseg.weights_dir() == tmp_path / "nnunet" / "results"
    with pytest.raises(InputError) as err:
        totalseg.check_weights("total_mr", fast=True)
    text = str(err.value)
    assert "TOTALSEG_HOME_DIR" in text and "TOTALSEG_WEIGHTS_PATH" in text and "totalseg_download_weights" in text
    assert "\n" not in text


def test_weights_found_when_present(tmp_path, monkeypatch):
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path))
    missing = totalseg.missing_weights("total", fast=True)
    assert missing  # nothing there yet
    for name in missing:
        (tmp_path / name).mkdir(parents=True)
    assert totalseg.missing_weights("total", fast=True) == []
    totalseg.check_weights("total", fast=True)  # no error


def test_segment_stops_before_any_download(tmp_path, monkeypatch):
    """With the real package installed and no weights: one clear InputError, no output file, no network."""
    if not totalseg.is_installed():
        pytest.skip("TotalSegmentator is not installed (optional extra)")
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    image, _ = phantoms.render("ct", phantoms.grid_for((200, 150, 60), (6, 6, 6)), noise=0)
    out = tmp_path / "out" / "labels.nii.gz"
    with pytest.raises(InputError, match="TOTALSEG_HOME_DIR"):
        totalseg.segment(image, "total", fast=True, out_path=out)
    assert not out.exists()


@pytest.mark.slow
def test_segment_translates_totalsegmentators_own_download_failure(tmp_path, monkeypatch):
    """Bypass our pre-check: TotalSegmentator itself tries to download, fails offline -> the same one-liner."""
    if not totalseg.is_installed():
        pytest.skip("TotalSegmentator is not installed (optional extra)")
    if os.environ.get("MMP_ALLOW_NETWORK_TESTS") != "1":
        pytest.skip("set MMP_ALLOW_NETWORK_TESTS=1 (imports torch, ~35 s, attempts a download)")
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    monkeypatch.setattr(totalseg, "check_weights", lambda task, fast=False: None)
    image, _ = phantoms.render("ct", phantoms.grid_for((200, 150, 60), (6, 6, 6)), noise=0)
    with pytest.raises(InputError, match="TOTALSEG_WEIGHTS_PATH"):
        totalseg.segment(image, "total", fast=True)
