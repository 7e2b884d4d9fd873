"""3D Slicer module "Multimodal Prealign": pre-align, crop and register CT/MR pairs that differ a lot.

Thin layer over the headless core (MultimodalPrealignLib): it converts MRML nodes, calls the core and
Slicer's own tools (CropVolume, BRAINSFit, SlicerElastix, TotalSegmentator), and shows the results.
Parameter-node annotations are read at runtime by ``parameterNodeWrapper``: no
``from __future__ import annotations`` here, and ``typing.Optional`` instead of ``X | None``
(Slicer 5.8 runs Python 3.9).
"""

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import qt
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

from MultimodalPrealignLib.slicer import (
    mrml_bridge,  # noqa: E402
    tools,  # noqa: E402
)

DOCS_URL = "https://github.com/MultimodalPrealign/SlicerMultimodalPrealign/blob/main/docs/user_guide.md"
PREALIGN_METHODS = ["auto", "search", "anatomy", "moments", "geometry", "header", "none"]
ENGINES = list(tools.SLICER_ENGINES)  # brainsfit, elastix, core
CORE_ENGINES = ["itk", "elastix"]
#: The embedded demo pair (scripts/make_demo_data.py: MRI-DIR porcine phantom, CC BY 4.0, downsampled).
DEMO_FILES = {"MultimodalPrealignDemoCT": "ct_demo.nrrd", "MultimodalPrealignDemoMR": "mr_demo.nrrd"}


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
<li>Apply: pre-alignment, crop to the overlap (CropVolume), registration (BRAINSFit, SlicerElastix or the
built-in engine). The moving volume is placed under the output transform.</li>
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
    """Register the demo pair (CT fixed + T2 MR moving of the MRI-DIR porcine phantom) with Sample Data."""
    import SampleData

    demo_dir = os.path.join(_MODULE_DIR, "MultimodalPrealignLib", "data", "demo")
    icon = os.path.join(_MODULE_DIR, "Resources", "Icons", "MultimodalPrealign.png")
    for node_name, file_name in DEMO_FILES.items():
        path = os.path.join(demo_dir, file_name)
        if not os.path.exists(path):
            continue
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="Multimodal Prealign",
            sampleName=node_name,
            thumbnailFileName=icon,
            uris=qt.QUrl.fromLocalFile(path).toString(),
            fileNames=file_name,
            nodeNames=node_name,
        )


#: Python packages the core needs beyond Slicer's bundled numpy/SimpleITK (import name -> pip name).
PYTHON_REQUIREMENTS = {"scipy": "scipy", "pydicom": "pydicom"}


