"""Foreground (body/object) masks from intensities, robust to CT's negative HU and padding values."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .image_space import index_to_physical_points
from .resample import resample_to_spacing


def padding_value(image: sitk.Image) -> float | None:
    """The value that fills outside a CT's reconstruction circle (-2048, -3024...), if there is one.

    A value is padding when it is the image minimum and covers more than 2% of the voxels.
    """
    array = sitk.GetArrayViewFromImage(image).ravel()
    sample = array[:: max(1, array.size // 1_000_000)]  # a regular subsample is enough for these statistics
    lo = float(array.min())
    if np.count_nonzero(sample == lo) > 0.02 * sample.size and lo < float(np.median(sample)):
        return lo
    return None


def otsu_thresholds_3class(values: np.ndarray, bins: int = 128) -> tuple[float, float]:
    """The two thresholds of a three-class Otsu split (background / tissue / bright tissue or bone)."""
    hist, edges = np.histogram(values, bins=bins)
    p = hist.astype(float) / max(hist.sum(), 1)
    centers = (edges[:-1] + edges[1:]) / 2
    w = np.concatenate([[0.0], np.cumsum(p)])
    mu = np.concatenate([[0.0], np.cumsum(p * centers)])
    i, j = np.triu_indices(bins + 1, k=1)  # class edges: [0, i), [i, j), [j, bins)
    keep = (i >= 1) & (j <= bins - 1)
    i, j = i[keep], j[keep]
    w0, w1, w2 = w[i], w[j] - w[i], 1.0 - w[j]
    m0, m1, m2 = mu[i], mu[j] - mu[i], mu[-1] - mu[j]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where(w0 > 0, m0**2 / w0, 0) + np.where(w1 > 0, m1**2 / w1, 0) + np.where(w2 > 0, m2**2 / w2, 0)
    best = int(np.nanargmax(between))
    return float(edges[i[best]]), float(edges[j[best]])


def foreground_mask(image: sitk.Image, working_spacing_mm: float | None = 3.0,
                    keep_largest: bool = True) -> sitk.Image:
    """Binary UInt8 mask of the object (body) in ``image``.

    Lowest three-class Otsu threshold on robust intensity limits (0.5/99.5 percentiles,
    padding excluded), a small opening, holes filled, and the largest connected component kept.
    With ``working_spacing_mm`` the mask is computed on a coarse isotropic copy (same physical extent).
    """
    work = image
    if working_spacing_mm is not None and max(image.GetSpacing()) < working_spacing_mm:
        work = resample_to_spacing(image, [working_spacing_mm] * 3)  # float32
    array = sitk.GetArrayFromImage(work).astype(np.float32)
    pad = padding_value(image)  # on the original: smoothing blurs the padding plateau of the coarse copy
    valid = np.ones(array.shape, bool)
    if pad is not None:
        valid = array > pad + max(1.0, 0.05 * (float(np.median(array)) - pad))
        # The padding edge is blurred by resampling: its rim would form the lowest Otsu class and the
        # whole reconstruction cylinder would pass as foreground. Treat the rim as padding too.
        valid = ndimage.binary_erosion(valid, iterations=1)
    values = array[valid]
    if values.size == 0:
        values = array.ravel()
    lo, hi = np.percentile(values, [0.5, 99.5])
    if hi <= lo:
        mask = valid.copy()
    else:
        # Lowest of three Otsu classes: separates background from all tissue, also when one tissue is very
        # bright (fat in T1/T2 MR, bone in CT), where a two-class split would cut the body in two.
        threshold = otsu_thresholds_3class(np.clip(values, lo, hi))[0]
        mask = (array > threshold) & valid
    mask = ndimage.binary_opening(mask, iterations=1) if mask.sum() > 1000 else mask
    if keep_largest and mask.any():
        labels, count = ndimage.label(mask)
        if count > 1:
            sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
            mask = labels == (int(np.argmax(sizes)) + 1)
    mask = _fill_holes_slicewise(mask)
    out = sitk.GetImageFromArray(mask.astype(np.uint8))
    out.CopyInformation(work)
    return out


def _fill_holes_slicewise(mask: np.ndarray) -> np.ndarray:
    filled = ndimage.binary_fill_holes(mask)
    return filled if filled is not None else mask


def mask_centroid_and_axes(mask: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Centroid (LPS mm), principal axes (3x3, columns, largest variance first), variances, volume (mm3)."""
    array = sitk.GetArrayViewFromImage(mask)
    idx_zyx = np.argwhere(array > 0)
    if idx_zyx.shape[0] == 0:
        raise ValueError("empty mask")
    points = index_to_physical_points(mask, idx_zyx[:, ::-1].astype(float))
    centroid = points.mean(0)
    cov = np.cov((points - centroid).T) if points.shape[0] > 3 else np.eye(3)
    variances, axes = np.linalg.eigh(cov)
    order = np.argsort(variances)[::-1]
    volume = float(points.shape[0] * np.prod(mask.GetSpacing()))
    return centroid, axes[:, order], variances[order], volume
