"""3D Slicer module "Multimodal Prealign": pre-align, crop and register CT/MR pairs that differ a lot.

Thin layer over the headless core (MultimodalPrealignLib), in Slicer's scripted-module shape: the module, its
parameter node, its widget, its logic and its self-test. Everything else on the Slicer side (MRML conversions,
the adapters to CropVolume, BRAINSFit, SlicerElastix and TotalSegmentator, the steps of the run, the panel's
display pieces) is in ``MultimodalPrealignLib.slicer``.
Parameter-node annotations are read at runtime by ``parameterNodeWrapper``: no
``from __future__ import annotations`` here, and ``typing.Optional`` instead of ``X | None``
(Slicer 5.8 runs Python 3.9).
"""

import os
import shutil
import sys
import tempfile
from typing import Annotated, Optional

import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTransformNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if _MODULE_DIR not in sys.path:  # the core package ships next to this file
    sys.path.insert(0, _MODULE_DIR)

from MultimodalPrealignLib.errors import Cancelled  # noqa: E402
from MultimodalPrealignLib.slicer import (  # noqa: E402
    engine_run,
    pair_diagnostics,
    python_requirements,
    result_panel,
    run_steps,
    sample_data,
    self_test,
    structure_nodes,
    totalsegmentator,
    views,
)
from MultimodalPrealignLib.slicer.run_steps import MultimodalPrealignResult  # noqa: E402 (what the logic returns)

#: logic.run's settings recorded in report.json's "reproduce" (non-default ones become the console code).
RUN_SETTINGS = ("prealign", "engine", "stages", "samplingPercentage", "iterations", "cropMarginMm", "spacingScale",
                "isotropic", "seed", "fallback", "keepTemporaryFiles", "writeReport", "perStructure", "structureStages",
                "structureThreshold")
DOCS_URL = "https://github.com/MultimodalPrealign/SlicerMultimodalPrealign/blob/main/docs/user_guide.md"
PREALIGN_METHODS = ["auto", "search", "anatomy", "moments", "geometry", "header", "none"]
ENGINES = list(engine_run.SLICER_ENGINES)  # itk, elastix, brainsfit: the command line's --engine names


#
# MultimodalPrealign
#


