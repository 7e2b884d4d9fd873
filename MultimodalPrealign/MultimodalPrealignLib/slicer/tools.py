"""Thin adapters to the Slicer tools the module orchestrates: BRAINSFit, SlicerElastix, TotalSegmentator.

Parameter construction and error translation are pure functions (tested without Slicer). The calls
into Slicer take the Slicer objects as arguments (``run_sync`` = ``slicer.cli.runSync``, an
``ElastixLogic``, a ``TotalSegmentatorLogic``), so tests pass named doubles instead.

Parameter names were checked against the public sources: BRAINSia/BRAINSTools BRAINSFit/BRAINSFit.xml,
lassoan/SlicerElastix Elastix/Elastix.py (``registerVolumes``), lassoan/SlicerTotalSegmentator
TotalSegmentator/TotalSegmentator.py (``process``).

Transforms: every transform handed over here maps FIXED physical points to MOVING physical points
(LPS mm, ITK resampling direction). BRAINSFit and elastix write the same direction, and both return
the initial transform INCLUDED in their output (BRAINSFit starts its first stage from
``initialTransform`` -- only its rigid part when that stage is Rigid -- and writes the integrated
result, see BRAINSFitHelperTemplate.hxx; SlicerElastix's ``-t0`` file is composed into the written ITK composite, which
was checked with itk-elastix: ``TransformParameters.0-Composite.h5`` = registration o initial).
"""

from __future__ import annotations

import inspect
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..engines.settings import check_stages
from ..errors import InputError, RegistrationError

LINEAR_STAGES = ("rigid", "affine")

# ------------------------------------------------------------------------------------------------ BRAINSFit

#: BRAINSFit.xml booleans for our stage names.
BRAINSFIT_STAGE_FLAGS = {"rigid": "useRigid", "affine": "useAffine", "bspline": "useBSpline"}

#: Known BRAINSFit / ITK failures: (text in the CLI's error or output, cause, fix).
BRAINSFIT_KNOWN_FAILURES = (
    ("All samples map outside moving image buffer",
     "BRAINSFit lost the overlap: every metric sample mapped outside the moving image",
     "start closer (pre-alignment 'search', or 'anatomy' with TotalSegmentator segmentations), enlarge the "
     "crop margin, or register with fewer stages (rigid only)"),
    ("Too many samples map outside moving image buffer",
     "The registration lost the overlap: too many metric samples mapped outside the moving image",
     "start closer (pre-alignment 'search' or 'anatomy'), or enlarge the crop margin"),
    ("Joint PDF summed to zero",
     "BRAINSFit found no overlapping intensities (joint histogram empty)",
     "check that both volumes hold data where they overlap; use pre-alignment 'search' and a larger crop margin"),
    ("Fixed image mask",
     "BRAINSFit rejected a mask",
     "give binary label volumes on the same physical space as the volumes, or run without masks"),
    ("bad_alloc",
     "BRAINSFit ran out of memory",
     "increase the spacing scale (coarser working grid) or crop tighter (smaller crop margin)"),
    ("Unknown parameter",
     "BRAINSFit did not accept a parameter (older Slicer version?)",
     "update Slicer, or use engine 'core'"),
)


