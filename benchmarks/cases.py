"""Benchmark cases with EXACT known transforms (fixed physical LPS mm -> moving physical LPS mm): the one case
generator of ``benchmarks/run.py``.

Families (``FAMILIES``: name -> :class:`Family`, the case maker plus its table title and default methods):

* ``synthetic``: ``phantoms.make_pair`` CT-like torso (fixed, TotalSegmentator ``total`` labels) and an
  MR-like T1/T2 image (moving, ``total_mr`` labels) with anisotropic spacing (1.2 x 1.2 x 4-6 mm), bias
  field, noise, half of them a partial field of view (slab of 30-60% of the torso), random rigid offsets
  (rotation 0-30 degrees about a random axis, translation 0-120 mm) and in a third of the cases a
  head-first/feet-first flip. Truth = ``pair.fixed_to_moving``.
* ``phantom``: the real MRI-DIR phantom pair (CT fixed, T2 MR moving). The MR header is rewritten by a
  random rigid perturbation P (pixels untouched: origin -> P(origin), direction -> R_P direction), a third
  with an extra 180 degree flip, half cropped to 40-70% of the MR slices. Scored by the FAIR RULE of the
  shared reference (``../shared/data/mridir-phantom/reference/README.md``; :func:`fair_truths`): the pair is
  not rigid, so the truth is P o rigid o L, L the least-squares rigid fit of the deformable reference over
  the CT object points the (cropped) MR shows, and a result passes within 3.5 mm of it or of P o rigid.
* ``microct``: a microCT-like image (400^3 voxels at 0.1 mm, 10x scaled-down torso phantom) against an
  MR-like image of the same object at 0.5 x 0.5 x 3 mm (a 10-30x voxel size difference), random rigid
  offset (0-20 degrees, 0-10 mm).
* ``slab``: the search study's thin slabs (docs/search.md, "Synthetic partial field of view"): CT-like torso
  at 2 mm, MR-like slab at 1.5 x 1.5 x 4 mm covering 20-40% of the torso length, rotation 0-30 degrees,
  translation 0-250 mm, every third case flipped head/feet, no label maps.
* ``phantom-search``: the search study's phantom cases (docs/search.md, "Phantom pair, 50 random
  perturbations"): the ``phantom`` idea drawn as that study drew it (one random stream for all cases, a
  flip with probability 1/3, a crop to 35-70% of the slices with probability 1/2); fair rule.
* ``phantom-fair``: the accuracy study of the fair rule (docs/benchmarks.md): 50 perturbations drawn from
  their own seeds, even cases full field of view, odd cases cropped to 30-70% of the MR slices, a third
  with an extra 180 degree flip; fair rule.
* ``anatomy``: the anatomy study (docs/anatomy.md, "Measured"): CT-like torso at 3 mm with ``total`` labels,
  MR-like image with ``total_mr`` labels at 2.5 x 2.5 x 3-5 mm, rotation 0-40 degrees, translation 0-150 mm,
  a flip in ~1/3, an MR slab of 30-50% in ~3/4 of the cases, partial volume (``supersample=2``). The methods
  run with the case's own seed (``info["method_seed"]``), as that study did.
* ``anatomy-cut``: like ``anatomy``, but every case an MR slab of 15-50% and every odd case the CT cut to a
  35-70% window too: structures cut by one field of view, the other, or both (docs/anatomy.md).

Every case is written once into ``benchmarks/results/cache/`` (git-ignored) as uncompressed .mha plus a
JSON file, so runner subprocesses read it without regenerating it. Error of a result (:func:`score`): mean
distance (mm) between where the true and the estimated transforms send points inside the object (for all
families but ``anatomy``: inside both fields of view; ``points``, fixed physical LPS mm); with alternative
truths (the phantom families) the smallest of those distances, and success within the case's
``tolerance_mm`` (2.5 mm; the phantom families' fair rule 3.5 mm).

To add a family: write ``def knee_case(index: int, seed: int = 0) -> Case`` (cache folder, exact truth,
scoring points) and add ``"knee": Family(knee_case, "title", methods=(...))`` to ``FAMILIES``.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MultimodalPrealign"))

from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.geometry.masks import foreground_mask, mask_centroid_and_axes
from MultimodalPrealignLib.synthetic import phantoms

DATA = REPO.parent / "shared" / "data" / "mridir-phantom"
#: The phantom pair's shared reference (its README states the fair scoring rule): the whole-object rigid
#: reference (fixed CT -> moving MR, LPS mm) and the deformable reference's displacement field u on the CT grid.
RIGID_REFERENCE = DATA / "reference" / "rigid_ct_to_mr.tfm"
DEFORMABLE_REFERENCE = DATA / "reference" / "deformable_u_ct.nrrd"
CACHE = REPO / "benchmarks" / "results" / "cache"
SUCCESS_MM = 2.5
#: Tolerance of the fair rule: 2.5 mm plus 1 mm of reference uncertainty (the reference's README).
FAIR_TOLERANCE_MM = 3.5
#: The fair rule's CT object: -300..4000 HU, largest connected component.
CT_OBJECT_HU = (-300.0, 4000.0)
FLIPS = {"L": np.diag([1.0, -1.0, -1.0]), "P": np.diag([-1.0, 1.0, -1.0]), "S": np.diag([-1.0, -1.0, 1.0])}


@dataclass
class Case:
    """One benchmark case on disk. ``truth``: 4x4 fixed->moving (LPS mm). Paths are absolute strings.

    ``info`` describes the case (printed with the rows); ``info["method_seed"]``, when present, is the seed the
    methods run with on this case instead of the run's ``--seed``.
    """

    family: str
    index: int
    fixed: str
    moving: str
    truth: list
    points: str
    info: dict = field(default_factory=dict)
    fixed_labels: str | None = None
    moving_labels: str | None = None
    fixed_task: str | None = None
    moving_task: str | None = None
    #: Other acceptable truths (4x4 fixed->moving): the error is the distance to the nearest one.
    alternatives: list = field(default_factory=list)
    #: Success when the error is at most this (mm).
    tolerance_mm: float = SUCCESS_MM

    @property
    def name(self) -> str:
        return f"{self.family}-{self.index:03d}"

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @staticmethod
    def from_json(data: dict) -> Case:
        return Case(**data)


def mean_error_mm(estimate: np.ndarray, truth: np.ndarray, points: np.ndarray) -> float:
    """Mean distance (mm) between estimate(p) and truth(p) over ``points`` (N x 3, fixed LPS mm)."""
    a = points @ estimate[:3, :3].T + estimate[:3, 3]
    b = points @ truth[:3, :3].T + truth[:3, 3]
    return float(np.mean(np.linalg.norm(a - b, axis=1)))


def score(case: Case, estimate: np.ndarray, points: np.ndarray | None = None) -> tuple[float, bool, list[float]]:
    """(error mm, success, error against each truth) of an estimated 4x4 fixed->moving matrix on ``case``.

    The error is the mean point distance (:func:`mean_error_mm`) to the nearest of ``case.truth`` and
    ``case.alternatives``; success when it is at most ``case.tolerance_mm``.
    """
    points = np.load(case.points) if points is None else points
    estimate = np.asarray(estimate, float)
    errors = [mean_error_mm(estimate, np.asarray(t, float), points) for t in [case.truth, *case.alternatives]]
    return min(errors), bool(min(errors) <= case.tolerance_mm), errors


def _rotation(axis, angle_deg: float) -> np.ndarray:
    return phantoms.rotation_about_axis(axis, angle_deg)


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def with_header_moved(image: sitk.Image, p: np.ndarray) -> sitk.Image:
    """Same pixels; every voxel's physical position x becomes P(x) (P: 4x4 rigid, LPS mm)."""
    out = sitk.Image(image)
    out.SetOrigin((p[:3, :3] @ np.asarray(image.GetOrigin()) + p[:3, 3]).tolist())
    out.SetDirection((p[:3, :3] @ np.asarray(image.GetDirection()).reshape(3, 3)).ravel().tolist())
    return out


