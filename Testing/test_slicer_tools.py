"""Adapters to BRAINSFit, SlicerElastix and TotalSegmentator: parameters, error translation, orchestration.

The Slicer application, BRAINSFit's CLI, SlicerElastix's logic and TotalSegmentator's logic cannot run
here; named doubles stand in for exactly those (``FakeCLINode``, ``FakeBRAINSFitCLI``,
``FakeCropVolumeLogic``, ``FakeElastixLogic``, ``FakeTotalSegmentatorLogic*``). The doubles that
"register" run the real core engines (SimpleITK, itk-elastix with OUR parameter files) on the same MRML
nodes, so the plumbing (crop boxes, initial transform, read-back, final node) is checked for real.
"""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from MultimodalPrealignLib.engines import elastix_engine
from MultimodalPrealignLib.engines.elastix_engine import parse_parameter_text
from MultimodalPrealignLib.errors import InputError, RegistrationError
from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.slicer import (
    brainsfit,
    elastix,
    engine_run,
    pair_diagnostics,
    quality_check,
    result_panel,
    totalsegmentator,
)

#: Every parameter name in BRAINSia/BRAINSTools BRAINSFit/BRAINSFit.xml that we may pass.
BRAINSFIT_XML_NAMES = {
    "fixedVolume", "movingVolume", "bsplineTransform", "linearTransform", "outputVolume", "initialTransform",
    "initializeTransformMode", "useRigid", "useScaleVersor3D", "useScaleSkewVersor3D", "useAffine", "useBSpline",
    "useComposite", "samplingPercentage", "numberOfSamples", "splineGridSize", "numberOfIterations",
    "maskProcessingMode", "fixedBinaryVolume", "movingBinaryVolume", "costMetric", "numberOfHistogramBins",
    "transformType", "outputTransform", "minimumStepLength", "maximumStepLength", "translationScale",
    "interpolationMode", "backgroundFillValue", "histogramMatch", "logFileReport", "numberOfThreads",
}
BRAINSFIT_ENUMS = {"initializeTransformMode": {"Off", "useMomentsAlign", "useCenterOfHeadAlign", "useGeometryAlign",
                                               "useCenterOfROIAlign"},
                   "maskProcessingMode": {"NOMASK", "ROIAUTO", "ROI"}, "costMetric": {"MMI", "MSE", "NC", "MC", "MIH"}}


def check_brainsfit_names(params: dict) -> None:
    unknown = set(params) - BRAINSFIT_XML_NAMES
    assert not unknown, f"not BRAINSFit.xml parameters: {unknown}"
    for name, allowed in BRAINSFIT_ENUMS.items():
        if name in params:
            assert params[name] in allowed


# ------------------------------------------------------------------------------------------------ BRAINSFit

def test_brainsfit_parameters_linear_stages():
    params = brainsfit.brainsfit_parameters("vtkMRMLScalarVolumeNode1", "vtkMRMLScalarVolumeNode2",
                                            "vtkMRMLLinearTransformNode3", ("rigid", "affine"),
                                            initial_transform="vtkMRMLLinearTransformNode4",
                                            sampling_percentage=0.01, iterations=300)
    check_brainsfit_names(params)
    assert params["useRigid"] and params["useAffine"] and "useBSpline" not in params
    assert params["linearTransform"] == "vtkMRMLLinearTransformNode3" and "bsplineTransform" not in params
    assert params["initialTransform"] == "vtkMRMLLinearTransformNode4"
    assert params["initializeTransformMode"] == "Off"
    assert params["samplingPercentage"] == 0.01 and params["numberOfIterations"] == 300
    assert params["maskProcessingMode"] == "NOMASK"


def test_brainsfit_parameters_bspline_masks_and_defaults():
    params = brainsfit.brainsfit_parameters("f", "m", "out", ("rigid", "affine", "bspline"),
                                            fixed_mask="fm", moving_mask="mm", spline_grid_size=(5, 5, 4))
    check_brainsfit_names(params)
    assert params["bsplineTransform"] == "out" and "linearTransform" not in params
    assert params["maskProcessingMode"] == "ROI"
    assert params["fixedBinaryVolume"] == "fm" and params["movingBinaryVolume"] == "mm"
    assert params["splineGridSize"] == "5,5,4"
    # None keeps BRAINSFit's own defaults (0.002 / 1500): the keys are not sent at all.
    assert not {"samplingPercentage", "numberOfIterations", "initialTransform"} & set(params)


@pytest.mark.parametrize("stages, match", [((), "No registration stage"), (("affine", "rigid"), "order"),
                                           (("rigid", "warp"), "Unknown stage")])
def test_brainsfit_parameters_refuse_bad_stages(stages, match):
    with pytest.raises(InputError, match=match):
        brainsfit.brainsfit_parameters("f", "m", "out", stages)