def brainsfit_parameters(fixed_volume_id: str, moving_volume_id: str, output_transform_id: str,
                         stages=LINEAR_STAGES, initial_transform_id: Optional[str] = None,
                         sampling_percentage: Optional[float] = None, iterations: Optional[int] = None,
                         fixed_mask_id: Optional[str] = None, moving_mask_id: Optional[str] = None,
                         output_volume_id: Optional[str] = None, histogram_bins: int = 50,
                         spline_grid_size=None) -> dict:
    """``slicer.cli.runSync(slicer.modules.brainsfit, None, parameters)`` parameters (BRAINSFit.xml names).

    The pre-alignment goes in as ``initialTransform`` with ``initializeTransformMode`` Off (BRAINSFit
    ignores the mode when an initial transform is given; Off makes that explicit). The output is
    ``linearTransform`` for linear stages and ``bsplineTransform`` when the last stage is BSpline
    (``linearTransform`` is invalid then). ``sampling_percentage`` and ``iterations`` left None keep
    BRAINSFit's defaults (0.002, 1500).
    """
    stages = check_stages(stages, option="")
    params: dict = {
        "fixedVolume": fixed_volume_id,
        "movingVolume": moving_volume_id,
        "initializeTransformMode": "Off",
        "costMetric": "MMI",
        "numberOfHistogramBins": int(histogram_bins),
    }
    for stage in stages:
        params[BRAINSFIT_STAGE_FLAGS[stage]] = True
    if stages[-1] == "bspline":
        params["bsplineTransform"] = output_transform_id
        if spline_grid_size is not None:
            params["splineGridSize"] = ",".join(str(int(v)) for v in spline_grid_size)
    else:
        params["linearTransform"] = output_transform_id
    if initial_transform_id:
        params["initialTransform"] = initial_transform_id
    if sampling_percentage is not None:
        if not 0 < sampling_percentage <= 1:
            raise InputError(f"Sampling percentage must be in (0, 1], got {sampling_percentage}",
                             "use e.g. 0.002 (BRAINSFit's default) or 0.05")
        params["samplingPercentage"] = float(sampling_percentage)
    if iterations is not None:
        if iterations < 1:
            raise InputError(f"Iterations must be >= 1, got {iterations}", "use e.g. 1500")
        params["numberOfIterations"] = int(iterations)
    if fixed_mask_id or moving_mask_id:
        params["maskProcessingMode"] = "ROI"
        if fixed_mask_id:
            params["fixedBinaryVolume"] = fixed_mask_id
        if moving_mask_id:
            params["movingBinaryVolume"] = moving_mask_id
    else:
        params["maskProcessingMode"] = "NOMASK"
    if output_volume_id:
        params["outputVolume"] = output_volume_id
    return params


def translate_brainsfit_failure(error_text: str, output_text: str = "", status: str = "") -> RegistrationError:
    """One-line cause + fix for a failed BRAINSFit run (known ITK messages first, else its last error line)."""
    text = f"{error_text or ''}\n{output_text or ''}"
    for needle, cause, fix in BRAINSFIT_KNOWN_FAILURES:
        if needle.lower() in text.lower():
            return RegistrationError(cause, fix)
    lines = [line.strip() for line in (error_text or output_text or "").splitlines() if line.strip()]
    interesting = [line for line in lines if re.search(r"error|exception|fail", line, re.IGNORECASE)]
    last = (interesting or lines or [status or "no error text"])[-1]
    return RegistrationError(f"BRAINSFit failed: {last[:200]}",
                             "open the Error Log (View > Error Log) for BRAINSFit's full output, or use engine 'core'")


def cli_failed(cli_node) -> bool:
    """True when a CLI node ended with an error (``runSync`` does not raise: check the status)."""
    return bool(cli_node.GetStatus() & cli_node.ErrorsMask)


def run_brainsfit(run_sync: Callable, brainsfit_module, parameters: dict):
    """Run BRAINSFit synchronously; raise RegistrationError with cause + fix on failure. Returns the CLI node.

    ``run_sync`` is ``slicer.cli.runSync`` (it may raise on failure in some Slicer versions when
    ``update_display`` is on; both paths are translated).
    """
    try:
        cli_node = run_sync(brainsfit_module, None, parameters)
    except Exception as err:  # slicer.cli.runSync raises ValueError("CLI execution failed: ...") in some versions
        raise translate_brainsfit_failure(str(err)) from None
    if cli_failed(cli_node):
        raise translate_brainsfit_failure(cli_node.GetErrorText(), cli_node.GetOutputText(),
                                          _status_string(cli_node))
    return cli_node


def _status_string(cli_node) -> str:
    getter = getattr(cli_node, "GetStatusString", None)
    return getter() if getter else ""


# ------------------------------------------------------------------------------------------------ elastix

#: Keys SlicerElastix needs for its linear-output path (it loads TransformParameters.N-Composite.h5).
ELASTIX_SLICER_KEYS = {"WriteITKCompositeTransform": "true", "ITKTransformOutputFileNameExtension": "h5",
                       "WriteResultImage": "false"}


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


