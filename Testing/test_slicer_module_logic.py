"""MultimodalPrealignLogic (the module's console API) run against the real slicer-core scene.

The module file is imported over Slicer's own ``slicer.parameterNodeWrapper`` and ``slicer.ScriptedLoadableModule``
(Slicer 5.8.1, vendored in ../shared/vendor); only the application's Qt/CTK part and ``slicer.app`` are stood in
for (slicer_app_stand_ins). Everything MRML is the real wheel, and the core runs for real. BRAINSFit and
CropVolume's interpolated crop are the doubles from test_slicer_tools.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed")

from slicer_app_stand_ins import ModulePanelStandIn, load_module

from MultimodalPrealignLib.geometry import (
    image_space,
    transforms,
)
from MultimodalPrealignLib.slicer import (
    engine_run,
    mrml_bridge,
    pair_diagnostics,
    quality_check,
    result_panel,
    run_steps,
    totalsegmentator,
)
from MultimodalPrealignLib.synthetic import phantoms

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def module(monkeypatch, tmp_path):
    """MultimodalPrealign.py imported over Slicer's own parameterNodeWrapper and ScriptedLoadableModule, with a
    fresh real scene as ``slicer.mrmlScene`` (slicer_app_stand_ins; only the application's Qt part stood in for)."""
    mod = load_module(monkeypatch, tmp_path)
    yield mod
    slicer.mrmlScene.Clear(1)


@pytest.fixture(scope="module")
def pair():
    return phantoms.make_pair(seed=2, fixed_spacing=(5.0, 5.0, 5.0), moving_spacing=(5.0, 5.0, 6.0),
                              rotation_deg=8.0, translation_mm=12.0, labels=True)


def add_pair(pair):
    fixed = mrml_bridge.add_volume_from_sitk(slicer.mrmlScene, pair.fixed, "CT")
    moving = mrml_bridge.add_volume_from_sitk(slicer.mrmlScene, pair.moving, "MR")
    return fixed, moving


def check_result(pair, result, moving_node, limit_mm=2.5):
    error = transforms.mean_point_error(result.transform, pair.fixed_to_moving, image_space.grid_points(pair.fixed, 6))
    assert error < limit_mm, f"mean error {error:.2f} mm"
    assert moving_node.GetParentTransformNode().GetID() == result.outputTransformNode.GetID()
    p = np.asarray(pair.fixed.TransformContinuousIndexToPhysicalPoint([s / 2 for s in pair.fixed.GetSize()]))
    q = np.asarray(pair.fixed_to_moving.TransformPoint(p.tolist()))
    world = mrml_bridge.transform_ras_point(result.outputTransformNode, q * [-1, -1, 1])
    assert np.linalg.norm(world - p * [-1, -1, 1]) < limit_mm + 1.0


def table_cells(table_node) -> list:
    return [[table_node.GetCellText(r, c) for c in range(table_node.GetNumberOfColumns())]
            for r in range(table_node.GetNumberOfRows())]


def check_quality_outputs(result, report_dir: Path) -> None:
    """Verdict set, table node = tables.metrics_table, every picture and report.html/json in the run's folder."""
    from MultimodalPrealignLib.qa import tables

    assert result.verdict in ("PASS", "WARN", "FAIL")
    assert result.verdict == result.report["verdict"] and result.verdictReasons
    columns, rows = tables.metrics_table(result.report)
    table = result.tableNode
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == list(columns)
    assert table_cells(table) == rows
    assert rows[0] == ["Verdict", "", "", result.verdict]
    assert table.GetLocked() and table.GetAttribute("MultimodalPrealign.Verdict") == result.verdict
    assert Path(result.reportDirectory) == report_dir.resolve()
    assert Path(result.reportHtmlPath) == report_dir.resolve() / "report.html"
    assert result.verdict in Path(result.reportHtmlPath).read_text(encoding="utf-8")
    saved = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
    assert saved["verdict"] == result.verdict and saved["pictures"] == result.report["pictures"]
    assert saved["slicer"]["table_node"] == table.GetID()
    assert set(result.pictures) == set(result.report["pictures"]) >= {"fusion_before", "fusion_after",
                                                                      "checkerboard_after", "edges_after"}
    for path in result.pictures.values():
        assert Path(path).is_absolute() and Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in report_dir.parent.iterdir() if ".partial-" in p.name]  # staging folder removed


