"""BRAINSFit (BRAINSTools; the program behind Slicer's "General Registration (BRAINS)" module), shared by the
headless ``brainsfit`` engine (:mod:`.brainsfit_engine`, the executable) and the Slicer module
(``slicer/brainsfit.py``, ``slicer.cli.run``):

- :func:`brainsfit_parameters`: the ONE parameter builder. Its dict (BRAINSFit.xml names) is what Slicer's CLI
  gets, with node IDs; :func:`command_line` turns the same dict, with file names, into the executable's
  arguments. The two cannot drift.
- :func:`translate_failure`: BRAINSFit's real failures (its stderr / stdout) as one line, cause + fix; the table
  lives in ``resources/presets/brainsfit.json``.
- :func:`non_registration`: BRAINSFit's silent failure: exit code 0, "Gradient magnitude tolerance met after 0
  iterations", the output transform equal to the initial one.
- :func:`find_brainsfit`: the executable: ``--brainsfit PATH``, ``$MULTIMODAL_PREALIGN_BRAINSFIT``, ``PATH``, a
  Slicer installation's ``cli-modules`` (started through the Slicer launcher, which sets its library path).

Transforms: the initial and the output transform map FIXED physical points to MOVING physical points (LPS mm, ITK
resampling direction). BRAINSFit starts its first stage from ``initialTransform`` (only its rigid part when that
stage is Rigid) and writes the integrated result, initial transform INCLUDED (BRAINSFitHelperTemplate.hxx).

Scipy-free, like everything the ``slicer`` package imports at module level (see ``slicer/__init__.py``).
"""

from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, RegistrationError
from ..geometry import transforms
from ..resource_files import load_settings
from .settings import check_stages

#: The default stages: BRAINSFit's linear ones.
LINEAR_STAGES = ("rigid", "affine")

#: BRAINSFit.xml booleans for our stage names.
STAGE_FLAGS = {"rigid": "useRigid", "affine": "useAffine", "bspline": "useBSpline"}

#: BRAINSFit.xml names of the parameters that name files (images, transforms): the headless engine gives them
#: file names, Slicer node IDs.
FILE_PARAMETERS = ("fixedVolume", "movingVolume", "linearTransform", "bsplineTransform", "outputVolume",
                   "initialTransform", "fixedBinaryVolume", "movingBinaryVolume")


@functools.lru_cache(maxsize=1)
def _preset_cached() -> dict:
    return load_settings("presets", "brainsfit.json")


def brainsfit_preset() -> dict:
    """``resources/presets/brainsfit.json`` (a copy: callers may change it)."""
    return dict(_preset_cached())


# ------------------------------------------------------------------------------------------ parameters

def effective_sampling_percentage(requested: float | None, fixed_voxels: int, preset: dict | None = None) -> float:
    """The ``samplingPercentage`` sent: ``requested`` (None: BRAINSFit's 0.002), raised so that at least the
    preset's ``min_samples`` of the ``fixed_voxels`` working voxels are sampled, at most 1."""
    preset = preset or brainsfit_preset()
    share = float(preset["default_sampling_percentage"] if requested is None else requested)
    floor = float(preset["min_samples"]) / max(int(fixed_voxels), 1)
    return float(min(1.0, max(share, floor)))


