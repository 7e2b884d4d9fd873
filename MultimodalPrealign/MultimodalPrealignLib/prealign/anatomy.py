"""Anatomy pre-alignment: a robust rigid (or similarity) fit between TotalSegmentator structures.

Inputs are two label maps (on their images' grids) with TotalSegmentator class ids; the task of each
(``total``, ``total_mr``, ...) is given or inferred (:mod:`..io.labels`). The steps:

1. Structures are matched by NAME using ``resources/structure_correspondence.json``: the names both
   tasks share, plus groups (CT lung lobes -> MR ``lung_left``/``lung_right``, CT ``vertebrae_C1..S1``
   -> MR ``vertebrae``...). Class ids never matter.
2. Per structure and image: voxel count, volume, centroid, principal axes, and the image borders it
   touches. A structure cut by a field of view has a biased centroid: it is never trusted as a whole.
3. Hypotheses from RANSAC over triples of structures (closed-form Kabsch/Umeyama on centroids;
   any rotation, including head-first/feet-first flips). Structures cut by a border only constrain
   the directions parallel to that border (the component along the cut normal is ignored). The best
   hypothesis is refined by robust (soft-L1) least squares.
4. Truncation made consistent: with the current transform, each structure is reduced to the part
   that BOTH images show (fixed voxels that map inside the moving field of view and moving voxels that
   map back inside the fixed one) and the fit is repeated on those centroids until it settles. Cut
   structures stay down-weighted; ones with too little in common are rejected; outliers (residual
   far above the others) are rejected and the fit repeated.
5. Fewer than 3 usable non-collinear structures: translation only, with a warning.
6. Optional refinement that maximises the overlap of corresponding labels (independent of the image
   modality); kept only when the mean Dice in the common field of view improves.

The transform maps FIXED physical points to MOVING physical points (LPS mm, ITK resampling direction).
``details`` (report.json) lists every structure: used or rejected and why, truncation, per-structure
residuals (mm) and Dice before (headers) and after.

Options (``PrealignInputs.options``, key ``anatomy`` holding a dict, or flat keys ``anatomy_<name>``):
see :data:`DEFAULTS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache
from itertools import combinations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.optimize import least_squares, minimize
from scipy.spatial.transform import Rotation

from ..errors import InputError
from ..geometry import transforms
from ..geometry.image_space import direction_matrix, index_to_physical_matrix, physical_to_index
from ..geometry.transforms import apply_matrix
from ..io import labels as label_io
from ..resource_files import load_resource_json, load_settings
from .base import PrealignInputs, PrealignResult, rounded

#: Tunable settings (mm, ml, fractions). Override through ``options["anatomy"]`` or ``options["anatomy_<key>"]``.
#: Settings of the fit (documented in resources/presets/anatomy.json, where they live).
DEFAULTS = load_settings("presets", "anatomy.json")


@cache
def correspondence() -> dict:
    """``resources/structure_correspondence.json`` (shared names, groups, weights, excluded names)."""
    return load_resource_json("structure_correspondence.json")


def options_from(inputs: PrealignInputs) -> dict:
    settings = dict(DEFAULTS)
    given = inputs.options or {}
    nested = given.get("anatomy") if isinstance(given.get("anatomy"), dict) else {}
    settings.update({k: v for k, v in nested.items() if k in DEFAULTS})
    settings.update({k[len("anatomy_"):]: v for k, v in given.items()
                     if k.startswith("anatomy_") and k[len("anatomy_"):] in DEFAULTS})
    if settings["transform"] not in ("rigid", "similarity"):
        raise InputError(f"Unknown anatomy transform '{settings['transform']}'", "use rigid or similarity")
    return settings


# -------------------------------------------------------------------------------------- correspondence
def canonical_maps(fixed_names: dict[int, str], moving_names: dict[int, str]) -> tuple[dict, dict]:
    """{label value: canonical name} for each side so that equal canonical names correspond.

    A group (e.g. ``lung_left`` = CT lobes) is used when either side has its coarse name; otherwise fine
    names are matched one to one (e.g. CT vertebrae levels on both sides). Excluded names are dropped.
    """
    table = correspondence()
    excluded = set(table.get("excluded", []))
    fixed_set, moving_set = set(fixed_names.values()), set(moving_names.values())
    rename: dict[str, str] = {}
    for coarse, fine in table["groups"].items():
        if coarse in fixed_set or coarse in moving_set:
            for name in fine:
                rename[name] = coarse

    def mapping(names: dict[int, str]) -> dict[int, str]:
        return {value: rename.get(name, name) for value, name in names.items() if name not in excluded}

    return mapping(fixed_names), mapping(moving_names)


# ------------------------------------------------------------------------------------------ structures
@dataclass
class Structure:
    """One (canonical) structure in one image. Coordinates are physical LPS mm."""

    name: str
    voxels: int
    volume_ml: float
    centroid: np.ndarray
    axes: np.ndarray  # columns, largest spread first
    sd_mm: np.ndarray
    cut_faces: list = field(default_factory=list)  # e.g. ["-z(k)", "+x(i)"]
    cut_normals: list = field(default_factory=list)  # outward unit normals of the touched borders
    points: np.ndarray | None = None  # voxel-centre samples

    def summary(self) -> dict:
        return {"voxels": int(self.voxels), "volume_ml": round(self.volume_ml, 2),
                "centroid_mm": rounded(self.centroid), "principal_axes": [rounded(a, 4) for a in self.axes.T],
                "sd_mm": rounded(self.sd_mm, 2), "touches_border": list(self.cut_faces)}


_FACE_NAMES = ("i", "j", "k")


def measure_structures(labels: sitk.Image, value_to_name: dict[int, str], max_points: int = 4000,
                       chunk_voxels: int = 4_000_000) -> dict[str, Structure]:
    """Centroid, volume, principal axes, touched borders and point samples of every named structure.

    Works slab by slab (``chunk_voxels`` voxels at a time) so that large CT label maps stay cheap in
    memory; each structure keeps a systematic sample (every n-th voxel) of at most ``max_points`` voxel
    centres. Deterministic.
    """
    array = sitk.GetArrayViewFromImage(labels)
    names = sorted(set(value_to_name.values()))
    if not names or array.size == 0:
        return {}
    number = {name: i + 1 for i, name in enumerate(names)}
    lut = np.zeros(max(int(array.max()), max(value_to_name)) + 1, dtype=np.uint16)
    for value, name in value_to_name.items():
        lut[value] = number[name]
    count = np.bincount(lut[np.asarray(array).ravel()], minlength=len(names) + 1).astype(float)
    if count[1:].sum() == 0:
        return {}
    sums, second, samples = _accumulate_moments(labels, lut, count, max_points, chunk_voxels)
    touched = _touched_faces(lut, array)
    direction = direction_matrix(labels)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    out: dict[str, Structure] = {}
    for name in names:
        k = number[name]
        n = count[k]
        if n == 0:
            continue
        centroid = sums[k] / n
        variances, axes = np.linalg.eigh(second[k] / n - np.outer(centroid, centroid))
        rank = np.argsort(variances)[::-1]
        faces, normals = touched.get(k, ([], []))
        normals = [direction[:, axis] * sign for axis, sign in normals]
        points = np.concatenate(samples[k]) if samples[k] else centroid[None]
        out[name] = Structure(name, int(n), n * voxel_ml, centroid, axes[:, rank],
                              np.sqrt(np.maximum(variances[rank], 0.0)), faces, normals, points)
    return out


def _accumulate_moments(labels: sitk.Image, lut: np.ndarray, count: np.ndarray, max_points: int,
                        chunk_voxels: int) -> tuple[np.ndarray, np.ndarray, list[list[np.ndarray]]]:
    """Per structure number (``lut`` maps label values to 1..K, 0 = none): sums of the physical voxel centres
    (K+1 x 3, LPS mm), of their outer products (K+1 x 3 x 3) and systematic point samples, slab by slab."""
    array = sitk.GetArrayViewFromImage(labels)
    k_count = len(count)
    stride = np.maximum(1, np.ceil(count / max_points)).astype(np.int64)
    seen = np.zeros(k_count, dtype=np.int64)
    a, origin = index_to_physical_matrix(labels)
    sums = np.zeros((k_count, 3))
    second = np.zeros((k_count, 3, 3))
    samples: list[list[np.ndarray]] = [[] for _ in range(k_count)]
    plane = int(array.shape[1] * array.shape[2])
    step = max(1, chunk_voxels // max(plane, 1))
    for z0 in range(0, array.shape[0], step):
        index = lut[np.asarray(array[z0:z0 + step])]
        flat = np.flatnonzero(index)
        if flat.size == 0:
            continue
        which = index.ravel()[flat]
        kji = np.unravel_index(flat, index.shape)
        ijk = np.stack([kji[2], kji[1], kji[0] + z0], axis=1).astype(np.float64)
        points = ijk @ a.T + origin
        for d in range(3):
            sums[:, d] += np.bincount(which, points[:, d], k_count)
        for r in range(3):
            for c in range(r, 3):
                second[:, r, c] += np.bincount(which, points[:, r] * points[:, c], k_count)
        # systematic sample: every stride-th voxel of each structure in raster order (low-variance centroids)
        order = np.argsort(which, kind="stable")
        sorted_which = which[order]
        bounds = np.searchsorted(sorted_which, np.arange(k_count + 1))
        rank = np.arange(len(order)) - bounds[sorted_which] + seen[sorted_which]
        chosen = order[rank % stride[sorted_which] == 0]
        seen += np.diff(bounds)
        picked, picked_which = points[chosen], which[chosen]
        for k in np.unique(picked_which):
            samples[k].append(picked[picked_which == k])
    second = np.triu(second) + np.triu(second, 1).transpose(0, 2, 1)
    return sums, second, samples


def _touched_faces(lut: np.ndarray, array: np.ndarray) -> dict[int, tuple[list, list]]:
    """{structure number: (face names, [(grid axis, +-1)])} for structures with voxels on a grid border."""
    result: dict[int, tuple[list, list]] = {}
    size = array.shape[::-1]  # i, j, k
    for axis in range(3):
        if size[axis] < 2:
            continue
        np_axis = 2 - axis
        for side, position in (("-", 0), ("+", size[axis] - 1)):
            face = lut[np.take(np.asarray(array), position, axis=np_axis)]
            for k in np.unique(face):
                if k:
                    faces, normals = result.setdefault(int(k), ([], []))
                    faces.append(f"{side}{_FACE_NAMES[axis]}")
                    normals.append((axis, 1.0 if side == "+" else -1.0))
    return result


# --------------------------------------------------------------------------------------------- fitting
def kabsch(p: np.ndarray, q: np.ndarray, w: np.ndarray | None = None, scale: bool = False) -> np.ndarray:
    """4x4 matrix of the (weighted) best rotation [+ isotropic scale] and translation mapping p onto q."""
    w = np.ones(len(p)) if w is None else np.asarray(w, float)
    w = w / w.sum()
    pc, qc = w @ p, w @ q
    p0, q0 = p - pc, q - qc
    h = (p0 * w[:, None]).T @ q0
    u, s, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    fix = np.diag([1.0, 1.0, d])
    r = vt.T @ fix @ u.T
    c = 1.0
    if scale:
        var_p = float(np.sum(w * np.sum(p0 ** 2, axis=1)))
        c = float(np.sum(s * np.diag(fix)) / var_p) if var_p > 0 else 1.0
    m = np.eye(4)
    m[:3, :3] = c * r
    m[:3, 3] = qc - c * r @ pc
    return m


def _axis_lines(normals: list) -> np.ndarray:
    """Up to 3 distinct cut directions (3 x 3, zero rows when unused) from outward face normals."""
    lines = np.zeros((3, 3))
    count = 0
    for n in normals:
        n = np.asarray(n, float)
        if count < 3 and all(abs(float(n @ lines[i])) < 0.99 for i in range(count)):
            lines[count] = n / max(np.linalg.norm(n), 1e-12)
            count += 1
    return lines


@dataclass
class Pair:
    """A structure seen in both images, with the centroids and constraint used in the current fit."""

    name: str
    fixed: Structure
    moving: Structure
    weight: float
    truncated: bool
    c_fixed: np.ndarray = None
    c_moving: np.ndarray = None
    lines_fixed: np.ndarray = None  # fixed-frame cut directions still in force (3 x 3, zero rows unused)
    lines_moving: np.ndarray = None
    status: str = "candidate"
    handling: str = ""
    reason: str = ""
    residual_mm: float | None = None
    common_fraction: float | None = None
    final: bool = False  # rejected for good (too small, outlier); not reconsidered by later iterations
    base_weight: float = 1.0  # from the correspondence table (mobile organs count less)


class Constraints:
    """Vectorised centroid constraints of a list of pairs.

    The residual of a pair is fitted-minus-observed centroid (moving frame, mm) with its components
    along the cut directions removed (fixed cut directions are rotated into the moving frame): a
    structure cut by a border says nothing about its position across that border.
    """

    def __init__(self, pairs: list[Pair]):
        self.pairs = pairs
        self.cf = np.array([p.c_fixed for p in pairs], float).reshape(-1, 3)
        self.cm = np.array([p.c_moving for p in pairs], float).reshape(-1, 3)
        self.w = np.array([p.weight for p in pairs], float)
        self.lf = np.array([p.lines_fixed for p in pairs], float).reshape(-1, 3, 3)
        self.lm = np.array([p.lines_moving for p in pairs], float).reshape(-1, 3, 3)

    def vectors(self, matrix: np.ndarray) -> np.ndarray:
        linear = matrix[:3, :3]
        d = self.cf @ linear.T + matrix[:3, 3] - self.cm
        rotated = self.lf @ linear.T
        norms = np.linalg.norm(rotated, axis=2, keepdims=True)
        rotated = np.where(norms > 1e-9, rotated / np.maximum(norms, 1e-12), 0.0)
        lines = np.concatenate([self.lm, rotated], axis=1)  # n x 6 x 3
        basis = []
        for slot in range(lines.shape[1]):
            v = lines[:, slot].copy()
            for b in basis:
                v -= np.sum(v * b, axis=1, keepdims=True) * b
            length = np.linalg.norm(v, axis=1, keepdims=True)
            b = np.where(length > 0.2, v / np.maximum(length, 1e-12), 0.0)
            basis.append(b)
            d = d - np.sum(d * b, axis=1, keepdims=True) * b
        return d

    def residuals(self, matrix: np.ndarray) -> np.ndarray:
        return np.linalg.norm(self.vectors(matrix), axis=1)


def _residuals(pairs: list[Pair], matrix: np.ndarray) -> np.ndarray:
    """Constraint residual (mm) per pair: the fitted-minus-observed centroid, cut-direction parts removed."""
    return Constraints(pairs).residuals(matrix) if pairs else np.zeros(0)


def _usable_rank(pairs: list[Pair]) -> bool:
    """True when the pairs fix a rotation: >= 3 non-collinear centroids."""
    if len(pairs) < 3:
        return False
    pts = np.array([p.c_fixed for p in pairs])
    sv = np.linalg.svd(pts - pts.mean(0), compute_uv=False)
    return bool(sv[1] / math.sqrt(len(pairs)) > 5.0)


def _ransac(pairs: list[Pair], settings: dict, rng: np.random.Generator, scale: bool) -> np.ndarray | None:
    """Best hypothesis (4x4) from triples of structures, scored by truncated squared residuals (MSAC)."""
    n = len(pairs)
    if n < 3:
        return None
    constraints = Constraints(pairs)
    p, m, w = constraints.cf, constraints.cm, constraints.w
    triples = list(combinations(range(n), 3))
    if len(triples) > settings["ransac_max_triples"]:
        pick = rng.choice(len(triples), size=settings["ransac_max_triples"], replace=False)
        triples = [triples[i] for i in sorted(pick)]
    tau2 = settings["inlier_mm"] ** 2
    best, best_score = None, math.inf
    for triple in triples:
        idx = list(triple)
        tri = p[idx]
        if np.linalg.norm(np.cross(tri[1] - tri[0], tri[2] - tri[0])) < 100.0:  # nearly collinear (mm^2)
            continue
        hypothesis = kabsch(tri, m[idx], scale=scale)
        if scale and not 0.6 < np.cbrt(np.linalg.det(hypothesis[:3, :3])) < 1.6:
            continue
        r = constraints.residuals(hypothesis)
        score = float(np.sum(w * np.minimum(r ** 2, tau2)))
        if score < best_score - 1e-9:
            best, best_score = hypothesis, score
    return best


def _refine_lsq(pairs: list[Pair], start: np.ndarray, settings: dict, scale: bool) -> np.ndarray:
    """Robust (soft-L1) weighted least squares from ``start``; cut structures only constrain in-plane."""
    r0 = start[:3, :3]
    s0 = float(np.cbrt(abs(np.linalg.det(r0)))) if scale else 1.0
    u, _, vt = np.linalg.svd(r0 / s0)
    base = u @ vt
    t0 = start[:3, 3]
    center = np.mean([p.c_fixed for p in pairs], axis=0)

    def build(x: np.ndarray) -> np.ndarray:
        rot = Rotation.from_rotvec(x[:3]).as_matrix() @ base
        s = math.exp(x[6]) * s0 if scale else 1.0
        m = np.eye(4)
        m[:3, :3] = s * rot
        # translation parametrised at the structures' centre (better conditioned)
        m[:3, 3] = x[3:6] + (s0 * base @ center + t0) - m[:3, :3] @ center
        return m

    constraints = Constraints(pairs)
    root_w = np.sqrt(constraints.w)[:, None]

    def fun(x: np.ndarray) -> np.ndarray:
        return (root_w * constraints.vectors(build(x))).ravel()

    x0 = np.zeros(7 if scale else 6)
    result = least_squares(fun, x0, loss="soft_l1", f_scale=settings["robust_scale_mm"], max_nfev=200)
    return build(result.x)


def _fit_translation(pairs: list[Pair]) -> np.ndarray:
    """Weighted least-squares translation with each pair's in-plane constraint (rotation = identity)."""
    constraints = Constraints(pairs)
    # the residual is linear in the translation t: r_i = P_i (c_f + t - c_m), P_i = I - (cut directions)
    eye = np.eye(4)
    base = constraints.vectors(eye)
    columns = []
    for axis in range(3):
        shifted = np.eye(4)
        shifted[axis, 3] = 1.0
        columns.append(constraints.vectors(shifted) - base)
    root_w = np.sqrt(constraints.w)[:, None]
    a = np.stack([(root_w * c).ravel() for c in columns], axis=1)
    t = np.linalg.lstsq(a, -(root_w * base).ravel(), rcond=None)[0]
    m = np.eye(4)
    m[:3, 3] = t
    return m


