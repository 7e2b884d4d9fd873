"""Synthetic CT-like and MR-like torso phantoms with TotalSegmentator-named structures and EXACT transforms.

Used by the tests and benchmarks of every stage. The anatomy is analytic (ellipsoids, elliptic
cylinders, boxes, cut by planes), defined in ``resources/phantom_torso.json`` in a "world" frame
(LPS mm: +x patient left, +y posterior, +z superior, origin near the middle of the torso).

Frames and conventions
----------------------
* ``render(..., image_to_world=W)``: the voxel whose physical point (LPS mm, from the grid's origin,
  spacing and direction) is ``p`` shows the anatomy at world point ``W(p)``. ``W=None`` is identity.
* ``make_pair``: the fixed image's physical space IS the world (``W_fixed = identity``); the true
  transform ``T = pair.fixed_to_moving`` maps a fixed physical point to the moving physical point that
  shows the same anatomy (ITK resampling direction, LPS mm), so the moving image is rendered with
  ``W_moving = T^-1``. Resampling the moving image through ``T`` onto the fixed grid re-creates the
  fixed anatomy exactly (up to voxelisation).

Intensities: CT in HU (air -1000, fat -100, soft tissue 40, liver 60, bone 600-700, lungs -850,
optional -1024 outside a reconstruction circle); MR in arbitrary units with T1-like (``mr``/``mr_t1``:
fat bright, bone/lungs/vessels dark) or T2-like (``mr_t2``: fluid bright) contrast, with an optional
smooth multiplicative bias field. Gaussian noise is seeded. Labels: CT-like images get TotalSegmentator
``total`` class ids (lobes, single vertebrae), MR-like images ``total_mr`` ids (``lung_left``,
``vertebrae``...), both looked up BY NAME in ``resources/totalsegmentator_classes.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import SimpleITK as sitk

from ..geometry import transforms
from ..geometry.image_space import Box, index_to_physical_points, inside_image, physical_corners
from ..geometry.resample import grid_for_box, make_reference
from ..io.modality import totalsegmentator_task
from ..resource_files import load_resource_json

MODALITIES = ("ct", "mr", "mr_t1", "mr_t2")
#: Default Gaussian noise standard deviation per modality (image units: HU or MR units).
DEFAULT_NOISE = {"ct": 10.0, "mr_t1": 12.0, "mr_t2": 12.0}
#: Value outside a CT reconstruction circle (when ``ct_fov_radius_mm`` is given).
CT_PADDING_HU = -1024.0


# --------------------------------------------------------------------------------------------- resources
@cache
def totalsegmentator_classes() -> dict:
    """{task: {class id (int): name}} from ``resources/totalsegmentator_classes.json`` (TotalSegmentator,
    Apache-2.0)."""
    data = load_resource_json("totalsegmentator_classes.json")
    return {task: {int(k): v for k, v in names.items()} for task, names in data["tasks"].items()}


def class_ids(task: str) -> dict:
    """{name: class id} of a TotalSegmentator task."""
    return {name: cid for cid, name in totalsegmentator_classes()[task].items()}


@cache
def structure_correspondence() -> dict:
    """``resources/structure_correspondence.json``: shared names and groups (coarse name -> fine names)."""
    return load_resource_json("structure_correspondence.json")


def name_in_task(total_name: str, task: str) -> str | None:
    """The name under which the `total` structure ``total_name`` appears in ``task`` (None when absent)."""
    names = class_ids(task)
    if total_name in names:
        return total_name
    for coarse, fine in structure_correspondence()["groups"].items():
        if total_name in fine and coarse in names:
            return coarse
    return None


# ------------------------------------------------------------------------------------------------ shapes
def euler_matrix(angles_deg) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx for Euler angles (degrees) about x, y, z."""
    ax, ay, az = (math.radians(float(a)) for a in angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Shape:
    """One analytic piece of a structure. ``rotation`` maps local axes to world (columns)."""

    name: str
    kind: str  # ellipsoid | cylinder | box
    center: tuple
    rotation: tuple  # 9 floats, row-major
    params: tuple  # semi axes | (radius x, radius y, half length) | half sizes
    clips: tuple = ()  # ((point xyz), (normal xyz)) pairs
    values: tuple = ()  # ((modality, value), ...)

    @property
    def r(self) -> np.ndarray:
        return np.asarray(self.rotation, dtype=float).reshape(3, 3)

    def value(self, modality: str) -> float:
        return float(dict(self.values)[modality])

    def world_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned world box (mm) that contains the shape."""
        r = self.r
        p = np.asarray(self.params, dtype=float)
        if self.kind == "ellipsoid":
            half = np.sqrt(((r * p[None, :]) ** 2).sum(1))
        else:
            half = (np.abs(r) * p[None, :]).sum(1)
        c = np.asarray(self.center, dtype=float)
        return c - half, c + half

    def inside(self, q0: np.ndarray, q1: np.ndarray, q2: np.ndarray) -> np.ndarray:
        """Membership for local coordinates (arrays, mm)."""
        p = self.params
        if self.kind == "ellipsoid":
            return (q0 / p[0]) ** 2 + (q1 / p[1]) ** 2 + (q2 / p[2]) ** 2 <= 1.0
        if self.kind == "cylinder":
            return ((q0 / p[0]) ** 2 + (q1 / p[1]) ** 2 <= 1.0) & (np.abs(q2) <= p[2])
        if self.kind == "box":
            return (np.abs(q0) <= p[0]) & (np.abs(q1) <= p[1]) & (np.abs(q2) <= p[2])
        raise ValueError(f"unknown shape kind {self.kind}")


def _shape_from_spec(name: str, spec: dict, values: dict, offset=(0.0, 0.0, 0.0)) -> Shape:
    kind = spec["shape"]
    if kind == "ellipsoid":
        params = spec["semi_axes"]
    elif kind == "cylinder":
        params = [*spec["radii"], spec["half_length"]]
    else:
        params = spec["half_sizes"]
    center = np.asarray(spec.get("center", [0, 0, 0]), float) + np.asarray(spec.get("offset", [0, 0, 0]), float)
    center = center + np.asarray(offset, float)
    clips = tuple((tuple(float(v) for v in c["point"]), tuple(float(v) for v in np.asarray(c["normal"], float)
                                                              / np.linalg.norm(c["normal"])))
                  for c in spec.get("clip", []))
    rotation = euler_matrix(spec.get("rotation_deg", [0, 0, 0]))
    vals = {"ct": values["ct"], "mr_t1": values["mr_t1"], "mr_t2": values["mr_t2"]}
    return Shape(name, kind, tuple(center.tolist()), tuple(rotation.ravel().tolist()),
                 tuple(float(v) for v in params), clips, tuple(sorted(vals.items())))


@cache
def phantom_shapes() -> tuple[Shape, ...]:
    """All shapes of the torso phantom in painting order (later overrides earlier)."""
    data = load_resource_json("phantom_torso.json")
    shapes = [_shape_from_spec(s["name"], s, s) for s in data["structures"]]
    column = data["vertebral_column"]
    for name, z in column["levels"].items():
        for part in column["parts"]:
            shapes.append(_shape_from_spec(name, part, column, offset=(0.0, 0.0, float(z))))
    return tuple(shapes)


@cache
def _phantom_meta() -> dict:
    return load_resource_json("phantom_torso.json")


def body_box() -> Box:
    """World box (LPS mm) holding the whole torso."""
    meta = _phantom_meta()["body_box_mm"]
    return Box(tuple(meta["lower"]), tuple(meta["upper"]))


def inside_body(world_points: np.ndarray) -> np.ndarray:
    """Which world points (N x 3, mm) lie inside the torso's outer surface."""
    outer = phantom_shapes()[0]
    q = (np.asarray(world_points, float) - np.asarray(outer.center)) @ outer.r
    return outer.inside(q[:, 0], q[:, 1], q[:, 2])


# ------------------------------------------------------------------------------------------------- grids
def grid_for(extent_mm, spacing, center=(0.0, 0.0, 0.0), direction=None) -> dict:
    """Grid dict (size, spacing, origin, direction) of about ``extent_mm`` centred on ``center`` (LPS mm).

    ``extent_mm`` and ``spacing`` are along the grid axes; ``direction`` is 3x3 (columns = grid axes) or 9 floats.
    """
    spacing = np.asarray(spacing, float) * np.ones(3)
    direction = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)
    size = np.maximum(np.round(np.asarray(extent_mm, float) / spacing).astype(int), 1)
    origin = np.asarray(center, float) - direction @ ((size - 1) / 2.0 * spacing)
    return {"size": [int(v) for v in size], "spacing": spacing.tolist(), "origin": origin.tolist(),
            "direction": direction.ravel().tolist()}