class MultimodalPrealign(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Multimodal Prealign"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["MultimodalPrealign developers"]
        self.parent.helpText = f"""
Registers a moving volume (e.g. MR) to a fixed volume (e.g. CT) when the two scans differ a lot:
partial field of view, very different voxel sizes, head-first vs feet-first, no shared frame of reference.
<ol>
<li>Select the fixed and moving volumes: the pair's diagnostics appear at once.</li>
<li>Optionally segment both with TotalSegmentator (buttons) to enable anatomy-based pre-alignment
and per-structure metrics.</li>
<li>Apply: pre-alignment, crop to the overlap (CropVolume), registration (engine brainsfit: Slicer's BRAINSFit;
elastix: SlicerElastix; itk: the built-in engine). The moving volume is placed under the output transform; Apply
again starts over from the untransformed moving volume and replaces the result.</li>
<li>Quality check: a PASS/WARN/FAIL verdict with its reasons, the metrics as a table node, before/after
pictures (click to enlarge) and a report.html with everything.</li>
</ol>
See the <a href="{DOCS_URL}">user guide</a> for the console API and headless use.
"""
        self.parent.acknowledgementText = """
Uses 3D Slicer's CropVolume and BRAINSFit (BRAINSTools, University of Iowa), and optionally SlicerElastix
(elastix, Klein et al., IEEE TMI 2010) and TotalSegmentator (Wasserthal et al., Radiology: AI 2023).
"""
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Register the embedded demo pair with the Sample Data module (category "Multimodal Prealign")."""
    sample_data.register_demo_pair(_MODULE_DIR)


#
# Parameter node
#


@parameterNodeWrapper
class MultimodalPrealignParameterNode:
    """Everything the panel shows. 0 for sampling/iterations means: the engine's own default."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedSegmentation: Optional[vtkMRMLSegmentationNode]
    movingSegmentation: Optional[vtkMRMLSegmentationNode]
    prealignMethod: Annotated[str, Choice(PREALIGN_METHODS)] = "auto"
    cropMarginMm: Annotated[float, WithinRange(0.0, 200.0)] = 20.0
    spacingScale: Annotated[float, WithinRange(0.1, 20.0)] = 1.0
    isotropic: bool = True
    engine: Annotated[str, Choice(ENGINES)] = "brainsfit"
    fallback: bool = True
    keepTemporaryFiles: bool = False
    stageRigid: bool = True
    stageAffine: bool = True
    stageBSpline: bool = False
    samplingPercentage: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    iterations: Annotated[int, WithinRange(0, 100000)] = 0
    outputTransform: Optional[vtkMRMLTransformNode]
    outputVolume: Optional[vtkMRMLScalarVolumeNode]
    perStructure: str = ""  # per-structure registration: segment names or 'all' (empty: off)
    structureSegmentation: Optional[vtkMRMLSegmentationNode]


#
# Widget
#


class MultimodalPrealignWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._cancelRequested = False
        self._running = False
        self._lastResult = None
        self._diagnostics = pair_diagnostics.DiagnosticsDisplay()
        self._pictureButtons = []
        self._segmentLog = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MultimodalPrealign.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MultimodalPrealignLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.segmentFixedButton.connect("clicked(bool)", lambda: self.onSegment("fixed"))
        self.ui.segmentMovingButton.connect("clicked(bool)", lambda: self.onSegment("moving"))
        self.ui.showBeforeButton.connect("clicked(bool)", lambda: self.onShow("before"))
        self.ui.showAfterButton.connect("clicked(bool)", lambda: self.onShow("after"))
        self.ui.showCheckerboardButton.connect("clicked(bool)", lambda: self.onShow("checkerboard"))
        self.ui.openReportButton.connect("clicked(bool)", self.onOpenReport)
        self.ui.openReportFolderButton.connect("clicked(bool)", self.onOpenReportFolder)
        self.ui.showTemporaryFolderButton.connect("clicked(bool)", self.onShowTemporaryFolder)
        self.ui.copyReproduceButton.connect("clicked(bool)", self.onCopyReproduce)
        self.ui.showMovingUnderComboBox.connect("currentIndexChanged(int)", self.onShowMovingUnder)

        totalsegmentator.show_segment_buttons(self.ui)
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setValue(0)
        self.ui.statusLabel.text = ""
        self._setResultButtonsEnabled(False)
        self.clearQualityCheck()
        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)
        self._lastResult = None
        self._diagnostics.forget()
        self.clearQualityCheck()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None):
        p = self._parameterNode
        if p is None:
            return
        ready = bool(p.fixedVolume and p.movingVolume and p.fixedVolume != p.movingVolume)
        stages = self._stages()
        self.ui.applyButton.enabled = ready and bool(stages) and not self._running
        if not ready:
            self.ui.applyButton.toolTip = "Select two different volumes"
        elif not stages:
            self.ui.applyButton.toolTip = "Tick at least one registration stage"
        else:
            self.ui.applyButton.toolTip = "Pre-align, crop and register the moving volume to the fixed volume"
        self.ui.segmentFixedButton.enabled = bool(p.fixedVolume) and not self._running
        self.ui.segmentMovingButton.enabled = bool(p.movingVolume) and not self._running
        self._updateDiagnostics(p.fixedVolume, p.movingVolume, ready)

    def _updateDiagnostics(self, fixedVolume, movingVolume, ready):
        """Pair diagnostics as soon as both volumes are selected; computed once per pair (about a second)."""
        self._diagnostics.update(self.ui.diagnosticsTextEdit, fixedVolume, movingVolume, ready,
                                 self.logic.pairDiagnostics)

    def _stages(self):
        p = self._parameterNode
        return [name for name, on in (("rigid", p.stageRigid), ("affine", p.stageAffine),
                                      ("bspline", p.stageBSpline)) if on]

    # -- running
    def _progress(self, stage, fraction, message):
        self.ui.progressBar.setValue(int(round(100 * fraction)))
        self.ui.statusLabel.text = f"{stage}: {message}" if message else stage
        slicer.app.processEvents()

    def _cancelRequestedCallback(self):
        slicer.app.processEvents()
        return self._cancelRequested

    def onCancelButton(self):
        self._cancelRequested = True
        self.ui.statusLabel.text = "Cancelling..."

    def _setRunning(self, running):
        self._running = running
        self.ui.cancelButton.enabled = running
        self._onParameterNodeModified()

    def onApplyButton(self):
        p = self._parameterNode
        if not p.outputTransform:
            p.outputTransform = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLTransformNode", f"{p.movingVolume.GetName()} to {p.fixedVolume.GetName()}")
        self._cancelRequested = False
        self._setRunning(True)
        try:
            with slicer.util.tryWithErrorDisplay("Registration failed.", waitCursor=True):
                try:
                    result = self.logic.run(
                        p.fixedVolume, p.movingVolume,
                        fixedSegmentation=p.fixedSegmentation, movingSegmentation=p.movingSegmentation,
                        prealign=p.prealignMethod, engine=p.engine, stages=self._stages(),
                        samplingPercentage=p.samplingPercentage or None, iterations=p.iterations or None,
                        cropMarginMm=p.cropMarginMm, spacingScale=p.spacingScale, isotropic=p.isotropic,
                        fallback=p.fallback, keepTemporaryFiles=p.keepTemporaryFiles,
                        perStructure=p.perStructure, structureSegmentation=p.structureSegmentation,
                        outputTransformNode=p.outputTransform, outputVolumeNode=p.outputVolume,
                        outputTableNode=run_steps.reusable_table_node(self._lastResult, p.fixedVolume,
                                                                      p.movingVolume),
                        progressCallback=self._progress, cancelRequested=self._cancelRequestedCallback)
                except Cancelled:
                    self.ui.statusLabel.text = "Cancelled: the scene is as it was before Apply."
                    return
                self._lastResult = result
                self.showResults(result)
                self.onShow("after")
        finally:
            self._setRunning(False)

    def showResults(self, result):
        warnings = "; ".join(result.warnings)
        self.ui.statusLabel.text = f"Done. Verdict: {result.verdict}." + (f" Warnings: {warnings}" if warnings else "")
        diagnostics = result.report.get("diagnostics")
        if diagnostics:  # the run's own diagnostics also know the overlap after pre-alignment
            self._diagnostics.show_run(self.ui.diagnosticsTextEdit, diagnostics)
        self.showQualityCheck(result)
        self._setResultButtonsEnabled(True)
        structure_nodes.fill_selector(self.ui.showMovingUnderComboBox, result)

    def onShowMovingUnder(self, index):
        """The per-structure selector: the moving volume under the global or one structure's transform."""
        if self._lastResult is not None and index >= 0:
            structure_nodes.show_choice(self._lastResult, self._parameterNode.movingVolume, index)

    # -- quality check section (result_panel: verdict line, metrics table, thumbnails, report buttons)
    def clearQualityCheck(self):
        result_panel.clear_quality_check(self.ui, self._pictureButtons)

    def showQualityCheck(self, result):
        result_panel.show_quality_check(self.ui, result, self._pictureButtons)

    def onOpenReport(self):
        if self._lastResult is not None and self._lastResult.reportHtmlPath:
            result_panel.open_local_file(self._lastResult.reportHtmlPath)

    def onOpenReportFolder(self):
        if self._lastResult is not None and self._lastResult.reportDirectory:
            result_panel.open_local_file(self._lastResult.reportDirectory)

    def onShowTemporaryFolder(self):
        folder = self._lastResult.temporaryDirectory if self._lastResult is not None else None
        result_panel.open_local_file(folder or self.logic.temporaryRootDirectory())

    def onCopyReproduce(self):
        slicer.app.clipboard().setText(self.ui.reproduceTextEdit.toPlainText())

    def _setResultButtonsEnabled(self, enabled):
        for button in (self.ui.showBeforeButton, self.ui.showAfterButton, self.ui.showCheckerboardButton):
            button.enabled = enabled

    def onShow(self, what):
        p = self._parameterNode
        if self._lastResult is None or not p.fixedVolume or not p.movingVolume:
            return
        with slicer.util.tryWithErrorDisplay("Cannot show the result.", waitCursor=True):
            self.logic.showInSliceViews(p.fixedVolume, p.movingVolume, self._lastResult.outputTransformNode, what)

    def onSegment(self, which):
        p = self._parameterNode
        volume = p.fixedVolume if which == "fixed" else p.movingVolume
        if volume is None:
            return
        self._setRunning(True)
        # TotalSegmentator's Slicer API has no cancel: say so instead of offering a Cancel that does nothing.
        self.ui.cancelButton.enabled = False
        self.ui.cancelButton.toolTip = totalsegmentator.NOT_CANCELLABLE
        try:
            with slicer.util.tryWithErrorDisplay("TotalSegmentator failed.", waitCursor=True):
                self._segmentLog = totalsegmentator.PanelLog(self.ui.statusLabel, self.ui.progressBar,
                                                             slicer.app.processEvents)
                self._segmentLog(f"Segmenting {volume.GetName()} with TotalSegmentator "
                                 f"({totalsegmentator.NOT_CANCELLABLE.lower()})...")
                segmentation = self.logic.segmentWithTotalSegmentator(volume, logCallback=self._segmentLog)
                setattr(p, f"{which}Segmentation", segmentation)  # fixedSegmentation or movingSegmentation
                self.ui.statusLabel.text = f"Segmented {volume.GetName()} ({segmentation.GetName()})."
        finally:
            self._segmentLog = None
            self.ui.cancelButton.toolTip = "Stop at the next check point."
            self.ui.progressBar.setRange(0, 100)
            self._setRunning(False)


