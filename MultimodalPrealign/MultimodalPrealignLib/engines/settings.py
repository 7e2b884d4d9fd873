"""What every engine takes and returns: :class:`RegistrationSettings` (engine, stages, sampling, iterations,
seed) with their checks, :class:`EngineResult` (one fixed->moving transform, physical LPS mm, pre-alignment
included, plus per-stage records), the engines' names and fallback order, and the itk preset
(``resources/presets/itk.json``)."""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from ..errors import InputError
from ..resource_files import load_settings

#: The engines, the same names on the command line and in Slicer: ``itk`` (SimpleITK set up like BRAINSFit, the
#: default), ``elastix`` (itk-elastix headless; SlicerElastix in Slicer), ``brainsfit`` (the real BRAINSFit: its
#: executable headless, the General Registration (BRAINS) CLI module in Slicer).
ENGINES = ("itk", "elastix", "brainsfit")
#: The other engines an automatic fallback tries after each engine, in order. Only engines that always run:
#: brainsfit needs an executable, so it is never a fallback (only used when chosen).
FALLBACK_ENGINES = {"itk": ("elastix",), "elastix": ("itk",), "brainsfit": ("itk", "elastix")}
STAGES = ("rigid", "affine", "bspline")


#: The fix when the elastix engine's package is missing: itk-elastix (with ITK, ~1.6 GB) is an extra.
ELASTIX_INSTALL = 'pip install "multimodal-prealign[elastix]"'


@functools.lru_cache(maxsize=1)
def elastix_installed() -> bool:
    """True when itk-elastix is installed, found without importing ITK (it registers the ``Elastix`` module in
    ``itk/Configuration/ElastixConfig.py``, where ITK's lazy loader finds its modules)."""
    try:
        spec = importlib.util.find_spec("itk")
    except (ImportError, ValueError):
        return False
    folders = (spec.submodule_search_locations or []) if spec is not None else []
    return any((Path(folder) / "Configuration" / "ElastixConfig.py").is_file() for folder in folders)


def engine_installed(engine: str) -> bool:
    """False when ``engine``'s package is missing from this Python (elastix without itk-elastix)."""
    return engine != "elastix" or elastix_installed()


def require_elastix() -> None:
    """InputError (one line naming the fix) when itk-elastix is not installed."""
    if not elastix_installed():
        raise InputError("The elastix engine needs the itk-elastix package, which is not installed", ELASTIX_INSTALL)


def fallback_engines(engine: str) -> tuple:
    """The engines a fallback tries after ``engine`` (:data:`FALLBACK_ENGINES`), in order. The plan
    (``pipeline.fallback.fallback_plan``) skips those not installed (:func:`engine_installed`) and says so."""
    return FALLBACK_ENGINES.get(engine, ())


def itk_preset() -> dict:
    return load_settings("presets", "itk.json")


def check_stages(stages, option: str = "--stages ") -> tuple:
    """``stages`` as a tuple, in the order rigid, affine, bspline without repeats; else InputError.

    ``option``: how the fix names the setting (``--stages `` on the command line, empty in the Slicer panel).
    """
    stages = tuple(stages)
    if not stages:
        raise InputError("No registration stage given", f"use e.g. {option}rigid,affine")
    for stage in stages:
        if stage not in STAGES:
            raise InputError(f"Unknown stage '{stage}'", "use stages from: rigid, affine, bspline (comma separated)")
    order = [STAGES.index(s) for s in stages]
    if order != sorted(order) or len(set(stages)) != len(stages):
        raise InputError(f"Stages must run in the order rigid, affine, bspline without repeats, got {','.join(stages)}",
                         f"use e.g. {option}rigid,affine or {option}rigid,affine,bspline")
    return stages


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
    #: itk engine: run ITK single-threaded so the same seed gives a bit-identical transform (brainsfit engine:
    #: BRAINSFit's numberOfThreads 1, same reason).
    deterministic: bool = True
    #: brainsfit engine: the BRAINSFit executable (None: $MULTIMODAL_PREALIGN_BRAINSFIT, PATH, a Slicer
    #: installation; ``brainsfit_parameters.find_brainsfit``).
    brainsfit_path: str | None = None
    #: brainsfit engine: keep its temporary files (working images, transforms, BRAINSFit's output) in a new
    #: ``brainsfit_*`` folder inside this folder; None: a temporary folder removed after the run.
    keep_temporary_dir: str | None = None
    #: The caller's fixed mask is the region to sample, as given (a structure's dilated mask in per-structure
    #: registration): the engines do not narrow it to the fixed object (``guards.metric_mask``). False: the fixed
    #: mask says which voxels hold data and the metric samples the fixed object inside it.
    fixed_mask_is_region: bool = False

    def validate(self) -> RegistrationSettings:
        if self.engine not in ENGINES:
            raise InputError(f"Unknown engine '{self.engine}'", "use --engine itk, elastix or brainsfit")
        stages = check_stages(self.stages)
        if self.sampling_percentage is not None and not (0 < self.sampling_percentage <= 1):
            raise InputError(f"Sampling percentage must be in (0, 1], got {self.sampling_percentage}",
                             "use e.g. --sampling-percentage 0.002 (BRAINSFit's default) or 0.05")
        if self.iterations is not None and self.iterations < 1:
            raise InputError(f"Iterations must be >= 1, got {self.iterations}", "use e.g. --iterations 1500")
        if self.seed < 0:
            raise InputError(f"Seed must be >= 0, got {self.seed}", "use e.g. --seed 0")
        self.stages = stages
        return self


@dataclass
class EngineResult:
    """``transform``: fixed->moving (LPS), pre-alignment included. ``stages``: per-stage JSON records."""

    transform: sitk.Transform
    stages: list = field(default_factory=list)
    settings_used: dict = field(default_factory=dict)
    log: str = ""
    warnings: list = field(default_factory=list)
