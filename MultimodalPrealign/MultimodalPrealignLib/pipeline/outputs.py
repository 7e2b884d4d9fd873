"""The output folder of ``register``: what it may hold, and the atomic write of a run's outputs.

Everything is written into a staging folder next to the output folder and moved into place at the end, so a
failed run leaves no partial outputs. transform.h5 maps FIXED physical points to MOVING physical points
(LPS mm, ITK convention).

moving_resampled.nrrd is the moving image on the fixed grid in the MOVING image's pixel type, uncompressed
(:data:`RESAMPLED_COMPRESSION`): on the phantom pair (CT grid 512 x 512 x 409, int16) gzip level 1 took 1.8 s of
CPU and the default level 3.4 s for a file of 146 / 109 MB instead of 214 MB, the raw write 0.1 s. It is resampled
and written on a worker thread while the pictures and report.html are made (SimpleITK releases the GIL). On a fixed
grid of more than :data:`STREAMED_WRITE_VOXELS` (a 1024^3 microCT) it is resampled and written slab by slab, only
the part of the grid the moving image can reach resampled, so it never sits whole in memory beside the fixed image.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import crop, stopping
from ..errors import InputError
from ..geometry import image_space, resample, transforms
from ..io import image_io
from ..progress import Progress
from ..qa import reporting
from .options import PipelineResult

#: Files `register` writes into its output folder (re-running into a folder holding only these is allowed).
OUTPUT_FILES = ("transform.h5", "moving_resampled.nrrd", "report.json", "report.html", "pictures", "structures")

#: gzip level of moving_resampled.nrrd; 0 = uncompressed (a viewer's copy of the moving image, as large as the
#: fixed grid: writing it compressed cost more than the registration stage on the phantom pair)
RESAMPLED_COMPRESSION = 0


def check_output_dir(out_dir: Path) -> None:
    """Refuse, before any work, an output folder that cannot be written or that holds anything but our own
    outputs (a previous run's are replaced).

    The outputs are staged beside ``out_dir`` and moved into it, so the nearest existing folder on its path must
    accept a new folder: this is tried (a folder made and removed), which catches read-only file systems and
    missing permissions alike, also for root.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"The output path '{out_dir}' exists and is a file", "give a folder path to --out")
    if out_dir.is_dir():
        other = sorted(p.name for p in out_dir.iterdir() if p.name not in OUTPUT_FILES)
        if other:
            shown = ", ".join(other[:3]) + (" ..." if len(other) > 3 else "")
            raise InputError(f"The output folder '{out_dir}' already holds other files ({shown})",
                             "give a new or empty folder to --out")
    _check_writable(out_dir.resolve())


def _check_writable(out_dir: Path) -> None:
    """InputError naming the reason when no folder can be made beside/inside ``out_dir``'s nearest existing folder."""
    existing = out_dir.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"The output folder '{out_dir}' would be inside '{existing}', which is a file",
                         "give a folder path to --out that is not under a file")
    probes = [existing] + ([out_dir] if out_dir.is_dir() else [])
    for folder in probes:
        try:
            shutil.rmtree(tempfile.mkdtemp(prefix=".mmp-write-check-", dir=str(folder)))
        except OSError as err:
            reason = {13: "permission denied", 30: "read-only file system"}.get(err.errno, err.strerror or str(err))
            raise InputError(f"The output folder '{out_dir}' cannot be written ({reason} in '{folder}')",
                             "give --out a folder you can write to") from None


#: fixed grids of more voxels than this get moving_resampled.nrrd resampled and written slab by slab (a 1024^3
#: microCT grid would otherwise hold a second 2.1 GB image beside the fixed one); smaller ones in one piece
STREAMED_WRITE_VOXELS = 1 << 28
#: voxels per slab of a streamed write
STREAMED_SLAB_VOXELS = 1 << 24


def resample_moving(fixed: sitk.Image, moving: sitk.Image, fixed_to_moving: sitk.Transform) -> sitk.Image:
    """The ORIGINAL moving image on the ORIGINAL fixed grid (``fixed_to_moving``: fixed -> moving, LPS mm), linear
    interpolation, in the moving image's pixel type (an int16 MR stays int16: half the bytes of float32)."""
    return sitk.Resample(moving, fixed, fixed_to_moving, sitk.sitkLinear, crop.background_value(moving),
                         moving.GetPixelID())


def streamed(fixed: sitk.Image) -> bool:
    """True when moving_resampled.nrrd on ``fixed``'s grid is made slab by slab (:data:`STREAMED_WRITE_VOXELS`)."""
    size = fixed.GetSize()
    return size[0] * size[1] * size[2] > STREAMED_WRITE_VOXELS


