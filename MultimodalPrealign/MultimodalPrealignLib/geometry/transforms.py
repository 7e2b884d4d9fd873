"""Transforms: composition, matrices, file IO, report summaries, LPS <-> RAS for Slicer.

Convention everywhere in the core: a transform maps a point in the FIXED image's physical space
to the MOVING image's physical space (ITK's resampling direction; what elastix, ANTs and BRAINSFit
write), in LPS mm. Slicer stores volumes in RAS and calls this the transform "from parent";
``fixed_to_moving_lps_to_slicer_to_parent_ras`` converts a linear one for a Slicer transform node.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

#: Sign flips of x and y between LPS (ITK, DICOM) and RAS (Slicer); the flip is its own inverse.
LPS_RAS_SIGNS = np.array([-1.0, -1.0, 1.0])
#: The same flip as a 4x4 homogeneous matrix.
LPS_TO_RAS = np.diag([*LPS_RAS_SIGNS, 1.0])

_LINEAR_NAMES = {
    "AffineTransform", "Euler3DTransform", "VersorRigid3DTransform", "VersorTransform",
    "Similarity3DTransform", "ScaleSkewVersor3DTransform", "ScaleVersor3DTransform",
    "TranslationTransform", "ScaleTransform", "ComposeScaleSkewVersor3DTransform",
}


def _leaf_transforms(transform: sitk.Transform) -> list[sitk.Transform]:
    """Flatten a (possibly nested) composite into its leaves, in the order ITK applies them."""
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        leaves: list[sitk.Transform] = []
        # ITK applies the LAST added transform first.
        for i in reversed(range(composite.GetNumberOfTransforms())):
            leaves.extend(_leaf_transforms(composite.GetNthTransform(i)))
        return leaves
    return [transform.Downcast() if hasattr(transform, "Downcast") else transform]


def is_linear(transform: sitk.Transform) -> bool:
    """True when the transform is affine (possibly a composite of affine pieces)."""
    return all(t.GetName() in _LINEAR_NAMES or t.IsLinear() for t in _leaf_transforms(transform))


def to_matrix(transform: sitk.Transform) -> np.ndarray:
    """4x4 homogeneous matrix of a linear transform: p_out = M[:3,:3] @ p + M[:3,3] (same spaces)."""
    if not is_linear(transform):
        raise ValueError(f"{transform.GetName()} is not linear")
    origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
    m = np.eye(4)
    for i in range(3):
        e = [0.0, 0.0, 0.0]
        e[i] = 1.0
        m[:3, i] = np.asarray(transform.TransformPoint(e)) - origin
    m[:3, 3] = origin
    return m


def affine_from_matrix(matrix: np.ndarray, center=(0.0, 0.0, 0.0)) -> sitk.AffineTransform:
    """AffineTransform with the given 4x4 matrix (same spaces as the matrix), rotation centre ``center``."""
    matrix = np.asarray(matrix, dtype=float)
    center = np.asarray(center, dtype=float)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(center.tolist())
    affine.SetMatrix(matrix[:3, :3].ravel().tolist())
    # p' = A (p - c) + c + t  must equal  A p + b  ->  t = b - c + A c
    affine.SetTranslation((matrix[:3, 3] - center + matrix[:3, :3] @ center).tolist())
    return affine


def rigid_from_matrix(matrix: np.ndarray, center=(0.0, 0.0, 0.0)) -> sitk.Euler3DTransform:
    """Euler3DTransform closest to the 4x4 matrix (its rotation part is orthogonalised by SVD)."""
    matrix = np.asarray(matrix, dtype=float)
    u, _, vt = np.linalg.svd(matrix[:3, :3])
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:
        u[:, -1] *= -1
        rotation = u @ vt
    center = np.asarray(center, dtype=float)
    euler = sitk.Euler3DTransform()
    euler.SetCenter(center.tolist())
    euler.SetMatrix(rotation.ravel().tolist(), 1e-5)
    euler.SetTranslation((matrix[:3, 3] - center + rotation @ center).tolist())
    return euler


def translation(offset_mm) -> sitk.TranslationTransform:
    """Translation fixed -> moving: p_moving = p_fixed + offset (LPS mm)."""
    return sitk.TranslationTransform(3, [float(v) for v in offset_mm])


def identity() -> sitk.Transform:
    return sitk.AffineTransform(3)


def compose(*transforms_in_order: sitk.Transform) -> sitk.Transform:
    """One transform that applies ``transforms_in_order[0]`` first, then the next, ...

    With fixed->moving pieces, e.g. ``compose(registration, prealignment)`` maps a fixed point
    through the registration, then through the pre-alignment. Linear inputs give a single
    AffineTransform; otherwise a CompositeTransform is returned (readable by Slicer and ITK).
    """
    pieces = [t for t in transforms_in_order if t is not None]
    if not pieces:
        return identity()
    if all(is_linear(t) for t in pieces):
        m = np.eye(4)
        for t in pieces:
            m = to_matrix(t) @ m
        return affine_from_matrix(m, center=_first_center(pieces))
    composite = sitk.CompositeTransform(3)
    for t in reversed(pieces):  # ITK applies the last added first
        composite.AddTransform(t)
    return composite


def _first_center(pieces) -> list[float]:
    for t in pieces:
        t = t.Downcast() if hasattr(t, "Downcast") else t
        if hasattr(t, "GetCenter"):
            return list(t.GetCenter())
    return [0.0, 0.0, 0.0]


def inverse_or_none(transform: sitk.Transform) -> sitk.Transform | None:
    if is_linear(transform):
        return affine_from_matrix(np.linalg.inv(to_matrix(transform)))
    return None


def rotation_vector_matrix(rotvec_rad: np.ndarray) -> np.ndarray:
    """Rodrigues: the 3x3 rotation by |v| radians about v (right-handed)."""
    v = np.asarray(rotvec_rad, float)
    angle = float(np.linalg.norm(v))
    if angle < 1e-12:
        return np.eye(3)
    k = v / angle
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


def rotation_angle_deg(matrix: np.ndarray) -> float:
    """Rotation angle (degrees) of the orthogonal part of a 3x3 or 4x4 matrix."""
    m = np.asarray(matrix, dtype=float)[:3, :3]
    u, _, vt = np.linalg.svd(m)
    r = u @ vt
    return float(math.degrees(math.acos(float(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0)))))


def mean_point_error(a: sitk.Transform, b: sitk.Transform, points: np.ndarray) -> float:
    """Mean distance (mm) between where two transforms send the same points."""
    return float(np.mean(np.linalg.norm(transform_points(a, points) - transform_points(b, points), axis=1)))


def summarize(transform: sitk.Transform) -> dict:
    """JSON-ready description: type, 4x4 matrix (linear), rotation angle, translation; never raw objects."""
    info: dict = {"type": transform.GetName(), "convention": "fixed->moving, physical LPS mm"}
    if is_linear(transform):
        m = to_matrix(transform)
        info.update({
            "matrix_4x4": [[round(float(v), 6) for v in row] for row in m],
            "rotation_deg": round(rotation_angle_deg(m), 4),
            "translation_mm": [round(float(v), 4) for v in m[:3, 3]],
            "determinant": round(float(np.linalg.det(m[:3, :3])), 6),
        })
    else:
        info["pieces"] = [t.GetName() for t in _leaf_transforms(transform)]
        linear = [t for t in _leaf_transforms(transform) if is_linear(t)]
        if linear:
            info["linear_part"] = summarize(compose(*linear))
    return info


def write_transform(transform: sitk.Transform, path: str | os.PathLike) -> None:
    """Write an ITK transform file (.h5, .tfm, .txt). The content keeps the fixed->moving convention."""
    sitk.WriteTransform(transform, str(path))


def read_transform(path: str | os.PathLike) -> sitk.Transform:
    path = Path(path)
    transform = sitk.ReadTransform(str(path))
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        if composite.GetNumberOfTransforms() == 1:
            return composite.GetNthTransform(0).Downcast()
    return transform.Downcast() if hasattr(transform, "Downcast") else transform


def fixed_to_moving_lps_to_slicer_to_parent_ras(matrix_lps: np.ndarray) -> np.ndarray:
    """4x4 RAS matrix for a Slicer linear transform node applied to the MOVING volume.

    ``matrix_lps`` maps fixed LPS points to moving LPS points (resampling direction). Slicer's
    "to parent" matrix of the node that moves the moving volume onto the fixed one maps moving RAS
    points to fixed RAS points: the inverse, conjugated by the LPS<->RAS flip.
    """
    return LPS_TO_RAS @ np.linalg.inv(np.asarray(matrix_lps, dtype=float)) @ LPS_TO_RAS


def slicer_to_parent_ras_to_fixed_to_moving_lps(matrix_ras: np.ndarray) -> np.ndarray:
    """Inverse of :func:`fixed_to_moving_lps_to_slicer_to_parent_ras`."""
    return np.linalg.inv(LPS_TO_RAS @ np.asarray(matrix_ras, dtype=float) @ LPS_TO_RAS)


def apply_matrix(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points (N x 3, row form) through a 4x4 matrix: p' = M[:3, :3] @ p + M[:3, 3] (same spaces as M)."""
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def transform_points(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    """Apply a SimpleITK transform to N x 3 points (fast path for linear transforms)."""
    points = np.asarray(points, dtype=float)
    if is_linear(transform):
        return apply_matrix(to_matrix(transform), points)
    return np.array([transform.TransformPoint(p.tolist()) for p in points])
