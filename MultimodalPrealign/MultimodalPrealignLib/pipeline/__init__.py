"""The whole run, stage by stage; ``run_pipeline`` is the list of stages.

``run_pipeline`` works on in-memory SimpleITK images (used by the CLI, the Slicer module and tests); every
stage is a function taking the one :class:`state.RunState` that the run passes forward:

1. check inputs (:func:`stages.check_inputs`): refuse unusable images, label maps on other grids;
2. diagnose (:func:`stages.diagnose_images`): the pair's diagnostics from headers and images only;
3. pre-align (:func:`stages.prealign_pair`): the PRE-ALIGNMENT is born here (``prealign.run_prealign``),
   plus its candidate poses for the fallback;
4. diagnose (:func:`stages.diagnose_overlap`): the overlap under the pre-alignment, advice and verdict;
5. QA setup (:func:`stages.set_up_qa`): coarse copies for the metrics, the structure pairs to compare;
6. attempts (:mod:`attempts`): crop -> register -> guard -> evaluate -> judge, falling back to the next
   pre-alignment candidate or engine on FAIL (:mod:`fallback`, at most :data:`MAX_ATTEMPTS`). The engine
   finds the REGISTRATION CORRECTION on the working grids, starting from the attempt's initial pose, and
   returns the COMPOSED RESULT (pre-alignment followed by the correction; the guard may keep the
   pre-alignment instead);
7. report (:func:`stages.report`): report.json's content and the :class:`PipelineResult`.

``register_files`` adds file IO: :mod:`inputs` reads the files, :mod:`outputs` writes transform.h5,
moving_resampled.nrrd, report.json, report.html and pictures/ atomically. Every transform (pre-alignment,
registration correction, composed result) maps FIXED physical points to MOVING physical points (LPS mm, ITK
convention); the composed result is the output transform.
"""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from ..progress import Progress
from . import attempts, reproduce, stages
from .fallback import MAX_ATTEMPTS
from .inputs import load_inputs, record_input_paths
from .options import PipelineOptions, PipelineResult
from .outputs import OUTPUT_FILES, ResampleAhead, check_output_dir, move_into_place, resample_moving, write_outputs
from .state import QA_SPACING_MM, RunState

__all__ = [
    "MAX_ATTEMPTS", "OUTPUT_FILES", "QA_SPACING_MM", "PipelineOptions", "PipelineResult",
    "check_output_dir", "move_into_place", "register_files", "resample_moving", "run_pipeline",
]


def run_pipeline(fixed: sitk.Image, moving: sitk.Image, options: PipelineOptions | None = None,
                 fixed_labels: sitk.Image | None = None, moving_labels: sitk.Image | None = None,
                 progress: Progress | None = None, crop_fn=None, register_fn=None,
                 landmarks=None, structure_labels=None, moving_structure_labels=None,
                 resample_ahead=None) -> PipelineResult:
    """Pre-align, crop and register ``moving`` to ``fixed``; returns the composed fixed->moving transform.

    Every attempt is measured (:func:`qa.measure.evaluate`) and judged (PASS/WARN/FAIL); on FAIL the run falls
    back to the next distinct pre-alignment candidate, then to the other engine (``options.fallback``), and keeps
    the best attempt. ``crop_fn`` (signature of :func:`crop.apply_crop`) and ``register_fn`` (of
    :func:`engines.register`) replace the core's crop and engine steps; the Slicer module passes CropVolume and
    BRAINSFit/SlicerElastix (then only pre-alignment candidates are tried on fallback). ``landmarks``:
    :class:`landmarks.LandmarkPairs` for target registration errors. ``structure_labels`` /
    ``moving_structure_labels`` (:class:`structures.StructureLabels`, names kept): the structures of
    ``options.per_structure`` (default: from the label maps, or automatic bones with ``options.structure_threshold``).
    ``resample_ahead``: :class:`outputs.ResampleAhead` (``register_files``: the output image made early).
    """
    state = RunState.start(fixed, moving, options, fixed_labels, moving_labels, progress, crop_fn, register_fn,
                           landmarks)
    state.structure_labels, state.moving_structure_labels = structure_labels, moving_structure_labels
    state.resample_ahead = resample_ahead
    stages.check_inputs(state)
    stages.diagnose_images(state)
    stages.prealign_pair(state)
    stages.diagnose_overlap(state)
    stages.set_up_qa(state)
    attempts.plan_attempts(state)
    attempts.run_attempts(state)
    stages.register_structures(state)
    return stages.report(state)