def _write(image: sitk.Image, path: Path) -> str:
    sitk.WriteImage(image, str(path), False)
    return str(path)


def _store(case: Case, folder: Path) -> Case:
    (folder / "case.json").write_text(json.dumps(case.to_json(), indent=1))
    return case


def _open_case(folder: Path) -> Case | None:
    """The case cached in ``folder``, or None after creating the folder for a new one."""
    path = folder / "case.json"
    if path.exists():
        return Case.from_json(json.loads(path.read_text()))
    folder.mkdir(parents=True, exist_ok=True)
    return None


# ---------------------------------------------------------------------------------------------- synthetic
def synthetic_case(index: int, seed: int = 0) -> Case:
    folder = CACHE / f"synthetic_s{seed}_{index:03d}"
    cached = _open_case(folder)
    if cached is not None:
        return cached
    rng = np.random.default_rng(10_000 + 97 * seed + index)
    slab = index % 2 == 1
    flip = index % 3 == 0
    rotation = float(rng.uniform(0, 30))
    translation = float(rng.uniform(0, 120))
    fraction = float(rng.uniform(0.3, 0.6))
    modality = "mr_t1" if index % 4 < 2 else "mr_t2"
    z_spacing = float(rng.uniform(4.0, 6.0))
    pair = phantoms.make_pair(seed=seed * 1000 + index, fixed_modality="ct", moving_modality=modality,
                              rotation_deg=rotation, translation_mm=translation, flip=flip,
                              moving_fov="slab" if slab else "full", slab_fraction=fraction,
                              fixed_spacing=(1.5, 1.5, 1.5), moving_spacing=(1.2, 1.2, z_spacing),
                              labels=True, bias_field=0.3)
    points = phantoms.body_points(pair, n=2000, seed=index, overlap_only=True)
    np.save(folder / "points.npy", points)
    info = {"rotation_deg": round(rotation, 2), "translation_mm": round(translation, 1), "flip": flip,
            "moving_fov": "slab" if slab else "full", "slab_fraction": round(fraction, 3) if slab else None,
            "moving_modality": modality, "moving_spacing_mm": [1.2, 1.2, round(z_spacing, 2)]}
    case = Case("synthetic", index, _write(pair.fixed, folder / "fixed.mha"),
                _write(pair.moving, folder / "moving.mha"), transforms.to_matrix(pair.fixed_to_moving).tolist(),
                str(folder / "points.npy"), info, _write(pair.fixed_labels, folder / "fixed_labels.mha"),
                _write(pair.moving_labels, folder / "moving_labels.mha"), pair.fixed_task, pair.moving_task)
    return _store(case, folder)


