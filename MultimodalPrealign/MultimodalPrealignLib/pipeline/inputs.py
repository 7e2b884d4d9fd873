"""Reading a run's input files: the two images, optional label maps and landmarks (``register_files``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from ..io import image_io, labels
from ..io.landmarks import LandmarkPairs, load_landmark_pairs
from ..progress import Progress
from .options import PipelineOptions


@dataclass
class LoadedInputs:
    """The images read from disk, the optional label maps (on their image's grid) and landmark pairs."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_labels: sitk.Image | None
    moving_labels: sitk.Image | None
    landmarks: LandmarkPairs | None
    seconds: float  # reading time (s), report.json's timings_s.load


def load_inputs(fixed_path, moving_path, options: PipelineOptions, progress: Progress, fixed_labels_path=None,
                moving_labels_path=None, landmarks_path=None, moving_landmarks_path=None) -> LoadedInputs:
    """Read the images, label maps and landmarks; a label map's inferred task fills an unset
    ``options.fixed_labels_task`` / ``moving_labels_task``.

    A label map (:func:`io.labels.load_labels`) is a multi-label file, TotalSegmentator's folder of
    per-structure masks, or a Slicer .seg.nrrd, on its image's grid (read as UInt16)."""
    started = time.perf_counter()
    progress.report("load", 0.0, "reading images")
    fixed = image_io.load_image(fixed_path, "fixed image")
    moving = image_io.load_image(moving_path, "moving image")
    fixed_labels = moving_labels = None
    if fixed_labels_path is not None:
        fixed_labels, task = labels.load_labels(fixed_labels_path, fixed, "fixed label map",
                                                task=options.fixed_labels_task, image_name="fixed image")
        options.fixed_labels_task = options.fixed_labels_task or task
    if moving_labels_path is not None:
        moving_labels, task = labels.load_labels(moving_labels_path, moving, "moving label map",
                                                 task=options.moving_labels_task, image_name="moving image")
        options.moving_labels_task = options.moving_labels_task or task
    landmark_pairs = None
    if landmarks_path is not None:
        landmark_pairs = load_landmark_pairs(landmarks_path, moving_landmarks_path)
    return LoadedInputs(fixed, moving, fixed_labels, moving_labels, landmark_pairs, time.perf_counter() - started)


def record_input_paths(report: dict, fixed_path, moving_path, fixed_labels_path=None,
                       moving_labels_path=None) -> None:
    """Add each input file's absolute path to report.json's ``inputs``."""
    report["inputs"]["fixed"]["path"] = str(Path(fixed_path).resolve())
    report["inputs"]["moving"]["path"] = str(Path(moving_path).resolve())
    if fixed_labels_path is not None:
        report["inputs"]["fixed_labels"]["path"] = str(Path(fixed_labels_path).resolve())
    if moving_labels_path is not None:
        report["inputs"]["moving_labels"]["path"] = str(Path(moving_labels_path).resolve())
