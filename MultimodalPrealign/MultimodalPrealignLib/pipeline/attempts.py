"""The attempts stage: crop -> register -> guard -> evaluate -> judge, and the fallback to the next attempt.

:func:`plan_attempts` lists the (pre-alignment choice, engine) pairs (:func:`fallback.fallback_plan`);
:func:`run_attempts` runs them through :func:`fallback.run_with_fallback`, which judges each attempt
(:func:`qa.verdict.apply_verdict`) and stops at the first that does not FAIL. One attempt is
:func:`run_attempt`. Every transform maps FIXED physical points to MOVING physical points (LPS mm): an
attempt's ``initial`` is a pre-alignment pose, its ``result.transform`` the composed registration result.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import SimpleITK as sitk

from .. import crop, engines, parallel
from ..engines.guards import registration_guard
from ..errors import InputError, PrealignError, RegistrationError
from ..geometry import image_space, transforms
from ..qa import measure
from . import fallback
from .state import QA_SPACING_MM, Attempt, RunState


@dataclass
class WorkingPair:
    """The cropped, resampled working copies and their metric masks (None: every voxel counts)."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_mask: sitk.Image | None
    moving_mask: sitk.Image | None


def plan_attempts(state: RunState) -> None:
    """``state.choices`` (label, fixed->moving initial transform) and ``state.attempt_plan`` (choice, engine).

    The chosen pre-alignment first; with ``options.fallback`` its distinct candidate poses, then the other
    engine (not when the caller supplies the engine, nor with ``options.per_structure``: the structures start from
    the global result with their own searches), at most :data:`fallback.MAX_ATTEMPTS` attempts.
    """
    pre, options = state.prealignment, state.options
    state.choices = [(pre.method, pre.transform)]
    if not options.fallback:
        state.attempt_plan = [(state.choices[0], options.registration.engine)]
        return
    for label, candidate in fallback.prealign_candidate_transforms(pre.candidates):
        if _distinct_pose(candidate, pre.transform, state.fixed):
            state.choices.append((f"{pre.method} candidate: {label}", candidate))
    engine_order = [options.registration.engine]
    if not state.custom_engine:
        engine_order += list(engines.fallback_engines(options.registration.engine))  # never brainsfit
    left_out = {e: fallback.PER_STRUCTURE_SKIP for e in engine_order[1:]} if options.per_structure else None
    state.attempt_plan = fallback.fallback_plan(state.choices, engine_order, fallback.MAX_ATTEMPTS, left_out)


#: The run's progress window of the attempts stage (after the pre-alignment, before the report).
ATTEMPTS_WINDOW = (0.35, 0.93)
#: With ``--per-structure`` the structures take most of the run: the attempts' window, then the structures'.
ATTEMPTS_WINDOW_PER_STRUCTURE = (0.35, 0.5)
STRUCTURES_WINDOW = (0.5, 0.94)


def attempt_windows(count: int) -> list[tuple[float, float]]:
    """Each planned attempt's share of :data:`ATTEMPTS_WINDOW` (0..1): the normal run 70% when fallbacks are
    planned (they may never run), the fallbacks the rest in equal parts."""
    if count <= 1:
        return [(0.0, 1.0)]
    step = 0.3 / (count - 1)
    return [(0.0, 0.7)] + [(0.7 + step * i, 0.7 + step * (i + 1)) for i in range(count - 1)]


def run_attempts(state: RunState) -> None:
    """Run the planned attempts until one does not FAIL (else keep the best); record the chosen one.

    Each attempt reports progress inside its own window (monotonic over the run); a fallback attempt is
    announced with the reason the previous one failed.
    """
    window = ATTEMPTS_WINDOW_PER_STRUCTURE if state.options.per_structure else ATTEMPTS_WINDOW
    plan, stage_progress = state.attempt_plan, state.progress.span(*window)
    windows, done = attempt_windows(len(plan)), []

    def attempt(choice, engine):
        index = len(done)
        progress = stage_progress.span(*windows[index])
        if index > 0:
            previous = done[-1]
            reason = (previous.get("verdict_reasons") or [previous.get("error") or "failed its checks"])[0]
            progress.report("fallback", 0.0, f"automatic fallback: attempt {index + 1} of {len(plan)} "
                            f"({choice[0]} with {engine}) because attempt {index} ended "
                            f"{previous.get('verdict', 'FAIL')}: {reason}")
        report, payload = run_attempt(state, choice, engine, progress)
        done.append(report)
        return report, payload

    qa_report, chosen, index = fallback.run_with_fallback(attempt, plan)
    if chosen.result is None:  # every attempt raised a registration error: report the first one
        message = qa_report["error"]
        parts = message.split(" Fix: ")
        raise RegistrationError(parts[0], parts[1].rstrip(".") if " Fix: " in message else None)
    if index > 0:
        state.warnings.append(f"automatic fallback: the first attempt failed its checks; used {chosen.label} with "
                              f"the {chosen.engine} engine")
    state.warnings.extend(chosen.result.warnings)
    for key, value in chosen.timings.items():
        state.timings[key] = value
    state.qa_report, state.chosen = qa_report, chosen