def ensurePythonRequirements(needElastix=False):
    """Install the core's missing Python packages into Slicer's Python (once, with the user's consent in the GUI)."""
    import importlib

    wanted = dict(PYTHON_REQUIREMENTS)
    if needElastix:
        wanted["itk"] = "itk-elastix"
    missing = []
    for module, package in wanted.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if not missing:
        return
    if slicer.app.commandOptions().noMainWindow or slicer.util.confirmOkCancelDisplay(
            "Multimodal Prealign needs these Python packages: " + ", ".join(missing) + ". Install them now?"):
        slicer.util.pip_install(missing)
    else:
        from MultimodalPrealignLib.errors import InputError

        raise InputError("Python packages " + ", ".join(missing) + " are missing",
                         "accept the installation, or run slicer.util.pip_install(" + repr(missing) + ")")


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
    stageRigid: bool = True
    stageAffine: bool = True
    stageBSpline: bool = False
    samplingPercentage: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    iterations: Annotated[int, WithinRange(0, 100000)] = 0
    outputTransform: Optional[vtkMRMLTransformNode]
    outputVolume: Optional[vtkMRMLScalarVolumeNode]


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
        self._diagnosticsKey = None
        self._diagnosticsText = ""
        self._pictureButtons = []

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

        available = totalSegmentatorAvailable()
        self.ui.segmentFixedButton.visible = available
        self.ui.segmentMovingButton.visible = available
        self.ui.totalSegmentatorHintLabel.visible = not available
        self.ui.totalSegmentatorHintLabel.text = tools.TOTALSEGMENTATOR_INSTALL_HINT + "."
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
        self._diagnosticsKey = None
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
        if not ready:
            self._diagnosticsKey = None
            self.ui.diagnosticsTextEdit.setPlainText("Select two different volumes to see the pair's diagnostics.")
            return
        key = diagnosticsKey(fixedVolume, movingVolume)
        if key != self._diagnosticsKey:
            self._diagnosticsKey = key
            self.ui.diagnosticsTextEdit.setPlainText("Diagnosing the pair...")
            slicer.app.processEvents()
            with slicer.util.WaitCursor():
                self._diagnosticsText = diagnosticsText(fixedVolume, movingVolume, self.logic)
        if self.ui.diagnosticsTextEdit.toPlainText() != self._diagnosticsText:
            self.ui.diagnosticsTextEdit.setPlainText(self._diagnosticsText)

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
                result = self.logic.run(
                    p.fixedVolume, p.movingVolume,
                    fixedSegmentation=p.fixedSegmentation, movingSegmentation=p.movingSegmentation,
                    prealign=p.prealignMethod, engine=p.engine, stages=self._stages(),
                    samplingPercentage=p.samplingPercentage or None, iterations=p.iterations or None,
                    cropMarginMm=p.cropMarginMm, spacingScale=p.spacingScale, isotropic=p.isotropic,
                    outputTransformNode=p.outputTransform, outputVolumeNode=p.outputVolume,
                    outputTableNode=self._reusableTableNode(p.fixedVolume, p.movingVolume),
                    progressCallback=self._progress, cancelRequested=self._cancelRequestedCallback)
                self._lastResult = result
                self.showResults(result)
                self.onShow("after")
        finally:
            self._setRunning(False)

    def _reusableTableNode(self, fixedVolume, movingVolume):
        """The previous run's table node when it was made for the same pair and is still in the scene."""
        last = self._lastResult
        if last is None or last.tableNode is None or last.tableNode.GetScene() is None:
            return None
        slicerInfo = last.report.get("slicer") or {}
        samePair = (slicerInfo.get("fixed_volume_node"), slicerInfo.get("moving_volume_node")) == (
            fixedVolume.GetID(), movingVolume.GetID())
        return last.tableNode if samePair else None

    def showResults(self, result):
        warnings = "; ".join(result.warnings)
        self.ui.statusLabel.text = f"Done. Verdict: {result.verdict}." + (f" Warnings: {warnings}" if warnings else "")
        diagnostics = result.report.get("diagnostics")
        if diagnostics:  # the run's own diagnostics also know the overlap after pre-alignment
            self._diagnosticsText = formatDiagnostics(diagnostics)
            self.ui.diagnosticsTextEdit.setPlainText(self._diagnosticsText)
        self.showQualityCheck(result)
        self._setResultButtonsEnabled(True)

    # -- quality check section
    def clearQualityCheck(self):
        self.ui.verdictLabel.text = "Apply to see the verdict, the metrics table and the pictures."
        self.ui.qualityTableView.setMRMLTableNode(None)
        self._clearPictures()
        self.ui.picturesHintLabel.text = ""
        self.ui.openReportButton.enabled = False
        self.ui.openReportFolderButton.enabled = False

    def _clearPictures(self):
        layout = self.ui.picturesWidget.layout()
        for button in self._pictureButtons:
            layout.removeWidget(button)
            button.setParent(None)
            button.deleteLater()
        self._pictureButtons = []

    def showQualityCheck(self, result):
        """Verdict line, the metrics table node, one thumbnail per picture (click: full size), report buttons."""
        self.ui.verdictLabel.text = tools.verdict_rich_text(result.verdict, result.verdictReasons)
        self.ui.qualityTableView.setMRMLTableNode(result.tableNode)
        self.ui.qualityTableView.resizeColumnsToContents()
        self._clearPictures()
        layout = self.ui.picturesWidget.layout()
        base = result.reportDirectory or ""
        for entry in tools.picture_entries(result.pictures, base):
            button = pictureThumbnailButton(entry["path"], entry["title"], entry["tooltip"])
            layout.addWidget(button, entry["row"], entry["column"])
            self._pictureButtons.append(button)
        self.ui.picturesHintLabel.text = ("Pictures (click one to open it full size):" if self._pictureButtons else
                                          "No pictures were written for this run.")
        self.ui.openReportButton.enabled = bool(result.reportHtmlPath)
        self.ui.openReportFolderButton.enabled = bool(result.reportDirectory)
        self.ui.qualityCollapsibleButton.collapsed = False

    def onOpenReport(self):
        if self._lastResult is not None and self._lastResult.reportHtmlPath:
            openLocalFile(self._lastResult.reportHtmlPath)

    def onOpenReportFolder(self):
        if self._lastResult is not None and self._lastResult.reportDirectory:
            openLocalFile(self._lastResult.reportDirectory)

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
        try:
            with slicer.util.tryWithErrorDisplay("TotalSegmentator failed.", waitCursor=True):
                self.ui.statusLabel.text = f"Segmenting {volume.GetName()} with TotalSegmentator..."
                slicer.app.processEvents()
                segmentation = self.logic.segmentWithTotalSegmentator(volume)
                if which == "fixed":
                    p.fixedSegmentation = segmentation
                else:
                    p.movingSegmentation = segmentation
                self.ui.statusLabel.text = f"Segmented {volume.GetName()} ({segmentation.GetName()})."
        finally:
            self._setRunning(False)


