"""Pre-alignment method ``search``: a global rigid search that needs no masks or label maps.

What it handles that the usual initialisers do not: any rotation (head-first vs feet-first, supine vs
prone, oblique), translations of hundreds of millimetres (headers that share no frame), and partial
fields of view (an MR slab that covers a fifth of a CT).

How (all poses are rigid, fixed->moving, physical LPS mm):

1. Both images are box-averaged (``sitk.BinShrink``) to about ``fine_spacing_mm`` and again to about
   ``coarse_spacing_mm``. Each level gets a body mask (:func:`masks.foreground_mask`, robust to CT
   padding), intensities scaled to ``histogram_bins`` bins over a robust range, and a fixed set of sample
   points: the mask's voxels plus a ``rim_mm`` rim around it, subsampled with the seed.
2. Candidate poses: the header (identity); for every rotation of the 24-element cube group (which holds
   the 180 degree patient-position flips), of the principal-axes alignments with all proper sign
   combinations, and of a uniform rotation grid (``rotation_grid_size`` super-Fibonacci rotations),
   the translation matching the centres of the two body masks and, for the special rotations, the
   centres of the two image grids; when the two bodies differ in extent along an axis (partial field
   of view), the smaller one slides along the larger one in ``slide_step_mm`` steps.
3. Score (:class:`Scorer`): mutual information from a joint histogram, computed both ways (fixed
   samples into the moving image and moving samples into the fixed image) over the points that land
   inside the other image, with the Miller-Madow small-sample correction, times an overlap weight
   ``min(1, overlap / min_overlap_fraction)``, where overlap is the share of the smaller body inside the
   other image's field of view. A tiny overlap therefore cannot win.
4. The best ``n_local`` distinct candidates are polished by a pattern search on the coarse level; the
   best ``n_refine`` distinct ones by the same pattern search on the fine level (same score, so the
   refinement cannot trade the chosen basin for another metric's); the winner is polished once more on a
   ``final_spacing_mm`` level with more bins and samples. The pipeline's engine refines further.

Every candidate and score goes into ``PrealignResult.candidates``. Settings: ``resources/presets/
search.json``, overridden by ``PrealignInputs.options``. Deterministic for a given seed, also on a busy machine:
the budget (``budget_s``) is a count of work, sample points scored (:class:`WorkBudget`), about ``budget_s``
CPU seconds of scoring on the reference machine; the search checks it between steps and stops early (keeping
the best so far) when it runs out.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .. import parallel
from ..errors import InputError
from ..geometry import image_space, resample, transforms
from ..geometry.masks import foreground_mask, padding_value
from ..geometry.transforms import rotation_vector_matrix
from ..progress import Progress
from ..resource_files import load_settings
from .base import PrealignInputs, PrealignResult

#: Sample points scored per CPU second of scoring on the reference machine (2-core Xeon, numpy 2.4; the phantom
#: pair's search scored 28.6 M sample points in 2.6-2.7 s of scoring CPU at load 5.5, 2026-11-30; rounded up for a
#: quiet machine, so the budget binds no earlier than the CPU-time budget it replaces): turns ``budget_s`` into a
#: count of work. Until 2026-11-30 the budget was CPU seconds (``time.process_time``), which a busy machine
#: inflates, so the steps cut, and the result, depended on the load.
WORK_PER_SECOND = 1.2e7


class WorkBudget:
    """The search's budget as work: sample points scored (each scored pose maps and interpolates the samples of
    both levels, :class:`Scorer`). Deterministic: the same inputs stop at the same step on any machine."""

    def __init__(self, limit: float):
        self.limit = float(limit)
        self.spent = 0.0

    @staticmethod
    def from_seconds(seconds: float) -> WorkBudget:
        """The budget of ``seconds`` of scoring on the reference machine (:data:`WORK_PER_SECOND`)."""
        return WorkBudget(float(seconds) * WORK_PER_SECOND)

    def spend(self, work: float) -> None:
        self.spent += float(work)

    def left(self, until: float | None = None) -> bool:
        """True while less than ``until`` (default the limit) has been spent."""
        return self.spent < (self.limit if until is None else until)


#: Minimum number of samples inside the other image for a score to count (else 0): below this the
#: histogram (16 x 16 bins) is too sparse for MI, even with the Miller-Madow correction.
MIN_SAMPLES = 128


def default_options() -> dict:
    """The defaults from ``resources/presets/search.json`` (keys starting with ``_`` dropped)."""
    return load_settings("presets", "search.json")


#: Options that are lengths (mm). Their defaults are set for human anatomy (a field of view of
#: ``reference_extent_mm`` or more); for smaller objects they shrink in proportion
#: (see :func:`image_space.object_scale`).
LENGTH_OPTIONS = ("coarse_spacing_mm", "fine_spacing_mm", "final_spacing_mm", "rim_mm", "slide_step_mm",
                  "slide_min_difference_mm", "distinct_mm", "local_start_step_mm", "fine_start_step_mm",
                  "final_start_step_mm")


def scaled_options(options: dict, scale: float, user_keys) -> dict:
    """``options`` with the length options not set by the user multiplied by ``scale``."""
    out = dict(options)
    for key in LENGTH_OPTIONS:
        if key not in user_keys:
            out[key] = options[key] * scale
    return out


def resolve_options(options: dict | None) -> dict:
    """Defaults overridden by ``options``; unknown keys and bad values raise InputError."""
    resolved = default_options()
    for key, value in (options or {}).items():
        if key not in resolved:
            raise InputError(f"Unknown search option '{key}'", "use one of " + ", ".join(sorted(resolved)))
        try:
            value = type(resolved[key])(value)
        except (TypeError, ValueError):
            raise InputError(f"Search option '{key}' must be a number, got {value!r}",
                             f"use e.g. {key}={resolved[key]}") from None
        if value < 0 or (value == 0 and key not in ("rim_mm", "turn_probes")):
            raise InputError(f"Search option '{key}' must be positive, got {value}", f"use e.g. {key}={resolved[key]}")
        resolved[key] = value
    if resolved["coarse_spacing_mm"] < resolved["fine_spacing_mm"]:
        raise InputError("Search option coarse_spacing_mm must be >= fine_spacing_mm",
                         "use e.g. coarse_spacing_mm=6, fine_spacing_mm=3")
    if resolved["histogram_bins"] < 4:
        raise InputError("Search option histogram_bins must be >= 4", "use e.g. histogram_bins=16")
    return resolved


# ------------------------------------------------------------------------------------------ levels
@dataclass
class Level:
    """One image at one working spacing, ready for scoring (physical LPS mm throughout)."""

    image: sitk.Image  # float32, box-averaged
    mask: sitk.Image  # UInt8 body mask on the same grid
    region_mask: sitk.Image  # UInt8 body + rim (where sample points come from)
    scaled: np.ndarray  # (z, y, x) float32 intensities scaled to [0, bins-1]
    index_from_physical: np.ndarray  # 3x4: continuous index (x, y, z) = M[:, :3] @ p + M[:, 3]
    size_xyz: np.ndarray
    points: np.ndarray  # N x 3 sample points (mask + rim), physical
    points_t: np.ndarray  # 3 x N, the same (contiguous, for batched matrix products)
    point_bins: np.ndarray  # N intensity bins of the sample points
    point_in_body: np.ndarray  # N bool: inside the mask (the rim is not)
    body_centroid: np.ndarray
    body_axes: np.ndarray  # 3x3, columns, largest variance first
    body_points: np.ndarray  # up to 600 body voxel centres (extent estimates)
    body_volume_mm3: float
    geometric_center: np.ndarray
    has_body: bool = True
    info: dict = field(default_factory=dict)


def shrink_factors(spacing, target_mm: float, size=None) -> list[int]:
    """Integer BinShrink factors that bring ``spacing`` (mm) close to ``target_mm`` (never below 1; never above
    ``size``, the image's voxel counts, so a slab thinner than ``target_mm`` keeps one voxel instead of failing)."""
    factors = [max(1, int(round(target_mm / float(s)))) for s in spacing]
    return factors if size is None else [min(f, max(1, int(n))) for f, n in zip(factors, size)]


def _index_from_physical(image: sitk.Image) -> np.ndarray:
    """3x4 matrix M with continuous index (x, y, z) = M[:, :3] @ p + M[:, 3] for a physical point p (LPS mm)."""
    a, origin = image_space.index_to_physical_matrix(image)
    inv = np.linalg.inv(a)
    return np.hstack([inv, (-inv @ origin)[:, None]])


def _voxel_points(image: sitk.Image, idx_zyx: np.ndarray) -> np.ndarray:
    """Physical centres (LPS mm) of voxels given as (z, y, x) array indices."""
    return image_space.index_to_physical_points(image, idx_zyx[:, ::-1].astype(float))


def make_level(image: sitk.Image, target_mm: float, bins: int, max_points: int, rim_mm: float,
               seed: int, masks_from: Level | None = None) -> Level:
    """Box-average ``image`` to about ``target_mm`` and prepare masks, scaled intensities and samples.

    ``masks_from``: a (coarser) level of the same image whose body and body+rim masks are resampled
    (nearest neighbour) instead of thresholding and dilating again at this level.
    """
    factors = shrink_factors(image.GetSpacing(), target_mm, image.GetSize())
    small, array = _box_averaged(image, factors)
    body, body_image, region, region_image, has_body = _body_and_region(small, array, rim_mm, masks_from)
    scaled, lo, hi = _scaled_intensities(small, array, region, bins)
    rng = np.random.default_rng(seed)  # one stream: region samples first, then the body subsamples
    points, point_bins, point_in_body = _region_samples(small, region, body, scaled, max_points, rng)
    centroid, axes, body_points, volume = _body_shape(small, body, rng)
    info = {"shrink_factors": factors, "spacing_mm": [round(s, 3) for s in small.GetSpacing()],
            "size": list(small.GetSize()), "intensity_range": [round(lo, 2), round(hi, 2)],
            "samples": int(points.shape[0]), "body_volume_ml": round(volume / 1000.0, 2), "body_found": has_body}
    return Level(small, body_image, region_image, scaled, _index_from_physical(small),
                 np.asarray(small.GetSize(), float), points, np.ascontiguousarray(points.T), point_bins,
                 point_in_body, centroid, axes, body_points, volume, image_space.image_center(small), has_body, info)


def _box_averaged(image: sitk.Image, factors: list[int]) -> tuple[sitk.Image, np.ndarray]:
    """Float32 copy box-averaged by ``factors`` and its (z, y, x) array, CT padding kept as padding."""
    small = resample.float32_bin_shrink(image, factors)
    pad = padding_value(small)
    if pad is None:
        return small, sitk.GetArrayViewFromImage(small)  # read only; ``small`` (kept by the level) owns it
    # Box averaging mixes CT padding (-2048...) into the voxels along the reconstruction circle; such values look
    # like "darker than air" tissue to a threshold and to the histograms. Those voxels become padding too (one
    # voxel around every padded one).
    array = sitk.GetArrayFromImage(small)
    valid_image = _mask_from_array(array > pad + 0.5, small)
    valid = sitk.GetArrayFromImage(sitk.BinaryErode(valid_image, [1, 1, 1], sitk.sitkBox, 0, 1, True)) > 0
    array[~valid] = pad
    cleaned = sitk.GetImageFromArray(array)
    cleaned.CopyInformation(small)
    return cleaned, array


def _body_and_region(small: sitk.Image, array: np.ndarray, rim_mm: float, masks_from: Level | None) -> tuple:
    """(body array, body image, body+rim array, body+rim image, body found) on ``small``'s grid.

    The body is thresholded (``masks_from`` None) or resampled from a coarser level; with no object found
    every voxel counts as body (recorded, reported as a warning).
    """
    if masks_from is not None:
        body = _resampled_mask(masks_from.mask, small)
    else:
        body = sitk.GetArrayFromImage(foreground_mask(small, working_spacing_mm=None)) > 0
    has_body = int(body.sum()) >= 27
    if not has_body:
        body = np.ones(array.shape, bool)
    body_image = _mask_from_array(body, small)
    if masks_from is not None:
        region = _resampled_mask(masks_from.region_mask, small) | body
        region_image = _mask_from_array(region, small)
    else:
        radius = [max(0, int(round(rim_mm / s))) for s in small.GetSpacing()]
        region_image = sitk.BinaryDilate(body_image, radius, sitk.sitkBall) if max(radius) > 0 else body_image
        region = sitk.GetArrayFromImage(region_image) > 0
    return body, body_image, region, region_image, has_body


def _scaled_intensities(small: sitk.Image, array: np.ndarray, region: np.ndarray,
                        bins: int) -> tuple[np.ndarray, float, float]:
    """Intensities scaled to [0, bins-1] over the robust range (0.5-99.5 percentiles) inside ``region``."""
    pad = padding_value(small)
    valid = array > pad + 0.5 if pad is not None else np.ones(array.shape, bool)
    values = array[region & valid]
    if values.size < 10:
        values = array.ravel()
    lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    if hi <= lo:
        hi = lo + 1.0
    scaled = np.subtract(array, np.float32(lo), dtype=np.float32)  # in place from here on: one array, not four
    scaled *= np.float32(1.0 / (hi - lo))
    np.clip(scaled, 0.0, 1.0, out=scaled)
    scaled *= np.float32(bins - 1)
    return scaled, lo, hi


def _region_samples(small: sitk.Image, region: np.ndarray, body: np.ndarray, scaled: np.ndarray,
                    max_points: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample points (physical, at most ``max_points`` of the body+rim voxels), their bins, in-body flags."""
    idx = _nonzero_subsample(region, max_points, rng)
    points = _voxel_points(small, idx)
    point_bins = np.floor(scaled[idx[:, 0], idx[:, 1], idx[:, 2]] + 0.5).astype(np.int64)
    point_in_body = body[idx[:, 0], idx[:, 1], idx[:, 2]]
    return points, point_bins, point_in_body


def _body_shape(small: sitk.Image, body: np.ndarray, rng: np.random.Generator) -> tuple:
    """(centroid, principal axes, up to 600 body voxel centres, volume mm3) of the body mask."""
    volume = float(np.count_nonzero(body) * np.prod(small.GetSpacing()))
    # centroid and axes from a (seeded) subsample: the same to a fraction of a mm
    body_idx = _nonzero_subsample(body, 200_000, rng)
    centroid, axes = _centroid_and_axes(_voxel_points(small, body_idx))
    if body_idx.shape[0] > 600:
        body_idx = body_idx[np.sort(rng.choice(body_idx.shape[0], 600, replace=False))]
    return centroid, axes, _voxel_points(small, body_idx), volume


def _nonzero_subsample(mask: np.ndarray, most: int, rng: np.random.Generator) -> np.ndarray:
    """``np.argwhere(mask)`` (z, y, x rows), or ``most`` of its rows drawn by ``rng`` in their order; the flat
    indices are drawn from, not the N x 3 rows (a third of the memory on a 1024^3 microCT's levels)."""
    flat = np.flatnonzero(mask)
    if flat.shape[0] > most:
        flat = flat[np.sort(rng.choice(flat.shape[0], most, replace=False))]
    return np.stack(np.unravel_index(flat, mask.shape), axis=1)


def _centroid_and_axes(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid and principal axes (columns, largest variance first) of N x 3 points."""
    centroid = points.mean(0)
    centred = points - centroid
    cov = centred.T @ centred / max(points.shape[0] - 1, 1)
    variances, axes = np.linalg.eigh(cov)
    return centroid, axes[:, np.argsort(variances)[::-1]]


def _resampled_mask(mask: sitk.Image, reference: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                sitk.sitkUInt8)) > 0


def _mask_from_array(mask: np.ndarray, like: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(mask.astype(np.uint8))
    out.CopyInformation(like)
    return out


# ------------------------------------------------------------------------------------------ scoring
class Scorer:
    """Scores batches of rigid poses (K x 4 x 4, fixed->moving) between two levels. Higher is better."""

    def __init__(self, fixed: Level, moving: Level, bins: int, min_overlap_fraction: float,
                 budget: WorkBudget | None = None):
        self.fixed, self.moving, self.bins = fixed, moving, bins
        self.min_overlap = float(min_overlap_fraction)
        self.evaluations = 0
        #: where the work is counted (None: not counted); the work of one pose is both levels' sample points
        self.budget = budget
        self.pose_work = int(fixed.points.shape[0] + moving.points.shape[0])
        self.fixed_body_n = max(1, int(fixed.point_in_body.sum()))
        self.moving_body_n = max(1, int(moving.point_in_body.sum()))

    def _one_way(self, source: Level, target: Level, mats: np.ndarray, body_n: int) -> tuple[np.ndarray, ...]:
        """MI (Miller-Madow corrected), sample count and covered share of ``source``'s body."""
        k, b = mats.shape[0], self.bins
        w = target.index_from_physical
        g = w[:, :3] @ mats[:, :3, :3]  # K x 3 x 3: physical -> target index
        h = mats[:, :3, 3] @ w[:, :3].T + w[:, 3]  # K x 3
        idx = g @ source.points_t + h[:, :, None]  # K x 3 x N (continuous x, y, z index)
        upper = target.size_xyz - 1.0
        inside = np.all(idx >= 0.0, axis=1) & np.all(idx <= upper[None, :, None], axis=1)  # K x N
        coords = np.stack([idx[:, 2][inside], idx[:, 1][inside], idx[:, 0][inside]])
        values = ndimage.map_coordinates(target.scaled, coords, order=1, mode="nearest", prefilter=False)
        keys = (np.arange(k)[:, None] * (b * b) + source.point_bins[None, :] * b)[inside]
        keys += (values + 0.5).astype(np.int64)
        counts = np.bincount(keys, minlength=k * b * b)
        counts = counts.reshape(k, b, b).astype(float)
        mi, n = _mutual_information(counts)
        covered = (inside & source.point_in_body[None, :]).sum(1) / body_n
        return mi, n, covered

    def score(self, mats: np.ndarray, chunk: int = 48) -> dict:
        """Arrays (length K): score, mi (mean of both ways), overlap (share of the smaller body covered)."""
        mats = np.asarray(mats, float).reshape(-1, 4, 4)
        out = {key: np.zeros(mats.shape[0]) for key in ("score", "mi", "overlap")}
        for start in range(0, mats.shape[0], chunk):
            part = mats[start:start + chunk]
            inv = np.linalg.inv(part)
            (mi_f, n_f, cov_f), (mi_m, n_m, cov_m) = parallel.both(
                partial(self._one_way, self.fixed, self.moving, part, self.fixed_body_n),
                partial(self._one_way, self.moving, self.fixed, inv, self.moving_body_n))
            mi = 0.5 * (np.where(n_f >= MIN_SAMPLES, mi_f, 0.0) + np.where(n_m >= MIN_SAMPLES, mi_m, 0.0))
            overlap = np.maximum(cov_f, cov_m)
            weight = np.minimum(1.0, overlap / self.min_overlap)
            sl = slice(start, start + part.shape[0])
            out["score"][sl] = mi * weight
            out["mi"][sl] = mi
            out["overlap"][sl] = overlap
        self.evaluations += mats.shape[0]
        if self.budget is not None:
            self.budget.spend(mats.shape[0] * self.pose_work)
        return out

    def work_left(self, until: float | None = None) -> bool:
        """True while the budget's work is below ``until`` (always True without a budget)."""
        return self.budget is None or self.budget.left(until)


def _mutual_information(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per histogram (K x B x B): MI in nats with the Miller-Madow bias correction, and sample counts."""
    n = counts.sum(axis=(1, 2))
    safe_n = np.maximum(n, 1.0)
    p = counts / safe_n[:, None, None]
    pf, pm = p.sum(2), p.sum(1)

    def entropy(q, axes):
        return -np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0), axis=axes)

    h_joint, h_f, h_m = entropy(p, (1, 2)), entropy(pf, 1), entropy(pm, 1)
    occupied_joint = (counts > 0).sum(axis=(1, 2))
    occupied_f, occupied_m = (pf > 0).sum(1), (pm > 0).sum(1)
    bias = (occupied_f + occupied_m - occupied_joint - 1) / (2.0 * safe_n)
    mi = np.maximum(h_f + h_m - h_joint + bias, 0.0)
    return np.where(n > 0, mi, 0.0), n


# ------------------------------------------------------------------------------------------ rotations
def cube_rotations() -> list[np.ndarray]:
    """The 24 proper rotations that map coordinate axes onto coordinate axes (includes the 180 degree flips)."""
    out = []
    for perm in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
        for signs in np.ndindex(2, 2, 2):
            m = np.zeros((3, 3))
            for row, col in enumerate(perm):
                m[row, col] = 1.0 if signs[row] == 0 else -1.0
            if np.linalg.det(m) > 0:
                out.append(m)
    # identity first, then the three 180 degree flips, then the rest (stable order)
    out.sort(key=lambda m: (-int(np.allclose(np.abs(m), np.eye(3))), -np.trace(m)))
    return out


def super_fibonacci_rotations(n: int) -> list[np.ndarray]:
    """``n`` well-spread rotations (Alexa 2022, super-Fibonacci spirals on the unit quaternions)."""
    phi, psi = math.sqrt(2.0), 1.533751168755204288118041
    s = np.arange(n) + 0.5
    r, big_r = np.sqrt(s / n), np.sqrt(1.0 - s / n)
    alpha, beta = 2.0 * np.pi * s / phi, 2.0 * np.pi * s / psi
    quats = np.stack([r * np.sin(alpha), r * np.cos(alpha), big_r * np.sin(beta), big_r * np.cos(beta)], 1)
    return [_quaternion_matrix(q) for q in quats]


def _quaternion_matrix(q: np.ndarray) -> np.ndarray:
    x, y, z, w = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def principal_axes_rotations(fixed: Level, moving: Level) -> list[np.ndarray]:
    """Rotations taking the fixed body's principal axes onto the moving body's, all 4 proper sign choices."""
    out = []
    for signs in np.ndindex(2, 2, 2):
        s = np.diag([1.0 if v == 0 else -1.0 for v in signs])
        r = moving.body_axes @ s @ fixed.body_axes.T
        if np.linalg.det(r) > 0:
            out.append(r)
    return out


def pose(rotation: np.ndarray, fixed_point: np.ndarray, moving_point: np.ndarray) -> np.ndarray:
    """4x4 fixed->moving: rotate about ``fixed_point`` and send it to ``moving_point``."""
    m = np.eye(4)
    m[:3, :3] = rotation
    m[:3, 3] = np.asarray(moving_point) - rotation @ np.asarray(fixed_point)
    return m


# ------------------------------------------------------------------------------------------ candidates
@dataclass(eq=False)
class Candidate:
    matrix: np.ndarray
    source: str
    stage: str = "global"
    score: float = float("nan")
    mi: float = float("nan")
    overlap: float = float("nan")
    parent: int | None = None

    def record(self, with_pose: bool) -> dict:
        out = {"stage": self.stage, "source": self.source, "score": round(float(self.score), 5),
               "overlap": round(float(self.overlap), 3)}
        if with_pose:
            m = self.matrix
            out["mi"] = round(float(self.mi), 5)
            out["rotation_deg"] = round(transforms.rotation_angle_deg(m), 2)
            out["matrix_4x4"] = [[round(float(v), 5) for v in row] for row in m[:3]]
        if self.parent is not None:
            out["from"] = self.parent
        return out


def slide_offsets(rotation: np.ndarray, fixed: Level, moving: Level, options: dict) -> list[tuple[str, np.ndarray]]:
    """Offsets (fixed space, mm) of the smaller body along the larger one when their extents differ.

    For each LPS axis, the moving body (rotated into the fixed frame) and the fixed body are compared
    relative to their centroids; when the lengths differ by more than ``slide_min_difference_mm`` the
    offset runs over the whole range where the shorter one stays inside the longer one.
    """
    rel_f = fixed.body_points - fixed.body_centroid
    rel_m = (moving.body_points - moving.body_centroid) @ rotation  # R^T (p - c), row form
    axes_ranges = []
    for axis in range(3):
        f_lo, f_hi = np.percentile(rel_f[:, axis], [1, 99])
        m_lo, m_hi = np.percentile(rel_m[:, axis], [1, 99])
        lo, hi = sorted((f_lo - m_lo, f_hi - m_hi))
        if hi - lo >= options["slide_min_difference_mm"]:
            axes_ranges.append((axis, lo, hi))
    if not axes_ranges:
        return []
    step = float(options["slide_step_mm"])
    while True:  # coarser steps until the grid of offsets fits max_slide_positions
        counts = [int(math.floor((hi - lo) / step)) + 1 for _, lo, hi in axes_ranges]
        if int(np.prod(counts)) <= max(2, int(options["max_slide_positions"])):
            break
        step *= 1.15
    per_axis = [[(axis, v) for v in np.linspace(lo, hi, max(count, 2))]
                for (axis, lo, hi), count in zip(axes_ranges, counts)]
    offsets = []
    for combo in np.ndindex(*[len(p) for p in per_axis]):
        delta = np.zeros(3)
        label = []
        for which, i in enumerate(combo):
            axis, value = per_axis[which][i]
            delta[axis] = value
            label.append(f"{'LPS'[axis]}{value:+.0f}")
        offsets.append(("slide " + " ".join(label), delta))
    return offsets


def global_candidates(fixed: Level, moving: Level, options: dict) -> list[Candidate]:
    """Header, flips, principal axes and a rotation grid, each with centroid/centre/sliding translations."""
    cands = [Candidate(np.eye(4), "header")]
    special = [(f"cube{i}", r) for i, r in enumerate(cube_rotations())]
    special += [(f"axes{i}", r) for i, r in enumerate(principal_axes_rotations(fixed, moving))]
    grid = [(f"grid{i}", r) for i, r in enumerate(super_fibonacci_rotations(int(options["rotation_grid_size"])))]
    for name, r in special:
        cands.append(Candidate(pose(r, fixed.body_centroid, moving.body_centroid), f"{name} body-centres"))
        cands.append(Candidate(pose(r, fixed.geometric_center, moving.geometric_center), f"{name} image-centres"))
    for name, r in grid:
        cands.append(Candidate(pose(r, fixed.body_centroid, moving.body_centroid), f"{name} body-centres"))
    for name, r in special + grid:
        for label, delta in slide_offsets(r, fixed, moving, options):
            cands.append(Candidate(pose(r, fixed.body_centroid + delta, moving.body_centroid), f"{name} {label}"))
    return cands


# ------------------------------------------------------------------------------------------ local search
def distinct(cands: list[Candidate], points: np.ndarray, distance_mm: float, limit: int,
             per_rotation: int | None = None) -> list[Candidate]:
    """Best-first candidates whose poses move ``points`` more than ``distance_mm`` (mean) from each other.

    ``per_rotation`` caps how many come from one starting rotation (the first word of ``source``, e.g.
    ``grid6``): slid copies of one rotation are far apart in translation and could otherwise take every slot.
    """
    chosen: list[Candidate] = []
    moved: list[np.ndarray] = []
    per_family: dict[str, int] = {}
    for cand in sorted(cands, key=lambda c: -c.score):
        family = cand.source.split()[0]
        if per_rotation is not None and per_family.get(family, 0) >= per_rotation:
            continue
        here = points @ cand.matrix[:3, :3].T + cand.matrix[:3, 3]
        if all(np.mean(np.linalg.norm(here - other, axis=1)) > distance_mm for other in moved):
            chosen.append(cand)
            moved.append(here)
            per_family[family] = per_family.get(family, 0) + 1
            if len(chosen) >= limit:
                break
    return chosen


def overlap_center(matrix: np.ndarray, fixed: Level, moving: Level) -> np.ndarray:
    """Centroid (fixed space) of the fixed body points that land inside the moving image."""
    idx = fixed.body_points @ (moving.index_from_physical[:, :3] @ matrix[:3, :3]).T
    idx += moving.index_from_physical[:, :3] @ matrix[:3, 3] + moving.index_from_physical[:, 3]
    inside = np.all((idx >= 0) & (idx <= moving.size_xyz - 1), axis=1)
    if inside.sum() < 10:
        inv = np.linalg.inv(matrix)
        return moving.body_centroid @ inv[:3, :3].T + inv[:3, 3]
    return fixed.body_points[inside].mean(0)


def perturbed(matrix: np.ndarray, center: np.ndarray, rotvec_deg, shift_mm) -> np.ndarray:
    """``matrix`` after a small rotation about ``center`` and a shift, both applied in fixed space first."""
    r = rotation_vector_matrix(np.radians(np.asarray(rotvec_deg, float)))
    local = np.eye(4)
    local[:3, :3] = r
    local[:3, 3] = center + np.asarray(shift_mm, float) - r @ center
    return matrix @ local


def pattern_search(start: np.ndarray, scorer: Scorer, center: np.ndarray, step_deg: float, step_mm: float,
                   min_step_deg: float, until: float | None = None, max_rounds: int = 40) -> tuple[np.ndarray, dict]:
    """Coordinate pattern search over 3 rotations (degrees) and 3 shifts (mm); steps halve on failure; stops when
    ``scorer``'s budget has spent ``until`` (work, :class:`WorkBudget`)."""
    best = start
    best_out = scorer.score(best[None])
    best_score = float(best_out["score"][0])
    rounds = 0
    while step_deg >= min_step_deg and rounds < max_rounds and scorer.work_left(until):
        rounds += 1
        trials = []
        for axis in range(3):
            for sign in (-1.0, 1.0):
                rot = np.zeros(3)
                rot[axis] = sign * step_deg
                trials.append(perturbed(best, center, rot, np.zeros(3)))
        for axis in range(3):
            for sign in (-1.0, 1.0):
                shift = np.zeros(3)
                shift[axis] = sign * step_mm
                trials.append(perturbed(best, center, np.zeros(3), shift))
        out = scorer.score(np.stack(trials))
        # combined move: the better sign on every coordinate that improved
        gains = out["score"].reshape(6, 2) - best_score
        rot, shift = np.zeros(3), np.zeros(3)
        for axis in range(6):
            sign_index = int(np.argmax(gains[axis]))
            if gains[axis, sign_index] > 0:
                value = (-1.0, 1.0)[sign_index]
                if axis < 3:
                    rot[axis] = value * step_deg
                else:
                    shift[axis - 3] = value * step_mm
        combined = perturbed(best, center, rot, shift)
        combined_out = scorer.score(combined[None])
        i = int(np.argmax(out["score"]))
        candidates = [(float(out["score"][i]), trials[i], {k: out[k][i] for k in out}),
                      (float(combined_out["score"][0]), combined, {k: combined_out[k][0] for k in combined_out})]
        value, matrix, detail = max(candidates, key=lambda c: c[0])
        if value > best_score + 1e-6:
            best, best_score, best_out = matrix, value, {k: np.array([v]) for k, v in detail.items()}
        else:
            step_deg, step_mm = step_deg / 2.0, step_mm / 2.0
    return best, {k: float(np.asarray(v).ravel()[0]) for k, v in best_out.items()}


# ------------------------------------------------------------------------------------------ entry point
@dataclass
class _Run:
    """What the steps of one search share: options, the work budget, warnings, step timings (s), progress."""

    options: dict
    cpu_started: float
    progress: Progress
    budget: WorkBudget
    warnings: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    lap_started: float = 0.0

    def budget_share(self, share: float) -> float:
        """The work spent when ``share`` of the budget is used."""
        return share * self.budget.limit

    @property
    def deadline(self) -> float:
        return self.budget.limit

    def within(self, until: float | None = None) -> bool:
        """True while the work spent is below ``until`` (default the whole budget)."""
        return self.budget.left(until)

    def deadline_or_soon(self) -> float:
        """The budget, or 0.2 s of work (reference machine) more when it is spent (one more step still gets a
        little)."""
        return max(self.deadline, self.budget.spent + 0.2 * WORK_PER_SECOND)

    def lap(self, name: str) -> None:
        """Record the wall time (s) since the previous lap as ``timings[name]``."""
        self.timings[name] = round(time.perf_counter() - self.lap_started, 3)
        self.lap_started = time.perf_counter()

    def refine(self, matrix: np.ndarray, scorer: Scorer, steps: str, until: float) -> tuple[np.ndarray, dict]:
        """Pattern search on ``scorer``'s level about the overlap centre, with the ``steps`` option set
        (``local``, ``fine`` or ``final``: ``<steps>_start_step_deg/_mm``, ``<steps>_min_step_deg``)."""
        center = overlap_center(matrix, scorer.fixed, scorer.moving)
        o = self.options
        return pattern_search(matrix, scorer, center, o[f"{steps}_start_step_deg"], o[f"{steps}_start_step_mm"],
                              o[f"{steps}_min_step_deg"], until)


def prealign(inputs: PrealignInputs) -> PrealignResult:
    """Global rigid search; the result maps fixed physical LPS points to moving ones (Euler3DTransform)."""
    started = time.perf_counter()
    run, scale = _start_run(inputs)
    run.progress.report("prealign", 0.15, "search: preparing coarse copies")
    run.lap_started = time.perf_counter()
    # the images as given: an 8/16-bit image is box-averaged by integer block sums, the values of a float32 copy
    coarse, fine = _prepare_levels(inputs.fixed, inputs.moving, inputs.seed, run)
    cands, global_scored = _score_global_candidates(coarse, run)
    probe = coarse.fixed.body_points[:: max(1, coarse.fixed.body_points.shape[0] // 60)]
    local, local_starts = _local_search(cands, global_scored, coarse, probe, run)
    finals = _refine_on_fine_level(local or local_starts, fine, probe, run)
    best = max(finals, key=lambda c: c.score)
    if run.options["turn_probes"] and run.within():
        turned = _turn_probes(best, coarse, fine, run)
        best = max([best] + turned, key=lambda c: c.score)
        finals += turned
        run.lap("turn_s")
    if run.options["final_spacing_mm"] < run.options["fine_spacing_mm"] and run.within(
            run.deadline - 0.5 * WORK_PER_SECOND):
        best = _polish_on_final_level(best, inputs.fixed, inputs.moving, inputs.seed, coarse, run)
        finals.append(best)
        run.lap("final_s")
    transform = transforms.rigid_from_matrix(best.matrix, center=fine.fixed.body_centroid)
    total = round(time.perf_counter() - started, 3)
    run.timings["total_s"] = total
    run.timings["cpu_s"] = round(time.process_time() - run.cpu_started, 3)
    records = _candidate_records(global_scored, local + finals, int(run.options["max_recorded_candidates"]))
    details = _search_details(run, scale, best, len(cands), global_scored, coarse, fine)
    run.progress.report("prealign", 0.95, f"search: done in {total:.1f} s (score {best.score:.3f})")
    return PrealignResult("search", transform, details, run.warnings, records)


def _start_run(inputs: PrealignInputs) -> tuple[_Run, float]:
    """The run state with the resolved options, lengths scaled to the object size; and that scale."""
    cpu_started = time.process_time()
    options = resolve_options(inputs.options)
    scale = image_space.object_scale(inputs.fixed, inputs.moving, options["reference_extent_mm"])
    options = scaled_options(options, scale, set(inputs.options or {}))
    if options["coarse_spacing_mm"] < options["fine_spacing_mm"]:
        options["coarse_spacing_mm"] = options["fine_spacing_mm"]
    return _Run(options, cpu_started, inputs.progress, WorkBudget.from_seconds(options["budget_s"])), scale


def _prepare_levels(fixed_image: sitk.Image, moving_image: sitk.Image, seed: int, run: _Run) -> tuple[Scorer, Scorer]:
    """Coarse and fine levels of both images, as the coarse and the fine scorer."""
    options, bins = run.options, int(run.options["histogram_bins"])

    def levels(image: sitk.Image, level_seed: int) -> tuple[Level, Level]:
        # the coarse level first (its body mask is cheap), then the fine level reusing that mask
        fine_image = resample.float32_bin_shrink(image, shrink_factors(image.GetSpacing(), options["fine_spacing_mm"],
                                                                       image.GetSize()))
        coarse = make_level(fine_image, options["coarse_spacing_mm"], bins, int(options["max_points_coarse"]),
                            options["rim_mm"], level_seed)
        fine = make_level(fine_image, options["fine_spacing_mm"], bins, int(options["max_points_fine"]),
                          options["rim_mm"], level_seed, coarse)
        return fine, coarse

    (fixed_fine, fixed_coarse), (moving_fine, moving_coarse) = parallel.both(
        lambda: levels(fixed_image, seed), lambda: levels(moving_image, seed + 1))
    for name, level in (("fixed", fixed_coarse), ("moving", moving_coarse)):
        if not level.has_body:
            run.warnings.append(f"search: no object found in the {name} image by thresholding; scored all voxels")
    run.lap("prepare_s")
    return (Scorer(fixed_coarse, moving_coarse, bins, options["min_overlap_fraction"], run.budget),
            Scorer(fixed_fine, moving_fine, bins, options["min_overlap_fraction"], run.budget))


def _score_global_candidates(coarse: Scorer, run: _Run) -> tuple[list[Candidate], list[Candidate]]:
    """Step 1: (all global candidates, the ones scored), scored in order until half the budget is used."""
    cands = global_candidates(coarse.fixed, coarse.moving, run.options)
    global_deadline = run.budget_share(0.5)
    scored = 0
    chunk = 96
    for begin in range(0, len(cands), chunk):
        part = cands[begin:begin + chunk]
        out = coarse.score(np.stack([c.matrix for c in part]))
        for i, c in enumerate(part):
            c.score, c.mi, c.overlap = float(out["score"][i]), float(out["mi"][i]), float(out["overlap"][i])
        scored += len(part)
        if not run.within(global_deadline):
            break
    if scored < len(cands):
        run.warnings.append(f"search: time budget reached; scored {scored} of {len(cands)} global candidates")
    run.progress.report("prealign", 0.5, f"search: {scored} poses scored")
    run.lap("global_s")
    return cands, cands[:scored]


def _local_search(cands: list[Candidate], global_scored: list[Candidate], coarse: Scorer, probe: np.ndarray,
                  run: _Run) -> tuple[list[Candidate], list[Candidate]]:
    """Step 2: (results, starts) of the coarse-level pattern search from the best distinct global candidates."""
    options = run.options
    local_starts = distinct(global_scored, probe, options["distinct_mm"], int(options["n_local"]),
                            int(options["n_local_per_rotation"]))
    local: list[Candidate] = []
    local_deadline = run.budget_share(0.75)
    for start in local_starts:
        if not run.within(local_deadline) and local:
            run.warnings.append("search: time budget reached during local search")
            break
        matrix, out = run.refine(start.matrix, coarse, "local", local_deadline)
        local.append(Candidate(matrix, start.source, "local", out["score"], out["mi"], out["overlap"],
                               parent=cands.index(start)))
    run.lap("local_s")
    return local, local_starts


def _refine_on_fine_level(starts: list[Candidate], fine: Scorer, probe: np.ndarray, run: _Run) -> list[Candidate]:
    """Step 3: the same pattern search with finer steps on the fine level, from the best distinct starts."""
    to_refine = distinct(starts, probe, run.options["distinct_mm"], int(run.options["n_refine"]))
    finals: list[Candidate] = []
    for cand in to_refine:
        if not run.within() and finals:
            run.warnings.append("search: time budget reached during refinement")
            break
        matrix, out = run.refine(cand.matrix, fine, "fine", run.deadline_or_soon())
        finals.append(Candidate(matrix, cand.source, "refined", out["score"], out["mi"], out["overlap"]))
    run.lap("refine_s")
    return finals


def _turn_probes(best: Candidate, coarse: Scorer, fine: Scorer, run: _Run) -> list[Candidate]:
    """Step 3b: the winner turned 180 degrees about each principal axis of the fixed body (through the overlap
    centre), refined the same way: a near-symmetric object can lead every global candidate into the
    upside-down basin, and the right one is then a single turn away."""
    turned: list[Candidate] = []
    center = overlap_center(best.matrix, fine.fixed, fine.moving)
    for axis in range(3):
        if not run.within():
            run.warnings.append("search: time budget reached during the 180 degree turn probes")
            break
        start = perturbed(best.matrix, center, np.degrees(np.pi * coarse.fixed.body_axes[:, axis]), np.zeros(3))
        matrix, _ = run.refine(start, coarse, "local", run.deadline_or_soon())
        matrix, out = run.refine(matrix, fine, "fine", run.deadline_or_soon())
        turned.append(Candidate(matrix, f"{best.source} turned 180 about body axis {axis}", "turned",
                                out["score"], out["mi"], out["overlap"]))
    return turned


def _polish_on_final_level(best: Candidate, fixed_image: sitk.Image, moving_image: sitk.Image, seed: int,
                           coarse: Scorer, run: _Run) -> Candidate:
    """Step 4: the winner polished on a finer level (more bins and samples)."""
    options = run.options
    final_bins = int(options["final_histogram_bins"])
    fixed_final, moving_final = parallel.both(
        lambda: make_level(fixed_image, options["final_spacing_mm"], final_bins, int(options["max_points_final"]),
                           options["rim_mm"], seed, coarse.fixed),
        lambda: make_level(moving_image, options["final_spacing_mm"], final_bins, int(options["max_points_final"]),
                           options["rim_mm"], seed + 1, coarse.moving))
    final_scorer = Scorer(fixed_final, moving_final, final_bins, options["min_overlap_fraction"], run.budget)
    matrix, out = run.refine(best.matrix, final_scorer, "final", run.deadline_or_soon())
    return Candidate(matrix, best.source, "final", out["score"], out["mi"], out["overlap"])


def _candidate_records(global_scored: list[Candidate], later: list[Candidate], max_recorded: int) -> list[dict]:
    """JSON records of every scored candidate (poses for the ``max_recorded`` best global ones and all later)."""
    ranked = sorted(global_scored, key=lambda c: -c.score)
    top_ids = {id(c) for c in ranked[:max_recorded]}
    records = [c.record(with_pose=id(c) in top_ids) for c in global_scored]
    return records + [c.record(with_pose=True) for c in later]


def _search_details(run: _Run, scale: float, best: Candidate, n_candidates: int, global_scored: list[Candidate],
                    coarse: Scorer, fine: Scorer) -> dict:
    """The ``details`` block of report.json for the search."""
    ranked = sorted(global_scored, key=lambda c: -c.score)
    second = [c for c in ranked[1:] if c is not ranked[0]]
    return {
        "description": "global rigid search (flips, principal axes, rotation grid, sliding for partial field "
                       "of view) scored by overlap-weighted mutual information, then local and MI refinement",
        "options": run.options,
        "object_scale": round(scale, 4),
        "chosen": best.record(with_pose=True),
        "chosen_stage": best.stage,
        "global_candidates": n_candidates, "global_scored": len(global_scored),
        "evaluations": {"coarse": coarse.evaluations, "fine": fine.evaluations},
        "best_global_score": round(float(ranked[0].score), 5) if ranked else None,
        "second_global_score": round(float(second[0].score), 5) if second else None,
        "levels": {"fixed_fine": fine.fixed.info, "moving_fine": fine.moving.info,
                   "fixed_coarse": coarse.fixed.info, "moving_coarse": coarse.moving.info},
        "timings_s": run.timings, "budget_s": run.options["budget_s"],
        "budget_work": {"unit": "sample points scored", "limit": round(run.budget.limit),
                        "spent": round(run.budget.spent)},
        "convention": "fixed->moving, physical LPS mm",
    }
