"""The module's parameter node and logic on Slicer's own machinery over slicer-core's real MRML scene.

MultimodalPrealign.py is imported over Slicer 5.8.1's own ``slicer.parameterNodeWrapper`` and
``slicer.ScriptedLoadableModule`` (vendored unchanged in ../shared/vendor/slicer-5.8.1-python), with a real
``vtkMRMLScene`` as ``slicer.mrmlScene``; only the application's Qt/CTK part and ``slicer.app`` are stood in for
(slicer_app_stand_ins). So defaults, Choice / WithinRange validation, node references and the scene round trip are
Slicer's behaviour, and ``MultimodalPrealignLogic.run`` works on real volume, segmentation and transform nodes.
"""

from __future__ import annotations

import inspect
import typing
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed")

from slicer_app_stand_ins import SLICER_PYTHON, ModuleParentStandIn, load_module

from MultimodalPrealignLib.geometry import image_space, transforms
from MultimodalPrealignLib.slicer import mrml_bridge
from MultimodalPrealignLib.synthetic import phantoms

REPO = Path(__file__).resolve().parents[1]
UI_FILE = REPO / "MultimodalPrealign" / "Resources" / "UI" / "MultimodalPrealign.ui"

#: What the panel shows before the user touches anything (0 for sampling/iterations: the engine's own default).
DEFAULTS = {
    "fixedVolume": None, "movingVolume": None, "fixedSegmentation": None, "movingSegmentation": None,
    "prealignMethod": "auto", "cropMarginMm": 20.0, "spacingScale": 1.0, "isotropic": True, "engine": "brainsfit",
    "fallback": True, "keepTemporaryFiles": False, "stageRigid": True, "stageAffine": True, "stageBSpline": False,
    "samplingPercentage": 0.0, "iterations": 0, "outputTransform": None, "outputVolume": None,
    "perStructure": "", "structureSegmentation": None,
}
#: Inclusive bounds of the WithinRange fields.
RANGES = {"cropMarginMm": (0.0, 200.0), "spacingScale": (0.1, 20.0), "samplingPercentage": (0.0, 1.0),
          "iterations": (0, 100000)}
#: Node fields -> (node class the field holds, node reference role on the vtkMRMLScriptedModuleNode).
#: Slicer stores a plain node field under its own name, an Optional one (UnionSerializer) as member 0 of the union.
NODE_FIELDS = {
    "fixedVolume": ("vtkMRMLScalarVolumeNode", "fixedVolume"),
    "movingVolume": ("vtkMRMLScalarVolumeNode", "movingVolume"),
    "fixedSegmentation": ("vtkMRMLSegmentationNode", "fixedSegmentation.0"),
    "movingSegmentation": ("vtkMRMLSegmentationNode", "movingSegmentation.0"),
    "outputTransform": ("vtkMRMLTransformNode", "outputTransform.0"),
    "outputVolume": ("vtkMRMLScalarVolumeNode", "outputVolume.0"),
    "structureSegmentation": ("vtkMRMLSegmentationNode", "structureSegmentation.0"),
}


@pytest.fixture()
def module(monkeypatch, tmp_path):
    mod = load_module(monkeypatch, tmp_path)
    yield mod
    slicer.mrmlScene.Clear(1)


def wrapper_types():
    """Slicer's own parameterNodeWrapper helpers (the vendored module, as the module file imported it)."""
    import slicer.parameterNodeWrapper as pnw

    return pnw


def annotation(module, field, validator_name):
    """The field's first validator of class ``validator_name`` (Choice, WithinRange), as the real wrapper sees it."""
    pnw = wrapper_types()
    _, annotations = pnw.splitAnnotations(module.MultimodalPrealignParameterNode.dataType(field))
    return pnw.findFirstAnnotation(annotations, getattr(pnw, validator_name))


def ui_bound_widgets() -> dict:
    """SlicerParameterName -> (widget class, {property: text or [strings]}) from the .ui."""
    bound = {}
    for widget in ET.parse(UI_FILE).getroot().iter("widget"):
        props = {}
        for prop in widget.findall("property"):
            child = list(prop)[0] if len(prop) else None
            if child is not None and child.tag == "stringlist":
                props[prop.get("name")] = [s.text or "" for s in child]
            elif child is not None:
                props[prop.get("name")] = child.text or ""
        if "SlicerParameterName" in props:
            assert props["SlicerParameterName"] not in bound, f"{props['SlicerParameterName']} bound twice"
            bound[props["SlicerParameterName"]] = (widget.get("class"), props)
    return bound


