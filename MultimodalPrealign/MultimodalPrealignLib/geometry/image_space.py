"""Physical-space geometry of images: index <-> physical mapping, boxes, extents, overlap under a transform.

All coordinates are physical LPS millimetres; physical = direction @ diag(spacing) @ index + origin
(:func:`index_to_physical_matrix`, the one place that builds it). A voxel covers +-0.5 voxel around its
centre, so an image's physical extent runs from index -0.5 to size-0.5 along each grid axis. Transforms map
fixed physical points to moving physical points (fixed->moving).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
import SimpleITK as sitk

from .transforms import inverse_or_none, transform_points


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in physical LPS mm (lower and upper corner)."""

    lower: tuple[float, float, float]
    upper: tuple[float, float, float]

    @property
    def size(self) -> np.ndarray:
        return np.maximum(np.asarray(self.upper) - np.asarray(self.lower), 0.0)

    @property
    def center(self) -> np.ndarray:
        return (np.asarray(self.lower) + np.asarray(self.upper)) / 2.0

    @property
    def volume(self) -> float:
        return float(np.prod(self.size))

    def intersect(self, other: Box) -> Box:
        lower = np.maximum(self.lower, other.lower)
        upper = np.minimum(self.upper, other.upper)
        return Box(tuple(lower.tolist()), tuple(np.maximum(upper, lower).tolist()))

    def expanded(self, margin_mm: float) -> Box:
        return Box(tuple((np.asarray(self.lower) - margin_mm).tolist()),
                   tuple((np.asarray(self.upper) + margin_mm).tolist()))

    def to_dict(self) -> dict:
        return {"lower_mm": [round(v, 3) for v in self.lower], "upper_mm": [round(v, 3) for v in self.upper]}


def direction_matrix(image: sitk.Image) -> np.ndarray:
    """The image's direction cosines as a 3x3 matrix (columns: grid axes i, j, k in LPS)."""
    return np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)


def index_to_physical_matrix(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(A, origin) with physical = A @ continuous_index + origin, A = direction * diag(spacing)."""
    a = direction_matrix(image) @ np.diag(image.GetSpacing())
    return a, np.asarray(image.GetOrigin(), dtype=float)


def index_to_physical_points(image: sitk.Image, index_xyz: np.ndarray) -> np.ndarray:
    """Physical points (LPS mm) of continuous indices in (i, j, k) order (N x 3, or one index of 3)."""
    a, origin = index_to_physical_matrix(image)
    return index_xyz @ a.T + origin


def physical_to_index(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    """Continuous indices (i, j, k order, N x 3) of physical points (LPS mm): the inverse of the above."""
    a, origin = index_to_physical_matrix(image)
    return (points - origin) @ np.linalg.inv(a).T


def physical_corners(image: sitk.Image) -> np.ndarray:
    """The 8 corners (8x3, LPS mm) of the image's voxel-edge extent, through the direction matrix."""
    size = np.asarray(image.GetSize(), dtype=float)
    corners = np.array([[-0.5 + c[i] * size[i] for i in range(3)] for c in product((0, 1), repeat=3)])
    return index_to_physical_points(image, corners)


def bounding_box(image: sitk.Image) -> Box:
    corners = physical_corners(image)
    return Box(tuple(corners.min(0).tolist()), tuple(corners.max(0).tolist()))


def image_center(image: sitk.Image) -> np.ndarray:
    """Physical centre (LPS mm) of the voxel grid."""
    size = np.asarray(image.GetSize(), dtype=float)
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2.0).tolist()))


def extent_mm(image: sitk.Image) -> np.ndarray:
    """Extent along the patient axes L, P, S in mm (of the axis-aligned bounding box)."""
    return bounding_box(image).size


def median_extent_mm(image: sitk.Image) -> float:
    """Median over the three axes of the image's physical extent (mm): a slab keeps its in-plane size."""
    return float(np.median(np.asarray(image.GetSize(), float) * np.asarray(image.GetSpacing(), float)))


