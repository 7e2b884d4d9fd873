"""The Slicer path's defects found by reading the real sources (Slicer 5.8.1, SlicerElastix, SlicerTotalSegmentator),
each with the test that failed before its fix.

The module runs over Slicer's own parameterNodeWrapper / ScriptedLoadableModule and slicer-core's real MRML
(``slicer_app_stand_ins``); Slicer's CropVolume interpolated crop and SlicerElastix cannot run here and are stood
in for by ``test_slicer_tools.FakeCropVolumeLogic`` (it resamples through the input's parent transform, as
CropInterpolated does) and ``slicer_elastix_stand_in.SlicerElastixStandIn`` (the real registerVolumes' cancel and
log contract around a real child process).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed")

from slicer_app_stand_ins import load_module
from slicer_elastix_stand_in import SlicerElastixStandIn
from test_slicer_tools import FakeCropVolumeLogic

from MultimodalPrealignLib import cli, engines, pipeline
from MultimodalPrealignLib.errors import Cancelled, RegistrationError
from MultimodalPrealignLib.geometry import image_space, transforms
from MultimodalPrealignLib.pipeline import fallback
from MultimodalPrealignLib.progress import Progress
from MultimodalPrealignLib.slicer import crop_volume, elastix, engine_run, mrml_bridge, totalsegmentator
from MultimodalPrealignLib.synthetic import phantoms

REPO = Path(__file__).resolve().parents[1]
UI_FILE = REPO / "MultimodalPrealign" / "Resources" / "UI" / "MultimodalPrealign.ui"


@pytest.fixture()
def module(monkeypatch, tmp_path):
    return load_module(monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def pair():
    return phantoms.make_pair(seed=3, fixed_spacing=(5.0, 5.0, 5.0), moving_spacing=(5.0, 5.0, 6.0),
                              rotation_deg=8.0, translation_mm=12.0, labels=False)


@pytest.fixture(scope="module")
def flipped_pair():
    """Head-first vs feet-first: pre-alignment 'geometry' (box centres) cannot find it, so its attempt FAILs."""
    return phantoms.make_pair(seed=5, fixed_spacing=(5.0, 5.0, 5.0), moving_spacing=(5.0, 5.0, 6.0),
                              rotation_deg=8.0, translation_mm=12.0, flip=True, labels=True)


def add_pair(pair):
    fixed = mrml_bridge.add_volume_from_sitk(slicer.mrmlScene, pair.fixed, "CT")
    moving = mrml_bridge.add_volume_from_sitk(slicer.mrmlScene, pair.moving, "MR")
    return fixed, moving


def error_mm(pair, transform) -> float:
    return transforms.mean_point_error(transform, pair.fixed_to_moving, image_space.grid_points(pair.fixed, 6))


def use_slicer_elastix(module, monkeypatch, elastix_logic, crop_logic=None):
    """The module's logic gets CropVolume / SlicerElastix stand-ins as its Slicer services."""
    crop_logic = crop_logic or FakeCropVolumeLogic()

    def services(self, temp_dir, keep_temporary_files=False):
        return engine_run.SlicerServices(scene=slicer.mrmlScene, crop_logic=crop_logic, temp_dir=temp_dir,
                                         elastix_logic=elastix_logic, keep_temporary_files=keep_temporary_files)

    monkeypatch.setattr(module.MultimodalPrealignLogic, "slicerServices", services)
    return crop_logic


def a_second_candidate(pair):
    """A pre-alignment candidate pose distinct from the first one (the true pose): what the search records."""
    matrix = transforms.to_matrix(pair.fixed_to_moving)
    return [{"stage": "refined", "source": "test", "score": 0.5, "matrix_4x4": matrix[:3].tolist()}]


# ---------------------------------------------------------------- defect 1: the fallback with a Slicer engine