def test_brainsfit_parameters_refuse_bad_overrides():
    with pytest.raises(InputError, match="Sampling percentage"):
        brainsfit.brainsfit_parameters("f", "m", "out", sampling_percentage=2.0)
    with pytest.raises(InputError, match="Iterations"):
        brainsfit.brainsfit_parameters("f", "m", "out", iterations=0)


class FakeCLINode:
    """Stands in for a finished vtkMRMLCommandLineModuleNode (no CLI modules here; slicer_cli_double has a live one)."""

    Completed = 0x20
    CompletedWithErrors = Completed | 0x40
    ErrorsMask = 0x40

    def __init__(self, status=Completed, error_text="", output_text=""):
        self.status, self.error_text, self.output_text = status, error_text, output_text

    def GetStatus(self):
        return self.status

    def GetStatusString(self):
        return "CompletedWithErrors" if self.status & self.ErrorsMask else "Completed"

    def GetErrorText(self):
        return self.error_text

    def GetOutputText(self):
        return self.output_text


OVERLAP_ERROR = ("itk::ExceptionObject (0x55)\nLocation: MattesMutualInformationImageToImageMetricv4\n"
                 "Description: All samples map outside moving image buffer. The images do not sufficiently "
                 "overlap. They need to be initialized to have more overlap before this metric will work.")


def test_brainsfit_overlap_failure_becomes_cause_and_fix():
    def run_cli(module, node, params, wait_for_completion=False):
        return FakeCLINode(FakeCLINode.CompletedWithErrors, error_text=OVERLAP_ERROR)

    with pytest.raises(RegistrationError) as info:
        brainsfit.run_brainsfit(run_cli, "brainsfit", {"fixedVolume": "f"})
    text = str(info.value)
    assert "lost the overlap" in text and "Fix:" in text and "search" in text
    assert "\n" not in text


def test_brainsfit_unknown_failure_keeps_its_last_error_line():
    def run_cli(module, node, params, wait_for_completion=False):
        return FakeCLINode(FakeCLINode.CompletedWithErrors,
                           error_text="reading input\nERROR: could not open fixed volume /tmp/x.nrrd\n")

    with pytest.raises(RegistrationError, match="BRAINSFit failed: ERROR: could not open fixed volume"):
        brainsfit.run_brainsfit(run_cli, "brainsfit", {})


def test_brainsfit_cli_exception_is_translated_and_success_returns_its_output():
    def raising(module, node, params, wait_for_completion=False):
        raise ValueError("CLI execution failed: All samples map outside moving image buffer")

    with pytest.raises(RegistrationError, match="lost the overlap"):
        brainsfit.run_brainsfit(raising, "brainsfit", {})
    ok = FakeCLINode(output_text="done")
    run = brainsfit.run_brainsfit(lambda m, n, p, wait_for_completion=False: ok, "brainsfit", {})
    assert (run.status, run.output_text) == ("Completed", "done")


# ------------------------------------------------------------------------------------------------ elastix

def test_elastix_parameter_files_hold_the_overrides(tmp_path):
    paths = elastix.write_elastix_parameter_files(tmp_path / "params", ("rigid", "affine"), 0.01, 250,
                                                  fixed_voxels=1_000_000, seed=3)
    assert len(paths) == 2 and all(os.path.isabs(p) and os.path.exists(p) for p in paths)
    rigid = parse_parameter_text(open(paths[0]).read())
    affine = parse_parameter_text(open(paths[1]).read())
    assert rigid["Transform"] == ["EulerTransform"] and affine["Transform"] == ["AffineTransform"]
    for params in (rigid, affine):
        assert params["MaximumNumberOfIterations"] == ["250"]
        assert params["NumberOfSpatialSamples"] == ["10000"]  # 1% of one million working voxels
        assert params["WriteITKCompositeTransform"] == ["true"]
        assert params["ITKTransformOutputFileNameExtension"] == ["h5"]
    # Absolute paths survive SlicerElastix's os.path.join(databaseDir, name).
    assert os.path.join("/somewhere/RegistrationParameters", paths[0]) == paths[0]


def read_parameter_files(itk, paths):
    """elastix's own parser, one file at a time (as elastix -p a -p b reads them)."""
    parameter_object = itk.ParameterObject.New()
    for path in paths:
        single = itk.ParameterObject.New()
        single.ReadParameterFile(str(path))
        parameter_object.AddParameterMap(single.GetParameterMap(0))
    return parameter_object


