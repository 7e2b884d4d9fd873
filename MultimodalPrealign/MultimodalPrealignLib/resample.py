"""Resampling helpers (physical space, LPS). Smoothing before downsampling avoids aliasing."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .geometry import Box, direction_matrix


def smooth_for_spacing(image: sitk.Image, new_spacing) -> sitk.Image:
    """Gaussian anti-aliasing before resampling to a coarser ``new_spacing`` (mm, per grid axis)."""
    old = np.asarray(image.GetSpacing(), dtype=float)
    new = np.asarray(new_spacing, dtype=float)
    sigma = np.where(new > old * 1.01, np.sqrt(np.maximum(new**2 - old**2, 0.0)) / 2.355, 0.0)
    if not np.any(sigma > 0):
        return image
    # 2.355 = FWHM/sigma: the blur's FWHM matches the new voxel size.
    return sitk.SmoothingRecursiveGaussian(image, [float(max(s, 1e-3)) for s in sigma])


def grid_for_box(box: Box, spacing, direction: np.ndarray | None = None) -> dict:
    """Size/origin/spacing/direction of a grid with ``direction`` covering ``box`` (LPS mm)."""
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    spacing = np.asarray(spacing, dtype=float) * np.ones(3)
    lower, upper = np.asarray(box.lower), np.asarray(box.upper)
    # Corners of the box in the grid's axes.
    corners = np.array([[lower[0] if i == 0 else upper[0], lower[1] if j == 0 else upper[1],
                         lower[2] if k == 0 else upper[2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    local = corners @ direction  # coordinates along the grid axes
    lo, hi = local.min(0), local.max(0)
    size = np.maximum(np.ceil((hi - lo) / spacing - 1e-6).astype(int), 1)
    first_center_local = lo + spacing / 2.0
    origin = direction @ first_center_local
    return {"size": [int(s) for s in size], "origin": origin.tolist(), "spacing": spacing.tolist(),
            "direction": direction.ravel().tolist()}


def make_reference(grid: dict, pixel_id=sitk.sitkFloat32) -> sitk.Image:
    ref = sitk.Image(grid["size"], pixel_id)
    ref.SetOrigin(grid["origin"])
    ref.SetSpacing(grid["spacing"])
    ref.SetDirection(grid["direction"])
    return ref


def resample_box(image: sitk.Image, box: Box, spacing, default_value: float,
                 interpolator=sitk.sitkLinear, smooth: bool = True) -> sitk.Image:
    """Crop ``image`` to ``box`` (LPS mm) and resample it at ``spacing`` on a grid with its own direction."""
    direction = direction_matrix(image)
    grid = grid_for_box(box, spacing, direction)
    source = smooth_for_spacing(image, grid["spacing"]) if smooth else image
    return sitk.Resample(source, make_reference(grid, image.GetPixelID()), sitk.Transform(), interpolator,
                         float(default_value), image.GetPixelID())


def resample_to_spacing(image: sitk.Image, spacing, default_value: float | None = None,
                        interpolator=sitk.sitkLinear) -> sitk.Image:
    """The whole image at a new ``spacing`` (mm), same direction, same physical extent."""
    from .geometry import bounding_box

    if default_value is None:
        default_value = float(sitk.GetArrayViewFromImage(image).min())
    return resample_box(image, bounding_box(image), spacing, default_value, interpolator)


def resample_onto(moving: sitk.Image, reference: sitk.Image, fixed_to_moving: sitk.Transform,
                  default_value: float = 0.0, interpolator=sitk.sitkLinear, pixel_id=None) -> sitk.Image:
    """``moving`` resampled on ``reference``'s grid through ``fixed_to_moving`` (ITK convention)."""
    return sitk.Resample(moving, reference, fixed_to_moving, interpolator, float(default_value),
                         moving.GetPixelID() if pixel_id is None else pixel_id)
