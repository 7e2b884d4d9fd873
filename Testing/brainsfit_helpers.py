"""The real BRAINSFit for the tests, and small pairs it registers in seconds.

BRAINSFit comes with the shared tools beside the repository: ``../shared/tools/brainsfit/bin/BRAINSFit``
(BRAINSTools 5.6.0 with its libraries; CI checks it with ``install-runtime.sh``). The tests that need it skip
only when ``../shared`` is absent altogether (a bare checkout); when ``../shared`` is there, a BRAINSFit that is
missing or does not run FAILS them, so CI never silently skips them.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BRAINSFIT = SHARED / "tools" / "brainsfit" / "bin" / "BRAINSFit"
BRAINSFIT_XML = SHARED / "tools" / "brainsfit" / "BRAINSFit.xml"


def brainsfit_executable() -> str:
    """The path of the real BRAINSFit; skip without ../shared, fail when it is there but BRAINSFit does not run."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (the real BRAINSFit lives in ../shared/tools/brainsfit)")
    if not BRAINSFIT.is_file():
        pytest.fail(f"{SHARED} exists but {BRAINSFIT} does not: the BRAINSFit tests cannot run")
    try:
        done = subprocess.run([str(BRAINSFIT), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        pytest.fail(f"{BRAINSFIT} does not start ({err}). Fix: bash ../shared/tools/brainsfit/install-runtime.sh")
    if done.returncode != 0 or "version" not in done.stdout:
        pytest.fail(f"{BRAINSFIT} --version failed (exit {done.returncode}): {done.stderr.strip()[-300:]}. "
                    "Fix: bash ../shared/tools/brainsfit/install-runtime.sh")
    return str(BRAINSFIT)


def blob_phantom() -> sitk.Image:
    """BRAINSFit's own example phantom (its examples/make_pair.py): ellipsoid blobs, 64^3 at 2 mm, origin -63."""
    z, y, x = np.mgrid[0:64, 0:64, 0:64].astype(np.float32)

    def blob(cx, cy, cz, rx, ry, rz, value):
        return value * (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0)

    array = (blob(32, 32, 32, 20, 14, 10, 100) + blob(40, 26, 34, 5, 4, 3, 80) + blob(24, 38, 28, 4, 6, 3, -60)
             + blob(30, 30, 40, 3, 3, 3, 150)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0,) * 3)
    image.SetOrigin((-63.0,) * 3)
    return sitk.SmoothingRecursiveGaussian(image, 2.0)


def rigid(rotation_deg: float, shift_mm: float) -> sitk.Euler3DTransform:
    """A fixed->moving rigid transform about the origin: rotations (r, -r/2, 1.5 r) deg, shift (s, -s/2, s/3)."""
    r = math.radians(rotation_deg)
    return sitk.Euler3DTransform((0.0, 0.0, 0.0), r, -r / 2, 1.5 * r, (shift_mm, -shift_mm / 2, shift_mm / 3))


def moved_copy(fixed: sitk.Image, truth: sitk.Transform, size, spacing, origin) -> sitk.Image:
    """The moving image of a pair whose fixed->moving transform is ``truth``: moving(q) = fixed(truth^-1(q)), on a
    grid of ``size`` / ``spacing`` / ``origin`` (identity direction)."""
    reference = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    reference.SetSpacing([float(s) for s in spacing])
    reference.SetOrigin([float(o) for o in origin])
    return sitk.Resample(fixed, reference, truth.GetInverse(), sitk.sitkLinear, 0.0)


def thin_slab_pair(rotation_deg: float = 8.0, shift_mm: float = 10.0, slices: int = 4, slice_mm: float = 0.05):
    """The Slicer forum's failure, as BRAINSFit's examples reproduce it: a 0.2 mm thick slab (4 slices of 0.05 mm)
    of the blob phantom, rigidly moved. (fixed, moving, fixed->moving truth, scoring points: fixed physical points
    of the slab's object voxels)."""
    fixed = blob_phantom()
    truth = rigid(rotation_deg, shift_mm)
    moving = moved_copy(fixed, truth, (64, 64, slices), (2.0, 2.0, slice_mm), (-63.0, -63.0, 1.0))
    return fixed, moving, truth, object_points_of_moving(moving, truth)


def object_points_of_moving(moving: sitk.Image, truth: sitk.Transform, step: int = 7) -> np.ndarray:
    """Fixed physical points whose true moving position is an object voxel of ``moving`` (every ``step``-th)."""
    array = sitk.GetArrayFromImage(moving)
    index = np.argwhere(array > 5.0)[::step]
    inverse = truth.GetInverse()
    return np.array([inverse.TransformPoint(moving.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]]))
                     for p in index])


def mean_error(result: sitk.Transform, truth: sitk.Transform, points: np.ndarray) -> float:
    """Mean distance (mm) between where ``result`` and ``truth`` send ``points``."""
    return float(np.mean([np.linalg.norm(np.subtract(result.TransformPoint(p.tolist()),
                                                     truth.TransformPoint(p.tolist()))) for p in points]))