def test_fallback_with_a_slicer_engine_crops_and_registers_again(module, monkeypatch, flipped_pair):
    """Before: RuntimeError 'The core pipeline did not run the Slicer crop/register steps' on any fallback."""
    pair = flipped_pair
    real_candidates = fallback.prealign_candidate_transforms
    monkeypatch.setattr(fallback, "prealign_candidate_transforms",
                        lambda candidates, **kw: real_candidates(a_second_candidate(pair), **kw))
    fixed, moving = add_pair(pair)
    elastix_logic = SlicerElastixStandIn(slicer.mrmlScene)
    crop_logic = use_slicer_elastix(module, monkeypatch, elastix_logic)
    nodes_before = slicer.mrmlScene.GetNumberOfNodes()
    result = module.MultimodalPrealignLogic().run(fixed, moving, engine="elastix", prealign="geometry",
                                                  stages=["rigid"], writeReport=False)
    attempts = result.report["fallback"]["attempts"]
    assert len(attempts) == 2 and attempts[0]["verdict"] == "FAIL" and attempts[1]["verdict"] != "FAIL"
    assert len(elastix_logic.calls) == 2 and len(crop_logic.parameter_nodes) == 4  # two crops per attempt
    assert result.report["registration"]["engine"] == "elastix"
    assert "SlicerElastix" in result.report["registration"]["tool"]
    assert error_mm(pair, result.transform) < 2.5
    # Only the run's own nodes stay: output transform, table node (temporary crops, ROIs, masks are gone).
    added = {slicer.mrmlScene.GetNthNode(i).GetClassName()
             for i in range(nodes_before, slicer.mrmlScene.GetNumberOfNodes())}
    assert not added & {"vtkMRMLMarkupsROINode", "vtkMRMLCropVolumeParametersNode", "vtkMRMLLabelMapVolumeNode"}


# ------------------------------------------------------------------- defect 2: a second Apply


def test_second_apply_starts_from_the_untransformed_moving_volume(module, monkeypatch, pair):
    """Before: the second run cropped the moving volume THROUGH the first result (CropVolume resamples through the
    parent transform) while the core read its raw voxels: the second transform was the first one applied twice."""
    fixed, moving = add_pair(pair)
    crop_logic = use_slicer_elastix(module, monkeypatch, SlicerElastixStandIn(slicer.mrmlScene))
    logic = module.MultimodalPrealignLogic()
    output = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "result")
    first = logic.run(fixed, moving, engine="elastix", prealign="moments", stages=["rigid"], fallback=False,
                      outputTransformNode=output, writeReport=False)
    assert moving.GetTransformNodeID() == output.GetID()
    second = logic.run(fixed, moving, engine="elastix", prealign="moments", stages=["rigid"], fallback=False,
                       outputTransformNode=output, writeReport=False)
    assert crop_logic.parents_seen == [None, None, None, None]  # fixed, moving; fixed, moving: never transformed
    assert transforms.mean_point_error(first.transform, second.transform,
                                       image_space.grid_points(pair.fixed, 6)) < 0.01
    assert error_mm(pair, second.transform) < 2.5
    assert moving.GetTransformNodeID() == output.GetID()


def test_cancel_during_a_rerun_restores_the_previous_placement(module, monkeypatch, pair):
    fixed, moving = add_pair(pair)
    use_slicer_elastix(module, monkeypatch, SlicerElastixStandIn(slicer.mrmlScene))
    logic = module.MultimodalPrealignLogic()
    output = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "result")
    first = logic.run(fixed, moving, engine="itk", prealign="moments", stages=["rigid"], fallback=False,
                      outputTransformNode=output, writeReport=False)
    before = mrml_bridge.sitk_from_transform_node(output)
    calls = []

    def cancel_after_pre_alignment():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        logic.run(fixed, moving, engine="elastix", prealign="moments", stages=["rigid"], outputTransformNode=output,
                  writeReport=False, cancelRequested=cancel_after_pre_alignment)
    assert moving.GetTransformNodeID() == output.GetID()  # put back where it was
    after = mrml_bridge.sitk_from_transform_node(output)
    points = image_space.grid_points(pair.fixed, 4)
    assert transforms.mean_point_error(before, after, points) < 1e-6
    assert transforms.mean_point_error(first.transform, after, points) < 1e-6