def elastix_stage_parameters(stage: str, sampling_percentage: Optional[float], iterations: Optional[int],
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


def write_elastix_parameter_files(folder, stages, sampling_percentage: Optional[float], iterations: Optional[int],
                                  fixed_voxels: int, seed: int = 0) -> list:
    """Write one parameter file per stage into OUR ``folder``; return absolute paths in stage order.

    SlicerElastix's ``registerVolumes(parameterFilenames=...)`` joins names to its own database folder;
    absolute paths pass through ``os.path.join`` unchanged, with old and new SlicerElastix versions.
    """
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


def translate_elastix_failure(log: str, return_code: Optional[int] = None) -> RegistrationError:
    line = elastix_error_line(log)
    if "overlap" in line:
        fix = ("start closer (pre-alignment 'search', or 'anatomy' with TotalSegmentator segmentations), "
               "enlarge the crop margin, or register with fewer stages")
    elif "not found" in (log or "").lower() and "elastix" in (log or "").lower():
        fix = "reinstall the SlicerElastix extension, or use engine 'core'"
    else:
        fix = "tick 'keep temporary files' to keep elastix.log, or use engine 'core' or BRAINSFit"
    code = f" (exit code {return_code})" if return_code is not None else ""
    return RegistrationError(line + code, fix)


@dataclass
class ElastixRun:
    """What one SlicerElastix call left behind: its log lines (kept even on success)."""

    log_lines: list = field(default_factory=list)

    @property
    def log(self) -> str:
        return "\n".join(self.log_lines)


def run_elastix(elastix_logic, fixed_volume_node, moving_volume_node, parameter_files: list,
                output_transform_node, initial_transform_node=None, fixed_mask_node=None, moving_mask_node=None,
                linear_output: bool = True, keep_temporary_files: bool = False) -> ElastixRun:
    """``ElastixLogic.registerVolumes`` with our parameter files; raise RegistrationError on failure.

    ``linear_output`` asks for a linear transform node (``forceDisplacementFieldOutputTransform=False``;
    from Python the default is True, a displacement field). The log goes through ``logCallback``.
    """
    run = ElastixRun()
    previous_callback = getattr(elastix_logic, "logCallback", None)
    elastix_logic.logCallback = run.log_lines.append
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
                             "update SlicerElastix in the Extensions Manager, or use engine 'core'") from None
        raise
    except (RuntimeError, ValueError) as err:
        if "Elastix not found" in str(err):
            raise InputError("SlicerElastix cannot find the elastix executable",
                             "reinstall SlicerElastix, set its custom elastix path, or use engine 'core'") from None
        raise translate_elastix_failure(run.log + "\n" + str(err)) from None
    finally:
        elastix_logic.logCallback = previous_callback
    if getattr(elastix_logic, "cancelRequested", False):
        from ..errors import Cancelled

        raise Cancelled()
    return run


# ---------------------------------------------------------------------------------------- TotalSegmentator

TOTALSEGMENTATOR_INSTALL_HINT = ("Install the TotalSegmentator extension (View > Extensions Manager > search "
                                 "'TotalSegmentator'), restart Slicer, then segment with the buttons here")


def totalsegmentator_process_kwargs(process: Callable, task: str, fast: bool = False, cpu: bool = False) -> dict:
    """Keyword arguments for ``TotalSegmentatorLogic.process`` of the installed version.

    New versions: ``process(inputVolume, outputSegmentation, quality=None, cpu=False, task=None, subset=None,
    interactive=False, sequenceBrowserNode=None)``; old ones: ``process(..., fast=True, cpu=False, task=None,
    ...)``. Full quality unless ``fast``; never interactive (no dialogs in batch runs).
    """
    try:
        names = set(inspect.signature(process).parameters)
    except (TypeError, ValueError):
        names = set()
    kwargs: dict = {"task": task}
    if "quality" in names:
        kwargs["quality"] = "fast" if fast else None
    elif "fast" in names:
        kwargs["fast"] = bool(fast)
    if "cpu" in names:
        kwargs["cpu"] = bool(cpu)
    if "interactive" in names:
        kwargs["interactive"] = False
    return kwargs