def _grid_affine(grid: dict) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(grid["direction"], float).reshape(3, 3)
    return d @ np.diag(np.asarray(grid["spacing"], float)), np.asarray(grid["origin"], float)


def _supersampled(grid: dict, factor: int) -> dict:
    a, origin = _grid_affine(grid)
    # continuous coarse index of fine index f: (f + 0.5) / factor - 0.5
    fine_origin = origin + a @ np.full(3, 0.5 / factor - 0.5)
    return {"size": [int(v) * factor for v in grid["size"]],
            "spacing": (np.asarray(grid["spacing"], float) / factor).tolist(),
            "origin": fine_origin.tolist(), "direction": list(grid["direction"])}


# ---------------------------------------------------------------------------------------------- painting
def _paint(grid: dict, image_to_world: np.ndarray) -> np.ndarray:
    """Structure index (0 = background, i+1 = phantom_shapes()[i]) per voxel, array z, y, x (int16)."""
    a, origin = _grid_affine(grid)
    b = image_to_world[:3, :3] @ a  # world = b @ index + c
    c = image_to_world[:3, :3] @ origin + image_to_world[:3, 3]
    b_inv = np.linalg.inv(b)
    size = np.asarray(grid["size"], int)
    out = np.zeros(size[::-1], dtype=np.int16)
    for number, shape in enumerate(phantom_shapes(), start=1):
        lo, hi = shape.world_bounds()
        corners = np.array([[lo[0] if i else hi[0], lo[1] if j else hi[1], lo[2] if k else hi[2]]
                            for i in (0, 1) for j in (0, 1) for k in (0, 1)])
        idx = (corners - c) @ b_inv.T
        first = np.maximum(np.floor(idx.min(0)).astype(int), 0)
        last = np.minimum(np.ceil(idx.max(0)).astype(int), size - 1)
        if np.any(last < first):
            continue
        ranges = [np.arange(first[d], last[d] + 1, dtype=np.float32) for d in range(3)]
        axes = (ranges[0][None, None, :], ranges[1][None, :, None], ranges[2][:, None, None])
        r = shape.r
        local = r.T @ b  # local = r^T (b idx + c - center)
        local0 = r.T @ (c - np.asarray(shape.center))
        q = [sum(np.float32(local[m, d]) * axes[d] for d in range(3)) + np.float32(local0[m]) for m in range(3)]
        inside = shape.inside(*q)
        for point, normal in shape.clips:
            n = np.asarray(normal)
            nb = n @ b
            inside &= (sum(np.float32(nb[d]) * axes[d] for d in range(3))
                       + np.float32(n @ (c - np.asarray(point)))) >= 0
        view = out[first[2]:last[2] + 1, first[1]:last[1] + 1, first[0]:last[0] + 1]
        view[inside] = number
    return out