def add_node_for(field):
    class_name = NODE_FIELDS[field][0]
    concrete = "vtkMRMLLinearTransformNode" if class_name == "vtkMRMLTransformNode" else class_name
    return slicer.mrmlScene.AddNewNodeByClass(concrete, f"{field} node")


# ----------------------------------------------------------------------------- the machinery itself


def test_the_module_file_runs_on_slicers_own_machinery(module):
    import slicer.ScriptedLoadableModule as slm

    vendored = (SLICER_PYTHON / "slicer").resolve()
    pnw = wrapper_types()
    for imported in (pnw, slm, inspect.getmodule(module.parameterNodeWrapper)):
        assert vendored in Path(imported.__file__).resolve().parents, imported.__file__
    assert pnw.isParameterNodeWrapper(module.MultimodalPrealignParameterNode)
    assert set(module.MultimodalPrealignParameterNode.allParameters) == set(DEFAULTS)
    assert issubclass(module.MultimodalPrealignLogic, slm.ScriptedLoadableModuleLogic)
    assert isinstance(slicer.mrmlScene, slicer.vtkMRMLScene)
    # The module class on Slicer's ScriptedLoadableModule: its metadata, its self-test registered, sample data hooked.
    parent = ModuleParentStandIn(str(REPO / "MultimodalPrealign" / "MultimodalPrealign.py"))
    instance = module.MultimodalPrealign(parent)
    assert instance.moduleName == "MultimodalPrealign"
    assert parent.title == "Multimodal Prealign" and parent.categories == ["Registration"]
    assert "user guide" in parent.helpText and parent.acknowledgementText.strip()
    assert Path(parent.icon.path) == REPO / "MultimodalPrealign" / "Resources" / "Icons" / "MultimodalPrealign.png"
    assert slicer.selfTests["MultimodalPrealign"] == instance.runTest
    assert ("startupCompleted()", module.registerSampleData) in slicer.app.connections


# ----------------------------------------------------------------------------- defaults and the .ui


def test_defaults_on_a_new_parameter_node(module):
    p = module.MultimodalPrealignLogic().getParameterNode()
    node = p.parameterNode
    assert node.GetClassName() == "vtkMRMLScriptedModuleNode" and node.GetScene() is slicer.mrmlScene
    assert node.GetSingletonTag() == "MultimodalPrealign" and node.GetAttribute("ModuleName") == "MultimodalPrealign"
    assert set(p.allParameters) == set(DEFAULTS)
    for field, expected in DEFAULTS.items():
        value = getattr(p, field)
        assert value == expected and type(value) is type(expected), (field, value)
        assert p.default(field).value == expected, field
    # Every default is written into the node at once (as Slicer saves it), as text.
    assert node.GetParameter("engine") == "brainsfit" and node.GetParameter("cropMarginMm") == "20.0"
    assert node.GetParameter("stageBSpline") == "False" and node.GetParameter("iterations") == "0"
    # Every default is a value the field accepts (Choice, WithinRange): writing it back raises nothing.
    for field, expected in DEFAULTS.items():
        setattr(p, field, expected)


def test_panel_defaults_match_the_console_defaults(module):
    """The panel's defaults are logic.run's keyword defaults (0 in the panel = None in run: the engine's default)."""
    run = inspect.signature(module.MultimodalPrealignLogic.run).parameters
    keyword = {"prealignMethod": "prealign"}
    for field in ("prealignMethod", "engine", "cropMarginMm", "spacingScale", "isotropic", "fallback",
                  "keepTemporaryFiles"):
        assert run[keyword.get(field, field)].default == DEFAULTS[field], field
    for field in ("samplingPercentage", "iterations"):
        assert run[field].default is None and DEFAULTS[field] == 0
    stages = [s for s, field in (("rigid", "stageRigid"), ("affine", "stageAffine"), ("bspline", "stageBSpline"))
              if DEFAULTS[field]]
    assert list(run["stages"].default) == stages