def run_totalsegmentator(logic, input_volume_node, output_segmentation_node, task: str, fast: bool = False,
                         cpu: bool = False):
    """Segment ``input_volume_node`` into ``output_segmentation_node`` with the extension's logic."""
    kwargs = totalsegmentator_process_kwargs(logic.process, task, fast, cpu)
    try:
        logic.process(input_volume_node, output_segmentation_node, **kwargs)
    except subprocess.CalledProcessError as err:
        raise RegistrationError(f"TotalSegmentator failed (exit code {err.returncode}) on task '{task}'",
                                "see the Python console for its log; on a machine without a GPU tick 'CPU' "
                                "or use the 'fast' mode") from None
    except ImportError as err:
        raise InputError(f"TotalSegmentator's Python packages are missing ({err})",
                         "open the TotalSegmentator module once and click Apply: it installs them") from None
    return output_segmentation_node


def class_ids_for_task(task: str) -> dict:
    """TotalSegmentator class name -> id for ``task`` (from resources/totalsegmentator_classes.json)."""

    from ..resource_files import load_resource_json

    tasks = load_resource_json("totalsegmentator_classes.json")["tasks"]
    if task not in tasks:
        raise InputError(f"Unknown TotalSegmentator task '{task}'", "use total (CT) or total_mr (MR)")
    return {name: int(class_id) for class_id, name in tasks[task].items()}


# ------------------------------------------------------------------------ the pipeline on Slicer's own tools

#: Engines the Slicer module offers: Slicer's BRAINSFit, SlicerElastix, or the core's own (SimpleITK/itk-elastix).
SLICER_ENGINES = ("brainsfit", "elastix", "core")


@dataclass
class SlicerServices:
    """The Slicer objects the BRAINSFit/Elastix path calls (doubles in tests).

    crop_logic: ``slicer.modules.cropvolume.logic()``; run_sync: ``slicer.cli.runSync``; brainsfit_module:
    ``slicer.modules.brainsfit``; elastix_logic: ``Elastix.ElastixLogic()``; temp_dir: a folder of ours.
    """

    scene: object
    crop_logic: object
    temp_dir: str
    run_sync: Optional[Callable] = None
    brainsfit_module: object = None
    elastix_logic: object = None
    keep_temporary_files: bool = False


