"""Automatic bone labels of a CT or microCT (``--structures-from-threshold HU``): threshold, fill, split at the
joint space, one label per bone.

1. A working copy at about ``working_spacing_mm`` (block averaging: 0.5 mm for a 0.1 mm microCT).
2. Bone = voxels above ``threshold`` (HU), closed by 1 mm, and each connected piece filled on its own (3D, and 2D
   along each axis, so a bone cut by the field of view is filled too: its marrow and trabecular interior average
   below the threshold; filling piece by piece never bridges a joint space that bones enclose together).
3. Connected components (6-connected); components below ``min_volume_ml`` (1 ml) or 2% of the largest are dropped.
4. Joint-space separation: a component that holds two bones touching across a joint space thinner than the working
   voxel is eroded step by step (up to ``max_split_mm``) until it falls apart into pieces of at least
   ``min_split_share`` of its volume; every voxel then goes to the nearest piece.
5. Labels ``bone_1``, ``bone_2``, ... in decreasing volume, on the working grid (the fixed image's physical space).

Where it fails: in MR (bone is not bright); where two bones truly touch over a large area (ankylosis, osteophytes,
a joint space narrowed to nothing) the erosion may not separate them, or splits one bone at a thin neck instead;
metal, contrast agent or calcified cartilage above the threshold joins the bones; a bone cut by the field of view
into two disjoint parts gives two labels; osteoporotic bone with a thin, broken cortex is not filled; the names say
nothing of anatomy (bone_1 is simply the largest). Give a segmentation instead when that matters.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import InputError
from ..geometry.resample import float32_bin_shrink
from .labels import StructureLabels


def _working_copy(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    factors = [max(1, int(np.floor(spacing_mm / s + 1e-6))) for s in image.GetSpacing()]
    factors = [min(f, max(1, n // 4)) for f, n in zip(factors, image.GetSize())]
    return float32_bin_shrink(image, factors)  # an int16 microCT: block sums, no float32 copy of it


def _fill(mask: np.ndarray) -> np.ndarray:
    """Holes filled in 3D and in the 2D slices along each axis (interiors of bones cut by the field of view)."""
    filled = ndimage.binary_fill_holes(mask)
    for axis in range(3):
        moved = np.moveaxis(mask, axis, 0)
        slices = np.stack([ndimage.binary_fill_holes(s) for s in moved])
        filled |= np.moveaxis(slices, 0, axis)
    return filled


def _closing(mask: np.ndarray, radius) -> np.ndarray:
    """Binary closing by a box of half-widths ``radius`` (voxels per array axis), outside the array empty: one
    dilation then one erosion by lines along each axis (a box is the sum of its edges: the same voxels as with the
    whole box, in a fraction of the time)."""
    out = mask
    for step in (ndimage.binary_dilation, ndimage.binary_erosion):
        for axis, r in enumerate(radius):
            shape = [1, 1, 1]
            shape[axis] = 2 * int(r) + 1
            out = step(out, np.ones(shape, bool), border_value=0)
    return out


def _split(component: np.ndarray, max_steps: int, min_voxels: int) -> np.ndarray | None:
    """Labels 1..k of ``component`` split at its thinnest necks by erosion (nearest piece for the rest); None when
    no erosion up to ``max_steps`` voxels splits it into pieces of at least ``min_voxels``."""
    structure = ndimage.generate_binary_structure(3, 1)
    eroded = component
    for _ in range(max_steps):
        eroded = ndimage.binary_erosion(eroded, structure)
        if not eroded.any():
            return None
        pieces, count = ndimage.label(eroded, structure)
        if count < 2:
            continue
        sizes = np.bincount(pieces.ravel())[1:]
        big = np.flatnonzero(sizes >= min_voxels) + 1
        if len(big) < 2:
            continue
        seeds = np.where(np.isin(pieces, big), pieces, 0)
        _, nearest = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
        assigned = seeds[tuple(nearest)]
        out = np.where(component, assigned, 0)
        _, ranks = np.unique(out, return_inverse=True)  # relabel 1..k
        return ranks.reshape(out.shape).astype(np.int32)
    return None


def threshold_bone_labels(image: sitk.Image, threshold: float, working_spacing_mm: float = 0.5,
                          min_volume_ml: float = 1.0, max_split_mm: float = 3.0, min_split_share: float = 0.1,
                          min_share_of_largest: float = 0.02) -> StructureLabels:
    """Bone labels ``bone_1``, ``bone_2``, ... (largest first) of a CT/microCT by threshold and joint-space
    separation (module docstring), on a grid of about ``working_spacing_mm`` in ``image``'s physical space.

    ``threshold``: in the image's units (HU); ``min_volume_ml``, ``min_share_of_largest``: smaller components are
    dropped (specks above the threshold: calcifications, noise; on the real phantom 0.1 ml specks); ``max_split_mm``:
    how far the joint-space separation may erode; ``min_split_share``: each piece of a split holds at least this
    share of the component. InputError when nothing above the threshold is left.
    """
    work = _working_copy(image, max(float(working_spacing_mm), min(image.GetSpacing())))
    spacing = np.asarray(work.GetSpacing(), float)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    bone = sitk.GetArrayViewFromImage(work) > float(threshold)
    radius = [max(1, int(round(1.0 / s))) for s in spacing[::-1]]
    closing = _closing(bone, radius)
    structure = ndimage.generate_binary_structure(3, 1)
    components, count = ndimage.label(bone | closing, structure)
    filled = np.zeros(bone.shape, np.int32)  # each component filled on its own: no fill across a joint space
    for number, box in enumerate(ndimage.find_objects(components), start=1):
        if box is not None:
            inside = _fill(components[box] == number)
            filled[box][inside & (filled[box] == 0)] = number
    bone = filled > 0
    components, count = ndimage.label(bone, structure)
    sizes = np.bincount(components.ravel())
    largest = int(sizes[1:].max()) if count else 0
    keep = [c for c in range(1, count + 1)
            if sizes[c] * voxel_ml >= min_volume_ml and sizes[c] >= min_share_of_largest * largest]
    if not keep:
        raise InputError(f"No bone above {threshold:g} in the fixed image (no connected region of at least "
                         f"{min_volume_ml:g} ml)", "lower --structures-from-threshold (e.g. 300 HU for a CT) or "
                         "give a segmentation with --fixed-labels")
    pieces: list[np.ndarray] = []
    max_steps = max(1, int(round(max_split_mm / float(spacing.min()))))
    boxes = ndimage.find_objects(components)
    for c in keep:
        # the component's box and one empty voxel around it: erosion, labelling and nearest pieces as on the whole grid
        box = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, n)) for b, n in zip(boxes[c - 1], bone.shape))
        component = components[box] == c
        split = _split(component, max_steps, max(1, int(min_split_share * sizes[c])))
        index = np.indices(component.shape).reshape(3, -1)  # box voxel -> whole-grid flat index
        flat = np.ravel_multi_index(tuple(index[k] + box[k].start for k in range(3)), bone.shape)
        if split is None:
            pieces.append(flat[component.ravel()])
        else:
            pieces += [flat[split.ravel() == k] for k in range(1, int(split.max()) + 1)]
    pieces.sort(key=len, reverse=True)
    out = np.zeros(bone.size, np.uint16)
    names = {}
    for number, index in enumerate(pieces, start=1):
        out[index] = number
        names[f"bone_{number}"] = [number]
    labels = sitk.GetImageFromArray(out.reshape(bone.shape))
    labels.CopyInformation(work)
    return StructureLabels(labels, names, f"automatic bones: threshold {threshold:g}, {len(pieces)} bone(s) on a "
                                          f"{spacing.max():.2f} mm grid")