# ---------------------------------------------------------------------------------------------- phantom
def phantom_available() -> bool:
    return all(path.exists() for path in (DATA / "ct.nrrd", DATA / "mr_t2.nrrd", RIGID_REFERENCE,
                                          DEFORMABLE_REFERENCE))


@functools.cache
def _reference_key() -> str:
    """Short hash of the two reference files: phantom caches are keyed by it, so a new reference never meets
    truths computed from an old one."""
    import hashlib

    digest = hashlib.sha1(RIGID_REFERENCE.read_bytes())
    digest.update(DEFORMABLE_REFERENCE.read_bytes())
    return digest.hexdigest()[:10]


def ct_object_points(ct: sitk.Image, n: int = 4000, seed: int = 0) -> np.ndarray:
    """``n`` random CT object points (N x 3, CT physical LPS mm): voxel centres of a ~1.5 mm box-averaged copy
    in ``CT_OBJECT_HU`` that belong to its largest connected component (the meat block, not loose bits)."""
    from scipy import ndimage

    factors = [max(1, int(round(1.5 / s))) for s in ct.GetSpacing()]
    small = sitk.BinShrink(sitk.Cast(ct, sitk.sitkFloat32), factors)
    array = sitk.GetArrayViewFromImage(small)
    inside = (array >= CT_OBJECT_HU[0]) & (array <= CT_OBJECT_HU[1])
    labels, count = ndimage.label(inside)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    mask = sitk.GetImageFromArray((labels == int(np.argmax(sizes))).astype(np.uint8))
    mask.CopyInformation(small)
    return phantoms.body_points(mask, n=n, seed=seed)


def _phantom_base() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rigid reference 4x4, CT object points x, x + u(x) of the deformable reference, MR body centroid), cached
    per reference content. Every point is in CT physical LPS mm (the MR centroid in MR physical LPS mm)."""
    folder = CACHE / f"phantom_fair_base_{_reference_key()}"
    names = ("rigid", "points", "displaced", "mr_centroid")
    if all((folder / f"{name}.npy").exists() for name in names):
        return tuple(np.load(folder / f"{name}.npy") for name in names)
    folder.mkdir(parents=True, exist_ok=True)
    rigid = transforms.to_matrix(transforms.read_transform(RIGID_REFERENCE))
    points = ct_object_points(sitk.ReadImage(str(DATA / "ct.nrrd")))
    field_image = sitk.Cast(sitk.ReadImage(str(DEFORMABLE_REFERENCE)), sitk.sitkVectorFloat64)
    displacement = sitk.DisplacementFieldTransform(field_image)
    displaced = np.array([displacement.TransformPoint(tuple(float(v) for v in x)) for x in points])
    centroid = mask_centroid_and_axes(foreground_mask(sitk.ReadImage(str(DATA / "mr_t2.nrrd"))))[0]
    for name, value in zip(names, (rigid, points, displaced, centroid)):
        np.save(folder / f"{name}.npy", value)
    return rigid, points, displaced, centroid


def fair_truths(p: np.ndarray, moving: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fair rule for the phantom pair's MR moved by ``p`` (4x4 rigid, pixels untouched) and maybe cropped to
    ``moving``: (slab-local truth P o rigid o L, whole-object truth P o rigid, scoring points).

    Scoring points: the CT object points whose TRUE position P(rigid(x + u(x))) lies inside ``moving`` (the MR
    the method sees). L: the least-squares rigid fit (Kabsch) of x -> x + u(x) over exactly those points. All
    4x4 fixed CT -> moving MR physical LPS mm.
    """
    from MultimodalPrealignLib.geometry.image_space import inside_image
    from MultimodalPrealignLib.prealign.anatomy import kabsch

    rigid, points, displaced, _ = _phantom_base()
    whole = p @ rigid
    keep = inside_image(moving, displaced @ whole[:3, :3].T + whole[:3, 3])
    local = kabsch(points[keep], displaced[keep])
    return whole @ local, whole, points[keep]


