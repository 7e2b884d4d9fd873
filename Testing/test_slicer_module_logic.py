"""MultimodalPrealignLogic (the module's console API) run against the real slicer-core scene.

The module file imports Qt and Slicer's scripted-module base classes, which need the Slicer application.
Named doubles stand in for exactly those (``qt``, ``slicer.ScriptedLoadableModule``,
``slicer.parameterNodeWrapper``, ``slicer.app``); everything MRML is the real wheel, and the core runs
for real. BRAINSFit and CropVolume's interpolated crop are the doubles from test_slicer_tools.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed")

from MultimodalPrealignLib import geometry, mrml_bridge, phantoms, slicer_tools, transforms  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def fake_slicer_app_modules() -> dict:
    """Stand-ins for the parts of Slicer that exist only in the application (Qt, module base classes)."""
    qt = types.ModuleType("qt")
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:  # FakeScriptedLoadableModule
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleLogic:  # FakeScriptedLoadableModuleLogic
        def __init__(self):
            pass

    class ScriptedLoadableModuleWidget:  # FakeScriptedLoadableModuleWidget
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleTest:  # FakeScriptedLoadableModuleTest
        pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleWidget,
                ScriptedLoadableModuleTest):
        setattr(scripted, cls.__name__, cls)
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls  # FakeParameterNodeWrapper: annotations only
    wrapper.Choice = lambda choices: ("Choice", tuple(choices))
    wrapper.WithinRange = lambda lo, hi: ("WithinRange", lo, hi)

    class FakeSlicerApp:
        def connect(self, *args):
            pass

    return {"qt": qt, "slicer.ScriptedLoadableModule": scripted, "slicer.parameterNodeWrapper": wrapper,
            "app": FakeSlicerApp()}


@pytest.fixture()
def module(monkeypatch):
    fakes = fake_slicer_app_modules()
    monkeypatch.setitem(sys.modules, "qt", fakes["qt"])
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", fakes["slicer.ScriptedLoadableModule"])
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", fakes["slicer.parameterNodeWrapper"])
    monkeypatch.setattr(slicer, "app", fakes["app"], raising=False)
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.syspath_prepend(str(REPO / "MultimodalPrealign"))
    monkeypatch.delitem(sys.modules, "MultimodalPrealign", raising=False)
    mod = importlib.import_module("MultimodalPrealign")
    yield mod
    sys.modules.pop("MultimodalPrealign", None)
    scene.Clear(1)


@pytest.fixture(scope="module")
def pair():
    return phantoms.make_pair(seed=2, fixed_spacing=(5.0, 5.0, 5.0), moving_spacing=(5.0, 5.0, 6.0),
                              rotation_deg=8.0, translation_mm=12.0, labels=True)


def add_pair(pair):
    fixed = mrml_bridge.add_volume_from_sitk(slicer.mrmlScene, pair.fixed, "CT")
    moving = mrml_bridge.add_volume_from_sitk(slicer.mrmlScene, pair.moving, "MR")
    return fixed, moving


def check_result(pair, result, moving_node, limit_mm=2.5):
    error = transforms.mean_point_error(result.transform, pair.fixed_to_moving, geometry.grid_points(pair.fixed, 6))
    assert error < limit_mm, f"mean error {error:.2f} mm"
    assert moving_node.GetParentTransformNode().GetID() == result.outputTransformNode.GetID()
    p = np.asarray(pair.fixed.TransformContinuousIndexToPhysicalPoint([s / 2 for s in pair.fixed.GetSize()]))
    q = np.asarray(pair.fixed_to_moving.TransformPoint(p.tolist()))
    world = mrml_bridge.transform_ras_point(result.outputTransformNode, q * [-1, -1, 1])
    assert np.linalg.norm(world - p * [-1, -1, 1]) < limit_mm + 1.0


def test_console_run_with_core_engine(module, pair):
    fixed, moving = add_pair(pair)
    output = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "resampled")
    seen = []
    result = module.MultimodalPrealignLogic().run(
        fixed, moving, engine="core", prealign="moments", stages=["rigid"], iterations=200,
        outputVolumeNode=output, progressCallback=lambda stage, fraction, message: seen.append(stage))
    check_result(pair, result, moving)
    assert result.report["registration"]["engine"] == "itk"
    assert result.report["slicer"]["output_transform_node"] == result.outputTransformNode.GetID()
    assert {"prealign", "crop", "done"} <= set(seen)
    resampled = mrml_bridge.volume_node_to_sitk(output)
    assert resampled.GetSize() == pair.fixed.GetSize()
    # Running again on the moving volume that now sits under our own output transform is allowed.
    again = module.MultimodalPrealignLogic().run(fixed, moving, engine="core", prealign="moments", stages=["rigid"],
                                                 iterations=200, outputTransformNode=result.outputTransformNode)
    assert again.outputTransformNode.GetID() == result.outputTransformNode.GetID()


def test_console_run_with_brainsfit_engine(module, pair, monkeypatch, tmp_path):
    from test_slicer_tools import FakeBRAINSFitCLI, FakeCropVolumeLogic

    fixed, moving = add_pair(pair)
    brainsfit = FakeBRAINSFitCLI(slicer.mrmlScene)

    def services(self, temp_dir):
        return slicer_tools.SlicerServices(scene=slicer.mrmlScene, crop_logic=FakeCropVolumeLogic(), temp_dir=temp_dir,
                                           run_sync=brainsfit, brainsfit_module="brainsfit-module")

    monkeypatch.setattr(module.MultimodalPrealignLogic, "slicerServices", services)
    result = module.MultimodalPrealignLogic().run(fixed, moving, engine="brainsfit", prealign="moments",
                                                  stages=["rigid"], iterations=200, samplingPercentage=0.05)
    check_result(pair, result, moving)
    assert result.report["registration"]["engine"] == "brainsfit"
    assert brainsfit.parameters[0]["samplingPercentage"] == 0.05


def test_console_run_rejects_bad_input_with_value_error(module, pair):
    fixed, moving = add_pair(pair)
    logic = module.MultimodalPrealignLogic()
    with pytest.raises(ValueError, match="same node.*Fix:"):
        logic.run(fixed, fixed)
    with pytest.raises(ValueError, match="Unknown engine 'ants'"):
        logic.run(fixed, moving, engine="ants")
    with pytest.raises(ValueError, match="Unknown stage"):
        logic.run(fixed, moving, engine="core", stages=["warp"])
    user = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "user")
    fixed.SetAndObserveTransformNodeID(user.GetID())
    with pytest.raises(ValueError, match="Harden"):
        logic.run(fixed, moving, engine="core")


def segmentation_from_labels(labels: sitk.Image, volume_node, task: str, names: list):
    """A segmentation node whose segment IDs are TotalSegmentator class names (as SlicerTotalSegmentator makes)."""
    from test_mrml_bridge import add_segment

    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{task} segmentation")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    ids = slicer_tools.class_ids_for_task(task)
    array = sitk.GetArrayViewFromImage(labels)
    for name in names:
        mask = (array == ids[name]).astype(np.uint8)
        if mask.any():
            add_segment(node, labels, name, name.replace("_", " ").title(), mask)
    return node


def test_segmentations_become_task_label_maps(module, pair):
    fixed, moving = add_pair(pair)
    names = ["liver", "spleen", "kidney_left", "kidney_right", "aorta"]
    fixed_seg = segmentation_from_labels(pair.fixed_labels, fixed, "total", names + ["lung_upper_lobe_left"])
    moving_seg = segmentation_from_labels(pair.moving_labels, moving, "total_mr", names + ["lung_left"])
    logic = module.MultimodalPrealignLogic()
    from MultimodalPrealignLib.pipeline import PipelineOptions

    options = PipelineOptions()
    fixed_labels = logic._labels(fixed_seg, fixed, options, "fixed")
    moving_labels = logic._labels(moving_seg, moving, options, "moving")
    assert (options.fixed_labels_task, options.moving_labels_task) == ("total", "total_mr")
    for labels, truth, task in ((fixed_labels, pair.fixed_labels, "total"), (moving_labels, pair.moving_labels, "total_mr")):
        ids = slicer_tools.class_ids_for_task(task)
        got, want = sitk.GetArrayViewFromImage(labels), sitk.GetArrayViewFromImage(truth)
        for name in names:
            np.testing.assert_array_equal(got == ids[name], want == ids[name])


def test_panel_diagnostics_text_from_nodes(module, pair):
    fixed, moving = add_pair(pair)
    text = module.diagnosticsText(fixed, moving)
    assert text.startswith("Fixed 'CT': 68 x 48 x 108 voxels, spacing 5 x 5 x 5 mm")
    assert "Header overlap" in text or "no shared frame" in text
