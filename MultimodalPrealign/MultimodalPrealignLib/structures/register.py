"""Register each named structure of the fixed image on its own, starting from the global result.

For each structure (:func:`register_structures`):

1. its bounding box in the fixed label map (fixed physical LPS mm) and a sample of its points; refused with one line
   when it is missing, too small (fewer than ``min_voxels`` at the working spacing) or mostly outside the moving
   image under the global transform (``min_inside_fraction``);
2. a structure-level crop: the fixed image cut to the box plus ``margin_mm``; the moving image cut to where the
   global transform sends that box, plus ``moving_margin_mm`` (room for the structure's own motion); both resampled
   at a working spacing finer than the global run's: the coarser of the two images' finest voxel sizes (a 0.1 mm
   microCT and a 0.4 x 0.4 x 2.5 mm MR: 0.4 mm), enlarged until the fixed crop holds at most
   ``max_working_voxels``;
3. the metric mask: the structure dilated by ``mask_dilation_mm`` on the fixed working grid (and the voxels that
   hold image data); the engines take it as their fixed mask (itk: metric fixed mask; elastix: fixed mask; BRAINSFit:
   ``maskProcessingMode ROI``); the sampling is set so about ``target_samples`` metric samples fall inside it;
4. a local search from the GLOBAL transform (:func:`local_search`: turns up to 30 degrees about the structure's
   centroid with translation searches, on smoothed copies, scored by the masked MI), then ``engines.register`` from
   its best pose with ``stages`` (rigid by default);
5. measured: masked mutual information (dense joint histogram on the same mask voxels) under the global transform
   and the result (the result is dropped for the global one when it lowers it: the guard), re-registrations from
   the result turned about its flattest principal axis (:mod:`.consistency`: the best end by the MI of the structure
   dilated by 1 mm may replace the result; poses that score as well but lie elsewhere are reported), small shifts
   and turns of the result (probes), the motion relative to the global transform (rotation, translation at the
   centroid, mean and maximum displacement of the structure's points), and with moving labels of the same name the
   Dice and centroid distance before/after; judged by :mod:`.verdict`.

Every transform maps FIXED physical points to MOVING physical points (LPS mm); a structure's result includes the
global transform it started from (it is the whole fixed->moving mapping for that structure's points).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .. import crop, engines, parallel
from ..engines.settings import check_stages
from ..errors import Cancelled, InputError, RegistrationError
from ..geometry import transforms
from ..geometry.image_space import (
    Box,
    bounding_box,
    index_to_physical_matrix,
    index_to_physical_points,
    inside_image,
    physical_to_index,
)
from ..progress import SILENT, Progress
from ..qa.metrics import structure_metrics
from . import consistency
from . import verdict as structure_verdict
from .labels import StructureLabels, parse_names, select

#: Settings of :class:`StructureSettings` read from ``resources/structure_thresholds.json`` when left None.
RESOURCE_KEYS = ("margin_mm", "moving_margin_mm", "mask_dilation_mm", "max_working_voxels", "min_voxels",
                 "min_inside_fraction", "target_samples")


@dataclass
class StructureSettings:
    """How each structure is registered. ``registration``: engine, stages (rigid by default), iterations, seed;
    its ``sampling_percentage`` None = set per structure for about ``target_samples`` samples in the mask.
    Lengths in mm; None = the value of ``resources/structure_thresholds.json``. ``spacing_mm``: the working spacing
    (None: automatic, step 2 of the module docstring)."""

    registration: engines.RegistrationSettings = field(
        default_factory=lambda: engines.RegistrationSettings(stages=("rigid",)))
    margin_mm: float | None = None
    moving_margin_mm: float | None = None
    mask_dilation_mm: float | None = None
    max_working_voxels: int | None = None
    min_voxels: int | None = None
    min_inside_fraction: float | None = None
    target_samples: int | None = None
    spacing_mm: float | None = None

    def resolved(self) -> StructureSettings:
        """A copy with every None filled in from the resource; the registration settings validated."""
        limits = structure_verdict.thresholds()
        out = dataclasses.replace(self, registration=dataclasses.replace(self.registration))
        for key in RESOURCE_KEYS:
            if getattr(out, key) is None:
                setattr(out, key, limits[key])
        out.registration.stages = check_structure_stages(out.registration.stages)
        out.registration.validate()
        return out

    def to_dict(self) -> dict:
        return {"engine": self.registration.engine, "stages": list(self.registration.stages),
                "iterations": self.registration.iterations, "seed": self.registration.seed,
                **{key: getattr(self, key) for key in RESOURCE_KEYS}, "spacing_mm": self.spacing_mm}


def check_structure_stages(stages) -> tuple:
    """The structures' stages: rigid and/or affine in that order (a structure's transform stays linear); else a
    one-line InputError."""
    stages = check_stages(stages, "--structure-stages ")
    if "bspline" in stages:
        raise InputError("A structure's registration is rigid or affine, not bspline (a deformable transform per "
                         "structure would not stay one structure's motion)", "use --structure-stages rigid or "
                         "rigid,affine")
    return stages


@dataclass
class StructureResult:
    """One structure's outcome. ``transform``: fixed->moving (LPS mm), global transform included; None with
    ``error`` (one line). ``box``: the structure's bounding box, ``region``: the fixed crop (fixed frame, LPS mm)."""

    name: str
    label_values: list
    transform: sitk.Transform | None = None
    error: str | None = None
    verdict: str = structure_verdict.FAIL
    reasons: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    motion: dict = field(default_factory=dict)
    guard: dict = field(default_factory=dict)
    crop: dict = field(default_factory=dict)
    registration: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    box: Box | None = None
    region: Box | None = None
    centroid_mm: list | None = None
    points: np.ndarray | None = None  # a sample of the structure's points (fixed physical LPS mm)

    def to_report(self) -> dict:
        """The structure's entry of report.json ``structures.results``."""
        out = {"name": self.name, "label_values": [int(v) for v in self.label_values], "verdict": self.verdict,
               "verdict_reasons": list(self.reasons), "error": self.error}
        if self.transform is not None:
            out["transform"] = transforms.summarize(self.transform)
        out.update({"motion_relative_to_global": self.motion, "metrics": self.metrics, "guard": self.guard,
                    "crop": self.crop, "registration": self.registration,
                    "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
                    "box_lps": self.box.to_dict() if self.box is not None else None,
                    "centroid_mm_lps": self.centroid_mm})
        return out