def object_scale(fixed: sitk.Image, moving: sitk.Image, reference_extent_mm: float) -> float:
    """How much smaller than human anatomy the pair is: min(1, smaller median extent / reference), >= 0.01.

    A 40 mm microCT field of view gives 0.2 (with 200 mm): length settings made for human anatomy (a 6 mm
    search spacing, a 2 mm optimizer step) shrink by that factor so the object stays many voxels wide.
    """
    smaller = min(median_extent_mm(fixed), median_extent_mm(moving))
    return float(min(1.0, max(0.01, smaller / float(reference_extent_mm))))


def spacing_along_patient_axes(image: sitk.Image) -> np.ndarray:
    """Voxel size (mm) along L, P, S: each patient axis takes the spacing of the grid axis closest to it."""
    d = np.abs(direction_matrix(image))
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    return np.array([spacing[int(np.argmax(d[row]))] for row in range(3)])


def voxel_volume_mm3(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing()))


def grid_points(image: sitk.Image, per_axis: int = 16) -> np.ndarray:
    """Evenly spread physical points (N x 3, LPS mm) covering the image's voxel extent."""
    size = np.asarray(image.GetSize(), dtype=float)
    axes = [(np.arange(per_axis) + 0.5) / per_axis * size[i] - 0.5 for i in range(3)]
    idx = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    return index_to_physical_points(image, idx)


def inside_image(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    """Boolean mask: which physical points fall inside the image's voxel extent."""
    idx = physical_to_index(image, points)
    size = np.asarray(image.GetSize(), dtype=float)
    return np.all((idx >= -0.5) & (idx <= size - 0.5), axis=1)


def overlap_fractions(fixed: sitk.Image, moving: sitk.Image, fixed_to_moving: sitk.Transform,
                      per_axis: int = 16) -> dict:
    """Fraction of each image's extent that the other covers when ``fixed_to_moving`` aligns them.

    ``fixed``: share of the fixed extent whose points map inside the moving image.
    ``moving``: share of the moving extent that fixed points land on (via the inverse transform;
    estimated from the fixed side when the transform has no inverse).
    """
    fixed_points = grid_points(fixed, per_axis)
    fixed_fraction = float(np.mean(inside_image(moving, transform_points(fixed_to_moving, fixed_points))))
    inverse = inverse_or_none(fixed_to_moving)
    if inverse is not None:
        moving_points = grid_points(moving, per_axis)
        moving_fraction = float(np.mean(inside_image(fixed, transform_points(inverse, moving_points))))
    else:
        covered_volume = fixed_fraction * bounding_box(fixed).volume
        moving_fraction = float(min(1.0, covered_volume / max(bounding_box(moving).volume, 1e-9)))
    return {"fixed": fixed_fraction, "moving": moving_fraction}


def ratios(fixed: sitk.Image, moving: sitk.Image) -> dict:
    """Per patient axis (L, P, S): moving/fixed extent and spacing ratios, and the voxel-volume ratio."""
    extent_ratio = extent_mm(moving) / np.maximum(extent_mm(fixed), 1e-9)
    spacing_ratio = spacing_along_patient_axes(moving) / spacing_along_patient_axes(fixed)
    return {
        "extent_ratio_moving_over_fixed": [round(float(v), 4) for v in extent_ratio],
        "spacing_ratio_moving_over_fixed": [round(float(v), 4) for v in spacing_ratio],
        "voxel_volume_ratio_moving_over_fixed": round(voxel_volume_mm3(moving) / voxel_volume_mm3(fixed), 4),
    }


def describe_image(image: sitk.Image) -> dict:
    """JSON-ready geometry summary of one image."""
    return {
        "size": list(image.GetSize()),
        "spacing_mm": [round(v, 6) for v in image.GetSpacing()],
        "origin_mm_lps": [round(v, 4) for v in image.GetOrigin()],
        "direction": [round(v, 6) for v in image.GetDirection()],
        "extent_mm_lps": [round(float(v), 3) for v in extent_mm(image)],
        "bounding_box_lps": bounding_box(image).to_dict(),
        "pixel_type": image.GetPixelIDTypeAsString(),
    }
