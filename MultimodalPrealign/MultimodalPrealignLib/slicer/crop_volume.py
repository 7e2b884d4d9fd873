"""Slicer's CropVolume module: the crop of a volume to a Markups ROI, interpolated or voxel based.

The interpolated crop runs through ``vtkSlicerCropVolumeLogic.Apply`` (the logic is an argument, so tests pass a
named double); the voxel-based one through its static ``CropVoxelBased``. ``slicer`` is imported lazily inside the
functions. The ROI is world-space RAS (``mrml_bridge.set_roi_from_box`` makes it from an LPS box).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError, RegistrationError

#: CropVolume interpolation modes (vtkMRMLCropVolumeParametersNode).
CROP_INTERPOLATION = {"nearest": 1, "linear": 2, "windowedsinc": 3, "bspline": 4}

#: vtkSlicerCropVolumeLogic::Apply / CropInterpolated / CropVoxelBased return codes -> (cause, fix); read in
#: Slicer's Modules/Loadable/CropVolume/Logic/vtkSlicerCropVolumeLogic.cxx (5.x). -1 and -2 each have several causes.
CROP_APPLY_ERRORS = {
    -1: ("invalid input: no scene, parameter node, input volume or ROI; an output volume of another class than the "
         "input; or an ROI whose voxel-based crop geometry could not be computed",
         "select a scalar volume and a Markups ROI that intersects it, and an output of the same volume type"),
    -2: ("the input is a diffusion tensor volume (not supported), or the Volumes module logic is missing or could "
         "not clone the input", "use a scalar volume; restart Slicer if the Volumes module failed to load"),
    -3: ("the resampling module (ResampleScalarVectorDWIVolume) needed for interpolated cropping is missing",
         "restart Slicer; if it persists reinstall Slicer, or use engine 'itk' (no CropVolume)"),
    -4: ("CropVolume could not create the resampling module's command-line node",
         "restart Slicer, or use engine 'itk' (no CropVolume)"),
    -5: ("the crop ROI is under a non-linear transform",
         "remove the transform from the ROI (MultimodalPrealign's own ROIs are never transformed: report this)"),
    -6: ("the cropped output volume is under a non-linear transform",
         "move the volume out of the non-linear transform (Data module), then apply again"),
}


def crop_spacing_scale(input_spacing_mm, working_spacing_mm, isotropic: bool) -> float:
    """CropVolume's SpacingScalingConst that gives the planned working spacing.

    CropVolume's interpolated output spacing is min(input spacing) x scale when isotropic, else input
    spacing x scale per axis (one scale for all axes: the largest ratio, so no axis is finer than planned).
    """
    spacing = np.asarray(input_spacing_mm, dtype=float)
    target = np.asarray(working_spacing_mm, dtype=float) * np.ones(3)
    if isotropic:
        return float(np.max(target) / np.min(spacing))
    return float(np.max(target / spacing))


def crop_parameters_node(scene, input_volume_node, roi_node, output_volume_node=None, voxel_based: bool = False,
                         spacing_scale: float = 1.0, isotropic: bool = True, interpolation: str = "linear",
                         fill_value: float = 0.0):
    """A vtkMRMLCropVolumeParametersNode set up for one crop."""
    import slicer

    if interpolation not in CROP_INTERPOLATION:
        raise InputError(f"Unknown crop interpolation '{interpolation}'", "use " + ", ".join(CROP_INTERPOLATION))
    # Created directly: the class is registered with a scene only once a CropVolume logic has seen it.
    node = scene.AddNode(slicer.vtkMRMLCropVolumeParametersNode())
    node.SetInputVolumeNodeID(input_volume_node.GetID())
    node.SetROINodeID(roi_node.GetID())
    node.SetOutputVolumeNodeID(output_volume_node.GetID() if output_volume_node is not None else None)
    node.SetVoxelBased(bool(voxel_based))
    node.SetIsotropicResampling(bool(isotropic))
    node.SetSpacingScalingConst(float(spacing_scale))
    node.SetInterpolationMode(CROP_INTERPOLATION[interpolation])
    node.SetFillValue(float(fill_value))
    return node


def apply_crop(crop_logic, parameters_node):
    """Run CropVolume (``crop_logic.Apply``) and return the output volume node; explain failures."""
    code = crop_logic.Apply(parameters_node)
    if code != 0:
        cause, fix = CROP_APPLY_ERRORS.get(code, (f"unknown error code {code}", "see Slicer's Error Log"))
        raise RegistrationError(f"CropVolume failed (code {code}): {cause}", fix)
    scene = parameters_node.GetScene()
    output_id = parameters_node.GetOutputVolumeNodeID()
    output = scene.GetNodeByID(output_id) if scene is not None and output_id else None
    if output is None or output.GetImageData() is None:
        raise RuntimeError("CropVolume returned no output volume")
    return output


def crop_voxel_based(roi_node, input_volume_node, output_volume_node, fill_value: float = 0.0):
    """Voxel-based crop (no resampling; same voxels and grid as the input) through CropVolume's static call."""
    import slicer

    code = slicer.vtkSlicerCropVolumeLogic.CropVoxelBased(roi_node, input_volume_node, output_volume_node,
                                                          True, float(fill_value))
    if code != 0:
        raise RuntimeError(f"CropVolume voxel-based crop failed (code {code}): the ROI may not intersect the volume")
    return output_volume_node
