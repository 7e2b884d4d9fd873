"""A stand-in for the SlicerElastix extension's ``ElastixLogic`` (the extension cannot be installed here).

It keeps the contract of the real ``registerVolumes`` (lassoan/SlicerElastix Elastix/Elastix.py, read in
shared/vendor/slicer-5.8.1-python/reference/SlicerElastix_Elastix.py) that the module relies on:

- ``cancelRequested`` is reset to False when a run starts, checked after each line of the elastix process's
  output (after ``slicer.app.processEvents()``; the process is killed then), and reset again before returning;
  a cancelled run returns normally and logs "User requested cancel.";
- output lines go to ``logCallback`` only with ``logStandardOutput``; the working folder is named in the log
  ("Volume registration is started in working directory: ...") and deleted unless ``deleteTemporaryFiles`` is
  False;
- the output transform node receives the registration INCLUDING the initial transform node's transform.

The elastix process is a real child process printing lines (so cancel kills a real process); the registration
itself runs the core's SimpleITK engine on the nodes' voxels. ``wrong_first``: the first run returns the initial
transform shifted by 40 mm (an obviously wrong result, to make the verdict FAIL and the pipeline fall back).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile

import numpy as np
import SimpleITK as sitk

#: The stand-in elastix process: prints ``lines`` lines, ``delay_s`` apart.
ELASTIX_PROCESS = "import sys, time\nfor i in range({lines}):\n    print(f'iteration {{i}}', flush=True)\n" \
                  "    time.sleep({delay_s})\n"


class SlicerElastixStandIn:
    def __init__(self, scene, lines: int = 5, delay_s: float = 0.01, wrong_first: bool = False,
                 process_events=None):
        self.scene = scene
        self.lines, self.delay_s, self.wrong_first = lines, delay_s, wrong_first
        self.process_events = process_events or (lambda: None)
        self.isRunning = False
        self.cancelRequested = False
        self.deleteTemporaryFiles = True
        self.logStandardOutput = False
        self.logCallback = None
        self.calls: list = []
        self.processes: list = []

    def addLog(self, text):
        if self.logCallback:
            self.logCallback(text)

    def _log_process_output(self, process):
        output = ""
        while True:
            line = process.stdout.readline()
            if not line:
                break
            if self.logStandardOutput:
                self.addLog(line.rstrip())
            else:
                output += line
            self.process_events()
            if self.cancelRequested:
                process.kill()
                break
        process.stdout.close()
        code = process.wait()
        if code and not self.cancelRequested:
            raise subprocess.CalledProcessError(code, "elastix", output=output)

    def registerVolumes(self, fixedVolumeNode, movingVolumeNode, parameterFilenames=None, outputVolumeNode=None,
                        outputTransformNode=None, fixedVolumeMaskNode=None, movingVolumeMaskNode=None,
                        forceDisplacementFieldOutputTransform=True, initialTransformNode=None):
        from MultimodalPrealignLib.engines import RegistrationSettings
        from MultimodalPrealignLib.engines.itk_engine import register_itk
        from MultimodalPrealignLib.geometry import transforms
        from MultimodalPrealignLib.slicer import mrml_bridge

        self.isRunning = True
        temp_dir = tempfile.mkdtemp(prefix="elastix-stand-in-")
        self.calls.append({"files": list(parameterFilenames or []), "temp_dir": temp_dir,
                           "force_field": forceDisplacementFieldOutputTransform})
        try:
            self.cancelRequested = False
            self.addLog(f"Volume registration is started in working directory: {temp_dir}")
            process = subprocess.Popen(
                [sys.executable, "-c", ELASTIX_PROCESS.format(lines=self.lines, delay_s=self.delay_s)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
            self.processes.append(process)
            self._log_process_output(process)
            if self.cancelRequested:
                self.addLog("User requested cancel.")
                return
            fixed = sitk.Cast(mrml_bridge.volume_node_to_sitk(fixedVolumeNode), sitk.sitkFloat32)
            moving = sitk.Cast(mrml_bridge.volume_node_to_sitk(movingVolumeNode), sitk.sitkFloat32)
            initial = mrml_bridge.sitk_from_transform_node(initialTransformNode)
            if self.wrong_first and len(self.calls) == 1:
                shift = np.eye(4)
                shift[:3, 3] = [40.0, 0.0, 0.0]
                result = transforms.compose(initial, transforms.affine_from_matrix(shift))
            else:
                settings = RegistrationSettings(engine="itk", stages=("rigid",), iterations=150).validate()
                result = register_itk(fixed, moving, initial, settings).transform
            mrml_bridge.set_transform_node_from_sitk(outputTransformNode, result)
            self.addLog("Registration is completed")
        finally:
            if self.deleteTemporaryFiles:
                shutil.rmtree(temp_dir, ignore_errors=True)
            self.isRunning = False
            self.cancelRequested = False