# ------------------------------------------------------------------------------------------------ measuring
class MaskedMI:
    """Dense mutual information (nats) of the fixed working image and the moving working image under a transform,
    on ONE set of fixed voxels (inside the metric mask, regularly subsampled to at most ``samples``), on intensity
    ranges fixed at construction (under ``reference``): values are comparable between transforms."""

    def __init__(self, fixed_work: sitk.Image, moving_work: sitk.Image, mask: np.ndarray, reference: sitk.Transform,
                 samples: int = 200_000, bins: int = 32):
        index = np.flatnonzero(mask.ravel())
        index = index[:: max(1, index.size // max(samples, 1))]
        self.fixed_values = sitk.GetArrayViewFromImage(fixed_work).ravel()[index].astype(np.float64)
        zyx = np.column_stack(np.unravel_index(index, mask.shape))
        self.points = index_to_physical_points(fixed_work, zyx[:, ::-1].astype(float))
        self.moving = sitk.GetArrayFromImage(moving_work)
        self.moving_image = moving_work
        # for the lookup of _moving_values: physical -> moving index, the flat image, the points per axis
        a, origin = index_to_physical_matrix(moving_work)
        inverse = np.linalg.inv(a)
        self._to_index = (inverse, -inverse @ origin)
        self._flat = self.moving.ravel()
        self._points_by_axis = [np.ascontiguousarray(self.points[:, k]) for k in range(3)]
        self.bins = int(bins)
        self.f_range = self._range(self.fixed_values)
        scale = self.bins / (self.f_range[1] - self.f_range[0])
        # the fixed samples' histogram rows (bin * bins), the same for every transform
        self._fixed_rows = np.clip(((self.fixed_values - self.f_range[0]) * scale).astype(np.int64), 0,
                                   self.bins - 1) * self.bins
        reference_values = self._moving_values(reference)
        valid = np.isfinite(reference_values)
        self.m_range = self._range(reference_values[valid]) if valid.any() else (0.0, 1.0)

    @staticmethod
    def _range(values: np.ndarray) -> tuple[float, float]:
        if values.size == 0:
            return 0.0, 1.0
        lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
        return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)

    def _moving_values(self, transform: sitk.Transform) -> np.ndarray:
        """The moving image at the sample points under ``transform`` (trilinear; NaN outside the moving grid)."""
        if not transforms.is_linear(transform) or min(self.moving.shape) < 2:
            moved = transforms.transform_points(transform, self.points)
            index = physical_to_index(self.moving_image, moved)
            return ndimage.map_coordinates(self.moving, index[:, ::-1].T, order=1, mode="constant", cval=np.nan,
                                           prefilter=False)
        # physical -> moving index folded into the transform, then a vectorised trilinear lookup (same values as
        # map_coordinates, in 1/3 to 2/3 of its time here; the local search and the consistency climbs call this
        # thousands of times); one contiguous array per axis, in place: 3x faster than on (N, 3) arrays
        inverse, offset = self._to_index
        matrix = transforms.to_matrix(transform)
        linear, shift = inverse @ matrix[:3, :3], inverse @ matrix[:3, 3] + offset
        p0, p1, p2 = self._points_by_axis
        nz, ny, nx = self.moving.shape
        valid = np.ones(p0.size, bool)
        base, weight = [], []
        for k, size in enumerate((nx, ny, nz)):
            # three scaled sums, not a matrix product: BLAS threads on a busy machine made the product 10-30x slower
            c = p0 * linear[k, 0]
            c += p1 * linear[k, 1]
            c += p2 * linear[k, 2]
            c += shift[k]
            upper = float(size - 1)
            valid &= (c >= 0.0) & (c <= upper)
            b = np.floor(np.clip(c, 0.0, upper))
            np.minimum(b, upper - 1, out=b)
            c -= b
            base.append(b.astype(np.int64))
            weight.append(c)
        flat = self._flat
        start = (base[2] * ny + base[1]) * nx + base[0]
        np.clip(start, 0, flat.size - 1 - (ny * nx + nx + 1), out=start)
        wx, wy, wz = weight
        ux, uy = 1 - wx, 1 - wy
        c00 = flat[start] * ux + flat[start + 1] * wx
        c10 = flat[start + nx] * ux + flat[start + nx + 1] * wx
        start += ny * nx
        c01 = flat[start] * ux + flat[start + 1] * wx
        c11 = flat[start + nx] * ux + flat[start + nx + 1] * wx
        values = (c00 * uy + c10 * wy) * (1 - wz) + (c01 * uy + c11 * wy) * wz
        values[~valid] = np.nan
        return values

    def __call__(self, transform: sitk.Transform) -> tuple[float | None, int]:
        """(MI in nats or None with fewer than 1000 valid samples, valid samples)."""
        m = self._moving_values(transform)
        valid = np.isfinite(m)
        count = int(valid.sum())
        if count < 1000:
            return None, count
        rows = self._fixed_rows
        if count < m.size:
            rows, m = rows[valid], m[valid]
        bins = self.bins
        mi = np.clip(((m - self.m_range[0]) * (bins / (self.m_range[1] - self.m_range[0]))).astype(np.int64), 0,
                     bins - 1)
        p = np.bincount(rows + mi, minlength=bins * bins).reshape(bins, bins).astype(np.float64)
        p /= p.sum()
        pf, pm = p.sum(1), p.sum(0)
        nz = p > 0
        return float(np.sum(p[nz] * np.log(p[nz] / np.outer(pf, pm)[nz]))), count


def probe_transforms(centre_mm, shift_mm: float, turn_deg: float) -> dict:
    """Fixed->fixed perturbations applied before a result: +-``shift_mm`` along L, P, S and +-``turn_deg`` about
    axes through ``centre_mm`` parallel to L, P, S."""
    probes = {}
    for axis, name in enumerate("LPS"):
        for sign in (1.0, -1.0):
            offset = [0.0, 0.0, 0.0]
            offset[axis] = sign * shift_mm
            probes[f"shift {sign * shift_mm:+.2f} mm along {name}"] = transforms.translation(offset)
            turn = sitk.Euler3DTransform()
            turn.SetCenter([float(v) for v in centre_mm])
            angles = [0.0, 0.0, 0.0]
            angles[axis] = math.radians(sign * turn_deg)
            turn.SetRotation(*angles)
            probes[f"turn {sign * turn_deg:+.1f} deg about {name}"] = turn
    return probes


def _turn(rotation_vector_deg, translation_mm, centre) -> sitk.Euler3DTransform:
    """Fixed->fixed: a rotation (rotation vector, degrees) about ``centre``, then a translation (mm)."""
    vector = np.radians(np.asarray(rotation_vector_deg, float))
    angle = float(np.linalg.norm(vector))
    turn = sitk.Euler3DTransform()
    turn.SetCenter([float(v) for v in centre])
    if angle > 0:
        axis = vector / angle
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        matrix = np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)
        turn.SetMatrix(matrix.ravel().tolist(), 1e-6)
    turn.SetTranslation([float(v) for v in translation_mm])
    return turn


