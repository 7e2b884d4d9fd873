"""Stage 3: pre-alignment, the initial fixed->moving transform (physical LPS mm).

Built-in methods: ``none`` (identity, no initial guess), ``header`` (identity in physical space:
trust both headers), ``geometry`` (match the centres of the two image boxes), ``moments`` (match the
centres of mass of the foreground masks, never of raw CT intensities). Methods in optional stage
modules slot in through :data:`STAGE_MODULES`: a module ``anatomy`` or ``search`` providing
``prealign(inputs: PrealignInputs) -> PrealignResult`` becomes available under that name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import SimpleITK as sitk

from . import geometry, transforms
from .errors import InputError
from .masks import foreground_mask, mask_centroid_and_axes
from .progress import SILENT, Progress


@dataclass
class PrealignInputs:
    """Everything a pre-alignment method may use. Images are float32; label maps UInt16 on their image's grid."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_labels: sitk.Image | None = None
    moving_labels: sitk.Image | None = None
    fixed_labels_task: str | None = None  # TotalSegmentator task, e.g. "total" or "total_mr"
    moving_labels_task: str | None = None
    seed: int = 0
    options: dict = field(default_factory=dict)  # method-specific settings (e.g. search budget)
    progress: Progress = SILENT
    #: Optional rigid refinement hook (set by the pipeline): refine(fixed, moving, initial) -> transform.
    refine: Callable | None = None


@dataclass
class PrealignResult:
    """Outcome of one method: ``transform`` maps fixed physical points to moving physical points (LPS)."""

    method: str
    transform: sitk.Transform
    details: dict = field(default_factory=dict)  # JSON-ready, goes into report.json
    warnings: list = field(default_factory=list)
    candidates: list = field(default_factory=list)  # JSON-ready list of tried poses and scores


def prealign_none(inputs: PrealignInputs) -> PrealignResult:
    return PrealignResult("none", transforms.identity(), {"description": "identity; no initial alignment"})


def prealign_header(inputs: PrealignInputs) -> PrealignResult:
    return PrealignResult("header", transforms.identity(),
                          {"description": "identity in physical space: both headers trusted"})


def prealign_geometry(inputs: PrealignInputs) -> PrealignResult:
    """Translation that maps the fixed image's box centre onto the moving image's box centre."""
    fixed_center = geometry.image_center(inputs.fixed)
    moving_center = geometry.image_center(inputs.moving)
    offset = moving_center - fixed_center
    return PrealignResult("geometry", transforms.translation(offset), {
        "description": "translation between the image centres",
        "fixed_center_mm": _round(fixed_center), "moving_center_mm": _round(moving_center),
        "translation_mm": _round(offset),
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
        "fixed_centroid_mm": _round(fixed_centroid), "moving_centroid_mm": _round(moving_centroid),
        "fixed_foreground_volume_ml": round(fixed_volume / 1000, 2),
        "moving_foreground_volume_ml": round(moving_volume / 1000, 2),
        "translation_mm": _round(offset),
    }, warnings)


BUILTIN_METHODS: dict[str, Callable[[PrealignInputs], PrealignResult]] = {
    "none": prealign_none,
    "header": prealign_header,
    "geometry": prealign_geometry,
    "moments": prealign_moments,
}

#: Methods provided by stage modules of this package (module name -> needs label maps).
STAGE_MODULES = {"anatomy": True, "search": False}

ALL_METHODS = ("auto", "none", "header", "geometry", "moments", "anatomy", "search")


def _stage_module(name: str):
    try:
        module = importlib.import_module(f"{__package__}.{name}")
    except ImportError:
        return None
    return module if hasattr(module, "prealign") else None


def available_methods() -> list[str]:
    names = list(BUILTIN_METHODS)
    names += [name for name in STAGE_MODULES if _stage_module(name) is not None]
    return names


def choose_auto(has_labels: bool) -> str:
    """``auto``: anatomy when both label maps are given, else the strongest method that exists."""
    available = available_methods()
    if has_labels and "anatomy" in available:
        return "anatomy"
    for name in ("search", "moments"):
        if name in available:
            return name
    return "geometry"


def run_prealign(method: str, inputs: PrealignInputs) -> PrealignResult:
    """Run one method by name (``auto`` resolved here) and record which one ran."""
    has_labels = inputs.fixed_labels is not None and inputs.moving_labels is not None
    requested = method
    if method == "auto":
        method = choose_auto(has_labels)
    if method not in ALL_METHODS:
        raise InputError(f"Unknown pre-alignment method '{method}'", "use one of " + ", ".join(ALL_METHODS))
    if method in BUILTIN_METHODS:
        result = BUILTIN_METHODS[method](inputs)
    else:
        module = _stage_module(method)
        if module is None:
            raise InputError(f"Pre-alignment method '{method}' is not available in this installation",
                             "use one of " + ", ".join(["auto", *available_methods()]))
        if STAGE_MODULES[method] and not has_labels:
            raise InputError(f"Pre-alignment '{method}' needs label maps of both images",
                             "pass --fixed-labels and --moving-labels (e.g. TotalSegmentator output)")
        result = module.prealign(inputs)
    result.details.setdefault("requested", requested)
    return result


def _round(values) -> list[float]:
    return [round(float(v), 4) for v in np.asarray(values).ravel()]
