"""The attempts stage: crop -> register -> guard -> evaluate -> judge, and the fallback to the next attempt.

:func:`plan_attempts` lists the (pre-alignment choice, engine) pairs (:func:`fallback.fallback_plan`);
:func:`run_attempts` runs them through :func:`fallback.run_with_fallback`, which judges each attempt
(:func:`qa.verdict.apply_verdict`) and stops at the first that does not FAIL. One attempt is
:func:`run_attempt`. Every transform maps FIXED physical points to MOVING physical points (LPS mm): an
attempt's ``initial`` is a pre-alignment pose, its ``result.transform`` the composed registration result.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass

import SimpleITK as sitk

from .. import crop, engines
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
    engine (not when the caller supplies the engine), at most :data:`fallback.MAX_ATTEMPTS` attempts.
    """
    pre, options = state.prealignment, state.options
    state.choices = [(pre.method, pre.transform)]
    if not options.fallback:
        state.attempt_plan = [(state.choices[0], options.registration.engine)]
        return
    for label, candidate in fallback.prealign_candidate_transforms(pre.candidates):
        if _distinct_pose(candidate, pre.transform, state.fixed_f):
            state.choices.append((f"{pre.method} candidate: {label}", candidate))
    engine_order = [options.registration.engine]
    if not state.custom_engine:
        engine_order += [e for e in engines.ENGINES if e != options.registration.engine]
    state.attempt_plan = fallback.fallback_plan(state.choices, engine_order, fallback.MAX_ATTEMPTS)


def run_attempts(state: RunState) -> None:
    """Run the planned attempts until one does not FAIL (else keep the best); record the chosen one."""
    qa_report, chosen, index = fallback.run_with_fallback(functools.partial(run_attempt, state), state.attempt_plan)
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


def run_attempt(state: RunState, choice: tuple, engine: str) -> tuple[dict, Attempt]:
    """One attempt from ``choice`` = (label, fixed->moving initial transform) with ``engine``.

    Returns (its QA report: ``metrics``, or ``error`` and empty metrics when the crop found no overlap or the
    engine failed; judged by the caller, the attempt). No overlap under the first choice raises InputError.
    """
    label, initial = choice
    attempt = Attempt(label, initial, engine)
    settings = dataclasses.replace(state.options.registration, engine=engine).validate()
    started = time.perf_counter()
    try:
        plan = plan_crop(state, attempt)
    except InputError as err:
        if choice is state.choices[0]:
            raise  # no overlap after the chosen pre-alignment: the user's problem to fix
        return _failed(err), attempt
    work = make_working_grids(state, attempt, plan, started)
    started = time.perf_counter()
    try:
        attempt.result = state.register_fn(work.fixed, work.moving, initial, settings, state.progress,
                                           work.fixed_mask, work.moving_mask)
    except RegistrationError as err:
        attempt.timings["register"] = time.perf_counter() - started
        return _failed(err), attempt
    guard_registration(state, attempt, work)
    attempt.timings["register"] = time.perf_counter() - started
    return {"metrics": evaluate(state, attempt)}, attempt


def _failed(err: PrealignError) -> dict:
    """The QA report of an attempt that produced no transform."""
    return {"error": err.one_line(), "metrics": {}}


def plan_crop(state: RunState, attempt: Attempt) -> crop.CropPlan:
    """The crop plan under ``attempt.initial``; InputError when the images do not overlap under it."""
    options = state.options
    state.progress.report("crop", 0.4, f"cropping to the overlap ({attempt.label})")
    return crop.plan_crop(state.fixed_f, state.moving_f, attempt.initial, options.crop_margin_mm,
                          options.spacing_scale, options.isotropic, options.max_working_voxels, attempt.label)


def make_working_grids(state: RunState, attempt: Attempt, plan: crop.CropPlan, started: float) -> WorkingPair:
    """The working grids (``state.crop_fn``) and their metric masks; records the crop time since ``started``."""
    fixed_work, moving_work = state.crop_fn(state.fixed, state.moving, plan)
    work = WorkingPair(fixed_work, moving_work, crop.validity_mask(fixed_work, state.fixed),
                       crop.validity_mask(moving_work, state.moving))
    attempt.plan = plan
    attempt.timings["crop"] = time.perf_counter() - started
    state.progress.report("crop", 0.5, f"working spacing {plan.working_spacing_mm[0]:.2f} mm, "
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


def evaluate(state: RunState, attempt: Attempt) -> dict:
    """The attempt's ``metrics`` block, measured on the QA copies (:func:`qa.measure.evaluate`)."""
    state.progress.report("metrics", 0.9, "measuring before/after and judging the result")
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