def totalSegmentatorAvailable():
    return hasattr(slicer.modules, "totalsegmentator")


def diagnosticsKey(fixedVolume, movingVolume):
    """Identifies a pair and the state of its voxels, so the diagnostics are not recomputed needlessly."""
    def state(node):
        image = node.GetImageData()
        return node.GetID(), image.GetMTime() if image is not None else 0, str(node.GetSpacing())

    return state(fixedVolume), state(movingVolume)


def formatDiagnostics(diagnosticsDict):
    from MultimodalPrealignLib import diagnose

    return diagnose.format_diagnostics(diagnosticsDict)


def diagnosticsText(fixedVolume, movingVolume, logic=None):
    """The pair's diagnostics (``diagnose.format_diagnostics``, headers trusted) shown when both are selected.

    Falls back to header-only lines when the voxels cannot be diagnosed (e.g. a volume without image data).
    """
    try:
        return formatDiagnostics((logic or MultimodalPrealignLogic()).pairDiagnostics(fixedVolume, movingVolume))
    except Exception as err:
        logging.info("MultimodalPrealign: full pair diagnostics unavailable: %s", err)
        lines = [f"Full diagnostics unavailable: {err}"]
    try:
        lines += tools.diagnostics_lines(mrml_bridge.pair_header_summary(fixedVolume, movingVolume))
    except Exception as err:  # a volume without image data yet
        lines.append(f"Header summary unavailable: {err}")
    return "\n".join(lines)


def openLocalFile(path):
    """Open a file or folder with the desktop's default application (browser for .html, viewer for .png)."""
    qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(path)))


def pictureThumbnailButton(path, title, toolTip):
    """A flat button showing the picture scaled to a thumbnail; clicking opens the full-size PNG."""
    button = qt.QToolButton()
    pixmap = qt.QPixmap(str(path))
    size = tools.THUMBNAIL_PIXELS
    if not pixmap.isNull():
        pixmap = pixmap.scaled(size, size, qt.Qt.KeepAspectRatio, qt.Qt.SmoothTransformation)
        button.setIcon(qt.QIcon(pixmap))
        button.setIconSize(pixmap.size())
    button.setToolButtonStyle(qt.Qt.ToolButtonTextUnderIcon)
    button.setAutoRaise(True)
    button.text = title
    button.toolTip = toolTip
    button.connect("clicked()", lambda: openLocalFile(path))
    return button


#
# Logic
#