def test_elastix_parameter_files_are_read_by_elastix_itself(tmp_path):
    itk = pytest.importorskip("itk")
    paths = elastix.write_elastix_parameter_files(tmp_path, ("rigid", "affine", "bspline"), None, None, 10_000)
    parameter_object = read_parameter_files(itk, paths)
    assert parameter_object.GetNumberOfParameterMaps() == 3
    assert parameter_object.GetParameterMap(2)["Transform"][0] == "BSplineTransform"
    assert parameter_object.GetParameterMap(0)["WriteITKCompositeTransform"][0] == "true"


def test_format_parameter_map_quotes_strings_only():
    text = elastix_engine.format_parameter_map({"Transform": ["EulerTransform"], "NumberOfResolutions": ["3"],
                                         "GridSpacing": ["10.5", "10.5", "10.5"]})
    assert '(Transform "EulerTransform")' in text
    assert "(NumberOfResolutions 3)" in text and "(GridSpacing 10.5 10.5 10.5)" in text


class FakeElastixLogic:
    """Stands in for SlicerElastix's ElastixLogic (needs the Slicer app and the elastix executable).

    Records the call; on ``fail_with`` it logs like the real logic and raises CalledProcessError.
    """

    def __init__(self, fail_with: str | None = None, old_signature: bool = False):
        self.logCallback = None
        self.deleteTemporaryFiles = True
        self.cancelRequested = False
        self.calls = []
        self.fail_with = fail_with
        self.old_signature = old_signature

    def registerVolumes(self, fixedVolumeNode, movingVolumeNode, parameterFilenames=None, outputVolumeNode=None,
                        outputTransformNode=None, fixedVolumeMaskNode=None, movingVolumeMaskNode=None,
                        forceDisplacementFieldOutputTransform=True, **kwargs):
        if self.old_signature and "initialTransformNode" in kwargs:
            raise TypeError("registerVolumes() got an unexpected keyword argument 'initialTransformNode'")
        self.calls.append(dict(fixed=fixedVolumeNode, moving=movingVolumeNode, files=parameterFilenames,
                               output_transform=outputTransformNode, force_field=forceDisplacementFieldOutputTransform,
                               **kwargs))
        self.logCallback("Register volumes...")
        if self.fail_with:
            self.logCallback(self.fail_with)
            raise subprocess.CalledProcessError(1, "elastix")


def test_run_elastix_passes_initial_transform_and_asks_for_linear_output(tmp_path):
    logic = FakeElastixLogic()
    run = elastix.run_elastix(logic, "fixed", "moving", ["/abs/a.txt"], "out", initial_transform_node="init",
                              linear_output=True, keep_temporary_files=True)
    call = logic.calls[0]
    assert call["initialTransformNode"] == "init" and call["force_field"] is False
    assert call["files"] == ["/abs/a.txt"] and call["output_transform"] == "out"
    assert logic.deleteTemporaryFiles is False
    assert "Register volumes" in run.log
    assert logic.logCallback is None  # restored


def test_run_elastix_failure_surfaces_elastix_error_line():
    logic = FakeElastixLogic(fail_with="ERROR: Too many samples map outside moving image buffer: 112 / 5000")
    with pytest.raises(RegistrationError) as info:
        elastix.run_elastix(logic, "f", "m", ["/a.txt"], "out", linear_output=False)
    text = str(info.value)
    assert "Too many samples map outside moving image buffer: 112 / 5000" in text
    assert "exit code 1" in text and "Fix:" in text
    assert logic.calls[0]["force_field"] is True


def test_run_elastix_too_old_slicerelastix_says_update():
    with pytest.raises(InputError, match="too old.*update SlicerElastix"):
        elastix.run_elastix(FakeElastixLogic(old_signature=True), "f", "m", ["/a.txt"], "out",
                            initial_transform_node="init")


# ----------------------------------------------------------------------------------------- TotalSegmentator

class FakeTotalSegmentatorLogicNew:
    """Stands in for TotalSegmentatorLogic, current signature (quality=...)."""

    def __init__(self):
        self.calls = []

    def process(self, inputVolume, outputSegmentation, quality=None, cpu=False, task=None, subset=None,
                interactive=False, sequenceBrowserNode=None):
        self.calls.append(dict(quality=quality, cpu=cpu, task=task, interactive=interactive))


class FakeTotalSegmentatorLogicOld:
    """Stands in for TotalSegmentatorLogic, old signature (fast=True)."""

    def __init__(self, fail: bool = False):
        self.calls = []
        self.fail = fail

    def process(self, inputVolume, outputSegmentation, fast=True, cpu=False, task=None, subset=None):
        self.calls.append(dict(fast=fast, cpu=cpu, task=task))
        if self.fail:
            raise subprocess.CalledProcessError(1, ["TotalSegmentator"])


def test_totalsegmentator_new_signature_full_quality_non_interactive():
    logic = FakeTotalSegmentatorLogicNew()
    assert totalsegmentator.run_totalsegmentator(logic, "vol", "seg", "total_mr") == "seg"
    assert logic.calls == [dict(quality=None, cpu=False, task="total_mr", interactive=False)]


