"""Load and check images and label maps (NRRD, NIfTI, MHA/MHD, DICOM series folder).

Images keep their full geometry (origin, spacing, direction). Physical space is LPS (ITK).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from . import dicom_series, headers

#: Relative tolerance when comparing two grids (origin in mm, spacing, direction cosines).
GRID_TOLERANCE = 1e-3


def _describe(path: Path) -> str:
    return f"'{path}'"


def _read_dicom_directory(path: Path) -> sitk.Image:
    """Read the single volume in a DICOM folder. Series checks live in ``dicom_series``."""
    return dicom_series.read_dicom_volume(path)


#: Serialises :func:`quiet_itk` (ITK's warning switch and file descriptor 2 are global to the process).
_QUIET_LOCK = threading.Lock()


@contextlib.contextmanager
def quiet_itk():
    """Keep ITK's warnings off the terminal while a file is read; yields a list that holds, after the block, what
    ITK and its readers printed (MetaIO and NIfTI print straight to the process's stderr, file descriptor 2).

    The descriptor is redirected only in the main thread (elsewhere, e.g. a worker thread, other threads' output
    would be swallowed too); ITK's own warning output is switched off in any thread.
    """
    printed: list[str] = []
    with _QUIET_LOCK:
        display = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
        saved = capture = None
        if threading.current_thread() is threading.main_thread():
            try:
                capture = tempfile.TemporaryFile()
                saved = os.dup(2)
                os.dup2(capture.fileno(), 2)
            except OSError:  # no stderr to redirect (some embedded interpreters)
                if saved is not None:
                    os.close(saved)
                if capture is not None:
                    capture.close()
                saved = capture = None
        try:
            yield printed
        finally:
            if saved is not None and capture is not None:
                os.dup2(saved, 2)
                os.close(saved)
                capture.seek(0)
                printed.append(capture.read().decode("utf-8", "replace"))
                capture.close()
            sitk.ProcessObject.SetGlobalWarningDisplay(display)


def read_image_file(path: str | os.PathLike, what: str = "image") -> sitk.Image:
    """Read an image file or DICOM folder, with a one-line error for anything unreadable.

    The header is checked first (:func:`headers.check_file`: an invalid voxel size, origin or direction, a missing
    or truncated data file are refused with the field or file named); ITK's warnings are kept off the terminal.
    Notes on valid but unusual headers (a negative voxel size: a mirrored axis) are kept in the image's metadata
    under :data:`headers.NOTES_KEY`.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"The {what} file {_describe(path)} does not exist",
                         "check the path (relative paths are taken from the current folder)")
    if path.is_dir():
        return _read_dicom_directory(path)
    if not os.access(path, os.R_OK):
        raise InputError(f"The {what} file {_describe(path)} is not readable", "check its permissions")
    notes = headers.check_file(path, what)
    failure = None
    with quiet_itk() as printed:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as err:
            failure = str(err)
    if failure is not None:
        raise headers.explain_read_error(path, failure + "\n" + "".join(printed), what,
                                         headers.recognised(path)) from None
    if notes:
        image.SetMetaData(headers.NOTES_KEY, "\n".join(notes))
    return image


def header_notes(image: sitk.Image) -> list[str]:
    """The notes :func:`read_image_file` kept on the image's header (e.g. a negative voxel size), one per item."""
    if not image.HasMetaDataKey(headers.NOTES_KEY):
        return []
    return [line for line in image.GetMetaData(headers.NOTES_KEY).splitlines() if line.strip()]


def check_image(image: sitk.Image, name: str, allow_labels: bool = False) -> sitk.Image:
    """Validate an image for registration and return it as a 3D scalar image.

    Refuses 2D and 4D images, vector images, empty or constant images and NaN/Inf voxels.
    A 4D image with a single time point is reduced to 3D.
    """
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dim = 3
    if dim == 2:
        raise InputError(f"The {name} is a 2D image (size {image.GetSize()})",
                         "give a 3D volume; a single slice cannot be registered in 3D")
    if dim != 3:
        raise InputError(f"The {name} is a {dim}D image (size {image.GetSize()})",
                         "give a single 3D volume (extract one time point or echo first)")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"The {name} has {image.GetNumberOfComponentsPerPixel()} components per voxel",
                         "give a scalar (grey-level) volume, not a colour or vector image")
    size = image.GetSize()
    if min(size) < 1 or int(np.prod(size)) == 0:
        raise InputError(f"The {name} is empty (size {size})", "give a volume with voxels in it")
    if min(size) < 2 and not allow_labels:
        raise InputError(f"The {name} has a single slice along one axis (size {size})",
                         "give a 3D volume with at least 2 voxels along each axis")
    spacing = image.GetSpacing()
    if min(spacing) <= 0 or not np.all(np.isfinite(spacing)):
        raise InputError(f"The {name} has an invalid voxel spacing {spacing}", "fix the image header")
    if not np.all(np.isfinite(image.GetOrigin())) or not np.all(np.isfinite(image.GetDirection())):
        raise InputError(f"The {name} has an invalid origin or direction (not finite: origin {image.GetOrigin()})",
                         "fix the image header")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise InputError(f"The {name} has {bad} NaN or infinite voxels",
                             "replace them (e.g. with the background value) before registering")
    if not allow_labels:
        lo, hi = float(array.min()), float(array.max())
        if lo == hi:
            raise InputError(f"The {name} is empty: every voxel is {lo:g}",
                             "check that the right file was given; a constant image has nothing to align")
    return image


