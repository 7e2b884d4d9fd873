"""Pictures of per-structure registration (PNG): each structure's region under the global transform and under its own,
and one composite picture of the whole fixed image where every structure shows the moving image under its own
transform.

Panels are the QA pictures' (:mod:`..qa.pictures`: axial, coronal, sagittal on an axis-aligned LPS display grid in
the FIXED frame, radiological display), with the structure's outline from the fixed label map in green. The moving
image is resampled through fixed->moving transforms (LPS mm).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from ..geometry.image_space import Box, bounding_box
from ..qa.pictures import PLANES, DisplayGrid, checkerboard, compose_row, fusion, outlines, sample_plane, window

#: Longest side of a panel (pixels) before scaling for display.
PANEL_PIXELS = 300


def display_grid(box: Box, centre_mm, fixed: sitk.Image) -> DisplayGrid:
    """The region ``box`` (fixed frame) at about :data:`PANEL_PIXELS` pixels, never finer than the fixed voxels."""
    spacing = max(float(min(fixed.GetSpacing())), float(np.max(box.size)) / PANEL_PIXELS)
    return DisplayGrid(box, spacing, np.asarray(centre_mm, float))


def _normalise(array: np.ndarray, limits) -> np.ndarray:
    lo, hi = limits
    return np.clip(np.nan_to_num((array - lo) / (hi - lo), nan=0.0), 0.0, 1.0)


def _save(image: Image.Image, path: Path) -> None:
    temporary = path.with_name(path.name + ".part")
    image.save(temporary, format="PNG", compress_level=6)
    os.replace(temporary, path)


def _planes(fixed, moving, labels, grid: DisplayGrid, transform_by_region: list, background: sitk.Transform):
    """(fixed 0..1 planes, moving planes (NaN outside), structure label planes (region number or 0)).

    ``transform_by_region``: [(label values, fixed->moving transform)]: inside each region the moving image is
    sampled through its transform, elsewhere through ``background``."""
    fixed_planes = [sample_plane(fixed, grid, p) for p in PLANES]
    fixed01 = [_normalise(a, window(fixed_planes)) for a in fixed_planes]
    label_planes = [sample_plane(labels, grid, p, labels=True) for p in PLANES]
    moving_planes = [sample_plane(moving, grid, p, background) for p in PLANES]
    regions = [np.zeros(a.shape, np.int64) for a in label_planes]
    for number, (values, transform) in enumerate(transform_by_region, start=1):
        for index, plane in enumerate(PLANES):
            inside = np.isin(label_planes[index], values)
            if inside.any():
                moving_planes[index][inside] = sample_plane(moving, grid, plane, transform)[inside]
                regions[index][inside] = number
    return fixed01, moving_planes, regions


def _panels(kind: str, fixed01, moving_planes, regions, limits, square_px: int) -> list[np.ndarray]:
    moving01 = [_normalise(a, limits) for a in moving_planes]
    valid = [np.isfinite(a) for a in moving_planes]
    if kind == "fusion":
        rgb = [fusion(f, m, v) for f, m, v in zip(fixed01, moving01, valid)]
    else:
        rgb = [checkerboard(f, m, v, square_px) for f, m, v in zip(fixed01, moving01, valid)]
    out = []
    for panel, region in zip(rgb, regions):
        outline = outlines(np.zeros(region.shape), region, np.zeros_like(region))  # green outline on black
        edge = outline.sum(axis=2) > 0
        panel = panel.copy()
        panel[edge] = outline[edge]
        out.append(panel)
    return out


def structure_pictures(folder: Path, name: str, fixed: sitk.Image, moving: sitk.Image, labels: sitk.Image,
                       values: list[int], region: Box, centroid_mm, global_transform: sitk.Transform,
                       structure_transform: sitk.Transform) -> dict[str, str]:
    """``fusion_{global,structure}.png`` and ``checkerboard_{global,structure}.png`` of one structure's region in
    ``folder``; returns {key: file name}."""
    grid = display_grid(region, centroid_mm, fixed)
    written = {}
    square_px = max(4, int(round(float(np.max(region.size)) / 8.0 / grid.spacing_mm)))
    limits = None
    for stage, transform, title in (("global", global_transform, "GLOBAL transform"),
                                    ("structure", structure_transform, f"'{name}' registered on its own")):
        fixed01, moving_planes, regions = _planes(fixed, moving, labels, grid, [(values, transform)], transform)
        if limits is None:
            limits = window(moving_planes)
        for kind, legend in (("checkerboard", "squares alternate fixed / moving; green: the structure's outline"),
                             ("fusion", "fixed grey, moving orange; green: the structure's outline")):
            panels = _panels(kind, fixed01, moving_planes, regions, limits, square_px)
            file_name = f"{kind}_{stage}.png"
            _save(compose_row(panels, grid, f"{name}: {title} ({kind})", legend), folder / file_name)
            written[f"{kind}_{stage}"] = file_name
    return written


def composite_pictures(folder: Path, fixed: sitk.Image, moving: sitk.Image, labels: sitk.Image, regions: list,
                       global_transform: sitk.Transform, centre_mm) -> dict[str, str]:
    """``composite_global.png`` (the moving image under the global transform everywhere) and
    ``composite_structures.png`` (inside each structure under that structure's transform), checkerboards over the
    whole fixed image, planes through ``centre_mm``. ``regions``: [(label values, fixed->moving transform)]."""
    box = bounding_box(fixed)
    grid = display_grid(box, centre_mm, fixed)
    square_px = max(4, int(round(float(np.max(box.size)) / 10.0 / grid.spacing_mm)))
    written, limits = {}, None
    for stage, by_region, title in (("global", [(v, global_transform) for v, _ in regions], "GLOBAL transform"),
                                    ("structures", regions, "each structure under its own transform")):
        fixed01, moving_planes, marks = _planes(fixed, moving, labels, grid, by_region, global_transform)
        if limits is None:
            limits = window(moving_planes)
        panels = _panels("checkerboard", fixed01, moving_planes, marks, limits, square_px)
        file_name = f"composite_{stage}.png"
        _save(compose_row(panels, grid, f"Composite: {title}",
                          "squares alternate fixed / moving; green: structure outlines"), folder / file_name)
        written[f"composite_{stage}"] = file_name
    return written
