"""The stages of a run around the attempts, in order; each takes the :class:`RunState` and records its results.

check inputs -> diagnose (headers and images) -> pre-align -> diagnose (overlap under the pre-alignment)
-> QA setup -> [attempts: :mod:`pipeline.attempts`] -> report. Transforms map FIXED physical points to MOVING
physical points (LPS mm).
"""

from __future__ import annotations

import datetime
import platform
import time

import numpy as np
import SimpleITK as sitk

from .. import __version__, diagnose, prealign
from ..geometry import image_space, resample, transforms
from ..io import image_io
from ..qa import metrics
from .options import PipelineResult
from .state import QA_SPACING_MM, RunState


def check_inputs(state: RunState) -> None:
    """Refuse unusable images and label maps on other grids; keep float32 copies for the stages."""
    state.fixed = image_io.check_image(state.fixed, "fixed image")
    state.moving = image_io.check_image(state.moving, "moving image")
    if state.fixed_labels is not None:
        image_io.check_label_grid(state.fixed_labels, state.fixed, "fixed label map", "fixed image")
    if state.moving_labels is not None:
        image_io.check_label_grid(state.moving_labels, state.moving, "moving label map", "moving image")
    state.fixed_f, state.moving_f = image_io.as_float32(state.fixed), image_io.as_float32(state.moving)


def diagnose_images(state: RunState) -> None:
    """The pair's diagnostics from headers and images only (:func:`diagnose.diagnose_images`)."""
    started = time.perf_counter()
    state.diagnostics = diagnose.diagnose_images(state.fixed, state.moving)
    state.diagnose_seconds = time.perf_counter() - started


def prealign_pair(state: RunState) -> None:
    """Run the pre-alignment method: the initial fixed->moving transform (LPS mm) and its candidates."""
    options, progress = state.options, state.progress
    progress.report("prealign", 0.05, f"pre-alignment '{options.prealign}'")
    started = time.perf_counter()
    inputs = prealign.PrealignInputs(
        fixed=state.fixed_f, moving=state.moving_f, fixed_labels=state.fixed_labels,
        moving_labels=state.moving_labels, fixed_labels_task=options.fixed_labels_task,
        moving_labels_task=options.moving_labels_task, seed=options.registration.seed,
        options=dict(options.prealign_options), progress=progress)
    pre = prealign.run_prealign(options.prealign, inputs)
    state.timings["prealign"] = time.perf_counter() - started
    state.warnings.extend(pre.warnings)
    progress.report("prealign", 0.35, f"'{pre.method}' done in {state.timings['prealign']:.1f} s")
    state.prealignment = pre


def diagnose_overlap(state: RunState) -> None:
    """Finish the diagnostics: the overlap under the pre-alignment, advice and verdict."""
    started = time.perf_counter()
    pre = state.prealignment
    diagnose.finish_diagnosis(state.diagnostics, state.fixed, state.moving, pre.transform, pre.method)
    state.timings["diagnose"] = state.diagnose_seconds + (time.perf_counter() - started)


def set_up_qa(state: RunState) -> None:
    """Coarse copies the metrics run on (:data:`QA_SPACING_MM`) and the structure pairs to compare."""
    started = time.perf_counter()
    state.fixed_qa = resample.coarse_copy(state.fixed_f, QA_SPACING_MM)
    state.moving_qa = resample.coarse_copy(state.moving_f, QA_SPACING_MM)
    if state.fixed_labels is not None and state.moving_labels is not None:
        state.structure_pairs = metrics.structure_pairs(state.options.fixed_labels_task,
                                                        state.options.moving_labels_task)
    state.timings["qa_setup"] = time.perf_counter() - started


def report(state: RunState) -> PipelineResult:
    """report.json's content and the run's result (the chosen attempt's composed fixed->moving transform)."""
    chosen = state.chosen
    state.timings["total"] = time.perf_counter() - state.started
    content = _report_content(state)
    state.progress.report("done", 0.94, f"registration pipeline finished in {state.timings['total']:.1f} s "
                          f"(verdict {content['verdict']})")
    result = PipelineResult(chosen.result.transform, state.prealignment, chosen.plan, chosen.result, content,
                            state.warnings)
    result.initial = chosen.initial
    result.structure_pairs = state.structure_pairs
    return result


def _report_content(state: RunState) -> dict:
    """report.json (before file IO adds paths, outputs and IO timings); keys in their documented order."""
    qa_report, chosen, pre, options = state.qa_report, state.chosen, state.prealignment, state.options
    final = chosen.result.transform
    return {
        "tool": {"name": "MultimodalPrealign", "version": __version__, "python": platform.python_version(),
                 "simpleitk": sitk.Version_VersionString()},
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "convention": "transforms map FIXED physical points to MOVING physical points (LPS mm, ITK resampling "
                      "direction); apply transform.h5 to the moving volume in Slicer to align it",
        "verdict": qa_report.get("verdict"),
        "verdict_reasons": qa_report.get("verdict_reasons", []),
        "inputs": _describe_inputs(state),
        "settings": {**options.to_dict(), "prealign_used": pre.method, "engine_used": chosen.engine,
                     "engine_settings_used": chosen.result.settings_used},
        "diagnostics": state.diagnostics,
        "prealign": {"method": pre.method, "requested": options.prealign,
                     "transform": transforms.summarize(pre.transform), "initial_transform_used": chosen.label,
                     "details": pre.details, "candidates": pre.candidates},
        "crop": chosen.plan.details,
        "registration": {"engine": chosen.engine, "stages": chosen.result.stages, "guard": chosen.guard,
                         "transform": transforms.summarize(final),
                         "correction_after_prealign": _correction(chosen.initial, final)},
        "transform": {"file": "transform.h5", "summary": transforms.summarize(final)},
        "metrics": qa_report["metrics"],
        "qa_checks": qa_report.get("qa_checks", []),
        "fallback": qa_report.get("fallback"),
        "timings_s": {k: round(v, 3) for k, v in state.timings.items()},
        "warnings": state.warnings,
    }


def _describe_inputs(state: RunState) -> dict:
    """report.json's ``inputs``: geometry of each image and label map, the number of landmark pairs."""
    def described(image):
        return None if image is None else image_space.describe_image(image)

    return {"fixed": image_space.describe_image(state.fixed), "moving": image_space.describe_image(state.moving),
            "fixed_labels": described(state.fixed_labels), "moving_labels": described(state.moving_labels),
            "landmarks": None if state.landmarks is None else len(state.landmarks.labels)}


def _correction(pre: sitk.Transform, final: sitk.Transform) -> dict | None:
    """What registration added on top of the pre-alignment: R with final = pre(R(p)), linear part only."""
    if not (transforms.is_linear(pre) and transforms.is_linear(final)):
        return None
    r = np.linalg.inv(transforms.to_matrix(pre)) @ transforms.to_matrix(final)
    return transforms.summarize(transforms.affine_from_matrix(r))