def test_ui_widgets_bind_to_the_wrapper_fields(module):
    wrapper = module.MultimodalPrealignParameterNode
    pnw = wrapper_types()
    bound = ui_bound_widgets()
    assert set(bound) - set(wrapper.allParameters) == set(), "SlicerParameterName without a field"
    assert set(wrapper.allParameters) - set(bound) == set(), "field without a widget"
    for field, (widget_class, props) in bound.items():
        datatype = wrapper.dataType(field)
        if field in NODE_FIELDS:
            # Slicer's node-combo-box connector sets nodeTypes from the annotation: the .ui says the same.
            assert widget_class == "qMRMLNodeComboBox", field
            assert list(pnw.getNodeTypes(datatype)) == props["nodeTypes"] == [NODE_FIELDS[field][0]], field
            optional = type(None) in typing.get_args(pnw.unannotatedType(datatype))
            assert (props.get("noneEnabled") == "true") == optional, f"{field}: noneEnabled must match Optional"
        elif widget_class == "QComboBox":
            # Slicer's QComboBox connector needs a Choice (it fills the combo box with the choices).
            assert annotation(module, field, "Choice") is not None, field
        elif widget_class in ("QDoubleSpinBox", "QSpinBox"):
            within = annotation(module, field, "WithinRange")
            low, high = within.minimum, within.maximum
            assert (low, high) == RANGES[field], field
            # Slicer's connector sets the range; the .ui's decimals must still show the bounds and the default
            # exactly, or the spin box would round them and write the rounded value back into the node.
            decimals = int(props.get("decimals", 2)) if widget_class == "QDoubleSpinBox" else 0
            for value in (low, high, DEFAULTS[field]):
                assert round(value, decimals) == value, (field, value, decimals)
        elif widget_class == "QLineEdit":  # free text (e.g. structure names): Slicer's line-edit connector
            assert pnw.unannotatedType(datatype) is str, field
        else:
            assert widget_class == "QCheckBox" and pnw.unannotatedType(datatype) is bool, field


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("field, choices", [("engine", "ENGINES"), ("prealignMethod", "PREALIGN_METHODS")])
def test_choice_fields_reject_values_not_in_the_list(module, field, choices):
    p = module.MultimodalPrealignLogic().getParameterNode()
    allowed = getattr(module, choices)
    assert list(annotation(module, field, "Choice").choices) == allowed
    for value in allowed:
        setattr(p, field, value)
        assert getattr(p, field) == value and p.parameterNode.GetParameter(field) == value
    kept = getattr(p, field)
    for bad in ("ants", "", allowed[0].upper(), "core" if field == "engine" else "rigid"):
        assert bad not in allowed
        with pytest.raises(ValueError, match="must be in one of the following"):
            setattr(p, field, bad)
        assert getattr(p, field) == kept and p.parameterNode.GetParameter(field) == kept


@pytest.mark.parametrize("field", sorted(RANGES))
def test_within_range_fields_reject_values_out_of_range(module, field):
    p = module.MultimodalPrealignLogic().getParameterNode()
    low, high = RANGES[field]
    step, far = (1, 10**9) if isinstance(low, int) else (1e-6, 1e9)
    for value in (low, high):  # bounds are inclusive
        setattr(p, field, value)
        assert getattr(p, field) == value
    for bad in (low - step, high + step, -far, far):
        with pytest.raises(ValueError, match="must be within range"):
            setattr(p, field, bad)
        assert getattr(p, field) == high and p.parameterNode.GetParameter(field) == str(high)


def test_typed_fields_reject_other_types(module):
    p = module.MultimodalPrealignLogic().getParameterNode()
    with pytest.raises(TypeError):
        p.iterations = 1.5
    with pytest.raises(TypeError):
        p.isotropic = "yes"
    assert (p.iterations, p.isotropic) == (0, True)
    p.cropMarginMm = 5  # an int is a float's value: stored and read back as a float
    assert p.cropMarginMm == 5.0 and type(p.cropMarginMm) is float


# ----------------------------------------------------------------------------- node references


