"""The whole run: load -> diagnose -> pre-align -> crop -> register -> compose -> measure -> write.

``run_pipeline`` works on in-memory SimpleITK images (used by the CLI, the Slicer module and tests);
``register_files`` adds file IO with atomic outputs. The output transform maps FIXED physical points to
MOVING physical points (LPS mm, ITK convention): pre-alignment and registration composed into one.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import __version__, crop, diagnose, engines, prealign
from ..engines.guards import registration_guard
from ..errors import InputError, RegistrationError
from ..geometry import image_space, resample, transforms
from ..geometry.masks import padding_value
from ..io import image_io, labels
from ..progress import Progress
from ..qa import metrics
from .options import PipelineOptions, PipelineResult

#: Files `register` writes into its output folder (re-running into a folder holding only these is allowed).
OUTPUT_FILES = ("transform.h5", "moving_resampled.nrrd", "report.json", "report.html", "pictures")


def _validity_mask(work: sitk.Image, original: sitk.Image) -> sitk.Image | None:
    """Mask of working voxels that hold real image data, for the registration metric.

    Excludes voxels outside the original image's voxel-centre domain (the working grid's rim past the
    last slice would otherwise be a flat background edge that pulls mutual information) and CT padding
    outside the reconstruction circle (eroded by one voxel to drop the rim blurred by resampling).
    None when every voxel is valid.
    """
    size = np.asarray(work.GetSize())
    a_work, origin_work = image_space.index_to_physical_matrix(work)
    a_orig, origin_orig = image_space.index_to_physical_matrix(original)
    to_original = np.linalg.inv(a_orig) @ a_work
    offset = np.linalg.inv(a_orig) @ (origin_work - origin_orig)
    k, j, i = np.meshgrid(np.arange(size[2]), np.arange(size[1]), np.arange(size[0]), indexing="ij")
    inside = np.ones(k.shape, dtype=bool)
    limits = np.asarray(original.GetSize(), dtype=float) - 1.0
    for axis in range(3):
        coordinate = to_original[axis, 0] * i + to_original[axis, 1] * j + to_original[axis, 2] * k + offset[axis]
        inside &= (coordinate >= -1e-3) & (coordinate <= limits[axis] + 1e-3)
    pad = padding_value(original)
    if pad is not None:
        data = sitk.GetArrayViewFromImage(work) > pad + 1.0
        eroded = sitk.BinaryErode(sitk.Cast(_array_like(data, work), sitk.sitkUInt8), [1, 1, 1])
        data = sitk.GetArrayViewFromImage(eroded) > 0  # a view: ``eroded`` must outlive it
        inside &= data
    if inside.all() or int(np.count_nonzero(inside)) < 1000:
        return None
    return _array_like(inside, work)


def _array_like(array: np.ndarray, like: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(like)
    return image


#: Metrics and pictures are computed on copies of the inputs no finer than this (mm).
QA_SPACING_MM = 2.0
#: At most this many attempts (the normal run plus fallbacks) when the verdict is FAIL.
MAX_ATTEMPTS = 3


@dataclass
class _AttemptResult:
    label: str
    initial: sitk.Transform
    engine: str
    plan: crop.CropPlan | None
    result: engines.EngineResult | None
    timings: dict
    guard: dict | None = None


def run_pipeline(fixed: sitk.Image, moving: sitk.Image, options: PipelineOptions | None = None,
                 fixed_labels: sitk.Image | None = None, moving_labels: sitk.Image | None = None,
                 progress: Progress | None = None, crop_fn=None, register_fn=None,
                 landmarks=None) -> PipelineResult:
    """Pre-align, crop and register ``moving`` to ``fixed``; returns the composed fixed->moving transform.

    Every attempt is measured (:func:`measure.evaluate`) and judged (PASS/WARN/FAIL); on FAIL the run falls back to
    the next distinct pre-alignment candidate, then to the other engine (``options.fallback``), and keeps the
    best attempt. ``crop_fn`` (signature of :func:`crop.apply_crop`) and ``register_fn`` (of
    :func:`engines.register`) replace the core's crop and engine steps; the Slicer module passes CropVolume and
    BRAINSFit/SlicerElastix (then only pre-alignment candidates are tried on fallback). ``landmarks``:
    :class:`landmarks.LandmarkPairs` for target registration errors.
    """
    from ..qa import measure
    from . import fallback

    custom_engine = register_fn is not None
    crop_fn = crop_fn or crop.apply_crop
    register_fn = register_fn or engines.register
    options = (options or PipelineOptions()).validate()
    progress = progress or Progress()
    timings: dict[str, float] = {}
    warnings: list[str] = []
    started = time.perf_counter()

    fixed = image_io.check_image(fixed, "fixed image")
    moving = image_io.check_image(moving, "moving image")
    if fixed_labels is not None:
        image_io.check_label_grid(fixed_labels, fixed, "fixed label map", "fixed image")
    if moving_labels is not None:
        image_io.check_label_grid(moving_labels, moving, "moving label map", "moving image")
    fixed_f, moving_f = image_io.as_float32(fixed), image_io.as_float32(moving)

    progress.report("prealign", 0.05, f"pre-alignment '{options.prealign}'")
    t = time.perf_counter()
    inputs = prealign.PrealignInputs(
        fixed=fixed_f, moving=moving_f, fixed_labels=fixed_labels, moving_labels=moving_labels,
        fixed_labels_task=options.fixed_labels_task, moving_labels_task=options.moving_labels_task,
        seed=options.registration.seed, options=dict(options.prealign_options), progress=progress)
    pre = prealign.run_prealign(options.prealign, inputs)
    timings["prealign"] = time.perf_counter() - t
    warnings.extend(pre.warnings)
    progress.report("prealign", 0.35, f"'{pre.method}' done in {timings['prealign']:.1f} s")

    t = time.perf_counter()
    diagnostics = diagnose.diagnose_pair(fixed, moving, pre.transform, pre.method)
    timings["diagnose"] = time.perf_counter() - t

    t = time.perf_counter()
    fixed_qa, moving_qa = resample.coarse_copy(fixed_f, QA_SPACING_MM), resample.coarse_copy(moving_f, QA_SPACING_MM)
    pairs = None
    if fixed_labels is not None and moving_labels is not None:
        pairs = metrics.structure_pairs(options.fixed_labels_task, options.moving_labels_task)
    timings["qa_setup"] = time.perf_counter() - t

    def attempt(choice, engine: str):
        label, initial = choice
        record = _AttemptResult(label, initial, engine, None, None, {})
        settings = dataclasses.replace(options.registration, engine=engine).validate()
        t0 = time.perf_counter()
        progress.report("crop", 0.4, f"cropping to the overlap ({label})")
        try:
            plan = crop.plan_crop(fixed_f, moving_f, initial, options.crop_margin_mm, options.spacing_scale,
                                  options.isotropic, options.max_working_voxels, label)
        except InputError as err:
            if choice is choices[0]:
                raise  # no overlap after the chosen pre-alignment: the user's problem to fix
            return {"error": err.one_line(), "metrics": {}}, record
        fixed_work, moving_work = crop_fn(fixed, moving, plan)
        fixed_mask = _validity_mask(fixed_work, fixed)
        moving_mask = _validity_mask(moving_work, moving)
        record.plan = plan
        record.timings["crop"] = time.perf_counter() - t0
        progress.report("crop", 0.5, f"working spacing {plan.working_spacing_mm[0]:.2f} mm, "
                        f"fixed {fixed_work.GetSize()}, moving {moving_work.GetSize()}")
        t0 = time.perf_counter()
        try:
            record.result = register_fn(fixed_work, moving_work, initial, settings, progress, fixed_mask, moving_mask)
        except RegistrationError as err:
            record.timings["register"] = time.perf_counter() - t0
            return {"error": err.one_line(), "metrics": {}}, record
        preset = engines.itk_preset()
        if preset.get("registration_guard", True):
            record.guard = registration_guard(fixed_work, moving_work, initial, record.result.transform, fixed_mask,
                                              preset)
            if not record.guard["accepted"]:
                record.result.warnings.append(
                    f"registration rejected: it lowered the dense mutual information inside the fixed object "
                    f"({record.guard['mi_prealigned']:.4f} -> {record.guard['mi_registered']:.4f}); kept the "
                    f"pre-alignment ({label})")
                record.result.transform = initial
        record.timings["register"] = time.perf_counter() - t0
        progress.report("metrics", 0.9, "measuring before/after and judging the result")
        t0 = time.perf_counter()
        block = measure.evaluate(fixed_qa, moving_qa, initial, record.result.transform, fixed_labels, moving_labels,
                            landmarks, pairs, working_spacing_mm=QA_SPACING_MM)
        record.timings["metrics"] = time.perf_counter() - t0
        block = {"computed_on": f"copies of the inputs at {QA_SPACING_MM:g} mm or coarser", **block}
        return {"metrics": block}, record

    choices = [(pre.method, pre.transform)]
    if options.fallback:
        for label, candidate in fallback.prealign_candidate_transforms(pre.candidates):
            if _distinct_pose(candidate, pre.transform, fixed_f):
                choices.append((f"{pre.method} candidate: {label}", candidate))
    engine_order = [options.registration.engine]
    if options.fallback and not custom_engine:
        engine_order += [e for e in engines.ENGINES if e != options.registration.engine]
    plan_list = fallback.fallback_plan(choices, engine_order, MAX_ATTEMPTS) if options.fallback else [(choices[0], options.registration.engine)]
    qa_report, chosen, index = fallback.run_with_fallback(attempt, plan_list)
    if chosen.result is None:  # every attempt raised a registration error: report the first one
        raise RegistrationError(qa_report["error"].split(" Fix: ")[0],
                                qa_report["error"].split(" Fix: ")[1].rstrip(".") if " Fix: " in qa_report["error"]
                                else None)
    if index > 0:
        warnings.append(f"automatic fallback: the first attempt failed its checks; used {chosen.label} with the "
                        f"{chosen.engine} engine")
    final = chosen.result.transform
    warnings.extend(chosen.result.warnings)
    for key, value in chosen.timings.items():
        timings[key] = value
    timings["total"] = time.perf_counter() - started

    report = {
        "tool": {"name": "MultimodalPrealign", "version": __version__, "python": platform.python_version(),
                 "simpleitk": sitk.Version_VersionString()},
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "convention": "transforms map FIXED physical points to MOVING physical points (LPS mm, ITK resampling "
                      "direction); apply transform.h5 to the moving volume in Slicer to align it",
        "verdict": qa_report.get("verdict"),
        "verdict_reasons": qa_report.get("verdict_reasons", []),
        "inputs": {"fixed": image_space.describe_image(fixed), "moving": image_space.describe_image(moving),
                   "fixed_labels": None if fixed_labels is None else image_space.describe_image(fixed_labels),
                   "moving_labels": None if moving_labels is None else image_space.describe_image(moving_labels),
                   "landmarks": None if landmarks is None else len(landmarks.labels)},
        "settings": {**options.to_dict(), "prealign_used": pre.method, "engine_used": chosen.engine,
                     "engine_settings_used": chosen.result.settings_used},
        "diagnostics": diagnostics,
        "prealign": {"method": pre.method, "requested": options.prealign, "transform": transforms.summarize(pre.transform),
                     "initial_transform_used": chosen.label, "details": pre.details, "candidates": pre.candidates},
        "crop": chosen.plan.details,
        "registration": {"engine": chosen.engine, "stages": chosen.result.stages, "guard": chosen.guard,
                         "transform": transforms.summarize(final),
                         "correction_after_prealign": _correction(chosen.initial, final)},
        "transform": {"file": "transform.h5", "summary": transforms.summarize(final)},
        "metrics": qa_report["metrics"],
        "qa_checks": qa_report.get("qa_checks", []),
        "fallback": qa_report.get("fallback"),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "warnings": warnings,
    }
    progress.report("done", 0.94, f"registration pipeline finished in {timings['total']:.1f} s "
                    f"(verdict {report['verdict']})")
    result = PipelineResult(final, pre, chosen.plan, chosen.result, report, warnings)
    result.initial = chosen.initial
    result.structure_pairs = pairs
    return result


def _distinct_pose(candidate: sitk.Transform, reference: sitk.Transform, fixed: sitk.Image,
                   min_distance_mm: float = 10.0) -> bool:
    """True when the two poses send the fixed image's points more than ``min_distance_mm`` apart on average."""
    points = image_space.grid_points(fixed, 6)
    return transforms.mean_point_error(candidate, reference, points) > min_distance_mm


