"""Stage 5: registration engines sharing one settings object.

``itk``: SimpleITK's ImageRegistrationMethod set up the way BRAINSFit sets up ITK (Mattes MI with 50
bins, sampling percentage, iteration count, rigid -> affine). ``elastix``: itk-elastix, the elastix that
SlicerElastix runs. Both take working images (cropped, resampled) plus the pre-alignment and return
ONE fixed->moving transform (physical LPS) that already includes the pre-alignment.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources as importlib_resources

import SimpleITK as sitk

from .errors import InputError
from .progress import SILENT, Progress

ENGINES = ("itk", "elastix")
STAGES = ("rigid", "affine", "bspline")


def load_resource_text(*parts: str) -> str:
    return importlib_resources.files(__package__).joinpath("resources", *parts).read_text(encoding="utf-8")


def itk_preset() -> dict:
    return {k: v for k, v in json.loads(load_resource_text("presets", "itk.json")).items() if not k.startswith("_")}


@dataclass
class RegistrationSettings:
    """Settings both engines understand. ``None`` means the engine's own default (recorded in the report).

    sampling_percentage: share of working-grid voxels sampled by the metric (BRAINSFit's
    ``samplingPercentage``; elastix ``NumberOfSpatialSamples`` = share x voxels).
    iterations: per stage and level (BRAINSFit ``numberOfIterations``; elastix ``MaximumNumberOfIterations``).
    """

    engine: str = "itk"
    stages: tuple = ("rigid", "affine")
    sampling_percentage: float | None = None
    iterations: int | None = None
    seed: int = 0
    histogram_bins: int = 50
    #: itk engine: run ITK single-threaded so the same seed gives a bit-identical transform.
    deterministic: bool = True

    def validate(self) -> RegistrationSettings:
        if self.engine not in ENGINES:
            raise InputError(f"Unknown engine '{self.engine}'", "use --engine itk or --engine elastix")
        stages = tuple(self.stages)
        if not stages:
            raise InputError("No registration stage given", "use e.g. --stages rigid,affine")
        for stage in stages:
            if stage not in STAGES:
                raise InputError(f"Unknown stage '{stage}'", "use stages from: rigid, affine, bspline (comma separated)")
        order = [STAGES.index(s) for s in stages]
        if order != sorted(order) or len(set(stages)) != len(stages):
            raise InputError(f"Stages must run in the order rigid, affine, bspline without repeats, got {','.join(stages)}",
                             "use e.g. --stages rigid,affine or --stages rigid,affine,bspline")
        if self.sampling_percentage is not None and not (0 < self.sampling_percentage <= 1):
            raise InputError(f"Sampling percentage must be in (0, 1], got {self.sampling_percentage}",
                             "use e.g. --sampling-percentage 0.002 (BRAINSFit's default) or 0.05")
        if self.iterations is not None and self.iterations < 1:
            raise InputError(f"Iterations must be >= 1, got {self.iterations}", "use e.g. --iterations 1500")
        if self.seed < 0:
            raise InputError(f"Seed must be >= 0, got {self.seed}", "use e.g. --seed 0")
        self.stages = stages
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EngineResult:
    """``transform``: fixed->moving (LPS), pre-alignment included. ``stages``: per-stage JSON records."""

    transform: sitk.Transform
    stages: list = field(default_factory=list)
    settings_used: dict = field(default_factory=dict)
    log: str = ""
    warnings: list = field(default_factory=list)


def register(fixed_work: sitk.Image, moving_work: sitk.Image, initial_fixed_to_moving: sitk.Transform,
             settings: RegistrationSettings, progress: Progress = SILENT,
             fixed_mask: sitk.Image | None = None, moving_mask: sitk.Image | None = None) -> EngineResult:
    """Run the chosen engine's stages in order, each starting from the previous result."""
    settings.validate()
    if settings.engine == "itk":
        from .itk_engine import register_itk

        return register_itk(fixed_work, moving_work, initial_fixed_to_moving, settings, progress, fixed_mask, moving_mask)
    from .elastix_engine import register_elastix

    return register_elastix(fixed_work, moving_work, initial_fixed_to_moving, settings, progress, fixed_mask, moving_mask)
