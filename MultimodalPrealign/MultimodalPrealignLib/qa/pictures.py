"""QA pictures (PNG, Pillow only): fusion, checkerboard, edges and structure outlines, in up to three states.

The states: ``header`` (as the headers place the images: the original misalignment), ``before`` (after
pre-alignment) and ``after`` (after registration). Every picture is a row of three panels through the centre
of the overlap, in the FIXED image's physical frame on an axis-aligned LPS display grid (~1 mm or coarser):
axial, coronal and sagittal, shown the way radiologists read them (axial/coronal: patient's right on the
viewer's left; axial: anterior up; coronal/sagittal: superior up; sagittal: anterior on the left). The moving
image is resampled through the fixed->moving transform (ITK convention, LPS mm) onto the same grid, so the
states differ only by where the moving image lands. A thin overlap (a slab) is shown with its surroundings
(each side of the region at least :data:`MIN_SIDE_FRACTION` of the longest), not as a strip.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from ..geometry.image_space import Box, bounding_box, grid_points, inside_image
from ..geometry.resample import grid_for_box
from ..geometry.transforms import transform_points
from .metrics import pairs_by_id

PLANES = ("axial", "coronal", "sagittal")
#: (left, right, top, bottom) orientation letters of each plane as displayed.
PLANE_LETTERS = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}
#: Patient axis (0=L, 1=P, 2=S) that each plane is normal to.
PLANE_NORMAL = {"axial": 2, "coronal": 1, "sagittal": 0}
AXIS_NAMES = ("L", "P", "S")

PANEL_PIXELS = 300  # target size (pixels) of the longest panel side
FIXED_COLOUR = np.array([60, 220, 60], dtype=float)     # fixed structure outlines: green
MOVING_COLOUR = np.array([255, 60, 255], dtype=float)   # moving structure outlines / edges: magenta
OVERLAY_COLOUR = np.array([255, 140, 0], dtype=float)   # moving image in fusion: orange
FOV_COLOUR = np.array([0, 200, 255], dtype=float)       # edge of the moving image's field of view: cyan

#: kind -> (short name, legend). Order = order in the report (most telling first).
KIND_TITLES = {
    "outlines": ("Structure outlines", "fixed structures green, moving structures magenta: they should coincide"),
    "edges": ("Edges", "strongest edges of the moving image (magenta) on the fixed image (grey)"),
    "checkerboard": ("Checkerboard", "squares alternate fixed / moving: edges should run on across squares"),
    "fusion": ("Fusion", "fixed in grey, moving in orange; cyan line = edge of the moving scan"),
}
STAGE_TITLES = {"header": "AS THE HEADERS PLACE THEM (no pre-alignment)",
                "before": "AFTER PRE-ALIGNMENT (before registration)", "after": "AFTER REGISTRATION"}
#: Order of the states in the report (left to right).
STAGE_ORDER = ("header", "before", "after")
#: Each side of the displayed region is at least this share of its longest side (when the fixed image allows).
MIN_SIDE_FRACTION = 0.5


@dataclass
class DisplayGrid:
    """Axis-aligned LPS display grid: ``box`` sampled at ``spacing_mm``, planes through ``centre_mm``."""

    box: Box
    spacing_mm: float
    centre_mm: np.ndarray


def overlap_box(fixed: sitk.Image, moving: sitk.Image, fixed_to_moving: sitk.Transform,
                per_axis: int = 24) -> Box | None:
    """Box (fixed frame, LPS mm) around the fixed points that map inside the moving image; None if none do."""
    points = grid_points(fixed, per_axis)
    inside = inside_image(moving, transform_points(fixed_to_moving, points))
    if not inside.any():
        return None
    step = bounding_box(fixed).size / per_axis
    chosen = points[inside]
    return Box(tuple((chosen.min(0) - step / 2).tolist()), tuple((chosen.max(0) + step / 2).tolist()))


def display_grid(fixed: sitk.Image, moving: sitk.Image, fixed_to_moving: sitk.Transform,
                 min_spacing_mm: float = 1.0, margin_fraction: float = 0.1) -> DisplayGrid:
    """Region shown: the overlap (plus a margin) inside the fixed image's box, at ~``PANEL_PIXELS`` pixels.

    A thin overlap (a slab) is widened to :data:`MIN_SIDE_FRACTION` of its longest side, as far as the fixed
    image reaches, so its surroundings show; the slice planes still cut through the overlap's centre.
    """
    fixed_box = bounding_box(fixed)
    region = overlap_box(fixed, moving, fixed_to_moving)
    if region is None or region.volume <= 0:
        region = fixed_box
    centre = region.center
    region = region.expanded(float(region.size.max()) * margin_fraction).intersect(fixed_box)
    region = _widened(region, fixed_box, MIN_SIDE_FRACTION)
    spacing = max(float(min_spacing_mm), float(region.size.max()) / PANEL_PIXELS)
    return DisplayGrid(region, spacing, np.asarray(centre, dtype=float))


def _widened(region: Box, limit: Box, fraction: float) -> Box:
    """``region`` with every side at least ``fraction`` of its longest, kept inside ``limit`` (moved, then cut)."""
    lower, upper = np.asarray(region.lower, float), np.asarray(region.upper, float)
    low_limit, high_limit = np.asarray(limit.lower, float), np.asarray(limit.upper, float)
    want = fraction * float(region.size.max())
    for axis in range(3):
        missing = want - (upper[axis] - lower[axis])
        if missing <= 0:
            continue
        lower[axis] -= missing / 2
        upper[axis] += missing / 2
        if lower[axis] < low_limit[axis]:
            upper[axis] += low_limit[axis] - lower[axis]
        if upper[axis] > high_limit[axis]:
            lower[axis] -= upper[axis] - high_limit[axis]
        lower[axis], upper[axis] = max(lower[axis], low_limit[axis]), min(upper[axis], high_limit[axis])
    return Box(tuple(lower.tolist()), tuple(upper.tolist()))


def plane_caption(plane: str, centre_mm: np.ndarray) -> str:
    """'Axial at S 12 mm': the plane and where it cuts, as an anatomical letter and a distance (LPS mm; the
    letter of the positive direction for 0, never '-0')."""
    axis = PLANE_NORMAL[plane]
    value = int(round(float(centre_mm[axis])))
    letter = (("L", "R"), ("P", "A"), ("S", "I"))[axis][1 if value < 0 else 0]
    return f"{plane.capitalize()} at {letter} {abs(value)} mm"


def _plane_reference(grid: DisplayGrid, plane: str) -> sitk.Image:
    g = grid_for_box(grid.box, [grid.spacing_mm] * 3)
    size, origin = list(g["size"]), list(g["origin"])
    axis = PLANE_NORMAL[plane]
    size[axis] = 1
    origin[axis] = float(grid.centre_mm[axis])
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetOrigin(origin)
    ref.SetSpacing([grid.spacing_mm] * 3)
    return ref


def _to_view(array_zyx: np.ndarray, plane: str) -> np.ndarray:
    """2D display array (rows top->bottom, columns left->right) from a one-slice (z, y, x) array."""
    if plane == "axial":
        return array_zyx[0]                  # rows P (anterior up), cols L (patient right on the left)
    if plane == "coronal":
        return array_zyx[::-1, 0, :]         # rows S up, cols L
    return array_zyx[::-1, :, 0]             # sagittal: rows S up, cols P (anterior on the left)


def sample_plane(image: sitk.Image, grid: DisplayGrid, plane: str, transform: sitk.Transform | None = None,
                 labels: bool = False) -> np.ndarray:
    """``image`` on one display plane through ``transform`` (fixed->moving; identity for the fixed image).

    Intensities are linear-interpolated (NaN outside the image); label maps nearest neighbour (0 outside).
    """
    ref = _plane_reference(grid, plane)
    transform = transform if transform is not None else sitk.Transform()
    if labels:
        out = sitk.Resample(image, ref, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt32)
        return _to_view(sitk.GetArrayFromImage(out), plane).astype(np.int64)
    # straight from the stored pixel type: ITK interpolates in double either way, and a float32 copy of a
    # full-resolution CT per plane cost 1.8 s of the report on the phantom pair
    out = sitk.Resample(image, ref, transform, sitk.sitkLinear, float("nan"), sitk.sitkFloat32)
    return _to_view(sitk.GetArrayFromImage(out), plane)


def window(values: Sequence[np.ndarray], low_pct: float = 1.0, high_pct: float = 99.0) -> tuple[float, float]:
    """Robust display window (percentiles) over finite values, ignoring a padding value at the minimum."""
    data = np.concatenate([v[np.isfinite(v)].ravel() for v in values]) if values else np.zeros(1)
    if data.size == 0:
        return 0.0, 1.0
    lo_value = float(data.min())
    if np.count_nonzero(data == lo_value) > 0.02 * data.size and np.any(data > lo_value):
        data = data[data > lo_value]  # CT padding outside the reconstruction circle
    lo, hi = (float(v) for v in np.percentile(data, [low_pct, high_pct]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _normalise(array: np.ndarray, limits: tuple[float, float]) -> np.ndarray:
    lo, hi = limits
    out = (array - lo) / (hi - lo)
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0)


def _grey(array01: np.ndarray) -> np.ndarray:
    return np.repeat((array01 * 255.0)[..., None], 3, axis=2)


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=1)


def _label_boundary(labels: np.ndarray) -> np.ndarray:
    """Pixels of a label array whose 4-neighbourhood holds another label (outline of every structure)."""
    edge = np.zeros(labels.shape, bool)
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    return edge & (labels > 0)


def _paint(rgb: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colour
    return rgb


def fusion(fixed01: np.ndarray, moving01: np.ndarray, moving_valid: np.ndarray) -> np.ndarray:
    """RGB: fixed grey, moving blended in orange by its brightness, cyan line at the moving scan's edge."""
    rgb = _grey(fixed01)
    alpha = (0.55 * moving01 * moving_valid)[..., None]
    rgb = (1 - alpha) * rgb + alpha * OVERLAY_COLOUR
    return _paint(rgb, _boundary(moving_valid), FOV_COLOUR, 0.8)