# ----------------------------------------------------------------- defect 4: Cancel reaches SlicerElastix


def test_cancel_reaches_slicerelastix_and_kills_elastix(pair):
    """Before: the panel's flag never reached ElastixLogic.cancelRequested, and the check after registerVolumes
    could never be true (registerVolumes resets the flag in ``finally``): elastix ran to its end."""
    scene = slicer.vtkMRMLScene()
    fixed = mrml_bridge.add_volume_from_sitk(scene, pair.fixed, "CT")
    moving = mrml_bridge.add_volume_from_sitk(scene, pair.moving, "MR")
    output = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "out")
    initial = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "initial")
    stand_in = SlicerElastixStandIn(scene, lines=400, delay_s=0.05)
    seen = []

    def cancel_requested():
        seen.append(time.perf_counter())
        return len(seen) >= 3  # the user clicks Cancel while elastix runs

    started = time.perf_counter()
    with pytest.raises(Cancelled):
        elastix.run_elastix(stand_in, fixed, moving, [], output, initial, cancel_requested=cancel_requested)
    assert time.perf_counter() - started < 5.0  # 400 lines x 0.05 s = 20 s when not cancelled
    assert stand_in.processes[0].poll() is not None  # elastix was killed
    assert stand_in.cancelRequested is False and stand_in.logCallback is None  # its state as before


def test_slicerelastix_keeps_its_working_folder_when_asked(pair):
    scene = slicer.vtkMRMLScene()
    fixed = mrml_bridge.add_volume_from_sitk(scene, pair.fixed, "CT")
    moving = mrml_bridge.add_volume_from_sitk(scene, pair.moving, "MR")
    initial = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "initial")
    mrml_bridge.set_transform_node_from_sitk(initial, pair.fixed_to_moving)
    output = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "out")
    kept = elastix.run_elastix(SlicerElastixStandIn(scene), fixed, moving, [], output, initial,
                               keep_temporary_files=True)
    assert kept.working_directory and Path(kept.working_directory).is_dir()
    assert "iteration 0" in kept.log  # elastix's own output reached the log
    gone = elastix.run_elastix(SlicerElastixStandIn(scene), fixed, moving, [], output, initial)
    assert gone.working_directory is None


# ---------------------------------------------- defect 5: TotalSegmentator keeps the panel alive, says no cancel


class LabelStandIn:
    """Stands in for a QLabel (Qt cannot run here)."""

    text = ""


class ProgressBarStandIn:
    """Stands in for a QProgressBar (Qt cannot run here)."""

    def __init__(self):
        self.range, self.value = (0, 100), 0

    def setRange(self, low, high):
        self.range = (low, high)

    def setValue(self, value):
        self.value = value


def test_totalsegmentator_log_feeds_the_panel_and_processes_events():
    events = []
    label, bar = LabelStandIn(), ProgressBarStandIn()
    log = totalsegmentator.PanelLog(label, bar, lambda: events.append(1))
    assert bar.range == (0, 0)  # busy until a percentage is seen
    for line in ("Writing input file", "Predicting part 1 of 5 ...", " 40%|####      | 8/20 [00:04<00:06]"):
        log(line)
    assert len(events) == 3 and label.text.startswith("40%") and bar.range == (0, 100) and bar.value == 40
    assert "cannot be cancelled" in totalsegmentator.NOT_CANCELLABLE


def test_segment_volume_hands_the_log_to_totalsegmentator(monkeypatch):
    """The extension's logic gets our ``logCallback`` before ``process`` runs (TotalSegmentatorLogic.log calls it)."""
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    volume = mrml_bridge.add_volume_from_sitk(scene, phantoms.make_pair(seed=1, fixed_spacing=(8.0,) * 3,
                                                                        labels=False).fixed, "CT")
    lines = []

    class TotalSegmentatorLogicStandIn:
        """Stands in for SlicerTotalSegmentator's TotalSegmentatorLogic (not installed here)."""

        def __init__(self):
            self.logCallback = None

        def setupPythonRequirements(self):
            pass

        def process(self, inputVolume, outputSegmentation, quality=None, cpu=False, task=None, subset=None,
                    interactive=False, sequenceBrowserNode=None):
            self.logCallback(f"task {task}")

    fake_extension = type(sys)("TotalSegmentator")
    fake_extension.TotalSegmentatorLogic = TotalSegmentatorLogicStandIn
    monkeypatch.setitem(sys.modules, "TotalSegmentator", fake_extension)
    monkeypatch.setattr(totalsegmentator, "totalsegmentator_available", lambda: True)
    totalsegmentator.segment_volume(volume, log=lines.append)
    assert lines == ["task total"]