def _modality_key(modality: str) -> str:
    modality = modality.lower()
    if modality not in MODALITIES:
        raise ValueError(f"unknown phantom modality '{modality}' (use one of {', '.join(MODALITIES)})")
    return "mr_t1" if modality == "mr" else modality


def _intensity_table(modality: str) -> np.ndarray:
    key = _modality_key(modality)
    background = float(_phantom_meta()["background"][key])
    return np.array([background] + [s.value(key) for s in phantom_shapes()], dtype=np.float32)


def _label_table(task: str) -> np.ndarray:
    ids = class_ids(task)
    table = np.zeros(len(phantom_shapes()) + 1, dtype=np.uint16)
    for number, shape in enumerate(phantom_shapes(), start=1):
        if shape.name.startswith("_"):
            continue
        name = name_in_task(shape.name, task)
        if name is not None:
            table[number] = ids[name]
    return table


def _bias(size, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Smooth multiplicative field exp(strength * (linear + quadratic)) in normalised grid coordinates."""
    factors = []
    for n in size:  # x, y, z
        u = np.linspace(-1.0, 1.0, int(n), dtype=np.float32)
        a, q = rng.uniform(-1, 1), rng.uniform(-0.5, 0.5)
        factors.append(np.exp(np.float32(strength) * (np.float32(a) * u + np.float32(q) * u * u)))
    return factors[2][:, None, None] * factors[1][None, :, None] * factors[0][None, None, :]


def _as_matrix(image_to_world) -> np.ndarray:
    if image_to_world is None:
        return np.eye(4)
    if isinstance(image_to_world, np.ndarray):
        return np.asarray(image_to_world, float)
    if not transforms.is_linear(image_to_world):
        raise ValueError("phantoms.render needs a linear (affine) image_to_world transform")
    return transforms.to_matrix(image_to_world)


def render(modality: str, grid: dict, image_to_world: sitk.Transform | np.ndarray | None = None, seed: int = 0,
           noise: float | None = None, bias_field: float = 0.0, label_task: str | None = None,
           supersample: int = 1, ct_fov_radius_mm: float | None = None) -> tuple[sitk.Image, sitk.Image | None]:
    """Render the torso phantom on ``grid``; returns (Float32 image, UInt16 label map or None).

    ``grid``: {"size": [nx, ny, nz], "spacing": [mm x3], "origin": [LPS mm x3], "direction": [9 floats]}.
    ``image_to_world``: maps the image's physical points (LPS mm) to world points (4x4 matrix or linear
    sitk transform; None = identity): the voxel at physical point p shows the anatomy at world point W(p).
    ``modality``: "ct" (HU), "mr"/"mr_t1" or "mr_t2" (arbitrary units). ``noise``: Gaussian noise standard
    deviation in image units (None = modality default, 0 = none). ``bias_field``: strength of a smooth
    multiplicative field (0 = none; 0.3 gives about +-35%). ``label_task``: "total" or "total_mr" for a
    label map with that task's class ids (None = no labels). ``supersample``: intensities are the mean
    of supersample^3 sub-samples per voxel (partial volume); labels use the voxel centres.
    ``ct_fov_radius_mm``: CT only: voxels farther than this from the grid's central axis (third grid axis)
    hold -1024 (reconstruction circle) and no label. Deterministic for a given ``seed``.
    """
    key = _modality_key(modality)
    matrix = _as_matrix(image_to_world)
    supersample = max(int(supersample), 1)
    centre_index = _paint(grid, matrix)
    values = _intensity_table(key)
    if supersample > 1:
        fine = values[_paint(_supersampled(grid, supersample), matrix)]
        nz, ny, nx = centre_index.shape
        array = fine.reshape(nz, supersample, ny, supersample, nx, supersample).mean(axis=(1, 3, 5))
    else:
        array = values[centre_index]
    rng = np.random.default_rng(seed)
    if bias_field:
        array = array * _bias(grid["size"], rng, float(bias_field))
    sigma = DEFAULT_NOISE[key] if noise is None else float(noise)
    if sigma > 0:
        array = array + np.float32(sigma) * rng.standard_normal(array.shape, dtype=np.float32)
    outside_fov = None
    if ct_fov_radius_mm is not None and key == "ct":
        outside_fov = _outside_circle(grid, float(ct_fov_radius_mm))
        array[outside_fov] = CT_PADDING_HU
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.CopyInformation(make_reference(grid, sitk.sitkFloat32))
    labels = None
    if label_task is not None:
        label_array = _label_table(label_task)[centre_index]
        if outside_fov is not None:
            label_array[outside_fov] = 0
        labels = sitk.GetImageFromArray(label_array)
        labels.CopyInformation(image)
    return image, labels


def _outside_circle(grid: dict, radius_mm: float) -> np.ndarray:
    size = np.asarray(grid["size"], int)
    spacing = np.asarray(grid["spacing"], float)
    x = (np.arange(size[0]) - (size[0] - 1) / 2.0) * spacing[0]
    y = (np.arange(size[1]) - (size[1] - 1) / 2.0) * spacing[1]
    outside = (x[None, :] ** 2 + y[:, None] ** 2) > radius_mm ** 2
    return np.broadcast_to(outside[None], size[::-1]).copy()


# ------------------------------------------------------------------------------------------------- pairs
@dataclass
class SyntheticPair:
    """A fixed/moving phantom pair with its TRUE transform (fixed physical LPS -> moving physical LPS)."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_labels: sitk.Image | None
    moving_labels: sitk.Image | None
    fixed_to_moving: sitk.Transform
    fixed_task: str | None
    moving_task: str | None
    description: dict = field(default_factory=dict)