def search_directions() -> np.ndarray:
    """14 unit axes: the 6 coordinate half-axes and the 8 diagonals."""
    axes = [np.eye(3)[i] * s for i in range(3) for s in (1.0, -1.0)]
    axes += [np.array([x, y, z]) / math.sqrt(3.0) for x in (1, -1) for y in (1, -1) for z in (1, -1)]
    return np.array(axes)


def local_search(fixed_work: sitk.Image, moving_work: sitk.Image, mask: np.ndarray, start: sitk.Transform,
                 centre, limits: dict, progress: Progress = SILENT, label: str = "") -> tuple[sitk.Transform, dict]:
    """A structure's starting pose: the best of turns about ``centre`` (``search_angles_deg`` about 14 axes, plus
    none), each with a greedy translation search, the best ``search_keep`` polished in rotation and translation;
    scored by the masked MI on copies smoothed by ``search_smoothing_mm`` (a wide, smooth capture range: the parts
    of a knee turn 5-30 degrees about the flexion axis, some centimetres from a bone's centroid). Returns
    (compose(best turn, start), record); ``start`` itself when nothing scores higher. ``progress``: told after each
    start's climb (and asked whether to stop); ``label``: the structure's name in its messages."""
    started = time.perf_counter()
    sigma = float(limits["search_smoothing_mm"])
    smooth_fixed = sitk.SmoothingRecursiveGaussian(fixed_work, sigma)
    smooth_moving = sitk.SmoothingRecursiveGaussian(moving_work, sigma)
    measure = MaskedMI(smooth_fixed, smooth_moving, mask, start, int(limits["search_samples"]),
                       int(limits["search_bins"]))
    count = {"n": 0}

    def score(rotation, translation) -> float:
        count["n"] += 1
        value, _ = measure(transforms.compose(_turn(rotation, translation, centre), start))
        return -math.inf if value is None else value

    def climb(rotation, translation, value, rotate: bool) -> tuple:
        step, min_step = float(limits["search_step_mm"]), float(limits["search_min_step_mm"])
        while step >= min_step - 1e-9:
            moved = True
            while moved:
                moved = False
                trials = [(rotation, translation + d) for d in np.vstack([np.eye(3), -np.eye(3)]) * step]
                if rotate:
                    degrees = step  # 1 mm ~ 1 degree at the scale of a bone
                    trials += [(rotation + d, translation) for d in np.vstack([np.eye(3), -np.eye(3)]) * degrees]
                for r, t in trials:
                    trial = score(r, t)
                    if trial > value + 1e-6:
                        rotation, translation, value, moved = r, t, trial, True
            step /= 2.0
        return rotation, translation, value

    zero = np.zeros(3)
    baseline = score(zero, zero)
    candidates = [(zero, zero)] + [(axis * angle, zero) for angle in limits["search_angles_deg"]
                                   for axis in search_directions()]
    keep = int(limits["search_keep"])
    steps = len(candidates) + keep

    def told(done: int, value):  # a line every 8 starts, a cancel check after each
        if done % 8 == 0 or done == steps:
            progress.report("structures", done / steps, f"{label}: local search, start {done} of {steps}")
        else:
            progress.check_cancelled()
        return value

    climbed = sorted((told(i + 1, climb(r, t, score(r, t), rotate=False)) for i, (r, t) in enumerate(candidates)),
                     key=lambda c: -c[2])
    polished = [told(len(candidates) + i + 1, climb(r, t, v, rotate=True))
                for i, (r, t, v) in enumerate(climbed[:keep])]
    rotation, translation, value = max(polished, key=lambda c: c[2])
    record = {"evaluations": count["n"], "seconds": round(time.perf_counter() - started, 3),
              "mi_start": _round(baseline), "mi_best": _round(value),
              "rotation_deg": round(float(np.linalg.norm(rotation)), 3),
              "translation_mm": round(float(np.linalg.norm(translation)), 3), "smoothing_mm": sigma}
    if not value > baseline:
        record["chosen"] = "the global transform"
        return start, record
    record["chosen"] = "the best pose of the search"
    return transforms.compose(_turn(rotation, translation, centre), start), record