def _correction(pre: sitk.Transform, final: sitk.Transform) -> dict | None:
    """What registration added on top of the pre-alignment: R with final = pre(R(p)), linear part only."""
    if not (transforms.is_linear(pre) and transforms.is_linear(final)):
        return None
    r = np.linalg.inv(transforms.to_matrix(pre)) @ transforms.to_matrix(final)
    return transforms.summarize(transforms.affine_from_matrix(r))


def resample_moving(fixed: sitk.Image, moving: sitk.Image, fixed_to_moving: sitk.Transform) -> sitk.Image:
    """The ORIGINAL moving image on the ORIGINAL fixed grid, in the moving image's pixel type."""
    return sitk.Resample(moving, fixed, fixed_to_moving, sitk.sitkLinear, crop.background_value(moving),
                         moving.GetPixelID())


def check_output_dir(out_dir: Path) -> None:
    """Refuse an output folder that holds anything but our own outputs (a previous run's are replaced)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"The output path '{out_dir}' exists and is a file", "give a folder path to --out")
    if out_dir.is_dir():
        other = sorted(p.name for p in out_dir.iterdir() if p.name not in OUTPUT_FILES)
        if other:
            shown = ", ".join(other[:3]) + (" ..." if len(other) > 3 else "")
            raise InputError(f"The output folder '{out_dir}' already holds other files ({shown})",
                             "give a new or empty folder to --out")


def load_labels(path, reference: sitk.Image, label_name: str, image_name: str, task: str | None = None):
    """Label map (UInt16 on ``reference``'s grid) and its TotalSegmentator task when known (given or inferred).

    ``path``: a multi-label file, TotalSegmentator's folder of per-structure masks, or a Slicer .seg.nrrd."""
    return labels.load_labels(path, reference, label_name, task=task, image_name=image_name)


def register_files(fixed_path, moving_path, out_dir, options: PipelineOptions | None = None,
                   fixed_labels_path=None, moving_labels_path=None, progress: Progress | None = None,
                   command: list | None = None, landmarks_path=None, moving_landmarks_path=None) -> PipelineResult:
    """Run the pipeline on files; write transform.h5, moving_resampled.nrrd, report.json, report.html and
    pictures/ atomically (a staging folder moved into place at the end)."""
    options = (options or PipelineOptions()).validate()
    progress = progress or Progress()
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    t = time.perf_counter()
    progress.report("load", 0.0, "reading images")
    fixed = image_io.load_image(fixed_path, "fixed image")
    moving = image_io.load_image(moving_path, "moving image")
    fixed_labels = moving_labels = None
    if fixed_labels_path is not None:
        fixed_labels, task = load_labels(fixed_labels_path, fixed, "fixed label map", "fixed image",
                                         options.fixed_labels_task)
        options.fixed_labels_task = options.fixed_labels_task or task
    if moving_labels_path is not None:
        moving_labels, task = load_labels(moving_labels_path, moving, "moving label map", "moving image",
                                          options.moving_labels_task)
        options.moving_labels_task = options.moving_labels_task or task
    landmark_pairs = None
    if landmarks_path is not None:
        from ..io.landmarks import load_landmark_pairs

        landmark_pairs = load_landmark_pairs(landmarks_path, moving_landmarks_path)
    load_seconds = time.perf_counter() - t

    result = run_pipeline(fixed, moving, options, fixed_labels, moving_labels, progress, landmarks=landmark_pairs)
    report = result.report
    report["timings_s"]["load"] = round(load_seconds, 3)
    report["inputs"]["fixed"]["path"] = str(Path(fixed_path).resolve())
    report["inputs"]["moving"]["path"] = str(Path(moving_path).resolve())
    if fixed_labels_path is not None:
        report["inputs"]["fixed_labels"]["path"] = str(Path(fixed_labels_path).resolve())
    if moving_labels_path is not None:
        report["inputs"]["moving_labels"]["path"] = str(Path(moving_labels_path).resolve())
    if command is not None:
        report["command"] = command

    progress.report("write", 0.95, f"writing outputs to {out_dir}")
    t = time.perf_counter()
    parent = out_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=str(parent)))
    try:
        transforms.write_transform(result.transform, staging / "transform.h5")
        image_io.write_image(resample_moving(fixed, moving, result.transform), staging / "moving_resampled.nrrd")
        report["outputs"] = {"transform": "transform.h5", "moving_resampled": "moving_resampled.nrrd",
                             "report": "report.json"}
        if not options.no_report:
            report["outputs"].update({"report_html": "report.html", "pictures": "pictures/"})
        from ..qa import reporting

        qa_started = time.perf_counter()
        reporting.finish_report(report, staging, fixed, moving, result.initial or result.prealign.transform,
                         result.transform, fixed_labels, moving_labels, result.structure_pairs,
                         write_pictures=not options.no_report)
        report["timings_s"]["report"] = round(time.perf_counter() - qa_started, 3)
        report["timings_s"]["write"] = round(time.perf_counter() - t, 3)
        report["timings_s"]["total_with_io"] = round(report["timings_s"]["total"] + load_seconds
                                                     + report["timings_s"]["write"], 3)
        (staging / "report.json").write_text(json.dumps(_jsonable(report), indent=2) + "\n", encoding="utf-8")
        move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress.report("write", 1.0, f"outputs in {out_dir}")
    return result


def move_into_place(staging: Path, out_dir: Path) -> None:
    """Move everything in ``staging`` into ``out_dir`` (created), replacing same-named files or folders."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        target = out_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(item, target)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value