def test_totalsegmentator_old_signature_gets_fast_flag():
    logic = FakeTotalSegmentatorLogicOld()
    totalsegmentator.run_totalsegmentator(logic, "vol", "seg", "total", cpu=True)
    assert logic.calls == [dict(fast=False, cpu=True, task="total")]


def test_totalsegmentator_failure_and_class_ids():
    with pytest.raises(RegistrationError, match="TotalSegmentator failed.*Fix:"):
        totalsegmentator.run_totalsegmentator(FakeTotalSegmentatorLogicOld(fail=True), "v", "s", "total")
    ids = totalsegmentator.class_ids_for_task("total_mr")
    assert ids["liver"] == 5 and ids["aorta"] == 23


def test_rigid_check_for_the_brainsfit_rigid_stage_warning():
    assert brainsfit._is_rigid(sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, 3.0, -0.4, (5.0, 6.0, 7.0)))
    scaled = sitk.AffineTransform(3)
    scaled.SetMatrix([1.1, 0, 0, 0, 1, 0, 0, 0, 1])
    assert not brainsfit._is_rigid(scaled)
    mirrored = sitk.AffineTransform(3)
    mirrored.SetMatrix([-1.0, 0, 0, 0, 1, 0, 0, 0, 1])
    assert not brainsfit._is_rigid(mirrored)


def test_best_task_for_segment_names():
    assert totalsegmentator.best_task_for_segment_names(["liver", "lung_upper_lobe_left", "vertebrae_L1"]) == "total"
    assert totalsegmentator.best_task_for_segment_names(["liver", "lung_left", "vertebrae"]) == "total_mr"
    assert totalsegmentator.best_task_for_segment_names(["liver", "spleen"]) == "total"  # shared names: CT task
    assert totalsegmentator.best_task_for_segment_names(["Segment_1", "tumor"]) is None


# ------------------------------------------------------------------------------------------- panel text

def test_verdict_rich_text_colours_escapes_and_cuts_reasons():
    from MultimodalPrealignLib.qa.report_html import VERDICT_STYLE

    reasons = ["FAIL: overlap < 10%", "WARN: NMI gain <b>small</b>", "WARN: third", "WARN: fourth"]
    text = result_panel.verdict_rich_text("FAIL", reasons, max_reasons=2)
    assert f'color:{VERDICT_STYLE["FAIL"][0]}' in text and ">FAIL</b>" in text
    assert "overlap &lt; 10%" in text and "&lt;b&gt;small&lt;/b&gt;" in text  # reasons are text, not markup
    assert "third" not in text and "... 2 more in the table and in report.html" in text
    noted = result_panel.verdict_rich_text("WARN", reasons + ["NOTE: automatic fallback: attempt 2"], max_reasons=1)
    assert "NOTE: automatic fallback: attempt 2" in noted and "... 3 more" in noted
    assert f'color:{VERDICT_STYLE["PASS"][0]}' in result_panel.verdict_rich_text("PASS", ["all good"])
    unjudged = result_panel.verdict_rich_text(None, [])
    assert "not judged" in unjudged and f'color:{VERDICT_STYLE["WARN"][0]}' in unjudged and "<ul>" not in unjudged


def test_picture_entries_grid_before_left_after_right(tmp_path):
    (tmp_path / "pictures").mkdir()
    names = ["fusion_before", "fusion_after", "edges_after", "outlines_before", "outlines_after", "custom_after"]
    for name in names:
        (tmp_path / "pictures" / f"{name}.png").write_bytes(b"png")
    pictures = {name: f"pictures/{name}.png" for name in names}
    pictures["checkerboard_after"] = "pictures/missing.png"  # not on disk: left out
    entries = result_panel.picture_entries(pictures, tmp_path)
    grid = [(e["key"], e["row"], e["column"]) for e in entries]
    # KIND_TITLES order (outlines, edges, checkerboard, fusion), unknown kinds last; before left, after right.
    assert grid == [("outlines_before", 0, 0), ("outlines_after", 0, 1), ("edges_after", 1, 1),
                    ("fusion_before", 2, 0), ("fusion_after", 2, 1), ("custom_after", 3, 1)]
    assert all(os.path.isabs(e["path"]) and os.path.isfile(e["path"]) for e in entries)
    assert entries[0]["title"] == "Structure outlines: before"
    assert "before registration" in entries[0]["tooltip"] and "Click to open" in entries[0]["tooltip"]
    assert result_panel.picture_entries({}, tmp_path) == []