#
# Logic
#


class MultimodalPrealignLogic(ScriptedLoadableModuleLogic):
    """Usable from the Python console without the widget::

        logic = slicer.util.getModuleLogic("MultimodalPrealign")
        result = logic.run(fixedVolumeNode, movingVolumeNode, engine="brainsfit", stages=["rigid", "affine"])
        print(result.verdict, result.verdictReasons, result.reportHtmlPath)
        print(result.report["reproduce"]["slicer_python"])  # the code that reproduces this run
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        node = super().getParameterNode()
        if node.GetParameter("engine") == "core":  # scenes saved before the engines took the command line's names
            node.SetParameter("engine", "itk")
        return MultimodalPrealignParameterNode(node)

    def slicerServices(self, tempDir, keepTemporaryFiles=False):
        """The Slicer objects the BRAINSFit/SlicerElastix path calls (``engine_run.SlicerServices``)."""
        services = engine_run.slicer_services(tempDir)
        services.keep_temporary_files = bool(keepTemporaryFiles)
        return services

    def run(self, fixedVolumeNode, movingVolumeNode, fixedSegmentation=None, movingSegmentation=None,
            prealign="auto", engine="brainsfit", stages=("rigid", "affine"), samplingPercentage=None,
            iterations=None, cropMarginMm=20.0, spacingScale=1.0, isotropic=True, seed=0, fallback=True,
            keepTemporaryFiles=False, outputTransformNode=None, outputVolumeNode=None, outputTableNode=None,
            reportDirectory=None, writeReport=True, progressCallback=None, cancelRequested=None, perStructure=(),
            structureStages=("rigid",), structureThreshold=None, structureSegmentation=None):
        """Register ``movingVolumeNode`` to ``fixedVolumeNode``; returns a :class:`MultimodalPrealignResult`.

        engine: the command line's names: 'itk' (the built-in SimpleITK engine, no extension needed), 'elastix'
        (SlicerElastix; the built-in itk-elastix when that extension is not installed), 'brainsfit' (Slicer's
        General Registration (BRAINS)). fallback: on a FAIL verdict retry from the pre-alignment's next candidate
        (and with 'itk', the other engine). keepTemporaryFiles: keep the run's working folder (BRAINSFit's /
        elastix's inputs, parameter files and logs); its path is ``result.temporaryDirectory``.
        A re-run starts from the UNTRANSFORMED moving volume and replaces the result in the output transform
        (without ``outputTransformNode``: the previous run's, when the moving volume still sits under it).
        Quality check: the metrics table goes into ``outputTableNode`` (a vtkMRMLTableNode, created when
        None); the pictures, report.html and report.json go into ``reportDirectory`` (default: a new folder
        under Slicer's temporary folder; it may hold only a previous run's outputs). ``writeReport=False``
        computes the verdict and the table only and writes no files.
        Per-structure (docs/per_structure.md): ``perStructure`` ('femur, tibia' or 'all') registers each structure of
        ``structureSegmentation`` (default ``fixedSegmentation``; segment names) or, with ``structureThreshold``, each
        automatic bone, on its own after the global run (``structureStages``, rigid by default): one transform node per
        structure in a subject hierarchy folder (``result.structureTransformNodes``), report.json ``structures``.
        Raises ValueError (InputError) with the cause and the fix for bad input, ``Cancelled`` when
        ``cancelRequested()`` turned True (the scene is then as before the call).
        """
        python_requirements.ensure_python_requirements(need_elastix=engine_run.needs_itk_elastix(engine, fallback))
        from MultimodalPrealignLib import pipeline
        from MultimodalPrealignLib.progress import Progress

        settings = {name: value for name, value in locals().items() if name in RUN_SETTINGS}
        outputTransformNode = outputTransformNode or run_steps.previous_result_node(movingVolumeNode)
        run_steps.check_inputs(fixedVolumeNode, movingVolumeNode, engine, outputTransformNode,
                               reportDirectory if writeReport else None)
        options = pipeline.PipelineOptions.create(
            prealign=prealign, engine=engine, stages=tuple(stages), sampling_percentage=samplingPercentage,
            iterations=iterations, seed=seed, crop_margin_mm=cropMarginMm, spacing_scale=spacingScale,
            isotropic=isotropic, fallback=fallback).validate()
        structureNames = structure_nodes.check_request(perStructure, structureStages, structureThreshold,
                                                       structureSegmentation or fixedSegmentation)
        progress = Progress(progressCallback, cancelRequested)
        progress.report("load", 0.0, "reading volumes")
        tempDir = tempfile.mkdtemp(prefix="MultimodalPrealign-", dir=self.temporaryRootDirectory())
        try:
            with run_steps.moving_nodes_untransformed(movingVolumeNode, movingSegmentation, outputTransformNode):
                inputs = run_steps.read_inputs(fixedVolumeNode, movingVolumeNode, fixedSegmentation,
                                               movingSegmentation, options)
                result = self._register(inputs, options, engine, progress, tempDir, keepTemporaryFiles)
                structure_nodes.set_options(options, structureNames, structureStages, structureThreshold)
                if structureNames:
                    structure_nodes.run_structures(inputs, result, structureNames, options,
                                                   structureSegmentation or fixedSegmentation, movingSegmentation,
                                                   progress)
                progress.check_cancelled()  # the last point where a cancel leaves the scene untouched
                outputTransformNode = run_steps.place_result(inputs, result.transform, outputTransformNode,
                                                             outputVolumeNode, tempDir)
                structureNodes = structure_nodes.place_structure_nodes(slicer.mrmlScene, inputs, result.structures,
                                                                       tempDir) if structureNames else {}
        finally:
            if not keepTemporaryFiles:
                shutil.rmtree(tempDir, ignore_errors=True)
        result.report.setdefault("slicer", {}).update({"output_transform_node": outputTransformNode.GetID(),
                                                       "fixed_volume_node": fixedVolumeNode.GetID(),
                                                       "moving_volume_node": movingVolumeNode.GetID(),
                                                       "temporary_directory": tempDir if keepTemporaryFiles else None})
        run_steps.record_reproduction(result.report, inputs, options, settings, self.run)
        # The result is in place now: the quality check runs to its end (no cancellation point).
        outputs = run_steps.check_quality(inputs, result, outputTableNode, reportDirectory, self.reportRootDirectory,
                                          writeReport, progressCallback or (lambda stage, fraction, message: None))
        runResult = MultimodalPrealignResult(outputTransformNode, result.report, list(result.warnings),
                                             result.transform, outputVolumeNode, tableNode=outputs["table_node"],
                                             reportDirectory=outputs["directory"], reportHtmlPath=outputs["html"],
                                             pictures=outputs["pictures"],
                                             temporaryDirectory=tempDir if keepTemporaryFiles else None)
        runResult.structureTransformNodes = structureNodes  # {structure name: transform node} (per-structure)
        return runResult

    def _register(self, inputs, options, engine, progress, tempDir, keepTemporaryFiles=False):
        """The core's pipeline with its own engines ('itk', or 'elastix' without SlicerElastix), or with
        CropVolume + Slicer's BRAINSFit / SlicerElastix."""
        from MultimodalPrealignLib import pipeline

        services = self.slicerServices(tempDir, keepTemporaryFiles) if engine != "itk" else None
        if not engine_run.runs_in_slicer_tools(engine, services):
            result = pipeline.run_pipeline(inputs.fixed, inputs.moving, options, inputs.fixed_labels,
                                           inputs.moving_labels, progress)
            if engine == "elastix":
                result.report["registration"]["tool"] = "itk-elastix (the SlicerElastix extension is not installed)"
            return result
        run = engine_run.SlicerToolsRun(services, engine, inputs.fixed_node, inputs.moving_node)
        return engine_run.run_pipeline_with_slicer_tools(inputs.fixed, inputs.moving, options, run,
                                                         inputs.fixed_labels, inputs.moving_labels, progress)

    def temporaryRootDirectory(self):
        """Where each run's working folder is made (and kept with keepTemporaryFiles): Slicer's temporary folder."""
        root = os.path.join(slicer.app.temporaryPath, "MultimodalPrealign")
        os.makedirs(root, exist_ok=True)
        return root

    def reportRootDirectory(self):
        """Where per-run report folders go by default: Slicer's temporary folder."""
        return slicer.app.temporaryPath

    def pairDiagnostics(self, fixedVolumeNode, movingVolumeNode):
        """``diagnose.diagnose_pair`` of two volume nodes with the headers trusted (no pre-alignment): ~1 s."""
        return pair_diagnostics.pair_diagnostics(fixedVolumeNode, movingVolumeNode)

    def segmentWithTotalSegmentator(self, volumeNode, fast=False, cpu=False, logCallback=None):
        """Run TotalSegmentator (task 'total' for CT, 'total_mr' for MR) non-interactively; returns the segmentation.

        ``logCallback(text)`` receives its log lines (the panel shows them and keeps the GUI alive); it cannot be
        cancelled once started (its Slicer API has no cancel)."""
        return totalsegmentator.segment_volume(volumeNode, fast=fast, cpu=cpu, log=logCallback)

    def showInSliceViews(self, fixedVolumeNode, movingVolumeNode, transformNode, what="after"):
        """'before'/'after': fusion (moving over fixed, 50%) without/with the result transform;
        'checkerboard': a checkerboard of fixed and registered moving (normalised intensities)."""
        return views.show_in_slice_views(fixedVolumeNode, movingVolumeNode, transformNode, what)

    def checkerboardVolume(self, fixedVolumeNode, movingVolumeNode, transformNode, squares=8):
        return views.checkerboard_volume(fixedVolumeNode, movingVolumeNode, transformNode, squares)


#
# Test
#


class MultimodalPrealignTest(ScriptedLoadableModuleTest):
    """Full workflow inside Slicer: synthetic CT/MR phantom pair with a known transform."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        for test in (self.test_console_api_core_engine, self.test_brainsfit_engine,
                     self.test_bad_input_raises_value_error, self.test_widget_parameter_node):
            self.setUp()
            test()

    def _pair(self):
        return self_test.add_phantom_pair(slicer.mrmlScene)

    def _checkAccuracy(self, pair, result, movingNode, limitMm=3.0):
        gridErrorMm, placedErrorMm = self_test.placement_errors_mm(pair, result.transform, result.outputTransformNode)
        self.assertLess(gridErrorMm, limitMm)
        # Through Slicer: the moving voxel that shows a fixed point appears at that point (RAS).
        self.assertEqual(movingNode.GetParentTransformNode().GetID(), result.outputTransformNode.GetID())
        self.assertLess(placedErrorMm, limitMm + 1.0)

    def test_console_api_core_engine(self):
        self.delayDisplay("Built-in itk engine through the console API")
        pair, fixed, moving = self._pair()
        result = MultimodalPrealignLogic().run(fixed, moving, engine="itk", prealign="moments", stages=["rigid"])
        self.assertIn("metrics", result.report)
        self._checkAccuracy(pair, result, moving)
        self.assertIn(result.verdict, ("PASS", "WARN", "FAIL"))
        self.assertGreater(result.tableNode.GetNumberOfRows(), 3)
        self.assertTrue(os.path.isfile(result.reportHtmlPath))
        self.assertTrue(result.pictures and all(os.path.isfile(path) for path in result.pictures.values()))
        self.delayDisplay("Built-in itk engine passed")

    def test_brainsfit_engine(self):
        self.delayDisplay("CropVolume + BRAINSFit")
        pair, fixed, moving = self._pair()
        output = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "registered MR")
        result = MultimodalPrealignLogic().run(fixed, moving, engine="brainsfit", prealign="moments",
                                               stages=["rigid", "affine"], outputVolumeNode=output)
        self.assertEqual(result.report["registration"]["engine"], "brainsfit")
        self.assertIsNotNone(output.GetImageData())
        self._checkAccuracy(pair, result, moving)
        self.delayDisplay("BRAINSFit engine passed")

    def test_bad_input_raises_value_error(self):
        pair, fixed, moving = self._pair()
        with self.assertRaises(ValueError):
            MultimodalPrealignLogic().run(fixed, fixed)
        with self.assertRaises(ValueError):
            MultimodalPrealignLogic().run(fixed, moving, engine="ants")
        userTransform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "user")
        fixed.SetAndObserveTransformNodeID(userTransform.GetID())
        with self.assertRaises(ValueError):
            MultimodalPrealignLogic().run(fixed, moving, engine="itk")

    def test_widget_parameter_node(self):
        pair, fixed, moving = self._pair()
        slicer.util.selectModule("MultimodalPrealign")
        widget = slicer.util.getModuleWidget("MultimodalPrealign")
        widget._parameterNode.fixedVolume = fixed
        widget._parameterNode.movingVolume = moving
        self.assertTrue(widget.ui.applyButton.enabled)
        self.assertIn("Pair diagnostics", widget.ui.diagnosticsTextEdit.toPlainText())
        result = MultimodalPrealignLogic().run(fixed, moving, engine="itk", prealign="moments", stages=["rigid"])
        widget._lastResult = result
        widget.showResults(result)
        self.assertIn(result.verdict, widget.ui.verdictLabel.text)
        self.assertEqual(widget.ui.qualityTableView.mrmlTableNode().GetID(), result.tableNode.GetID())
        self.assertEqual(len(widget._pictureButtons), len(result.pictures))
        self.delayDisplay("Widget test passed")
