"""Pre-alignments from headers and image moments: ``none`` and ``header`` (identity: trust both headers),
``geometry`` (translation between the image centres), ``moments`` (translation between the centres of mass of the
foreground masks). Each transform maps fixed physical points to moving physical points (LPS mm)."""

from __future__ import annotations

from ..geometry import image_space, transforms
from ..geometry.masks import foreground_mask, mask_centroid_and_axes
from .base import PrealignInputs, PrealignResult, rounded


def prealign_none(inputs: PrealignInputs) -> PrealignResult:
    return PrealignResult("none", transforms.identity(), {"description": "identity; no initial alignment"})


def prealign_header(inputs: PrealignInputs) -> PrealignResult:
    return PrealignResult("header", transforms.identity(),
                          {"description": "identity in physical space: both headers trusted"})


def prealign_geometry(inputs: PrealignInputs) -> PrealignResult:
    """Translation that maps the fixed image's box centre onto the moving image's box centre."""
    fixed_center = image_space.image_center(inputs.fixed)
    moving_center = image_space.image_center(inputs.moving)
    offset = moving_center - fixed_center
    return PrealignResult("geometry", transforms.translation(offset), {
        "description": "translation between the image centres",
        "fixed_center_mm": rounded(fixed_center, 4), "moving_center_mm": rounded(moving_center, 4),
        "translation_mm": rounded(offset, 4),
    })


def prealign_moments(inputs: PrealignInputs) -> PrealignResult:
    """Translation between the centres of mass of the two foreground (body) masks."""
    fixed_mask = foreground_mask(inputs.fixed)
    moving_mask = foreground_mask(inputs.moving)
    warnings = []
    try:
        fixed_centroid, _, _, fixed_volume = mask_centroid_and_axes(fixed_mask)
        moving_centroid, _, _, moving_volume = mask_centroid_and_axes(moving_mask)
    except ValueError:
        result = prealign_geometry(inputs)
        result.warnings.append("moments: no foreground found in one image; used the image centres instead")
        return result
    offset = moving_centroid - fixed_centroid
    ratio = moving_volume / max(fixed_volume, 1e-9)
    if ratio < 0.5 or ratio > 2.0:
        warnings.append(
            f"moments: the foreground volumes differ {max(ratio, 1 / ratio):.1f}x (partial field of view?); "
            "centre-of-mass matching is biased; prefer --prealign search or anatomy")
    return PrealignResult("moments", transforms.translation(offset), {
        "description": "translation between the centres of mass of the foreground masks (Otsu)",
        "fixed_centroid_mm": rounded(fixed_centroid, 4), "moving_centroid_mm": rounded(moving_centroid, 4),
        "fixed_foreground_volume_ml": round(fixed_volume / 1000, 2),
        "moving_foreground_volume_ml": round(moving_volume / 1000, 2),
        "translation_mm": rounded(offset, 4),
    }, warnings)
