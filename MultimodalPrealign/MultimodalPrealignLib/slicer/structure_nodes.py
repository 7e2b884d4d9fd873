"""The Slicer side of per-structure registration (``logic.run(perStructure=...)``): the structures from a segmentation
by segment NAME, the core's per-structure run after the global one, one transform node per structure in a subject
hierarchy folder, and showing the moving volume under any of them.

Transforms: each structure's result maps FIXED physical points to MOVING physical points (LPS mm, the global
transform included); its node holds it as the transform "from parent" (``mrml_bridge.set_transform_node_from_sitk``),
so the moving volume placed under that node appears aligned for that structure.
"""

from __future__ import annotations

from ..errors import InputError
from . import mrml_bridge

#: Attribute marking the subject hierarchy folder of a run's structure transforms, and each structure's node.
FOLDER_ATTRIBUTE = "MultimodalPrealign.StructuresOf"
STRUCTURE_ATTRIBUTE = "MultimodalPrealign.Structure"


def parse_request(perStructure) -> tuple:
    """The panel's text (``femur, tibia`` or ``all``) or a list of names -> a tuple of names (empty: off)."""
    from ..structures import parse_names

    return parse_names(perStructure)


def structure_labels_from_segmentation(segmentation_node, volume_node, which: str = "fixed"):
    """The segmentation as :class:`structures.StructureLabels` on ``volume_node``'s grid: every segment (values 1..N
    in segment order), named by its segment name (as drawn in the Segment Editor or TotalSegmentator's)."""
    from ..structures import StructureLabels

    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if not ids:
        raise InputError(f"The {which} segmentation '{segmentation_node.GetName()}' has no segments",
                         "draw the structures in the Segment Editor (a segment per bone) or pick another segmentation")
    exported = mrml_bridge._export_segments(segmentation_node, ids, volume_node)
    reference = mrml_bridge.volume_node_to_sitk(volume_node, f"{which} volume")
    labels = mrml_bridge._with_class_ids(exported, reference, list(range(1, len(ids) + 1)))
    names: dict = {}
    for value, segment_id in enumerate(ids, start=1):
        names.setdefault(segmentation.GetSegment(segment_id).GetName() or segment_id, []).append(value)
    return StructureLabels(labels, names, f"segments of '{segmentation_node.GetName()}'")


def run_structures(inputs, result, names, options, structure_segmentation=None, moving_segmentation=None,
                   progress=None):
    """Register each structure of ``names`` on its own from ``result.transform`` (the global run's), with the core's
    engine (itk, or elastix when that was the global engine; Slicer's BRAINSFit runs the global registration only).

    Structures: ``structure_segmentation`` (segment names), else automatic bones with ``options.structure_threshold``.
    Stores the results on ``result.structures`` / ``result.structure_labels`` and report.json ``structures``.
    """
    import dataclasses

    from .. import structures

    if structure_segmentation is not None:
        labels = structure_labels_from_segmentation(structure_segmentation, inputs.fixed_node)
    elif options.structure_threshold is not None:
        labels = structures.threshold_bone_labels(inputs.fixed, float(options.structure_threshold))
    else:
        raise InputError("Per-structure registration needs the structures of the fixed volume",
                         "select a segmentation of the fixed volume (one segment per structure) or give "
                         "structureThreshold (bones of a CT / microCT)")
    moving_labels = None
    if moving_segmentation is not None:
        moving_labels = structure_labels_from_segmentation(moving_segmentation, inputs.moving_node, "moving")
    engine = options.registration.engine if options.registration.engine in ("itk", "elastix") else "itk"
    registration = dataclasses.replace(options.registration, engine=engine, stages=tuple(options.structure_stages))
    # the volumes as they are (an int16 microCT: no float32 copy; the core shrinks it by block sums)
    result.structures, block = structures.run(inputs.fixed, inputs.moving, result.transform, labels, names,
                                              structures.StructureSettings(registration=registration), moving_labels,
                                              progress)
    result.structure_labels = labels
    result.report["structures"] = block
    return result.structures