class MultimodalPrealignResult:
    """What ``MultimodalPrealignLogic.run`` returns.

    outputTransformNode: the transform node the ORIGINAL moving volume is placed under (fixed->moving
    resampling transform, pre-alignment and registration composed). report: same content as the CLI's
    report.json. warnings: list of strings. transform: the SimpleITK transform (fixed->moving, LPS).
    Quality check: verdict ('PASS', 'WARN' or 'FAIL') and verdictReasons (list of sentences); tableNode (a
    vtkMRMLTableNode with the rows of ``qa.metrics_table``); reportDirectory, reportHtmlPath and pictures
    ({name: absolute PNG path}), all None/empty when the run was asked not to write a report.
    """

    def __init__(self, outputTransformNode, report, warnings, transform, outputVolumeNode=None, tableNode=None,
                 reportDirectory=None, reportHtmlPath=None, pictures=None):
        self.outputTransformNode = outputTransformNode
        self.report = report
        self.warnings = warnings
        self.transform = transform
        self.outputVolumeNode = outputVolumeNode
        self.tableNode = tableNode
        self.reportDirectory = reportDirectory
        self.reportHtmlPath = reportHtmlPath
        self.pictures = dict(pictures or {})
        self.verdict = report.get("verdict")
        self.verdictReasons = list(report.get("verdict_reasons") or [])