class SlicerToolsRun:
    """One registration where CropVolume crops and BRAINSFit or SlicerElastix registers.

    Plugs into ``pipeline.run_pipeline`` as its crop and register steps, so pre-alignment, crop
    planning, metrics and the report stay the core's. ``crop`` has ``crop.apply_crop``'s signature,
    ``register`` has ``engines.register``'s. Temporary nodes are removed by :meth:`cleanup`.
    """

    def __init__(self, services: SlicerServices, engine: str, fixed_node, moving_node):
        if engine not in ("brainsfit", "elastix"):
            raise InputError(f"Unknown Slicer engine '{engine}'", "use brainsfit, elastix or core")
        if engine == "brainsfit" and (services.run_sync is None or services.brainsfit_module is None):
            raise InputError("BRAINSFit (General Registration (BRAINS)) is not available in this Slicer",
                             "use engine 'elastix' or 'core'")
        if engine == "elastix" and services.elastix_logic is None:
            raise InputError("The SlicerElastix extension is not installed",
                             "install 'SlicerElastix' in the Extensions Manager and restart, or use engine 'core'")
        self.services = services
        self.engine = engine
        self.fixed_node = fixed_node
        self.moving_node = moving_node
        self.temporary_nodes: list = []
        self.fixed_crop_node = None
        self.moving_crop_node = None
        self.log = ""

    # -- helpers
    def _new_node(self, class_name: str, name: str):
        node = self.services.scene.AddNewNodeByClass(class_name, name)
        self.temporary_nodes.append(node)
        return node

    def cleanup(self) -> None:
        scene = self.services.scene
        for node in reversed(self.temporary_nodes):
            if node.GetScene() is None:
                continue
            helpers = []
            if hasattr(node, "GetNumberOfDisplayNodes"):
                helpers += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
            if hasattr(node, "GetStorageNode"):
                helpers.append(node.GetStorageNode())
            for helper in helpers:
                if helper is not None and helper.GetScene() is not None:
                    scene.RemoveNode(helper)
            scene.RemoveNode(node)
        self.temporary_nodes = []

    def _crop_one(self, volume_node, box, spacing, isotropic: bool, label: str, fill_value: float):
        from . import mrml_bridge

        roi = self._new_node("vtkMRMLMarkupsROINode", f"{label} overlap ROI (MultimodalPrealign)")
        mrml_bridge.set_roi_from_box(roi, box)
        output = self._new_node("vtkMRMLScalarVolumeNode", f"{label} cropped (MultimodalPrealign)")
        input_spacing = volume_node.GetSpacing()
        scale = mrml_bridge.crop_spacing_scale(input_spacing, spacing, isotropic)
        parameters = mrml_bridge.crop_parameters_node(self.services.scene, volume_node, roi, output,
                                                      voxel_based=False, spacing_scale=scale, isotropic=isotropic,
                                                      interpolation="linear", fill_value=fill_value)
        self.temporary_nodes.append(parameters)
        return mrml_bridge.apply_crop(self.services.crop_logic, parameters)

    # -- pipeline steps
    def crop(self, fixed, moving, plan):
        """CropVolume (interpolated, ROI from the plan's boxes) on the ORIGINAL nodes -> working images."""
        import SimpleITK as sitk

        from ..crop import background_value
        from . import mrml_bridge

        isotropic = bool(plan.details.get("isotropic", True))
        self.fixed_crop_node = self._crop_one(self.fixed_node, plan.fixed_box, plan.working_spacing_mm, isotropic,
                                              "fixed", background_value(fixed))
        self.moving_crop_node = self._crop_one(self.moving_node, plan.moving_box, plan.working_spacing_mm,
                                               isotropic, "moving", background_value(moving))
        fixed_work = sitk.Cast(mrml_bridge.volume_node_to_sitk(self.fixed_crop_node, "cropped fixed volume"),
                               sitk.sitkFloat32)
        moving_work = sitk.Cast(mrml_bridge.volume_node_to_sitk(self.moving_crop_node, "cropped moving volume"),
                                sitk.sitkFloat32)
        plan.details["fixed_working_size"] = list(fixed_work.GetSize())
        plan.details["moving_working_size"] = list(moving_work.GetSize())
        plan.details["cropped_with"] = "Slicer CropVolume (interpolated, linear)"
        return fixed_work, moving_work

    def register(self, fixed_work, moving_work, initial, settings, progress=None, fixed_mask=None, moving_mask=None):
        """BRAINSFit / SlicerElastix on the cropped nodes, the pre-alignment as initial transform."""
        import time

        from ..engines import EngineResult
        from ..geometry import transforms
        from . import mrml_bridge

        if self.fixed_crop_node is None or self.moving_crop_node is None:
            raise RuntimeError("SlicerToolsRun.register called before crop")
        stages = check_stages(settings.stages, option="")
        linear = stages[-1] != "bspline"
        started = time.perf_counter()
        if progress is not None:
            progress.report("register", 0.55, f"{'+'.join(stages)} with {self.engine}")
        initial_node = self._new_node("vtkMRMLLinearTransformNode", "pre-alignment (MultimodalPrealign)")
        mrml_bridge.set_transform_node_from_sitk(initial_node, initial, self.services.temp_dir)
        output_class = "vtkMRMLLinearTransformNode" if linear else "vtkMRMLTransformNode"
        output_node = self._new_node(output_class, "registration (MultimodalPrealign)")
        fixed_mask_node = self._mask_node(fixed_mask, "fixed")
        moving_mask_node = self._mask_node(moving_mask, "moving")
        if self.engine == "brainsfit":
            parameters = brainsfit_parameters(
                self.fixed_crop_node.GetID(), self.moving_crop_node.GetID(), output_node.GetID(), stages,
                initial_node.GetID(), settings.sampling_percentage, settings.iterations,
                fixed_mask_node.GetID() if fixed_mask_node is not None else None,
                moving_mask_node.GetID() if moving_mask_node is not None else None,
                histogram_bins=settings.histogram_bins)
            cli_node = run_brainsfit(self.services.run_sync, self.services.brainsfit_module, parameters)
            self.log = cli_node.GetOutputText() or ""
            used = {"engine": "brainsfit (Slicer)", "parameters": {k: v for k, v in parameters.items()
                                                                  if not str(v).startswith("vtkMRML")}}
        else:
            import numpy as np

            files = write_elastix_parameter_files(
                Path(self.services.temp_dir) / "elastix-parameters", stages, settings.sampling_percentage,
                settings.iterations, int(np.prod(fixed_work.GetSize())), settings.seed)
            run = run_elastix(self.services.elastix_logic, self.fixed_crop_node, self.moving_crop_node, files,
                              output_node, initial_node, fixed_mask_node, moving_mask_node, linear_output=linear,
                              keep_temporary_files=self.services.keep_temporary_files)
            self.log = run.log
            used = {"engine": "elastix (SlicerElastix)", "parameter_files": files}
        final = mrml_bridge.sitk_from_transform_node(output_node, self.services.temp_dir)
        record = {"stage": "+".join(stages), "engine": self.engine, "seconds": round(time.perf_counter() - started, 3),
                  "linear_output": linear}
        used.update({"stages": list(stages), "sampling_percentage": settings.sampling_percentage,
                     "iterations": settings.iterations, "seed": settings.seed})
        warnings = []
        if self.engine == "brainsfit" and stages[0] == "rigid" and not _is_rigid(initial):
            warnings.append("BRAINSFit keeps only the rigid part of a non-rigid pre-alignment for its rigid stage "
                            "(scale/shear of the pre-alignment dropped)")
        if transforms.is_linear(final) and transforms.is_linear(initial):
            import numpy as np

            moved = float(np.linalg.norm(transforms.to_matrix(final)[:3, 3] - transforms.to_matrix(initial)[:3, 3]))
            record["translation_change_mm"] = round(moved, 3)
        return EngineResult(final, [record], used, log=self.log, warnings=warnings)

    def _mask_node(self, mask, label: str):
        if mask is None:
            return None
        from . import mrml_bridge

        node = self._new_node("vtkMRMLLabelMapVolumeNode", f"{label} mask (MultimodalPrealign)")
        return mrml_bridge.update_volume_node_from_sitk(node, mask)