def test_console_run_with_core_engine(module, pair, tmp_path):
    fixed, moving = add_pair(pair)
    output = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "resampled")
    seen = []
    result = module.MultimodalPrealignLogic().run(
        fixed, moving, engine="itk", prealign="moments", stages=["rigid"], iterations=200,
        outputVolumeNode=output, progressCallback=lambda stage, fraction, message: seen.append(stage))
    check_result(pair, result, moving)
    assert result.report["registration"]["engine"] == "itk"
    assert result.report["slicer"]["output_transform_node"] == result.outputTransformNode.GetID()
    assert result.report["slicer"]["table_node"] == result.tableNode.GetID()
    assert {"prealign", "crop", "done", "report"} <= set(seen)
    resampled = mrml_bridge.volume_node_to_sitk(output)
    assert resampled.GetSize() == pair.fixed.GetSize()
    # Default report folder: a new per-run folder under Slicer's temporary path, named after the pair.
    report_dir = Path(result.reportDirectory)
    assert report_dir.parent == (tmp_path / "slicer-temp" / "MultimodalPrealign").resolve()
    assert report_dir.name.endswith("_MR_to_CT")
    check_quality_outputs(result, report_dir)
    assert result.tableNode.GetName() == "MR to CT quality check"
    # Running again on the moving volume that now sits under our own output transform is allowed; the table
    # node and a given report folder holding only our outputs are reused (rows replaced, not appended).
    again = module.MultimodalPrealignLogic().run(fixed, moving, engine="itk", prealign="moments", stages=["rigid"],
                                                 iterations=200, outputTransformNode=result.outputTransformNode,
                                                 outputTableNode=result.tableNode, reportDirectory=report_dir)
    assert again.outputTransformNode.GetID() == result.outputTransformNode.GetID()
    assert again.tableNode.GetID() == result.tableNode.GetID()
    check_quality_outputs(again, report_dir)
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1


def test_console_run_with_brainsfit_engine(module, pair, monkeypatch, tmp_path):
    """The REAL BRAINSFit through a stand-in for Slicer's CLI machinery (slicer_cli_double), CropVolume stood in."""
    from brainsfit_helpers import brainsfit_executable
    from slicer_cli_double import SlicerCLIDouble
    from test_slicer_tools import FakeCropVolumeLogic

    fixed, moving = add_pair(pair)
    cli = SlicerCLIDouble(slicer.mrmlScene, brainsfit_executable(), work_dir=tmp_path / "cli")

    def services(self, temp_dir, keep_temporary_files=False):
        return engine_run.SlicerServices(scene=slicer.mrmlScene, crop_logic=FakeCropVolumeLogic(), temp_dir=temp_dir,
                                         run_cli=cli.run, brainsfit_module=cli.module,
                                         process_events=cli.process_events,
                                         keep_temporary_files=keep_temporary_files)

    monkeypatch.setattr(module.MultimodalPrealignLogic, "slicerServices", services)
    result = module.MultimodalPrealignLogic().run(fixed, moving, engine="brainsfit", prealign="moments",
                                                  stages=["rigid"], iterations=200, samplingPercentage=0.05,
                                                  writeReport=False)
    check_result(pair, result, moving)
    assert result.report["registration"]["engine"] == "brainsfit"
    arguments = cli.runs[0].args
    # the override, raised only where the working grid is too small for enough samples (as the itk engine does)
    assert float(arguments[arguments.index("--samplingPercentage") + 1]) >= 0.05
    # writeReport=False: verdict and table node only, no files anywhere.
    from MultimodalPrealignLib.qa import tables

    assert result.verdict in ("PASS", "WARN", "FAIL")
    assert table_cells(result.tableNode) == tables.metrics_table(result.report)[1]
    assert (result.reportDirectory, result.reportHtmlPath, result.pictures) == (None, None, {})
    root = Path(slicer.app.temporaryPath) / "MultimodalPrealign"  # the run's working folder is gone too
    assert not root.exists() or not any(root.iterdir())