# ------------------------------------------------------ defect 6: the headless example's "module not loaded"


def test_headless_example_says_module_not_loaded_instead_of_a_traceback(monkeypatch, capsys, tmp_path):
    """Before: ``slicer.util.getModuleLogic`` raises RuntimeError (never returns None): traceback, exit 1."""
    spec = importlib.util.spec_from_file_location("register_pair", REPO / "docs" / "examples" / "register_pair.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    def get_module_logic(name):  # as slicer.util.getModuleLogic -> getModule does for an unknown module
        raise RuntimeError(f"Could not find module with name '{name}'")

    util = type(sys)("slicer.util")
    util.getModuleLogic = get_module_logic
    monkeypatch.setattr(slicer, "util", util, raising=False)
    args = example.parse_args(["--", "--fixed", "a.nrrd", "--moving", "b.nrrd", "--out", str(tmp_path / "o")])
    assert example.run(args) == 2
    assert "module is not loaded" in capsys.readouterr().err
    assert example.ENGINES == list(engines.ENGINES)


# ------------------------------------------------------------------ defect 7: the output transform selector


def test_output_transform_selector_shows_every_transform_class():
    """Before: showChildNodeTypes=false with vtkMRMLTransformNode hid linear, B-spline and grid transform nodes."""
    tree = ET.parse(UI_FILE)
    selector = next(w for w in tree.iter("widget") if w.get("name") == "outputTransformSelector")
    properties = {p.get("name"): p for p in selector.iter("property")}
    assert properties["showChildNodeTypes"].find("bool").text == "true"
    assert [s.text for s in properties["nodeTypes"].iter("string")] == ["vtkMRMLTransformNode"]


# -------------------------------------------------- defect 9: keep temporary files, show the temporary folder


def test_keep_temporary_files_keeps_the_run_folder(module, monkeypatch, pair):
    fixed, moving = add_pair(pair)
    use_slicer_elastix(module, monkeypatch, SlicerElastixStandIn(slicer.mrmlScene))
    logic = module.MultimodalPrealignLogic()
    kept = logic.run(fixed, moving, engine="elastix", prealign="moments", stages=["rigid"], keepTemporaryFiles=True,
                     writeReport=False)
    folder = Path(kept.temporaryDirectory)
    assert folder.is_dir() and folder.parent == Path(logic.temporaryRootDirectory())
    assert sorted(p.name for p in (folder / "elastix-parameters").iterdir()) == ["MultimodalPrealign_0_rigid.txt"]
    assert kept.report["slicer"]["temporary_directory"] == str(folder)
    dropped = logic.run(fixed, moving, engine="elastix", prealign="moments", stages=["rigid"], writeReport=False)
    assert dropped.temporaryDirectory is None
    assert [p for p in Path(logic.temporaryRootDirectory()).iterdir()] == [folder]
    names = {w.get("name") for w in ET.parse(UI_FILE).iter("widget")}
    assert {"keepTemporaryFilesCheckBox", "showTemporaryFolderButton"} <= names
    assert "keep temporary files" in elastix.translate_elastix_failure("elastix error").fix.lower()


# ----------------------------------------------------------------- defect 10: CropVolume's error codes


@pytest.mark.parametrize("code, words", [(-1, "invalid input"), (-2, "diffusion tensor"), (-3, "resampling module"),
                                         (-4, "command-line node"), (-5, "ROI is under a non-linear"),
                                         (-6, "output volume is under a non-linear")])
def test_every_cropvolume_error_code_has_its_cause_and_fix(code, words):
    class CropLogicStandIn:
        """Stands in for vtkSlicerCropVolumeLogic returning an error code."""

        def Apply(self, parameters):
            return code

    with pytest.raises(RegistrationError) as raised:
        crop_volume.apply_crop(CropLogicStandIn(), None)
    assert words in str(raised.value) and "Fix:" in str(raised.value) and f"code {code}" in str(raised.value)


# ------------------------------------------------ defect 11: monotonic progress, the fallback announced


def test_progress_is_monotonic_and_the_fallback_is_announced(monkeypatch, flipped_pair):
    """Before: the anatomy step reported 0 -> 1.0 inside the 0.05-0.35 window and every fallback attempt restarted
    at 0.4."""
    pair = flipped_pair
    options = dict(stages=("rigid",), iterations=100, fixed_labels_task="total", moving_labels_task="total_mr")
    seen = []
    pipeline.run_pipeline(pair.fixed, pair.moving, pipeline.PipelineOptions.create(prealign="anatomy", **options),
                          pair.fixed_labels, pair.moving_labels, Progress(lambda *a: seen.append(a)))
    fractions = [fraction for _stage, fraction, _message in seen]
    assert fractions == sorted(fractions)
    assert max(f for stage, f, _m in seen if stage == "prealign") <= 0.35 + 1e-9  # anatomy inside its window

    real_candidates = fallback.prealign_candidate_transforms
    monkeypatch.setattr(fallback, "prealign_candidate_transforms",
                        lambda candidates, **kw: real_candidates(a_second_candidate(pair), **kw))
    seen.clear()
    result = pipeline.run_pipeline(pair.fixed, pair.moving, pipeline.PipelineOptions.create(prealign="geometry",
                                                                                            **options),
                                   progress=Progress(lambda *a: seen.append(a)))
    fractions = [fraction for _stage, fraction, _message in seen]
    assert fractions == sorted(fractions) and fractions[-1] <= 1.0
    attempts = result.report["fallback"]["attempts"]
    assert len(attempts) == 2 and attempts[0]["verdict"] == "FAIL"
    announced = [message for stage, _f, message in seen if stage == "fallback"]
    assert len(announced) == 1 and "attempt 2 of" in announced[0] and "attempt 1 ended FAIL" in announced[0]


def test_command_line_progress_is_monotonic(tmp_path, capsys):
    """Before: with label maps the anatomy step printed up to 100% before the crop's 40%."""
    import SimpleITK as sitk

    small = phantoms.make_pair(seed=4, fixed_spacing=(6.0,) * 3, moving_spacing=(6.0, 6.0, 7.0), labels=True)
    for name, image in (("f", small.fixed), ("m", small.moving), ("fl", small.fixed_labels),
                        ("ml", small.moving_labels)):
        sitk.WriteImage(image, str(tmp_path / f"{name}.nrrd"))
    code = cli.main(["register", "--fixed", str(tmp_path / "f.nrrd"), "--moving", str(tmp_path / "m.nrrd"),
                     "--fixed-labels", str(tmp_path / "fl.nrrd"), "--moving-labels", str(tmp_path / "ml.nrrd"),
                     "--fixed-labels-task", "total", "--moving-labels-task", "total_mr",
                     "--out", str(tmp_path / "out"), "--prealign", "anatomy", "--stages", "rigid", "--no-report"])
    assert code in (0, 4)
    percents = [int(line[1:4]) for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert len(percents) > 5 and percents == sorted(percents) and percents[-1] == 100


# ---------------------------------------------------------------- defect 12: one vocabulary, one guide


def test_guide_and_example_agree_on_exit_codes_and_report_location():
    guide = (REPO / "docs" / "user_guide.md").read_text(encoding="utf-8")
    example = (REPO / "docs" / "examples" / "register_pair.py").read_text(encoding="utf-8")
    headless = guide.split("## Headless")[1].split("## Sample data")[0]
    for code in ("0 verdict PASS or WARN", "4 verdict FAIL", "2 bad input", "3 registration failed", "130"):
        assert code in headless, code
    assert "result/report.html" in headless and "reportDirectory=str(staging)" in example
    assert "core" not in cli.build_parser().parse_args(["demo"]).engine
    for name in engines.ENGINES:
        assert f"`{name}`" in guide


# ----------------------------------------------------------- defect 13: Slicer's standard registration references


def test_output_transform_gets_the_standard_fixed_and_moving_references(module, pair):
    fixed, moving = add_pair(pair)
    result = module.MultimodalPrealignLogic().run(fixed, moving, engine="itk", prealign="moments", stages=["rigid"],
                                                  writeReport=False)
    node = result.outputTransformNode
    assert node.GetNodeReferenceID(slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole()) == fixed.GetID()
    assert node.GetNodeReferenceID(slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole()) == moving.GetID()
    assert node.GetNumberOfNodeReferences(slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole()) == 1


# ------------------------------------------------------------------------ the code behind the run


def test_recorded_command_line_reproduces_the_transform(tmp_path):
    import SimpleITK as sitk

    small = phantoms.make_pair(seed=6, fixed_spacing=(6.0,) * 3, moving_spacing=(6.0, 6.0, 7.0), labels=False)
    sitk.WriteImage(small.fixed, str(tmp_path / "f.nrrd"))
    sitk.WriteImage(small.moving, str(tmp_path / "m.nrrd"))
    first = tmp_path / "first"
    assert cli.main(["register", "--fixed", str(tmp_path / "f.nrrd"), "--moving", str(tmp_path / "m.nrrd"),
                     "--out", str(first), "--prealign", "moments", "--stages", "rigid", "--iterations", "300",
                     "--no-report", "--quiet"]) in (0, 4)
    recorded = json.loads((first / "report.json").read_text())["reproduce"]
    arguments = recorded["command_arguments"]
    assert recorded["command_line"].startswith("multimodal-prealign register ")
    assert {"--prealign", "moments", "--iterations", "300", "--no-report"} <= set(arguments)
    assert "logic.run(fixed, moving" in recorded["slicer_python"] and "iterations=300" in recorded["slicer_python"]
    arguments[arguments.index("--out") + 1] = str(tmp_path / "again")
    assert cli.main(arguments[1:] + ["--quiet"]) in (0, 4)
    a = transforms.read_transform(first / "transform.h5")
    b = transforms.read_transform(tmp_path / "again" / "transform.h5")
    assert transforms.mean_point_error(a, b, image_space.grid_points(small.fixed, 5)) == 0.0


def test_slicer_run_records_console_code_that_reproduces_it(module, pair):
    fixed, moving = add_pair(pair)
    logic = module.MultimodalPrealignLogic()
    result = logic.run(fixed, moving, engine="itk", prealign="moments", stages=["rigid"], iterations=300,
                       fallback=False, writeReport=False)
    code = result.reproduce["slicer_python"]
    assert "engine='itk'" in code and "iterations=300" in code and "fallback=False" in code
    assert "cropMarginMm" not in code  # defaults are left out
    namespace = {"slicer": type(sys)("slicer")}
    namespace["slicer"].util = type(sys)("slicer.util")
    namespace["slicer"].util.getModuleLogic = lambda name: logic
    namespace["slicer"].util.getNode = {"CT": fixed, "MR": moving}.get
    exec(code, namespace)  # noqa: S102 - the recorded console code, run as a user would paste it
    again = namespace["result"]
    points = image_space.grid_points(pair.fixed, 5)
    assert transforms.mean_point_error(result.transform, again.transform, points) == 0.0


def test_a_scene_saved_with_the_old_engine_name_opens_with_the_new_one(module):
    """A scene saved before the engines took the command line's names holds engine 'core': Slicer's combo-box
    connector would raise on it ("Unable to find value core in choices") and the panel would not open."""
    logic = module.MultimodalPrealignLogic()
    raw = logic.getParameterNode().parameterNode
    raw.SetParameter("engine", "core")  # as read back from such a scene (the wrapper does not validate on read)
    assert logic.getParameterNode().engine == "itk"