def _is_rigid(transform, tolerance: float = 1e-4) -> bool:
    """True for a linear transform whose matrix is a rotation (orthonormal, determinant +1)."""
    import numpy as np

    from ..geometry import transforms

    if not transforms.is_linear(transform):
        return False
    m = transforms.to_matrix(transform)[:3, :3]
    return bool(np.allclose(m @ m.T, np.eye(3), atol=tolerance) and np.linalg.det(m) > 0)


def run_pipeline_with_slicer_tools(fixed, moving, options, run: SlicerToolsRun, fixed_labels=None,
                                   moving_labels=None, progress=None):
    """``pipeline.run_pipeline`` with CropVolume as the crop step and BRAINSFit/SlicerElastix as the engine.

    The core validates ``options.registration.engine`` against its own engines, so it is given 'itk' (brainsfit) or
    'elastix'; the report names the Slicer engine actually used.
    """
    from .. import pipeline

    options.registration.engine = "elastix" if run.engine == "elastix" else "itk"
    calls = []

    def crop_step(*args, **kwargs):
        calls.append("crop")
        return run.crop(*args, **kwargs)

    def register_step(*args, **kwargs):
        calls.append("register")
        return run.register(*args, **kwargs)

    try:
        result = pipeline.run_pipeline(fixed, moving, options, fixed_labels, moving_labels, progress,
                                       crop_fn=crop_step, register_fn=register_step)
    finally:
        run.cleanup()
    if calls != ["crop", "register"]:  # never report a Slicer engine that did not run
        raise RuntimeError(f"The core pipeline did not run the Slicer crop/register steps (ran: {calls}); "
                           "check pipeline.run_pipeline's crop_fn/register_fn hooks")
    engine_name = "brainsfit" if run.engine == "brainsfit" else "elastix (SlicerElastix)"
    result.report["settings"]["engine"] = engine_name
    result.report["registration"]["engine"] = engine_name
    return result


def best_task_for_segment_names(names) -> Optional[str]:
    """The TotalSegmentator task (``total`` or ``total_mr``) whose class names match most of ``names``.

    Ties go to ``total`` unless an MR-only aggregate name (e.g. ``vertebrae``, ``lung_left``) is present.
    None when no name is a class name of either task.
    """
    names = set(names)
    counts = {task: len(names & set(class_ids_for_task(task))) for task in ("total", "total_mr")}
    if max(counts.values()) == 0:
        return None
    if counts["total_mr"] > counts["total"]:
        return "total_mr"
    if counts["total_mr"] == counts["total"]:
        mr_only = set(class_ids_for_task("total_mr")) - set(class_ids_for_task("total"))
        if names & mr_only:
            return "total_mr"
    return "total"


