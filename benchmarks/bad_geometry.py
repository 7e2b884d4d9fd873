"""The bad-geometry family of the verdict study (``benchmarks/verdict_study.py``): headers that are wrong in the
ways users meet them, written as FILES (the reading path is part of what is tested).

Each case starts from a synthetic CT/MR pair (``phantoms.make_pair``: CT-like torso at 3 mm fixed, MR-like at
3 x 3 x 4 mm moving, rotation 0-20 degrees, translation 0-40 mm, seeded by the case) and breaks the moving image's
header in one way (``KINDS``, case ``index`` -> ``KINDS[index % len(KINDS)]``, base pair ``index // len(KINDS)``):

| kind | what | expected |
|---|---|---|
| ``mirror-nrrd`` | NRRD with ``spacings: -3 3 4`` (and no origin): ITK reads a mirrored x axis | FAIL (mirror probe) |
| ``mirror-nifti`` | NIfTI with pixdim[1] = -3: ITK reads a mirrored x axis | FAIL (mirror probe) |
| ``patch`` | a 5 x 5 x 5 voxel patch of the MR from its centre | FAIL (content: voxels) |
| ``nonsense-voxels`` | CT voxels (0.75 x 0.75 x 5 mm, 454 x 320 x 21) with a 0.1 x 0.1 x 20 mm header | FAIL |
| ``noise`` | Gaussian noise on the MR's grid | FAIL (unrelated, no structure) |
| ``both-metres`` | both images with voxel sizes and origins in metres (a torso 0.4 mm across) | FAIL (content: size) |
| ``metres`` | the MR in metres, the CT in millimetres | refused (exit 2) |
| ``x100`` | the MR's voxel sizes and origin x100 | refused (exit 2) |
| ``zero-pixdim`` | NIfTI with pixdim[1] = 0 (ITK would read 1 mm) | refused (exit 2) |

``truth`` (4x4 fixed -> moving, LPS mm, as the headers now define physical space) is the pair's true transform
followed by the header's change (``new physical <- old physical`` of the same voxel); None for ``noise`` (no
correct answer exists). In every kind but ``patch`` the geometry of an input is wrong, so no transform between
the files as given is the answer the user needs: the verdict study counts those results as wrong.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cases import CACHE, Case  # noqa: E402  (cases.py puts the package on sys.path)

from MultimodalPrealignLib.geometry import transforms  # noqa: E402
from MultimodalPrealignLib.geometry.image_space import index_to_physical_matrix  # noqa: E402
from MultimodalPrealignLib.synthetic import phantoms  # noqa: E402

KINDS = ("mirror-nrrd", "mirror-nifti", "patch", "nonsense-voxels", "noise", "both-metres", "metres", "x100",
         "zero-pixdim")
#: What the verdict study expects per kind: "FAIL" (a result the verdict must fail) or "refused" (exit code 2).
EXPECTED = {kind: "refused" if kind in ("metres", "x100", "zero-pixdim") else "FAIL" for kind in KINDS}
#: Kinds whose inputs have a wrong geometry: no result between the files as given is correct.
WRONG_GEOMETRY = {"mirror-nrrd", "mirror-nifti", "nonsense-voxels", "noise", "both-metres", "metres", "x100",
                  "zero-pixdim"}


def affine(image: sitk.Image) -> np.ndarray:
    """4x4 voxel index -> physical (LPS mm)."""
    matrix, origin = index_to_physical_matrix(image)
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = matrix, origin
    return out


def write_nrrd_spacings(path: Path, image: sitk.Image, spacings: list[float]) -> None:
    """A NRRD that states only ``spacings`` (no origin, no directions): how some tools write a volume."""
    size = image.GetSize()
    head = (f"NRRD0004\ntype: float\ndimension: 3\nsizes: {size[0]} {size[1]} {size[2]}\n"
            f"spacings: {' '.join(f'{s:g}' for s in spacings)}\nendian: little\nencoding: raw\n\n")
    voxels = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32)).astype("<f4").tobytes()
    path.write_bytes(head.encode() + voxels)


def write_nifti_pixdim(path: Path, image: sitk.Image, axis: int, value: float) -> None:
    """An uncompressed NIfTI of ``image`` whose pixdim[axis] is ``value``."""
    sitk.WriteImage(image, str(path))
    raw = bytearray(path.read_bytes())
    raw[76 + 4 * axis:80 + 4 * axis] = struct.pack("<f", value)
    path.write_bytes(bytes(raw))


def scaled(image: sitk.Image, factor: float) -> sitk.Image:
    """The same voxels with voxel sizes and origin multiplied by ``factor`` (other units)."""
    out = sitk.Image(image)
    out.SetSpacing([s * factor for s in image.GetSpacing()])
    out.SetOrigin([v * factor for v in image.GetOrigin()])
    return out


def _header_change(before: sitk.Image, after: sitk.Image) -> np.ndarray:
    """4x4: the physical point of a voxel under ``before``'s header -> its point under ``after``'s header."""
    return affine(after) @ np.linalg.inv(affine(before))


def _read(path: Path) -> sitk.Image:
    """What ITK makes of a file (warnings off: this is the study's own bookkeeping, not a user's read)."""
    display = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return sitk.ReadImage(str(path))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(display)


def bad_geometry_case(index: int, seed: int = 0) -> Case:
    """Case ``index`` of the bad-geometry family (see the module docstring), written once into the cache."""
    folder = CACHE / f"bad_geometry_s{seed}_{index:03d}"
    if (folder / "case.json").exists():
        return Case.from_json(json.loads((folder / "case.json").read_text()))
    folder.mkdir(parents=True, exist_ok=True)
    kind, base = KINDS[index % len(KINDS)], index // len(KINDS)
    rng = np.random.default_rng(50_000 + 97 * seed + base)
    pair = phantoms.make_pair(seed=seed * 1000 + 700 + base, rotation_deg=float(rng.uniform(0, 20)),
                              translation_mm=float(rng.uniform(0, 40)), fixed_spacing=(3.0, 3.0, 3.0),
                              moving_spacing=(3.0, 3.0, 4.0), labels=False)
    truth = transforms.to_matrix(pair.fixed_to_moving)
    fixed_path, moving_path = folder / "fixed.mha", folder / "moving.mha"
    sitk.WriteImage(pair.fixed, str(fixed_path))
    moving_image = pair.moving
    if kind == "mirror-nrrd":
        moving_path = folder / "moving.nrrd"
        spacing = list(pair.moving.GetSpacing())
        write_nrrd_spacings(moving_path, pair.moving, [-spacing[0], spacing[1], spacing[2]])
    elif kind == "mirror-nifti":
        moving_path = folder / "moving.nii"
        write_nifti_pixdim(moving_path, pair.moving, 1, -pair.moving.GetSpacing()[0])
    elif kind == "zero-pixdim":
        moving_path = folder / "moving.nii"
        write_nifti_pixdim(moving_path, pair.moving, 1, 0.0)
    elif kind == "patch":
        c = [s // 2 for s in pair.moving.GetSize()]
        moving_image = pair.moving[c[0] - 2:c[0] + 3, c[1] - 2:c[1] + 3, c[2] - 2:c[2] + 3]
    elif kind == "noise":
        noise = np.random.default_rng(index).normal(100.0, 30.0, sitk.GetArrayViewFromImage(pair.moving).shape)
        moving_image = sitk.GetImageFromArray(noise.astype(np.float32))
        moving_image.CopyInformation(pair.moving)
        truth = None
    elif kind == "nonsense-voxels":
        fine = phantoms.make_pair(seed=seed * 1000 + 800 + base, rotation_deg=0.0, translation_mm=0.0,
                                  fixed_spacing=(0.75, 0.75, 5.0), fixed_fov="slab", slab_fraction=0.2,
                                  moving_spacing=(6.0, 6.0, 6.0), labels=False).fixed
        moving_image = sitk.Image(fine)
        moving_image.SetSpacing((0.1, 0.1, 20.0))
        truth = _header_change(fine, moving_image)  # CT world (= fixed physical space) -> nonsense physical
    elif kind in ("metres", "x100"):
        moving_image = scaled(pair.moving, 1e-3 if kind == "metres" else 100.0)
        truth = _header_change(pair.moving, moving_image) @ truth
    elif kind == "both-metres":
        sitk.WriteImage(scaled(pair.fixed, 1e-3), str(fixed_path))
        moving_image = scaled(pair.moving, 1e-3)
        s = np.diag([1e-3, 1e-3, 1e-3, 1.0])
        truth = s @ truth @ np.linalg.inv(s)
    if moving_path.suffix == ".mha":
        sitk.WriteImage(moving_image, str(moving_path))
    if kind.startswith("mirror"):
        truth = _header_change(pair.moving, _read(moving_path)) @ truth
    points = phantoms.body_points(pair, n=1000, seed=index, overlap_only=True)
    if kind == "both-metres":
        points = points * 1e-3
    np.save(folder / "points.npy", points)
    info = {"kind": kind, "expected": EXPECTED[kind], "wrong_geometry": kind in WRONG_GEOMETRY, "base_pair": base}
    case = Case("bad-geometry", index, str(fixed_path), str(moving_path), None if truth is None else truth.tolist(),
                str(folder / "points.npy"), info)
    (folder / "case.json").write_text(json.dumps(case.to_json(), indent=1))
    return case


def make_cases(n: int, seed: int = 0, first: int = 0) -> list[Case]:
    return [bad_geometry_case(i, seed) for i in range(first, first + n)]


if __name__ == "__main__":  # python benchmarks/bad_geometry.py 9
    count = int(sys.argv[1]) if len(sys.argv) > 1 else len(KINDS)
    for c in make_cases(count):
        print(c.name, c.info["kind"], Path(c.moving).name, "expected", c.info["expected"])