def test_new_report_directory_is_unique_and_named_after_the_pair(tmp_path):
    import datetime

    now = datetime.datetime(2026, 11, 22, 6, 30, 5, tzinfo=datetime.timezone.utc)
    first = quality_check.new_report_directory(tmp_path, "T2 MR/axial", "CT (bone)", now)
    assert first == tmp_path / "MultimodalPrealign" / "20261122-063005_T2_MR_axial_to_CT_bone"
    assert not first.exists()
    first.mkdir(parents=True)
    assert quality_check.new_report_directory(tmp_path, "T2 MR/axial", "CT (bone)", now).name.endswith("_bone_2")


@pytest.fixture(scope="module")
def tiny_pair():
    """A 24^3 blob at 4 mm and a copy shifted by 6 mm: metrics and pictures in well under a second."""
    size, spacing = 24, 4.0
    blob = sitk.GaussianSource(sitk.sitkFloat32, [size] * 3, sigma=[20.0] * 3, mean=[48.0] * 3, scale=1000.0,
                               spacing=[spacing] * 3)
    noise = sitk.AdditiveGaussianNoise(blob, standardDeviation=5.0, seed=1)
    shift = transforms.translation([6.0, 0.0, 0.0])
    return blob, noise, transforms.identity(), shift


def tiny_report(tiny_pair):
    from MultimodalPrealignLib.qa import measure

    fixed, moving, before, after = tiny_pair
    return {"metrics": measure.evaluate(fixed, moving, before, after, working_spacing_mm=4.0, probes=False),
            "verdict_reasons": ["NOTE: automatic fallback: attempt 2 was used"]}