def resampled_slabs(fixed: sitk.Image, moving: sitk.Image, fixed_to_moving: sitk.Transform):
    """:func:`resample_moving` in slabs (arrays z, y, x) along the fixed grid's last axis.

    With a linear transform only the fixed voxels whose points can fall inside the moving image (the box around
    its footprint, plus 2 voxels) are resampled; the others hold the background value as ITK gives it (a microCT
    grid around a small MR: most of the grid)."""
    size = list(fixed.GetSize())
    step = max(1, STREAMED_SLAB_VOXELS // (size[0] * size[1]))
    background = crop.background_value(moving)
    pixel_id = moving.GetPixelID()

    def resampled(index, box_size) -> np.ndarray:
        reference = sitk.Image([int(v) for v in box_size], sitk.sitkUInt8)
        reference.SetSpacing(fixed.GetSpacing())
        reference.SetDirection(fixed.GetDirection())
        reference.SetOrigin(fixed.TransformIndexToPhysicalPoint([int(v) for v in index]))
        return sitk.GetArrayFromImage(sitk.Resample(moving, reference, fixed_to_moving, sitk.sitkLinear, background,
                                                    pixel_id))

    box = _footprint_box(fixed, moving, fixed_to_moving)
    if box is None:
        for start in range(0, size[2], step):
            yield resampled([0, 0, start], size[:2] + [min(step, size[2] - start)])
        return
    far = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    far.SetOrigin([1e12, 1e12, 1e12])  # outside any image: the background value in the output's type
    fill = sitk.GetArrayFromImage(sitk.Resample(moving, far, fixed_to_moving, sitk.sitkLinear, background,
                                                pixel_id)).ravel()[:1]
    (x0, y0, z_first), (x1, y1, z_last) = box
    outside = None  # one all-background slab, written as often as needed (never changed)
    for start in range(0, size[2], step):
        thickness = min(step, size[2] - start)
        z0, z1 = max(start, z_first), min(start + thickness, z_last)
        if z1 <= z0 or x1 <= x0 or y1 <= y0:
            if outside is None or outside.shape[0] != thickness:
                outside = np.full((thickness, size[1], size[0]), fill[0], dtype=fill.dtype)
            yield outside
            continue
        array = np.full((thickness, size[1], size[0]), fill[0], dtype=fill.dtype)
        array[z0 - start:z1 - start, y0:y1, x0:x1] = resampled([x0, y0, z0], [x1 - x0, y1 - y0, z1 - z0])
        yield array


def _footprint_box(fixed: sitk.Image, moving: sitk.Image, fixed_to_moving: sitk.Transform):
    """(lower, upper) fixed voxel indices (x, y, z; upper exclusive) around the moving image's extent mapped into the
    fixed grid, 2 voxels wider on each side (empty when it misses the grid); None for a transform that is not linear
    (no box: everything)."""
    inverse = transforms.inverse_or_none(fixed_to_moving)
    if inverse is None:
        return None
    corners = transforms.transform_points(inverse, image_space.physical_corners(moving))
    region = resample.region_covering_points(fixed, corners, pad_voxels=2)
    if region is None:
        return [0, 0, 0], [0, 0, 0]
    index, size = region
    return list(index), [i + n for i, n in zip(index, size)]


class ResampleAhead:
    """moving_resampled.nrrd's image computed while the run measures its first result.

    :meth:`start` (called once, by the first attempt as soon as its transform is registered and guarded) resamples
    on a worker thread while the QA metrics run; :meth:`take` hands the image to :func:`write_outputs` when the run
    kept that very transform (no fallback), else None (the image is made again for the transform kept). A later
    :meth:`start` (a fallback attempt) drops the image, so a fallback does not run with it in memory; the kept
    transform is then resampled at write time, as before.
    """

    def __init__(self, fixed: sitk.Image, moving: sitk.Image):
        self.fixed, self.moving = fixed, moving
        self._worker: ThreadPoolExecutor | None = None
        self._future: Future | None = None
        self._transform: sitk.Transform | None = None

    def start(self, fixed_to_moving: sitk.Transform) -> None:
        if self._transform is not None:  # a fallback attempt: the first result's image is not needed
            self._future = None
            return
        if streamed(self.fixed):  # written slab by slab at the end instead of held whole
            return
        self._transform = fixed_to_moving
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmp-resample-ahead")
        self._future = self._worker.submit(_timed_resample, self.fixed, self.moving, fixed_to_moving)

    def take(self, fixed_to_moving: sitk.Transform) -> tuple[sitk.Image, float] | None:
        """(image, seconds it took) when it was made for ``fixed_to_moving`` (the same object), else None."""
        if self._future is None or fixed_to_moving is not self._transform:
            return None
        future, self._future = self._future, None
        return future.result()

    def close(self) -> None:
        """Drop the image; wait for the worker (a resampling cannot be interrupted)."""
        self._future = None
        if self._worker is not None:
            self._worker.shutdown(wait=True)


def _timed_resample(fixed: sitk.Image, moving: sitk.Image, fixed_to_moving: sitk.Transform) -> tuple[sitk.Image,
                                                                                                     float]:
    started = time.perf_counter()
    return resample_moving(fixed, moving, fixed_to_moving), time.perf_counter() - started


def write_resampled(fixed: sitk.Image, moving: sitk.Image, fixed_to_moving: sitk.Transform, path: Path, *,
                    compression: int = RESAMPLED_COMPRESSION, ahead: ResampleAhead | None = None) -> float:
    """Resample the moving image onto the fixed grid (:func:`resample_moving`; taken from ``ahead`` when it made it
    for this transform) and write it to ``path``, gzip level ``compression`` (0: uncompressed; on a large fixed grid
    slab by slab, :func:`streamed`); returns the
    seconds of resampling and writing."""
    started = time.perf_counter()
    if streamed(fixed) and compression == 0:
        image_io.write_nrrd_slabs(path, fixed, moving.GetPixelID(), resampled_slabs(fixed, moving, fixed_to_moving))
        return time.perf_counter() - started
    made = ahead.take(fixed_to_moving) if ahead is not None else None
    image, earlier = made if made is not None else (resample_moving(fixed, moving, fixed_to_moving), 0.0)
    image_io.write_image(image, path, compress=compression > 0, compression_level=max(compression, 1))
    return time.perf_counter() - started + earlier


def write_outputs(result: PipelineResult, out_dir: Path, fixed: sitk.Image, moving: sitk.Image,
                  fixed_labels: sitk.Image | None, moving_labels: sitk.Image | None, no_report: bool,
                  load_seconds: float, progress: Progress, ahead: ResampleAhead | None = None) -> None:
    """Write transform.h5, moving_resampled.nrrd, report.json and (unless ``no_report``) report.html and
    pictures/ into a staging folder, then move them into ``out_dir`` (created; our previous outputs replaced).

    Completes ``result.report`` (outputs, verdict, write timings) before report.json is written. ``ahead``: the
    resampled moving image made while the run measured its result (:class:`ResampleAhead`).
    """
    report = result.report
    progress.report("write", 0.95, f"writing outputs to {out_dir}")
    started = time.perf_counter()
    parent = out_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=str(parent)))
    stopping.track(staging)  # removed if the process must be ended (Ctrl-C during a long write)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmp-resampled")
    try:
        transforms.write_transform(result.transform, staging / "transform.h5")
        # the largest output, on a worker thread while the pictures and report.html are made
        resampled: Future = worker.submit(write_resampled, fixed, moving, result.transform,
                                          staging / "moving_resampled.nrrd", ahead=ahead)
        report["outputs"] = {"transform": "transform.h5", "moving_resampled": "moving_resampled.nrrd",
                             "report": "report.json"}
        if not no_report:
            report["outputs"].update({"report_html": "report.html", "pictures": "pictures/"})
        if result.structures:  # --per-structure: structures/<name>/transform.h5, ... (structures.outputs)
            from .. import structures

            structures.write_structure_outputs(staging, report["structures"], result.structures, fixed, moving,
                                               result.structure_labels, result.transform, pictures=not no_report)
            report["outputs"]["structures"] = "structures/"
        qa_started = time.perf_counter()
        reporting.finish_report(report, staging, fixed, moving, result.initial or result.prealign.transform,
                                result.transform, fixed_labels, moving_labels, result.structure_pairs,
                                write_pictures=not no_report)
        report["timings_s"]["report"] = round(time.perf_counter() - qa_started, 3)
        waited = time.perf_counter()
        report["timings_s"]["write_resampled"] = round(resampled.result(), 3)  # resampling (maybe ahead) + writing
        report["timings_s"]["write_resampled_wait"] = round(time.perf_counter() - waited, 3)  # what the run waited
        report["timings_s"]["write"] = round(time.perf_counter() - started, 3)
        report["timings_s"]["total_with_io"] = round(report["timings_s"]["total"] + load_seconds
                                                     + report["timings_s"]["write"], 3)
        (staging / "report.json").write_text(json.dumps(_jsonable(report), indent=2) + "\n", encoding="utf-8")
        progress.check_cancelled()  # the last point where a stop leaves the output folder as it was
        with stopping.committing():
            move_into_place(staging, out_dir)
    finally:
        worker.shutdown(wait=True)  # the worker's file is in the staging folder: done before it is removed
        shutil.rmtree(staging, ignore_errors=True)
        stopping.untrack(staging)
    progress.report("write", 1.0, f"outputs in {out_dir}")


def move_into_place(staging: Path, out_dir: Path) -> None:
    """Move everything in ``staging`` into ``out_dir`` (created), replacing same-named files or folders; a previous
    run's outputs that this run did not make (report.html and pictures/ after a --no-report rerun) are removed,
    so the folder never mixes two runs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made = {item.name for item in staging.iterdir()}
    for name in OUTPUT_FILES:
        stale = out_dir / name
        if name not in made and stale.is_dir():
            shutil.rmtree(stale)
        elif name not in made and stale.exists():
            stale.unlink()
    for item in staging.iterdir():
        target = out_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(item, target)


def _jsonable(value):
    """``value`` with numpy scalars/arrays and paths turned into JSON types (dict keys as strings)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value
