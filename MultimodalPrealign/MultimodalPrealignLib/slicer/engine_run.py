"""The core's pipeline with Slicer's own tools as its crop and register steps (engines 'brainsfit' and 'elastix').

CropVolume crops the ORIGINAL volume nodes to the core's crop plan; BRAINSFit or SlicerElastix registers the
cropped nodes from the pre-alignment. Pre-alignment, crop planning, metrics and the report stay the core's.

Transforms: every transform handed over here maps FIXED physical points to MOVING physical points (LPS mm, ITK
resampling direction); BRAINSFit and elastix return the initial transform INCLUDED in their output
(``brainsfit``, ``elastix``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..geometry import transforms
from . import brainsfit, crop_volume, elastix, mrml_bridge

#: The engine names, the same on the command line and in Slicer (``engines.ENGINES``, checked by a test):
#: 'itk' (the core's SimpleITK engine), 'elastix' (SlicerElastix when installed, else the core's itk-elastix),
#: 'brainsfit' (Slicer's General Registration (BRAINS) CLI module).
SLICER_ENGINES = ("itk", "elastix", "brainsfit")
#: The engines that run as Slicer's own tools (CropVolume crops for them).
SLICER_TOOL_ENGINES = ("brainsfit", "elastix")
SLICER_TOOL_NAMES = {"brainsfit": "Slicer's General Registration (BRAINS) module (BRAINSFit)",
                     "elastix": "the SlicerElastix extension (elastix)"}


def slicer_elastix_installed() -> bool:
    """True when the SlicerElastix extension's logic can be imported in this Slicer."""
    try:
        import Elastix  # noqa: F401
    except ImportError:
        return False
    return True


def runs_in_slicer_tools(engine: str, services) -> bool:
    """True when ``engine`` runs as a Slicer tool (CropVolume + BRAINSFit or SlicerElastix); False for 'itk', and
    for 'elastix' without SlicerElastix (the core's itk-elastix runs instead). ``services``: ``SlicerServices``."""
    if engine == "brainsfit":
        return True
    return engine == "elastix" and services is not None and services.elastix_logic is not None


def needs_itk_elastix(engine: str, fallback: bool) -> bool:
    """True when the run may need the core's itk-elastix: engine 'elastix' without SlicerElastix, or engine 'itk'
    with the fallback to the other engine."""
    if engine == "elastix":
        return not slicer_elastix_installed()
    return engine == "itk" and bool(fallback)


@dataclass
class SlicerServices:
    """The Slicer objects the BRAINSFit/Elastix path calls (doubles in tests).

    crop_logic: ``slicer.modules.cropvolume.logic()``; run_cli: ``slicer.cli.run`` (BRAINSFit runs asynchronously:
    ``run_cli(module, None, parameters, wait_for_completion=False)`` returns its CLI node at once); process_events:
    ``slicer.app.processEvents`` (called while BRAINSFit runs, so the GUI and its Cancel button stay alive);
    brainsfit_module: ``slicer.modules.brainsfit``; elastix_logic: ``Elastix.ElastixLogic()``; temp_dir: a folder
    of ours. Tests: Testing/slicer_cli_double.py gives run_cli, brainsfit_module and process_events that run the
    real BRAINSFit executable.
    """

    scene: object
    crop_logic: object
    temp_dir: str
    run_cli: Callable | None = None
    brainsfit_module: object = None
    process_events: Callable | None = None
    elastix_logic: object = None
    keep_temporary_files: bool = False


def slicer_services(temp_dir: str) -> SlicerServices:
    """The running Slicer's services: its scene, CropVolume, BRAINSFit and (when installed) SlicerElastix."""
    import slicer

    brainsfit_module = getattr(slicer.modules, "brainsfit", None)
    elastix_logic = None
    try:
        from Elastix import ElastixLogic

        elastix_logic = ElastixLogic()
    except ImportError:
        pass
    return SlicerServices(
        scene=slicer.mrmlScene, crop_logic=slicer.modules.cropvolume.logic(), temp_dir=temp_dir,
        run_cli=slicer.cli.run, brainsfit_module=brainsfit_module, process_events=slicer.app.processEvents,
        elastix_logic=elastix_logic)