def _inside_centres(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    """Which physical points fall within the image's voxel-centre range (continuous index 0..size-1)."""
    idx = physical_to_index(image, points)
    size = np.asarray(image.GetSize(), float)
    tol = 1e-6
    return np.all((idx >= -tol) & (idx <= size - 1 + tol), axis=1)


def _update_common_parts(pairs: list[Pair], matrix: np.ndarray, fixed: sitk.Image, moving: sitk.Image,
                         settings: dict) -> None:
    """Centroids of the parts both images show, for structures cut by a field of view."""
    inverse = np.linalg.inv(matrix)
    for p in pairs:
        if not p.truncated or p.final:
            continue
        keep_f = _inside_centres(moving, apply_matrix(matrix, p.fixed.points))
        keep_m = _inside_centres(fixed, apply_matrix(inverse, p.moving.points))
        frac_f = float(keep_f.mean()) if len(keep_f) else 0.0
        frac_m = float(keep_m.mean()) if len(keep_m) else 0.0
        # share of the structure (as the more complete view shows it) that both images show
        common_ml = min(frac_f * p.fixed.volume_ml, frac_m * p.moving.volume_ml)
        fraction = common_ml / max(p.fixed.volume_ml, p.moving.volume_ml, 1e-9)
        p.common_fraction = fraction
        if keep_f.sum() < 10 or keep_m.sum() < 10:
            p.status = "rejected"
            p.reason = "cut by a field of view: (almost) none of it lies where both images overlap"
            continue
        if fraction < settings["min_common_fraction"] or common_ml < settings["min_common_ml"]:
            p.status = "rejected"
            p.reason = (f"cut by a field of view: both images show only {common_ml:.1f} ml of it, "
                        f"{100 * fraction:.0f}% of the more complete view (minimum "
                        f"{100 * settings['min_common_fraction']:.0f}% and {settings['min_common_ml']:g} ml)")
            continue
        p.status = "candidate"
        p.reason = ""
        p.c_fixed = p.fixed.points[keep_f].mean(0)
        p.c_moving = p.moving.points[keep_m].mean(0)
        p.lines_fixed, p.lines_moving = np.zeros((3, 3)), np.zeros((3, 3))
        low = settings["truncated_weight"]
        p.weight = p.base_weight * (low + (1.0 - low) * min(fraction, 1.0))
        p.handling = ("cut by a field of view: centroids of the part both images show "
                      f"({100 * min(fraction, 1.0):.0f}% of the more complete view), weight "
                      f"x{p.weight / p.base_weight:.2f}")


def _matrix_change_mm(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> float:
    return float(np.mean(np.linalg.norm(apply_matrix(a, points) - apply_matrix(b, points), axis=1)))


def fit(pairs: list[Pair], fixed: sitk.Image, moving: sitk.Image, settings: dict, seed: int = 0) -> tuple:
    """Robust fit of the fixed->moving matrix. Returns (4x4 matrix, kind, info dict, warnings)."""
    scale = settings["transform"] == "similarity"
    warnings: list[str] = []
    matrix, kind = _first_fit([p for p in pairs if p.status == "candidate"], settings, seed, scale)
    matrix, kind, iterations, change = _fit_common_parts(pairs, matrix, kind, fixed, moving, settings, scale)
    info: dict = {"iterations": iterations, "last_change_mm": round(change, 4) if iterations else None,
                  "converged": bool(iterations and change < settings["converged_mm"])}
    if iterations and not info["converged"]:
        warnings.append(f"anatomy: the common-part iterations did not settle (last change {change:.2f} mm)")
    active = [p for p in pairs if p.status == "candidate"]
    if not active:
        raise InputError("Every common structure was rejected (cut by the fields of view or inconsistent)",
                         "give label maps with more anatomy in common, or use --prealign search")
    if kind == "translation":
        warnings.append(f"anatomy: only {len(active)} usable structure(s) (or all nearly on one line): fitted a "
                        "translation only; rotation is not determined by the labels")
    residuals = _residuals(pairs, matrix)
    for p, r in zip(pairs, residuals):
        p.residual_mm = float(r)
        if p.status == "candidate":
            p.status = "used"
            if not p.handling:
                p.handling = "full structure in both images"
    used = [p for p in pairs if p.status == "used"]
    info["rms_residual_mm"] = round(float(np.sqrt(np.mean([p.residual_mm ** 2 for p in used]))), 3)
    return matrix, kind, info, warnings


def _first_fit(active: list[Pair], settings: dict, seed: int, scale: bool) -> tuple[np.ndarray, str]:
    """(matrix, kind) of the first pass: RANSAC + robust least squares, or a translation when the structures
    do not fix a rotation."""
    rng = np.random.default_rng(seed)
    matrix = _ransac(active, settings, rng, scale) if _usable_rank(active) else None
    if matrix is not None:
        return _refine_lsq(active, matrix, settings, scale), settings["transform"]
    if not active:
        raise InputError("No structure is usable in both label maps",
                         "check that both label maps come from TotalSegmentator for these images and show "
                         "common anatomy; or use --prealign search")
    return _fit_translation(active), "translation"


def _fit_common_parts(pairs: list[Pair], matrix: np.ndarray, kind: str, fixed: sitk.Image, moving: sitk.Image,
                      settings: dict, scale: bool) -> tuple[np.ndarray, str, int, float]:
    """Refit on the parts both images show until the matrix moves the centroids less than ``converged_mm``.

    Returns (matrix, kind, iterations, last change in mm); ``kind`` drops to translation when too few
    structures remain to fix a rotation.
    """
    check_points = np.array([p.fixed.centroid for p in pairs])
    iterations = 0
    change = 0.0
    for iterations in range(1, settings["max_iterations"] + 1):  # noqa: B007 - returned below
        _update_common_parts(pairs, matrix, fixed, moving, settings)
        active = [p for p in pairs if p.status == "candidate"]
        _reject_outliers(active, matrix, settings)
        active = [p for p in active if p.status == "candidate"]
        if not active:
            break
        if kind != "translation" and _usable_rank(active):
            new = _refine_lsq(active, matrix, settings, scale)
        else:
            kind = "translation"
            new = _fit_translation(active)
        change = _matrix_change_mm(new, matrix, check_points)
        matrix = new
        if change < settings["converged_mm"]:
            break
    return matrix, kind, iterations, change


def _reject_outliers(active: list[Pair], matrix: np.ndarray, settings: dict) -> None:
    if len(active) < 4:
        return
    r = _residuals(active, matrix)
    sigma = 1.4826 * float(np.median(np.abs(r - np.median(r))))
    limit = max(settings["outlier_factor"] * max(sigma, float(np.median(r))), settings["inlier_mm"])
    worst = int(np.argmax(r))
    if r[worst] > limit:
        p = active[worst]
        p.status = "rejected"
        p.final = True
        p.reason = f"outlier: {r[worst]:.1f} mm from where the other structures put it (limit {limit:.1f} mm)"


# ------------------------------------------------------------------------------------------ overlap
def canonical_image(labels: sitk.Image, value_to_name: dict[int, str], numbers: dict[str, int]) -> sitk.Image:
    """Label image renumbered to common structure numbers (``numbers``: name -> 1..K; others 0)."""
    array = sitk.GetArrayViewFromImage(labels)
    lut = np.zeros(max(int(array.max()), max(value_to_name, default=0)) + 1, dtype=np.uint16)
    for value, name in value_to_name.items():
        if name in numbers:
            lut[value] = numbers[name]
    out = sitk.GetImageFromArray(lut[np.asarray(array)])
    out.CopyInformation(labels)
    return out


def _coarse(image: sitk.Image, max_voxels: int = 6_000_000) -> sitk.Image:
    """The label image itself, or a nearest-neighbour copy at a coarser spacing when it is huge."""
    n = int(np.prod(image.GetSize()))
    if n <= max_voxels:
        return image
    factor = (n / max_voxels) ** (1 / 3)
    spacing = [s * factor for s in image.GetSpacing()]
    size = [max(1, int(round(sz / factor))) for sz in image.GetSize()]
    return _nearest_copy(image, spacing, size, np.full(3, (factor - 1) / 2.0))


def _nearest_copy(image: sitk.Image, spacing: list[float], size: list[int], first_index: np.ndarray) -> sitk.Image:
    """Nearest-neighbour copy of ``image`` on a grid with its direction, ``spacing`` and ``size``, whose first voxel
    centre sits at continuous index ``first_index`` of ``image`` (half the change of voxel size keeps the extent)."""
    ref = sitk.Image(size, image.GetPixelID())
    ref.SetSpacing(spacing)
    ref.SetDirection(image.GetDirection())
    a, origin = index_to_physical_matrix(image)
    ref.SetOrigin((origin + a @ first_index).tolist())
    return sitk.Resample(image, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, image.GetPixelID())


def dice_scores(fixed_canon: sitk.Image, moving_canon: sitk.Image, matrix: np.ndarray,
                numbers: dict[str, int]) -> tuple[dict, dict]:
    """Per-structure Dice under ``matrix`` (fixed->moving): whole structures, and within the common field of view."""
    transform = transforms.affine_from_matrix(matrix)
    fixed_small = _coarse(fixed_canon)
    warped = sitk.Resample(moving_canon, fixed_small, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    ones = sitk.Image(moving_canon.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving_canon)
    inside_image = sitk.Resample(ones, fixed_small, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    inside = sitk.GetArrayViewFromImage(inside_image) > 0  # a view: ``inside_image`` must outlive it
    f = sitk.GetArrayViewFromImage(fixed_small)
    m = sitk.GetArrayViewFromImage(warped)
    whole, common = {}, {}
    top = max(numbers.values(), default=0) + 1
    inter = np.bincount(f[(f == m) & (f > 0)], minlength=top)
    count_f = np.bincount(f[f > 0], minlength=top)
    count_m = np.bincount(m[m > 0], minlength=top)
    count_f_in = np.bincount(f[(f > 0) & inside], minlength=top)
    count_m_total = _moving_counts(moving_canon, top, fixed_small)
    for name, k in numbers.items():
        denominator = count_f[k] + count_m_total[k]
        whole[name] = round(float(2 * inter[k] / denominator), 4) if denominator else 0.0
        denominator_in = count_f_in[k] + count_m[k]
        common[name] = round(float(2 * inter[k] / denominator_in), 4) if denominator_in else 0.0
    return whole, common


def _moving_counts(moving_canon: sitk.Image, top: int, fixed_small: sitk.Image) -> np.ndarray:
    """Voxel counts of each moving structure, expressed in fixed-grid voxels (volume ratio)."""
    counts = np.bincount(sitk.GetArrayViewFromImage(moving_canon).ravel(), minlength=top).astype(float)
    counts[0] = 0
    return counts * float(np.prod(moving_canon.GetSpacing())) / float(np.prod(fixed_small.GetSpacing()))


def _mean(values) -> float | None:
    values = list(values)
    return round(float(np.mean(values)), 4) if values else None


# ---------------------------------------------------------------------------------- label refinement
@dataclass
class _LabelSide:
    """One image's side of the label-overlap measure: per structure number, systematic voxel-centre samples
    (physical LPS mm, concatenated; ``slices[k]`` picks structure k's) and a Gaussian-smoothed indicator on a
    sub-box of the label grid (``fields[k]`` = (array z, y, x; index of its first voxel, x, y, z)), the volume
    each sample stands for (ml), and the grid's physical -> continuous index matrix and size."""

    points: np.ndarray
    slices: dict
    fields: dict
    sample_ml: dict
    to_index: np.ndarray
    size: np.ndarray

    def inside(self, index: np.ndarray) -> np.ndarray:
        """Which continuous indices fall inside this image's field of view (voxel-edge extent)."""
        return np.all((index >= -0.5) & (index <= self.size - 0.5), axis=1)

    def values(self, k: int, index: np.ndarray) -> np.ndarray:
        """The smoothed indicator of structure ``k`` at continuous indices of the grid (0 outside its sub-box)."""
        field_k, first = self.fields[k]
        return ndimage.map_coordinates(field_k, (index - first)[:, ::-1].T, order=1, mode="constant", cval=0.0)


def _label_side(labels: sitk.Image, numbers, sigma_mm: float, max_samples: int) -> _LabelSide:
    """Samples (at most ``max_samples`` per structure) and indicators smoothed by a Gaussian of ``sigma_mm`` of the
    structures ``numbers`` in a (canonical) label image."""
    array = sitk.GetArrayViewFromImage(labels)
    a, origin = index_to_physical_matrix(labels)
    to_index = np.eye(4)
    to_index[:3, :3] = np.linalg.inv(a)
    to_index[:3, 3] = -to_index[:3, :3] @ origin
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    sigma_voxels = sigma_mm / np.asarray(labels.GetSpacing(), float)[::-1]  # z, y, x
    pad = np.ceil(3 * sigma_voxels).astype(int) + 1
    points, slices, fields, sample_ml, count = [], {}, {}, {}, 0
    for k in numbers:
        idx = np.argwhere(array == k)  # z, y, x
        if len(idx) == 0:
            continue
        stride = max(1, int(math.ceil(len(idx) / max_samples)))
        chosen = idx[::stride, ::-1].astype(float) @ a.T + origin
        points.append(chosen)
        slices[k] = slice(count, count + len(chosen))
        count += len(chosen)
        sample_ml[k] = stride * voxel_ml
        lo = np.maximum(idx.min(0) - pad, 0)
        hi = np.minimum(idx.max(0) + pad + 1, array.shape)
        box = np.asarray(array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]) == k
        fields[k] = (ndimage.gaussian_filter(box.astype(np.float32), sigma_voxels), lo[::-1].astype(float))
    return _LabelSide(np.concatenate(points) if points else np.zeros((0, 3)), slices, fields, sample_ml, to_index,
                      np.asarray(labels.GetSize(), float))


def common_fov_dice(fixed_side: _LabelSide, moving_side: _LabelSide, matrix: np.ndarray) -> dict[int, float]:
    """Soft Dice of each structure within the common field of view under ``matrix`` (fixed -> moving).

    Symmetric: fixed samples that land inside the moving field of view score the moving structure's smoothed
    indicator there, moving samples that land inside the fixed field of view (through the inverse) the fixed
    one's; Dice = (overlap seen from both sides) / (volume of both structures inside the common field of view).
    Structures with fewer than 10 samples in the common field of view are left out.
    """
    in_moving = apply_matrix(moving_side.to_index @ matrix, fixed_side.points)
    in_fixed = apply_matrix(fixed_side.to_index @ np.linalg.inv(matrix), moving_side.points)
    keep_fixed, keep_moving = moving_side.inside(in_moving), fixed_side.inside(in_fixed)
    out = {}
    for k, rows_f in fixed_side.slices.items():
        rows_m = moving_side.slices.get(k)
        if rows_m is None:
            continue
        keep_f, keep_m = keep_fixed[rows_f], keep_moving[rows_m]
        n_f, n_m = int(keep_f.sum()), int(keep_m.sum())
        if n_f + n_m < 10:
            continue
        v_f, v_m = fixed_side.sample_ml[k], moving_side.sample_ml[k]
        overlap = (v_f * float(moving_side.values(k, in_moving[rows_f][keep_f]).sum())
                   + v_m * float(fixed_side.values(k, in_fixed[rows_m][keep_m]).sum()))
        out[k] = overlap / (v_f * n_f + v_m * n_m)
    return out


def refine_by_overlap(fixed_canon: sitk.Image, moving_canon: sitk.Image, matrix: np.ndarray, names: dict,
                      scale: bool, seed: int = 0, spacing_mm: float = 2.0,
                      passes: tuple = ((6.0, 300), (1.5, 600))) -> np.ndarray:
    """Rigid (or similarity) refinement maximising the overlap of same-named labels in the common field of view.

    The measure (:func:`common_fov_dice`, mean over the structures ``names``: name -> number in the canonical
    label images) looks only where BOTH images exist and from both sides, so a structure cut by a field of view
    is compared only where both images show it, and sliding part of it out of view earns nothing. One Powell
    search per entry of ``passes`` = (Gaussian smoothing of the indicators in mm, samples per structure and
    side), on label copies no finer than ``spacing_mm``. Deterministic (``seed`` is unused; kept for the
    signature). Returns the 4x4 fixed -> moving matrix (LPS mm).
    """
    del seed
    fixed_small = _resample_iso(fixed_canon, spacing_mm)
    moving_small = _resample_iso(moving_canon, spacing_mm)
    numbers = sorted(set(names.values()))
    current = matrix.copy()
    for sigma_mm, max_samples in passes:
        fixed_side = _label_side(fixed_small, numbers, sigma_mm, max_samples)
        moving_side = _label_side(moving_small, numbers, sigma_mm, max_samples)
        if not set(fixed_side.slices) & set(moving_side.slices):
            return matrix
        center = fixed_side.points.mean(0)

        def cost(x: np.ndarray, base=current, fixed_side=fixed_side, moving_side=moving_side, center=center):
            dice = common_fov_dice(fixed_side, moving_side, _perturb(base, x, center, scale))
            return -float(np.mean(list(dice.values()))) if dice else 0.0

        result = minimize(cost, np.zeros(7 if scale else 6), method="Powell",
                          options={"xtol": 2e-2, "ftol": 1e-5, "maxfev": 1000})
        current = _perturb(current, result.x, center, scale)
    return current


def _perturb(base: np.ndarray, x: np.ndarray, center: np.ndarray, scale: bool) -> np.ndarray:
    """``base`` followed by a rotation of x[:3] degrees (rotation vector) about the moved ``center``, a shift
    x[3:6] mm and (similarity) a scale exp(x[6] / 100)."""
    rot = Rotation.from_rotvec(np.radians(x[:3])).as_matrix()
    s = math.exp(x[6] / 100.0) if scale and len(x) > 6 else 1.0
    delta = np.eye(4)
    delta[:3, :3] = s * rot
    moved_center = apply_matrix(base, center[None])[0]
    delta[:3, 3] = moved_center + x[3:6] - delta[:3, :3] @ moved_center
    return delta @ base


def _resample_iso(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """The label image itself, or a nearest-neighbour copy no finer than ``spacing_mm`` along any grid axis."""
    spacing = [max(s, spacing_mm) for s in image.GetSpacing()]
    if np.allclose(spacing, image.GetSpacing()):
        return image
    size = [max(1, int(round(sz * s / t))) for sz, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    shift = (np.asarray(spacing) / np.asarray(image.GetSpacing()) - 1) / 2.0
    return _nearest_copy(image, spacing, size, shift)


# ------------------------------------------------------------------------------------------- driver
def _task_for(labels: sitk.Image, image: sitk.Image, task: str | None, which: str) -> tuple[str, str]:
    if task:
        if task not in label_io.known_tasks():
            raise InputError(f"Unknown TotalSegmentator task '{task}' for the {which} labels",
                             "use one of " + ", ".join(label_io.known_tasks()))
        return task, "given"
    inferred, reason = label_io.infer_task(labels, image)
    if inferred is None:
        raise InputError(f"Cannot tell the TotalSegmentator task of the {which} label map ({reason})",
                         f"pass --{which}-labels-task (total for CT, total_mr for MR)")
    return inferred, reason


def _matrix_to_transform(matrix: np.ndarray, kind: str, center: np.ndarray) -> sitk.Transform:
    if kind == "translation":
        return transforms.translation(matrix[:3, 3])
    if kind == "rigid":
        return transforms.rigid_from_matrix(matrix, center)
    s = float(np.cbrt(np.linalg.det(matrix[:3, :3])))
    similarity = sitk.Similarity3DTransform()
    similarity.SetCenter(center.tolist())
    similarity.SetMatrix((matrix[:3, :3] / s).ravel().tolist(), 1e-5)
    similarity.SetScale(s)
    similarity.SetTranslation((matrix[:3, 3] - center + matrix[:3, :3] @ center).tolist())
    return similarity


def build_pairs(fixed_structures: dict, moving_structures: dict, settings: dict) -> tuple[list[Pair], dict]:
    """Pairs of same-named structures with their first-pass status; also names seen on one side only."""
    weights = correspondence().get("weights", {})
    pairs = []
    for name in sorted(set(fixed_structures) & set(moving_structures)):
        f, m = fixed_structures[name], moving_structures[name]
        truncated = bool(f.cut_faces or m.cut_faces)
        pair = Pair(name, f, m, float(weights.get(name, 1.0)), truncated, f.centroid.copy(), m.centroid.copy(),
                    _axis_lines(f.cut_normals), _axis_lines(m.cut_normals), base_weight=float(weights.get(name, 1.0)))
        small = [(side, s) for side, s in (("fixed", f), ("moving", m))
                 if s.volume_ml < settings["min_volume_ml"] or s.voxels < settings["min_voxels"]]
        ratio = m.volume_ml / max(f.volume_ml, 1e-9)
        if small:
            what = " and ".join(f"{s.volume_ml:.2f} ml in the {side} image" for side, s in small)
            cut = any(s.cut_faces for _, s in small)
            pair.status = "rejected"
            pair.reason = (("cut by a field of view: too little of it is visible (" if cut else "too small (")
                           + what + ")")
            pair.final = True
        elif not truncated and not (1 / settings["volume_ratio_limit"] < ratio < settings["volume_ratio_limit"]):
            pair.truncated = True  # likely cut by an oblique FOV edge or mis-segmented: treat as cut
            pair.reason = f"volume ratio moving/fixed {ratio:.2f}"
        if pair.truncated:
            pair.weight *= settings["truncated_weight"]
            if pair.status != "rejected":
                pair.handling = "cut by a field of view: first pass uses only the in-plane centroid position"
        pairs.append(pair)
    one_side = {"only_in_fixed": sorted(set(fixed_structures) - set(moving_structures)),
                "only_in_moving": sorted(set(moving_structures) - set(fixed_structures))}
    return pairs, one_side


def prealign(inputs: PrealignInputs) -> PrealignResult:
    """Anatomy pre-alignment (see the module docstring). ``transform`` maps fixed -> moving (LPS mm)."""
    if inputs.fixed_labels is None or inputs.moving_labels is None:
        raise InputError("Anatomy pre-alignment needs label maps of both images",
                         "pass --fixed-labels and --moving-labels (TotalSegmentator output) or --segment both")
    settings = options_from(inputs)
    progress = inputs.progress
    tasks, fixed_map, moving_map, pairs, one_side = _match_structures(inputs, settings)
    progress.report("prealign", 0.3, "anatomy: robust fit")
    matrix, kind, fit_info, warnings = fit(pairs, inputs.fixed_labels, inputs.moving_labels, settings, inputs.seed)
    used = [p for p in pairs if p.status == "used"]
    numbers = {p.name: i + 1 for i, p in enumerate(pairs)}
    fixed_canon = canonical_image(inputs.fixed_labels, fixed_map, numbers)
    moving_canon = canonical_image(inputs.moving_labels, moving_map, numbers)
    dice_before = dice_scores(fixed_canon, moving_canon, np.eye(4), numbers)
    dice_fit = dice_scores(fixed_canon, moving_canon, matrix, numbers)
    final, dice_after, refinement = _refine_on_labels(fixed_canon, moving_canon, matrix, kind, pairs, numbers,
                                                      dice_fit, settings, inputs)
    center = np.mean([p.fixed.centroid for p in used], axis=0) if used else np.zeros(3)
    transform = _matrix_to_transform(final, kind, center)
    details = _anatomy_details(settings, tasks, kind, pairs, one_side, fit_info, refinement, final,
                               dice_before, dice_after, transform)
    if details["truncated"]:
        warnings.append("anatomy: structures cut by a field of view were down-weighted or rejected: "
                        + ", ".join(details["truncated"]))
    progress.report("prealign", 1.0,
                    f"anatomy: {len(details['used'])} structures used, {len(details['rejected'])} rejected")
    return PrealignResult("anatomy", transform, details, warnings)


def _match_structures(inputs: PrealignInputs, settings: dict) -> tuple[dict, dict, dict, list[Pair], dict]:
    """Both label maps measured and paired by name: (tasks and their sources, fixed and moving
    {label value: canonical name}, pairs, names seen on one side only). InputError when no pair is usable."""
    fixed_task, fixed_reason = _task_for(inputs.fixed_labels, inputs.fixed, inputs.fixed_labels_task, "fixed")
    moving_task, moving_reason = _task_for(inputs.moving_labels, inputs.moving, inputs.moving_labels_task, "moving")
    fixed_names = label_io.names_in(inputs.fixed_labels, fixed_task)
    moving_names = label_io.names_in(inputs.moving_labels, moving_task)
    fixed_map, moving_map = canonical_maps(fixed_names, moving_names)
    inputs.progress.report("prealign", 0.0, "anatomy: measuring structures")
    fixed_structures = measure_structures(inputs.fixed_labels, fixed_map, settings["max_points"])
    moving_structures = measure_structures(inputs.moving_labels, moving_map, settings["max_points"])
    pairs, one_side = build_pairs(fixed_structures, moving_structures, settings)
    excluded_shared = sorted(set(fixed_names.values()) & set(moving_names.values())
                             & set(correspondence().get("excluded", [])))
    if not pairs and excluded_shared:
        raise InputError(
            f"The label maps share only body-wide labels ({', '.join(excluded_shared)}), which do not locate organs",
            "use TotalSegmentator's organ tasks: total for CT, total_mr for MR")
    if not any(p.status != "rejected" for p in pairs):
        raise InputError(
            f"The label maps share no usable structure (fixed: {len(fixed_structures)} structures of task "
            f"'{fixed_task}', moving: {len(moving_structures)} of task '{moving_task}')",
            "check the tasks (--fixed-labels-task/--moving-labels-task) and that both scans show common anatomy")
    tasks = {"fixed_task": fixed_task, "moving_task": moving_task,
             "fixed_task_source": fixed_reason, "moving_task_source": moving_reason}
    return tasks, fixed_map, moving_map, pairs, one_side


def _refinement_pairs(pairs: list[Pair]) -> list[Pair]:
    """The structures the label-overlap refinement compares: the used ones and the ones rejected as outliers of
    the centroid fit (a wrong rotation makes good structures look like outliers), not those too small or with too
    little in common."""
    return [p for p in pairs if p.status == "used" or (p.status == "rejected" and p.reason.startswith("outlier"))]


def _refine_wanted(setting, used: list[Pair]) -> tuple[bool, str]:
    """(run the label-overlap refinement?, why): ``refine_labels`` True / False, or "auto": when a used
    structure is cut by a field of view (centroids of cut structures leave rotations poorly pinned)."""
    if isinstance(setting, str):
        if setting != "auto":
            raise InputError(f"Unknown anatomy refine_labels '{setting}'", "use true, false or auto")
        cut = [p.name for p in used if p.truncated]
        return bool(cut), (f"auto: {len(cut)} used structure(s) cut by a field of view" if cut
                           else "auto: no used structure is cut by a field of view")
    return bool(setting), "requested" if setting else "not requested"


def _refine_on_labels(fixed_canon: sitk.Image, moving_canon: sitk.Image, matrix: np.ndarray, kind: str,
                      pairs: list[Pair], numbers: dict[str, int], dice_fit: tuple[dict, dict], settings: dict,
                      inputs: PrealignInputs) -> tuple[np.ndarray, tuple[dict, dict], dict]:
    """(final matrix, its Dice (whole, common field of view), record): the label-overlap refinement in the common
    field of view (:func:`refine_by_overlap`), kept only when it raises the mean common-field-of-view Dice of the
    structures it compares."""
    used = [p for p in pairs if p.status == "used"]
    wanted, why = _refine_wanted(settings["refine_labels"], used)
    refinement: dict = {"requested": wanted, "why": why}
    compared = _refinement_pairs(pairs)
    if not (wanted and kind != "translation" and compared):
        return matrix, dice_fit, refinement
    inputs.progress.report("prealign", 0.6, "anatomy: refining on label overlap in the common field of view")
    chosen = {p.name: numbers[p.name] for p in compared}
    refined = refine_by_overlap(fixed_canon, moving_canon, matrix, chosen, kind == "similarity", inputs.seed,
                                float(settings["refine_spacing_mm"]),
                                tuple((float(sigma), int(n)) for sigma, n in settings["refine_passes"]))
    dice_refined = dice_scores(fixed_canon, moving_canon, refined, numbers)
    before = _mean(dice_fit[1][p.name] for p in compared) or 0.0
    after = _mean(dice_refined[1][p.name] for p in compared) or 0.0
    moved = _matrix_change_mm(refined, matrix, np.array([p.fixed.centroid for p in compared]))
    refinement.update({"structures": sorted(chosen), "mean_dice_used_before": before,
                       "mean_dice_used_after": after, "change_mm": round(moved, 3)})
    if after > before + 1e-4:
        refinement["kept"] = True
        return refined, dice_refined, refinement
    refinement["kept"] = False
    refinement["why_not"] = "label overlap in the common field of view did not improve the Dice of these structures"
    return matrix, dice_fit, refinement


def _structure_entry(p: Pair, residual_mm: float, final: np.ndarray, dice_before: tuple[dict, dict],
                     dice_after: tuple[dict, dict]) -> dict:
    """One structure's record in ``details["structures"]`` (distances in mm, Dice whole and in the common FOV)."""
    return {
        "name": p.name, "status": p.status, "weight": round(float(p.weight), 3),
        "truncated": p.truncated,
        "cut_in_fixed": list(p.fixed.cut_faces), "cut_in_moving": list(p.moving.cut_faces),
        "handling": p.handling if p.status == "used" else "",
        "reason": p.reason if p.status == "rejected" else "",
        "residual_mm": round(float(residual_mm), 3),
        "centroid_distance_mm": round(float(np.linalg.norm(apply_matrix(final, p.fixed.centroid[None])[0]
                                                           - p.moving.centroid)), 3),
        "centroid_distance_before_mm": round(float(np.linalg.norm(p.fixed.centroid - p.moving.centroid)), 3),
        "dice_before": dice_before[0][p.name], "dice_after": dice_after[0][p.name],
        "dice_common_fov_before": dice_before[1][p.name], "dice_common_fov_after": dice_after[1][p.name],
        "common_fraction": None if p.common_fraction is None else round(p.common_fraction, 3),
        "fixed": p.fixed.summary(), "moving": p.moving.summary(),
    }


def _anatomy_details(settings: dict, tasks: dict, kind: str, pairs: list[Pair], one_side: dict, fit_info: dict,
                     refinement: dict, final: np.ndarray, dice_before: tuple[dict, dict],
                     dice_after: tuple[dict, dict], transform: sitk.Transform) -> dict:
    """The ``details`` block of report.json: every structure used or rejected and why, residuals, Dice."""
    used = [p for p in pairs if p.status == "used"]
    structures = [_structure_entry(p, r, final, dice_before, dice_after)
                  for p, r in zip(pairs, _residuals(pairs, final))]
    return {
        "description": "robust fit of TotalSegmentator structure centroids (matched by name), cut structures "
                       "reduced to the part both images show" + (", refined on label overlap"
                                                                  if refinement.get("kept") else ""),
        **tasks,
        "transform_type": kind, "settings": {k: settings[k] for k in sorted(settings)},
        "used": [p.name for p in used], "rejected": {p.name: p.reason for p in pairs if p.status == "rejected"},
        "truncated": [p.name for p in pairs if p.truncated],
        **one_side,
        "fit": fit_info, "refinement": refinement,
        "mean_residual_mm": _mean(p.residual_mm for p in used),
        "mean_dice_before": _mean(dice_before[0][p.name] for p in pairs),
        "mean_dice_after": _mean(dice_after[0][p.name] for p in pairs),
        "mean_dice_common_fov_before": _mean(dice_before[1][p.name] for p in pairs),
        "mean_dice_common_fov_after": _mean(dice_after[1][p.name] for p in pairs),
        "structures": structures,
        "transform": transforms.summarize(transform),
    }