def phantom_case(index: int, seed: int = 0) -> Case:
    folder = CACHE / f"phantom_s{seed}_{index:03d}_{_reference_key()}"
    cached = _open_case(folder)
    if cached is not None:
        return cached
    centroid = _phantom_base()[3]
    rng = np.random.default_rng(20_000 + 97 * seed + index)
    angle = float(rng.uniform(0, 30))
    r = _rotation(_unit(rng), angle)
    flip = None
    if index % 3 == 2:
        flip = str(rng.choice(list(FLIPS)))
        r = r @ FLIPS[flip]
    shift = _unit(rng) * float(rng.uniform(0, 100))
    mr = sitk.ReadImage(str(DATA / "mr_t2.nrrd"))
    crop = None
    if index % 2 == 1:
        n_slices = mr.GetSize()[2]
        keep = max(2, int(round(float(rng.uniform(0.4, 0.7)) * n_slices)))
        start = int(rng.integers(0, n_slices - keep + 1))
        crop = {"first_slice": start, "slices": keep}
    return _perturbed_phantom_case("phantom", index, folder, mr, _perturbation(r, shift, centroid), crop,
                                   {"rotation_deg": round(angle, 2), "flip_about": flip,
                                    "translation_mm": round(float(np.linalg.norm(shift)), 1)})


