"""The run state: one object that every stage of :func:`pipeline.run_pipeline` reads and extends.

Transforms held here map FIXED physical points to MOVING physical points (LPS mm, ITK convention).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import SimpleITK as sitk

from .. import crop, engines, prealign
from ..progress import Progress
from .options import PipelineOptions

#: Metrics and pictures are computed on copies of the inputs no finer than this (mm).
QA_SPACING_MM = 2.0


@dataclass
class Attempt:
    """One attempt: a starting transform, an engine, and what crop and registration made of them."""

    label: str  # which pre-alignment (or pre-alignment candidate) it starts from
    initial: sitk.Transform  # fixed -> moving, LPS mm: the pre-alignment pose registration starts from
    engine: str
    plan: crop.CropPlan | None = None
    result: engines.EngineResult | None = None  # result.transform: fixed -> moving, the composed result
    timings: dict = field(default_factory=dict)  # crop, register, metrics (s)
    guard: dict | None = None  # the registration guard's record (engines.guards.registration_guard)


@dataclass
class RunState:
    """Everything one run carries forward: inputs and options first, then each stage's results.

    Filled in stage order: check inputs (``structure_labels`` with ``--per-structure``), diagnose
    (``diagnostics``), pre-align (``prealignment``), QA setup (``fixed_qa``/``moving_qa``, ``structure_pairs``),
    attempts (``choices``, ``attempt_plan``, ``qa_report``, ``chosen``). ``timings`` (s) and ``warnings`` grow along
    the way and go into report.json as they are.
    """

    fixed: sitk.Image
    moving: sitk.Image
    options: PipelineOptions
    progress: Progress
    fixed_labels: sitk.Image | None = None
    moving_labels: sitk.Image | None = None
    landmarks: object = None  # io.landmarks.LandmarkPairs, for target registration errors
    crop_fn: Callable = crop.apply_crop
    register_fn: Callable = engines.register
    custom_engine: bool = False  # register_fn was given: no engine fallback
    started: float = field(default_factory=time.perf_counter)
    timings: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    # (the stages read ``fixed``/``moving`` as given and make float32 copies of what they keep: crops, coarse copies,
    # an 8/16-bit image shrunk by block sums; so a 1024^3 int16 microCT never has a 4.3 GB float32 twin)
    # diagnose: report["diagnostics"]; the seconds of its part before pre-alignment
    diagnostics: dict | None = None
    diagnose_seconds: float = 0.0
    # pre-align: the initial fixed -> moving transform and its candidates
    prealignment: prealign.PrealignResult | None = None
    # QA setup: coarse copies (QA_SPACING_MM) the metrics run on; structures compared when both label maps exist
    fixed_qa: sitk.Image | None = None
    moving_qa: sitk.Image | None = None
    structure_pairs: list | None = None
    # attempts: (label, initial transform) choices, the (choice, engine) plan, the judged result
    choices: list = field(default_factory=list)
    attempt_plan: list = field(default_factory=list)
    qa_report: dict | None = None
    chosen: Attempt | None = None
    # per-structure registration (options.per_structure): the structures of the fixed / moving image by name
    # (structures.StructureLabels; from the label maps when not given), the results, report.json's block
    structure_labels: object = None
    moving_structure_labels: object = None
    structure_results: list | None = None
    structures_report: dict | None = None
    # outputs: moving_resampled.nrrd's image made while the first result is measured (outputs.ResampleAhead)
    resample_ahead: object = None

    @classmethod
    def start(cls, fixed: sitk.Image, moving: sitk.Image, options: PipelineOptions | None,
              fixed_labels: sitk.Image | None, moving_labels: sitk.Image | None, progress: Progress | None,
              crop_fn: Callable | None, register_fn: Callable | None, landmarks) -> RunState:
        """The state before the first stage: options validated, defaults filled in, the clock started."""
        custom_engine = register_fn is not None
        crop_fn = crop_fn or crop.apply_crop
        register_fn = register_fn or engines.register
        options = (options or PipelineOptions()).validate()
        progress = progress or Progress()
        return cls(fixed, moving, options, progress, fixed_labels, moving_labels, landmarks, crop_fn, register_fn,
                   custom_engine)
