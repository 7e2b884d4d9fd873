"""Engine ``elastix``: itk-elastix (the elastix SlicerElastix runs), presets from resources/elastix/.

itk-elastix is the optional ``elastix`` extra: ``itk`` is imported only inside the functions that use it, so this
module imports without it, and :func:`register_elastix` without it is one InputError naming the extra.

Each stage is one elastix run whose external initial transform is everything found so far. elastix
("HowToCombineTransforms" Compose) maps a fixed point p to ``T_stage(initial(p))``, so the running
total is ``compose(initial, T_stage)``. elastix's result parameter maps are converted to SimpleITK
transforms (Euler, affine, B-spline); all fixed->moving, physical LPS mm.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import stopping
from ..errors import RegistrationError
from ..geometry import transforms
from ..geometry.image_space import direction_matrix
from ..progress import SILENT, Progress
from ..resource_files import load_resource_text
from .guards import guarded_stage, metric_mask
from .settings import EngineResult, RegistrationSettings, itk_preset, require_elastix

#: elastix never gets fewer spatial samples than this (its own default is 2048).
MIN_SPATIAL_SAMPLES = 2048

#: Parameters of each stage recorded in report.json (``settings_used["parameters_per_stage"]``).
RECORDED_PARAMETERS = ("Transform", "Metric", "NumberOfResolutions", "MaximumNumberOfIterations",
                       "NumberOfSpatialSamples", "NumberOfHistogramBins", "RandomSeed")


def format_parameter_value(value: str) -> str:
    """elastix parameter file syntax: numbers bare, everything else quoted."""
    try:
        float(value)
        return str(value)
    except ValueError:
        return f'"{value}"'


def format_parameter_map(params: dict, header: str = "") -> str:
    """Text of an elastix parameter file from {name: [values]}."""
    lines = [f"// {line}" for line in header.splitlines()] if header else []
    for name, values in params.items():
        values = values if isinstance(values, (list, tuple)) else [values]
        lines.append(f"({name} {' '.join(format_parameter_value(str(v)) for v in values)})")
    return "\n".join(lines) + "\n"


def parse_parameter_text(text: str) -> dict[str, list[str]]:
    """Parse elastix parameter-file text ``(Name value ...)`` into {name: [values]} (quotes removed)."""
    params: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.split("//", 1)[0].strip()
        match = re.match(r"^\((\w+)\s*(.*)\)$", line)
        if match:
            params[match.group(1)] = [v.strip('"') for v in re.findall(r'"[^"]*"|\S+', match.group(2))]
    return params


def preset_parameters(stage: str) -> dict[str, list[str]]:
    return parse_parameter_text(load_resource_text("elastix", f"{stage}.txt"))


def stage_parameters(stage: str, settings: RegistrationSettings, fixed_voxels: int) -> dict[str, list[str]]:
    """The preset for ``stage`` with our overrides (iterations, spatial samples, seed)."""
    params = preset_parameters(stage)
    if settings.iterations is not None:
        params["MaximumNumberOfIterations"] = [str(int(settings.iterations))]
    if settings.sampling_percentage is not None:
        samples = max(MIN_SPATIAL_SAMPLES, int(round(settings.sampling_percentage * fixed_voxels)))
        params["NumberOfSpatialSamples"] = [str(samples)]
    params["NumberOfHistogramBins"] = [str(int(settings.histogram_bins))]
    params["RandomSeed"] = [str(int(settings.seed) + 121212)]
    return params


def to_itk_image(image: sitk.Image, dtype=np.float32):
    """An itk image with the same voxels (as ``dtype``) and geometry; masks use ``np.uint8``."""
    import itk

    out = itk.GetImageFromArray(np.ascontiguousarray(sitk.GetArrayViewFromImage(image), dtype=dtype))
    out.SetOrigin(image.GetOrigin())
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(itk.matrix_from_array(direction_matrix(image)))
    return out


def itk_affine_transform(transform: sitk.Transform):
    """An ``itk.AffineTransform`` equal to a linear SimpleITK transform (same fixed->moving mapping)."""
    import itk

    m = transforms.to_matrix(transform)
    affine = itk.AffineTransform[itk.D, 3].New()
    affine.SetMatrix(itk.matrix_from_array(m[:3, :3].copy()))
    affine.SetOffset([float(v) for v in m[:3, 3]])
    return affine


def _floats(params: dict, key: str) -> list[float]:
    return [float(v) for v in params[key]]


def elastix_map_to_sitk(params: dict) -> sitk.Transform:
    """A SimpleITK transform equal to one elastix result parameter map (without its initial transform)."""
    kind = params["Transform"][0]
    values = _floats(params, "TransformParameters")
    if kind == "EulerTransform":
        euler = sitk.Euler3DTransform()
        euler.SetCenter(_floats(params, "CenterOfRotationPoint"))
        euler.SetComputeZYX(params.get("ComputeZYX", ["false"])[0] == "true")
        euler.SetParameters(values)
        return euler
    if kind == "AffineTransform":
        affine = sitk.AffineTransform(3)
        affine.SetCenter(_floats(params, "CenterOfRotationPoint"))
        affine.SetParameters(values)
        return affine
    if kind == "BSplineTransform":
        order = int(params.get("BSplineTransformSplineOrder", ["3"])[0])
        bspline = sitk.BSplineTransform(3, order)
        fixed = (_floats(params, "GridSize") + _floats(params, "GridOrigin") + _floats(params, "GridSpacing")
                 + _floats(params, "GridDirection"))
        bspline.SetFixedParameters(fixed)
        bspline.SetParameters(values)
        return bspline
    raise RegistrationError(f"elastix returned an unsupported transform '{kind}'", "use stages rigid, affine, bspline")


def translate_elastix_log(log: str) -> str:
    """elastix's own error line, made readable (overlap failures named as such)."""
    match = re.search(r"Too many samples map outside moving image buffer[^\n]*", log)
    if match:
        return ("elastix lost the overlap (" + match.group(0).strip() + "; it needs 25% valid samples)")
    for pattern in (r"ERROR:?[^\n]*", r"Description:[^\n]*", r"itk::ExceptionObject[^\n]*"):
        found = re.findall(pattern, log)
        if found:
            return "elastix failed: " + found[-1].strip()[:200]
    return "elastix failed (no error line in its log)"


