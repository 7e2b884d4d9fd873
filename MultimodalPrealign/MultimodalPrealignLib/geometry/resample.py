"""Resampling helpers in physical space (LPS mm): reference grids over boxes, anti-aliased working copies, and
resampling through a fixed->moving transform (ITK convention). Smoothing before downsampling avoids aliasing."""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from .image_space import Box, bounding_box, direction_matrix, physical_to_index


def smooth_for_spacing(image: sitk.Image, new_spacing) -> sitk.Image:
    """Gaussian anti-aliasing before resampling to a coarser ``new_spacing`` (mm, per grid axis)."""
    old = np.asarray(image.GetSpacing(), dtype=float)
    new = np.asarray(new_spacing, dtype=float)
    sigma = np.where(new > old * 1.01, np.sqrt(np.maximum(new**2 - old**2, 0.0)) / 2.355, 0.0)
    if not np.any(sigma > 0.25 * old):
        return image
    # 2.355 = FWHM/sigma: the blur's FWHM matches the new voxel size.
    if min(image.GetSize()) >= 4:
        return sitk.SmoothingRecursiveGaussian(image, [float(max(s, 1e-3)) for s in sigma])
    # A thin slab (fewer than 4 voxels along an axis, where ITK's recursive Gaussian cannot run): the same
    # separable blur along the other axes only; along the thin axis the slab is one sample thick anyway.
    for axis, (s, n) in enumerate(zip(sigma, image.GetSize())):
        if s > 0 and n >= 4:
            image = sitk.RecursiveGaussian(image, float(s), False, sitk.RecursiveGaussianImageFilter.ZeroOrder, axis)
    return image