def checkerboard(fixed01: np.ndarray, moving01: np.ndarray, moving_valid: np.ndarray, square_px: int) -> np.ndarray:
    """RGB checkerboard: even squares fixed, odd squares moving (fixed where the moving has no data)."""
    rows, cols = np.indices(fixed01.shape)
    odd = ((rows // square_px + cols // square_px) % 2 == 1) & moving_valid
    return _grey(np.where(odd, moving01, fixed01))


def edges(fixed01: np.ndarray, moving01: np.ndarray, moving_valid: np.ndarray) -> np.ndarray:
    """RGB: the strongest edges (top 12% gradient) of the smoothed moving image in magenta over the fixed."""
    rgb = _grey(fixed01) * 0.85
    smooth = ndimage.gaussian_filter(moving01, 1.0)
    gradient = np.hypot(*np.gradient(smooth))
    valid = ndimage.binary_erosion(moving_valid, iterations=2)
    if valid.any():
        threshold = np.percentile(gradient[valid], 88)
        rgb = _paint(rgb, valid & (gradient > max(threshold, 1e-6)), MOVING_COLOUR, 0.9)
    return rgb


def outlines(fixed01: np.ndarray, fixed_structures: np.ndarray, moving_structures: np.ndarray) -> np.ndarray:
    """RGB: fixed grey with fixed (green) and moving (magenta) structure outlines of corresponding structures."""
    rgb = _grey(fixed01) * 0.8
    rgb = _paint(rgb, _label_boundary(fixed_structures), FIXED_COLOUR)
    return _paint(rgb, _label_boundary(moving_structures), MOVING_COLOUR, 0.85)


def _font(size: int):
    """A scalable font when Pillow has FreeType (Pillow >= 10.1 bundles one), else Pillow's bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        try:
            return ImageFont.truetype("DejaVuSans.ttf", size)
        except OSError:
            return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _outlined_text(draw: ImageDraw.ImageDraw, xy, text: str, font, anchor: str) -> None:
    """Yellow text with a black outline, placed by a two-letter anchor (l/m/r, t/m/b) without Pillow anchors."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height = right - left, bottom - top
    x = xy[0] - left - {"l": 0, "m": width / 2, "r": width}[anchor[0]]
    y = xy[1] - top - {"t": 0, "m": height / 2, "b": height}[anchor[1]]
    try:
        draw.text((x, y), text, fill=(255, 255, 0), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    except (TypeError, ValueError):  # bitmap fonts of old Pillow versions have no stroke
        draw.text((x, y), text, fill=(255, 255, 0), font=font)


def _panel_image(rgb: np.ndarray, plane: str, scale: float, caption: str) -> Image.Image:
    height, width = rgb.shape[:2]
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))  # (rows, columns, 3) uint8: RGB
    image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    font = _font(15)
    left, right, top, bottom = PLANE_LETTERS[plane]
    w, h = image.size
    for text, xy, anchor in ((left, (4, h / 2), "lm"), (right, (w - 4, h / 2), "rm"),
                             (top, (w / 2, 3), "mt"), (bottom, (w / 2, h - 3), "mb")):
        _outlined_text(draw, xy, text, font, anchor)
    canvas = Image.new("RGB", (w, h + 22), (255, 255, 255))
    canvas.paste(image, (0, 22))
    ImageDraw.Draw(canvas).text((4, 3), caption, fill=(0, 0, 0), font=_font(14))
    return canvas


def compose_row(panels: list[np.ndarray], grid: DisplayGrid, title: str, legend: str = "") -> Image.Image:
    """The three plane panels side by side under a title line and a legend line."""
    longest = max(max(p.shape[:2]) for p in panels)
    scale = max(1.0, PANEL_PIXELS / longest)
    images = []
    for plane, rgb in zip(PLANES, panels):
        images.append(_panel_image(rgb, plane, scale, plane_caption(plane, grid.centre_mm)))
    gap = 8
    title_font, legend_font = _font(17), _font(14)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(_text_size(measure, title, title_font)[0], _text_size(measure, legend, legend_font)[0]) + 2 * gap
    width = int(max(sum(im.size[0] for im in images) + gap * (len(images) + 1), text_width))
    top = 50 if legend else 30
    height = max(im.size[1] for im in images) + top + 6
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 5), title, fill=(0, 0, 0), font=title_font)
    if legend:
        draw.text((gap, 28), legend, fill=(60, 60, 60), font=legend_font)
    x = gap
    for im in images:
        canvas.paste(im, (x, top))
        x += im.size[0] + gap
    return canvas