def brainsfit_parameters(fixed_volume: str, moving_volume: str, output_transform: str, stages=LINEAR_STAGES,
                         initial_transform: str | None = None, sampling_percentage: float | None = None,
                         iterations: int | None = None, fixed_mask: str | None = None, moving_mask: str | None = None,
                         output_volume: str | None = None, histogram_bins: int = 50, spline_grid_size=None,
                         number_of_threads: int | None = None) -> dict:
    """BRAINSFit's parameters (BRAINSFit.xml names) for ``stages`` from ``initial_transform``.

    The volume, mask and transform arguments are Slicer node IDs (for ``slicer.cli.run``) or file names (for
    :func:`command_line`). The pre-alignment goes in as ``initialTransform`` with ``initializeTransformMode`` Off
    (BRAINSFit ignores the mode when an initial transform is given; Off makes that explicit). The output is
    ``linearTransform`` for linear stages, ``bsplineTransform`` when the last stage is B-spline (BRAINSFit writes
    a composite: linear part then B-spline). ``sampling_percentage`` / ``iterations`` None keep BRAINSFit's
    defaults (0.002 / 1500): the keys are not sent. With masks, ``maskProcessingMode`` is ROI (either mask may be
    missing). ``number_of_threads`` 1 makes BRAINSFit repeat its result bit for bit (None: all cores).
    """
    stages = check_stages(stages, option="")
    preset = brainsfit_preset()
    params: dict = {
        "fixedVolume": fixed_volume,
        "movingVolume": moving_volume,
        "initializeTransformMode": preset["initialize_transform_mode"],
        "costMetric": preset["cost_metric"],
        "numberOfHistogramBins": int(histogram_bins),
    }
    for stage in stages:
        params[STAGE_FLAGS[stage]] = True
    if stages[-1] == "bspline":
        params["bsplineTransform"] = output_transform
        if spline_grid_size is not None:
            params["splineGridSize"] = ",".join(str(int(v)) for v in spline_grid_size)
    else:
        params["linearTransform"] = output_transform
    if initial_transform:
        params["initialTransform"] = initial_transform
    if sampling_percentage is not None:
        if not 0 < sampling_percentage <= 1:
            raise InputError(f"Sampling percentage must be in (0, 1], got {sampling_percentage}",
                             "use e.g. 0.002 (BRAINSFit's default) or 0.05")
        params["samplingPercentage"] = float(sampling_percentage)
    if iterations is not None:
        if iterations < 1:
            raise InputError(f"Iterations must be >= 1, got {iterations}", "use e.g. 1500")
        params["numberOfIterations"] = int(iterations)
    if fixed_mask or moving_mask:
        params["maskProcessingMode"] = "ROI"
        if fixed_mask:
            params["fixedBinaryVolume"] = fixed_mask
        if moving_mask:
            params["movingBinaryVolume"] = moving_mask
    else:
        params["maskProcessingMode"] = "NOMASK"
    if output_volume:
        params["outputVolume"] = output_volume
    if number_of_threads is not None:
        params["numberOfThreads"] = int(number_of_threads)
    return params


def command_line(executable: list, parameters: dict) -> list[str]:
    """The executable's arguments for ``parameters`` (:func:`brainsfit_parameters` with file names).

    ``executable``: the command that starts BRAINSFit (``BrainsfitExecutable.command``). Every parameter we send
    has the long flag ``--<name>`` (BRAINSFit.xml); a boolean is a switch (sent only when True: all of ours
    default to false), a list a comma-separated value.
    """
    args = [str(part) for part in executable]
    for name, value in parameters.items():
        if isinstance(value, bool):
            if value:
                args.append(f"--{name}")
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        args += [f"--{name}", str(value)]
    return args


# ------------------------------------------------------------------------------------------ failures

def translate_failure(error_text: str, output_text: str = "", status: str = "",
                      exit_code: int | None = None) -> RegistrationError:
    """One-line cause + fix for a failed BRAINSFit run: its known failures first (``known_failures`` of the
    preset), else its last error line."""
    text = f"{error_text or ''}\n{output_text or ''}"
    for needle, cause, fix in brainsfit_preset()["known_failures"]:
        if needle.lower() in text.lower():
            return RegistrationError(cause, fix)
    lines = [line.strip() for line in (error_text or output_text or "").splitlines() if line.strip()]
    interesting = [line for line in lines if re.search(r"error|exception|fail|abort", line, re.IGNORECASE)]
    last = (interesting or lines or [status or "no error text"])[-1]
    how = f" (exit code {exit_code})" if exit_code is not None else ""
    return RegistrationError(f"BRAINSFit failed{how}: {last[:200]}",
                             "read BRAINSFit's output in report.json (engine log) or Slicer's Error Log; "
                             "or use the itk engine")


#: BRAINSFit's optimizer stop line, e.g. "Stop condition from optimizer.RegularStepGradientDescentOptimizerv4:
#: Gradient magnitude tolerance met after 0 iterations. ..."
_STOP = re.compile(r"Stop condition from optimizer\.?\s*([^\n]*)")
_ITERATIONS = re.compile(r"after (\d+) iterations|at iteration (\d+)|Maximum number of iterations \((\d+)\)")
_STAGE_START = re.compile(r"Starting Transform Estimations for (\w+)\((\d+) of (\d+)\)")


def stop_conditions(output_text: str) -> list[dict]:
    """BRAINSFit's optimizer stop lines in order, each ``{"stop_condition": line, "iterations": n or None}``."""
    found = []
    for line in _STOP.findall(output_text or ""):
        match = _ITERATIONS.search(line)
        count = next((int(g) for g in match.groups() if g is not None), None) if match else None
        found.append({"stop_condition": line.strip()[:300], "iterations": count})
    return found