def motion_relative(global_fixed_to_moving: sitk.Transform, result: sitk.Transform, points: np.ndarray,
                    centroid) -> dict:
    """How far a structure's result is from the global transform: rotation of global^-1 o result (degrees), its
    translation at the structure's centroid, mean and maximum distance between where the two send the structure's
    points (mm)."""
    a = transforms.transform_points(result, points)
    b = transforms.transform_points(global_fixed_to_moving, points)
    distances = np.linalg.norm(a - b, axis=1)
    out = {"mean_displacement_mm": round(float(distances.mean()), 3),
           "max_displacement_mm": round(float(distances.max()), 3)}
    if transforms.is_linear(result) and transforms.is_linear(global_fixed_to_moving):
        relative = np.linalg.inv(transforms.to_matrix(global_fixed_to_moving)) @ transforms.to_matrix(result)
        c = np.asarray(centroid, float)
        out["rotation_deg"] = round(transforms.rotation_angle_deg(relative), 3)
        out["translation_at_centroid_mm"] = round(float(np.linalg.norm(transforms.apply_matrix(relative, c[None])[0]
                                                                       - c)), 3)
        out["relative_matrix_4x4"] = [[round(float(v), 6) for v in row] for row in relative]
    return out


# ------------------------------------------------------------------------------------------------ the run
def register_structures(fixed: sitk.Image, moving: sitk.Image, global_fixed_to_moving: sitk.Transform,
                        fixed_labels: StructureLabels, names, settings: StructureSettings | None = None,
                        moving_labels: StructureLabels | None = None, progress: Progress | None = None,
                        register_fn=None, crop_fn=None) -> list[StructureResult]:
    """One :class:`StructureResult` per requested structure (``names``: names or ``"all"``), in that order.

    ``fixed`` / ``moving``: the images (float32 copies save a cast per structure); ``global_fixed_to_moving``: the
    global result every structure starts from (LPS mm); ``fixed_labels``: the fixed image's structures (any grid of
    its physical space); ``moving_labels``: optional, for Dice / centroid checks of structures with the same name.
    ``register_fn`` / ``crop_fn``: replace ``engines.register`` / ``crop.apply_crop`` (same signatures). A missing,
    too small or out-of-view structure, or an engine failure, gives a result with ``error`` (one line); the others
    still run. A cancel request stops the whole run.
    """
    settings = (settings or StructureSettings()).resolved()
    progress = progress or SILENT
    chosen, problems = select(fixed_labels, names)
    if not chosen and not problems:
        raise InputError("The fixed label map holds no structure to register", "check --fixed-labels")
    array = sitk.GetArrayViewFromImage(fixed_labels.image)
    objects = ndimage.find_objects(array)
    results = [StructureResult(name, [], error=text) for name, text in problems]
    # the core's itk engine and BRAINSFit (a process per run): two structures at a time (each whole on one thread:
    # the serial results); elastix (one library in the process, not known to be thread-safe) and a caller's engine
    # (Slicer's CLI modules) run on the calling thread, one after the other
    headless = register_fn in (None, engines.register) and crop_fn in (None, crop.apply_crop) and \
        settings.registration.engine in ("itk", "brainsfit")
    shown, relay = progress.relayed() if headless else (progress, None)

    def one(job) -> StructureResult:
        number, (name, values) = job
        span = shown.span(number / len(chosen), (number + 1) / len(chosen))
        span.report("structures", 0.0, f"structure {number + 1} of {len(chosen)}: {name}")
        started = time.perf_counter()
        try:
            result = _register_one(fixed, moving, global_fixed_to_moving, fixed_labels, array, objects, name,
                                   values, settings, moving_labels, span, register_fn or engines.register,
                                   crop_fn or crop.apply_crop)
        except (Cancelled, KeyboardInterrupt):
            raise
        except (InputError, RegistrationError) as err:
            result = StructureResult(name, list(values), error=err.one_line())
        result.timings["total"] = time.perf_counter() - started
        result.verdict, result.reasons = structure_verdict.judge(result.to_report())
        return result

    jobs = list(enumerate(chosen))
    if relay is None:
        results += [one(job) for job in jobs]
    else:
        results += parallel.each(jobs, one, idle=relay.flush, on_error=relay.stop)
        relay.flush()
        if relay.cancelled:  # the worker's structure stopped for a cancel the calling thread saw
            raise Cancelled()
    requested = list(parse_names(names))
    order = {name: i for i, name in enumerate(requested)}
    return sorted(results, key=lambda r: order.get(r.name, len(order)))