def register_files(fixed_path, moving_path, out_dir, options: PipelineOptions | None = None,
                   fixed_labels_path=None, moving_labels_path=None, progress: Progress | None = None,
                   command: list | None = None, landmarks_path=None, moving_landmarks_path=None,
                   reproduce_with: dict | None = None) -> PipelineResult:
    """Run the pipeline on files; write transform.h5, moving_resampled.nrrd, report.json, report.html and
    pictures/ atomically (a staging folder moved into place at the end).

    ``command``: the command as typed (report.json ``command``). report.json ``reproduce`` holds the command line
    and Slicer console code that give the same transform (:mod:`reproduce`); ``reproduce_with`` replaces what
    cannot be repeated as is: ``{"fixed_labels": path or None, "moving_labels": ..., "extra_arguments": [...]}``
    (the command line's ``--segment`` made temporary label files: the command repeats ``--segment`` instead).
    """
    options = (options or PipelineOptions()).validate()
    progress = progress or Progress()
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    loaded = load_inputs(fixed_path, moving_path, options, progress, fixed_labels_path, moving_labels_path,
                         landmarks_path, moving_landmarks_path)

    named = structure_label_files(options, loaded, fixed_labels_path, moving_labels_path)
    ahead = ResampleAhead(loaded.fixed, loaded.moving)  # the output image, made while the result is measured
    try:
        result = run_pipeline(loaded.fixed, loaded.moving, options, loaded.fixed_labels, loaded.moving_labels,
                              progress, landmarks=loaded.landmarks, structure_labels=named[0],
                              moving_structure_labels=named[1], resample_ahead=ahead)
        result.report["timings_s"]["load"] = round(loaded.seconds, 3)
        record_input_paths(result.report, fixed_path, moving_path, fixed_labels_path, moving_labels_path)
        if command is not None:
            result.report["command"] = command
        given = dict(reproduce_with or {"fixed_labels": fixed_labels_path, "moving_labels": moving_labels_path})
        reproduce.for_files(result.report, result.engine.settings_used, fixed_path, moving_path, out_dir, options,
                            given.get("fixed_labels"), given.get("moving_labels"), landmarks_path,
                            moving_landmarks_path, extra_arguments=given.get("extra_arguments"))

        write_outputs(result, out_dir, loaded.fixed, loaded.moving, loaded.fixed_labels, loaded.moving_labels,
                      options.no_report, loaded.seconds, progress, ahead)
    finally:
        ahead.close()
    return result


def structure_label_files(options: PipelineOptions, loaded, fixed_labels_path=None, moving_labels_path=None) -> tuple:
    """``--per-structure``: the label files read again with their structure NAMES kept
    (:func:`structures.read_structure_labels`: segment names, TotalSegmentator names, mask file names; the
    anatomy pre-alignment's reading keeps only one TotalSegmentator task's classes). (fixed, moving), None where not
    asked or not given."""
    if not options.per_structure:
        return None, None
    from .. import structures

    fixed = moving = None
    if fixed_labels_path is not None and options.structure_threshold is None:
        fixed = structures.read_structure_labels(fixed_labels_path, loaded.fixed, "fixed", options.fixed_labels_task)
    if moving_labels_path is not None:
        moving = structures.read_structure_labels(moving_labels_path, loaded.moving, "moving",
                                                  options.moving_labels_task)
    return fixed, moving
