"""Synthetic knee: femur, tibia, fibula and patella, rendered as microCT and as MR at two knee flexion angles, with
ONE EXACT TRANSFORM PER BONE.

The anatomy (``resources/phantom_knee.json``) is analytic: each bone is a union of ellipsoids, cylinders and boxes
minus carved shapes, with a cortical shell (the shapes shrunk by ``cortex_mm``), a trabecular texture inside
(trabeculae where the sum of three plane waves fixed in the bone is near zero, about 29% bone volume, about 0.3 mm
thick at a 1.4 mm period) and fatty marrow in the shafts; cartilage covers the joint surfaces; muscle, a
subcutaneous fat layer, the infrapatellar fat pad and tendons surround the bones. microCT (``"ct"``, HU: bone
bright, soft tissue grey) and MR (``"mr"``, proton-density-like: fat and marrow bright, cortex, trabeculae and tendons
dark, cartilage intermediate) look up the same tissue map; MR gets a smooth multiplicative bias field and Rician
noise. Images are evaluated slab by slab (memory bounded by the output array: a 600^3 int16 microCT needs 432 MB
plus about 100 MB of work space) and stored as int16.

Frames (LPS mm):

* knee frame ("world", femur-fixed): origin at the centre of the joint, +x patient left, +y posterior, +z superior
  along the femur shaft;
* bone frame: each bone's own; at flexion ``theta`` (degrees) the bone's pose :func:`bone_pose` maps bone points to
  knee-frame points: femur identity; tibia and fibula turned about the flexion axis (x through
  ``flexion_axis_point_mm``) by ``theta`` with the screw-home internal rotation; patella turned about the same axis by
  ``patella_ratio * theta`` (it slides along the trochlea) and tilted;
* image frame: an image's physical space maps to the knee frame by ``image_to_world`` (4x4, physical -> knee).

Truth: the fixed physical point x shows bone b at bone point B_b(theta_f)^-1 W_f x; the moving image shows that point
at W_m^-1 B_b(theta_m) B_b(theta_f)^-1 W_f x. So ``KneePair.truths[b]`` = W_m^-1 B_b(theta_m) B_b(theta_f)^-1 W_f maps
FIXED physical points to MOVING physical points (LPS mm, ITK resampling direction), exactly, for every point of bone
b (the femur's also holds for everything fixed to the thigh, the tibia's for the fibula and the shank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import SimpleITK as sitk

from ..geometry import transforms
from ..geometry.image_space import inside_image
from ..geometry.resample import make_reference
from ..resource_files import load_resource_json

#: Tissue codes of the tissue map (index into the intensity tables).
TISSUES = ("air", "fat", "muscle", "tendon", "cartilage", "cortex", "trabecula", "marrow")
_CODE = {name: code for code, name in enumerate(TISSUES)}
#: Bones in painting order (later wins where poses make them overlap).
BONES = ("femur", "tibia", "fibula", "patella")
#: Gaussian noise standard deviation (image units) per modality when not given.
DEFAULT_NOISE = {"ct": 40.0, "mr": 20.0}
#: Points evaluated at once when rendering (bounds the work memory to about 100 MB).
CHUNK_POINTS = 250_000
#: Head-first <-> feet-first: 180 degrees about the posterior (y) axis.
FLIP_HEAD_FEET = np.diag([-1.0, 1.0, -1.0])


# ------------------------------------------------------------------------------------------------ the model
@cache
def knee_model() -> dict:
    """``resources/phantom_knee.json`` with its shapes as arrays (read once)."""
    data = load_resource_json("phantom_knee.json")
    for bone in data["bones"].values():
        bone["add"] = [_shape(s) for s in bone["add"]]
        bone["subtract"] = [_shape(s) for s in bone.get("subtract", [])]
        grow = float(bone.get("cartilage_mm", 0.0)) + 1.0
        lows = [s["center"] - s["extent"] - grow for s in bone["add"]]
        highs = [s["center"] + s["extent"] + grow for s in bone["add"]]
        bone["box"] = (np.min(lows, axis=0), np.max(highs, axis=0))
    data["soft_tissue"] = [{**_shape(s), "name": s["name"], "tissue": s["tissue"], "frame": s["frame"],
                            "fat_layer_mm": float(s.get("fat_layer_mm", 0.0))} for s in data["soft_tissue"]]
    return data


def _shape(spec: dict) -> dict:
    kind = spec["shape"]
    if kind == "ellipsoid":
        params = np.asarray(spec["semi_axes"], float)
        extent = params
    elif kind == "cylinder":
        params = np.array([*spec["radii"], spec["half_length"]], float)
        extent = params
    elif kind == "box":
        params = np.asarray(spec["half_sizes"], float)
        extent = params
    else:
        raise ValueError(f"unknown knee shape '{kind}'")
    return {"kind": kind, "center": np.asarray(spec["center"], float), "params": params, "extent": extent,
            "cortex_mm": float(spec.get("cortex_mm", 1.0))}


def _inside(shape: dict, q: tuple, grow: float = 0.0) -> np.ndarray:
    """Which bone-frame points ``q`` (x, y, z float32 arrays) lie inside ``shape`` grown by ``grow`` mm (shrunk when
    < 0). Shortcuts: all False when the points' bounding box misses the shape's, all True when the shape (convex)
    holds all 8 corners of the points' bounding box."""
    n = len(q[0])
    if n == 0:
        return np.zeros(0, bool)
    p = np.maximum(shape["params"] + grow, 1e-3)
    c = shape["center"]
    low = np.array([float(v.min()) for v in q])
    high = np.array([float(v.max()) for v in q])
    if np.any(high < c - p) or np.any(low > c + p):
        return np.zeros(n, bool)
    corners = tuple(np.array([(low, high)[(i >> d) & 1][d] for i in range(8)], np.float32) for d in range(3))
    if _inside_exact(shape, corners, p).all():
        return np.ones(n, bool)
    return _inside_exact(shape, q, p)