def working_spacing(fixed: sitk.Image, moving: sitk.Image, box: Box, settings: StructureSettings) -> float:
    """Isotropic working spacing (mm): ``settings.spacing_mm``, else the coarser of the two images' finest voxel
    sizes; enlarged until ``box`` holds at most ``max_working_voxels``."""
    spacing = float(settings.spacing_mm or max(min(fixed.GetSpacing()), min(moving.GetSpacing())))
    voxels = box.volume / spacing ** 3
    if voxels > settings.max_working_voxels:
        spacing *= (voxels / settings.max_working_voxels) ** (1 / 3)
    return round(spacing, 4)


def _structure_geometry(labels: sitk.Image, array: np.ndarray, objects: list, values: list[int],
                        max_points: int = 20000) -> tuple[int, Box, np.ndarray] | None:
    """(voxel count, bounding box LPS mm, up to about ``max_points`` of its voxel centres) of the voxels holding
    ``values``; None when there are none."""
    slices = [objects[v - 1] for v in values if 0 < v <= len(objects) and objects[v - 1] is not None]
    if not slices:
        return None
    bounds = tuple(slice(min(s[d].start for s in slices), max(s[d].stop for s in slices)) for d in range(3))
    inside = np.isin(array[bounds], values)
    count = int(np.count_nonzero(inside))
    if count == 0:
        return None
    step = max(1, int(round((count / max_points) ** (1 / 3))))
    zyx = np.argwhere(inside[::step, ::step, ::step]) * step + np.array([b.start for b in bounds])
    points = index_to_physical_points(labels, zyx[:, ::-1].astype(float))
    corners = np.array([[(bounds[2].start, bounds[2].stop)[i] - 0.5, (bounds[1].start, bounds[1].stop)[j] - 0.5,
                         (bounds[0].start, bounds[0].stop)[k] - 0.5] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    corner_points = index_to_physical_points(labels, corners)
    box = Box(tuple(corner_points.min(0).tolist()), tuple(corner_points.max(0).tolist()))
    return count, box, points


def _box_of(points: np.ndarray) -> Box:
    return Box(tuple(points.min(0).tolist()), tuple(points.max(0).tolist()))


def _box_corners(box: Box) -> np.ndarray:
    return np.array([[(box.lower[0], box.upper[0])[i], (box.lower[1], box.upper[1])[j], (box.lower[2], box.upper[2])[k]]
                     for i in (0, 1) for j in (0, 1) for k in (0, 1)])


def structure_mask(labels: sitk.Image, values: list[int], reference: sitk.Image, dilation_mm: float) -> tuple:
    """(mask array on ``reference``'s grid: the structure dilated by ``dilation_mm``, the structure's labels there
    as a UInt16 image (nearest neighbour))."""
    on_grid = sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    return dilated_structure(on_grid, values, dilation_mm), on_grid


def dilated_structure(labels_work: sitk.Image, values: list[int], dilation_mm: float) -> np.ndarray:
    """Mask array: the structure (``values``) of a label map on its working grid, dilated by ``dilation_mm``."""
    inside = np.isin(sitk.GetArrayViewFromImage(labels_work), values)
    if dilation_mm > 0 and inside.any():
        inside = ndimage.distance_transform_edt(~inside, sampling=labels_work.GetSpacing()[::-1]) <= dilation_mm
    return inside


def _as_image(array: np.ndarray, like: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(like)
    return image


def _register_one(fixed, moving, global_transform, fixed_labels: StructureLabels, array, objects, name: str,
                  values: list[int], settings: StructureSettings, moving_labels, progress: Progress, register_fn,
                  crop_fn) -> StructureResult:
    result = StructureResult(name, list(values))
    limits = structure_verdict.thresholds()
    geometry = _structure_geometry(fixed_labels.image, array, objects, values)
    if geometry is None:
        raise InputError(f"Structure '{name}' has no voxels in the fixed label map",
                         "check the label map or leave this structure out of --per-structure")
    count, box, points = geometry
    result.box, result.points = box, points
    centroid = points.mean(0)
    result.centroid_mm = [round(float(v), 3) for v in centroid]
    fixed_region = box.expanded(settings.margin_mm).intersect(bounding_box(fixed))
    if fixed_region.volume <= 0:
        raise InputError(f"Structure '{name}' lies outside the fixed image", "check that the label map belongs to "
                         "the fixed image")
    spacing = working_spacing(fixed, moving, fixed_region, settings)
    volume_mm3 = count * float(np.prod(fixed_labels.image.GetSpacing()))
    working_voxels = volume_mm3 / spacing ** 3
    if working_voxels < settings.min_voxels:
        raise InputError(f"Structure '{name}' is too small to register on its own ({working_voxels:.0f} voxels at "
                         f"the working spacing of {spacing:.2f} mm; at least {settings.min_voxels})",
                         "leave it out of --per-structure, or merge it with a neighbour in the label map")
    inside = inside_image(moving, transforms.transform_points(global_transform, points))
    inside_fraction = float(inside.mean())
    if inside_fraction < settings.min_inside_fraction:
        raise InputError(f"Structure '{name}' is outside the moving image's field of view after the global transform "
                         f"(only {inside_fraction * 100:.0f}% of it maps inside the moving image)",
                         "leave it out of --per-structure, or check the global result (report.html)")
    moving_region = _box_of(transforms.transform_points(global_transform, _box_corners(fixed_region)))
    moving_region = moving_region.expanded(settings.moving_margin_mm).intersect(bounding_box(moving))
    result.region = fixed_region
    plan = crop.CropPlan(fixed_region, moving_region, (spacing,) * 3,
                         {"margin_mm": settings.margin_mm, "moving_margin_mm": settings.moving_margin_mm,
                          "working_spacing_mm": [spacing] * 3, "fixed_box_lps": fixed_region.to_dict(),
                          "moving_box_lps": moving_region.to_dict()})
    started = time.perf_counter()
    with _READING_FULL_IMAGES:
        fixed_work, moving_work = crop_fn(fixed, moving, plan)
        mask, labels_work = structure_mask(fixed_labels.image, values, fixed_work, settings.mask_dilation_mm)
    validity = crop.validity_mask(fixed_work, fixed)
    if validity is not None:
        mask &= sitk.GetArrayViewFromImage(validity) > 0
    moving_mask = crop.validity_mask(moving_work, moving)
    mask_voxels = int(np.count_nonzero(mask))
    result.crop = {**plan.details, "structure_voxels": count, "structure_volume_ml": round(volume_mm3 / 1000.0, 3),
                   "mask_dilation_mm": settings.mask_dilation_mm, "mask_voxels": mask_voxels,
                   "inside_moving_fraction": round(inside_fraction, 4)}
    result.timings["crop"] = time.perf_counter() - started
    progress.report("structures", 0.15, f"{name}: working spacing {spacing:.2f} mm, fixed {fixed_work.GetSize()}, "
                                        f"mask {mask_voxels} voxels")
    registration = dataclasses.replace(settings.registration, fixed_mask_is_region=True)  # sample the bone's mask
    if registration.sampling_percentage is None:
        total = int(np.prod(fixed_work.GetSize()))
        # elastix samples inside its fixed mask; ITK and BRAINSFit draw over the grid and drop samples outside it
        pool = total if registration.engine == "elastix" else max(mask_voxels, 1)
        registration.sampling_percentage = float(min(1.0, settings.target_samples / pool))
    started = time.perf_counter()
    initial, search = global_transform, None
    if limits.get("search", True):
        progress.report("structures", 0.2, f"{name}: local search from the global transform")
        initial, search = local_search(fixed_work, moving_work, mask, global_transform, centroid, limits,
                                       progress.span(0.2, 0.3), name)
    result.timings["search"] = time.perf_counter() - started
    started = time.perf_counter()
    engine_result = register_fn(fixed_work, moving_work, initial, registration.validate(),
                                progress.span(0.3, 0.85), _as_image(mask, fixed_work), moving_mask)
    result.timings["register"] = time.perf_counter() - started
    result.registration = {"engine": registration.engine, "search": search, "stages": engine_result.stages,
                           "sampling_percentage": registration.sampling_percentage,
                           "warnings": list(engine_result.warnings)}
    started = time.perf_counter()
    measure = MaskedMI(fixed_work, moving_work, mask, global_transform, int(limits["mi_samples"]),
                       int(limits["mi_bins"]))
    mi_global, samples = measure(global_transform)
    mi_registered, _ = measure(engine_result.transform)
    mi_search = measure(initial)[0] if initial is not global_transform else None
    # the result: the registration's, unless it scores clearly below the global transform or the local search's pose
    # (an engine that walks off a good start: BRAINSFit on a synthetic knee's patella ended 3.1 mm off); a search
    # pose kept is refined by the consistency climbs below
    tolerance = float(limits["guard_tolerance"])
    known = [v for v in (mi_global, mi_search) if v is not None]
    if mi_registered is None or not known or mi_registered >= max(known) - tolerance:
        kept, mi_result = "registration", mi_registered
    elif mi_search is not None and (mi_global is None or mi_search >= mi_global):
        kept, mi_result = "search", mi_search
    else:
        kept, mi_result = "global", mi_global
    result.guard = {"measure": "dense MI inside the dilated structure, same voxels for both",
                    "mi_global": _round(mi_global), "mi_search": _round(mi_search),
                    "mi_registered": _round(mi_registered), "samples": samples, "kept": kept}
    result.transform = {"registration": engine_result.transform, "search": initial, "global": global_transform}[kept]
    accepted = kept != "global"
    consistency_record = {}
    if limits.get("consistency", True) and accepted and mi_result is not None:  # kept global: WARN anyway
        progress.report("structures", 0.9, f"{name}: re-registration from turned starts (consistency)")
        tight = dilated_structure(labels_work, values, float(limits["consistency_mask_dilation_mm"])) & mask

        def masked_mi(voxels: np.ndarray, samples_key: str) -> MaskedMI:
            return MaskedMI(fixed_work, moving_work, voxels, global_transform, int(limits[samples_key]),
                            int(limits["mi_bins"]))

        # (name, measure, climbing measure); the metric mask's measure is the guard's ``measure`` itself
        metrics = [(f"structure dilated by {limits['consistency_mask_dilation_mm']} mm",
                    masked_mi(tight, "mi_samples"), masked_mi(tight, "consistency_samples")),
                   ("metric mask", measure, masked_mi(mask, "consistency_samples"))]
        others = (("the local search's pose", initial),) if initial is not global_transform and kept != "search" else ()
        result.transform, consistency_record = consistency.check(metrics, result.transform, points, limits, others,
                                                                   progress.check_cancelled)
        if consistency_record.get("switched"):
            mi_result = measure(result.transform)[0]
    result.timings["consistency"] = consistency_record.get("seconds", 0.0)
    result.metrics = {"mi": {"global": _round(mi_global), "registered": _round(mi_result),
                             "gain": _round(None if mi_global is None or mi_result is None else mi_result - mi_global),
                             "samples": samples, "bins": int(limits["mi_bins"])},
                      "inside_fraction": round(float(inside_image(
                          moving, transforms.transform_points(result.transform, points)).mean()), 4),
                      "probes": _probes(measure, result.transform, centroid, spacing, mi_result, limits),
                      "consistency": consistency_record}
    if moving_labels is not None:
        result.metrics["labels"] = _label_checks(name, values, labels_work, moving_labels, global_transform,
                                                 result.transform)
    result.motion = motion_relative(global_transform, result.transform, points, centroid)
    result.timings["measure"] = time.perf_counter() - started
    progress.report("structures", 1.0, f"{name}: {result.motion['mean_displacement_mm']:.2f} mm from the global "
                                       "transform")
    return result


#: One structure at a time reads the full-resolution images (its crop and mask): on a 600^3 microCT a femur's crop
#: region and its anti-aliasing copies are about 1 GB, so two at once raised the peak RSS from 2.5 to 4.1 GB.
_READING_FULL_IMAGES = threading.Lock()


def _round(value, digits: int = 5):
    return None if value is None else round(float(value), digits)


def _probes(measure: MaskedMI, transform: sitk.Transform, centroid, spacing: float, mi_result, limits: dict) -> dict:
    """The best-scoring small shift / turn of the result and its MI gain over the result (nats)."""
    if mi_result is None:
        return {}
    rows = []
    for label, probe in probe_transforms(centroid, spacing * float(limits["probe_shift_voxels"]),
                                         float(limits["probe_turn_deg"])).items():
        value, _ = measure(transforms.compose(probe, transform))
        if value is not None:
            rows.append((value - mi_result, label))
    if not rows:
        return {}
    gain, label = max(rows)
    return {"best": label, "best_gain": round(float(gain), 5), "count": len(rows),
            "shift_mm": round(spacing * float(limits["probe_shift_voxels"]), 3),
            "turn_deg": float(limits["probe_turn_deg"])}


def _label_checks(name: str, values: list[int], labels_work: sitk.Image, moving_labels: StructureLabels,
                  before: sitk.Transform, after: sitk.Transform) -> dict:
    """Dice and centroid distance (mm) of the structure against the moving labels of the same name, under the
    global transform (``before``) and the structure's result (``after``), on the structure's working grid."""
    moving_values = moving_labels.values_for(name)
    if moving_values is None or name not in moving_labels.present():
        return {"note": f"no structure '{name}' in the moving label map"}
    pairs = [(name, list(values), list(moving_values))]
    out = {}
    for key, transform in (("before", before), ("after", after)):
        rows = structure_metrics(labels_work, moving_labels.image, transform, pairs)["structures"]
        row = rows[0] if rows else {}
        out[key] = {k: row.get(k) for k in ("dice", "centroid_distance_mm", "fraction_in_overlap")}
    return out