def stage_progress(output_text: str) -> tuple[str, int, int] | None:
    """The stage BRAINSFit is running from its output: (name, k, n) of its last "Rigid(k of n)" line, or None."""
    starts = _STAGE_START.findall(output_text or "")
    if not starts:
        return None
    name, k, n = starts[-1]
    return name, int(k), int(n)


def non_registration(output_text: str, initial, final, points, tolerance_mm: float | None = None) -> str | None:
    """The cause when BRAINSFit did not register although it exited 0, else None.

    BRAINSFit's silent failure: its optimizer stops with "Gradient magnitude tolerance met after 0 iterations"
    (the metric had no usable sample: a gradient of exactly 0) and it writes the initial transform as its result.
    Detected when ``final`` moves none of ``points`` (fixed physical LPS mm, e.g. the fixed working grid's
    corners) by more than ``tolerance_mm`` from where ``initial`` sends them (fixed->moving transforms), or when a
    stage stopped on a gradient of exactly 0 after a few steps (the samples were lost on the way: what it returns
    is where it got stuck, not a registration).
    """
    tolerance_mm = brainsfit_preset()["silent_non_registration_tolerance_mm"] if tolerance_mm is None \
        else tolerance_mm
    points = np.asarray(points, dtype=float)
    moved = max(float(np.linalg.norm(np.asarray(final.TransformPoint(p.tolist()))
                                     - np.asarray(initial.TransformPoint(p.tolist())))) for p in points)
    stops = stop_conditions(output_text)
    zero_gradient = [s for s in stops if re.search(r"Gradient magnitude \(0\)", s["stop_condition"])]
    if moved > tolerance_mm and not zero_gradient:
        return None
    said = ""
    if zero_gradient:
        said = f" (\"{zero_gradient[0]['stop_condition'].split(':', 1)[-1].strip().split('.')[0]}\")"
    what = "returned the initial transform unchanged" if moved <= tolerance_mm else \
        "stopped on a zero metric gradient, stuck where it lost the image overlap"
    return (f"BRAINSFit did not register: it exited without an error but {what}{said}; too few metric samples fell "
            "inside both images (a silent non-registration)")


NON_REGISTRATION_FIX = ("raise the sampling percentage (e.g. 0.05 [--sampling-percentage 0.05]), start closer "
                        "(pre-alignment search [--prealign search]), or use the itk engine")


def initial_transform_warnings(stages, initial) -> list:
    """What BRAINSFit does not take from the pre-alignment ``initial`` (fixed->moving, LPS mm) for ``stages``."""
    if stages[0] == "rigid" and not is_rigid(initial):
        return ["BRAINSFit keeps only the rigid part of a non-rigid pre-alignment for its rigid stage "
                "(scale/shear of the pre-alignment dropped)"]
    return []


def is_rigid(transform, tolerance: float = 1e-4) -> bool:
    """True for a linear transform whose matrix is a rotation (orthonormal, determinant +1)."""
    if not transforms.is_linear(transform):
        return False
    m = transforms.to_matrix(transform)[:3, :3]
    return bool(np.allclose(m @ m.T, np.eye(3), atol=tolerance) and np.linalg.det(m) > 0)


# ------------------------------------------------------------------------------------------ the executable

@dataclass(frozen=True)
class BrainsfitExecutable:
    """A BRAINSFit that runs: ``command`` starts it (``[path]``, or ``[Slicer launcher, "--launch", path]`` for a
    Slicer installation's CLI module), ``version`` is what ``--version`` printed, ``found_by`` where it was found."""

    path: str
    command: tuple = field(default_factory=tuple)
    version: str = ""
    found_by: str = ""


def _executable_name() -> str:
    return "BRAINSFit.exe" if os.name == "nt" else "BRAINSFit"


def _expand(pattern: str, environ) -> str | None:
    """``pattern`` with ``$VAR`` and ``~`` expanded; None when it names an unset variable."""
    if pattern.startswith("$"):
        name, _, rest = pattern[1:].partition("/")
        value = environ.get(name)
        if not value:
            return None
        pattern = value + ("/" + rest if rest else "")
    return os.path.expanduser(pattern)


def _version_key(path: str) -> tuple:
    return tuple(int(v) for v in re.findall(r"\d+", path))


