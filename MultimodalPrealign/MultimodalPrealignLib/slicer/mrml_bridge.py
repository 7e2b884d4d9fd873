"""MRML <-> core conversions for the Slicer module (volume nodes, transform nodes, ROIs, segmentations).

``slicer`` and ``vtk`` are imported lazily INSIDE the functions, so the core stays importable without
Slicer. Everything here works with the full Slicer application and with the ``slicer-core`` wheel
(no Qt, no CLI modules), which is what the tests use.

Conventions at this edge:

* Slicer stores volumes and markups in RAS, ITK/SimpleITK (and the core) in LPS: x and y change sign.
* A volume node's IJKToRAS matrix holds origin, spacing and direction; the SimpleITK image gets the
  same geometry in LPS (direction_lps = diag(-1, -1, 1) @ direction_ras).
* The core's transforms map FIXED physical points to MOVING physical points (LPS mm, ITK resampling
  direction). In Slicer that is the "from parent" transform of the node under which the MOVING
  volume is placed to appear aligned with the fixed volume; its "to parent" matrix maps moving RAS
  to fixed RAS (``transforms.fixed_to_moving_lps_to_slicer_to_parent_ras``).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..geometry import image_space, transforms
from ..geometry.image_space import Box

#: x and y flip between LPS and RAS (3x3), from geometry.transforms.
FLIP_XY = transforms.LPS_TO_RAS[:3, :3]


# ----------------------------------------------------------------------------------------------- matrices

def vtk_matrix_to_numpy(matrix) -> np.ndarray:
    """4x4 numpy array of a vtkMatrix4x4."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def numpy_to_vtk_matrix(array: np.ndarray):
    """vtkMatrix4x4 holding a 4x4 numpy array."""
    import vtk

    array = np.asarray(array, dtype=float)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijk_to_ras_from_sitk(image: sitk.Image) -> np.ndarray:
    """IJKToRAS 4x4 of a SimpleITK image (origin, spacing, direction; LPS -> RAS)."""
    a, origin = image_space.index_to_physical_matrix(image)
    m = np.eye(4)
    m[:3, :3] = FLIP_XY @ a
    m[:3, 3] = FLIP_XY @ origin
    return m


def sitk_geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray) -> tuple[list, list, list]:
    """(origin_lps, spacing, direction_lps row-major 9) from an IJKToRAS matrix."""
    m = np.asarray(ijk_to_ras, dtype=float)
    a = FLIP_XY @ m[:3, :3]
    spacing = np.linalg.norm(a, axis=0)
    if np.any(spacing <= 0):
        raise InputError("A volume has a zero voxel spacing in its IJKToRAS matrix", "fix the volume's geometry")
    direction = a / spacing
    origin = FLIP_XY @ m[:3, 3]
    return origin.tolist(), spacing.tolist(), direction.ravel().tolist()


# ------------------------------------------------------------------------------------------------ volumes

def _node_label(node) -> str:
    try:
        return f"'{node.GetName()}'"
    except Exception:  # pragma: no cover - only for odd doubles
        return "the volume"