def place_structure_nodes(scene, inputs, results, temp_dir: str | None = None) -> dict:
    """One linear transform node per registered structure, named after it, in a subject hierarchy folder
    "<moving> to <fixed> structures" (a previous run's folder for the same pair is emptied and reused).
    Returns {structure name: transform node}."""
    import slicer

    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    folder_name = f"{inputs.pair_name} structures"
    key = f"{inputs.moving_node.GetID()}->{inputs.fixed_node.GetID()}"
    folder = _existing_folder(hierarchy, key)
    if folder:
        for child in _children(hierarchy, folder):
            node = hierarchy.GetItemDataNode(child)
            if node is not None and node.GetAttribute(STRUCTURE_ATTRIBUTE):
                if inputs.moving_node.GetParentTransformNode() is node:
                    inputs.moving_node.SetAndObserveTransformNodeID(None)
                scene.RemoveNode(node)
    else:
        folder = hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), folder_name)
        hierarchy.SetItemAttribute(folder, FOLDER_ATTRIBUTE, key)
    nodes = {}
    for result in results:
        if result.transform is None:
            continue
        node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", result.name)
        mrml_bridge.set_transform_node_from_sitk(node, result.transform, temp_dir)
        node.SetAttribute(STRUCTURE_ATTRIBUTE, result.name)
        node.SetAttribute("MultimodalPrealign.Convention", "fixed->moving resampling (from parent)")
        node.SetAttribute("MultimodalPrealign.Verdict", result.verdict)
        item = hierarchy.GetItemByDataNode(node)
        if not item:
            item = hierarchy.CreateItem(folder, node)
        hierarchy.SetItemParent(item, folder)
        nodes[result.name] = node
    return nodes


def _existing_folder(hierarchy, key: str) -> int:
    for item in _children(hierarchy, hierarchy.GetSceneItemID(), recursive=True):
        if hierarchy.GetItemAttribute(item, FOLDER_ATTRIBUTE) == key:
            return item
    return 0


def _children(hierarchy, parent: int, recursive: bool = False) -> list:
    import vtk

    ids = vtk.vtkIdList()
    hierarchy.GetItemChildren(parent, ids, recursive)
    return [ids.GetId(i) for i in range(ids.GetNumberOfIds())]


def show_moving_under(moving_node, transform_node) -> None:
    """Place the moving volume under ``transform_node`` (a structure's, or the global output transform): it then
    appears aligned for that structure."""
    if moving_node is None or transform_node is None:
        raise InputError("No moving volume or structure transform to show", "run the registration first")
    mrml_bridge.apply_to_volume(moving_node, transform_node)


def choices(result) -> list:
    """[(label, transform node)] for the panel's selector: the global transform, then every structure's."""
    out = [("global", result.outputTransformNode)] if getattr(result, "outputTransformNode", None) else []
    return out + [(name, node) for name, node in (getattr(result, "structureTransformNodes", None) or {}).items()]


def check_request(perStructure, structureStages, structureThreshold, segmentation_node) -> tuple:
    """The names asked for (empty: off), checked before anything runs: InputError when there is nothing to take the
    structures from, or the stages are not valid."""
    from ..structures.register import check_structure_stages

    names = parse_request(perStructure)
    if not names:
        return ()
    check_structure_stages(structureStages)
    if segmentation_node is None and structureThreshold is None:
        raise InputError("Per-structure registration needs the structures of the fixed volume",
                         "select a segmentation of the fixed volume (one segment per structure, 'From segmentation') "
                         "or give structureThreshold (bones of a CT / microCT)")
    return names


def set_options(options, names: tuple, stages, threshold) -> None:
    """Record the per-structure settings in the run's options (report.json ``settings``, the reproduce code)."""
    options.per_structure = tuple(names)
    options.structure_stages = tuple(stages)
    options.structure_threshold = threshold


def fill_selector(combo, result) -> None:
    """The panel's 'Show moving under' list: 'global' and each structure's transform node (empty without
    per-structure results)."""
    combo.blockSignals(True)
    combo.clear()
    for label, _node in choices(result):
        combo.addItem(label)
    combo.blockSignals(False)
    combo.enabled = len(choices(result)) > 1


def show_choice(result, moving_node, index: int) -> None:
    """The selector's ``index``-th choice (:func:`choices`): the moving volume placed under that transform node."""
    options = choices(result)
    if 0 <= index < len(options):
        show_moving_under(moving_node, options[index][1])
