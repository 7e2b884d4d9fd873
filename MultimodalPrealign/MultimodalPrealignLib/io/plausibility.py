"""Is an image plausible as a CT or MR scan, and are two images in the same units? (sizes, voxels, structure)

A header can be valid and still wrong: a body CT whose voxel sizes are in metres is 0.4 mm across, a header
with 0.1 x 0.1 x 20 mm voxels on CT data makes a rod 5 cm thick and 2 m long, a 5 x 5 x 5 voxel patch or an
image of pure noise holds nothing to align. Registration then still "succeeds". This module measures what tells
these apart, from the image alone (no pre-alignment needed), for three users:

* :func:`check_pair_units` refuses (InputError) a pair whose sizes differ ~100x or more: one image's units or
  voxel size are wrong (metres vs millimetres); the run stops before the engines fail on it;
* ``diagnose`` turns :func:`content_findings` and :func:`units_finding` into advice sentences;
* the verdict's content check (``qa.verdict``) FAILs a result whose images are implausible.

:func:`content_summary` is the per-image measurement: extent along L, P, S, voxel count and size, and a
``structure`` ratio (spread of a smoothed copy over the spread of what smoothing removes: about 0.25 for pure
noise, 2-10 for CT and MR). Thresholds come from the caller (``resources/verdict_thresholds.json`` "content",
``resources/diagnostics_rules.json`` "units_*"). Physical space: LPS mm.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..geometry.image_space import extent_mm
from ..resource_files import load_resource_json, load_settings

#: Above this many voxels the structure ratio is measured on an even subsample of slabs (speed).
STRUCTURE_MAX_VOXELS = 4_000_000


def _smooth(array: np.ndarray) -> np.ndarray:
    """Binomial [1, 2, 1] / 4 smoothing along each axis (edges repeated): a cheap Gaussian of ~0.7 voxel."""
    out = np.array(array, dtype=np.float32, copy=True)
    for axis in range(out.ndim):
        if out.shape[axis] < 3:
            continue
        source = np.moveaxis(out.copy(), axis, 0)
        target = np.moveaxis(out, axis, 0)
        target *= 0.5
        target[1:] += 0.25 * source[:-1]
        target[:-1] += 0.25 * source[1:]
        target[0] += 0.25 * source[0]
        target[-1] += 0.25 * source[-1]
    return out


def structure_ratio(image: sitk.Image) -> float:
    """Standard deviation of a smoothed copy / standard deviation of what smoothing removed.

    About 0.25 for an image of independent noise, 2-10 for CT and MR scans (edges of the body, organs, bone).
    Measured on the voxels as given (pass a coarse copy for speed); 0 for a constant image, capped at 1000.
    """
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if array.size > STRUCTURE_MAX_VOXELS and array.shape[0] > 3:
        step = int(np.ceil(array.size / STRUCTURE_MAX_VOXELS))
        array = array[:: max(1, step)] if array.shape[0] // step >= 3 else array
    smooth = _smooth(array)
    residual = array - smooth

    def spread(values: np.ndarray) -> float:
        values = values[np.isfinite(values)]
        return float(np.std(values)) if values.size else 0.0

    signal, noise = spread(smooth), spread(residual)
    if signal == 0:
        return 0.0
    return float(min(signal / max(noise, 1e-12), 1000.0))


def content_summary(image: sitk.Image, structure: bool = True) -> dict:
    """JSON-ready: ``extent_mm_lps``, ``size``, ``voxels``, ``spacing_mm`` and (``structure``) the structure ratio."""
    out = {"extent_mm_lps": [round(float(v), 3) for v in extent_mm(image)], "size": list(image.GetSize()),
           "voxels": int(np.prod(image.GetSize())), "spacing_mm": [round(float(v), 6) for v in image.GetSpacing()]}
    if structure:
        out["structure"] = round(structure_ratio(image), 3)
    return out


def _mm(values) -> str:
    return " x ".join(f"{v:.3g}" for v in values)


def content_findings(summary: dict, name: str, limits: dict, original: dict | None = None) -> list[tuple[str, str]]:
    """(status "FAIL"/"WARN", sentence) for what makes one image implausible or too poor to register.

    ``summary``: :func:`content_summary` (of the image or a coarse copy of it); ``original``: the input's own
    ``size``, ``spacing_mm`` and ``extent_mm_lps`` when ``summary`` describes a coarse copy (voxel counts, voxel
    sizes and extents are then taken from it). ``name``: "the moving image". ``limits``: the "content" thresholds.
    """
    findings = []
    source = original or summary
    extent = [float(v) for v in source.get("extent_mm_lps") or summary["extent_mm_lps"]]
    largest = max(extent)
    spacing = [float(v) for v in source.get("spacing_mm") or summary["spacing_mm"]]
    size = [int(v) for v in source.get("size") or summary["size"]]
    voxels = int(np.prod(size))
    if largest < limits["min_extent_mm"]:
        findings.append(("FAIL", f"{name} is only {_mm(extent)} mm across (voxels {_mm(spacing)} mm): no scan of a "
                                 f"body is that small; its units may be metres (read as millimetres): check the "
                                 "voxel size in its header"))
    elif largest > limits["max_extent_mm"]:
        findings.append(("FAIL", f"{name} is {_mm(extent)} mm across (voxels {_mm(spacing)} mm): larger than any "
                                 "body; its voxel size may be wrong (e.g. x10 or x100) or its units may differ: check "
                                 "the voxel size in its header"))
    anisotropy = max(spacing) / max(min(spacing), 1e-12)
    if max(spacing) > limits["max_voxel_mm"] or anisotropy > limits["max_voxel_anisotropy"]:
        findings.append(("FAIL", f"{name} has voxels of {_mm(spacing)} mm ({_mm(extent)} mm in all): implausible "
                                 "for CT or MR; check the voxel size in its header"))
    if voxels < limits["fail_min_voxels"]:
        findings.append(("FAIL", f"{name} has only {voxels} voxels ({' x '.join(map(str, size))}): too little to "
                                 "register or to judge; give the whole scan"))
    ratio = summary.get("structure")
    if not findings and ratio is not None and ratio < limits["fail_min_structure"]:
        findings.append(("FAIL", f"{name} shows no structure (structure ratio {ratio:.2f}; scans have 2-10): it "
                                 "looks like noise; check that the right image was given"))
    return findings


def largest_extent(image_or_summary) -> float:
    if isinstance(image_or_summary, dict):
        return float(max(image_or_summary["extent_mm_lps"]))
    return float(max(extent_mm(image_or_summary)))


def units_finding(fixed, moving, ratio_limit: float, limits: dict | None = None) -> str | None:
    """A sentence when the two images' sizes (largest extents) differ ``ratio_limit`` times or more: the units
    or the voxel size of one of them are probably wrong; None otherwise. ``fixed``/``moving``: images or
    :func:`content_summary` dicts. ``limits`` ("content" thresholds) tells which image is implausible."""
    sizes = {"fixed": largest_extent(fixed), "moving": largest_extent(moving)}
    small, large = sorted(sizes, key=sizes.get)
    factor = sizes[large] / max(sizes[small], 1e-12)
    if factor < ratio_limit:
        return None
    text = (f"the {small} image is {sizes[small]:.3g} mm across and the {large} image {sizes[large]:.3g} mm: "
            f"{factor:.0f}x apart, so their units may differ")
    if limits is not None and sizes[small] < limits["min_extent_mm"]:
        return text + f" (the {small} image's voxel sizes look like metres, not millimetres)"
    if limits is not None and sizes[large] > limits["max_extent_mm"]:
        return text + f" (the {large} image's voxel size looks {factor:.0f}x too large)"
    return text


def check_pair_units(fixed: sitk.Image, moving: sitk.Image, ratio_limit: float, limits: dict) -> None:
    """InputError when the images' sizes differ ``ratio_limit`` times or more (metres vs millimetres, a voxel size
    x100): registration cannot bring such images together, and the engines stop with an error of their own."""
    finding = units_finding(fixed, moving, ratio_limit, limits)
    if finding is not None:
        raise InputError(finding[:1].upper() + finding[1:] + " or a voxel size in a header is wrong",
                         "give both images in millimetres: multiply the spacing and origin of the image in metres by "
                         "1000, or correct the voxel size in the wrong header (e.g. in 3D Slicer: Volumes > Volume "
                         "Information), then run 'multimodal-prealign diagnose' on the pair")


def content_limits() -> dict:
    """The verdict's "content" thresholds (``resources/verdict_thresholds.json``): what a plausible scan is."""
    return {k: v for k, v in load_resource_json("verdict_thresholds.json")["content"].items() if not k.startswith("_")}


def check_pair(fixed: sitk.Image, moving: sitk.Image) -> None:
    """:func:`check_pair_units` with the shipped thresholds (``diagnostics_rules.json`` "units_ratio_refuse")."""
    check_pair_units(fixed, moving, float(load_settings("diagnostics_rules.json")["units_ratio_refuse"]),
                     content_limits())