class MultimodalPrealignLogic(ScriptedLoadableModuleLogic):
    """Usable from the Python console without the widget::

        logic = slicer.util.getModuleLogic("MultimodalPrealign")
        result = logic.run(fixedVolumeNode, movingVolumeNode, engine="brainsfit", stages=["rigid", "affine"])
        print(result.verdict, result.verdictReasons, result.reportHtmlPath)
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return MultimodalPrealignParameterNode(super().getParameterNode())

    # -- services (the Slicer objects the adapters call)
    def slicerServices(self, tempDir):
        brainsfit = getattr(slicer.modules, "brainsfit", None)
        elastixLogic = None
        try:
            from Elastix import ElastixLogic

            elastixLogic = ElastixLogic()
        except ImportError:
            pass
        return tools.SlicerServices(
            scene=slicer.mrmlScene, crop_logic=slicer.modules.cropvolume.logic(), temp_dir=tempDir,
            run_sync=slicer.cli.runSync, brainsfit_module=brainsfit, elastix_logic=elastixLogic)

    def run(self, fixedVolumeNode, movingVolumeNode, fixedSegmentation=None, movingSegmentation=None,
            prealign="auto", engine="brainsfit", coreEngine="itk", stages=("rigid", "affine"),
            samplingPercentage=None, iterations=None, cropMarginMm=20.0, spacingScale=1.0, isotropic=True,
            seed=0, outputTransformNode=None, outputVolumeNode=None, outputTableNode=None, reportDirectory=None,
            writeReport=True, progressCallback=None, cancelRequested=None):
        """Register ``movingVolumeNode`` to ``fixedVolumeNode``; returns a :class:`MultimodalPrealignResult`.

        engine: 'brainsfit' (Slicer's BRAINSFit), 'elastix' (SlicerElastix) or 'core' (the built-in
        SimpleITK/itk-elastix engines, ``coreEngine`` 'itk' or 'elastix'; works without extensions).
        Quality check: the metrics table goes into ``outputTableNode`` (a vtkMRMLTableNode, created when
        None); the pictures, report.html and report.json go into ``reportDirectory`` (default: a new folder
        under Slicer's temporary folder; it may hold only a previous run's outputs). ``writeReport=False``
        computes the verdict and the table only and writes no files.
        Raises ValueError (InputError) with the cause and the fix for bad input.
        """
        ensurePythonRequirements(needElastix=(engine == "core" and coreEngine == "elastix"))
        from MultimodalPrealignLib import pipeline
        from MultimodalPrealignLib.errors import InputError
        from MultimodalPrealignLib.progress import Progress

        if fixedVolumeNode is None or movingVolumeNode is None:
            raise InputError("Fixed and moving volumes are required", "select both volumes")
        if fixedVolumeNode == movingVolumeNode:
            raise InputError("The fixed and moving volumes are the same node", "select two different volumes")
        if engine not in ENGINES:
            raise InputError(f"Unknown engine '{engine}'", "use " + ", ".join(ENGINES))
        mrml_bridge.check_not_transformed(fixedVolumeNode, "fixed volume")
        mrml_bridge.check_not_transformed(movingVolumeNode, "moving volume", allowed_transform_node=outputTransformNode)
        if writeReport and reportDirectory is not None:  # refuse a folder of someone else's files before the run
            pipeline.check_output_dir(Path(reportDirectory).resolve())
        options = pipeline.PipelineOptions.create(
            prealign=prealign, engine=coreEngine if engine == "core" else "itk", stages=tuple(stages),
            sampling_percentage=samplingPercentage, iterations=iterations, seed=seed, crop_margin_mm=cropMarginMm,
            spacing_scale=spacingScale, isotropic=isotropic).validate()
        progress = Progress(progressCallback, cancelRequested)
        progress.report("load", 0.0, "reading volumes")
        fixed = mrml_bridge.volume_node_to_sitk(fixedVolumeNode, "fixed volume")
        moving = mrml_bridge.volume_node_to_sitk(movingVolumeNode, "moving volume")
        fixedLabels = self._labels(fixedSegmentation, fixedVolumeNode, options, "fixed")
        movingLabels = self._labels(movingSegmentation, movingVolumeNode, options, "moving")

        tempDir = tempfile.mkdtemp(prefix="MultimodalPrealign-")
        try:
            if engine == "core":
                result = pipeline.run_pipeline(fixed, moving, options, fixedLabels, movingLabels, progress)
            else:
                run = tools.SlicerToolsRun(self.slicerServices(tempDir), engine, fixedVolumeNode, movingVolumeNode)
                result = tools.run_pipeline_with_slicer_tools(fixed, moving, options, run, fixedLabels,
                                                                     movingLabels, progress)
            if outputTransformNode is None:
                outputTransformNode = slicer.mrmlScene.AddNewNodeByClass(
                    "vtkMRMLTransformNode", f"{movingVolumeNode.GetName()} to {fixedVolumeNode.GetName()}")
            mrml_bridge.set_transform_node_from_sitk(outputTransformNode, result.transform, tempDir)
            outputTransformNode.SetAttribute("MultimodalPrealign.Convention", "fixed->moving resampling (from parent)")
            mrml_bridge.apply_to_volume(movingVolumeNode, outputTransformNode)
            if outputVolumeNode is not None:
                resampled = pipeline.resample_moving(fixed, moving, result.transform)
                mrml_bridge.update_volume_node_from_sitk(outputVolumeNode, resampled)
                outputVolumeNode.CreateDefaultDisplayNodes()
        finally:
            import shutil

            shutil.rmtree(tempDir, ignore_errors=True)
        report = result.report
        report.setdefault("slicer", {}).update({"output_transform_node": outputTransformNode.GetID(),
                                                "fixed_volume_node": fixedVolumeNode.GetID(),
                                                "moving_volume_node": movingVolumeNode.GetID()})
        # The result is in place now: the quality check runs to its end (no cancellation point).
        announce = progressCallback or (lambda stage, fraction, message: None)
        announce("report", 0.96, "quality check: verdict, pictures and report.html")
        if outputTableNode is None:
            outputTableNode = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLTableNode", f"{movingVolumeNode.GetName()} to {fixedVolumeNode.GetName()} quality check")
        report["slicer"]["table_node"] = outputTableNode.GetID()
        if writeReport and reportDirectory is None:
            reportDirectory = tools.new_report_directory(
                self.reportRootDirectory(), movingVolumeNode.GetName(), fixedVolumeNode.GetName())
        outputs = tools.write_quality_check(
            report, reportDirectory, fixed, moving, result.initial or result.prealign.transform, result.transform,
            fixedLabels, movingLabels, result.structure_pairs, write_pictures=writeReport)
        tools.fill_quality_table(outputTableNode, report)
        outputTableNode.SetAttribute("MultimodalPrealign.ReportDirectory", outputs["directory"] or "")
        announce("report", 1.0, f"verdict {report.get('verdict')}"
                 + (f"; report in {outputs['directory']}" if outputs["directory"] else ""))
        logging.info("MultimodalPrealign finished: verdict %s, report %s", report.get("verdict"), outputs["html"])
        return MultimodalPrealignResult(outputTransformNode, report, list(result.warnings), result.transform,
                                        outputVolumeNode, tableNode=outputTableNode,
                                        reportDirectory=outputs["directory"], reportHtmlPath=outputs["html"],
                                        pictures=outputs["pictures"])

    def reportRootDirectory(self):
        """Where per-run report folders go by default: Slicer's temporary folder."""
        return slicer.app.temporaryPath

    def pairDiagnostics(self, fixedVolumeNode, movingVolumeNode):
        """``diagnose.diagnose_pair`` of two volume nodes with the headers trusted (no pre-alignment): ~1 s."""
        from MultimodalPrealignLib import diagnose

        fixed = mrml_bridge.volume_node_to_sitk(fixedVolumeNode, "fixed volume")
        moving = mrml_bridge.volume_node_to_sitk(movingVolumeNode, "moving volume")
        return diagnose.diagnose_pair(fixed, moving, None, "header")

    def _labels(self, segmentationNode, volumeNode, options, which):
        """Label map (TotalSegmentator class ids) of a segmentation on its volume's grid, and its task."""
        if segmentationNode is None:
            return None
        segmentation = segmentationNode.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        names = ids + [segmentation.GetSegment(i).GetName() for i in ids]
        task = tools.best_task_for_segment_names(names)
        if task is None:
            from MultimodalPrealignLib.errors import InputError

            raise InputError(f"The {which} segmentation '{segmentationNode.GetName()}' holds no TotalSegmentator classes",
                             "segment with TotalSegmentator (buttons in the Inputs section) or clear the selection")
        labels, _info = mrml_bridge.labelmap_from_segmentation(segmentationNode, volumeNode,
                                                               tools.class_ids_for_task(task))
        if which == "fixed":
            options.fixed_labels_task = task
        else:
            options.moving_labels_task = task
        return labels

    def segmentWithTotalSegmentator(self, volumeNode, fast=False, cpu=False):
        """Run TotalSegmentator (task 'total' for CT, 'total_mr' for MR) non-interactively; returns the segmentation."""
        if not totalSegmentatorAvailable():
            from MultimodalPrealignLib.errors import InputError

            raise InputError("The TotalSegmentator extension is not installed", tools.TOTALSEGMENTATOR_INSTALL_HINT)
        from TotalSegmentator import TotalSegmentatorLogic

        array = slicer.util.arrayFromVolume(volumeNode)[::4, ::4, ::4]
        import SimpleITK as sitk

        from MultimodalPrealignLib.io import modality

        task = modality.totalsegmentator_task("CT" if modality.is_ct(sitk.GetImageFromArray(array.copy())) else "MR")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                          f"{volumeNode.GetName()} TotalSegmentator {task}")
        logic = TotalSegmentatorLogic()
        logic.setupPythonRequirements()
        tools.run_totalsegmentator(logic, volumeNode, segmentation, task, fast=fast, cpu=cpu)
        return segmentation

    def showInSliceViews(self, fixedVolumeNode, movingVolumeNode, transformNode, what="after"):
        """'before'/'after': fusion (moving over fixed, 50%) without/with the result transform;
        'checkerboard': a checkerboard of fixed and registered moving (normalised intensities)."""
        if what == "checkerboard":
            board = self.checkerboardVolume(fixedVolumeNode, movingVolumeNode, transformNode)
            slicer.util.setSliceViewerLayers(background=board, foreground=None, fit=True)
            return board
        mrml_bridge.apply_to_volume(movingVolumeNode, transformNode if what == "after" else None)
        slicer.util.setSliceViewerLayers(background=fixedVolumeNode, foreground=movingVolumeNode,
                                         foregroundOpacity=0.5, fit=True)
        return None

    def checkerboardVolume(self, fixedVolumeNode, movingVolumeNode, transformNode, squares=8):
        import numpy as np
        import SimpleITK as sitk

        from MultimodalPrealignLib import pipeline

        fixed = sitk.Cast(mrml_bridge.volume_node_to_sitk(fixedVolumeNode, "fixed volume"), sitk.sitkFloat32)
        moving = sitk.Cast(mrml_bridge.volume_node_to_sitk(movingVolumeNode, "moving volume"), sitk.sitkFloat32)
        transform = mrml_bridge.sitk_from_transform_node(transformNode)
        resampled = pipeline.resample_moving(fixed, moving, transform)

        def normalised(image):
            a = sitk.GetArrayFromImage(image)
            lo, hi = np.percentile(a[::4, ::4, ::4], [1, 99])
            out = sitk.GetImageFromArray(np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32))
            out.CopyInformation(image)
            return out

        board = sitk.CheckerBoard(normalised(fixed), normalised(resampled), [squares] * 3)
        name = f"{movingVolumeNode.GetName()} checkerboard (MultimodalPrealign)"
        node = slicer.mrmlScene.GetFirstNodeByName(name) or slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLScalarVolumeNode", name)
        mrml_bridge.update_volume_node_from_sitk(node, board)
        node.CreateDefaultDisplayNodes()
        return node


