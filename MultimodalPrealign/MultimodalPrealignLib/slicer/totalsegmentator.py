"""The TotalSegmentator extension: its availability, its run, its class names, and its segmentations as label maps.

``TotalSegmentatorLogic.process`` is called non-interactively with the signature of the installed version (checked
against lassoan/SlicerTotalSegmentator TotalSegmentator/TotalSegmentator.py); the run takes the logic as
argument, so tests pass named doubles instead. Segmentations become UInt16 label maps holding the task's class
ids, on their volume's grid (``mrml_bridge.labelmap_from_segmentation``).
"""

from __future__ import annotations

import inspect
import subprocess
from typing import Callable

import SimpleITK as sitk

from ..errors import InputError, RegistrationError
from ..resource_files import load_resource_json
from . import mrml_bridge

#: What the panel says while TotalSegmentator runs (its Slicer logic has no cancel: ``process`` waits for its process).
NOT_CANCELLABLE = "TotalSegmentator cannot be cancelled once started (its Slicer module offers no cancel)"

TOTALSEGMENTATOR_INSTALL_HINT = ("Install the TotalSegmentator extension (View > Extensions Manager > search "
                                 "'TotalSegmentator'), restart Slicer, then segment with the buttons here")


def totalsegmentator_available() -> bool:
    """True when the TotalSegmentator extension is installed in this Slicer."""
    import slicer

    return hasattr(slicer.modules, "totalsegmentator")


def show_segment_buttons(ui) -> None:
    """The panel's 'Segment' buttons when the extension is installed, else the hint how to install it."""
    available = totalsegmentator_available()
    ui.segmentFixedButton.visible = available
    ui.segmentMovingButton.visible = available
    ui.totalSegmentatorHintLabel.visible = not available
    ui.totalSegmentatorHintLabel.text = TOTALSEGMENTATOR_INSTALL_HINT + "."


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
    tasks = load_resource_json("totalsegmentator_classes.json")["tasks"]
    if task not in tasks:
        raise InputError(f"Unknown TotalSegmentator task '{task}'", "use total (CT) or total_mr (MR)")
    return {name: int(class_id) for class_id, name in tasks[task].items()}


def best_task_for_segment_names(names) -> str | None:
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


class PanelLog:
    """TotalSegmentator's ``logCallback`` for the panel: each log line goes to the status label, a percentage in it
    (nnU-Net's progress bars) to the progress bar (else the bar shows 'busy'), and events are processed so the
    panel stays alive. ``process_events``: ``slicer.app.processEvents``."""

    def __init__(self, status_label, progress_bar, process_events):
        self.status_label, self.progress_bar, self.process_events = status_label, progress_bar, process_events
        self.lines: list = []
        progress_bar.setRange(0, 0)  # busy until a percentage is seen

    def __call__(self, text: str) -> None:
        import re

        text = str(text).strip()
        if text:
            self.lines.append(text)
            self.status_label.text = text[:200]
            percent = re.findall(r"(\d{1,3})%", text)
            if percent and int(percent[-1]) <= 100:
                self.progress_bar.setRange(0, 100)
                self.progress_bar.setValue(int(percent[-1]))
        self.process_events()


def segment_volume(volume_node, fast: bool = False, cpu: bool = False, log=None):
    """Run TotalSegmentator (task 'total' for CT, 'total_mr' for MR) non-interactively; returns the new segmentation.

    ``log(text)``: receives TotalSegmentator's log lines (``TotalSegmentatorLogic.logCallback``). It cannot be
    cancelled (:data:`NOT_CANCELLABLE`)."""
    import slicer

    if not totalsegmentator_available():
        raise InputError("The TotalSegmentator extension is not installed", TOTALSEGMENTATOR_INSTALL_HINT)
    from TotalSegmentator import TotalSegmentatorLogic

    from ..io import modality  # needs scipy: imported once the module has checked the Python requirements

    array = slicer.util.arrayFromVolume(volume_node)[::4, ::4, ::4]
    task = modality.totalsegmentator_task(modality.ct_or_mr(sitk.GetImageFromArray(array.copy())))
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                      f"{volume_node.GetName()} TotalSegmentator {task}")
    logic = TotalSegmentatorLogic()
    if log is not None:
        logic.logCallback = log
    logic.setupPythonRequirements()
    run_totalsegmentator(logic, volume_node, segmentation, task, fast=fast, cpu=cpu)
    return segmentation


def labels_from_segmentation(segmentation_node, volume_node, which: str):
    """(label map with the class ids of the best-matching task, on ``volume_node``'s grid; that task).

    ``which``: 'fixed' or 'moving', for the message when no segment is a TotalSegmentator class.
    """
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    names = ids + [segmentation.GetSegment(i).GetName() for i in ids]
    task = best_task_for_segment_names(names)
    if task is None:
        raise InputError(f"The {which} segmentation '{segmentation_node.GetName()}' holds no TotalSegmentator classes",
                         "segment with TotalSegmentator (buttons in the Inputs section) or clear the selection")
    labels, _info = mrml_bridge.labelmap_from_segmentation(segmentation_node, volume_node, class_ids_for_task(task))
    return labels, task
