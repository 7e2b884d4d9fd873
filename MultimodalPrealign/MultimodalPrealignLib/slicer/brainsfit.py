"""Slicer's BRAINSFit CLI module ("General Registration (BRAINS)"): its run inside Slicer.

The parameters, the known failures and the silent non-registration detector are the engines layer's
(``engines/brainsfit_parameters.py``), shared with the headless ``brainsfit`` engine, so Slicer and the command
line send BRAINSFit the same parameters. This module only runs it the Slicer way: :func:`run_brainsfit` starts
the CLI asynchronously (``slicer.cli.run(..., wait_for_completion=False)``), keeps the GUI alive while it runs
(``slicer.app.processEvents``), forwards its progress, cancels it on request (``cliNode.Cancel()``, then
``errors.Cancelled``) and removes its ``vtkMRMLCommandLineModuleNode`` from the scene afterwards (success,
failure or cancel), so no CLI node is saved with the scene. The Slicer objects come in as arguments (doubles in
tests: Testing/slicer_cli_double.py runs the real BRAINSFit executable behind a real CLI node).

Transforms: the initial and the output transform map FIXED physical points to MOVING physical points (LPS mm, ITK
resampling direction); BRAINSFit's output includes its initial transform.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..engines.brainsfit_parameters import (
    LINEAR_STAGES,
    NON_REGISTRATION_FIX,
    brainsfit_parameters,
    effective_sampling_percentage,
    initial_transform_warnings,
    non_registration,
    stage_progress,
    translate_failure,
)
from ..engines.brainsfit_parameters import STAGE_FLAGS as BRAINSFIT_STAGE_FLAGS
from ..engines.brainsfit_parameters import is_rigid as _is_rigid
from ..errors import Cancelled, RegistrationError

__all__ = ["BRAINSFIT_STAGE_FLAGS", "LINEAR_STAGES", "BrainsfitCliRun", "brainsfit_parameters", "check_registered",
           "cli_failed", "effective_sampling_percentage", "initial_transform_warnings", "run_brainsfit",
           "translate_brainsfit_failure", "volume_corners_lps", "_is_rigid"]

#: vtkMRMLCommandLineModuleNode status values (Slicer's StatusType), used when a node lacks the constants.
STATUS = {"Idle": 0, "Scheduled": 1, "Running": 2, "Cancelling": 4, "Cancelled": 8, "Completing": 16,
          "Completed": 32, "ErrorsMask": 64, "CompletedWithErrors": 96, "BusyMask": 23}

#: Seconds between two looks at the running CLI (the GUI processes its events in between).
POLL_SECONDS = 0.05
#: After a cancel (or an error of ours), how long to wait for the CLI to stop before removing its node (s).
STOP_TIMEOUT_S = 60.0


def translate_brainsfit_failure(error_text: str, output_text: str = "", status: str = "") -> RegistrationError:
    """One-line cause + fix for a failed BRAINSFit run (``engines.brainsfit_parameters.translate_failure``)."""
    return translate_failure(error_text, output_text, status)


@dataclass
class BrainsfitCliRun:
    """What a finished BRAINSFit CLI run left (its node is gone from the scene): status, output and error text."""

    status: str
    output_text: str
    error_text: str


def _status(cli_node, name: str) -> int:
    return int(getattr(cli_node, name, STATUS[name]))


def cli_failed(cli_node) -> bool:
    """True when a CLI node ended with an error."""
    return bool(cli_node.GetStatus() & _status(cli_node, "ErrorsMask"))


def _finished(cli_node, status: int) -> bool:
    """Completed, CompletedWithErrors or Cancelled (Idle, Scheduled, Running, Cancelling, Completing: not yet)."""
    return status in (_status(cli_node, "Completed"), _status(cli_node, "Cancelled")) or bool(
        status & _status(cli_node, "ErrorsMask"))


def _status_string(cli_node) -> str:
    getter = getattr(cli_node, "GetStatusString", None)
    return getter() if getter else str(cli_node.GetStatus())


def _fraction(cli_node) -> float:
    """BRAINSFit's progress: the CLI node's (0-100), or the stage it announced in its output ("Rigid(1 of 2)")."""
    fraction = max(0.0, min(1.0, float(cli_node.GetProgress() or 0) / 100.0))
    announced = stage_progress(cli_node.GetOutputText() or "")
    if announced is not None:
        _name, k, n = announced
        fraction = max(fraction, (k - 1) / max(n, 1))
    return fraction


def run_brainsfit(run_cli: Callable, brainsfit_module, parameters: dict, process_events: Callable | None = None,
                  progress=None, poll_seconds: float = POLL_SECONDS, sleep: Callable = time.sleep) -> BrainsfitCliRun:
    """Run BRAINSFit through Slicer's CLI machinery without blocking the GUI; cause + fix on failure.

    ``run_cli``: ``slicer.cli.run`` (called with ``wait_for_completion=False``; it returns the CLI node at once).
    ``process_events``: ``slicer.app.processEvents``, called at every poll so the GUI (and its Cancel button) stays
    alive. ``progress``: the core's ``Progress``: BRAINSFit's progress goes to it, and its ``cancel_requested``
    cancels the CLI (``cliNode.Cancel()``; the run waits until the CLI stopped, then raises ``errors.Cancelled``).
    The CLI node is removed from its scene in every case. Returns the texts of the finished run.
    """
    try:
        cli_node = run_cli(brainsfit_module, None, parameters, wait_for_completion=False)
    except Exception as err:  # slicer.cli.run raises ValueError("CLI execution failed: ...") in some versions
        raise translate_brainsfit_failure(str(err)) from None
    if cli_node is None:
        raise RegistrationError("Slicer could not start BRAINSFit (no CLI node was created)",
                                "check that the General Registration (BRAINS) module loads (Modules list)")
    cancelled = False
    try:
        cancelled = _wait(cli_node, process_events, progress, poll_seconds, sleep)
        run = BrainsfitCliRun(_status_string(cli_node), cli_node.GetOutputText() or "",
                              cli_node.GetErrorText() or "")
        status = cli_node.GetStatus()
    finally:
        _stop_and_remove(cli_node, process_events, poll_seconds, sleep)
    if cancelled or status == _status(cli_node, "Cancelled"):
        raise Cancelled()
    if status & _status(cli_node, "ErrorsMask"):
        raise translate_brainsfit_failure(run.error_text, run.output_text, run.status)
    return run


def _wait(cli_node, process_events, progress, poll_seconds, sleep) -> bool:
    """Poll until the CLI finished; True when a cancel was requested (and the CLI then stopped)."""
    cancel_requested = getattr(progress, "cancel_requested", None)
    cancelling, shown = False, -1.0
    while True:
        if process_events is not None:
            process_events()
        status = cli_node.GetStatus()
        if _finished(cli_node, status):
            return cancelling
        if not cancelling and cancel_requested is not None and cancel_requested():
            cli_node.Cancel()
            cancelling = True
        if not cancelling and progress is not None:
            fraction = _fraction(cli_node)
            if fraction > shown:
                shown = fraction
                progress.report("register", fraction, f"BRAINSFit running ({100 * fraction:.0f}%)")
        sleep(poll_seconds)


def _stop_and_remove(cli_node, process_events, poll_seconds, sleep) -> None:
    """Cancel the CLI if it still runs (an error or interrupt of ours), wait up to STOP_TIMEOUT_S for it to stop,
    then remove its node from the scene (it would otherwise be saved with the scene)."""
    if cli_node.GetStatus() & _status(cli_node, "BusyMask"):
        cli_node.Cancel()
        waited = 0.0
        while cli_node.GetStatus() & _status(cli_node, "BusyMask") and waited < STOP_TIMEOUT_S:
            if process_events is not None:
                process_events()
            sleep(poll_seconds)
            waited += poll_seconds
    scene = cli_node.GetScene() if hasattr(cli_node, "GetScene") else None
    if scene is not None:
        scene.RemoveNode(cli_node)


def volume_corners_lps(volume_node) -> np.ndarray:
    """The 8 corners (voxel edges) of a volume node's grid, physical LPS mm (8 x 3)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    dims = volume_node.GetImageData().GetDimensions()
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, dims[0] - 0.5) for j in (-0.5, dims[1] - 0.5)
                        for k in (-0.5, dims[2] - 0.5)])
    ras = corners @ ijk_to_ras.T
    return ras[:, :3] * np.array([-1.0, -1.0, 1.0])


def check_registered(output_text: str, initial, final, corners_lps) -> None:
    """RegistrationError (cause + fix) when BRAINSFit exited 0 but returned ``initial`` unchanged (its silent
    non-registration); ``initial`` / ``final``: fixed->moving SimpleITK transforms, ``corners_lps``: fixed points."""
    cause = non_registration(output_text, initial, final, corners_lps)
    if cause:
        raise RegistrationError(cause, NON_REGISTRATION_FIX)
