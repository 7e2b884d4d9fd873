"""The result in Slicer's slice views: fusion of fixed and moving before/after registration, or a checkerboard.

The transform node is the run's output (fixed->moving resampling transform, "from parent"; the MOVING volume is
placed under it to appear aligned with the fixed volume).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from . import mrml_bridge


def show_in_slice_views(fixed_volume_node, moving_volume_node, transform_node, what: str = "after"):
    """'before'/'after': fusion (moving over fixed, 50%) without/with the result transform;
    'checkerboard': a checkerboard of fixed and registered moving (normalised intensities).

    Returns the checkerboard volume node, else None.
    """
    import slicer

    if what == "checkerboard":
        board = checkerboard_volume(fixed_volume_node, moving_volume_node, transform_node)
        slicer.util.setSliceViewerLayers(background=board, foreground=None, fit=True)
        return board
    mrml_bridge.apply_to_volume(moving_volume_node, transform_node if what == "after" else None)
    slicer.util.setSliceViewerLayers(background=fixed_volume_node, foreground=moving_volume_node,
                                     foregroundOpacity=0.5, fit=True)
    return None


def checkerboard_volume(fixed_volume_node, moving_volume_node, transform_node, squares: int = 8):
    """A volume node (named after the moving volume, reused) with a ``squares``^3 checkerboard of the fixed volume
    and the moving volume resampled through ``transform_node``, both scaled to [0, 1] (1st-99th percentile)."""
    import slicer

    from ..pipeline import resample_moving

    fixed = sitk.Cast(mrml_bridge.volume_node_to_sitk(fixed_volume_node, "fixed volume"), sitk.sitkFloat32)
    moving = sitk.Cast(mrml_bridge.volume_node_to_sitk(moving_volume_node, "moving volume"), sitk.sitkFloat32)
    transform = mrml_bridge.sitk_from_transform_node(transform_node)
    resampled = resample_moving(fixed, moving, transform)
    board = sitk.CheckerBoard(_normalised(fixed), _normalised(resampled), [squares] * 3)
    name = f"{moving_volume_node.GetName()} checkerboard (MultimodalPrealign)"
    node = slicer.mrmlScene.GetFirstNodeByName(name) or slicer.mrmlScene.AddNewNodeByClass(
        "vtkMRMLScalarVolumeNode", name)
    mrml_bridge.update_volume_node_from_sitk(node, board)
    node.CreateDefaultDisplayNodes()
    return node


def _normalised(image: sitk.Image) -> sitk.Image:
    """``image`` scaled so its 1st-99th percentile (of every 4th voxel per axis) spans [0, 1], clipped (float32)."""
    a = sitk.GetArrayFromImage(image)
    lo, hi = np.percentile(a[::4, ::4, ::4], [1, 99])
    out = sitk.GetImageFromArray(np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32))
    out.CopyInformation(image)
    return out