def test_node_fields_are_node_references_of_the_scripted_module_node(module):
    p = module.MultimodalPrealignLogic().getParameterNode()
    node = p.parameterNode
    nodes = {field: add_node_for(field) for field in NODE_FIELDS}
    for field, value in nodes.items():
        setattr(p, field, value)
    for field, (class_name, role) in NODE_FIELDS.items():
        assert node.GetNodeReferenceID(role) == nodes[field].GetID(), (field, role)
        assert getattr(p, field).GetID() == nodes[field].GetID()
        assert getattr(p, field).IsA(class_name)
    # Another wrapper of the same node (what the panel gets after reopening the module) sees the same nodes.
    again = module.MultimodalPrealignLogic().getParameterNode()
    assert {f: getattr(again, f).GetID() for f in NODE_FIELDS} == {f: n.GetID() for f, n in nodes.items()}
    # Wrong node classes are refused; a label map is a scalar volume and is accepted.
    with pytest.raises(TypeError):
        p.fixedVolume = nodes["fixedSegmentation"]
    with pytest.raises(TypeError):
        p.outputTransform = nodes["outputVolume"]
    with pytest.raises(TypeError):
        p.movingSegmentation = nodes["movingVolume"]
    assert p.fixedVolume.GetID() == nodes["fixedVolume"].GetID()
    label_map = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    p.fixedVolume = label_map
    assert node.GetNodeReferenceID("fixedVolume") == label_map.GetID()
    # None clears a reference; removing a referenced node from the scene clears it too (MRML keeps no dangling ID).
    p.outputTransform = None
    assert node.GetNodeReferenceID("outputTransform.0") is None and p.outputTransform is None
    slicer.mrmlScene.RemoveNode(nodes["fixedSegmentation"])
    assert node.GetNodeReferenceID("fixedSegmentation.0") is None and p.fixedSegmentation is None
    assert again.fixedSegmentation is None


def test_parameter_node_is_one_singleton_per_scene(module, monkeypatch):
    first = module.MultimodalPrealignLogic().getParameterNode()
    second = module.MultimodalPrealignLogic().getParameterNode()
    assert first.parameterNode.GetID() == second.parameterNode.GetID()
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1
    first.engine = "itk"
    assert second.engine == "itk"  # the cached value follows the node
    # Closing the scene keeps the singleton node but resets it: the next wrapper reads the defaults again.
    slicer.mrmlScene.Clear(0)
    after_close = module.MultimodalPrealignLogic().getParameterNode()
    assert after_close.engine == DEFAULTS["engine"] and after_close.parameterNode.GetAttribute("ModuleName")
    # Another scene has its own node.
    other = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", other)
    elsewhere = module.MultimodalPrealignLogic().getParameterNode()
    assert elsewhere.parameterNode.GetScene() is other and elsewhere.engine == DEFAULTS["engine"]


# ----------------------------------------------------------------------------- round trip through a scene file


def test_parameter_node_round_trip_through_a_saved_scene(module, monkeypatch, tmp_path):
    p = module.MultimodalPrealignLogic().getParameterNode()
    values = {"prealignMethod": "moments", "cropMarginMm": 35.5, "spacingScale": 2.25, "isotropic": False,
              "engine": "elastix", "fallback": False, "keepTemporaryFiles": True, "stageRigid": False,
              "stageAffine": False, "stageBSpline": True, "samplingPercentage": 0.0125, "iterations": 321,
              "perStructure": "femur, tibia"}
    assert all(values[field] != DEFAULTS[field] for field in values)  # every one differs from its default
    assert set(values) | set(NODE_FIELDS) == set(DEFAULTS)
    nodes = {field: add_node_for(field) for field in NODE_FIELDS}
    for field, value in {**values, **nodes}.items():
        setattr(p, field, value)
    scene_file = tmp_path / "scene.mrml"
    slicer.mrmlScene.SetURL(str(scene_file))
    assert slicer.mrmlScene.Commit() == 1 and scene_file.is_file()

    # Import into a scene that already holds a node with the first volume's ID: MRML renames the imported nodes
    # and updates the parameter node's references.
    loaded = slicer.vtkMRMLScene()
    squatter = loaded.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "already here")
    assert squatter.GetID() == nodes["fixedVolume"].GetID()
    loaded.SetURL(str(scene_file))
    assert loaded.Import() == 1
    monkeypatch.setattr(slicer, "mrmlScene", loaded)
    again = module.MultimodalPrealignLogic().getParameterNode()
    assert loaded.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1
    for field, value in values.items():
        assert getattr(again, field) == value and type(getattr(again, field)) is type(value), field
    for field, (class_name, role) in NODE_FIELDS.items():
        referenced = again.parameterNode.GetNodeReference(role)
        assert referenced is not None and referenced.GetScene() is loaded, field
        assert referenced.GetName() == f"{field} node" and referenced.IsA(class_name), field
        assert getattr(again, field).GetID() == referenced.GetID()
    assert again.fixedVolume.GetID() != squatter.GetID()


# ----------------------------------------------------------------------------- logic.run on real nodes