def volume_node_to_sitk(volume_node, what: str = "volume") -> sitk.Image:
    """SimpleITK image (copy) of a scalar volume node with its full geometry in LPS.

    Uses the node's own IJKToRAS (origin, spacing, direction). A parent transform is NOT applied:
    callers refuse or harden transformed inputs first (see :func:`check_not_transformed`).
    """
    from vtk.util import numpy_support

    if volume_node is None:
        raise InputError(f"No {what} selected", f"select a {what} node")
    image_data = volume_node.GetImageData()
    if image_data is None or image_data.GetPointData() is None or image_data.GetPointData().GetScalars() is None:
        raise InputError(f"The {what} {_node_label(volume_node)} has no voxels loaded",
                         "load the image data (or pick another volume)")
    dims = image_data.GetDimensions()
    scalars = image_data.GetPointData().GetScalars()
    components = scalars.GetNumberOfComponents()
    if components != 1:
        raise InputError(f"The {what} {_node_label(volume_node)} has {components} components per voxel",
                         "give a scalar (grey-level) volume; convert colour/vector volumes first "
                         "(Vector to Scalar Volume)")
    array = numpy_support.vtk_to_numpy(scalars).reshape(dims[2], dims[1], dims[0]).copy()
    image = sitk.GetImageFromArray(array)
    ijk_to_ras = _ijk_to_ras(volume_node)
    origin, spacing, direction = sitk_geometry_from_ijk_to_ras(ijk_to_ras)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def _ijk_to_ras(volume_node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return vtk_matrix_to_numpy(matrix)


def update_volume_node_from_sitk(volume_node, image: sitk.Image):
    """Put a SimpleITK image (voxels + geometry) into an existing volume node. Returns the node."""
    import vtk
    from vtk.util import numpy_support

    array = np.ascontiguousarray(sitk.GetArrayFromImage(image))
    if array.ndim != 3:
        raise InputError(f"Cannot store a {array.ndim}D array in a volume node", "give a 3D scalar image")
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(int(array.shape[2]), int(array.shape[1]), int(array.shape[0]))
    vtk_array = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image_data.GetPointData().SetScalars(vtk_array)
    volume_node.SetAndObserveImageData(image_data)
    volume_node.SetIJKToRASMatrix(numpy_to_vtk_matrix(ijk_to_ras_from_sitk(image)))
    return volume_node


def add_volume_from_sitk(scene, image: sitk.Image, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    """New volume node in ``scene`` holding ``image``."""
    node = scene.AddNewNodeByClass(class_name, name)
    return update_volume_node_from_sitk(node, image)


def check_not_transformed(volume_node, what: str, allowed_transform_node=None) -> None:
    """Refuse a volume placed under a transform (its voxels would not be where the core reads them).

    ``allowed_transform_node``: our own output transform (re-running the module on a moving volume that
    the previous run placed under it is fine: the node is overwritten).
    """
    parent = volume_node.GetParentTransformNode() if volume_node is not None else None
    if parent is None:
        return
    if allowed_transform_node is not None and parent.GetID() == allowed_transform_node.GetID():
        return
    raise InputError(
        f"The {what} {_node_label(volume_node)} is under the transform '{parent.GetName()}'",
        "harden the transform (Data module: right-click the volume, 'Harden transform') or remove it, then run again")


# --------------------------------------------------------------------------------------------- transforms

def set_transform_node_from_sitk(transform_node, fixed_to_moving: sitk.Transform, temp_dir: str | None = None):
    """Store a fixed->moving (LPS) transform in a Slicer transform node meant for the MOVING volume.

    Linear transforms: the "to parent" RAS matrix (moving RAS -> fixed RAS). Nonlinear (BSpline,
    displacement field, composite): written as an ITK .h5 file and read by Slicer's transform storage
    node, which stores ITK's resampling transform as "from parent" (fixed RAS -> moving RAS).
    Returns the node. Place the moving volume under it with :func:`apply_to_volume`.
    """
    if transforms.is_linear(fixed_to_moving):
        to_parent = transforms.fixed_to_moving_lps_to_slicer_to_parent_ras(transforms.to_matrix(fixed_to_moving))
        transform_node.SetMatrixTransformToParent(numpy_to_vtk_matrix(to_parent))
        return transform_node
    with _transform_file(temp_dir, "fixed_to_moving_lps.h5") as path:
        transforms.write_transform(fixed_to_moving, path)
        _read_transform_file_into_node(transform_node, path)
    return transform_node


@contextmanager
def _transform_file(temp_dir: str | None, file_name: str):
    """Path of ``file_name`` in ``temp_dir`` (left there), or in a new temporary folder removed after the block."""
    folder = Path(temp_dir or tempfile.mkdtemp(prefix="MultimodalPrealign-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name
    try:
        yield path
    finally:
        if temp_dir is None:
            _remove_quietly(path)
            _remove_quietly(folder)


@contextmanager
def _transform_storage(transform_node, path: Path):
    """A transform storage node for ``path``, in the node's scene for the duration of the block."""
    import slicer

    scene = transform_node.GetScene()
    storage = slicer.vtkMRMLTransformStorageNode()
    if scene is not None:
        scene.AddNode(storage)
    storage.SetFileName(str(path))
    try:
        yield storage
    finally:
        if scene is not None:
            scene.RemoveNode(storage)


def _read_transform_file_into_node(transform_node, path: Path) -> None:
    with _transform_storage(transform_node, path) as storage:
        if not storage.ReadData(transform_node):
            raise RuntimeError(f"Slicer could not read the transform file {path}")


def sitk_from_transform_node(transform_node, temp_dir: str | None = None) -> sitk.Transform:
    """fixed->moving (LPS) SimpleITK transform of a Slicer transform node that moves the MOVING volume.

    Linear nodes are read from their "to parent" matrix; nonlinear ones are written by Slicer's
    storage node to an ITK .h5 file (which holds the resampling direction) and read back.
    """
    import vtk

    if transform_node.IsLinear():
        matrix = vtk.vtkMatrix4x4()
        transform_node.GetMatrixTransformToParent(matrix)
        lps = transforms.slicer_to_parent_ras_to_fixed_to_moving_lps(vtk_matrix_to_numpy(matrix))
        return transforms.affine_from_matrix(lps)
    with _transform_file(temp_dir, "slicer_transform.h5") as path, _transform_storage(transform_node, path) as storage:
        if not storage.WriteData(transform_node):
            raise RuntimeError(f"Slicer could not write the transform '{transform_node.GetName()}' to {path}")
        return transforms.read_transform(path)


def apply_to_volume(volume_node, transform_node) -> None:
    """Place ``volume_node`` under ``transform_node`` (not hardened: the voxels stay untouched)."""
    volume_node.SetAndObserveTransformNodeID(transform_node.GetID() if transform_node is not None else None)


def transform_ras_point(transform_node, point_ras, to_world: bool = True) -> np.ndarray:
    """Where a point of the node's child space lands in world RAS (to_world) or the reverse."""
    if to_world:
        t = transform_node.GetTransformToParent()
    else:
        t = transform_node.GetTransformFromParent()
    return np.asarray(t.TransformPoint([float(v) for v in point_ras]), dtype=float)


def _remove_quietly(path: Path) -> None:
    try:
        if path.is_dir():
            os.rmdir(path)
        elif path.exists():
            path.unlink()
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------------- ROI

def box_lps_to_ras(box: Box) -> tuple[np.ndarray, np.ndarray]:
    """(center_ras, size_mm) of an axis-aligned LPS box. The box stays axis aligned in RAS."""
    center = FLIP_XY @ np.asarray(box.center, dtype=float)
    return center, np.asarray(box.size, dtype=float)


def set_roi_from_box(roi_node, box: Box):
    """Make a vtkMRMLMarkupsROINode cover ``box`` (LPS mm, world space). Returns the node."""
    center, size = box_lps_to_ras(box)
    roi_node.SetCenter([float(v) for v in center])
    roi_node.SetSize([float(v) for v in size])
    return roi_node


def box_from_roi(roi_node) -> Box:
    """Axis-aligned LPS box of an (axis-aligned) ROI node."""
    bounds = [0.0] * 6
    roi_node.GetRASBounds(bounds)
    lower_ras = np.array(bounds[0::2])
    upper_ras = np.array(bounds[1::2])
    corners = np.stack([FLIP_XY @ lower_ras, FLIP_XY @ upper_ras])
    return Box(tuple(corners.min(0).tolist()), tuple(corners.max(0).tolist()))


# ------------------------------------------------------------------------------------------ segmentations

def labelmap_from_segmentation(segmentation_node, reference_volume_node, class_ids: dict,
                               labelmap_node=None) -> tuple[sitk.Image, dict]:
    """UInt16 label map on ``reference_volume_node``'s grid with TotalSegmentator class ids.

    ``class_ids``: class name -> id of the task (e.g. {"liver": 5, ...}). Segments are matched by
    segment ID (SlicerTotalSegmentator uses class names as IDs; display names may be terminology
    names), then by segment name for segmentations loaded from files. Returns (labels, info) with
    info = {"matched": {name: segment_id}, "unmatched_segments": [...]}. Raises InputError when no
    segment matches.
    """
    matched, unmatched = _segments_of_classes(segmentation_node, class_ids)
    names = sorted(matched, key=lambda n: int(class_ids[n]))
    exported = _export_segments(segmentation_node, [matched[name] for name in names], reference_volume_node,
                                labelmap_node)
    reference = volume_node_to_sitk(reference_volume_node, "reference volume")
    labels = _with_class_ids(exported, reference, [int(class_ids[name]) for name in names])
    return labels, {"matched": {n: matched[n] for n in names}, "unmatched_segments": unmatched}


def _segments_of_classes(segmentation_node, class_ids: dict) -> tuple[dict, list]:
    """({class name: segment ID} matched by segment ID, then by segment name; [unmatched segment IDs])."""
    segmentation = segmentation_node.GetSegmentation()
    matched: dict = {}
    unmatched: list = []
    for i in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(i)
        name = segmentation.GetSegment(segment_id).GetName()
        if segment_id in class_ids:
            matched.setdefault(segment_id, segment_id)
        elif name in class_ids:
            matched.setdefault(name, segment_id)
        else:
            unmatched.append(segment_id)
    if not matched:
        raise InputError(
            f"None of the {segmentation.GetNumberOfSegments()} segments of '{segmentation_node.GetName()}' is a "
            "TotalSegmentator class name",
            "segment the volume with TotalSegmentator (task 'total' for CT, 'total_mr' for MR) or leave the "
            "segmentation empty")
    return matched, unmatched


def _export_segments(segmentation_node, segment_ids: list, reference_volume_node, labelmap_node=None):
    """Slicer's export of ``segment_ids`` to a label map on the reference geometry: values 1..N in the order given.

    Returns the label map as a SimpleITK image, or None when the export holds no voxels. Without ``labelmap_node``
    a temporary one is used, and every node the export added is removed again.
    """
    import slicer
    import vtk

    ids = vtk.vtkStringArray()
    for segment_id in segment_ids:
        ids.InsertNextValue(segment_id)
    scene = segmentation_node.GetScene()
    own_node = labelmap_node is None
    nodes_before = _node_ids(scene)
    if own_node:
        labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__MultimodalPrealign_labels__")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap_node, reference_volume_node,
            slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        if not ok:
            raise RuntimeError(
                f"Slicer could not export the segments of '{segmentation_node.GetName()}' to a label map")
        return volume_node_to_sitk(labelmap_node, "label map") if labelmap_node.GetImageData() is not None else None
    finally:
        # The export adds a display node and a colour table; a temporary label map leaves nothing behind.
        keep = set() if own_node else {labelmap_node.GetID()}
        for node_id in _node_ids(scene) - nodes_before - keep:
            node = scene.GetNodeByID(node_id)
            if node is not None and not (not own_node and node_id in _display_and_color_ids(labelmap_node)):
                scene.RemoveNode(node)


def _with_class_ids(exported, reference: sitk.Image, class_ids_in_order: list) -> sitk.Image:
    """The export's values 1..N replaced by the task's class ids (anything else 0), on ``reference``'s grid."""
    if exported is None:
        exported_array = np.zeros(sitk.GetArrayViewFromImage(reference).shape, np.uint16)
        exported = sitk.GetImageFromArray(exported_array)
        exported.CopyInformation(reference)
    lookup = np.zeros(len(class_ids_in_order) + 1, dtype=np.uint16)
    for i, class_id in enumerate(class_ids_in_order):
        lookup[i + 1] = class_id
    index = sitk.GetArrayFromImage(exported).astype(np.int64)
    index[(index < 0) | (index > len(class_ids_in_order))] = 0
    labels = sitk.GetImageFromArray(lookup[index])
    labels.CopyInformation(exported)
    if labels.GetSize() != reference.GetSize() or not np.allclose(labels.GetOrigin(), reference.GetOrigin(), atol=1e-3):
        labels = sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    return labels


def _node_ids(scene) -> set:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _display_and_color_ids(volume_node) -> set:
    display = volume_node.GetDisplayNode()
    if display is None:
        return set()
    color = display.GetColorNode()
    return {display.GetID()} | ({color.GetID()} if color is not None else set())