# ------------------------------------------------------------------------------------ panel text (pure)

#: Largest side (pixels) of a picture thumbnail in the module panel.
THUMBNAIL_PIXELS = 170
#: Reasons shown under the verdict in the panel (all of them are in the table and report.html).
PANEL_REASONS = 3


def _escape(text) -> str:
    import html

    return html.escape(str(text), quote=False)


def verdict_rich_text(verdict: Optional[str], reasons=(), max_reasons: int = PANEL_REASONS) -> str:
    """Qt rich text for the panel's verdict line: coloured PASS/WARN/FAIL, its advice, the first reasons.

    ``NOTE:`` reasons (automatic fallback) are always listed, after the first ``max_reasons`` others.

    Colours and advice are report.html's (``report_html.VERDICT_STYLE``); an unknown or missing verdict is
    shown like WARN.
    """
    from ..qa.report_html import VERDICT_STYLE

    shown = verdict if verdict in VERDICT_STYLE else "WARN"
    colour, background, advice = VERDICT_STYLE[shown]
    reasons = [str(r) for r in (reasons or [])]
    notes = [r for r in reasons if r.startswith("NOTE:")]  # e.g. the automatic fallback: always shown
    others = [r for r in reasons if r not in notes]
    items = "".join(f"<li>{_escape(r)}</li>" for r in others[:max_reasons] + notes)
    more = len(others) - max_reasons
    if more > 0:
        items += f"<li>... {more} more in the table and in report.html</li>"
    label = _escape(verdict or "not judged")
    return (f'<div style="background-color:{background}"><b style="color:{colour}; font-size:large">{label}</b> '
            f"{_escape(advice)}" + (f"<ul>{items}</ul>" if items else "") + "</div>")


def picture_entries(pictures: dict, base_dir) -> list:
    """Thumbnails for the panel: one grid row per kind of picture, column 0 = before, 1 = after registration.

    ``pictures``: ``report["pictures"]`` ({"<kind>_<stage>": path relative to ``base_dir`` or absolute}).
    Returns dicts {key, kind, stage, row, column, title, tooltip, path (absolute str)} in the order of
    ``pictures.KIND_TITLES`` (most telling first); files that do not exist are left out.
    """
    from ..qa.pictures import KIND_TITLES, STAGE_TITLES

    base = Path(base_dir)
    by_kind: dict = {}
    for key, relative in (pictures or {}).items():
        kind, _, stage = key.rpartition("_")
        path = Path(relative)
        path = path if path.is_absolute() else base / path
        if kind and path.is_file():
            by_kind.setdefault(kind, {})[stage] = (key, path)
    kinds = [k for k in KIND_TITLES if k in by_kind] + sorted(set(by_kind) - set(KIND_TITLES))
    entries = []
    for row, kind in enumerate(kinds):
        short, legend = KIND_TITLES.get(kind, (kind, ""))
        stages = ["before", "after"] + sorted(set(by_kind[kind]) - {"before", "after"})
        column = 0
        for stage in stages:
            if stage not in by_kind[kind]:
                column += stage in ("before", "after")
                continue
            key, path = by_kind[kind][stage]
            entries.append({"key": key, "kind": kind, "stage": stage, "row": row, "column": column,
                            "title": f"{short}: {stage}", "path": str(path.resolve()),
                            "tooltip": f"{STAGE_TITLES.get(stage, stage)}. {legend}. Click to open full size."})
            column += 1
    return entries