def _inside_exact(shape: dict, q: tuple, p: np.ndarray) -> np.ndarray:
    """Membership test of :func:`_inside` for the shape's parameters ``p`` (already grown)."""
    c = shape["center"]
    if shape["kind"] == "box":
        return ((np.abs(q[0] - np.float32(c[0])) <= p[0]) & (np.abs(q[1] - np.float32(c[1])) <= p[1])
                & (np.abs(q[2] - np.float32(c[2])) <= p[2]))
    x = (q[0] - np.float32(c[0])) * np.float32(1.0 / p[0])
    y = (q[1] - np.float32(c[1])) * np.float32(1.0 / p[1])
    total = x * x
    total += y * y
    if shape["kind"] == "ellipsoid":
        z = (q[2] - np.float32(c[2])) * np.float32(1.0 / p[2])
        total += z * z
        return total <= 1.0
    return (total <= 1.0) & (np.abs(q[2] - np.float32(c[2])) <= p[2])


def _in_zone(zone: dict | None, q: tuple) -> np.ndarray:
    if zone is None:
        return np.zeros(len(q[0]), bool)
    values = q[int(zone["axis"])]
    return (values >= zone["lower"]) & (values <= zone["upper"])


def _apply(matrix: np.ndarray, q: tuple) -> tuple:
    """Points (x, y, z arrays) through a 4x4 matrix, as float32 arrays."""
    m = matrix.astype(np.float32)
    return tuple(m[r, 0] * q[0] + m[r, 1] * q[1] + m[r, 2] * q[2] + m[r, 3] for r in range(3))


def _subset(q: tuple, index: np.ndarray) -> tuple:
    return tuple(v[index] for v in q)


# ------------------------------------------------------------------------------------------------ poses
def _rotation_x(angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([[1.0, 0.0, 0.0], [0.0, math.cos(a), -math.sin(a)], [0.0, math.sin(a), math.cos(a)]])


def _rotation_z(angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])


def _about(rotation: np.ndarray, point) -> np.ndarray:
    """4x4 rotation about ``point`` (mm)."""
    m = np.eye(4)
    m[:3, :3] = rotation
    m[:3, 3] = np.asarray(point, float) - rotation @ np.asarray(point, float)
    return m


def bone_pose(bone: str, flexion_deg: float) -> np.ndarray:
    """4x4 pose of ``bone`` at ``flexion_deg`` degrees of knee flexion: bone frame -> knee frame (LPS mm).

    Femur: identity. Tibia (and fibula): flexion about the flexion axis (x through ``flexion_axis_point_mm``: the
    shank swings posteriorly) after the screw-home internal rotation about the tibia's long axis. Patella: turned
    about the flexion axis by ``patella_ratio`` of the flexion after a tilt about its own vertical axis.
    """
    model = knee_model()
    axis_point = np.asarray(model["flexion_axis_point_mm"], float)
    spec = model["bones"][bone]
    leader = spec.get("follows", bone)
    if leader == "femur":
        return np.eye(4)
    if leader == "tibia":
        screw = _about(_rotation_z(-float(model["screw_home_deg_per_deg"]) * flexion_deg), [0.0, 4.0, 0.0])
        return _about(_rotation_x(flexion_deg), axis_point) @ screw
    centre = model["bones"]["patella"]["add"][0]["center"]
    tilt = _about(_rotation_z(float(model["patella_tilt_deg_per_deg"]) * flexion_deg), centre)
    return _about(_rotation_x(float(model["patella_ratio"]) * flexion_deg), axis_point) @ tilt