def test_run_on_real_volume_segmentation_and_transform_nodes(module):
    """Apply with the panel's values read from the real parameter node, fallback off, segmentations given."""
    from test_slicer_module_logic import segmentation_from_labels

    pair = phantoms.make_pair(seed=2, fixed_spacing=(5.0, 5.0, 5.0), moving_spacing=(5.0, 5.0, 6.0),
                              rotation_deg=8.0, translation_mm=12.0, labels=True)
    scene = slicer.mrmlScene
    fixed = mrml_bridge.add_volume_from_sitk(scene, pair.fixed, "CT")
    moving = mrml_bridge.add_volume_from_sitk(scene, pair.moving, "MR")
    names = ["liver", "spleen", "kidney_left", "kidney_right", "aorta"]
    p = module.MultimodalPrealignLogic().getParameterNode()
    p.fixedVolume, p.movingVolume = fixed, moving
    p.fixedSegmentation = segmentation_from_labels(pair.fixed_labels, fixed, "total", names)
    p.movingSegmentation = segmentation_from_labels(pair.moving_labels, moving, "total_mr", names)
    p.outputTransform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "MR to CT")
    p.outputVolume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MR resampled")
    p.engine, p.prealignMethod, p.fallback = "itk", "moments", False
    p.stageAffine, p.iterations = False, 200
    stages = [name for name, on in (("rigid", p.stageRigid), ("affine", p.stageAffine),
                                    ("bspline", p.stageBSpline)) if on]
    result = module.MultimodalPrealignLogic().run(
        p.fixedVolume, p.movingVolume, fixedSegmentation=p.fixedSegmentation,
        movingSegmentation=p.movingSegmentation, prealign=p.prealignMethod, engine=p.engine, stages=stages,
        samplingPercentage=p.samplingPercentage or None, iterations=p.iterations or None,
        cropMarginMm=p.cropMarginMm, spacingScale=p.spacingScale, isotropic=p.isotropic, fallback=p.fallback,
        outputTransformNode=p.outputTransform, outputVolumeNode=p.outputVolume, writeReport=False)
    error = transforms.mean_point_error(result.transform, pair.fixed_to_moving,
                                        image_space.grid_points(pair.fixed, 6))
    assert error < 2.5, f"mean error {error:.2f} mm"
    assert result.outputTransformNode.GetID() == p.outputTransform.GetID()
    assert moving.GetParentTransformNode().GetID() == p.outputTransform.GetID()
    assert mrml_bridge.volume_node_to_sitk(p.outputVolume).GetSize() == pair.fixed.GetSize()
    # The segmentations reached the run as TotalSegmentator label maps: per-structure metrics were measured.
    structures = result.report["metrics"]["structures"]
    assert structures and structures["after"]["summary"]["median_centroid_distance_mm"] < 5.0
    assert result.report["registration"]["engine"] == "itk"
    assert result.report["fallback"]["used"] is False and len(result.report["fallback"]["attempts"]) == 1
    assert result.verdict in ("PASS", "WARN", "FAIL") and result.tableNode.GetScene() is scene


@pytest.fixture(scope="module")
def flipped_pair():
    """Head-feet flipped pair: the 'geometry' pre-alignment (box centres) leaves a pose rigid registration cannot
    fix, so its attempt FAILs."""
    return phantoms.make_pair(seed=6, fixed_spacing=(5.0, 5.0, 5.0), moving_spacing=(5.0, 5.0, 6.0),
                              rotation_deg=0.0, translation_mm=0.0, flip=True, labels=False)


def record_the_true_pose_as_a_second_candidate(monkeypatch, pair):
    """What a search pre-alignment records besides its chosen pose: here one more candidate, the true pose. The
    fallback's own selection (``prealign_candidate_transforms``: distinct poses, best first) still runs on it."""
    from MultimodalPrealignLib.pipeline import fallback

    matrix = np.asarray(transforms.to_matrix(pair.fixed_to_moving))
    recorded = [{"stage": "refined", "source": "test", "score": 0.5, "matrix_4x4": matrix[:3].tolist()}]
    real = fallback.prealign_candidate_transforms
    monkeypatch.setattr(fallback, "prealign_candidate_transforms", lambda candidates, **kw: real(recorded, **kw))