def test_console_run_rejects_bad_input_with_value_error(module, pair):
    fixed, moving = add_pair(pair)
    logic = module.MultimodalPrealignLogic()
    with pytest.raises(ValueError, match="same node.*Fix:"):
        logic.run(fixed, fixed)
    with pytest.raises(ValueError, match="Unknown engine 'ants'"):
        logic.run(fixed, moving, engine="ants")
    with pytest.raises(ValueError, match="Unknown stage"):
        logic.run(fixed, moving, engine="itk", stages=["warp"])
    user = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "user")
    fixed.SetAndObserveTransformNodeID(user.GetID())
    with pytest.raises(ValueError, match="Harden"):
        logic.run(fixed, moving, engine="itk")


def segmentation_from_labels(labels: sitk.Image, volume_node, task: str, names: list):
    """A segmentation node whose segment IDs are TotalSegmentator class names (as SlicerTotalSegmentator makes)."""
    from test_mrml_bridge import add_segment

    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{task} segmentation")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    ids = totalsegmentator.class_ids_for_task(task)
    array = sitk.GetArrayViewFromImage(labels)
    for name in names:
        mask = (array == ids[name]).astype(np.uint8)
        if mask.any():
            add_segment(node, labels, name, name.replace("_", " ").title(), mask)
    return node


def test_segmentations_become_task_label_maps(module, pair):
    fixed, moving = add_pair(pair)
    names = ["liver", "spleen", "kidney_left", "kidney_right", "aorta"]
    fixed_seg = segmentation_from_labels(pair.fixed_labels, fixed, "total", names + ["lung_upper_lobe_left"])
    moving_seg = segmentation_from_labels(pair.moving_labels, moving, "total_mr", names + ["lung_left"])
    from MultimodalPrealignLib.pipeline import PipelineOptions

    options = PipelineOptions()
    fixed_labels = run_steps.segmentation_labels(fixed_seg, fixed, options, "fixed")
    moving_labels = run_steps.segmentation_labels(moving_seg, moving, options, "moving")
    assert (options.fixed_labels_task, options.moving_labels_task) == ("total", "total_mr")
    for labels, truth, task in ((fixed_labels, pair.fixed_labels, "total"),
                                (moving_labels, pair.moving_labels, "total_mr")):
        ids = totalsegmentator.class_ids_for_task(task)
        got, want = sitk.GetArrayViewFromImage(labels), sitk.GetArrayViewFromImage(truth)
        for name in names:
            np.testing.assert_array_equal(got == ids[name], want == ids[name])