def _perturbation(r: np.ndarray, shift: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """4x4 rigid P (LPS mm): rotation ``r`` about ``centre``, then ``shift``."""
    p = np.eye(4)
    p[:3, :3] = r
    p[:3, 3] = centre + shift - r @ centre
    return p


def _perturbed_phantom_case(family: str, index: int, folder: Path, mr: sitk.Image, p: np.ndarray, crop: dict | None,
                            info: dict) -> Case:
    """The real CT against the MR with its header moved by ``p`` (pixels untouched) and its slices cut to ``crop``
    (``first_slice``, ``slices``), scored by the fair rule (:func:`fair_truths`): truth P o rigid o L, alternative
    P o rigid, tolerance 3.5 mm, at the CT object points that the moved (and possibly cropped) MR shows."""
    moving = with_header_moved(mr, p)
    if crop is not None:
        moving = moving[:, :, crop["first_slice"]:crop["first_slice"] + crop["slices"]]
    local, whole, points = fair_truths(p, moving)
    np.save(folder / "points.npy", points)
    info = {**info, "crop": crop, "truth": "fair rule: P o rigid o L (slab-local), or P o rigid; 3.5 mm",
            "slab_local_vs_rigid_mm": round(mean_error_mm(local, whole, points), 3)}
    case = Case(family, index, str(DATA / "ct.nrrd"), _write(moving, folder / "moving.mha"), local.tolist(),
                str(folder / "points.npy"), info, alternatives=[whole.tolist()], tolerance_mm=FAIR_TOLERANCE_MM)
    return _store(case, folder)


def phantom_fair_case(index: int, seed: int = 0) -> Case:
    """The fair-rule study's case ``index``: MR header perturbed (rotation 0-30 degrees, shift 0-100 mm, every
    3rd an extra 180 degree flip about L, P or S), every odd case cropped to 30-70% of the MR slices."""
    folder = CACHE / f"phantom_fair_s{seed}_{index:03d}_{_reference_key()}"
    cached = _open_case(folder)
    if cached is not None:
        return cached
    centroid = _phantom_base()[3]
    rng = np.random.default_rng(50_000 + 97 * seed + index)
    angle = float(rng.uniform(0, 30))
    r = _rotation(_unit(rng), angle)
    flip = None
    if index % 3 == 2:
        flip = str(rng.choice(list(FLIPS)))
        r = r @ FLIPS[flip]
    shift = _unit(rng) * float(rng.uniform(0, 100))
    mr = sitk.ReadImage(str(DATA / "mr_t2.nrrd"))
    crop = None
    if index % 2 == 1:
        n_slices = mr.GetSize()[2]
        keep = max(2, int(round(float(rng.uniform(0.3, 0.7)) * n_slices)))
        start = int(rng.integers(0, n_slices - keep + 1))
        crop = {"fraction": round(keep / n_slices, 3), "first_slice": start, "slices": keep}
    return _perturbed_phantom_case("phantom-fair", index, folder, mr, _perturbation(r, shift, centroid), crop,
                                   {"rotation_deg": round(angle, 2), "flip_about": flip,
                                    "translation_mm": round(float(np.linalg.norm(shift)), 1)})


# ---------------------------------------------------------------------------------------------- microCT
MICROCT_SCALE = 10.0  # world (torso, mm) = 10 x physical (a 40 mm "mouse-sized" torso)


def _render_int16(modality: str, grid: dict, image_to_world: np.ndarray, seed: int, noise: float,
                  slices: int = 16) -> sitk.Image:
    """``phantoms.render`` stored as int16 (rounded, as a scanner stores HU), rendered ``slices`` slices at a time
    (each slab's noise from its own seed) so a 1024^3 grid never holds its float32 arrays whole."""
    size, spacing = [int(v) for v in grid["size"]], np.asarray(grid["spacing"], float)
    direction = np.asarray(grid["direction"], float).reshape(3, 3)
    out = np.empty(size[::-1], dtype=np.int16)
    for number, start in enumerate(range(0, size[2], slices)):
        thickness = min(slices, size[2] - start)
        origin = np.asarray(grid["origin"], float) + direction @ (spacing * [0.0, 0.0, start])
        slab_grid = dict(grid, size=size[:2] + [thickness], origin=origin.tolist())
        slab, _ = phantoms.render(modality, slab_grid, image_to_world, seed=seed * 10_000 + number, noise=noise)
        out[start:start + thickness] = np.clip(np.rint(sitk.GetArrayViewFromImage(slab)), -32768, 32767)
    image = sitk.GetImageFromArray(out)
    del out
    image.CopyInformation(phantoms.make_reference(dict(grid, size=size), sitk.sitkUInt8))
    return image


def microct_case(index: int, seed: int = 0, size: int = 400, pixel: str = "float32") -> Case:
    """microCT-like fixed (``size``^3 at 0.1 mm) vs MR-like moving (0.5 x 0.5 x 3 mm) of the same object.

    ``pixel``: the images' stored type, "float32" or "int16" (as scanners store them; the fixed one rendered in
    slabs, which a 1024^3 grid needs)."""
    folder = CACHE / (f"microct_s{seed}_{index:03d}_{size}" + ("" if pixel == "float32" else f"_{pixel}"))
    cached = _open_case(folder)
    if cached is not None:
        return cached
    rng = np.random.default_rng(30_000 + 97 * seed + index)
    scale = np.diag([MICROCT_SCALE] * 3 + [1.0])
    world_center = np.asarray(phantoms.body_box().center)
    center = world_center / MICROCT_SCALE
    rotation = float(rng.uniform(0, 20))
    true = phantoms.rigid_transform(_rotation(_unit(rng), rotation), _unit(rng) * float(rng.uniform(0, 10)), center)
    truth = transforms.to_matrix(true)
    spacing = 0.1
    fixed_grid = phantoms.grid_for([size * spacing] * 3, [spacing] * 3, center=center.tolist())
    if pixel == "int16":
        fixed = _render_int16("ct", fixed_grid, scale, seed * 100 + index, 25.0)
    else:
        fixed, _ = phantoms.render("ct", fixed_grid, scale, seed=seed * 100 + index, noise=25.0)
    body = phantoms.body_box()
    extent = (np.asarray(body.upper) - np.asarray(body.lower)) / MICROCT_SCALE + 4.0
    moving_center = truth[:3, :3] @ center + truth[:3, 3]
    moving_grid = phantoms.grid_for(extent.tolist(), [0.5, 0.5, 3.0], center=moving_center.tolist())
    moving, _ = phantoms.render("mr_t2", moving_grid, scale @ np.linalg.inv(truth), seed=seed * 100 + index + 1,
                                bias_field=0.3, supersample=2)
    if pixel == "int16":
        moving = sitk.Cast(sitk.Round(moving), sitk.sitkInt16)
    points_world = np.random.default_rng(index).uniform(body.lower, body.upper, size=(20000, 3))
    points_world = points_world[phantoms.inside_body(points_world)]
    points = points_world / MICROCT_SCALE
    from MultimodalPrealignLib.geometry.image_space import inside_image

    keep = inside_image(fixed, points) & inside_image(moving, points @ truth[:3, :3].T + truth[:3, 3])
    np.save(folder / "points.npy", points[keep][:2000])
    info = {"rotation_deg": round(rotation, 2), "fixed_size": [size] * 3, "fixed_spacing_mm": [spacing] * 3,
            "fixed_pixel": pixel,
            "moving_size": list(moving.GetSize()), "moving_spacing_mm": [0.5, 0.5, 3.0]}
    case = Case("microct", index, _write(fixed, folder / "fixed.mha"), _write(moving, folder / "moving.mha"),
                truth.tolist(), str(folder / "points.npy"), info)
    return _store(case, folder)


# ---------------------------------------------------------------------------------------------- slab
def slab_case(index: int, seed: int = 0) -> Case:
    """The search study's synthetic thin slab ``index`` (CT-like torso at 2 mm vs MR-like slab of 20-40%)."""
    folder = CACHE / f"slab_s{seed}_{index:03d}"
    cached = _open_case(folder)
    if cached is not None:
        return cached
    rng = np.random.default_rng(seed + 1000)  # one stream for all cases: replay the draws of the cases before
    for _ in range(index + 1):
        fraction = float(rng.uniform(0.2, 0.4))
        angle = float(rng.uniform(0, 30))
        shift = float(rng.uniform(0, 250))
    flip = index % 3 == 0
    pair = phantoms.make_pair(seed=seed + 7919 * index, moving_fov="slab", slab_fraction=fraction,
                              rotation_deg=angle, translation_mm=shift, flip=flip, labels=False,
                              fixed_spacing=(2.0, 2.0, 2.0), moving_spacing=(1.5, 1.5, 4.0))
    np.save(folder / "points.npy", phantoms.body_points(pair, n=2000, seed=index, overlap_only=True))
    info = {"rotation_deg": round(angle, 2), "flip_about": "P" if flip else None, "translation_mm": round(shift, 1),
            "slab_fraction": round(fraction, 3)}
    case = Case("slab", index, _write(pair.fixed, folder / "fixed.mha"), _write(pair.moving, folder / "moving.mha"),
                transforms.to_matrix(pair.fixed_to_moving).tolist(), str(folder / "points.npy"), info)
    return _store(case, folder)


# ---------------------------------------------------------------------------------------------- phantom-search
def _search_study_rotation(axis, angle_deg: float) -> np.ndarray:
    """Rotation matrix of ``angle_deg`` degrees about ``axis``, computed as the search study computed it."""
    from MultimodalPrealignLib.prealign import search

    return search.rotation_vector_matrix(np.asarray(axis, float) / np.linalg.norm(axis) * math.radians(angle_deg))


def _search_study_draws(index: int, seed: int, n_slices: int) -> tuple[float, np.ndarray, str | None, float, dict]:
    """(angle deg, rotation 3x3, flip axis, shift vector, crop) of case ``index``: one stream for all cases."""
    rng = np.random.default_rng(seed)
    for _ in range(index + 1):
        angle = float(rng.uniform(0, 30))
        r = _search_study_rotation(_unit(rng), angle)
        flip = None
        if rng.uniform() < 1 / 3:
            flip = str(rng.choice(list(FLIPS)))
            r = r @ FLIPS[flip]
        shift = _unit(rng) * float(rng.uniform(0, 100))
        crop = None
        if rng.uniform() < 0.5:
            keep = max(2, int(round(float(rng.uniform(0.35, 0.70)) * n_slices)))
            start = int(rng.integers(0, n_slices - keep + 1))
            crop = {"fraction": round(keep / n_slices, 3), "first_slice": start, "slices": keep}
    return angle, r, flip, shift, crop


def phantom_search_case(index: int, seed: int = 0) -> Case:
    """The search study's phantom case ``index``: MR header perturbed, possibly cropped; fair rule."""
    folder = CACHE / f"phantom_search_s{seed}_{index:03d}_{_reference_key()}"
    cached = _open_case(folder)
    if cached is not None:
        return cached
    centroid = _phantom_base()[3]
    mr = sitk.ReadImage(str(DATA / "mr_t2.nrrd"))
    angle, r, flip, shift, crop = _search_study_draws(index, seed, mr.GetSize()[2])
    return _perturbed_phantom_case("phantom-search", index, folder, mr, _perturbation(r, shift, centroid), crop,
                                   {"rotation_deg": round(angle, 2), "flip_about": flip,
                                    "translation_mm": round(float(np.linalg.norm(shift)), 1)})


# ---------------------------------------------------------------------------------------------- anatomy
def anatomy_case(index: int, seed: int = 0) -> Case:
    """The anatomy study's case ``index``: torso with labels, random pose, MR slab in ~3/4 of the cases."""
    case_seed = 1000 * (seed + 1) + index  # the study's seed of the phantom and of every method run on it
    folder = CACHE / f"anatomy_s{seed}_{index:03d}"
    cached = _open_case(folder)
    if cached is not None:
        return cached
    rng = np.random.default_rng(case_seed)
    rotation = float(rng.uniform(0.0, 40.0))
    translation = float(rng.uniform(0.0, 150.0))
    flip = bool(rng.random() < 1 / 3)
    fov = "slab" if rng.random() < 0.75 else "full"
    fraction = float(rng.uniform(0.3, 0.5))
    moving_spacing = (2.5, 2.5, float(rng.choice([3.0, 4.0, 5.0])))
    pair = phantoms.make_pair(seed=case_seed, rotation_deg=rotation, translation_mm=translation, flip=flip,
                              moving_fov=fov, slab_fraction=fraction, fixed_spacing=(3.0, 3.0, 3.0),
                              moving_spacing=moving_spacing, supersample=2)
    np.save(folder / "points.npy", phantoms.body_points(pair, 2000, seed=case_seed))
    info = {"rotation_deg": round(rotation, 2), "translation_mm": round(translation, 1), "flip": flip,
            "moving_fov": fov, "slab_fraction": round(fraction, 3) if fov == "slab" else None,
            "moving_spacing_mm": list(moving_spacing),
            "moving_structures_cut": len(pair.description["moving_structures_touching_border"]),
            "method_seed": case_seed}
    case = Case("anatomy", index, _write(pair.fixed, folder / "fixed.mha"),
                _write(pair.moving, folder / "moving.mha"), transforms.to_matrix(pair.fixed_to_moving).tolist(),
                str(folder / "points.npy"), info, _write(pair.fixed_labels, folder / "fixed_labels.mha"),
                _write(pair.moving_labels, folder / "moving_labels.mha"), pair.fixed_task, pair.moving_task)
    return _store(case, folder)


def anatomy_cut_case(index: int, seed: int = 0) -> Case:
    """Structures cut by BOTH fields of view: torso with labels (CT-like, 3 mm) whose every odd case is cut to a
    35-70% window along z, against an MR-like slab of 15-50% of the torso (2.5 x 2.5 x 3-5 mm, labels), rotation
    0-40 degrees, translation 0-200 mm, a flip in ~1/3, partial volume. The CT window covers part of the MR slab
    (its centre within half a window of the slab centre), so organs are cut by one image, the other, or both."""
    case_seed = 60_000 + 1000 * seed + index
    folder = CACHE / f"anatomy_cut_s{seed}_{index:03d}"
    cached = _open_case(folder)
    if cached is not None:
        return cached
    rng = np.random.default_rng(case_seed)
    rotation = float(rng.uniform(0.0, 40.0))
    translation = float(rng.uniform(0.0, 200.0))
    flip = bool(rng.random() < 1 / 3)
    fraction = float(rng.uniform(0.15, 0.5))
    centre_z = float(rng.uniform(-130.0, 80.0))
    moving_spacing = (2.5, 2.5, float(rng.choice([3.0, 4.0, 5.0])))
    pair = phantoms.make_pair(seed=case_seed, rotation_deg=rotation, translation_mm=translation, flip=flip,
                              moving_fov="slab", slab_fraction=fraction, slab_center_z_mm=centre_z,
                              fixed_spacing=(3.0, 3.0, 3.0), moving_spacing=moving_spacing, supersample=2)
    window = None
    if index % 2 == 1:
        n_z = pair.fixed.GetSize()[2]
        keep = int(round(float(rng.uniform(0.35, 0.7)) * n_z))
        centre = pair.fixed.TransformPhysicalPointToContinuousIndex((0.0, 0.0, centre_z))[2]
        first = int(np.clip(round(centre + float(rng.uniform(-0.5, 0.5)) * keep - keep / 2), 0, n_z - keep))
        pair.fixed = pair.fixed[:, :, first:first + keep]
        pair.fixed_labels = pair.fixed_labels[:, :, first:first + keep]
        window = {"first_slice": first, "slices": keep, "of": n_z}
    np.save(folder / "points.npy", phantoms.body_points(pair, 2000, seed=case_seed, overlap_only=True))
    info = {"rotation_deg": round(rotation, 2), "translation_mm": round(translation, 1), "flip": flip,
            "moving_fov": "slab", "slab_fraction": round(fraction, 3), "fixed_window": window,
            "moving_spacing_mm": list(moving_spacing), "method_seed": case_seed}
    case = Case("anatomy-cut", index, _write(pair.fixed, folder / "fixed.mha"),
                _write(pair.moving, folder / "moving.mha"), transforms.to_matrix(pair.fixed_to_moving).tolist(),
                str(folder / "points.npy"), info, _write(pair.fixed_labels, folder / "fixed_labels.mha"),
                _write(pair.moving_labels, folder / "moving_labels.mha"), pair.fixed_task, pair.moving_task)
    return _store(case, folder)


# ---------------------------------------------------------------------------------------------- registry
def _always() -> bool:
    return True


@dataclass(frozen=True)
class Family:
    """A case family: ``make(index, seed) -> Case`` and what ``benchmarks/run.py`` does with it.

    ``methods`` / ``quick_methods``: the default method lists (``--quick`` uses the short one); ``in_all``: run by
    ``--family all``; ``available``: False when the family's data is missing (the family is then skipped);
    ``subgroups``: label -> predicate on ``Case.info``, for a success count per subgroup under the table.
    """

    make: Callable[[int, int], Case]
    title: str
    methods: tuple
    quick_methods: tuple
    in_all: bool = True
    available: Callable[[], bool] = _always
    subgroups: dict = field(default_factory=dict)


_FLIP_CROP_SUBGROUPS = {
    "no flip, full FOV": lambda info: not info.get("flip_about") and not info.get("crop"),
    "extra flip, full FOV": lambda info: bool(info.get("flip_about")) and not info.get("crop"),
    "no flip, MR cropped": lambda info: not info.get("flip_about") and bool(info.get("crop")),
    "extra flip, MR cropped": lambda info: bool(info.get("flip_about")) and bool(info.get("crop")),
}
_SEARCH_STUDY_METHODS = ("ours-search-only", "ours-auto", "elastix-default-2mm", "brainsfit-default-2mm")

FAMILIES: dict[str, Family] = {
    "synthetic": Family(
        synthetic_case,
        "Synthetic CT torso (fixed) vs MR-like (moving): anisotropic, bias, noise, partial FOV, offsets, flips",
        ("ours-auto", "ours-anatomy", "ours-moments", "ours-auto-elastix", "elastix-default", "brainsfit-default",
         "forum-recipe", "ants", "greedy"),
        ("ours-auto", "ours-anatomy", "elastix-default", "brainsfit-default")),
    "phantom": Family(
        phantom_case,
        "Real phantom pair, MR header perturbed (rotation 0-30 deg, shift 0-100 mm, 1/3 flipped, 1/2 cropped)",
        ("ours-auto", "ours-moments", "ours-auto-elastix", "elastix-default", "brainsfit-default", "forum-recipe",
         "ants", "greedy"),
        ("ours-auto", "elastix-default"), available=phantom_available, subgroups=_FLIP_CROP_SUBGROUPS),
    "microct": Family(
        microct_case,
        "microCT-like 400^3 @ 0.1 mm (fixed) vs MR-like 0.5 x 0.5 x 3 mm (moving), same object",
        ("ours-auto", "ours-geometry", "elastix-default", "brainsfit-default", "ants", "greedy"),
        ("ours-auto", "elastix-default")),
    "phantom-fair": Family(
        phantom_fair_case,
        "Real phantom pair, fair rule: 50 perturbations (rotation 0-30 deg, shift 0-100 mm, 1/3 flipped, "
        "odd cases cropped to 30-70%)", ("ours-auto", "ours-auto-elastix"), ("ours-auto",), in_all=False,
        available=phantom_available, subgroups=_FLIP_CROP_SUBGROUPS),
    "slab": Family(
        slab_case, "Synthetic partial field of view (CT-like torso, MR-like slab 20-40%) (search study)",
        _SEARCH_STUDY_METHODS, ("ours-search-only", "ours-auto"), in_all=False),
    "phantom-search": Family(
        phantom_search_case, "Phantom pair, random header perturbations (CT fixed, MR moving) (search study)",
        _SEARCH_STUDY_METHODS, ("ours-search-only", "ours-auto"), in_all=False, available=phantom_available,
        subgroups=_FLIP_CROP_SUBGROUPS),
    "anatomy": Family(
        anatomy_case, "Synthetic torso with label maps, random pose and MR slab (anatomy study)",
        ("ours-anatomy-only", "ours-anatomy"), ("ours-anatomy-only",), in_all=False),
    "anatomy-cut": Family(
        anatomy_cut_case, "Synthetic torso with label maps, structures cut by both fields of view (MR slab 15-50%, "
        "every odd CT cut to 35-70%)", ("ours-anatomy-only", "ours-anatomy"), ("ours-anatomy-only",), in_all=False,
        subgroups={"CT whole": lambda info: not info.get("fixed_window"),
                   "CT cut too": lambda info: bool(info.get("fixed_window"))}),
}


def make_cases(family: str, n: int, seed: int = 0, first: int = 0) -> list[Case]:
    """Cases ``first`` .. ``first + n - 1`` of ``family`` (generated once, then read from the cache)."""
    maker = FAMILIES[family].make
    return [maker(i, seed) for i in range(first, first + n)]


def load_case_images(case: Case) -> tuple[sitk.Image, sitk.Image, np.ndarray, np.ndarray]:
    """(fixed, moving, truth 4x4, points) of a case."""
    return (sitk.ReadImage(case.fixed), sitk.ReadImage(case.moving), np.asarray(case.truth, float),
            np.load(case.points))


def describe(case: Case) -> str:
    parts = [f"{k}={v}" for k, v in case.info.items() if k in ("rotation_deg", "translation_mm", "flip", "flip_about",
                                                               "moving_fov", "crop")]
    return f"{case.name} " + " ".join(parts)


if __name__ == "__main__":  # python benchmarks/cases.py synthetic 3
    family = sys.argv[1] if len(sys.argv) > 1 else "synthetic"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    for c in make_cases(family, count):
        print(describe(c), "points:", len(np.load(c.points)))


# ---------------------------------------------------------------------------------------------- knee
from knee import knee_family  # noqa: E402 (benchmarks/knee.py: the knee family's cases and per-bone scoring)

FAMILIES["knee"] = knee_family()
