"""The steps of the module's run (``MultimodalPrealignLogic.run``) around the core's pipeline, on MRML nodes.

check the input nodes -> read them (volumes as SimpleITK images, segmentations as label maps) -> [the pipeline]
-> place the result (output transform node, moving volume under it, resampled volume) -> quality check (verdict,
metrics table node, report folder).

Transforms: the result maps FIXED physical points to MOVING physical points (LPS mm, ITK resampling direction);
in Slicer that is the "from parent" transform of the node the MOVING volume is placed under.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from ..errors import InputError
from . import mrml_bridge, quality_check, totalsegmentator
from .engine_run import SLICER_ENGINES


class MultimodalPrealignResult:
    """What ``MultimodalPrealignLogic.run`` returns (attribute names in Slicer's camelCase: the console API).

    outputTransformNode: the transform node the ORIGINAL moving volume is placed under (fixed->moving
    resampling transform, pre-alignment and registration composed). report: same content as the CLI's
    report.json. warnings: list of strings. transform: the SimpleITK transform (fixed->moving, LPS).
    Quality check: verdict ('PASS', 'WARN' or 'FAIL') and verdictReasons (list of sentences); tableNode (a
    vtkMRMLTableNode with the rows of ``qa.metrics_table``); reportDirectory, reportHtmlPath and pictures
    ({name: absolute PNG path}), all None/empty when the run was asked not to write a report.
    temporaryDirectory: the run's kept working folder (``keepTemporaryFiles``), else None.
    reproduce: the code behind the run (report.json ``reproduce``: Slicer console code, command line, the engine's
    own command line / parameter files).
    """

    def __init__(self, outputTransformNode, report, warnings, transform, outputVolumeNode=None, tableNode=None,
                 reportDirectory=None, reportHtmlPath=None, pictures=None, temporaryDirectory=None):
        self.outputTransformNode = outputTransformNode
        self.report = report
        self.warnings = warnings
        self.transform = transform
        self.outputVolumeNode = outputVolumeNode
        self.tableNode = tableNode
        self.reportDirectory = reportDirectory
        self.reportHtmlPath = reportHtmlPath
        self.pictures = dict(pictures or {})
        self.temporaryDirectory = temporaryDirectory
        self.verdict = report.get("verdict")
        self.verdictReasons = list(report.get("verdict_reasons") or [])
        self.reproduce = report.get("reproduce") or {}


@dataclass
class RunInputs:
    """The volume nodes of a run and what the core reads from them (images in LPS; label maps or None)."""

    fixed_node: object
    moving_node: object
    fixed: sitk.Image
    moving: sitk.Image
    fixed_labels: sitk.Image | None = None
    moving_labels: sitk.Image | None = None

    @property
    def pair_name(self) -> str:
        """'<moving> to <fixed>' (volume node names): names the output transform and table nodes."""
        return f"{self.moving_node.GetName()} to {self.fixed_node.GetName()}"


def check_inputs(fixed_node, moving_node, engine: str, output_transform_node=None, report_directory=None) -> None:
    """Refuse bad input before anything runs: InputError (a ValueError) with the cause and the fix.

    ``output_transform_node``: the run's own output (the moving volume may sit under it); ``report_directory``: a
    folder that will be written (it may hold only a previous run's outputs), None when nothing is written there.
    """
    from ..pipeline import check_output_dir

    if fixed_node is None or moving_node is None:
        raise InputError("Fixed and moving volumes are required", "select both volumes")
    if fixed_node == moving_node:
        raise InputError("The fixed and moving volumes are the same node", "select two different volumes")
    if engine not in SLICER_ENGINES:
        renamed = " ('core' is now 'itk', or 'elastix' for the core's itk-elastix)" if engine == "core" else ""
        raise InputError(f"Unknown engine '{engine}'", "use " + ", ".join(SLICER_ENGINES) + renamed)
    mrml_bridge.check_not_transformed(fixed_node, "fixed volume")
    mrml_bridge.check_not_transformed(moving_node, "moving volume", allowed_transform_node=output_transform_node)
    if report_directory is not None:  # refuse a folder of someone else's files before the run
        check_output_dir(Path(report_directory).resolve())


def previous_result_node(moving_node):
    """The output transform of a previous run on ``moving_node`` when the volume still sits under it, else None
    (so that calling ``logic.run`` again without an output transform node replaces that result)."""
    import slicer

    parent = moving_node.GetParentTransformNode() if moving_node is not None else None
    if parent is None or not parent.GetAttribute("MultimodalPrealign.Convention"):
        return None
    role = slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole()
    return parent if parent.GetNodeReferenceID(role) == moving_node.GetID() else None


@contextmanager
def moving_nodes_untransformed(moving_node, moving_segmentation, output_transform_node):
    """What a re-run means: it starts from the UNTRANSFORMED moving volume (and segmentation).

    After a run the moving volume sits under the output transform. The core reads voxels without parent
    transforms, but CropVolume resamples through them (vtkSlicerCropVolumeLogic::CropInterpolated) and so does
    the segmentation export (vtkSlicerSegmentationsModuleLogic): so the moving volume and its segmentation are
    taken out of ``output_transform_node`` for the run, and every path sees the same untransformed voxels.
    The new result replaces the old one in that node (:func:`place_result` puts the volume back under it);
    on failure or cancel the previous placement is restored. Yields the nodes taken out.
    """
    detached = []
    if output_transform_node is not None:
        for node in (moving_node, moving_segmentation):
            if node is not None and node.GetTransformNodeID() == output_transform_node.GetID():
                node.SetAndObserveTransformNodeID(None)
                detached.append(node)
    try:
        yield detached
    except BaseException:
        for node in detached:
            node.SetAndObserveTransformNodeID(output_transform_node.GetID())
        raise
    for node in detached:  # success: the segmentation follows the volume under the new result
        if node is not moving_node:
            node.SetAndObserveTransformNodeID(output_transform_node.GetID())


def read_inputs(fixed_node, moving_node, fixed_segmentation, moving_segmentation, options) -> RunInputs:
    """The volumes as SimpleITK images and the segmentations (or None) as label maps; their tasks go in ``options``."""
    fixed = mrml_bridge.volume_node_to_sitk(fixed_node, "fixed volume")
    moving = mrml_bridge.volume_node_to_sitk(moving_node, "moving volume")
    fixed_labels = segmentation_labels(fixed_segmentation, fixed_node, options, "fixed")
    moving_labels = segmentation_labels(moving_segmentation, moving_node, options, "moving")
    return RunInputs(fixed_node, moving_node, fixed, moving, fixed_labels, moving_labels)


def segmentation_labels(segmentation_node, volume_node, options, which: str) -> sitk.Image | None:
    """Label map (TotalSegmentator class ids) of a segmentation on its volume's grid, None without a segmentation.

    The task found (``total`` or ``total_mr``) is set as ``options.<which>_labels_task``.
    """
    if segmentation_node is None:
        return None
    labels, task = totalsegmentator.labels_from_segmentation(segmentation_node, volume_node, which)
    if which == "fixed":
        options.fixed_labels_task = task
    else:
        options.moving_labels_task = task
    return labels


def place_result(inputs: RunInputs, transform, output_transform_node=None, output_volume_node=None,
                 temp_dir: str | None = None):
    """Put ``transform`` (fixed->moving, LPS mm) into the output transform node (created when None) and place the
    ORIGINAL moving volume under it; resample the moving volume onto the fixed grid into ``output_volume_node``
    when given. Returns the output transform node."""
    import slicer

    from ..pipeline import resample_moving

    if output_transform_node is None:
        output_transform_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTransformNode", inputs.pair_name)
    mrml_bridge.set_transform_node_from_sitk(output_transform_node, transform, temp_dir)
    output_transform_node.SetAttribute("MultimodalPrealign.Convention", "fixed->moving resampling (from parent)")
    # Slicer's standard registration references (SlicerElastix sets the same two).
    output_transform_node.SetNodeReferenceID(slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole(),
                                             inputs.moving_node.GetID())
    output_transform_node.SetNodeReferenceID(slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole(),
                                             inputs.fixed_node.GetID())
    mrml_bridge.apply_to_volume(inputs.moving_node, output_transform_node)
    if output_volume_node is not None:
        resampled = resample_moving(inputs.fixed, inputs.moving, transform)
        mrml_bridge.update_volume_node_from_sitk(output_volume_node, resampled)
        output_volume_node.CreateDefaultDisplayNodes()
    return output_transform_node


def _volume_file(node) -> str | None:
    """The file a volume node was loaded from, when it still holds that file's content; else None."""
    storage = node.GetStorageNode() if hasattr(node, "GetStorageNode") else None
    path = storage.GetFileName() if storage is not None else None
    if not path or not Path(path).exists() or node.GetModifiedSinceRead():
        return None
    return path


def record_reproduction(report: dict, inputs: RunInputs, options, settings: dict, run_function) -> dict:
    """report.json ``reproduce`` of a module run: the console code (``logic.run`` with every non-default keyword
    of ``settings``, defaults read from ``run_function``'s signature), the equivalent command line (when both
    volumes come from files) and the engine's own record."""
    import inspect

    from ..pipeline import reproduce

    defaults = {name: parameter.default for name, parameter in inspect.signature(run_function).parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    comments = []
    if inputs.fixed_labels is not None or inputs.moving_labels is not None:
        comments.append("Pass the segmentations used here as fixedSegmentation= / movingSegmentation=.")
    code = reproduce.slicer_python(inputs.fixed_node.GetName(), inputs.moving_node.GetName(), settings, defaults,
                                   comments=comments)
    fixed_file, moving_file = _volume_file(inputs.fixed_node), _volume_file(inputs.moving_node)
    command, note = None, None
    if fixed_file and moving_file:
        command = reproduce.command_line(fixed_file, moving_file, "multimodal_prealign_out", options)
        if options.registration.engine == "brainsfit":
            note = ("On the command line, --engine brainsfit runs a BRAINSFit executable (--brainsfit PATH or "
                    "Slicer's cli-modules); crops are made by the core instead of CropVolume.")
    else:
        note = ("No command line: a volume was not loaded from a file or was changed since (save both volumes, "
                "then the command line can be made).")
    engine_used = (report.get("settings") or {}).get("engine_settings_used") or {}
    return reproduce.record(report, command, code, engine_used, note)


def check_quality(inputs: RunInputs, result, table_node, report_directory, report_root, write_report: bool,
                  announce) -> dict:
    """Verdict, metrics table node (created when None) and, with ``write_report``, the pictures, report.html and
    report.json in ``report_directory`` (default: a new folder under ``report_root()``, asked only then).

    ``result``: the pipeline's result (its report gets the verdict); ``announce(stage, fraction, message)``: progress.
    Returns ``quality_check.write_quality_check``'s outputs plus "table_node".
    """
    import slicer

    report = result.report
    announce("report", 0.96, "quality check: verdict, pictures and report.html")
    if table_node is None:
        table_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", f"{inputs.pair_name} quality check")
    report["slicer"]["table_node"] = table_node.GetID()
    if write_report and report_directory is None:
        report_directory = quality_check.new_report_directory(report_root(), inputs.moving_node.GetName(),
                                                              inputs.fixed_node.GetName())
    outputs = quality_check.write_quality_check(
        report, report_directory, inputs.fixed, inputs.moving, result.initial or result.prealign.transform,
        result.transform, inputs.fixed_labels, inputs.moving_labels, result.structure_pairs,
        write_pictures=write_report)
    quality_check.fill_quality_table(table_node, report)
    table_node.SetAttribute("MultimodalPrealign.ReportDirectory", outputs["directory"] or "")
    announce("report", 1.0, f"verdict {report.get('verdict')}"
             + (f"; report in {outputs['directory']}" if outputs["directory"] else ""))
    logging.info("MultimodalPrealign finished: verdict %s, report %s", report.get("verdict"), outputs["html"])
    return dict(outputs, table_node=table_node)


def reusable_table_node(last_result, fixed_node, moving_node):
    """The previous run's table node when it was made for the same pair and is still in the scene, else None.

    ``last_result``: the previous ``MultimodalPrealignResult`` or None.
    """
    if last_result is None or last_result.tableNode is None or last_result.tableNode.GetScene() is None:
        return None
    slicer_info = last_result.report.get("slicer") or {}
    same_pair = (slicer_info.get("fixed_volume_node"), slicer_info.get("moving_volume_node")) == (
        fixed_node.GetID(), moving_node.GetID())
    return last_result.tableNode if same_pair else None