def test_report_folder_holding_other_files_is_refused_before_anything_is_written(module, pair, tmp_path):
    fixed, moving = add_pair(pair)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="already holds other files.*Fix:"):
        module.MultimodalPrealignLogic().run(fixed, moving, engine="itk", prealign="moments", stages=["rigid"],
                                             iterations=20, reportDirectory=folder)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert not [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_panel_diagnostics_text_from_nodes(module, pair):
    from MultimodalPrealignLib import diagnose

    fixed, moving = add_pair(pair)
    logic = module.MultimodalPrealignLogic()
    text = pair_diagnostics.diagnostics_text(fixed, moving, logic.pairDiagnostics)
    expected = diagnose.format_diagnostics(diagnose.diagnose_pair(pair.fixed, pair.moving, None, "header"))
    assert text.startswith("Pair diagnostics (physical LPS mm")
    assert text.splitlines()[:12] == expected.splitlines()[:12]  # same table as `multimodal-prealign diagnose`
    assert "68 x 48 x 108" in text and "Advice:" in text
    # A volume without voxels: the header-only lines, and the reason the full diagnostics are missing.
    empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    text = pair_diagnostics.diagnostics_text(fixed, empty, logic.pairDiagnostics)
    assert text.startswith("Full diagnostics unavailable:")
    assert "Fixed 'CT': 68 x 48 x 108 voxels" in text


def test_diagnostics_key_changes_with_the_pair_and_the_voxels(module, pair):
    fixed, moving = add_pair(pair)
    key = pair_diagnostics.diagnostics_key(fixed, moving)
    assert pair_diagnostics.diagnostics_key(fixed, moving) == key
    assert pair_diagnostics.diagnostics_key(moving, fixed) != key
    fixed.GetImageData().Modified()
    assert pair_diagnostics.diagnostics_key(fixed, moving) != key


# ----------------------------------------------------------------------------- the panel's Quality check section

class FakeQtNamespace:
    """Stand-in for ``qt.Qt`` (enum values only)."""

    KeepAspectRatio, SmoothTransformation, ToolButtonTextUnderIcon, WaitCursor = range(4)


class FakeSize:
    def __init__(self, width, height):
        self.w, self.h = width, height

    def width(self):
        return self.w

    def height(self):
        return self.h


class FakeQPixmap:
    """Stand-in for ``qt.QPixmap``: reads the PNG's size with Pillow; ``scaled`` keeps the aspect ratio."""

    def __init__(self, path=None, size=None):
        self.path = path
        if size is None and path is not None and Path(path).is_file():
            from PIL import Image

            with Image.open(path) as image:
                size = image.size
        self._size = size

    def isNull(self):
        return self._size is None

    def size(self):
        return FakeSize(*self._size)

    def scaled(self, width, height, aspect_mode, transform_mode):
        assert aspect_mode == FakeQtNamespace.KeepAspectRatio
        factor = min(width / self._size[0], height / self._size[1])
        return FakeQPixmap(self.path, (round(self._size[0] * factor), round(self._size[1] * factor)))


class FakeQToolButton:
    """Stand-in for ``qt.QToolButton`` (PythonQt style: properties as attributes, ``connect(signal, slot)``)."""

    def __init__(self):
        self.text, self.toolTip, self.icon, self.iconSize = "", "", None, None
        self.parent, self.deleted = "layout", False
        self.slots = {}

    def setIcon(self, icon):
        self.icon = icon

    def setIconSize(self, size):
        self.iconSize = size

    def setToolButtonStyle(self, style):
        assert style == FakeQtNamespace.ToolButtonTextUnderIcon

    def setAutoRaise(self, on):
        pass

    def connect(self, signal, slot):
        self.slots[signal] = slot

    def click(self):
        self.slots["clicked()"]()

    def setParent(self, parent):
        self.parent = parent

    def deleteLater(self):
        self.deleted = True


class FakeQDesktopServices:
    opened: list = []

    @classmethod
    def openUrl(cls, url):
        cls.opened.append(url)
        return True


class FakeQUrl:
    @staticmethod
    def fromLocalFile(path):
        return f"file://{path}"


class FakeQApplication:
    @staticmethod
    def setOverrideCursor(cursor):
        pass

    @staticmethod
    def restoreOverrideCursor():
        pass


class FakeGridLayout:
    def __init__(self):
        self.cells = {}

    def addWidget(self, widget, row, column):
        self.cells[(row, column)] = widget

    def removeWidget(self, widget):
        self.cells = {k: v for k, v in self.cells.items() if v is not widget}


class FakePanel:
    """Stand-in for the widgets of MultimodalPrealign.ui the Quality check and diagnostics code touch."""

    class Widget:
        def __init__(self, **attributes):
            self.__dict__.update(attributes)

    def __init__(self):
        grid = FakeGridLayout()
        self.verdictLabel = self.Widget(text="")
        self.picturesHintLabel = self.Widget(text="")
        self.statusLabel = self.Widget(text="")
        self.openReportButton = self.Widget(enabled=True)
        self.openReportFolderButton = self.Widget(enabled=True)
        self.qualityCollapsibleButton = self.Widget(collapsed=True)
        self.picturesWidget = self.Widget(layout=lambda: grid)
        self.shown_table = "unset"
        self.qualityTableView = self.Widget(setMRMLTableNode=lambda node: setattr(self, "shown_table", node),
                                            resizeColumnsToContents=lambda: None)
        self.diagnostics_text = ""
        self.diagnosticsTextEdit = self.Widget(setPlainText=lambda text: setattr(self, "diagnostics_text", text),
                                               toPlainText=lambda: self.diagnostics_text)
        for name in ("showBeforeButton", "showAfterButton", "showCheckerboardButton", "copyReproduceButton"):
            setattr(self, name, self.Widget(enabled=False))
        self.reproduce_text = ""
        self.showMovingUnderComboBox = self.Widget(clear=lambda: None, addItem=lambda *a: None, enabled=False,
                                                   blockSignals=lambda value: None)
        self.reproduceTextEdit = self.Widget(setPlainText=lambda text: setattr(self, "reproduce_text", text),
                                             toPlainText=lambda: self.reproduce_text)


@pytest.fixture()
def panel(module, monkeypatch):
    """The module's widget with FakePanel as its ``ui`` and the Qt classes it uses replaced by named doubles."""
    for name, fake in (("Qt", FakeQtNamespace), ("QPixmap", FakeQPixmap), ("QIcon", lambda pixmap: ("icon", pixmap)),
                       ("QToolButton", FakeQToolButton), ("QDesktopServices", FakeQDesktopServices),
                       ("QUrl", FakeQUrl), ("QApplication", FakeQApplication)):
        monkeypatch.setattr(sys.modules["qt"], name, fake, raising=False)  # the stand-in ``qt`` of ``module``
    monkeypatch.setattr(slicer.app, "processEvents", lambda: None, raising=False)
    FakeQDesktopServices.opened = []
    # As Slicer does: the widget gets the module panel as parent (with no parent, Slicer's base class would make a
    # Qt widget and run setup(), which loads the .ui).
    widget = module.MultimodalPrealignWidget(ModulePanelStandIn())
    widget.ui = FakePanel()
    widget.logic = module.MultimodalPrealignLogic()
    return widget


def quick_result(module, pair, tmp_path, fallback_note=False):
    """A MultimodalPrealignResult with real QA outputs (identity 'registration'; no engine run, ~1 s)."""
    from MultimodalPrealignLib import diagnose
    from MultimodalPrealignLib.qa import measure

    fixed_node, moving_node = add_pair(pair)
    report = {"metrics": measure.evaluate(pair.fixed, pair.moving, transforms.identity(), pair.fixed_to_moving,
                                     working_spacing_mm=5.0, probes=False),
              "diagnostics": diagnose.diagnose_pair(pair.fixed, pair.moving, pair.fixed_to_moving, "given"),
              "verdict_reasons": ["NOTE: automatic fallback: attempt 2 was used"] if fallback_note else [],
              "slicer": {"fixed_volume_node": fixed_node.GetID(), "moving_volume_node": moving_node.GetID()}}
    from MultimodalPrealignLib.pipeline import reproduce

    reproduce.record(report, None, reproduce.slicer_python("CT", "MR", {"engine": "itk"}, {"engine": "brainsfit"}))
    outputs = quality_check.write_quality_check(report, tmp_path / "run", pair.fixed, pair.moving,
                                                transforms.identity(), pair.fixed_to_moving)
    table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "quality")
    quality_check.fill_quality_table(table, report)
    result = module.MultimodalPrealignResult(None, report, ["a warning"], pair.fixed_to_moving, tableNode=table,
                                             reportDirectory=outputs["directory"], reportHtmlPath=outputs["html"],
                                             pictures=outputs["pictures"])
    return result, fixed_node, moving_node