def _inverse(matrix: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = matrix[:3, :3].T
    out[:3, 3] = -matrix[:3, :3].T @ matrix[:3, 3]
    return out


@cache
def _texture_waves(anatomy_seed: int) -> dict:
    """Per bone: three wave vectors (rad/mm, bone frame) and phases of its trabecular texture (seeded)."""
    model = knee_model()
    rng = np.random.default_rng(7_000_003 + int(anatomy_seed))
    k = 2.0 * math.pi / float(model["trabecular_texture"]["period_mm"])
    waves = {}
    for bone in BONES:
        directions = rng.standard_normal((3, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        waves[bone] = ((directions * k).astype(np.float32), rng.uniform(0, 2 * math.pi, 3).astype(np.float32))
    return waves


# ------------------------------------------------------------------------------------------------ tissue map
#: Tissue code of :func:`classify` with ``texture=False`` for bone inside the trabecular zone (trabecula or marrow
#: decided later by :func:`trabeculae`); never looked up in an intensity table.
SPONGY = len(TISSUES)


def trabeculae(points: tuple, bone: str, flexion_deg: float, anatomy_seed: int = 0) -> np.ndarray:
    """Which knee-frame points (x, y, z arrays) inside ``bone``'s trabecular zone are trabeculae (else marrow)."""
    q = _apply(_inverse(bone_pose(bone, flexion_deg)), points)
    vectors, phases = _texture_waves(int(anatomy_seed))[bone]
    wave = np.zeros(len(q[0]), np.float32)
    for vector, phase in zip(vectors, phases):
        wave += np.cos(vector[0] * q[0] + vector[1] * q[1] + vector[2] * q[2] + phase)
    return np.abs(wave) < float(knee_model()["trabecular_texture"]["half_width"])


def classify(points: np.ndarray, flexion_deg: float, anatomy_seed: int = 0,
             texture: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Tissue code (:data:`TISSUES`) and bone label (0 none, else the bone's ``label``) of knee-frame points.

    ``points``: N x 3 knee-frame points (LPS mm) with the knee at ``flexion_deg`` degrees. ``anatomy_seed`` fixes the
    trabecular texture (the same in every image of one knee). ``texture=False``: bone inside the trabecular zone gets
    :data:`SPONGY` instead of trabecula / marrow.
    """
    model = knee_model()
    if isinstance(points, np.ndarray):
        points = tuple(np.ascontiguousarray(points[:, d], np.float32) for d in range(3))
    n = len(points[0])
    tissue = np.zeros(n, np.uint8)
    label = np.zeros(n, np.uint8)
    poses = {bone: bone_pose(bone, flexion_deg) for bone in BONES}
    local = {}

    def in_frame(frame: str) -> tuple:
        if frame not in local:
            local[frame] = _apply(_inverse(poses[frame]), points)
        return local[frame]

    # soft tissue: the leg (muscle inside a fat layer), then fat pad and tendons
    legs = [s for s in model["soft_tissue"] if s["tissue"] == "muscle"]
    leg = np.zeros(n, bool)
    core = np.zeros(n, bool)
    for shape in legs:
        q = in_frame(shape["frame"])
        leg |= _inside(shape, q)
        core |= _inside(shape, q, -shape["fat_layer_mm"])
    tissue[leg] = _CODE["fat"]
    tissue[core] = _CODE["muscle"]
    for shape in model["soft_tissue"]:
        if shape["tissue"] != "muscle":
            tissue[core & _inside(shape, in_frame(shape["frame"]))] = _CODE[shape["tissue"]]
    waves = _texture_waves(int(anatomy_seed))
    for bone in BONES:  # cartilage of every bone first: a bone is never covered by another bone's cartilage
        spec = model["bones"][bone]
        if spec.get("cartilage_mm", 0.0) > 0:
            index, q = _near(spec, in_frame(bone))
            if index.size:
                c = float(spec["cartilage_mm"])
                grown = _union(spec["add"], q, c) & ~_union(spec["subtract"], q, -c)
                cartilage = grown & ~_bone_outer(spec, q) & _in_zone(spec.get("cartilage_zone"), q)
                tissue[index[cartilage]] = _CODE["cartilage"]
    for bone in BONES:
        spec = model["bones"][bone]
        index, q = _near(spec, in_frame(bone))
        if not index.size:
            continue
        outer = _bone_outer(spec, q)
        index, q = index[outer], _subset(q, outer)
        inner = _bone_inner(spec, q)
        codes = np.full(len(index), _CODE["cortex"], np.uint8)
        codes[inner] = _CODE["marrow"]
        spongy = inner & _in_zone(spec.get("trabecular_zone"), q)
        if spongy.any() and not texture:
            codes[spongy] = SPONGY
        elif spongy.any():
            vectors, phases = waves[bone]
            qs = _subset(q, spongy)
            wave = np.zeros(len(qs[0]), np.float32)
            for vector, phase in zip(vectors, phases):
                wave += np.cos(vector[0] * qs[0] + vector[1] * qs[1] + vector[2] * qs[2] + phase)
            trabecula = np.abs(wave) < float(model["trabecular_texture"]["half_width"])
            codes[np.flatnonzero(spongy)[trabecula]] = _CODE["trabecula"]
        tissue[index] = codes
        label[index] = int(spec["label"])
    return tissue, label


def _near(spec: dict, q: tuple) -> tuple[np.ndarray, tuple]:
    """(indices, points) of the bone-frame points inside the bone's bounding box (cartilage included)."""
    low, high = spec["box"]
    keep = (q[0] >= low[0]) & (q[0] <= high[0])
    for d in (1, 2):
        keep &= (q[d] >= low[d]) & (q[d] <= high[d])
    index = np.flatnonzero(keep)
    return index, _subset(q, index)


def _union(shapes: list, q: tuple, grow: float = 0.0, per_shape_cortex: bool = False) -> np.ndarray:
    out = np.zeros(len(q[0]), bool)
    for shape in shapes:
        out |= _inside(shape, q, -shape["cortex_mm"] if per_shape_cortex else grow)
    return out


def _bone_outer(spec: dict, q: tuple) -> np.ndarray:
    return _union(spec["add"], q) & ~_union(spec["subtract"], q)


def _bone_inner(spec: dict, q: tuple) -> np.ndarray:
    """Inside the cortical shell: the shapes shrunk by their cortex, minus the carved shapes grown by theirs."""
    inner = _union(spec["add"], q, per_shape_cortex=True)
    for shape in spec["subtract"]:
        inner &= ~_inside(shape, q, shape["cortex_mm"])
    return inner


def intensity_table(modality: str) -> np.ndarray:
    """Intensity of each tissue code for ``modality`` ("ct": HU, "mr": arbitrary units)."""
    values = knee_model()["intensities"][_modality(modality)]
    return np.array([values[name] for name in TISSUES], np.float32)


def _modality(modality: str) -> str:
    key = modality.lower()
    if key not in ("ct", "mr"):
        raise ValueError(f"unknown knee modality '{modality}' (use 'ct' or 'mr')")
    return key


# ------------------------------------------------------------------------------------------------ rendering
def _grid_matrices(grid: dict, image_to_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, c) with knee-frame point = B @ continuous index + c."""
    direction = np.asarray(grid["direction"], float).reshape(3, 3)
    a = direction @ np.diag(np.asarray(grid["spacing"], float))
    b = image_to_world[:3, :3] @ a
    c = image_to_world[:3, :3] @ np.asarray(grid["origin"], float) + image_to_world[:3, 3]
    return b, c


def _bias_factors(size, rng: np.random.Generator, strength: float) -> list[np.ndarray]:
    """Separable smooth multiplicative field exp(strength * (linear + quadratic)) per grid axis (x, y, z)."""
    factors = []
    for n in size:
        u = np.linspace(-1.0, 1.0, int(n), dtype=np.float32)
        a, q = rng.uniform(-1, 1), rng.uniform(-0.5, 0.5)
        factors.append(np.exp(np.float32(strength) * (np.float32(a) * u + np.float32(q) * u * u)))
    return factors


def render_knee(modality: str, grid: dict, image_to_world: np.ndarray | None, flexion_deg: float,
                anatomy_seed: int = 0, noise_seed: int = 0, noise: float | None = None, bias_field: float = 0.0,
                supersample=1, labels: bool = True) -> tuple[sitk.Image, sitk.Image | None]:
    """The knee at ``flexion_deg`` degrees on ``grid``: (int16 image, UInt8 bone label map or None).

    ``grid``: {"size", "spacing" (mm), "origin" (LPS mm), "direction" (9 floats)}. ``image_to_world``: 4x4 mapping the
    image's physical points to knee-frame points (None: identity). ``modality`` "ct" (HU) or "mr". ``supersample``:
    sub-samples per voxel along each grid axis (int or 3 ints; partial volume, e.g. (2, 2, 5) for 2.5 mm MR slices);
    labels use the voxel centres. ``noise``: Gaussian standard deviation (None: :data:`DEFAULT_NOISE`; MR noise is
    Rician: the magnitude of the signal plus complex Gaussian noise). ``bias_field``: strength of a smooth
    multiplicative field (0.3: about +-35%). Labels: femur 1, tibia 2, fibula 3, patella 4 (:func:`bone_labels`).
    Evaluated in chunks of whole slices (memory: the output plus about 100 MB). Deterministic for the seeds.
    """
    key = _modality(modality)
    matrix = np.eye(4) if image_to_world is None else np.asarray(image_to_world, float)
    ss = np.broadcast_to(np.asarray(supersample, int), (3,)).astype(int)
    size = np.asarray(grid["size"], int)
    nx, ny, nz = (int(v) for v in size)
    b, c = _grid_matrices(grid, matrix)
    table = intensity_table(key)
    out = np.empty((nz, ny, nx), np.int16)
    label_out = np.zeros((nz, ny, nx), np.uint8) if labels else None
    rng = np.random.default_rng(int(noise_seed))
    sigma = DEFAULT_NOISE[key] if noise is None else float(noise)
    bias = _bias_factors(size, rng, float(bias_field)) if bias_field else None
    step = max(1, CHUNK_POINTS // max(nx * ny, 1))
    offsets = [np.array([(i + 0.5) / ss[0] - 0.5, (j + 0.5) / ss[1] - 0.5, (k + 0.5) / ss[2] - 0.5])
               for k in range(ss[2]) for j in range(ss[1]) for i in range(ss[0])]
    ii = np.arange(nx, dtype=np.float32)[None, None, :]
    jj = np.arange(ny, dtype=np.float32)[None, :, None]

    def points_of(kk: np.ndarray, batch: list) -> tuple:
        """Knee-frame points (x, y, z arrays) of the slices ``kk`` at each sub-voxel offset of ``batch``."""
        shape = (len(kk), ny, nx)
        return tuple(np.concatenate([np.broadcast_to(np.float32(b[r, 0]) * (ii + np.float32(o[0]))
                                                     + np.float32(b[r, 1]) * (jj + np.float32(o[1]))
                                                     + np.float32(b[r, 2]) * (kk + np.float32(o[2]))
                                                     + np.float32(c[r]), shape).ravel() for o in batch])
                     for r in range(3))

    blocks = _BlockMap(b, c, size, flexion_deg, anatomy_seed) if len(offsets) == 1 and size.prod() > 8e6 else None
    for k0 in range(0, nz, step):
        k1 = min(nz, k0 + step)
        kk = np.arange(k0, k1, dtype=np.float32)[:, None, None]
        total = np.zeros((k1 - k0, ny, nx), np.float32)
        if blocks is not None:  # large, one sample per voxel: uniform blocks filled without evaluating every voxel
            tissue, labels_here = blocks.classify_slices(k0, k1, lambda kk=kk: points_of(kk, offsets))
            total += table[tissue].reshape(total.shape)
            if label_out is not None:
                label_out[k0:k1] = labels_here.reshape(total.shape)
        else:
            group = max(1, CHUNK_POINTS // total.size)
            for first in range(0, len(offsets), group):
                batch = offsets[first:first + group]
                tissue, _ = classify(points_of(kk, batch), flexion_deg, anatomy_seed)
                total += table[tissue].reshape((len(batch),) + total.shape).sum(axis=0)
            total /= len(offsets)
            if label_out is not None:
                label_out[k0:k1] = classify(points_of(kk, [(0.0, 0.0, 0.0)]), flexion_deg,
                                            anatomy_seed)[1].reshape(total.shape)
        if bias is not None:
            total *= bias[2][k0:k1, None, None] * bias[1][None, :, None] * bias[0][None, None, :]
        if sigma > 0:
            if key == "mr":
                total = np.hypot(total + sigma * rng.standard_normal(total.shape, dtype=np.float32),
                                 sigma * rng.standard_normal(total.shape, dtype=np.float32))
            else:
                total += np.float32(sigma) * rng.standard_normal(total.shape, dtype=np.float32)
        out[k0:k1] = np.clip(np.rint(total), -32768, 32767).astype(np.int16)
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(make_reference(grid, sitk.sitkInt16))
    label_image = None
    if label_out is not None:
        label_image = sitk.GetImageFromArray(label_out)
        label_image.CopyInformation(image)
        name_segments(label_image, bone_labels())
    return image, label_image


class _BlockMap:
    """Coarse-to-fine evaluation of a large grid at one sample per voxel: the tissue map is evaluated on a lattice
    every :data:`BLOCK` voxels; a block whose 8 corners agree (tissue and bone) takes that tissue without evaluating
    its voxels (in the trabecular zone only the texture is evaluated); the other blocks are evaluated voxel by voxel.
    Every structure is thicker than a block (0.4 mm at 0.1 mm voxels), so blocks with agreeing corners are uniform
    up to rare corners of oblique thin layers."""

    BLOCK = 4

    def __init__(self, b: np.ndarray, c: np.ndarray, size: np.ndarray, flexion_deg: float, anatomy_seed: int):
        self.flexion, self.seed = flexion_deg, anatomy_seed
        f = self.BLOCK
        axes = [np.unique(np.r_[np.arange(0, int(n), f), int(n) - 1]) for n in size]  # x, y, z lattice indices
        self.cells = [np.minimum(np.searchsorted(a, np.arange(int(n)), side="right") - 1, max(len(a) - 2, 0))
                      for a, n in zip(axes, size)]
        kz, jy, ix = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
        points = tuple((b[r, 0] * ix + b[r, 1] * jy + b[r, 2] * kz + c[r]).astype(np.float32).ravel()
                       for r in range(3))
        tissue = np.empty(points[0].size, np.uint8)
        label = np.empty(points[0].size, np.uint8)
        for first in range(0, points[0].size, CHUNK_POINTS):
            part = tuple(p[first:first + CHUNK_POINTS] for p in points)
            tissue[first:first + CHUNK_POINTS], label[first:first + CHUNK_POINTS] = classify(
                part, flexion_deg, anatomy_seed, texture=False)
        key = (tissue.astype(np.int16) * 16 + label).reshape(kz.shape)
        if min(key.shape) < 2:
            self.uniform = np.zeros([max(s - 1, 1) for s in key.shape], bool)
            self.value = np.zeros(self.uniform.shape, np.int16)
            return
        corner = key[:-1, :-1, :-1]
        uniform = np.ones(corner.shape, bool)
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    shifted = key[dz:key.shape[0] - 1 + dz, dy:key.shape[1] - 1 + dy, dx:key.shape[2] - 1 + dx]
                    uniform &= shifted == corner
        self.uniform, self.value = uniform, corner

    def classify_slices(self, k0: int, k1: int, all_points) -> tuple[np.ndarray, np.ndarray]:
        """(tissue, label) of the voxels of slices k0..k1-1 (flattened z, y, x); ``all_points()``: their knee-frame
        points (x, y, z arrays, same order), asked for only when some voxel needs them."""
        cz, cy, cx = self.cells[2][k0:k1], self.cells[1], self.cells[0]
        uniform = self.uniform[cz][:, cy][:, :, cx].ravel()
        value = self.value[cz][:, cy][:, :, cx].ravel()
        tissue = (value // 16).astype(np.uint8)
        label = (value % 16).astype(np.uint8)
        spongy = uniform & (tissue == SPONGY)
        if (~uniform).any() or spongy.any():
            points = all_points()
            rest = np.flatnonzero(~uniform)
            if rest.size:
                tissue[rest], label[rest] = classify(tuple(p[rest] for p in points), self.flexion, self.seed)
            for bone in BONES:
                chosen = np.flatnonzero(spongy & (label == int(knee_model()["bones"][bone]["label"])))
                if chosen.size:
                    trabecula = trabeculae(tuple(p[chosen] for p in points), bone, self.flexion, self.seed)
                    tissue[chosen] = np.where(trabecula, _CODE["trabecula"], _CODE["marrow"])
        return tissue, label


def bone_labels() -> dict[int, str]:
    """{label value: bone name} of the knee's label maps."""
    return {int(spec["label"]): name for name, spec in knee_model()["bones"].items()}


def name_segments(labels: sitk.Image, names: dict[int, str]) -> sitk.Image:
    """Record {label value: name} in ``labels``' metadata as a Slicer segmentation does (``SegmentN_Name``,
    ``SegmentN_LabelValue``, ``SegmentN_Layer``), so an .nrrd / .seg.nrrd written from it carries the names."""
    for number, (value, name) in enumerate(sorted(names.items())):
        labels.SetMetaData(f"Segment{number}_Name", str(name))
        labels.SetMetaData(f"Segment{number}_LabelValue", str(int(value)))
        labels.SetMetaData(f"Segment{number}_Layer", "0")
    return labels


# ------------------------------------------------------------------------------------------------ pairs
@dataclass
class KneePair:
    """A microCT-like fixed and an MR-like moving image of one knee at two flexion angles.

    ``truths``: bone name -> exact fixed->moving transform (LPS mm) of that bone. ``fixed_to_world`` /
    ``moving_to_world``: 4x4 image physical -> knee frame of each image's pose. Labels: femur 1, tibia 2, fibula 3,
    patella 4 (names in the metadata, :func:`name_segments`).
    """

    fixed: sitk.Image
    moving: sitk.Image
    fixed_labels: sitk.Image | None
    moving_labels: sitk.Image | None
    truths: dict
    flexion_fixed_deg: float
    flexion_moving_deg: float
    fixed_to_world: np.ndarray
    moving_to_world: np.ndarray
    anatomy_seed: int
    description: dict = field(default_factory=dict)


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def _axis_angle(axis, angle_deg: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = math.radians(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * (k @ k)


def grid_centred(size, spacing, centre=(0.0, 0.0, 0.0), direction=None) -> dict:
    """Grid dict of ``size`` voxels at ``spacing`` (mm, per grid axis) centred on ``centre`` (LPS mm)."""
    size = np.asarray(size, int)
    spacing = np.asarray(spacing, float) * np.ones(3)
    direction = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)
    origin = np.asarray(centre, float) - direction @ ((size - 1) / 2.0 * spacing)
    return {"size": [int(v) for v in size], "spacing": spacing.tolist(), "origin": origin.tolist(),
            "direction": direction.ravel().tolist()}


def make_knee_pair(seed: int = 0, fixed_spacing_mm: float = 0.1, fixed_size: int = 600,
                   moving_spacing=(2.5, 0.4, 0.4), moving_extent_mm=(130.0, 150.0, 180.0),
                   flexion_fixed_deg: float | None = None, flexion_difference_deg: float | None = None,
                   placement_rotation_deg: float | None = None, placement_translation_mm: float | None = None,
                   flip: bool | None = None, labels: bool = True, moving_supersample=None,
                   fixed_noise: float | None = None, moving_noise: float | None = None,
                   bias_field: float = 0.3) -> KneePair:
    """A microCT-like fixed image of the joint and an MR-like moving image of the knee, with per-bone truths.

    Fixed: ``fixed_size``^3 voxels at ``fixed_spacing_mm`` (isotropic; 600 x 0.1 mm = a 60 mm field of view of the
    joint), centred a little anterior of the joint centre (the patella inside), the specimen turned up to 12
    degrees. Moving: sagittal MR on ``moving_spacing`` (mm per grid axis: L-R slice spacing, then in-plane A-P and
    S-I), ``moving_extent_mm`` along L-R, A-P, S-I (along the leg: femur and tibia shafts), up to 8 degrees
    oblique to the leg, then its whole header placed by a random rigid transform (``placement_rotation_deg``, up to
    30 degrees about a random axis; ``placement_translation_mm``, up to 50 mm) and, with ``flip``, turned
    head-first/feet-first. Flexion: fixed ``flexion_fixed_deg`` (0-15 degrees), moving that plus
    ``flexion_difference_deg`` (5-30 degrees). None: drawn from ``seed``. Truths: ``KneePair.truths``.
    """
    rng = np.random.default_rng(910_000 + int(seed))
    theta_f = float(rng.uniform(0.0, 15.0)) if flexion_fixed_deg is None else float(flexion_fixed_deg)
    delta = float(rng.uniform(5.0, 30.0)) if flexion_difference_deg is None else float(flexion_difference_deg)
    theta_m = theta_f + delta
    rotation = float(rng.uniform(0.0, 30.0)) if placement_rotation_deg is None else float(placement_rotation_deg)
    shift = float(rng.uniform(0.0, 50.0)) if placement_translation_mm is None else float(placement_translation_mm)
    flip = bool(rng.random() < 0.25) if flip is None else bool(flip)
    specimen_axis, specimen_angle = _unit(rng), float(rng.uniform(0.0, 12.0))
    fov_centre = np.array([0.0, -8.0, 8.0]) + rng.uniform(-3.0, 3.0, 3)
    oblique_axis, oblique_angle = _unit(rng), float(rng.uniform(0.0, 8.0))
    place_axis, shift_direction = _unit(rng), _unit(rng)
    anatomy_seed = int(rng.integers(0, 2**31 - 1))
    noise_seeds = rng.integers(0, 2**31 - 1, size=2)

    # fixed: physical = R_f (world - fov_centre): grid centred at the physical origin
    r_f = _axis_angle(specimen_axis, specimen_angle)
    fixed_to_world = np.eye(4)
    fixed_to_world[:3, :3] = r_f.T
    fixed_to_world[:3, 3] = fov_centre
    fixed_grid = grid_centred([fixed_size] * 3, [fixed_spacing_mm] * 3)
    # moving: scanner = O(world) (oblique about the joint), physical = P(scanner) (header placement, flip)
    joint = np.array([0.0, 4.0, 0.0])
    oblique = _about(_axis_angle(oblique_axis, oblique_angle), joint)
    placement_rotation = _axis_angle(place_axis, rotation)
    if flip:
        placement_rotation = placement_rotation @ FLIP_HEAD_FEET
    placement = _about(placement_rotation, joint)
    placement[:3, 3] += shift_direction * shift
    scanner_to_physical = placement
    moving_to_world = _inverse(scanner_to_physical @ oblique)
    extent = np.asarray(moving_extent_mm, float)
    spacing = np.asarray(moving_spacing, float)
    moving_size = np.maximum(np.round(extent / spacing).astype(int), 1)
    scanner_centre = joint + np.array([0.0, 12.0, 0.0])
    scanner_grid = grid_centred(moving_size, spacing, scanner_centre)
    moving_grid = dict(scanner_grid)
    moving_grid["direction"] = (scanner_to_physical[:3, :3] @ np.eye(3)).ravel().tolist()
    moving_grid["origin"] = (scanner_to_physical[:3, :3] @ np.asarray(scanner_grid["origin"])
                             + scanner_to_physical[:3, 3]).tolist()
    if moving_supersample is None:
        moving_supersample = tuple(int(max(1, math.ceil(s / 0.6))) for s in spacing)
    fixed, fixed_labels = render_knee("ct", fixed_grid, fixed_to_world, theta_f, anatomy_seed, int(noise_seeds[0]),
                                      fixed_noise, 0.0, 1, labels)
    moving, moving_labels = render_knee("mr", moving_grid, moving_to_world, theta_m, anatomy_seed,
                                        int(noise_seeds[1]), moving_noise, bias_field, moving_supersample, labels)
    truths = {}
    for bone in BONES:
        matrix = _inverse(moving_to_world) @ bone_pose(bone, theta_m) @ _inverse(bone_pose(bone, theta_f)) \
            @ fixed_to_world
        truths[bone] = transforms.affine_from_matrix(matrix)
    description = {
        "seed": int(seed), "flexion_fixed_deg": round(theta_f, 3), "flexion_moving_deg": round(theta_m, 3),
        "flexion_difference_deg": round(delta, 3), "placement_rotation_deg": round(rotation, 3),
        "placement_translation_mm": round(shift, 3), "flip_head_feet": flip,
        "specimen_rotation_deg": round(specimen_angle, 3), "mr_obliquity_deg": round(oblique_angle, 3),
        "fixed_fov_centre_knee_mm": [round(float(v), 3) for v in fov_centre],
        "fixed_size": list(fixed.GetSize()), "fixed_spacing_mm": list(fixed.GetSpacing()),
        "moving_size": list(moving.GetSize()), "moving_spacing_mm": [float(v) for v in spacing],
        "moving_supersample": [int(v) for v in np.broadcast_to(np.asarray(moving_supersample), (3,))],
        "anatomy_seed": anatomy_seed,
        "convention": "truths[bone] maps FIXED physical LPS mm to MOVING physical LPS mm for that bone's points",
    }
    return KneePair(fixed, moving, fixed_labels, moving_labels, truths, theta_f, theta_m, fixed_to_world,
                    moving_to_world, anatomy_seed, description)


def bone_points(pair: KneePair, bone: str, n: int = 2000, seed: int = 0, max_rounds: int = 60) -> np.ndarray:
    """Up to ``n`` random points (N x 3, fixed physical LPS mm) of ``bone`` that both images show: inside the fixed
    image, inside the bone in the fixed pose, and inside the moving image under the bone's truth. Empty (0 x 3) when
    the fixed image does not show the bone."""
    rng = np.random.default_rng(int(seed))
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)
    size = np.asarray(pair.fixed.GetSize(), float)
    from ..geometry.image_space import index_to_physical_points

    box = index_to_physical_points(pair.fixed, corners * size - 0.5)
    low, high = box.min(0), box.max(0)
    label = int(knee_model()["bones"][bone]["label"])
    truth = transforms.to_matrix(pair.truths[bone])
    chosen, count = [], 0
    for _ in range(max_rounds):
        candidates = rng.uniform(low, high, size=(20000, 3))
        keep = inside_image(pair.fixed, candidates)
        world = candidates @ pair.fixed_to_world[:3, :3].T + pair.fixed_to_world[:3, 3]
        keep &= classify(world, pair.flexion_fixed_deg, pair.anatomy_seed)[1] == label
        keep &= inside_image(pair.moving, candidates @ truth[:3, :3].T + truth[:3, 3])
        chosen.append(candidates[keep])
        count += int(keep.sum())
        if count >= n:
            break
    points = np.concatenate(chosen) if chosen else np.zeros((0, 3))
    return points[:n]