def _structure_lookup(pairs, fixed_side: bool, max_id: int) -> np.ndarray:
    table = np.zeros(max_id + 1, dtype=np.int64)
    for k, (_name, fixed_ids, moving_ids) in enumerate(pairs, start=1):
        for i in (fixed_ids if fixed_side else moving_ids):
            if 0 < int(i) <= max_id:
                table[int(i)] = k
    return table


def render_pictures(fixed: sitk.Image, moving: sitk.Image, transforms: dict, out_dir: str | os.PathLike,
                    fixed_labels: sitk.Image | None = None, moving_labels: sitk.Image | None = None,
                    pairs=None, kinds: Sequence[str] = tuple(KIND_TITLES),
                    reference_stage: str = "after", prefix: str = "") -> dict[str, str]:
    """Write PNGs ``<kind>_<stage>.png`` into ``out_dir``; return {"<kind>_<stage>": file name}.

    ``transforms``: stage name ("header", "before", "after", ...) -> fixed->moving transform (LPS mm). All stages
    are shown on the same display grid (the overlap of the ``reference_stage`` transform) with the moving image
    in the same window (taken from the reference stage). A stage whose moving image falls outside the view says
    so in its title. ``outlines`` needs both label maps; ``pairs`` ((name, fixed_ids, moving_ids) triples) says
    which structures correspond (default: equal ids). Pictures are written atomically (temporary name, then
    rename).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = list(transforms)
    reference = reference_stage if reference_stage in transforms else stages[-1]
    grid = display_grid(fixed, moving, transforms[reference])
    have_labels = fixed_labels is not None and moving_labels is not None
    if have_labels and pairs is None:
        pairs = pairs_by_id(fixed_labels, moving_labels)
    fixed_planes = [sample_plane(fixed, grid, p) for p in PLANES]
    fixed_window = window(fixed_planes)
    fixed01 = [_normalise(a, fixed_window) for a in fixed_planes]
    fixed_structures = []
    if have_labels:
        table = _structure_lookup(pairs, True, int(sitk.GetArrayViewFromImage(fixed_labels).max()))
        fixed_structures = [table[sample_plane(fixed_labels, grid, p, labels=True)] for p in PLANES]
    moving_planes = {stage: [sample_plane(moving, grid, p, transforms[stage]) for p in PLANES] for stage in stages}
    moving_window = None
    for stage in [reference] + stages:  # one window for every stage, from the reference stage if it shows data
        if any(np.isfinite(a).any() for a in moving_planes[stage]):
            moving_window = window(moving_planes[stage])
            break
    written: dict[str, str] = {}
    for stage in stages:
        transform = transforms[stage]
        visible = any(np.isfinite(a).any() for a in moving_planes[stage])
        panels_by_kind = _image_panels(kinds, grid, fixed01, moving_planes[stage], moving_window or (0.0, 1.0))
        if "outlines" in kinds and have_labels:
            table = _structure_lookup(pairs, False, int(sitk.GetArrayViewFromImage(moving_labels).max()))
            moving_structures = [table[sample_plane(moving_labels, grid, p, transform, labels=True)]
                                 for p in PLANES]
            panels_by_kind["outlines"] = [outlines(f, fs, ms)
                                          for f, fs, ms in zip(fixed01, fixed_structures, moving_structures)]
        for kind, panels in panels_by_kind.items():
            short, legend = KIND_TITLES[kind]
            title = f"{STAGE_TITLES.get(stage, stage)}: {short}"
            if not visible:
                title += " (the moving image lies outside this view)"
            name = f"{prefix}{kind}_{stage}.png"
            _save_png(compose_row(panels, grid, title, legend), out_dir / name)
            written[f"{kind}_{stage}"] = name
    return written


def _image_panels(kinds: Sequence[str], grid: DisplayGrid, fixed01: list[np.ndarray],
                  moving_planes: list[np.ndarray], moving_window: tuple[float, float]) -> dict[str, list[np.ndarray]]:
    """{kind: three RGB panels} of the requested fusion, checkerboard and edges pictures (in that order)."""
    moving01 = [_normalise(a, moving_window) for a in moving_planes]
    valid = [np.isfinite(a) for a in moving_planes]
    square_px = max(4, int(round(max(grid.box.size) / 8.0 / grid.spacing_mm)))
    panels_by_kind: dict[str, list[np.ndarray]] = {}
    if "fusion" in kinds:
        panels_by_kind["fusion"] = [fusion(f, m, v) for f, m, v in zip(fixed01, moving01, valid)]
    if "checkerboard" in kinds:
        panels_by_kind["checkerboard"] = [checkerboard(f, m, v, square_px) for f, m, v in zip(fixed01, moving01, valid)]
    if "edges" in kinds:
        panels_by_kind["edges"] = [edges(f, m, v) for f, m, v in zip(fixed01, moving01, valid)]
    return panels_by_kind


def _save_png(image: Image.Image, path: Path) -> None:
    temporary = path.with_name(path.name + ".part")
    image.save(temporary, format="PNG", compress_level=1)
    os.replace(temporary, path)
