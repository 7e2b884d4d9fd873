"""Every setting of a run (:class:`PipelineOptions`) and what a run returns (:class:`PipelineResult`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields

import SimpleITK as sitk

from .. import crop, engines, prealign
from ..errors import InputError

#: The engine settings that appear as top-level keys of report.json's ``settings`` (and as CLI options).
REGISTRATION_KEYS = ("engine", "stages", "sampling_percentage", "iterations", "seed", "brainsfit_path")


@dataclass
class PipelineOptions:
    """Every setting of a run. Defaults are what `multimodal-prealign register` uses.

    ``registration``: the engine's settings (:class:`engines.RegistrationSettings`); its
    ``sampling_percentage`` / ``iterations`` None = the engine's default (BRAINSFit's 0.002 / 1500 for
    ``itk``; the preset's values for ``elastix``), recorded in report.json either way.
    :meth:`create` takes the same settings as flat keywords (``engine=``, ``stages=``, ``seed=`` ...).
    """

    prealign: str = "auto"
    registration: engines.RegistrationSettings = field(default_factory=engines.RegistrationSettings)
    crop_margin_mm: float = 20.0
    spacing_scale: float = 1.0
    isotropic: bool = True
    max_working_voxels: int = crop.DEFAULT_MAX_WORKING_VOXELS
    fixed_labels_task: str | None = None
    moving_labels_task: str | None = None
    prealign_options: dict = field(default_factory=dict)
    #: on a FAIL verdict, retry with the next pre-alignment candidate, then the other engine
    fallback: bool = True
    #: metrics and verdict only: no pictures and no report.html (batch use)
    no_report: bool = False
    #: per-structure registration after the global run (``structures``): names of the fixed image's structures, or
    #: ("all",); empty: off. ``structure_stages``: their stages (rigid by default). ``structure_threshold``: make the
    #: fixed image's structures automatically (bones above this value, e.g. HU; ``structures.bones``).
    per_structure: tuple = ()
    structure_stages: tuple = ("rigid",)
    structure_threshold: float | None = None

    @classmethod
    def create(cls, **values) -> PipelineOptions:
        """Options from flat keywords: :data:`REGISTRATION_KEYS` go into ``registration``, the rest as fields."""
        registration = {k: values.pop(k) for k in REGISTRATION_KEYS if k in values}
        if "stages" in registration:
            registration["stages"] = tuple(registration["stages"])
        return cls(registration=engines.RegistrationSettings(**registration), **values)

    def validate(self) -> PipelineOptions:
        if self.prealign not in prealign.ALL_METHODS:
            raise InputError(f"Unknown pre-alignment method '{self.prealign}'",
                             "use one of " + ", ".join(prealign.ALL_METHODS))
        self.registration.validate()
        if self.crop_margin_mm < 0:
            raise InputError(f"Crop margin must be >= 0 mm, got {self.crop_margin_mm}", "use e.g. --crop-margin 20")
        if self.spacing_scale <= 0:
            raise InputError(f"Spacing scale must be positive, got {self.spacing_scale}",
                             "use e.g. --spacing-scale 1")
        if self.max_working_voxels < 1000:
            raise InputError(f"Working voxel cap too small ({self.max_working_voxels})", "use at least 1000")
        self.per_structure = tuple(self.per_structure or ())
        from ..structures.register import check_structure_stages

        self.structure_stages = check_structure_stages(self.structure_stages)
        return self

    def to_dict(self) -> dict:
        """Flat settings (report.json ``settings``): prealign, the :data:`REGISTRATION_KEYS`, then the rest."""
        out = {"prealign": self.prealign}
        out.update({k: copy.deepcopy(getattr(self.registration, k)) for k in REGISTRATION_KEYS})
        out["stages"] = list(self.registration.stages)
        for f in fields(self):
            if f.name not in ("prealign", "registration"):
                out[f.name] = copy.deepcopy(getattr(self, f.name))
        return out


@dataclass
class PipelineResult:
    transform: sitk.Transform  # fixed -> moving, LPS mm, pre-alignment composed with registration
    prealign: prealign.PrealignResult
    crop: crop.CropPlan
    engine: engines.EngineResult
    report: dict
    warnings: list
    initial: sitk.Transform | None = None  # the initial transform of the chosen attempt (fixed -> moving)
    structure_pairs: list | None = None  # (name, fixed_ids, moving_ids) compared in the metrics
    structures: list | None = None  # per-structure results (structures.StructureResult), with --per-structure
    structure_labels: object = None  # the fixed image's structures they came from (structures.StructureLabels)

    @property
    def verdict(self) -> str | None:
        """'PASS', 'WARN' or 'FAIL' (report.json ``verdict``), as the Slicer module's result has it."""
        return self.report.get("verdict")

    @property
    def verdict_reasons(self) -> list:
        return list(self.report.get("verdict_reasons") or [])