def load_image(path: str | os.PathLike, name: str = "image") -> sitk.Image:
    """Read and validate a 3D scalar image; ``name`` ('fixed image', ...) is used in messages."""
    return check_image(read_image_file(path, name), name)


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = GRID_TOLERANCE) -> bool:
    """True when both images share size, spacing, origin and direction (within ``tolerance``)."""
    if a.GetSize() != b.GetSize():
        return False
    spacing = np.asarray(a.GetSpacing())
    if not np.allclose(spacing, b.GetSpacing(), rtol=tolerance, atol=0):
        return False
    if not np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance * max(spacing.max(), 1.0)):
        return False
    return bool(np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance))


def check_label_grid(labels: sitk.Image, image: sitk.Image, label_name: str, image_name: str) -> sitk.Image:
    """Refuse a label map whose voxel grid differs from its image's grid."""
    if not same_grid(labels, image):
        raise InputError(
            f"The {label_name} grid (size {labels.GetSize()}, spacing "
            f"{tuple(round(s, 3) for s in labels.GetSpacing())}) does not match the {image_name} "
            f"(size {image.GetSize()}, spacing {tuple(round(s, 3) for s in image.GetSpacing())})",
            f"give the label map that was computed from this {image_name} (e.g. TotalSegmentator's "
            "output for it), or resample it onto the image grid with nearest-neighbour interpolation",
        )
    return labels


def check_label_map(labels: sitk.Image, image: sitk.Image, label_name: str, image_name: str) -> sitk.Image:
    """:func:`check_label_grid`, and refuse a label map without a single label (every voxel 0)."""
    check_label_grid(labels, image, label_name, image_name)
    if not np.any(sitk.GetArrayViewFromImage(labels)):
        raise InputError(f"The {label_name} is empty (every voxel is 0)",
                         f"give the label map made for the {image_name} (check that TotalSegmentator found "
                         "structures in it), or leave the label maps out to pre-align from the images alone")
    return labels


def as_float32(image: sitk.Image) -> sitk.Image:
    """The image as float32 (the working type of every stage), geometry unchanged."""
    if image.GetPixelID() == sitk.sitkFloat32:
        return image
    return sitk.Cast(image, sitk.sitkFloat32)


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True, compression_level: int = 1) -> None:
    """Write an image; gzip level 1 by default (about half the time of the default level, ~35% larger)."""
    sitk.WriteImage(image, str(path), compress, compression_level)


#: NRRD type names of the scalar pixel types (teem's names, as ITK's NRRD writer spells them)
_NRRD_TYPES = {sitk.sitkInt8: "signed char", sitk.sitkUInt8: "unsigned char", sitk.sitkInt16: "short",
               sitk.sitkUInt16: "unsigned short", sitk.sitkInt32: "int", sitk.sitkUInt32: "unsigned int",
               sitk.sitkInt64: "long long int", sitk.sitkUInt64: "unsigned long long int",
               sitk.sitkFloat32: "float", sitk.sitkFloat64: "double"}


def write_nrrd_slabs(path: str | os.PathLike, grid: sitk.Image, pixel_id: int, slabs) -> None:
    """Write an uncompressed NRRD with ``grid``'s geometry (size, LPS origin, spacing, direction) and pixel type
    ``pixel_id`` from ``slabs``: arrays (z, y, x) of that type, consecutive along the last grid axis, covering the
    grid. The header is the one ITK's NRRD writer makes; a slab is written on a thread while the next is made.
    ValueError when the slabs do not fill the grid exactly."""
    if pixel_id not in _NRRD_TYPES:
        raise ValueError(f"no NRRD type for pixel type {sitk.GetPixelIDValueAsString(pixel_id)}")
    dtype = sitk.GetArrayFromImage(sitk.Image([1, 1, 1], pixel_id)).dtype
    size = grid.GetSize()
    direction = np.asarray(grid.GetDirection(), float).reshape(3, 3)
    axes = " ".join("(" + ",".join(repr(float(v)) for v in direction[:, i] * grid.GetSpacing()[i]) + ")"
                    for i in range(3))
    header = ("NRRD0004\n"
              f"type: {_NRRD_TYPES[pixel_id]}\ndimension: 3\nspace: left-posterior-superior\n"
              f"sizes: {size[0]} {size[1]} {size[2]}\nspace directions: {axes}\nkinds: domain domain domain\n"
              "endian: little\nencoding: raw\n"
              "space origin: (" + ",".join(repr(float(v)) for v in grid.GetOrigin()) + ")\n\n")
    written, pending = 0, None
    with open(path, "wb") as handle, ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmp-nrrd") as writer:
        handle.write(header.encode("ascii"))
        for slab in slabs:
            if slab.dtype != dtype or slab.ndim != 3 or slab.shape[1:] != (size[1], size[0]):
                raise ValueError("a slab does not match the grid's pixel type or its first two sizes")
            data = np.ascontiguousarray(slab, dtype=dtype.newbyteorder("<"))
            if pending is not None:
                pending.result()
            pending = writer.submit(handle.write, memoryview(data).cast("B"))
            written += slab.shape[0]
        if pending is not None:
            pending.result()
    if written != size[2]:
        raise ValueError(f"the slabs hold {written} of the grid's {size[2]} slices")
