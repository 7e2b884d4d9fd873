"""The stages of a run around the attempts, in order; each takes the :class:`RunState` and records its results.

check inputs -> diagnose (headers and images) -> pre-align -> diagnose (overlap under the pre-alignment)
-> QA setup -> [attempts: :mod:`pipeline.attempts`] -> structures (``--per-structure`` only) -> report.
Transforms map FIXED physical points to MOVING physical points (LPS mm).
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import time

import numpy as np
import SimpleITK as sitk

from .. import __version__, diagnose, prealign, structures
from ..errors import InputError
from ..geometry import image_space, resample, transforms
from ..io import image_io, plausibility
from ..qa import metrics, verdict
from . import attempts
from .options import PipelineResult
from .state import QA_SPACING_MM, RunState


def check_inputs(state: RunState) -> None:
    """Refuse unusable images and label maps on other grids; with ``--per-structure`` find the structures."""
    state.fixed = image_io.check_image(state.fixed, "fixed image")
    state.moving = image_io.check_image(state.moving, "moving image")
    plausibility.check_pair(state.fixed, state.moving)  # images in other units (metres vs mm, a voxel size x100)
    if state.fixed_labels is not None:
        image_io.check_label_map(state.fixed_labels, state.fixed, "fixed label map", "fixed image")
    if state.moving_labels is not None:
        image_io.check_label_map(state.moving_labels, state.moving, "moving label map", "moving image")
    if state.options.per_structure:
        check_structures(state)


def check_structures(state: RunState) -> None:
    """``--per-structure``: the fixed image's structures by name (given, from the fixed label map, or automatic bones
    by threshold), checked before anything runs: InputError when there are none or none of the requested names
    exists (a single missing name is that structure's error; the others still run)."""
    options = state.options
    if state.structure_labels is None and options.structure_threshold is not None:
        state.structure_labels = structures.threshold_bone_labels(state.fixed, float(options.structure_threshold))
    elif state.structure_labels is None and state.fixed_labels is not None:
        state.structure_labels = structures.from_label_image(state.fixed_labels, options.fixed_labels_task)
    if state.structure_labels is None:
        raise InputError("--per-structure needs the structures of the fixed image",
                         "give --fixed-labels (a label map or segmentation of the fixed image, structures named as in "
                         "it) or --structures-from-threshold HU (bones of a CT or microCT)")
    if state.moving_structure_labels is None and state.moving_labels is not None:
        state.moving_structure_labels = structures.from_label_image(state.moving_labels, options.moving_labels_task)
    chosen, problems = structures.select(state.structure_labels, options.per_structure)
    if not chosen:
        raise InputError(problems[0][1].split(" Fix: ")[0] if problems else "The fixed label map holds no structure",
                         "use names of the fixed label map in --per-structure, or 'all'")


def register_structures(state: RunState) -> None:
    """``--per-structure``: each named structure registered on its own from the chosen attempt's result
    (:func:`structures.run`); its results and report.json's ``structures`` block go into the state."""
    options = state.options
    if not options.per_structure:
        return
    started = time.perf_counter()
    registration = dataclasses.replace(options.registration, engine=state.chosen.engine,
                                       stages=tuple(options.structure_stages))
    if state.custom_engine:  # the caller's tools ran the global registration; the structures use the core's engine
        registration.engine = "itk" if state.chosen.engine not in ("itk", "elastix") else state.chosen.engine
    settings = structures.StructureSettings(registration=registration)
    state.structure_results, state.structures_report = structures.run(
        state.fixed, state.moving, state.chosen.result.transform, state.structure_labels, options.per_structure,
        settings, state.moving_structure_labels, state.progress.span(*attempts.STRUCTURES_WINDOW),
        None if state.custom_engine else state.register_fn)
    state.timings["structures"] = time.perf_counter() - started


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
        fixed=state.fixed, moving=state.moving, fixed_labels=state.fixed_labels,
        moving_labels=state.moving_labels, fixed_labels_task=options.fixed_labels_task,
        moving_labels_task=options.moving_labels_task, seed=options.registration.seed,
        options=dict(options.prealign_options), progress=progress.span(0.05, 0.35))
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
    state.fixed_qa = resample.coarse_copy(state.fixed, QA_SPACING_MM)
    state.moving_qa = resample.coarse_copy(state.moving, QA_SPACING_MM)
    if state.fixed_labels is not None and state.moving_labels is not None:
        state.structure_pairs = metrics.structure_pairs(state.options.fixed_labels_task,
                                                        state.options.moving_labels_task)
    state.timings["qa_setup"] = time.perf_counter() - started


def report(state: RunState) -> PipelineResult:
    """report.json's content and the run's result (the chosen attempt's composed fixed->moving transform)."""
    chosen = state.chosen
    state.timings["total"] = time.perf_counter() - state.started
    content = _report_content(state)
    verdict.apply_verdict(content)  # judged again with the inputs' own geometry (the content check)
    if state.structures_report is not None:
        content["structures"] = state.structures_report
    state.progress.report("done", 0.94, f"registration pipeline finished in {state.timings['total']:.1f} s "
                          f"(verdict {content['verdict']})")
    result = PipelineResult(chosen.result.transform, state.prealignment, chosen.plan, chosen.result, content,
                            state.warnings)
    result.initial = chosen.initial
    result.structure_pairs = state.structure_pairs
    result.structures, result.structure_labels = state.structure_results, state.structure_labels
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
                     "details": pre.details, "candidates": top_candidates(pre.candidates),
                     "candidates_total": len(pre.candidates)},
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


#: report.json keeps this many pre-alignment candidates, the best scores first (a search scores thousands of poses;
#: the fallback uses them all, from the pre-alignment's result).
REPORT_CANDIDATES = 10


def top_candidates(candidates: list, count: int = REPORT_CANDIDATES) -> list:
    """The ``count`` best-scored candidate records (records without a score last), best first."""
    def score(record) -> float:
        value = record.get("score") if isinstance(record, dict) else None
        return float(value) if isinstance(value, (int, float)) else float("-inf")

    return sorted(candidates, key=score, reverse=True)[:count]


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