#
# Test
#


class MultimodalPrealignTest(ScriptedLoadableModuleTest):
    """Full workflow inside Slicer: synthetic CT/MR phantom pair with a known transform."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_console_api_core_engine()
        self.setUp()
        self.test_brainsfit_engine()
        self.setUp()
        self.test_bad_input_raises_value_error()
        self.setUp()
        self.test_widget_parameter_node()

    def _pair(self):
        from MultimodalPrealignLib.synthetic import phantoms

        pair = phantoms.make_pair(seed=3, fixed_spacing=(4.0, 4.0, 4.0), moving_spacing=(4.0, 4.0, 5.0),
                                  rotation_deg=10.0, translation_mm=15.0, labels=False)
        fixed = mrml_bridge.add_volume_from_sitk(slicer.mrmlScene, pair.fixed, "phantom CT")
        moving = mrml_bridge.add_volume_from_sitk(slicer.mrmlScene, pair.moving, "phantom MR")
        fixed.CreateDefaultDisplayNodes()
        moving.CreateDefaultDisplayNodes()
        return pair, fixed, moving

    def _checkAccuracy(self, pair, result, movingNode, limitMm=3.0):
        import numpy as np

        from MultimodalPrealignLib.geometry import image_space, transforms

        points = image_space.grid_points(pair.fixed, 6)
        error = transforms.mean_point_error(result.transform, pair.fixed_to_moving, points)
        self.assertLess(error, limitMm)
        # Through Slicer: the moving voxel that shows fixed point p appears at p (RAS).
        self.assertEqual(movingNode.GetParentTransformNode().GetID(), result.outputTransformNode.GetID())
        p = np.asarray(pair.fixed.TransformContinuousIndexToPhysicalPoint([s / 2 for s in pair.fixed.GetSize()]))
        q = np.asarray(pair.fixed_to_moving.TransformPoint(p.tolist()))
        world = mrml_bridge.transform_ras_point(result.outputTransformNode, q * [-1, -1, 1])
        self.assertLess(float(np.linalg.norm(world - p * [-1, -1, 1])), limitMm + 1.0)

    def test_console_api_core_engine(self):
        self.delayDisplay("Core engine through the console API")
        pair, fixed, moving = self._pair()
        result = MultimodalPrealignLogic().run(fixed, moving, engine="core", prealign="moments", stages=["rigid"])
        self.assertIn("metrics", result.report)
        self._checkAccuracy(pair, result, moving)
        self.assertIn(result.verdict, ("PASS", "WARN", "FAIL"))
        self.assertGreater(result.tableNode.GetNumberOfRows(), 3)
        self.assertTrue(os.path.isfile(result.reportHtmlPath))
        self.assertTrue(result.pictures and all(os.path.isfile(path) for path in result.pictures.values()))
        self.delayDisplay("Core engine passed")

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
            MultimodalPrealignLogic().run(fixed, moving, engine="core")

    def test_widget_parameter_node(self):
        pair, fixed, moving = self._pair()
        slicer.util.selectModule("MultimodalPrealign")
        widget = slicer.util.getModuleWidget("MultimodalPrealign")
        widget._parameterNode.fixedVolume = fixed
        widget._parameterNode.movingVolume = moving
        self.assertTrue(widget.ui.applyButton.enabled)
        self.assertIn("Pair diagnostics", widget.ui.diagnosticsTextEdit.toPlainText())
        result = MultimodalPrealignLogic().run(fixed, moving, engine="core", prealign="moments", stages=["rigid"])
        widget._lastResult = result
        widget.showResults(result)
        self.assertIn(result.verdict, widget.ui.verdictLabel.text)
        self.assertEqual(widget.ui.qualityTableView.mrmlTableNode().GetID(), result.tableNode.GetID())
        self.assertEqual(len(widget._pictureButtons), len(result.pictures))
        self.delayDisplay("Widget test passed")
