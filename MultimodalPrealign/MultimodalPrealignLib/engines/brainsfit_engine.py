"""Engine ``brainsfit``: the real BRAINSFit executable on the working images (headless).

One BRAINSFit run does all stages, as Slicer's General Registration (BRAINS) module runs it, with the parameters
of :func:`.brainsfit_parameters.brainsfit_parameters` (the builder the Slicer module uses too): the working images,
the metric masks and the pre-alignment (``initialTransform``, written as an affine transform: BRAINSFit takes no
Euler transforms) go to a temporary folder, BRAINSFit runs there (relative file names, so the command line in
report.json names no temporary path), and its output transform is read back.

Transforms: ``initial`` and the result map FIXED physical points to MOVING physical points (LPS mm, ITK
resampling direction). BRAINSFit's output INCLUDES its initial transform (its rigid part only when the first
stage is rigid: a warning says so), so the result is the one composed fixed->moving transform.

Failures: a non-zero exit (e.g. "All samples map outside moving image buffer") and the silent non-registration
(exit 0, "Gradient magnitude tolerance met after 0 iterations", output = initial transform) both raise
RegistrationError with cause + fix, so the pipeline's fallback takes over.

Determinism: BRAINSFit has no seed option; its random metric sampling repeats from run to run. Its threaded
metric sums in varying order (two runs differed by 1e-12 mm), so a deterministic run passes numberOfThreads 1.
``settings.seed`` is recorded but BRAINSFit cannot use it.

The stages run in one process, so there is no rigid result to fall back to: the affine guard of the other engines
does not apply (the pipeline's registration guard still does).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import Cancelled, RegistrationError
from ..geometry import image_space, transforms
from ..progress import SILENT, Progress
from . import brainsfit_parameters as bf
from .settings import EngineResult, RegistrationSettings, check_stages

#: BRAINSFit's numberOfIterations when none is sent (BRAINSFit.xml), recorded in report.json.
BRAINSFIT_DEFAULT_ITERATIONS = 1500

#: How often the running BRAINSFit is polled for progress and a cancel request (s).
POLL_SECONDS = 0.1

#: File names inside the run's folder (relative: the command line as run names no temporary path).
FILES = {"fixed": "fixed.nrrd", "moving": "moving.nrrd", "initial": "initial_transform.h5",
         "output": "output_transform.h5", "fixed_mask": "fixed_mask.nrrd", "moving_mask": "moving_mask.nrrd",
         "stdout": "brainsfit_stdout.txt", "stderr": "brainsfit_stderr.txt"}


def register_brainsfit(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, settings: RegistrationSettings,
                       progress: Progress = SILENT, fixed_mask: sitk.Image | None = None,
                       moving_mask: sitk.Image | None = None, keep_temporary_dir: str | None = None) -> EngineResult:
    """Run BRAINSFit for ``settings.stages`` from ``initial`` (linear); the result (fixed->moving, LPS mm)
    includes it.

    The executable: ``settings.brainsfit_path``, else :func:`.brainsfit_parameters.find_brainsfit`'s search
    (InputError when none runs). ``keep_temporary_dir`` (default ``settings.keep_temporary_dir``): keep the run's
    files (working images, masks, transforms, BRAINSFit's stdout/stderr) in a new ``brainsfit_*`` folder inside it;
    None: a temporary folder, removed after the run whatever happens.
    """
    executable = bf.find_brainsfit(settings.brainsfit_path)
    if not transforms.is_linear(initial):
        raise RegistrationError("The brainsfit engine needs a linear pre-alignment",
                                "use a rigid or affine pre-alignment")
    stages = check_stages(settings.stages)
    keep = keep_temporary_dir if keep_temporary_dir is not None else settings.keep_temporary_dir
    if keep is not None:
        Path(keep).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="brainsfit_", dir=keep))
    try:
        return _run(executable, folder, fixed, moving, initial, stages, settings, progress, fixed_mask, moving_mask,
                    kept=keep is not None)
    finally:
        if keep is None:
            shutil.rmtree(folder, ignore_errors=True)


def _run(executable: bf.BrainsfitExecutable, folder: Path, fixed, moving, initial, stages, settings, progress,
         fixed_mask, moving_mask, kept: bool) -> EngineResult:
    preset = bf.brainsfit_preset()
    fixed_voxels = int(np.prod(fixed.GetSize()))
    sampling = bf.effective_sampling_percentage(settings.sampling_percentage, fixed_voxels, preset)
    sitk.WriteImage(sitk.Cast(fixed, sitk.sitkFloat32), str(folder / FILES["fixed"]))
    sitk.WriteImage(sitk.Cast(moving, sitk.sitkFloat32), str(folder / FILES["moving"]))
    transforms.write_transform(transforms.affine_from_matrix(transforms.to_matrix(initial)), folder / FILES["initial"])
    for mask, key in ((fixed_mask, "fixed_mask"), (moving_mask, "moving_mask")):
        if mask is not None:
            sitk.WriteImage(sitk.Cast(mask > 0, sitk.sitkUInt8), str(folder / FILES[key]))
    threads = int(preset["deterministic_threads"]) if settings.deterministic else None
    parameters = bf.brainsfit_parameters(
        FILES["fixed"], FILES["moving"], FILES["output"], stages, FILES["initial"], sampling, settings.iterations,
        FILES["fixed_mask"] if fixed_mask is not None else None,
        FILES["moving_mask"] if moving_mask is not None else None,
        histogram_bins=settings.histogram_bins, number_of_threads=threads)
    args = bf.command_line(executable.command, parameters)
    started = time.perf_counter()
    exit_code, stdout, stderr, stage_seconds = _execute(args, folder, stages, progress)
    seconds = time.perf_counter() - started
    log = f"=== BRAINSFit {' '.join(args)}\n{stdout}\n=== stderr\n{stderr}"
    output_path = folder / FILES["output"]
    if exit_code != 0 or not output_path.is_file():
        raise bf.translate_failure(stderr, stdout, exit_code=exit_code)
    try:
        final = transforms.read_transform(output_path)
    except RuntimeError:
        raise RegistrationError("BRAINSFit wrote an output transform that cannot be read",
                                "check the BRAINSFit version (5.x), or use the itk engine") from None
    cause = bf.non_registration(stdout, initial, final, image_space.physical_corners(fixed),
                                preset["silent_non_registration_tolerance_mm"])
    if cause:
        raise RegistrationError(cause, bf.NON_REGISTRATION_FIX)
    stops = bf.stop_conditions(stdout)
    records = []
    for index, stage in enumerate(stages):
        stop = stops[index] if index < len(stops) else {}
        records.append({"stage": stage, "engine": "brainsfit", "seconds": stage_seconds.get(index),
                        "iterations": stop.get("iterations"), "stop_condition": stop.get("stop_condition")})
    used = {
        "engine": "brainsfit", "executable": executable.path, "version": executable.version,
        "found_by": executable.found_by, "command_line": args, "parameters": parameters, "stages": list(stages),
        "sampling_percentage": sampling, "sampling_percentage_requested": settings.sampling_percentage,
        "min_samples": preset["min_samples"], "fixed_working_voxels": fixed_voxels,
        "iterations": settings.iterations if settings.iterations is not None else BRAINSFIT_DEFAULT_ITERATIONS,
        "seed": settings.seed, "seed_note": "BRAINSFit has no seed option; its sampling repeats from run to run",
        "deterministic_single_thread": threads == 1, "exit_code": exit_code, "seconds": round(seconds, 3),
        "transform_convention": "fixed->moving, LPS mm (ITK resampling direction); BRAINSFit's output includes "
                                "its initial transform (the pre-alignment)",
    }
    if kept:
        used["temporary_folder"] = str(folder)
    return EngineResult(final, records, used, log=log, warnings=bf.initial_transform_warnings(stages, initial))


def _execute(args: list, folder: Path, stages, progress: Progress) -> tuple[int, str, str, dict]:
    """Run ``args`` in ``folder``: (exit code, stdout, stderr, {stage index: seconds}).

    Polled every :data:`POLL_SECONDS`: the stage BRAINSFit announces ("Rigid(1 of 2)") becomes progress, a cancel
    request kills it (then Cancelled). The process never outlives this call.
    """
    out_path, err_path = folder / FILES["stdout"], folder / FILES["stderr"]
    stage_started: dict = {}
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        try:
            process = subprocess.Popen(args, cwd=str(folder), stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        except OSError as error:
            raise RegistrationError(f"BRAINSFit could not start: {error}",
                                    "check the path given with --brainsfit") from None
        shown = None
        try:
            while process.poll() is None:
                time.sleep(POLL_SECONDS)
                current = bf.stage_progress(out_path.read_text(errors="replace"))
                if current is not None and current != shown:
                    shown = current
                    name, k, n = current
                    stage_started[k - 1] = time.perf_counter()
                    progress.report("register", (k - 1) / max(n, 1), f"{name} stage ({k} of {n}, BRAINSFit)")
                progress.check_cancelled()
        except (Cancelled, KeyboardInterrupt):
            _stop(process)
            raise
        finally:
            if process.poll() is None:
                _stop(process)
    ended = time.perf_counter()
    seconds = {}
    for index in sorted(stage_started):
        following = [stage_started[i] for i in stage_started if i > index]
        seconds[index] = round((min(following) if following else ended) - stage_started[index], 3)
    stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    return process.returncode, stdout, stderr, seconds


def _stop(process: subprocess.Popen) -> None:
    """Terminate BRAINSFit, kill it if it does not end within 5 s, and reap it."""
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