def run_attempt(state: RunState, choice: tuple, engine: str, progress=None) -> tuple[dict, Attempt]:
    """One attempt from ``choice`` = (label, fixed->moving initial transform) with ``engine``; ``progress``: the
    attempt's own (0..1 over the attempt; default the run's).

    Returns (its QA report: ``metrics``, or ``error`` and empty metrics when the crop found no overlap or the
    engine failed; judged by the caller, the attempt). No overlap under the first choice raises InputError.
    """
    label, initial = choice
    progress = progress or state.progress
    attempt = Attempt(label, initial, engine)
    settings = dataclasses.replace(state.options.registration, engine=engine).validate()
    started = time.perf_counter()
    try:
        plan = plan_crop(state, attempt, progress)
    except InputError as err:
        if choice is state.choices[0]:
            raise  # no overlap after the chosen pre-alignment: the user's problem to fix
        return _failed(err), attempt
    work = make_working_grids(state, attempt, plan, started, progress)
    started = time.perf_counter()
    try:
        attempt.result = state.register_fn(work.fixed, work.moving, initial, settings, progress.span(0.2, 0.85),
                                           work.fixed_mask, work.moving_mask)
    except RegistrationError as err:
        attempt.timings["register"] = time.perf_counter() - started
        return _failed(err), attempt
    guard_registration(state, attempt, work)
    attempt.timings["register"] = time.perf_counter() - started
    if state.resample_ahead is not None:  # the output image of this result while it is measured (first attempt)
        state.resample_ahead.start(attempt.result.transform)
    return {"metrics": evaluate(state, attempt, progress)}, attempt


def _failed(err: PrealignError) -> dict:
    """The QA report of an attempt that produced no transform."""
    return {"error": err.one_line(), "metrics": {}}


def plan_crop(state: RunState, attempt: Attempt, progress=None) -> crop.CropPlan:
    """The crop plan under ``attempt.initial``; InputError when the images do not overlap under it."""
    options = state.options
    (progress or state.progress).report("crop", 0.0, f"cropping to the overlap ({attempt.label})")
    return crop.plan_crop(state.fixed, state.moving, attempt.initial, options.crop_margin_mm,
                          options.spacing_scale, options.isotropic, options.max_working_voxels, attempt.label)


def make_working_grids(state: RunState, attempt: Attempt, plan: crop.CropPlan, started: float,
                       progress=None) -> WorkingPair:
    """The working grids (``state.crop_fn``) and their metric masks; records the crop time since ``started``."""
    fixed_work, moving_work = state.crop_fn(state.fixed, state.moving, plan)
    work = WorkingPair(fixed_work, moving_work, *parallel.both(lambda: crop.validity_mask(fixed_work, state.fixed),
                                                               lambda: crop.validity_mask(moving_work, state.moving)))
    attempt.plan = plan
    attempt.timings["crop"] = time.perf_counter() - started
    (progress or state.progress).report("crop", 0.15, f"working spacing {plan.working_spacing_mm[0]:.2f} mm, "
                          f"fixed {fixed_work.GetSize()}, moving {moving_work.GetSize()}")
    return work


def guard_registration(state: RunState, attempt: Attempt, work: WorkingPair) -> None:
    """Keep the pre-alignment when registration lowered the dense mutual information (the itk preset's guard)."""
    preset = engines.itk_preset()
    if not preset.get("registration_guard", True):
        return
    attempt.guard = registration_guard(work.fixed, work.moving, attempt.initial, attempt.result.transform,
                                       work.fixed_mask, preset)
    if not attempt.guard["accepted"]:
        attempt.result.warnings.append(
            f"registration rejected: it lowered the dense mutual information inside the fixed object "
            f"({attempt.guard['mi_prealigned']:.4f} -> {attempt.guard['mi_registered']:.4f}); kept the "
            f"pre-alignment ({attempt.label})")
        attempt.result.transform = attempt.initial


def evaluate(state: RunState, attempt: Attempt, progress=None) -> dict:
    """The attempt's ``metrics`` block, measured on the QA copies (:func:`qa.measure.evaluate`)."""
    (progress or state.progress).report("metrics", 0.9, "measuring before/after and judging the result")
    started = time.perf_counter()
    block = measure.evaluate(state.fixed_qa, state.moving_qa, attempt.initial, attempt.result.transform,
                             state.fixed_labels, state.moving_labels, state.landmarks, state.structure_pairs,
                             working_spacing_mm=QA_SPACING_MM)
    attempt.timings["metrics"] = time.perf_counter() - started
    return {"computed_on": f"copies of the inputs at {QA_SPACING_MM:g} mm or coarser", **block}


def _distinct_pose(candidate: sitk.Transform, reference: sitk.Transform, fixed: sitk.Image,
                   min_distance_mm: float = 10.0) -> bool:
    """True when the two poses send the fixed image's points more than ``min_distance_mm`` apart on average."""
    points = image_space.grid_points(fixed, 6)
    return transforms.mean_point_error(candidate, reference, points) > min_distance_mm
