"""Stage 4: crop both images to their overlap (plus a margin) and resample at a working spacing.

The CropVolume idea in the core: after pre-alignment, each image is cut to the other image's
footprint plus ``margin_mm`` and resampled on its own direction at a working spacing chosen from
both spacings (``spacing_scale`` like CropVolume's spacing scale; isotropic by default), with a cap
on the number of voxels so registration cost does not grow with the larger image.
Boxes are physical LPS mm, each in its own image's space. :func:`validity_mask` gives the registration
metric's mask of each working grid (the voxels that hold real image data).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import image_space, transforms
from .geometry.image_space import Box
from .geometry.masks import padding_value
from .geometry.resample import resample_box

#: Working grids are capped at this many voxels (fixed crop) unless the caller says otherwise.
DEFAULT_MAX_WORKING_VOXELS = 1_500_000
#: An overlap below this fraction of the smaller image's extent is refused.
MIN_OVERLAP_FRACTION = 0.02


@dataclass
class CropPlan:
    """Where to cut each image (LPS boxes in its own space) and the working spacing (mm)."""

    fixed_box: Box
    moving_box: Box
    working_spacing_mm: tuple
    details: dict = field(default_factory=dict)


def _box_of_points(points: np.ndarray) -> Box:
    return Box(tuple(points.min(0).tolist()), tuple(points.max(0).tolist()))


def choose_working_spacing(fixed: sitk.Image, moving: sitk.Image, crop_volume_mm3: float,
                           spacing_scale: float = 1.0, isotropic: bool = True,
                           max_voxels: int = DEFAULT_MAX_WORKING_VOXELS) -> tuple[float, float, float]:
    """Working spacing (mm, per fixed grid axis).

    Base: the coarser of the two images' voxel sizes (geometric mean per image when isotropic,
    per patient axis otherwise) times ``spacing_scale``; then enlarged evenly until the fixed crop
    holds at most ``max_voxels`` voxels.
    """
    if spacing_scale <= 0:
        raise InputError(f"Spacing scale must be positive, got {spacing_scale}", "use e.g. --spacing-scale 1.0")
    if isotropic:
        base = max(float(np.prod(fixed.GetSpacing())) ** (1 / 3), float(np.prod(moving.GetSpacing())) ** (1 / 3))
        spacing = np.full(3, base * spacing_scale)
    else:
        along = np.maximum(image_space.spacing_along_patient_axes(fixed),
                           image_space.spacing_along_patient_axes(moving))
        d = np.abs(image_space.direction_matrix(fixed))  # fixed grid axis j -> patient axis argmax(d[:, j])
        spacing = np.array([along[int(np.argmax(d[:, j]))] for j in range(3)]) * spacing_scale
    voxels = crop_volume_mm3 / float(np.prod(spacing))
    if voxels > max_voxels:
        spacing = spacing * (voxels / max_voxels) ** (1 / 3)
    return tuple(round(float(s), 4) for s in spacing)


def plan_crop(fixed: sitk.Image, moving: sitk.Image, fixed_to_moving: sitk.Transform, margin_mm: float = 20.0,
              spacing_scale: float = 1.0, isotropic: bool = True,
              max_voxels: int = DEFAULT_MAX_WORKING_VOXELS, prealign_method: str = "") -> CropPlan:
    """Boxes of the overlap (plus ``margin_mm``) in each image's space, and the working spacing.

    Raises InputError when the images do not overlap under ``fixed_to_moving``.
    """
    if margin_mm < 0:
        raise InputError(f"Crop margin must be >= 0 mm, got {margin_mm}", "use e.g. --crop-margin 20")
    fixed_box_full = image_space.bounding_box(fixed)
    moving_box_full = image_space.bounding_box(moving)
    inverse = transforms.inverse_or_none(fixed_to_moving)
    if inverse is None:
        raise InputError("The pre-alignment transform is not invertible (not linear)",
                         "use a linear pre-alignment (rigid/affine)")
    moving_in_fixed = _box_of_points(transforms.transform_points(inverse, image_space.physical_corners(moving)))
    overlap_in_fixed = fixed_box_full.intersect(moving_in_fixed)
    overlap = image_space.overlap_fractions(fixed, moving, fixed_to_moving)
    smaller_share = max(overlap["fixed"], overlap["moving"])
    if overlap_in_fixed.volume <= 0 or smaller_share < MIN_OVERLAP_FRACTION:
        how = f"after '{prealign_method}' pre-alignment" if prealign_method else "under the initial transform"
        raise InputError(
            f"The images do not overlap {how} (overlap {smaller_share * 100:.1f}% of the smaller image)",
            "use --prealign search (no masks) or --prealign anatomy with label maps, or check that the right "
            "pair of files was given")
    fixed_box = overlap_in_fixed.expanded(margin_mm).intersect(fixed_box_full)
    fixed_crop_corners = np.array([[x, y, z] for x in (fixed_box.lower[0], fixed_box.upper[0])
                                   for y in (fixed_box.lower[1], fixed_box.upper[1])
                                   for z in (fixed_box.lower[2], fixed_box.upper[2])])
    fixed_in_moving = _box_of_points(transforms.transform_points(fixed_to_moving, fixed_crop_corners))
    moving_box = fixed_in_moving.expanded(margin_mm).intersect(moving_box_full)
    spacing = choose_working_spacing(fixed, moving, fixed_box.volume, spacing_scale, isotropic, max_voxels)
    details = {
        "margin_mm": margin_mm, "spacing_scale": spacing_scale, "isotropic": isotropic,
        "max_working_voxels": max_voxels, "working_spacing_mm": list(spacing),
        "fixed_box_lps": fixed_box.to_dict(), "moving_box_lps": moving_box.to_dict(),
        "fixed_kept_fraction": round(fixed_box.volume / max(fixed_box_full.volume, 1e-9), 4),
        "moving_kept_fraction": round(moving_box.volume / max(moving_box_full.volume, 1e-9), 4),
        "overlap_fraction_fixed": round(overlap["fixed"], 4),
        "overlap_fraction_moving": round(overlap["moving"], 4),
    }
    return CropPlan(fixed_box, moving_box, spacing, details)


def background_value(image: sitk.Image) -> float:
    """Value used outside an image: its padding value if it has one, else its 1st percentile."""
    pad = padding_value(image)
    if pad is not None:
        return pad
    array = sitk.GetArrayViewFromImage(image)
    step = max(1, array.size // 200_000)
    return float(np.percentile(array.ravel()[::step], 1))


def apply_crop(fixed: sitk.Image, moving: sitk.Image, plan: CropPlan) -> tuple[sitk.Image, sitk.Image]:
    """The cropped, resampled float32 working copies (fixed, moving), each on its own direction."""
    fixed_work = resample_box(fixed, plan.fixed_box, plan.working_spacing_mm, background_value(fixed))
    moving_work = resample_box(moving, plan.moving_box, plan.working_spacing_mm, background_value(moving))
    plan.details["fixed_working_size"] = list(fixed_work.GetSize())
    plan.details["moving_working_size"] = list(moving_work.GetSize())
    return fixed_work, moving_work


def validity_mask(work: sitk.Image, original: sitk.Image) -> sitk.Image | None:
    """Mask of working voxels that hold real image data, for the registration metric.

    Excludes voxels outside the original image's voxel-centre domain (the working grid's rim past the
    last slice would otherwise be a flat background edge that pulls mutual information) and CT padding
    outside the reconstruction circle (eroded by one voxel to drop the rim blurred by resampling).
    None when every voxel is valid.
    """
    size = np.asarray(work.GetSize())
    a_work, origin_work = image_space.index_to_physical_matrix(work)
    a_orig, origin_orig = image_space.index_to_physical_matrix(original)
    to_original = np.linalg.inv(a_orig) @ a_work
    offset = np.linalg.inv(a_orig) @ (origin_work - origin_orig)
    k, j, i = np.meshgrid(np.arange(size[2]), np.arange(size[1]), np.arange(size[0]), indexing="ij")
    inside = np.ones(k.shape, dtype=bool)
    limits = np.asarray(original.GetSize(), dtype=float) - 1.0
    for axis in range(3):
        coordinate = to_original[axis, 0] * i + to_original[axis, 1] * j + to_original[axis, 2] * k + offset[axis]
        inside &= (coordinate >= -1e-3) & (coordinate <= limits[axis] + 1e-3)
    pad = padding_value(original)
    if pad is not None:
        data = sitk.GetArrayViewFromImage(work) > pad + 1.0
        eroded = sitk.BinaryErode(sitk.Cast(_array_like(data, work), sitk.sitkUInt8), [1, 1, 1])
        data = sitk.GetArrayViewFromImage(eroded) > 0  # a view: ``eroded`` must outlive it
        inside &= data
    if inside.all() or int(np.count_nonzero(inside)) < 1000:
        return None
    return _array_like(inside, work)


def _array_like(array: np.ndarray, like: sitk.Image) -> sitk.Image:
    """A UInt8 image of ``array`` (z, y, x) on ``like``'s grid."""
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(like)
    return image
