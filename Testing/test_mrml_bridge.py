"""MRML-level code against the real ``slicer-core`` wheel: volumes, transforms, ROIs, crop, segmentations.

No Slicer application here: scene, storage nodes and CropVolume/Segmentations logics are the real
compiled Slicer classes from the wheel. Points are pushed through real vtkMRMLTransformNodes and must
land where the core (LPS, fixed->moving) says they do.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed")
vtk = pytest.importorskip("vtk")

from MultimodalPrealignLib import prealign
from MultimodalPrealignLib.errors import InputError
from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.geometry.image_space import Box
from MultimodalPrealignLib.io import image_io
from MultimodalPrealignLib.slicer import crop_volume, mrml_bridge, pair_diagnostics

FLIP = np.array([-1.0, -1.0, 1.0])


def lps_to_ras(p):
    return np.asarray(p, dtype=float) * FLIP


@pytest.fixture()
def scene():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


def oblique_image(size=(20, 15, 10), spacing=(2.0, 1.5, 3.0), origin=(5.0, -7.0, 9.0), seed=1,
                  pixel=sitk.sitkInt16) -> sitk.Image:
    rng = np.random.default_rng(seed)
    dtype = sitk.GetArrayViewFromImage(sitk.Image(1, 1, 1, pixel)).dtype
    array = rng.integers(-1000, 1000, size=size[::-1]).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(sitk.VersorTransform((0.2, -0.3, 0.9), 0.7).GetMatrix())
    return image


def node_ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return mrml_bridge.vtk_matrix_to_numpy(m)


# ---------------------------------------------------------------------------------------------- volumes

def test_volume_round_trip_keeps_voxels_and_full_geometry(scene):
    image = oblique_image()
    node = mrml_bridge.add_volume_from_sitk(scene, image, "oblique")
    back = mrml_bridge.volume_node_to_sitk(node)
    assert back.GetSize() == image.GetSize()
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))


def test_voxel_positions_agree_between_slicer_ras_and_itk_lps(scene):
    image = oblique_image()
    node = mrml_bridge.add_volume_from_sitk(scene, image, "oblique")
    ijk_to_ras = node_ijk_to_ras(node)
    # Slicer's own view of the geometry (not just our matrix): spacing and origin getters.
    np.testing.assert_allclose(node.GetSpacing(), image.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(node.GetOrigin(), lps_to_ras(image.GetOrigin()), atol=1e-9)
    for index in [(0, 0, 0), (19, 0, 0), (3, 14, 9), (19, 14, 9)]:
        ras = ijk_to_ras @ np.array([*index, 1.0])
        lps = image.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(ras[:3], lps_to_ras(lps), atol=1e-9)


def test_volume_without_voxels_is_refused_with_a_fix(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="no voxels loaded.*Fix:"):
        mrml_bridge.volume_node_to_sitk(node, "fixed volume")


def test_transformed_input_volume_is_refused_unless_it_is_our_output(scene):
    node = mrml_bridge.add_volume_from_sitk(scene, oblique_image(), "moving")
    ours = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "ours")
    other = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "user transform")
    mrml_bridge.check_not_transformed(node, "moving volume")
    node.SetAndObserveTransformNodeID(ours.GetID())
    mrml_bridge.check_not_transformed(node, "moving volume", allowed_transform_node=ours)
    node.SetAndObserveTransformNodeID(other.GetID())
    with pytest.raises(InputError, match="under the transform 'user transform'.*Harden"):
        mrml_bridge.check_not_transformed(node, "moving volume", allowed_transform_node=ours)


def test_pair_header_summary_from_nodes_only(scene):
    fixed = sitk.Image([100, 80, 50], sitk.sitkInt16)
    fixed.SetSpacing([1.0, 1.0, 2.0])
    moving = sitk.Image([50, 40, 20], sitk.sitkInt16)
    moving.SetSpacing([2.0, 2.0, 2.5])
    moving.SetOrigin([40.0, 0.0, 0.0])  # half of the moving box lies beyond the fixed box along x
    fixed_node = mrml_bridge.add_volume_from_sitk(scene, fixed, "CT")
    moving_node = mrml_bridge.add_volume_from_sitk(scene, moving, "MR")
    summary = pair_diagnostics.pair_header_summary(fixed_node, moving_node)
    assert summary["fixed"]["size"] == [100, 80, 50] and summary["moving"]["spacing_mm"] == [2.0, 2.0, 2.5]
    assert summary["fixed"]["extent_mm"] == [100.0, 80.0, 100.0]
    assert summary["voxel_volume_ratio_moving_over_fixed"] == pytest.approx(5.0)
    # Voxel-edge boxes (LPS): moving x 39..139, y -1..79, z -1.25..48.75; fixed x -0.5..99.5, y -0.5..79.5,
    # z -1..99. Overlap 60.5 x 79.5 x 49.75 mm of the moving box's 100 x 80 x 50 mm.
    assert summary["header_overlap_fraction"] == pytest.approx(60.5 * 79.5 * 49.75 / (100 * 80 * 50), abs=1e-4)
    moving_node.SetOrigin(-1000.0, 0.0, 0.0)
    assert pair_diagnostics.pair_header_summary(fixed_node, moving_node)["header_overlap_fraction"] == 0.0


# ------------------------------------------------------------------------------------------- transforms

def rigid_fixed_to_moving() -> sitk.Transform:
    euler = sitk.Euler3DTransform((10.0, -20.0, 5.0), 0.3, -0.2, 2.9, (12.0, -40.0, 7.0))
    return euler


def bspline_composite() -> sitk.Transform:
    reference = sitk.Image([10, 10, 10], sitk.sitkFloat32)
    reference.SetSpacing([10.0, 10.0, 10.0])
    reference.SetOrigin([-50.0, -50.0, -50.0])
    bspline = sitk.BSplineTransformInitializer(reference, [3, 3, 3])
    rng = np.random.default_rng(0)
    bspline.SetParameters((rng.normal(0, 3.0, len(bspline.GetParameters()))).tolist())
    return transforms.compose(bspline, rigid_fixed_to_moving())


def test_linear_node_moves_moving_points_onto_fixed_points(scene):
    t = rigid_fixed_to_moving()
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "result")
    mrml_bridge.set_transform_node_from_sitk(node, t)
    rng = np.random.default_rng(3)
    for p_fixed in rng.uniform(-80, 80, size=(10, 3)):
        q_moving = np.asarray(t.TransformPoint(p_fixed.tolist()))
        # The moving volume sits under the node: its point q (RAS) appears at the fixed point p (RAS).
        world = mrml_bridge.transform_ras_point(node, lps_to_ras(q_moving), to_world=True)
        np.testing.assert_allclose(world, lps_to_ras(p_fixed), atol=1e-6)


def test_nonlinear_node_from_h5_is_the_resampling_transform(scene, tmp_path):
    t = bspline_composite()
    assert not transforms.is_linear(t)
    node = scene.AddNewNodeByClass("vtkMRMLTransformNode", "bspline result")
    mrml_bridge.set_transform_node_from_sitk(node, t, str(tmp_path))
    assert not node.IsLinear()
    rng = np.random.default_rng(4)
    for p_fixed in rng.uniform(-30, 30, size=(10, 3)):
        q_moving = np.asarray(t.TransformPoint(p_fixed.tolist()))
        from_parent = mrml_bridge.transform_ras_point(node, lps_to_ras(p_fixed), to_world=False)
        np.testing.assert_allclose(from_parent, lps_to_ras(q_moving), atol=1e-4)
    # The temporary storage node is gone; the transform node stays in the scene.
    assert scene.GetNodesByClass("vtkMRMLTransformStorageNode").GetNumberOfItems() == 0


@pytest.mark.parametrize("make", [rigid_fixed_to_moving, bspline_composite])
def test_transform_node_round_trip_to_sitk(scene, make):
    t = make()
    node = scene.AddNewNodeByClass("vtkMRMLTransformNode", "t")
    mrml_bridge.set_transform_node_from_sitk(node, t)
    back = mrml_bridge.sitk_from_transform_node(node)
    points = np.random.default_rng(5).uniform(-30, 30, size=(20, 3))
    assert transforms.mean_point_error(t, back, points) < 1e-4


def test_phantom_core_transform_lands_where_the_core_says(scene, phantom_pair):
    """Real CT/MR phantom: core pre-alignment composed with a 180 degree flip, pushed through Slicer."""
    ct_path, mr_path = phantom_pair
    fixed = image_io.load_image(ct_path, "fixed image")
    moving = image_io.load_image(mr_path, "moving image")
    pre = prealign.run_prealign("geometry", prealign.PrealignInputs(fixed=fixed, moving=moving))
    center = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in fixed.GetSize()]))
    flip = sitk.Euler3DTransform(center.tolist(), 0.0, np.pi, 0.05, (0.0, 0.0, 0.0))
    fixed_to_moving = transforms.compose(flip, pre.transform)
    moving_node = mrml_bridge.add_volume_from_sitk(scene, moving, "MR")
    transform_node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "result")
    mrml_bridge.set_transform_node_from_sitk(transform_node, fixed_to_moving)
    mrml_bridge.apply_to_volume(moving_node, transform_node)
    ijk_to_ras = node_ijk_to_ras(moving_node)
    to_world = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(moving_node.GetParentTransformNode(), None, to_world)
    size = np.asarray(fixed.GetSize())
    for fraction in [(0.5, 0.5, 0.5), (0.2, 0.7, 0.4), (0.8, 0.3, 0.6)]:
        p_fixed = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint((size * fraction).tolist()))
        q_moving = np.asarray(fixed_to_moving.TransformPoint(p_fixed.tolist()))
        index = np.asarray(moving.TransformPhysicalPointToContinuousIndex(q_moving.tolist()))
        ras_local = (ijk_to_ras @ np.array([*index, 1.0]))[:3]  # the moving voxel, in Slicer
        ras_world = np.asarray(to_world.TransformPoint(ras_local.tolist()))
        np.testing.assert_allclose(ras_world, lps_to_ras(p_fixed), atol=1e-3)


# ------------------------------------------------------------------------------------------ ROI and crop

def test_roi_covers_the_lps_box_in_ras(scene):
    box = Box((-30.0, 10.0, -5.0), (20.0, 45.0, 60.0))
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "roi")
    mrml_bridge.set_roi_from_box(roi, box)
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)
    np.testing.assert_allclose(bounds, [-20.0, 30.0, -45.0, -10.0, -5.0, 60.0], atol=1e-9)
    back = mrml_bridge.box_from_roi(roi)
    np.testing.assert_allclose(back.lower, box.lower, atol=1e-9)
    np.testing.assert_allclose(back.upper, box.upper, atol=1e-9)


def test_voxel_based_crop_keeps_voxels_at_their_physical_positions(scene):
    image = oblique_image(size=(30, 25, 20), spacing=(2.0, 2.0, 3.0))
    image.SetDirection(np.diag([1.0, -1.0, 1.0]).ravel().tolist())
    node = mrml_bridge.add_volume_from_sitk(scene, image, "input")
    center = np.asarray(image.TransformContinuousIndexToPhysicalPoint((15.0, 12.0, 10.0)))
    box = Box(tuple((center - 10.0).tolist()), tuple((center + 10.0).tolist()))
    roi = mrml_bridge.set_roi_from_box(scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "roi"), box)
    output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "cropped")
    crop_volume.crop_voxel_based(roi, node, output)
    cropped = mrml_bridge.volume_node_to_sitk(output)
    assert 0 < np.prod(cropped.GetSize()) < np.prod(image.GetSize())
    np.testing.assert_allclose(cropped.GetSpacing(), image.GetSpacing(), atol=1e-9)
    array = sitk.GetArrayViewFromImage(cropped)
    for index in [(0, 0, 0), tuple(s - 1 for s in cropped.GetSize()), (2, 3, 1)]:
        p = cropped.TransformIndexToPhysicalPoint(index)
        source_index = image.TransformPhysicalPointToIndex(p)
        assert array[index[::-1]] == image[source_index]
        assert np.all(np.asarray(p) >= np.asarray(box.lower) - 2.0)
        assert np.all(np.asarray(p) <= np.asarray(box.upper) + 2.0)


def test_crop_parameters_node_and_failure_translation(scene):
    image = oblique_image()
    node = mrml_bridge.add_volume_from_sitk(scene, image, "input")
    roi = mrml_bridge.set_roi_from_box(scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "roi"),
                                       Box((0.0, 0.0, 0.0), (10.0, 10.0, 10.0)))
    output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "out")
    params = crop_volume.crop_parameters_node(scene, node, roi, output, voxel_based=False, spacing_scale=2.5,
                                              isotropic=True, interpolation="bspline", fill_value=-1000)
    assert params.GetInputVolumeNodeID() == node.GetID()
    assert params.GetROINodeID() == roi.GetID()
    assert params.GetOutputVolumeNodeID() == output.GetID()
    assert not params.GetVoxelBased() and params.GetIsotropicResampling()
    assert params.GetSpacingScalingConst() == pytest.approx(2.5)
    assert params.GetInterpolationMode() == 4 and params.GetFillValue() == -1000
    logic = slicer.vtkSlicerCropVolumeLogic()
    logic.SetMRMLScene(scene)
    # The wheel has no Volumes module/resampling CLI: interpolated crop fails and must say why.
    with pytest.raises(RuntimeError, match="CropVolume failed.*(Volumes module|resampling module)"):
        crop_volume.apply_crop(logic, params)


def test_crop_spacing_scale_matches_the_planned_working_spacing(scene):
    assert crop_volume.crop_spacing_scale((0.5, 0.5, 2.5), (3.0, 3.0, 3.0), isotropic=True) == pytest.approx(6.0)
    assert crop_volume.crop_spacing_scale((0.5, 0.5, 2.5), (3.0, 3.0, 3.0), isotropic=False) == pytest.approx(6.0)
    # CropVolume's own geometry computation agrees: isotropic output spacing = min(input) x scale.
    image = oblique_image(spacing=(0.5, 0.8, 2.5))
    image.SetDirection(np.eye(3).ravel().tolist())
    node = mrml_bridge.add_volume_from_sitk(scene, image, "input")
    roi = mrml_bridge.set_roi_from_box(scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "roi"),
                                       Box((-20.0, -20.0, -20.0), (20.0, 20.0, 20.0)))
    scale = crop_volume.crop_spacing_scale(image.GetSpacing(), (3.0, 3.0, 3.0), isotropic=True)
    extent, spacing = [0] * 6, [0.0] * 3
    ok = slicer.vtkSlicerCropVolumeLogic.GetInterpolatedCropOutputGeometry(roi, node, True, scale, extent, spacing)
    assert ok
    np.testing.assert_allclose(spacing, [3.0, 3.0, 3.0], atol=1e-9)


# ---------------------------------------------------------------------------------------- segmentations

def add_segment(segmentation_node, reference: sitk.Image, segment_id: str, name: str, mask: np.ndarray):
    from vtk.util import numpy_support

    oriented = slicer.vtkOrientedImageData()
    oriented.SetDimensions(mask.shape[2], mask.shape[1], mask.shape[0])
    oriented.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(oriented.GetPointData().GetScalars())[:] = mask.ravel()
    oriented.SetImageToWorldMatrix(mrml_bridge.numpy_to_vtk_matrix(mrml_bridge.ijk_to_ras_from_sitk(reference)))
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), oriented)
    segmentation_node.GetSegmentation().AddSegment(segment, segment_id)


def test_segmentation_to_labelmap_by_segment_id_with_task_class_ids(scene):
    reference = oblique_image()
    volume = mrml_bridge.add_volume_from_sitk(scene, reference, "CT")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT segmentation")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    shape = sitk.GetArrayViewFromImage(reference).shape
    liver, spleen, aorta = (np.zeros(shape, np.uint8) for _ in range(3))
    liver[2:5, 3:8, 4:10] = 1
    spleen[6:9, 3:8, 4:10] = 1
    aorta[0:2, 0:3, 0:3] = 1
    # IDs are class names (SlicerTotalSegmentator); display names may be terminology names.
    add_segment(segmentation, reference, "liver", "Liver", liver)
    add_segment(segmentation, reference, "spleen", "Spleen (terminology)", spleen)
    add_segment(segmentation, reference, "Segment_3", "aorta", aorta)  # loaded from a file: matched by name
    add_segment(segmentation, reference, "tumor", "tumor", aorta)
    labels, info = mrml_bridge.labelmap_from_segmentation(segmentation, volume, {"spleen": 1, "liver": 5, "aorta": 52})
    assert labels.GetPixelID() == sitk.sitkUInt16
    assert labels.GetSize() == reference.GetSize()
    np.testing.assert_allclose(labels.GetOrigin(), reference.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(labels.GetDirection(), reference.GetDirection(), atol=1e-6)
    array = sitk.GetArrayViewFromImage(labels)
    np.testing.assert_array_equal(array == 5, liver == 1)
    np.testing.assert_array_equal(array == 1, spleen == 1)
    np.testing.assert_array_equal(array == 52, aorta == 1)
    assert info["matched"] == {"spleen": "spleen", "liver": "liver", "aorta": "Segment_3"}
    assert info["unmatched_segments"] == ["tumor"]
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeDisplayNode").GetNumberOfItems() == 0
    assert scene.GetNodesByClass("vtkMRMLColorTableNode").GetNumberOfItems() == 0


def test_segmentation_without_totalsegmentator_names_is_refused(scene):
    reference = oblique_image()
    volume = mrml_bridge.add_volume_from_sitk(scene, reference, "CT")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    mask = np.zeros(sitk.GetArrayViewFromImage(reference).shape, np.uint8)
    mask[1:3, 1:3, 1:3] = 1
    add_segment(segmentation, reference, "Segment_1", "tumor", mask)
    with pytest.raises(InputError, match="TotalSegmentator class name.*Fix:"):
        mrml_bridge.labelmap_from_segmentation(segmentation, volume, {"liver": 5})