class SlicerToolsRun:
    """One registration where CropVolume crops and BRAINSFit or SlicerElastix registers.

    Plugs into ``pipeline.run_pipeline`` as its crop and register steps, so pre-alignment, crop
    planning, metrics and the report stay the core's. ``crop`` has ``crop.apply_crop``'s signature,
    ``register`` has ``engines.register``'s. Temporary nodes are removed by :meth:`cleanup`.
    """

    def __init__(self, services: SlicerServices, engine: str, fixed_node, moving_node):
        if engine not in SLICER_TOOL_ENGINES:
            raise InputError(f"Unknown Slicer engine '{engine}'", "use " + ", ".join(SLICER_ENGINES))
        if engine == "brainsfit" and (services.run_cli is None or services.brainsfit_module is None):
            raise InputError("BRAINSFit (General Registration (BRAINS)) is not available in this Slicer",
                             "use engine 'itk' or 'elastix'")
        if engine == "elastix" and services.elastix_logic is None:
            raise InputError("The SlicerElastix extension is not installed",
                             "install 'SlicerElastix' in the Extensions Manager and restart, or use engine 'itk'")
        self.services = services
        self.engine = engine
        self.fixed_node = fixed_node
        self.moving_node = moving_node
        self.temporary_nodes: list = []
        self.fixed_crop_node = None
        self.moving_crop_node = None
        self.log = ""
        self.attempt_nodes: list = []  # the current attempt's crops (dropped when the next attempt crops)
        self.calls: list = []  # 'crop' / 'register', in the order the pipeline called them

    # -- helpers
    def _new_node(self, class_name: str, name: str):
        node = self.services.scene.AddNewNodeByClass(class_name, name)
        self.temporary_nodes.append(node)
        return node

    def cleanup(self) -> None:
        """Remove the temporary nodes (ROIs, crops, transforms, masks, parameter nodes) and their helper nodes."""
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
        roi = self._new_node("vtkMRMLMarkupsROINode", f"{label} overlap ROI (MultimodalPrealign)")
        mrml_bridge.set_roi_from_box(roi, box)
        output = self._new_node("vtkMRMLScalarVolumeNode", f"{label} cropped (MultimodalPrealign)")
        input_spacing = volume_node.GetSpacing()
        scale = crop_volume.crop_spacing_scale(input_spacing, spacing, isotropic)
        parameters = crop_volume.crop_parameters_node(self.services.scene, volume_node, roi, output,
                                                      voxel_based=False, spacing_scale=scale, isotropic=isotropic,
                                                      interpolation="linear", fill_value=fill_value)
        self.temporary_nodes.append(parameters)
        return crop_volume.apply_crop(self.services.crop_logic, parameters)

    def _mask_node(self, mask, label: str):
        if mask is None:
            return None
        node = self._new_node("vtkMRMLLabelMapVolumeNode", f"{label} mask (MultimodalPrealign)")
        return mrml_bridge.update_volume_node_from_sitk(node, mask)

    def _drop_previous_attempt(self) -> None:
        """Remove the previous attempt's ROIs, crops and parameter nodes (a fallback attempt crops again)."""
        attempt_nodes, self.attempt_nodes = self.attempt_nodes, []
        kept = [node for node in self.temporary_nodes if node not in attempt_nodes]
        self.temporary_nodes = attempt_nodes
        self.cleanup()
        self.temporary_nodes = kept

    # -- pipeline steps
    def crop(self, fixed, moving, plan):
        """CropVolume (interpolated, ROI from the plan's boxes) on the ORIGINAL nodes -> working images.

        Called once per attempt (a fallback attempt crops again under its own pose); the previous attempt's
        nodes are removed first.
        """
        from ..crop import background_value

        self.calls.append("crop")
        self._drop_previous_attempt()
        first_new = len(self.temporary_nodes)
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
        self.attempt_nodes = self.temporary_nodes[first_new:]
        return fixed_work, moving_work

    def register(self, fixed_work, moving_work, initial, settings, progress=None, fixed_mask=None, moving_mask=None):
        """BRAINSFit / SlicerElastix on the cropped nodes, the pre-alignment ``initial`` (fixed->moving, LPS mm) as
        initial transform. Returns the ``EngineResult`` (its transform includes ``initial``)."""
        from ..engines.settings import EngineResult, check_stages

        if not self.calls or self.calls[-1] != "crop":
            raise RuntimeError("SlicerToolsRun.register called without a crop for this attempt")
        self.calls.append("register")
        stages = check_stages(settings.stages, option="")
        linear = stages[-1] != "bspline"
        started = time.perf_counter()
        if progress is not None:
            progress.report("register", 0.0, f"{'+'.join(stages)} with {self.engine}")
        first_new = len(self.temporary_nodes)
        initial_node = self._new_node("vtkMRMLLinearTransformNode", "pre-alignment (MultimodalPrealign)")
        mrml_bridge.set_transform_node_from_sitk(initial_node, initial, self.services.temp_dir)
        output_class = "vtkMRMLLinearTransformNode" if linear else "vtkMRMLTransformNode"
        output_node = self._new_node(output_class, "registration (MultimodalPrealign)")
        mask_nodes = (self._mask_node(fixed_mask, "fixed"), self._mask_node(moving_mask, "moving"))
        if self.engine == "brainsfit":
            used = self._run_brainsfit(stages, settings, initial_node, output_node, mask_nodes, progress)
        else:
            used = self._run_elastix(stages, settings, int(np.prod(fixed_work.GetSize())), initial_node, output_node,
                                     mask_nodes, linear, progress)
        final = mrml_bridge.sitk_from_transform_node(output_node, self.services.temp_dir)
        self.attempt_nodes += self.temporary_nodes[first_new:]
        record = {"stage": "+".join(stages), "engine": self.engine, "seconds": round(time.perf_counter() - started, 3),
                  "linear_output": linear}
        used.update({"stages": list(stages), "sampling_percentage": settings.sampling_percentage,
                     "iterations": settings.iterations, "seed": settings.seed})
        warnings = brainsfit.initial_transform_warnings(stages, initial) if self.engine == "brainsfit" else []
        if transforms.is_linear(final) and transforms.is_linear(initial):
            moved = float(np.linalg.norm(transforms.to_matrix(final)[:3, 3] - transforms.to_matrix(initial)[:3, 3]))
            record["translation_change_mm"] = round(moved, 3)
        return EngineResult(final, [record], used, log=self.log, warnings=warnings)

    def _run_brainsfit(self, stages, settings, initial_node, output_node, mask_nodes, progress=None) -> dict:
        """BRAINSFit through Slicer's CLI, asynchronously (``brainsfit.run_brainsfit``: the GUI stays alive, Cancel
        stops it, its progress goes to ``progress``, its CLI node is removed afterwards), with the parameters the
        headless engine sends (``engines.brainsfit_parameters``). Keeps its output text as the log; its silent
        non-registration (output = initial transform) raises. Returns the report's 'used' entry."""
        from ..engines.brainsfit_parameters import brainsfit_preset

        fixed_mask_node, moving_mask_node = mask_nodes
        fixed_voxels = int(np.prod(self.fixed_crop_node.GetImageData().GetDimensions()))
        sampling = brainsfit.effective_sampling_percentage(settings.sampling_percentage, fixed_voxels)
        threads = int(brainsfit_preset()["deterministic_threads"]) if settings.deterministic else None
        parameters = brainsfit.brainsfit_parameters(
            self.fixed_crop_node.GetID(), self.moving_crop_node.GetID(), output_node.GetID(), stages,
            initial_node.GetID(), sampling, settings.iterations,
            fixed_mask_node.GetID() if fixed_mask_node is not None else None,
            moving_mask_node.GetID() if moving_mask_node is not None else None,
            histogram_bins=settings.histogram_bins, number_of_threads=threads)
        run = brainsfit.run_brainsfit(self.services.run_cli, self.services.brainsfit_module, parameters,
                                      self.services.process_events, progress)
        self.log = run.output_text
        temp_dir = self.services.temp_dir
        brainsfit.check_registered(run.output_text, mrml_bridge.sitk_from_transform_node(initial_node, temp_dir),
                                   mrml_bridge.sitk_from_transform_node(output_node, temp_dir),
                                   brainsfit.volume_corners_lps(self.fixed_crop_node))
        return {"engine": "brainsfit (Slicer)", "sampling_percentage_sent": sampling,
                "parameters": {k: v for k, v in parameters.items() if not str(v).startswith("vtkMRML")}}

    def _run_elastix(self, stages, settings, fixed_voxels: int, initial_node, output_node, mask_nodes,
                     linear: bool, progress=None) -> dict:
        """SlicerElastix with our parameter files (in the temporary folder); keeps its log. Returns the 'used' entry."""
        fixed_mask_node, moving_mask_node = mask_nodes
        files = elastix.write_elastix_parameter_files(
            Path(self.services.temp_dir) / "elastix-parameters", stages, settings.sampling_percentage,
            settings.iterations, fixed_voxels, settings.seed)
        run = elastix.run_elastix(self.services.elastix_logic, self.fixed_crop_node, self.moving_crop_node, files,
                                  output_node, initial_node, fixed_mask_node, moving_mask_node, linear_output=linear,
                                  keep_temporary_files=self.services.keep_temporary_files,
                                  cancel_requested=progress.cancel_requested if progress is not None else None)
        self.log = run.log
        return {"engine": "elastix (SlicerElastix)", "parameter_file_paths": files,
                "parameter_files": {Path(f).name: Path(f).read_text(encoding="utf-8") for f in files},
                "working_directory": run.working_directory}


def run_pipeline_with_slicer_tools(fixed, moving, options, run: SlicerToolsRun, fixed_labels=None,
                                   moving_labels=None, progress=None):
    """``pipeline.run_pipeline`` with CropVolume as the crop step and BRAINSFit/SlicerElastix as the engine.

    Every attempt (the normal one and each fallback to another pre-alignment candidate) crops and registers with
    the Slicer tool; the engine itself is not swapped on fallback (the caller chose it). Temporary nodes are
    removed at the end, also on failure or cancel.
    """
    from .. import pipeline

    options.registration.engine = run.engine
    try:
        result = pipeline.run_pipeline(fixed, moving, options, fixed_labels, moving_labels, progress,
                                       crop_fn=run.crop, register_fn=run.register)
    finally:
        run.cleanup()
    if "register" not in run.calls:  # never report a Slicer engine that did not run
        raise RuntimeError(f"The core pipeline did not run the Slicer crop/register steps (ran: {run.calls}); "
                           "check pipeline.run_pipeline's crop_fn/register_fn hooks")
    result.report["settings"]["engine"] = run.engine
    result.report["registration"]["engine"] = run.engine
    result.report["registration"]["tool"] = SLICER_TOOL_NAMES[run.engine]
    return result
