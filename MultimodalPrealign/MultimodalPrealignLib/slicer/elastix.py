"""The SlicerElastix extension: our parameter files for ``ElastixLogic.registerVolumes``, its run, its failures.

The run takes an ``Elastix.ElastixLogic`` as argument, so tests pass named doubles instead. Checked against
lassoan/SlicerElastix Elastix/Elastix.py (``registerVolumes``).

Transforms: the initial and the output transform map FIXED physical points to MOVING physical points (LPS mm,
ITK resampling direction). SlicerElastix's ``-t0`` file is composed into the written ITK composite (checked with
itk-elastix: ``TransformParameters.0-Composite.h5`` = registration o initial), so the output includes the initial
transform.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Cancelled, InputError, RegistrationError

#: Keys SlicerElastix needs for its linear-output path (it loads TransformParameters.N-Composite.h5).
ELASTIX_SLICER_KEYS = {"WriteITKCompositeTransform": "true", "ITKTransformOutputFileNameExtension": "h5",
                       "WriteResultImage": "false"}


def elastix_stage_parameters(stage: str, sampling_percentage: float | None, iterations: int | None,
                             fixed_voxels: int, seed: int = 0) -> dict:
    """The core's preset for ``stage`` (resources/elastix/<stage>.txt) with our overrides.

    Overrides: ``MaximumNumberOfIterations``, ``NumberOfSpatialSamples`` (share x fixed working voxels,
    at least elastix's default 2048), ``RandomSeed``, plus the keys SlicerElastix's linear output needs.
    """
    from ..engines import RegistrationSettings
    from ..engines.elastix_engine import stage_parameters

    settings = RegistrationSettings(engine="elastix", stages=(stage,), sampling_percentage=sampling_percentage,
                                    iterations=iterations, seed=seed).validate()
    params = stage_parameters(stage, settings, int(fixed_voxels))
    for key, value in ELASTIX_SLICER_KEYS.items():
        params[key] = [value]
    return params


def write_elastix_parameter_files(folder, stages, sampling_percentage: float | None, iterations: int | None,
                                  fixed_voxels: int, seed: int = 0) -> list:
    """Write one parameter file per stage into OUR ``folder``; return absolute paths in stage order.

    SlicerElastix's ``registerVolumes(parameterFilenames=...)`` joins names to its own database folder;
    absolute paths pass through ``os.path.join`` unchanged, with old and new SlicerElastix versions.
    """
    from ..engines.elastix_engine import format_parameter_map
    from ..engines.settings import check_stages

    stages = check_stages(stages, option="")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, stage in enumerate(stages):
        params = elastix_stage_parameters(stage, sampling_percentage, iterations, fixed_voxels, seed)
        path = (folder / f"MultimodalPrealign_{index}_{stage}.txt").resolve()
        path.write_text(format_parameter_map(params, f"MultimodalPrealign {stage} stage (from resources/elastix)"),
                        encoding="utf-8")
        paths.append(str(path))
    return paths


def elastix_error_line(log: str) -> str:
    """elastix's own error line from its log (overlap failures named as such)."""
    from ..engines.elastix_engine import translate_elastix_log

    return translate_elastix_log(log or "")


def translate_elastix_failure(log: str, return_code: int | None = None) -> RegistrationError:
    line = elastix_error_line(log)
    if "overlap" in line:
        fix = ("start closer (pre-alignment 'search', or 'anatomy' with TotalSegmentator segmentations), "
               "enlarge the crop margin, or register with fewer stages")
    elif "not found" in (log or "").lower() and "elastix" in (log or "").lower():
        fix = "reinstall the SlicerElastix extension, or use engine 'itk'"
    else:
        fix = ("tick 'Keep temporary files' (Advanced) to keep elastix's working folder and log, or use engine "
               "'itk' or 'brainsfit'")
    code = f" (exit code {return_code})" if return_code is not None else ""
    return RegistrationError(line + code, fix)


@dataclass
class ElastixRun:
    """What one SlicerElastix call left behind: its log lines (kept even on success), whether it was cancelled,
    and its working folder when it was kept."""

    log_lines: list = field(default_factory=list)
    cancelled: bool = False
    working_directory: str | None = None

    @property
    def log(self) -> str:
        return "\n".join(self.log_lines)


#: SlicerElastix's log line naming its working folder (``ElastixLogic.registerVolumes``).
WORKING_DIRECTORY_PREFIX = "Volume registration is started in working directory: "


def run_elastix(elastix_logic, fixed_volume_node, moving_volume_node, parameter_files: list,
                output_transform_node, initial_transform_node=None, fixed_mask_node=None, moving_mask_node=None,
                linear_output: bool = True, keep_temporary_files: bool = False,
                cancel_requested=None) -> ElastixRun:
    """``ElastixLogic.registerVolumes`` with our parameter files; raise RegistrationError on failure, Cancelled
    when ``cancel_requested()`` turned True.

    ``linear_output`` asks for a linear transform node (``forceDisplacementFieldOutputTransform=False``;
    from Python the default is True, a displacement field). The log goes through ``logCallback``.
    Cancel: SlicerElastix checks its own ``cancelRequested`` after each line of elastix's output (and kills
    elastix), but resets it before returning; so every output line is routed through our ``logCallback``
    (``logStandardOutput``), which forwards the request, and the run remembers that it did.
    """
    run = ElastixRun()
    previous = (getattr(elastix_logic, "logCallback", None), getattr(elastix_logic, "logStandardOutput", False))

    def log_line(text):
        run.log_lines.append(text)
        if str(text).startswith(WORKING_DIRECTORY_PREFIX):
            run.working_directory = str(text)[len(WORKING_DIRECTORY_PREFIX):].strip()
        if cancel_requested is not None and not run.cancelled and cancel_requested():
            run.cancelled = True
            elastix_logic.cancelRequested = True

    elastix_logic.logCallback = log_line
    elastix_logic.logStandardOutput = True
    elastix_logic.deleteTemporaryFiles = not keep_temporary_files
    try:
        elastix_logic.registerVolumes(
            fixed_volume_node, moving_volume_node,
            parameterFilenames=list(parameter_files),
            outputVolumeNode=None,
            outputTransformNode=output_transform_node,
            fixedVolumeMaskNode=fixed_mask_node,
            movingVolumeMaskNode=moving_mask_node,
            forceDisplacementFieldOutputTransform=not linear_output,
            initialTransformNode=initial_transform_node,
        )
    except subprocess.CalledProcessError as err:
        raise translate_elastix_failure(run.log + "\n" + str(err.output or ""), err.returncode) from None
    except TypeError as err:
        if "initialTransformNode" in str(err):
            raise InputError("The installed SlicerElastix is too old (no initialTransformNode)",
                             "update SlicerElastix in the Extensions Manager, or use engine 'itk'") from None
        raise
    except (RuntimeError, ValueError) as err:
        if "Elastix not found" in str(err):
            raise InputError("SlicerElastix cannot find the elastix executable",
                             "reinstall SlicerElastix, set its custom elastix path, or use engine 'itk'") from None
        raise translate_elastix_failure(run.log + "\n" + str(err)) from None
    finally:
        elastix_logic.logCallback, elastix_logic.logStandardOutput = previous
    if run.cancelled:
        raise Cancelled()
    if not keep_temporary_files:
        run.working_directory = None
    return run
