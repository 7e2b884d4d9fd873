"""Data and checks of the module's built-in self-test (``MultimodalPrealignTest``, run inside Slicer)."""

from __future__ import annotations

import numpy as np

from . import mrml_bridge


def add_phantom_pair(scene):
    """A synthetic CT/MR phantom pair with a known fixed->moving transform (LPS mm), added to ``scene``.

    Returns (pair, fixed volume node, moving volume node); ``pair`` is ``phantoms.make_pair``'s.
    """
    from ..synthetic import phantoms

    pair = phantoms.make_pair(seed=3, fixed_spacing=(4.0, 4.0, 4.0), moving_spacing=(4.0, 4.0, 5.0),
                              rotation_deg=10.0, translation_mm=15.0, labels=False)
    fixed = mrml_bridge.add_volume_from_sitk(scene, pair.fixed, "phantom CT")
    moving = mrml_bridge.add_volume_from_sitk(scene, pair.moving, "phantom MR")
    fixed.CreateDefaultDisplayNodes()
    moving.CreateDefaultDisplayNodes()
    return pair, fixed, moving


def placement_errors_mm(pair, transform, output_transform_node) -> tuple:
    """(mean error of ``transform`` against the true one over a grid of fixed points,
    distance in Slicer's world between where the output transform node puts the moving voxel that shows the
    fixed centre and that centre), both in mm."""
    from ..geometry import image_space, transforms

    points = image_space.grid_points(pair.fixed, 6)
    grid_error = transforms.mean_point_error(transform, pair.fixed_to_moving, points)
    # Through Slicer: the moving voxel that shows fixed point p appears at p (RAS).
    p = np.asarray(pair.fixed.TransformContinuousIndexToPhysicalPoint([s / 2 for s in pair.fixed.GetSize()]))
    q = np.asarray(pair.fixed_to_moving.TransformPoint(p.tolist()))
    world = mrml_bridge.transform_ras_point(output_transform_node, q * [-1, -1, 1])
    return grid_error, float(np.linalg.norm(world - p * [-1, -1, 1]))