def test_write_quality_check_writes_everything_in_place_and_keeps_fallback_notes(tiny_pair, tmp_path):
    import json

    fixed, moving, before, after = tiny_pair
    report = tiny_report(tiny_pair)
    out = quality_check.write_quality_check(report, tmp_path / "run", fixed, moving, before, after)
    assert out["verdict"] == report["verdict"] in ("PASS", "WARN", "FAIL")
    assert report["verdict_reasons"][-1] == "NOTE: automatic fallback: attempt 2 was used"
    assert out["directory"] == str((tmp_path / "run").resolve())
    assert out["html"] == str((tmp_path / "run" / "report.html").resolve()) and os.path.isfile(out["html"])
    assert set(out["pictures"]) == set(report["pictures"]) and out["pictures"]
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in out["pictures"].values())
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["verdict"] == report["verdict"] and saved["verdict_reasons"] == report["verdict_reasons"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder left behind
    # Again into the same folder: our own outputs are replaced; a folder with other files is refused.
    again = quality_check.write_quality_check(tiny_report(tiny_pair), tmp_path / "run", fixed, moving, before, after)
    assert again["pictures"] == out["pictures"]
    (tmp_path / "run" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="already holds other files"):
        quality_check.write_quality_check(tiny_report(tiny_pair), tmp_path / "run", fixed, moving, before, after)


def test_write_quality_check_without_pictures_writes_nothing(tiny_pair, tmp_path):
    fixed, moving, before, after = tiny_pair
    report = tiny_report(tiny_pair)
    out = quality_check.write_quality_check(report, None, fixed, moving, before, after, write_pictures=False)
    assert out == {"verdict": report["verdict"], "directory": None, "pictures": {}, "html": None}
    assert "NOTE: automatic fallback: attempt 2 was used" in report["verdict_reasons"]
    assert list(tmp_path.iterdir()) == []


def test_write_quality_check_failure_leaves_no_half_written_folder(tiny_pair, tmp_path, monkeypatch):
    from MultimodalPrealignLib.qa import reporting

    def failing_finish_report(report, out_dir, *args, **kwargs):
        (out_dir / "report.html").write_text("half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(reporting, "finish_report", failing_finish_report)
    fixed, moving, before, after = tiny_pair
    with pytest.raises(RuntimeError, match="disk full"):
        quality_check.write_quality_check(tiny_report(tiny_pair), tmp_path / "run", fixed, moving, before, after)
    assert list(tmp_path.iterdir()) == []


def test_diagnostics_lines_name_a_missing_shared_frame():
    summary = {"fixed": {"name": "CT", "size": [512, 512, 409], "spacing_mm": [0.39, 0.39, 0.625],
                         "extent_mm": [200.0, 200.0, 255.6]},
               "moving": {"name": "MR", "size": [512, 512, 94], "spacing_mm": [0.5, 0.5, 2.5],
                          "extent_mm": [256.0, 256.0, 235.0]},
               "header_overlap_fraction": 0.0, "voxel_volume_ratio_moving_over_fixed": 6.6,
               "extent_ratio_moving_over_fixed": [1.28, 1.28, 0.92]}
    lines = pair_diagnostics.diagnostics_lines(summary)
    assert lines[0].startswith("Fixed 'CT': 512 x 512 x 409 voxels, spacing 0.39 x 0.39 x 0.625 mm")
    assert "6.6" in lines[2] and "no shared frame" in lines[3]
    summary["header_overlap_fraction"] = 0.42
    assert pair_diagnostics.diagnostics_lines(summary)[3] == "Header overlap: 42% of the smaller volume's box."


# ---------------------------------------------------- the whole pipeline with CropVolume + BRAINSFit/Elastix

slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed")

from MultimodalPrealignLib.engines import RegistrationSettings
from MultimodalPrealignLib.geometry.image_space import grid_points
from MultimodalPrealignLib.geometry.resample import grid_for_box, make_reference
from MultimodalPrealignLib.pipeline import PipelineOptions
from MultimodalPrealignLib.slicer import mrml_bridge
from MultimodalPrealignLib.synthetic import phantoms

vtk = pytest.importorskip("vtk", reason="slicer-core's vtk is needed for the CropVolume stand-in")


class FakeCropVolumeLogic:
    """Stands in for CropVolume's interpolated crop, which needs Slicer's resampling CLI (absent from the wheel).

    Same geometry rules as vtkSlicerCropVolumeLogic: output grid aligned with the ROI (world axes), spacing
    min(input) x scale when isotropic, linear interpolation, fill value outside, and the input resampled
    THROUGH its parent transform (CropInterpolated passes it to the resampling CLI as transformationFile).
    ``parents_seen``: the input volume's parent transform node ID at each call (None when untransformed).
    """

    def __init__(self):
        self.parameter_nodes = []
        self.parents_seen = []

    def Apply(self, pnode):
        self.parameter_nodes.append(pnode)
        scene = pnode.GetScene()
        source_node = scene.GetNodeByID(pnode.GetInputVolumeNodeID())
        roi = scene.GetNodeByID(pnode.GetROINodeID())
        output = scene.GetNodeByID(pnode.GetOutputVolumeNodeID())
        source = mrml_bridge.volume_node_to_sitk(source_node)
        spacing = np.asarray(source.GetSpacing()) * pnode.GetSpacingScalingConst()
        if pnode.GetIsotropicResampling():
            spacing = np.full(3, min(source.GetSpacing()) * pnode.GetSpacingScalingConst())
        reference = make_reference(grid_for_box(mrml_bridge.box_from_roi(roi), spacing, np.eye(3)), source.GetPixelID())
        parent = source_node.GetParentTransformNode()
        self.parents_seen.append(parent.GetID() if parent is not None else None)
        world_to_local = sitk.Transform()
        if parent is not None:  # world RAS <- local RAS, as LPS; Resample needs output (world) -> input (local)
            to_world = vtk.vtkMatrix4x4()
            parent.GetMatrixTransformToWorld(to_world)
            flip = transforms.LPS_TO_RAS
            world_to_local = transforms.affine_from_matrix(
                np.linalg.inv(flip @ mrml_bridge.vtk_matrix_to_numpy(to_world) @ flip))
        cropped = sitk.Resample(source, reference, world_to_local, sitk.sitkLinear, pnode.GetFillValue())
        mrml_bridge.update_volume_node_from_sitk(output, cropped)
        return 0


class FakeBRAINSFitCLI:
    """Stands in for ``slicer.cli.run(slicer.modules.brainsfit, None, params, wait_for_completion=False)`` (returns
    a completed node; slicer_cli_double.SlicerCLIDouble runs the real BRAINSFit instead).

    Checks the parameters against BRAINSFit.xml, then registers the SAME nodes with the core's
    BRAINSFit-like SimpleITK engine, starting from ``initialTransform``, and writes the output node.
    """

    def __init__(self, scene):
        self.scene = scene
        self.parameters = []

    def __call__(self, module, node, params, wait_for_completion=False):
        from MultimodalPrealignLib.engines.itk_engine import register_itk

        assert module == "brainsfit-module" and node is None
        check_brainsfit_names(params)
        self.parameters.append(dict(params))
        get = self.scene.GetNodeByID
        fixed = sitk.Cast(mrml_bridge.volume_node_to_sitk(get(params["fixedVolume"])), sitk.sitkFloat32)
        moving = sitk.Cast(mrml_bridge.volume_node_to_sitk(get(params["movingVolume"])), sitk.sitkFloat32)
        initial = mrml_bridge.sitk_from_transform_node(get(params["initialTransform"]))
        stages = tuple(s for s, flag in brainsfit.BRAINSFIT_STAGE_FLAGS.items() if params.get(flag))
        settings = RegistrationSettings(engine="itk", stages=stages,
                                        sampling_percentage=params.get("samplingPercentage"),
                                        iterations=params.get("numberOfIterations")).validate()
        result = register_itk(fixed, moving, initial, settings)
        output = get(params.get("linearTransform") or params["bsplineTransform"])
        mrml_bridge.set_transform_node_from_sitk(output, result.transform)
        return FakeCLINode(output_text="BRAINSFit (core stand-in) finished")


@pytest.fixture()
def scene():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


@pytest.fixture(scope="module")
def pair():
    return phantoms.make_pair(seed=1, fixed_spacing=(5.0, 5.0, 5.0), moving_spacing=(5.0, 5.0, 6.0),
                              rotation_deg=8.0, translation_mm=12.0, labels=False)


def test_pipeline_with_cropvolume_and_brainsfit_puts_original_moving_volume_in_place(scene, pair, tmp_path):
    fixed_node = mrml_bridge.add_volume_from_sitk(scene, pair.fixed, "CT")
    moving_node = mrml_bridge.add_volume_from_sitk(scene, pair.moving, "MR")
    crop_logic = FakeCropVolumeLogic()
    brainsfit_cli = FakeBRAINSFitCLI(scene)
    services = engine_run.SlicerServices(scene=scene, crop_logic=crop_logic, temp_dir=str(tmp_path),
                                         run_cli=brainsfit_cli, brainsfit_module="brainsfit-module")
    run = engine_run.SlicerToolsRun(services, "brainsfit", fixed_node, moving_node)
    nodes_before = scene.GetNumberOfNodes()
    options = PipelineOptions.create(prealign="moments", stages=("rigid",), iterations=200)
    result = engine_run.run_pipeline_with_slicer_tools(pair.fixed, pair.moving, options, run)

    # CropVolume got the plan's boxes and a spacing scale that yields the working spacing.
    fixed_p, moving_p = crop_logic.parameter_nodes
    assert fixed_p.GetInputVolumeNodeID() == fixed_node.GetID()
    assert moving_p.GetInputVolumeNodeID() == moving_node.GetID()
    assert not fixed_p.GetVoxelBased() and fixed_p.GetIsotropicResampling()
    assert min(pair.fixed.GetSpacing()) * fixed_p.GetSpacingScalingConst() == pytest.approx(
        result.crop.working_spacing_mm[0], rel=1e-6)
    # BRAINSFit got the pre-alignment as initial transform and the overrides.
    params = brainsfit_cli.parameters[0]
    assert params["initializeTransformMode"] == "Off" and params["numberOfIterations"] == 200
    assert params["useRigid"] and "linearTransform" in params
    # Temporary nodes (ROIs, crops, transforms, parameter nodes) are gone.
    assert scene.GetNumberOfNodes() == nodes_before
    # The report is the core's, naming the engine actually used.
    assert result.report["registration"]["engine"] == "brainsfit"
    assert result.report["crop"]["cropped_with"].startswith("Slicer CropVolume")
    assert result.report["metrics"]["after"]["mi"] >= result.report["metrics"]["before"]["mi"] - 1e-3

    # Registration accuracy against the phantom's true transform.
    points = grid_points(pair.fixed, 6)
    error = transforms.mean_point_error(result.transform, pair.fixed_to_moving, points)
    assert error < 2.5, f"mean error {error:.2f} mm"

    # The final node on the ORIGINAL moving volume: a moving voxel appears at the fixed point it shows.
    output_node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "MR to CT")
    mrml_bridge.set_transform_node_from_sitk(output_node, result.transform)
    mrml_bridge.apply_to_volume(moving_node, output_node)
    p_fixed = np.asarray(pair.fixed.TransformContinuousIndexToPhysicalPoint([s / 2 for s in pair.fixed.GetSize()]))
    q_true = np.asarray(pair.fixed_to_moving.TransformPoint(p_fixed.tolist()))
    world = mrml_bridge.transform_ras_point(output_node, q_true * [-1, -1, 1])
    assert np.linalg.norm(world - p_fixed * [-1, -1, 1]) < 3.0


class ItkElastixStandInLogic(FakeElastixLogic):
    """Stands in for ElastixLogic by doing what it does with itk-elastix's elastix: our parameter files,
    the initial transform node exported to .h5 behind a ``-t0`` "File" transform, and the result read from
    ``TransformParameters.N-Composite.h5`` into the output node (SlicerElastix's linear-output path)."""

    def __init__(self, scene, tmp_path):
        super().__init__()
        self.scene, self.tmp_path = scene, tmp_path

    def registerVolumes(self, fixedVolumeNode, movingVolumeNode, parameterFilenames=None, outputVolumeNode=None,
                        outputTransformNode=None, fixedVolumeMaskNode=None, movingVolumeMaskNode=None,
                        forceDisplacementFieldOutputTransform=True, initialTransformNode=None):
        import itk

        super().registerVolumes(fixedVolumeNode, movingVolumeNode, parameterFilenames, outputVolumeNode,
                                outputTransformNode, fixedVolumeMaskNode, movingVolumeMaskNode,
                                forceDisplacementFieldOutputTransform, initialTransformNode=initialTransformNode)
        assert forceDisplacementFieldOutputTransform is False
        work = self.tmp_path / "elastix-run"
        out = work / "result-transform"
        out.mkdir(parents=True)
        initial = mrml_bridge.sitk_from_transform_node(initialTransformNode)
        transforms.write_transform(initial, work / "initialTransform.h5")
        t0 = work / "initialTransformParameter.txt"
        t0.write_text('(InitialTransformParametersFileName "NoInitialTransform")\n(HowToCombineTransforms "Compose")\n'
                      f'(Transform "File")\n(TransformFileName "{work / "initialTransform.h5"}")\n')

        def to_itk(node):
            image = sitk.Cast(mrml_bridge.volume_node_to_sitk(node), sitk.sitkFloat32)
            out_image = itk.GetImageFromArray(sitk.GetArrayFromImage(image))
            out_image.SetOrigin(image.GetOrigin())
            out_image.SetSpacing(image.GetSpacing())
            out_image.SetDirection(itk.matrix_from_array(np.asarray(image.GetDirection()).reshape(3, 3)))
            return out_image

        parameter_object = read_parameter_files(itk, parameterFilenames)
        method = itk.ElastixRegistrationMethod.New(to_itk(fixedVolumeNode), to_itk(movingVolumeNode))
        method.SetParameterObject(parameter_object)
        method.SetInitialTransformParameterFileName(str(t0))
        method.SetOutputDirectory(str(out))
        method.SetLogToConsole(False)
        method.UpdateLargestPossibleRegion()
        composite = out / f"TransformParameters.{len(parameterFilenames) - 1}-Composite.h5"
        result = transforms.read_transform(composite)
        mrml_bridge.set_transform_node_from_sitk(outputTransformNode, result)


def test_pipeline_with_slicerelastix_uses_our_parameter_files_and_initial_transform(scene, pair, tmp_path):
    pytest.importorskip("itk")
    fixed_node = mrml_bridge.add_volume_from_sitk(scene, pair.fixed, "CT")
    moving_node = mrml_bridge.add_volume_from_sitk(scene, pair.moving, "MR")
    elastix_logic = ItkElastixStandInLogic(scene, tmp_path)
    services = engine_run.SlicerServices(scene=scene, crop_logic=FakeCropVolumeLogic(), temp_dir=str(tmp_path),
                                         elastix_logic=elastix_logic)
    run = engine_run.SlicerToolsRun(services, "elastix", fixed_node, moving_node)
    options = PipelineOptions.create(prealign="moments", stages=("rigid",), iterations=150)
    result = engine_run.run_pipeline_with_slicer_tools(pair.fixed, pair.moving, options, run)
    call = elastix_logic.calls[0]
    assert call["initialTransformNode"] is not None and call["force_field"] is False
    assert all(str(tmp_path) in f for f in call["files"])
    assert result.report["registration"]["engine"].startswith("elastix")
    error = transforms.mean_point_error(result.transform, pair.fixed_to_moving, grid_points(pair.fixed, 6))
    assert error < 2.5, f"mean error {error:.2f} mm"


def test_slicer_engines_missing_are_explained(scene, tmp_path):
    services = engine_run.SlicerServices(scene=scene, crop_logic=FakeCropVolumeLogic(), temp_dir=str(tmp_path))
    with pytest.raises(InputError, match="SlicerElastix extension is not installed.*engine 'itk'"):
        engine_run.SlicerToolsRun(services, "elastix", None, None)
    with pytest.raises(InputError, match="BRAINSFit.*not available"):
        engine_run.SlicerToolsRun(services, "brainsfit", None, None)


def test_fill_quality_table_on_a_real_table_node_headers_lock_and_reuse(tiny_pair):
    from MultimodalPrealignLib.qa import tables, verdict

    report = tiny_report(tiny_pair)
    verdict.apply_verdict(report)
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", "quality")
    for _ in range(2):  # filling again replaces the rows
        quality_check.fill_quality_table(node, report)
        columns, rows = tables.metrics_table(report)
        assert [node.GetColumnName(c) for c in range(node.GetNumberOfColumns())] == list(columns)
        assert [[node.GetCellText(r, c) for c in range(len(columns))] for r in range(node.GetNumberOfRows())] == rows
    assert node.GetLocked()  # read-only in the table view
    assert node.GetUseColumnTitleAsColumnHeader()  # column names in the header, not as a first row
    assert node.GetAttribute("MultimodalPrealign.Verdict") == report["verdict"]