def slicer_installation_candidates(environ=None, preset: dict | None = None) -> list[tuple[str, str | None]]:
    """(BRAINSFit in a Slicer installation's cli-modules, its launcher or None), newest Slicer first."""
    environ = os.environ if environ is None else environ
    preset = preset or brainsfit_preset()
    found = []
    for pattern in preset["slicer_homes"]:
        expanded = _expand(pattern, environ)
        if expanded is None:
            continue
        for home in sorted(glob.glob(expanded), key=_version_key, reverse=True):
            for exe in sorted(glob.glob(os.path.join(home, "lib", "Slicer-*", "cli-modules", _executable_name())),
                              key=_version_key, reverse=True):
                launchers = [os.path.join(home, "Slicer.exe" if os.name == "nt" else "Slicer"),
                             os.path.join(home, "MacOS", "Slicer")]
                launcher = next((p for p in launchers if os.path.isfile(p) and os.access(p, os.X_OK)), None)
                if (exe, launcher) not in found:
                    found.append((exe, launcher))
    return found


@functools.lru_cache(maxsize=16)
def _check_runs(command: tuple, timeout_s: float) -> tuple[bool, str]:
    """(runs, what ``--version`` printed or why it did not run)."""
    try:
        done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError) as err:
        return False, str(err).strip()[:200]
    text = (done.stdout or "") + (done.stderr or "")
    match = re.search(r"version:?\s*([0-9][^\s]*)", done.stdout or "")
    if done.returncode != 0 or not match:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return False, (lines[-1] if lines else f"exit code {done.returncode}")[:200]
    return True, match.group(1)


def _checked(path: str, command: tuple, found_by: str, preset: dict) -> BrainsfitExecutable:
    runs, said = _check_runs(command, float(preset["version_timeout_s"]))
    if not runs:
        raise InputError(f"BRAINSFit at {path} ({found_by}) does not run: {said}",
                         "give a BRAINSFit that runs with --brainsfit PATH (e.g. a Slicer installation's "
                         "lib/Slicer-5.x/cli-modules/BRAINSFit), or install its runtime libraries")
    return BrainsfitExecutable(str(path), tuple(command), said, found_by)


def find_brainsfit(explicit: str | None = None, environ=None) -> BrainsfitExecutable:
    """The BRAINSFit to run, checked with ``--version``; InputError naming where it looked and how to point at it.

    Order: ``explicit`` (``--brainsfit PATH``), the preset's environment variable
    (``MULTIMODAL_PREALIGN_BRAINSFIT``), ``BRAINSFit`` on ``PATH``, a Slicer installation's
    ``lib/Slicer-X.Y/cli-modules/BRAINSFit`` (run through ``Slicer --launch`` when the launcher is there). A path
    given explicitly or by the variable must work: it is not skipped for the next place.
    """
    environ = os.environ if environ is None else environ
    preset = brainsfit_preset()
    variable = preset["environment_variable"]
    for given, how in ((explicit, "--brainsfit"), (environ.get(variable), f"${variable}")):
        if not given:
            continue
        path = os.path.expanduser(str(given))
        if os.path.isdir(path):
            path = os.path.join(path, _executable_name())
        if not os.path.isfile(path):
            raise InputError(f"{how} {given}: no BRAINSFit executable there",
                             "give the path of the BRAINSFit program (e.g. <Slicer>/lib/Slicer-5.x/cli-modules/"
                             "BRAINSFit, or BRAINSTools' bin/BRAINSFit)")
        return _checked(path, (os.path.abspath(path),), how, preset)
    on_path = shutil.which(_executable_name(), path=environ.get("PATH"))
    if on_path:
        return _checked(on_path, (on_path,), "PATH", preset)
    for exe, launcher in slicer_installation_candidates(environ, preset):
        command = (launcher, "--launch", exe) if launcher else (exe,)
        return _checked(exe, command, "Slicer installation", preset)
    homes = ", ".join(p for p in preset["slicer_homes"])
    raise InputError(f"The brainsfit engine needs the BRAINSFit executable and none was found (looked at --brainsfit "
                     f"(not given), ${variable} (not set), BRAINSFit on PATH, Slicer installations in {homes})",
                     f"pass --brainsfit /path/to/BRAINSFit (a Slicer installation has it in lib/Slicer-5.x/"
                     f"cli-modules/) or set {variable}; or use --engine itk")
