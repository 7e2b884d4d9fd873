"""The files of per-structure registration and report.json's ``structures`` block.

Inside the run's output folder (written into the same staging folder as the rest, moved into place with it)::

    structures/<name>/transform.h5            fixed->moving (physical LPS mm), like transform.h5, for that structure
    structures/<name>/moving_resampled.nrrd   the moving image through it, on a fixed-frame grid over the structure's
                                              region (the fixed spacing, coarser when that grid would pass 8 M voxels)
    structures/<name>/{checkerboard,fusion}_{global,structure}.png
    structures/composite_{global,structures}.png

``<name>`` is the structure's name with characters other than letters, digits, ``-``, ``_`` and ``.`` replaced.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..crop import background_value
from ..geometry import transforms
from ..geometry.image_space import direction_matrix
from ..geometry.resample import grid_for_box, make_reference
from ..io import image_io
from .labels import StructureLabels, parse_names
from .register import StructureResult
from .verdict import thresholds as structure_thresholds

FOLDER = "structures"
#: The per-structure resampled moving image is never larger than this (voxels).
MAX_RESAMPLED_VOXELS = 8_000_000


def folder_names(results: list[StructureResult]) -> dict[str, str]:
    """{structure name: folder name}: file-system-safe and unique."""
    out, used = {}, set()
    for result in results:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", result.name).strip("._") or "structure"
        name, number = base, 2
        while name.lower() in used:
            name, number = f"{base}_{number}", number + 1
        used.add(name.lower())
        out[result.name] = name
    return out


def resample_in_region(fixed: sitk.Image, moving: sitk.Image, result: StructureResult) -> sitk.Image:
    """The moving image through the structure's transform on a fixed-frame grid (fixed direction) over its region."""
    region = result.region
    spacing = float(min(fixed.GetSpacing()))
    voxels = region.volume / spacing ** 3
    if voxels > MAX_RESAMPLED_VOXELS:
        spacing *= (voxels / MAX_RESAMPLED_VOXELS) ** (1 / 3)
    reference = make_reference(grid_for_box(region, [spacing] * 3, direction_matrix(fixed)), moving.GetPixelID())
    return sitk.Resample(moving, reference, result.transform, sitk.sitkLinear, background_value(moving),
                         moving.GetPixelID())


def write_structure_outputs(out_dir: Path, block: dict, results: list[StructureResult], fixed: sitk.Image,
                            moving: sitk.Image, fixed_labels: StructureLabels, global_transform: sitk.Transform,
                            pictures: bool = True) -> None:
    """Write ``out_dir/structures/...`` (module docstring) and record the files in ``block`` (report.json
    ``structures``: each result's ``files``, the block's ``composite`` pictures). ``pictures=False``: transforms and
    resampled images only."""
    root = Path(out_dir) / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    names = folder_names(results)
    entries = {entry["name"]: entry for entry in block["results"]}
    regions = []
    for result in results:
        if result.transform is None:
            continue
        folder = root / names[result.name]
        folder.mkdir(parents=True, exist_ok=True)
        transforms.write_transform(result.transform, folder / "transform.h5")
        image_io.write_image(resample_in_region(fixed, moving, result), folder / "moving_resampled.nrrd")
        files = {"transform": f"{FOLDER}/{names[result.name]}/transform.h5",
                 "moving_resampled": f"{FOLDER}/{names[result.name]}/moving_resampled.nrrd"}
        if pictures:
            from .pictures import structure_pictures

            written = structure_pictures(folder, result.name, fixed, moving, fixed_labels.image, result.label_values,
                                         result.region, result.centroid_mm, global_transform, result.transform)
            files["pictures"] = {key: f"{FOLDER}/{names[result.name]}/{name}" for key, name in written.items()}
        entries[result.name]["files"] = files
        regions.append((result.label_values, result.transform, np.asarray(result.centroid_mm)))
    if pictures and regions:
        from .pictures import composite_pictures

        centre = np.mean([c for *_, c in regions], axis=0)
        written = composite_pictures(root, fixed, moving, fixed_labels.image, [(v, t) for v, t, _ in regions],
                                     global_transform, centre)
        block["composite"] = {key: f"{FOLDER}/{name}" for key, name in written.items()}


def report_block(results: list[StructureResult], fixed_labels: StructureLabels, requested, settings_dict: dict,
                 seconds: float, moving_labels: StructureLabels | None = None) -> dict:
    """report.json ``structures``: what was asked, where the names came from, the settings, a summary and one entry
    per structure (:meth:`StructureResult.to_report`)."""
    verdicts: dict[str, int] = {}
    for result in results:
        verdicts[result.verdict] = verdicts.get(result.verdict, 0) + 1
    return {
        "requested": list(parse_names(requested)),
        "names_from": fixed_labels.source, "labels_path": fixed_labels.path,
        "moving_labels": None if moving_labels is None else {"names_from": moving_labels.source,
                                                             "path": moving_labels.path},
        "convention": "each structure's transform maps FIXED physical points to MOVING physical points (LPS mm), "
                      "the global transform included; apply it to the moving volume to align that structure",
        "settings": settings_dict,
        # the local search's, the consistency check's and the verdict's values (resources/structure_thresholds.json)
        "thresholds": structure_thresholds(),
        "summary": {"structures": len(results), "registered": sum(r.transform is not None for r in results),
                    "failed": sum(r.transform is None for r in results), "verdicts": verdicts},
        "seconds": round(seconds, 3),
        "results": [result.to_report() for result in results],
    }