@pytest.mark.parametrize("fallback", [False, True], ids=["fallback-off", "fallback-on"])
def test_run_falls_back_on_fail_only_when_asked(module, monkeypatch, flipped_pair, fallback):
    record_the_true_pose_as_a_second_candidate(monkeypatch, flipped_pair)
    scene = slicer.mrmlScene
    fixed = mrml_bridge.add_volume_from_sitk(scene, flipped_pair.fixed, "CT")
    moving = mrml_bridge.add_volume_from_sitk(scene, flipped_pair.moving, "MR")
    p = module.MultimodalPrealignLogic().getParameterNode()
    p.fallback = fallback  # the panel's checkbox, through the real parameter node
    seen = []
    result = module.MultimodalPrealignLogic().run(
        fixed, moving, engine="itk", prealign="geometry", stages=["rigid"], iterations=100,
        fallback=p.fallback, writeReport=False, progressCallback=lambda stage, fraction, text: seen.append(stage))
    record = result.report["fallback"]
    attempts = record["attempts"]
    assert attempts[0]["verdict"] == "FAIL" and attempts[0]["engine"] == "itk"
    assert attempts[0]["prealign"] == "geometry"
    assert moving.GetParentTransformNode().GetID() == result.outputTransformNode.GetID()
    error = transforms.mean_point_error(result.transform, flipped_pair.fixed_to_moving,
                                        image_space.grid_points(flipped_pair.fixed, 6))
    notes = [r for r in result.verdictReasons if r.startswith("NOTE: automatic fallback")]
    if not fallback:
        assert len(attempts) == 1 and record["used"] is False and record["chosen"] == 0
        assert result.verdict == "FAIL" and error > 50.0 and not notes and "fallback" not in seen
        return
    # The next candidate with the same engine, which registers the pair; the report says a fallback was used.
    assert len(attempts) == 2 and record["used"] is True and record["chosen"] == 1
    assert attempts[1]["engine"] == "itk" and attempts[1]["prealign"] != "geometry"
    assert attempts[1]["verdict"] != "FAIL" and result.verdict == attempts[1]["verdict"]
    assert error < 2.5, f"mean error {error:.2f} mm"
    assert notes and "fallback" in seen


def test_run_with_brainsfit_through_slicers_cli_on_real_nodes(module, monkeypatch, tmp_path):
    """engine 'brainsfit': CropVolume's crop (stand-in) and the REAL BRAINSFit run the way Slicer's CLI logic runs
    it (slicer_cli_double: node data written to files, the executable started, outputs read back into nodes)."""
    from brainsfit_helpers import brainsfit_executable
    from slicer_cli_double import SlicerCLIDouble
    from test_slicer_tools import FakeCropVolumeLogic

    from MultimodalPrealignLib.slicer import engine_run

    executable = brainsfit_executable()
    pair = phantoms.make_pair(seed=2, fixed_spacing=(5.0, 5.0, 5.0), moving_spacing=(5.0, 5.0, 6.0),
                              rotation_deg=8.0, translation_mm=12.0, labels=False)
    scene = slicer.mrmlScene
    fixed = mrml_bridge.add_volume_from_sitk(scene, pair.fixed, "CT")
    moving = mrml_bridge.add_volume_from_sitk(scene, pair.moving, "MR")
    cli = SlicerCLIDouble(scene, executable, work_dir=tmp_path / "cli")

    def services(self, temp_dir, keep_temporary_files=False):
        return engine_run.SlicerServices(scene=scene, crop_logic=FakeCropVolumeLogic(), temp_dir=temp_dir,
                                         run_cli=cli.run, brainsfit_module=cli.module,
                                         process_events=cli.process_events,
                                         keep_temporary_files=keep_temporary_files)

    monkeypatch.setattr(module.MultimodalPrealignLogic, "slicerServices", services)
    p = module.MultimodalPrealignLogic().getParameterNode()
    assert p.engine == "brainsfit"  # the panel's default engine
    output = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "MR to CT")
    result = module.MultimodalPrealignLogic().run(fixed, moving, engine=p.engine, prealign="moments",
                                                  stages=["rigid"], fallback=False, outputTransformNode=output,
                                                  writeReport=False)
    assert len(cli.runs) == 1 and cli.runs[0].exit_code == 0 and cli.runs[0].args[0] == executable
    assert cli.runs[0].node.GetStatus() == cli.runs[0].node.Completed
    assert result.report["registration"]["engine"] == "brainsfit"
    error = transforms.mean_point_error(result.transform, pair.fixed_to_moving,
                                        image_space.grid_points(pair.fixed, 6))
    assert error < 2.5, f"mean error {error:.2f} mm"
    assert result.outputTransformNode.GetID() == output.GetID()
    assert moving.GetParentTransformNode().GetID() == output.GetID()