def register_elastix(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, settings: RegistrationSettings,
                     progress: Progress = SILENT, fixed_mask: sitk.Image | None = None,
                     moving_mask: sitk.Image | None = None) -> EngineResult:
    """Run ``settings.stages`` in order from ``initial`` (linear); the result (fixed->moving, LPS mm) includes it."""
    require_elastix()  # itk-elastix is the "elastix" extra: one line naming it when missing
    if not transforms.is_linear(initial):
        raise RegistrationError("The elastix engine needs a linear pre-alignment",
                                "use a rigid or affine pre-alignment")
    fixed_itk, moving_itk = to_itk_image(fixed), to_itk_image(moving)
    fixed_voxels = int(np.prod(fixed.GetSize()))
    total = initial
    records, logs, used, warnings, parameter_files = [], [], {}, [], {}
    guard_preset = itk_preset()  # the affine guard is engine-independent; its settings live with the itk preset
    # elastix samples the fixed object, as the itk engine (a structure's region as given)
    fixed_mask = metric_mask(fixed, fixed_mask, guard_preset, settings.fixed_mask_is_region)
    workdir = Path(tempfile.mkdtemp(prefix="mmp_elastix_"))
    stopping.track(workdir)
    try:
        for index, stage in enumerate(settings.stages):
            progress.report("register", index / len(settings.stages), f"{stage} stage (elastix)")
            started = time.perf_counter()
            params = stage_parameters(stage, settings, fixed_voxels)
            used[stage] = {k: params[k] for k in RECORDED_PARAMETERS if k in params}
            parameter_files[stage] = format_parameter_map(params, f"elastix {stage} stage as run by MultimodalPrealign")
            stage_transform, log = _run_stage(stage, params, fixed_itk, moving_itk, total, fixed_mask, moving_mask,
                                              workdir / stage)
            logs.append(f"=== elastix {stage} ===\n{log}")
            total, check = guarded_stage(stage, fixed, moving, total, transforms.compose(total, stage_transform),
                                         fixed_mask, guard_preset, warnings)
            records.append({
                "stage": stage, "engine": "elastix", "seconds": round(time.perf_counter() - started, 3),
                "metric_final": _final_metric(log), "parameters": used[stage],
                **({"guard": check} if check is not None else {}),
            })
            progress.check_cancelled()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        stopping.untrack(workdir)
    settings_used = {"engine": "elastix", "stages": list(settings.stages), "seed": settings.seed,
                     "min_spatial_samples": MIN_SPATIAL_SAMPLES, "parameters_per_stage": used,
                     "parameter_files": parameter_files}
    return EngineResult(total, records, settings_used, log="\n".join(logs), warnings=warnings)


def _run_stage(stage: str, params: dict, fixed_itk, moving_itk, total: sitk.Transform,
               fixed_mask: sitk.Image | None, moving_mask: sitk.Image | None,
               stage_dir: Path) -> tuple[sitk.Transform, str]:
    """One elastix run from ``total`` (external initial transform) in ``stage_dir``: (stage transform, log).

    The stage transform excludes ``total``: elastix composes it after ``total`` (fixed->moving, LPS mm).
    """
    import itk

    parameter_object = itk.ParameterObject.New()
    parameter_object.AddParameterMap(params)
    method = itk.ElastixRegistrationMethod.New(fixed_itk, moving_itk)
    method.SetParameterObject(parameter_object)
    method.SetExternalInitialTransform(itk_affine_transform(total))
    if fixed_mask is not None:
        method.SetFixedMask(to_itk_image(fixed_mask, np.uint8))
    if moving_mask is not None:
        method.SetMovingMask(to_itk_image(moving_mask, np.uint8))
    stage_dir.mkdir()
    method.SetOutputDirectory(str(stage_dir))
    method.SetLogToConsole(False)
    method.SetLogToFile(True)
    method.SetLogFileName("elastix.log")
    try:
        method.UpdateLargestPossibleRegion()
    except RuntimeError as err:
        log = _read_log(stage_dir) + "\n" + str(err)
        raise RegistrationError(f"The {stage} stage failed: " + translate_elastix_log(log),
                                "start closer (--prealign search or anatomy), enlarge --crop-margin, "
                                "or try --engine itk") from None
    log = _read_log(stage_dir)
    result = method.GetTransformParameterObject()
    result_map = dict(result.GetParameterMap(result.GetNumberOfParameterMaps() - 1))
    return elastix_map_to_sitk({k: list(v) for k, v in result_map.items()}), log


def _read_log(folder: Path) -> str:
    path = folder / "elastix.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _final_metric(log: str) -> float | None:
    match = re.findall(r"Final metric value\s*=\s*([-+0-9.eE]+)", log)
    return float(match[-1]) if match else None