def fill_quality_table(table_node, report: dict) -> None:
    """``tables.fill_table_node`` plus display settings: column names as headers, read-only (locked) in the GUI.

    ``table_node`` is a ``vtkMRMLTableNode``; nothing here imports slicer. The verdict is also stored as the
    node attribute ``MultimodalPrealign.Verdict``.
    """
    from ..qa.tables import fill_table_node

    was_modifying = table_node.StartModify()
    try:
        table_node.SetLocked(False)
        fill_table_node(table_node, report)
        if hasattr(table_node, "SetUseColumnTitleAsColumnHeader"):
            table_node.SetUseColumnTitleAsColumnHeader(True)
        else:  # Slicer before 5.4
            table_node.SetUseColumnNameAsColumnHeader(True)
        table_node.SetLocked(True)
        table_node.SetAttribute("MultimodalPrealign.Verdict", str(report.get("verdict") or ""))
    finally:
        table_node.EndModify(was_modifying)


def _safe_name(text: str, limit: int = 40) -> str:
    return (re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "volume")[:limit]


def new_report_directory(root, moving_name: str, fixed_name: str, now=None) -> Path:
    """A new per-run folder ``root/MultimodalPrealign/<UTC time>_<moving>_to_<fixed>[_N]`` (not created here)."""
    import datetime

    now = now or datetime.datetime.now(datetime.timezone.utc)
    base = Path(root) / "MultimodalPrealign" / (f"{now:%Y%m%d-%H%M%S}_{_safe_name(moving_name)}"
                                                 f"_to_{_safe_name(fixed_name)}")
    candidate, index = base, 1
    while candidate.exists():
        index += 1
        candidate = base.with_name(f"{base.name}_{index}")
    return candidate


def _json_value(value):
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def write_quality_check(report: dict, directory, fixed, moving, before, after, fixed_labels=None,
                        moving_labels=None, pairs=None, write_pictures: bool = True) -> dict:
    """Judge ``report`` and write the pictures, report.html and report.json into ``directory``.

    ``before``/``after``: fixed->moving transforms (LPS mm) of the pre-alignment alone and of the result.
    Calls ``reporting.finish_report`` in a staging folder next to ``directory`` and moves the files into place at the
    end (no half-written outputs); ``directory`` may hold only a previous run's outputs
    (``pipeline.check_output_dir``). ``write_pictures=False``: verdict only, nothing is written.
    Returns {"verdict", "directory", "pictures": {key: absolute path}, "html": absolute path or None}.
    """
    import json
    import shutil
    import tempfile

    from ..pipeline import check_output_dir, move_into_place
    from ..qa import reporting

    if not write_pictures:
        verdict = reporting.finish_report(report, directory or ".", fixed, moving, before, after, fixed_labels,
                                   moving_labels, pairs, write_pictures=False)["verdict"]
        return {"verdict": verdict, "directory": None, "pictures": {}, "html": None}
    directory = Path(directory).resolve()
    check_output_dir(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=str(directory.parent)))
    try:
        outputs = reporting.finish_report(report, staging, fixed, moving, before, after, fixed_labels, moving_labels,
                                   pairs, write_pictures=True)
        (staging / "report.json").write_text(json.dumps(_json_value(report), indent=2) + "\n", encoding="utf-8")
        move_into_place(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    pictures = {key: str(directory / relative) for key, relative in outputs["pictures"].items()}
    html = str(directory / Path(outputs["html"]).name) if outputs.get("html") else None
    return {"verdict": outputs["verdict"], "directory": str(directory), "pictures": pictures, "html": html}


def diagnostics_lines(summary: dict) -> list:
    """Panel lines for ``mrml_bridge.pair_header_summary`` (shown as soon as both volumes are selected)."""
    lines = []
    for key in ("fixed", "moving"):
        v = summary[key]
        lines.append(f"{key.capitalize()} '{v['name']}': {' x '.join(map(str, v['size']))} voxels, spacing "
                     f"{' x '.join(f'{x:g}' for x in v['spacing_mm'])} mm, extent "
                     f"{' x '.join(f'{x:g}' for x in v['extent_mm'])} mm")
    lines.append(f"Voxel volume ratio (moving/fixed): {summary['voxel_volume_ratio_moving_over_fixed']:g}; "
                 f"extent ratio per axis: {', '.join(f'{x:g}' for x in summary['extent_ratio_moving_over_fixed'])}")
    overlap = summary["header_overlap_fraction"]
    if overlap == 0:
        lines.append("The headers place the volumes apart (no shared frame): keep pre-alignment 'auto' or 'search'.")
    else:
        lines.append(f"Header overlap: {overlap * 100:.0f}% of the smaller volume's box.")
    return lines
