"""Per-structure registration in the Slicer module (slicer-core's real MRML, the module over Slicer's own
parameterNodeWrapper): ``logic.run(perStructure=...)`` from a Segment Editor segmentation (any segment names), one
transform node per structure in a subject hierarchy folder, the selector that shows the moving volume under them."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed")

from slicer_app_stand_ins import load_module

from MultimodalPrealignLib.geometry import image_space, transforms
from MultimodalPrealignLib.slicer import mrml_bridge, structure_nodes
from MultimodalPrealignLib.synthetic import knee


@pytest.fixture(scope="module")
def pair():
    return knee.make_knee_pair(seed=2, fixed_spacing_mm=1.0, fixed_size=56, moving_spacing=(3.0, 1.5, 1.5),
                               flexion_fixed_deg=5.0, flexion_difference_deg=12.0, placement_rotation_deg=0.0,
                               placement_translation_mm=0.0, flip=False, moving_supersample=(2, 1, 1))


def add_segmentation(scene, labels: sitk.Image, volume_node, names: dict):
    """A segmentation node with one segment per label value, named as in ``names`` (as the Segment Editor makes)."""
    labelmap = mrml_bridge.add_volume_from_sitk(scene, labels, "bones", "vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "knee bones")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    seg = segmentation.GetSegmentation()
    for i in range(seg.GetNumberOfSegments()):
        segment = seg.GetNthSegment(i)
        value = int(segment.GetLabelValue()) if hasattr(segment, "GetLabelValue") else i + 1
        segment.SetName(names.get(value, segment.GetName()))
    scene.RemoveNode(labelmap)
    return segmentation


@pytest.fixture()
def module(monkeypatch, tmp_path):
    return load_module(monkeypatch, tmp_path)


def test_logic_run_per_structure_makes_a_transform_node_per_bone(module, pair):
    scene = slicer.mrmlScene
    fixed = mrml_bridge.add_volume_from_sitk(scene, pair.fixed, "microCT")
    moving = mrml_bridge.add_volume_from_sitk(scene, pair.moving, "MR")
    bones = add_segmentation(scene, pair.fixed_labels, fixed, knee.bone_labels())
    result = module.MultimodalPrealignLogic().run(
        fixed, moving, engine="itk", prealign="moments", stages=["rigid"], fallback=False, writeReport=False,
        perStructure="tibia, patella", structureSegmentation=bones)
    nodes = result.structureTransformNodes
    assert set(nodes) == {"tibia", "patella"}
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    folders = {hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) for node in nodes.values()}
    assert len(folders) == 1 and hierarchy.GetItemName(folders.pop()) == "MR to microCT structures"
    block = result.report["structures"]
    assert [e["name"] for e in block["results"]] == ["tibia", "patella"]
    assert block["names_from"] == "segments of 'knee bones'"
    points = image_space.grid_points(pair.fixed, 5)
    for name, node in nodes.items():  # each node holds that structure's fixed->moving transform (from parent)
        core = transforms.to_matrix(mrml_bridge.sitk_from_transform_node(node))
        entry = {e["name"]: e for e in block["results"]}[name]
        expected = np.asarray(entry["transform"]["matrix_4x4"])
        assert np.allclose(transforms.apply_matrix(core, points), transforms.apply_matrix(expected, points), atol=1e-3)
    assert "perStructure='tibia, patella'" in result.report["reproduce"]["slicer_python"]
    # the selector: global, then each structure; choosing one places the moving volume under it
    labels = [label for label, _ in structure_nodes.choices(result)]
    assert labels == ["global", "tibia", "patella"]
    structure_nodes.show_choice(result, moving, 2)
    assert moving.GetParentTransformNode() is nodes["patella"]
    structure_nodes.show_choice(result, moving, 0)
    assert moving.GetParentTransformNode() is result.outputTransformNode
    # a second run for the same pair reuses the folder and replaces its nodes
    again = module.MultimodalPrealignLogic().run(
        fixed, moving, engine="itk", prealign="moments", stages=["rigid"], fallback=False, writeReport=False,
        perStructure="femur", structureSegmentation=bones)
    assert set(again.structureTransformNodes) == {"femur"}
    assert scene.GetNodesByName("tibia").GetNumberOfItems() == 0


def test_per_structure_without_structures_is_a_value_error_before_anything_runs(module, pair):
    scene = slicer.mrmlScene
    fixed = mrml_bridge.add_volume_from_sitk(scene, pair.fixed, "microCT")
    moving = mrml_bridge.add_volume_from_sitk(scene, pair.moving, "MR")
    before = scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="needs the structures of the fixed volume"):
        module.MultimodalPrealignLogic().run(fixed, moving, engine="itk", perStructure="all", writeReport=False)
    with pytest.raises(ValueError, match="order"):
        module.MultimodalPrealignLogic().run(fixed, moving, engine="itk", perStructure="all", structureThreshold=300,
                                             structureStages=("affine", "rigid"), writeReport=False)
    assert scene.GetNumberOfNodes() == before


def test_parameter_node_holds_the_per_structure_settings(module):
    node = module.MultimodalPrealignLogic().getParameterNode()
    assert node.perStructure == "" and node.structureSegmentation is None
    node.perStructure = "femur, tibia"
    assert module.MultimodalPrealignLogic().getParameterNode().perStructure == "femur, tibia"