def test_panel_shows_verdict_table_thumbnails_and_opens_files(module, panel, pair, tmp_path):
    result, fixed_node, moving_node = quick_result(module, pair, tmp_path, fallback_note=True)
    panel.clearQualityCheck()
    assert panel.ui.shown_table is None and not panel.ui.openReportButton.enabled
    assert panel.ui.verdictLabel.text.startswith("Apply to see the verdict")

    panel._lastResult = result
    panel.showResults(result)
    ui = panel.ui
    assert ui.statusLabel.text == f"Done. Verdict: {result.verdict}. Warnings: a warning"
    assert f">{result.verdict}</b>" in ui.verdictLabel.text
    assert "NOTE: automatic fallback: attempt 2 was used" in ui.verdictLabel.text
    assert ui.shown_table is result.tableNode and not ui.qualityCollapsibleButton.collapsed
    assert ui.diagnostics_text.startswith("Pair diagnostics") and "given" in ui.diagnostics_text
    # One thumbnail per picture: row = kind, column 0 = before, 1 = after; at most THUMBNAIL_PIXELS wide/high.
    cells = ui.picturesWidget.layout().cells
    assert len(cells) == len(result.pictures) == len(panel._pictureButtons)
    texts = {button.text for button in cells.values()}
    assert "Fusion: after" in texts and len([t for t in texts if t.startswith("Fusion:")]) >= 2
    assert all(column in (0, 1, 2) for _, column in cells)  # before, after, as the headers place them
    for button in cells.values():
        size = button.iconSize
        assert max(size.width(), size.height()) == result_panel.THUMBNAIL_PIXELS
    fusion_after = next(b for b in cells.values() if b.text == "Fusion: after")
    fusion_after.click()
    assert FakeQDesktopServices.opened[-1] == f"file://{result.pictures['fusion_after']}"
    assert ui.openReportButton.enabled and ui.openReportFolderButton.enabled
    # The code behind the run: the console code (and the command line when the volumes came from files).
    assert ui.reproduce_text.startswith("# Python console") and "logic.run(fixed, moving" in ui.reproduce_text
    assert ui.reproduce_text == result_panel.reproduce_text(result.reproduce) and ui.copyReproduceButton.enabled
    panel.onOpenReport()
    panel.onOpenReportFolder()
    assert FakeQDesktopServices.opened[-2:] == [f"file://{result.reportHtmlPath}", f"file://{result.reportDirectory}"]
    # The same pair reuses the table node on the next Apply; another pair gets a new one.
    assert run_steps.reusable_table_node(panel._lastResult, fixed_node, moving_node) is result.tableNode
    assert run_steps.reusable_table_node(panel._lastResult, moving_node, fixed_node) is None
    # A new result replaces the thumbnails (old buttons removed and deleted); clearing empties the section.
    old_buttons = list(panel._pictureButtons)
    panel.showQualityCheck(result)
    assert all(b.deleted and b.parent is None for b in old_buttons)
    assert len(ui.picturesWidget.layout().cells) == len(result.pictures)
    panel.clearQualityCheck()
    assert ui.picturesWidget.layout().cells == {} and ui.shown_table is None
    assert ui.reproduce_text == "" and not ui.copyReproduceButton.enabled


def test_panel_diagnostics_appear_once_per_pair(module, panel, pair, monkeypatch):
    fixed_node, moving_node = add_pair(pair)
    calls = []
    real = panel.logic.pairDiagnostics
    monkeypatch.setattr(panel.logic, "pairDiagnostics", lambda f, m: calls.append((f, m)) or real(f, m))
    panel._updateDiagnostics(fixed_node, moving_node, True)
    assert panel.ui.diagnostics_text.startswith("Pair diagnostics") and len(calls) == 1
    panel._updateDiagnostics(fixed_node, moving_node, True)  # e.g. another parameter changed: no recomputation
    assert len(calls) == 1
    panel._updateDiagnostics(None, None, False)
    assert panel.ui.diagnostics_text.startswith("Select two different volumes")
    panel._updateDiagnostics(fixed_node, moving_node, True)
    assert len(calls) == 2 and panel.ui.diagnostics_text.startswith("Pair diagnostics")