def rotation_about_axis(axis, angle_deg: float) -> np.ndarray:
    """3x3 rotation by ``angle_deg`` (degrees, right-handed) about ``axis``."""
    axis = np.asarray(axis, float)
    axis = axis / np.linalg.norm(axis)
    a = math.radians(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * (k @ k)


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def rigid_transform(rotation: np.ndarray, translation_mm, center=(0.0, 0.0, 0.0)) -> sitk.Euler3DTransform:
    """Euler3DTransform p -> R (p - center) + center + translation (mm)."""
    euler = sitk.Euler3DTransform()
    euler.SetCenter([float(v) for v in center])
    euler.SetMatrix(np.asarray(rotation, float).ravel().tolist(), 1e-6)
    euler.SetTranslation([float(v) for v in translation_mm])
    return euler


def random_rigid(rng: np.random.Generator, max_rotation_deg: float, max_translation_mm: float,
                 center=(0.0, 0.0, 0.0)) -> sitk.Euler3DTransform:
    """Random rigid transform about ``center``: uniform random axis, angle uniform in [0, max_rotation_deg]
    (degrees), translation in a uniform random direction with length uniform in [0, max_translation_mm]."""
    rotation = rotation_about_axis(_random_unit(rng), rng.uniform(0.0, max_rotation_deg))
    translation = _random_unit(rng) * rng.uniform(0.0, max_translation_mm)
    return rigid_transform(rotation, translation, center)


#: 180 degrees about the posterior (y) axis: head-first <-> feet-first (L/R and S/I swap, A/P kept).
FLIP_HEAD_FEET = np.diag([-1.0, 1.0, -1.0])


def _true_transform(rng, rotation_deg, translation_mm, flip, affine_scale, center) -> tuple[sitk.Transform, dict]:
    axis = _random_unit(rng)
    rotation = rotation_about_axis(axis, rotation_deg)
    if flip:
        rotation = rotation @ FLIP_HEAD_FEET
    translation = _random_unit(rng) * float(translation_mm)
    info = {"rotation_axis": [round(float(v), 6) for v in axis], "rotation_deg": float(rotation_deg),
            "flip_head_feet": bool(flip), "translation_mm": [round(float(v), 4) for v in translation],
            "center_mm": [float(v) for v in center]}
    if not affine_scale:
        return rigid_transform(rotation, translation, center), info
    scales = 1.0 + affine_scale * rng.uniform(-1.0, 1.0, 3)
    shear = np.eye(3)
    shear[0, 1], shear[0, 2], shear[1, 2] = (0.5 * affine_scale * rng.uniform(-1.0, 1.0, 3))
    linear = rotation @ np.diag(scales) @ shear
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    center = np.asarray(center, float)
    matrix[:3, 3] = center + translation - linear @ center
    info["scales"] = [round(float(v), 6) for v in scales]
    return transforms.affine_from_matrix(matrix, center), info


def _region(fov: str, slab_fraction: float, slab_center_z: float, margin_mm: float = 10.0) -> Box:
    """World box of a field of view: the whole torso or a z-slab of it."""
    body = body_box().expanded(margin_mm)
    if fov == "full":
        return body
    if fov != "slab":
        raise ValueError(f"unknown field of view '{fov}' (use 'full' or 'slab')")
    half = 0.5 * slab_fraction * (body_box().upper[2] - body_box().lower[2])
    lower, upper = list(body.lower), list(body.upper)
    lower[2], upper[2] = slab_center_z - half, slab_center_z + half
    return Box(tuple(lower), tuple(upper))


def _moving_box(true: sitk.Transform, fov: str, slab_fraction: float, slab_center_z: float,
                margin_mm: float = 10.0) -> Box:
    """Box in MOVING physical space (axis-aligned) for the moving field of view.

    ``slab``: a slab along the moving grid's z axis (a scanner slab: the patient may lie oblique in it),
    centred on where the world slab centre lands, as thick as ``slab_fraction`` of the torso; its x/y
    extent covers the part of the body inside the slab.
    """
    matrix = transforms.to_matrix(true)
    body = body_box()
    axes = [np.linspace(body.lower[d], body.upper[d], n) for d, n in zip(range(3), (33, 23, 105))]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    points = points[inside_body(points)]
    moved = points @ matrix[:3, :3].T + matrix[:3, 3]
    if fov == "full":
        return Box(tuple(moved.min(0).tolist()), tuple(moved.max(0).tolist())).expanded(margin_mm)
    if fov != "slab":
        raise ValueError(f"unknown field of view '{fov}' (use 'full' or 'slab')")
    center = matrix[:3, :3] @ np.array([0.0, 0.0, slab_center_z]) + matrix[:3, 3]
    half = 0.5 * slab_fraction * (body_box().upper[2] - body_box().lower[2])
    keep = np.abs(moved[:, 2] - center[2]) <= half
    lower = moved[keep].min(0)
    upper = moved[keep].max(0)
    lower[:2] -= margin_mm
    upper[:2] += margin_mm
    lower[2], upper[2] = center[2] - half, center[2] + half
    return Box(tuple(lower.tolist()), tuple(upper.tolist()))


def _touching_border(labels: sitk.Image, task: str) -> list[str]:
    array = sitk.GetArrayViewFromImage(labels)
    faces = [array[0], array[-1], array[:, 0], array[:, -1], array[:, :, 0], array[:, :, -1]]
    touching = set()
    for face in faces:
        touching.update(int(v) for v in np.unique(face) if v)
    names = totalsegmentator_classes()[task]
    return sorted(names[v] for v in touching)


def _present(labels: sitk.Image, task: str) -> list[str]:
    names = totalsegmentator_classes()[task]
    return sorted(names[int(v)] for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v)


def make_pair(seed: int = 0, fixed_modality: str = "ct", moving_modality: str = "mr", rotation_deg: float = 10.0,
              translation_mm: float = 15.0, flip: bool = False, affine_scale: float = 0.0,
              moving_fov: str = "full", slab_fraction: float = 0.35, fixed_spacing=(2.0, 2.0, 2.0),
              moving_spacing=(2.0, 2.0, 4.0), labels: bool = True, fixed_fov: str = "full",
              slab_center_z_mm: float | None = None, noise: float | None = None, bias_field: float | None = None,
              supersample: int = 1) -> SyntheticPair:
    """A fixed/moving phantom pair related by a known transform (all seeded by ``seed``).

    The TRUE ``fixed_to_moving`` maps fixed physical LPS points to moving physical LPS points: rotation
    by exactly ``rotation_deg`` (degrees) about a random axis through the torso centre, then (``flip``)
    composed with a head-first/feet-first flip (180 degrees about the A/P axis), a translation of exactly
    ``translation_mm`` (mm) in a random direction, and with ``affine_scale`` > 0 anisotropic scales
    1 +- affine_scale and shears. The fixed image's physical space is the phantom world (identity
    header, ``fixed_fov`` "full" torso or "slab"); the moving image is on an axis-aligned grid in its own
    physical space covering the whole transformed torso (``moving_fov="full"``) or a slab along the
    moving z axis ``slab_fraction`` of the torso length thick, centred at world z ``slab_center_z_mm``
    (random in the abdomen when None), so organs are cut at the slab edges. Labels use `total` ids for
    CT and `total_mr` ids for MR. ``bias_field`` defaults to 0.2 for MR and 0 for CT.
    """
    rng = np.random.default_rng(seed)
    center = body_box().center
    true, info = _true_transform(rng, rotation_deg, translation_mm, flip, affine_scale, center)
    if slab_center_z_mm is None:
        slab_center_z_mm = float(rng.uniform(-110.0, 60.0))
    fixed_box = _region(fixed_fov, slab_fraction, slab_center_z_mm)
    fixed_grid = grid_for_box(fixed_box, fixed_spacing)
    moving_grid = grid_for_box(_moving_box(true, moving_fov, slab_fraction, slab_center_z_mm), moving_spacing)
    fixed_task = totalsegmentator_task(_modality_key(fixed_modality)) if labels else None
    moving_task = totalsegmentator_task(_modality_key(moving_modality)) if labels else None
    seeds = rng.integers(0, 2**31 - 1, size=2)

    def bias_for(modality: str) -> float:
        if bias_field is not None:
            return float(bias_field) if _modality_key(modality) != "ct" else 0.0
        return 0.0 if _modality_key(modality) == "ct" else 0.2

    fixed, fixed_labels = render(fixed_modality, fixed_grid, None, int(seeds[0]), noise, bias_for(fixed_modality),
                                 fixed_task, supersample)
    moving_to_world = np.linalg.inv(transforms.to_matrix(true))
    moving, moving_labels = render(moving_modality, moving_grid, moving_to_world, int(seeds[1]), noise,
                                   bias_for(moving_modality), moving_task, supersample)
    description = {
        "seed": int(seed), "fixed_modality": fixed_modality, "moving_modality": moving_modality,
        "fixed_fov": fixed_fov, "moving_fov": moving_fov, "slab_fraction": float(slab_fraction),
        "slab_center_z_mm": round(float(slab_center_z_mm), 3), "affine_scale": float(affine_scale),
        "true_transform": transforms.summarize(true), **info,
        "convention": "fixed_to_moving maps fixed physical LPS mm to moving physical LPS mm; fixed space = world",
    }
    if labels:
        description["fixed_structures_touching_border"] = _touching_border(fixed_labels, fixed_task)
        description["moving_structures_touching_border"] = _touching_border(moving_labels, moving_task)
        description["moving_structures_present"] = _present(moving_labels, moving_task)
    return SyntheticPair(fixed, moving, fixed_labels, moving_labels, true, fixed_task, moving_task, description)


# ------------------------------------------------------------------------------------------------ points
def body_points(pair_or_image_mask, n: int = 2000, seed: int = 0, overlap_only: bool = True) -> np.ndarray:
    """``n`` random points (N x 3, fixed physical LPS mm) inside the object, for mean point errors.

    With a :class:`SyntheticPair`: points inside the torso and the fixed image; with ``overlap_only``
    also inside the moving image's extent under the TRUE transform (the region both images show).
    With a mask image: centres of random voxels where the mask is non-zero (physical points).
    """
    rng = np.random.default_rng(seed)
    if isinstance(pair_or_image_mask, SyntheticPair):
        pair = pair_or_image_mask
        corners_lo, corners_hi = _physical_bounds(pair.fixed)
        chosen: list[np.ndarray] = []
        count = 0
        for _ in range(200):
            candidates = rng.uniform(corners_lo, corners_hi, size=(max(4 * n, 1000), 3))
            keep = inside_body(candidates) & inside_image(pair.fixed, candidates)
            if overlap_only:
                moved = candidates @ transforms.to_matrix(pair.fixed_to_moving)[:3, :3].T \
                    + transforms.to_matrix(pair.fixed_to_moving)[:3, 3]
                keep &= inside_image(pair.moving, moved)
            chosen.append(candidates[keep])
            count += int(keep.sum())
            if count >= n:
                break
        points = np.concatenate(chosen)
        if len(points) == 0:
            raise ValueError("no body points in the overlap of the two images")
        return points[:n]
    mask = pair_or_image_mask
    idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1]
    if len(idx) == 0:
        raise ValueError("empty mask")
    pick = idx[rng.choice(len(idx), size=min(n, len(idx)), replace=False)].astype(float)
    return index_to_physical_points(mask, pick)


def _physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    corners = physical_corners(image)
    return corners.min(0), corners.max(0)


def structure_centroid(labels: sitk.Image, class_id: int) -> np.ndarray | None:
    """Centroid (physical LPS mm) of one label value, None when absent."""
    idx = np.argwhere(sitk.GetArrayViewFromImage(labels) == class_id)[:, ::-1]
    if len(idx) == 0:
        return None
    return index_to_physical_points(labels, idx.mean(0))
