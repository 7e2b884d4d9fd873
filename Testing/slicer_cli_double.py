"""A stand-in for ``slicer.cli`` (Slicer's CLI machinery) that runs the REAL BRAINSFit executable.

The Slicer application's CLI machinery (``vtkSlicerCLIModuleLogic`` with its module description, threads and
main-thread queue) cannot run here; everything around it is real: the ``vtkMRMLScene`` and its nodes (the
slicer-core wheel), the CLI node (a real ``vtkMRMLCommandLineModuleNode`` added to the scene, as
``slicer.cli.run`` does; its Python subclass only adds what the missing module description would give:
progress, and status updates from the running process), Slicer's storage nodes for the transform files, and the
BRAINSFit program itself. :meth:`SlicerCLIDouble.run` does what Slicer's CLI logic does for an executable CLI
module:

1. every parameter that is an MRML node (or a node ID of the scene) whose BRAINSFit.xml type is ``image`` or
   ``transform`` becomes a file in the run's folder: input volumes and label maps are written as NRRD, input
   transforms by Slicer's own ``vtkMRMLTransformStorageNode`` (.h5); outputs get a file name;
2. BRAINSFit starts asynchronously (``subprocess.Popen``) with the command line of the project's ONE parameter
   builder (``engines.brainsfit_parameters.command_line``), stdout / stderr to files;
3. the returned CLI node reports Running; when the process has ended it reports Completing until the GUI
   processes events (:meth:`SlicerCLIDouble.process_events`, the stand-in for ``slicer.app.processEvents``),
   which reads the output files back into the output nodes (transforms through Slicer's storage node, volumes
   as NRRD) and sets Completed, or CompletedWithErrors for a non-zero exit (stdout in ``GetOutputText``, stderr in
   ``GetErrorText``), like Slicer's main-thread "read data" step;
4. ``Cancel()`` on the node kills BRAINSFit; the node then reports Cancelled (outputs untouched).

Progress (``GetProgress``, 0-100): BRAINSFit prints no progress tags, so the double derives it from the stage it
announces on stdout ("Rigid(1 of 2)"); 100 when completed.

Use (e.g. for ``engine_run.SlicerToolsRun`` or ``MultimodalPrealignLogic.run`` on real MRML nodes)::

    double = SlicerCLIDouble(scene, brainsfit_executable, work_dir=tmp_path / "cli")
    services = engine_run.SlicerServices(scene=scene, crop_logic=..., temp_dir=str(tmp_path),
                                         run_cli=double.run, brainsfit_module=double.module,
                                         process_events=double.process_events)

``double.runs`` lists every run (parameters as given, the command line as run, the node, its folder, the exit
code); ``double.events_processed`` counts ``process_events`` calls. Code that never processes events while
BRAINSFit runs would hang in real Slicer: here the node's ``GetStatus`` raises AssertionError instead, once the
process has been finished for ``stall_timeout_s`` without the outputs being read.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk
import slicer

from MultimodalPrealignLib.engines import brainsfit_parameters as bf
from MultimodalPrealignLib.slicer import mrml_bridge

#: BRAINSFit.xml tags whose parameters name files (Slicer passes nodes for them).
FILE_TAGS = ("image", "transform")


def brainsfit_xml_parameters(executable: str) -> dict:
    """{name: {"tag", "channel", "type", "flag", "default", "elements"}} from ``BRAINSFit --xml`` (the program's
    own description, the one Slicer reads to build its CLI module)."""
    done = subprocess.run([executable, "--xml"], capture_output=True, text=True, timeout=60, check=True)
    root = ElementTree.fromstring(done.stdout.strip())
    found = {}
    for group in root.iter("parameters"):
        for item in group:
            name = item.findtext("name")
            if not name:
                continue
            found[name] = {"tag": item.tag, "channel": (item.findtext("channel") or "").strip(),
                           "type": item.get("type"), "flag": item.findtext("longflag"),
                           "default": item.findtext("default"),
                           "elements": [e.text for e in item.findall("element")]}
    return found


class BRAINSFitModuleStandIn:
    """Stands in for ``slicer.modules.brainsfit`` (what ``slicer.cli.run`` receives as ``module``)."""

    name = "BRAINSFit"
    title = "General Registration (BRAINS)"


class BRAINSFitCLINode(slicer.vtkMRMLCommandLineModuleNode):
    """A real ``vtkMRMLCommandLineModuleNode`` (status values, SetStatus, Cancel, output/error text, scene
    membership are the wheel's) whose status follows the BRAINSFit process of its :class:`CliRun`."""

    def __init__(self):
        super().__init__()
        self.run_record = None

    def GetStatus(self):  # noqa: N802 - Slicer's method name
        if self.run_record is not None:
            self.run_record.double._poll(self.run_record)
        return super().GetStatus()

    def GetProgress(self):  # noqa: N802
        if self.run_record is None:
            return 0
        return int(self.run_record.progress)

    def Cancel(self):  # noqa: N802
        """Slicer's Cancel (status Cancelling when busy), then what the CLI logic does: kill the process."""
        super().Cancel()
        record = self.run_record
        if record is not None and record.process.poll() is None:
            record.cancel_requested = True
            record.process.kill()


@dataclass
class CliRun:
    """One run of the double: parameters as given, files, the command line as run, the process and its node."""

    double: SlicerCLIDouble
    node: BRAINSFitCLINode
    parameters: dict
    folder: Path
    args: list
    process: subprocess.Popen
    outputs: dict = field(default_factory=dict)  # parameter name -> (node, file path)
    delete_temporary_files: bool = True
    progress: float = 0.0
    finished_at: float | None = None
    cancel_requested: bool = False
    done: bool = False
    exit_code: int | None = None


class SlicerCLIDouble:
    """``slicer.cli.run`` for BRAINSFit in a real slicer-core scene, running the real executable.

    ``scene``: the ``vtkMRMLScene`` holding the nodes the parameters name; ``executable``: the BRAINSFit program;
    ``work_dir``: where each run gets a folder (default: a new temporary folder); ``stall_timeout_s``: how long a
    finished process may wait for :meth:`process_events` before ``GetStatus`` fails the test.
    """

    def __init__(self, scene, executable, work_dir=None, stall_timeout_s: float = 30.0):
        import tempfile

        self.scene = scene
        self.executable = str(executable)
        self.work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="slicer_cli_"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.stall_timeout_s = stall_timeout_s
        self.module = BRAINSFitModuleStandIn()
        self.xml = brainsfit_xml_parameters(self.executable)
        self.runs: list[CliRun] = []
        self.events_processed = 0

    # -------------------------------------------------------------------------------- slicer.cli.run
    def run(self, module, node=None, parameters=None, wait_for_completion=False, delete_temporary_files=True,
            update_display=True):
        """``slicer.cli.run``: a new CLI node in the scene, BRAINSFit started; returns the node at once (or after
        completion with ``wait_for_completion``, as ``runSync`` does, processing events meanwhile)."""
        assert module is self.module, "run() must get the BRAINSFit module (slicer.modules.brainsfit)"
        assert node is None, "MultimodalPrealign passes no existing CLI node"
        parameters = dict(parameters or {})
        unknown = set(parameters) - set(self.xml)
        assert not unknown, f"not BRAINSFit parameters: {sorted(unknown)}"
        folder = self.work_dir / f"run_{len(self.runs) + 1:02d}"
        folder.mkdir()
        cli_node = BRAINSFitCLINode()
        cli_node.SetName(self.module.title)
        self.scene.AddNode(cli_node)
        with_files, outputs = self._files_for_nodes(parameters, folder)
        args = bf.command_line([self.executable], with_files)
        out = open(folder / "stdout.txt", "wb")
        err = open(folder / "stderr.txt", "wb")
        try:
            process = subprocess.Popen(args, cwd=str(folder), stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        finally:
            out.close()
            err.close()
        record = CliRun(self, cli_node, parameters, folder, args, process, outputs,
                        delete_temporary_files=delete_temporary_files)
        self.runs.append(record)
        cli_node.run_record = record
        cli_node.SetStatus(cli_node.Running)
        if wait_for_completion:
            while cli_node.GetStatus() & cli_node.BusyMask:
                self.process_events()
                time.sleep(0.05)
        return cli_node

    def process_events(self) -> None:
        """``slicer.app.processEvents``: finish the runs whose process ended (read outputs, final status)."""
        self.events_processed += 1
        for record in self.runs:
            if not record.done:
                self._poll(record)
                if not record.done and record.process.poll() is not None:
                    self._finish(record)

    # -------------------------------------------------------------------------------- internals
    def _node(self, value):
        if isinstance(value, slicer.vtkMRMLNode):
            return value
        if isinstance(value, str) and value.startswith("vtkMRML"):
            return self.scene.GetNodeByID(value)
        return None

    def _files_for_nodes(self, parameters: dict, folder: Path) -> tuple[dict, dict]:
        """The parameters with every node replaced by a file in ``folder`` (inputs written), and the outputs."""
        with_files, outputs = {}, {}
        for name, value in parameters.items():
            spec = self.xml[name]
            if spec["tag"] not in FILE_TAGS:
                with_files[name] = value
                continue
            node = self._node(value)
            assert node is not None, f"{name}: {value!r} is no node of the scene"
            suffix = ".h5" if spec["tag"] == "transform" else ".nrrd"
            path = folder / f"{name}{suffix}"
            if spec["channel"] == "output":
                outputs[name] = (node, path)
            elif spec["tag"] == "transform":
                self._transform_file(node, path, "WriteData", f"Slicer could not write {node.GetName()}")
            else:
                sitk.WriteImage(mrml_bridge.volume_node_to_sitk(node, name), str(path))
            with_files[name] = path.name
        return with_files, outputs

    def _poll(self, record: CliRun) -> None:
        """Status from the process (as the CLI logic's thread sets it): Running -> Completing / Cancelled."""
        if record.done:
            return
        node = record.node
        text = (record.folder / "stdout.txt").read_text(errors="replace")
        announced = bf.stage_progress(text)
        if announced is not None:
            _name, k, n = announced
            record.progress = max(record.progress, 100.0 * (k - 1) / max(n, 1))
        if record.process.poll() is None:
            return
        if record.finished_at is None:
            record.finished_at = time.monotonic()
        status = super(BRAINSFitCLINode, node).GetStatus()
        if record.cancel_requested or status == node.Cancelling:
            self._finish(record)
            return
        if status == node.Running:
            node.SetStatus(node.Completing)
        elif status == node.Completing and time.monotonic() - record.finished_at > self.stall_timeout_s:
            raise AssertionError("BRAINSFit finished but the GUI never processed events (slicer.app.processEvents): "
                                 "in Slicer its outputs would never be read and the status never Completed")

    def _finish(self, record: CliRun) -> None:
        """Slicer's main-thread step after the process: read outputs, set texts and the final status."""
        node = record.node
        record.exit_code = record.process.wait()
        record.done = True
        node.SetOutputText((record.folder / "stdout.txt").read_text(errors="replace"))
        node.SetErrorText((record.folder / "stderr.txt").read_text(errors="replace"))
        if record.cancel_requested:
            node.SetStatus(node.Cancelled)
        elif record.exit_code != 0:
            node.SetStatus(node.CompletedWithErrors)
        else:
            for output_node, path in record.outputs.values():
                self._read_output(output_node, path)
            record.progress = 100.0
            node.SetStatus(node.Completed)
        if record.delete_temporary_files:
            shutil.rmtree(record.folder, ignore_errors=True)

    def _transform_file(self, node, path: Path, operation: str, failure: str) -> None:
        """Write (``WriteData``) or read (``ReadData``) a transform node's file with Slicer's own storage node."""
        storage = slicer.vtkMRMLTransformStorageNode()
        self.scene.AddNode(storage)
        storage.SetFileName(str(path))
        try:
            assert getattr(storage, operation)(node), failure
        finally:
            self.scene.RemoveNode(storage)

    def _read_output(self, node, path: Path) -> None:
        if not path.is_file():
            return
        if node.IsA("vtkMRMLTransformNode"):
            self._transform_file(node, path, "ReadData", f"Slicer could not read BRAINSFit's {path.name}")
        else:
            mrml_bridge.update_volume_node_from_sitk(node, sitk.ReadImage(str(path)))