def grid_for_box(box: Box, spacing, direction: np.ndarray | None = None) -> dict:
    """Size/origin/spacing/direction of a grid with ``direction`` covering ``box`` (LPS mm)."""
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    spacing = np.asarray(spacing, dtype=float) * np.ones(3)
    lower, upper = np.asarray(box.lower), np.asarray(box.upper)
    # Corners of the box in the grid's axes.
    corners = np.array([[lower[0] if i == 0 else upper[0], lower[1] if j == 0 else upper[1],
                         lower[2] if k == 0 else upper[2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    local = corners @ direction  # coordinates along the grid axes
    lo, hi = local.min(0), local.max(0)
    size = np.maximum(np.ceil((hi - lo) / spacing - 1e-6).astype(int), 1)
    first_center_local = lo + spacing / 2.0
    origin = direction @ first_center_local
    return {"size": [int(s) for s in size], "origin": origin.tolist(), "spacing": spacing.tolist(),
            "direction": direction.ravel().tolist()}


def make_reference(grid: dict, pixel_id=sitk.sitkFloat32) -> sitk.Image:
    """An empty image on ``grid`` (``size``, ``origin``, ``spacing``, ``direction``; numpy or Python numbers)."""
    ref = sitk.Image([int(v) for v in grid["size"]], pixel_id)
    ref.SetOrigin([float(v) for v in grid["origin"]])
    ref.SetSpacing([float(v) for v in grid["spacing"]])
    ref.SetDirection([float(v) for v in grid["direction"]])
    return ref


def region_covering_box(image: sitk.Image, box: Box, pad_voxels: int = 2) -> tuple[list[int], list[int]] | None:
    """(index, size) of the image region that covers ``box`` (LPS mm) plus ``pad_voxels``; None if disjoint."""
    lower, upper = np.asarray(box.lower), np.asarray(box.upper)
    corners = np.array([[x, y, z] for x in (lower[0], upper[0]) for y in (lower[1], upper[1])
                        for z in (lower[2], upper[2])])
    return region_covering_points(image, corners, pad_voxels)


def region_covering_points(image: sitk.Image, points: np.ndarray, pad_voxels: int = 2) -> tuple[list[int],
                                                                                                list[int]] | None:
    """(index, size) of the image region around ``points`` (N x 3, LPS mm) plus ``pad_voxels``; None if they all lie
    beyond one side of the image."""
    idx = physical_to_index(image, points)
    size = np.asarray(image.GetSize())
    first = np.maximum(np.floor(idx.min(0)).astype(int) - pad_voxels, 0)
    last = np.minimum(np.ceil(idx.max(0)).astype(int) + pad_voxels, size - 1)
    if np.any(last < first):
        return None
    return first.tolist(), (last - first + 1).tolist()


#: :func:`float32_bin_shrink`: an integer image (or region) of up to this many voxels is cast to float32 whole (a
#: 64 MB copy at most); a larger one is shrunk without that copy, and 32/64-bit integer images slab by slab of this size
SLAB_VOXELS = 1 << 24
#: input voxels per chunk of the block sums (small enough to stay in the processor's cache: measured on a 1024^3
#: int16 image, 1-2x faster than 16 M)
SUM_CHUNK_VOXELS = 1 << 20
#: integer types whose block sums :func:`float32_bin_shrink` computes exactly in numpy (8 and 16 bit)
_EXACT_SUM_TYPES = (sitk.sitkInt8, sitk.sitkUInt8, sitk.sitkInt16, sitk.sitkUInt16)


def float32_bin_shrink(image: sitk.Image, factors, region: tuple | None = None) -> sitk.Image:
    """``sitk.BinShrink(sitk.Cast(sitk.RegionOfInterest(image, size, index), sitk.sitkFloat32), factors)`` bit for
    bit (``region`` = (index, size); None = the whole image), without a full-size copy of an integer image.

    A 1024^3 int16 microCT (2.1 GB) never needs its 4.3 GB float32 copy, nor a copy of the region (BinShrink of
    the integer image itself would round the averages). 8/16-bit images: the block sums in integers (exact, so in
    any order) times 1/n in double, rounded to float32, which is what BinShrink computes from the float32 copy
    (its double accumulator holds these integer sums exactly), in slabs on two threads. Other integer types:
    cast and shrunk by ITK in slabs along the last axis (on whole blocks, so every output voxel averages the same
    voxels in the same order).
    """
    factors = [int(f) for f in factors]
    index, size = ([0, 0, 0], list(image.GetSize())) if region is None else (list(region[0]), list(region[1]))
    if region is not None and size == list(image.GetSize()):
        region = None
    if image.GetPixelID() == sitk.sitkFloat32 or max(factors) == 1 or size[0] * size[1] * size[2] <= SLAB_VOXELS:
        source = image if region is None else sitk.RegionOfInterest(image, size, index)
        if source.GetPixelID() != sitk.sitkFloat32:
            source = sitk.Cast(source, sitk.sitkFloat32)
        return sitk.BinShrink(source, factors) if max(factors) > 1 else source
    # the output's geometry as BinShrink gives it for the region
    probe = sitk.Image(factors, sitk.sitkUInt8)
    probe.SetSpacing(image.GetSpacing())
    probe.SetDirection(image.GetDirection())
    probe.SetOrigin(image.TransformIndexToPhysicalPoint(index))
    probe = sitk.BinShrink(probe, factors)
    out_size = [n // f for n, f in zip(size, factors)]
    if image.GetPixelID() in _EXACT_SUM_TYPES:
        array = _exact_block_means(sitk.GetArrayViewFromImage(image), factors, index, out_size)
    else:
        blocks = max(1, SLAB_VOXELS // (size[0] * size[1] * factors[2]))
        step = blocks * factors[2]
        parts = []
        for start in range(0, out_size[2] * factors[2], step):
            thickness = min(step, out_size[2] * factors[2] - start)
            slab = sitk.Cast(sitk.RegionOfInterest(image, size[:2] + [thickness], index[:2] + [index[2] + start]),
                             sitk.sitkFloat32)
            parts.append(sitk.GetArrayFromImage(sitk.BinShrink(slab, factors)))
        array = np.concatenate(parts, axis=0)
    out = sitk.GetImageFromArray(array)
    out.SetOrigin(probe.GetOrigin())
    out.SetSpacing(probe.GetSpacing())
    out.SetDirection(probe.GetDirection())
    return out


def _exact_block_means(array: np.ndarray, factors, index, out_size) -> np.ndarray:
    """Float32 block means (z, y, x) of the 8/16-bit ``array`` over whole ``factors`` blocks from ``index`` (x, y, z):
    integer sums, then ``sum * (1 / n)`` in double (BinShrink's arithmetic), slab by slab on two threads."""
    from .. import parallel

    fx, fy, fz = factors
    n = fx * fy * fz
    acc = np.int32 if 32768 * n < 2 ** 31 else np.int64
    x0, y0, z0 = index
    out = np.empty(out_size[::-1], np.float32)
    rows = max(1, SUM_CHUNK_VOXELS // (out_size[0] * fx * out_size[1] * fy * fz))

    def block_sums(block: np.ndarray) -> np.ndarray:
        if fx >= 6:  # long runs along x: one reduction; short ones: strided additions (faster for small factors)
            a = block.reshape(block.shape[0], block.shape[1], -1, fx).sum(axis=3, dtype=acc)
        else:
            a = block[:, :, 0::fx].astype(acc)
            for j in range(1, fx):
                a += block[:, :, j::fx]
        b = a[:, 0::fy].copy() if fy > 1 else a
        for j in range(1, fy):
            b += a[:, j::fy]
        c = b[0::fz].copy() if fz > 1 else b
        for j in range(1, fz):
            c += b[j::fz]
        return c

    def part(first: int, last: int) -> None:
        for k in range(first, last, rows):
            k1 = min(last, k + rows)
            block = array[z0 + k * fz:z0 + k1 * fz, y0:y0 + out_size[1] * fy, x0:x0 + out_size[0] * fx]
            out[k:k1] = block_sums(block) * (1.0 / n)

    middle = out_size[2] // 2
    parallel.both(lambda: part(0, middle), lambda: part(middle, out_size[2]))
    return out


def shrink_then_smooth(image: sitk.Image, new_spacing, region: tuple | None = None) -> sitk.Image:
    """Anti-aliased float32 copy of ``image`` (or of its ``region``, (index, size)) for resampling at
    ``new_spacing`` (mm per grid axis).

    Integer block averaging (BinShrink, :func:`float32_bin_shrink`) does most of the reduction cheaply; a Gaussian
    then covers what is left so the result's resolution matches ``new_spacing``.
    """
    old = np.asarray(image.GetSpacing(), dtype=float)
    new = np.asarray(new_spacing, dtype=float)
    factors = np.maximum(np.floor(new / old + 1e-6).astype(int), 1)
    factors = np.minimum(factors, np.asarray(image.GetSize() if region is None else region[1]))
    return smooth_for_spacing(float32_bin_shrink(image, factors, region), new)


def resample_box(image: sitk.Image, box: Box, spacing, default_value: float,
                 interpolator=sitk.sitkLinear, smooth: bool = True) -> sitk.Image:
    """Crop ``image`` to ``box`` (LPS mm) and resample it at ``spacing`` (float32) on a grid with its own direction.

    Only the region covering the box is read; downsampling is anti-aliased (``smooth``).
    """
    direction = direction_matrix(image)
    grid = grid_for_box(box, spacing, direction)
    reference = make_reference(grid, sitk.sitkFloat32)
    region = region_covering_box(image, box)
    if smooth and region is not None:  # float32; an integer image is cast slab by slab, its region never copied
        source = shrink_then_smooth(image, grid["spacing"], region)
    else:
        source = image
        if region is not None and list(region[1]) != list(image.GetSize()):
            source = sitk.RegionOfInterest(image, region[1], region[0])
        if source.GetPixelID() != sitk.sitkFloat32:
            source = sitk.Cast(source, sitk.sitkFloat32)
    # Nearest-neighbour extrapolation: the grid's rim past the last voxel centre repeats the edge voxels
    # instead of a flat background slice, whose edge the registration pyramid would smear into the data.
    return sitk.Resample(source, reference, sitk.Transform(), interpolator, float(default_value), sitk.sitkFloat32,
                         True)


def resample_to_spacing(image: sitk.Image, spacing, default_value: float | None = None,
                        interpolator=sitk.sitkLinear) -> sitk.Image:
    """The whole image at a new ``spacing`` (mm), same direction, same physical extent."""
    if default_value is None:
        default_value = float(sitk.GetArrayViewFromImage(image).min())
    return resample_box(image, bounding_box(image), spacing, default_value, interpolator)


def resample_onto(moving: sitk.Image, reference: sitk.Image, fixed_to_moving: sitk.Transform,
                  default_value: float = 0.0, interpolator=sitk.sitkLinear, pixel_id=None) -> sitk.Image:
    """``moving`` resampled on ``reference``'s grid through ``fixed_to_moving`` (ITK convention)."""
    return sitk.Resample(moving, reference, fixed_to_moving, interpolator, float(default_value),
                         moving.GetPixelID() if pixel_id is None else pixel_id)


def box_average_copy(image: sitk.Image, target_mm: float) -> sitk.Image:
    """Float32 box-averaged copy at about ``target_mm`` (integer shrink factors; never finer than the input).

    Fast and coarse: the diagnostics' working copies."""
    factors = [min(max(1, int(math.floor(target_mm / s + 1e-6))), max(1, n // 2))
               for s, n in zip(image.GetSpacing(), image.GetSize())]
    work = sitk.BinShrink(image, factors) if max(factors) > 1 else image
    return sitk.Cast(work, sitk.sitkFloat32)


def coarse_copy(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """Float32 copy no finer than ``spacing_mm`` per axis (anti-aliased resampling); the image itself (as
    float32) if already that coarse. The metrics' and pictures' working copies."""
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    if np.all(spacing >= spacing_mm * 0.999):
        return image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)
    return resample_to_spacing(image, np.maximum(spacing, spacing_mm).tolist())
