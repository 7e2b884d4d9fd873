"""Slicer's BRAINSFit CLI module ("General Registration (BRAINS)"): its parameters, its run, its failures.

Parameter construction and error translation are pure functions (tested without Slicer); the run takes
``slicer.cli.runSync`` and ``slicer.modules.brainsfit`` as arguments, so tests pass named doubles instead.
Parameter names were checked against BRAINSia/BRAINSTools BRAINSFit/BRAINSFit.xml.

Transforms: the initial and the output transform map FIXED physical points to MOVING physical points (LPS mm,
ITK resampling direction). BRAINSFit starts its first stage from ``initialTransform`` (only its rigid part when
that stage is Rigid) and writes the integrated result, initial transform included (BRAINSFitHelperTemplate.hxx).
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

from ..errors import InputError, RegistrationError
from ..geometry import transforms

#: The default stages: BRAINSFit's linear ones.
LINEAR_STAGES = ("rigid", "affine")

#: BRAINSFit.xml booleans for our stage names.
BRAINSFIT_STAGE_FLAGS = {"rigid": "useRigid", "affine": "useAffine", "bspline": "useBSpline"}

#: Known BRAINSFit / ITK failures: (text in the CLI's error or output, cause, fix).
BRAINSFIT_KNOWN_FAILURES = (
    ("All samples map outside moving image buffer",
     "BRAINSFit lost the overlap: every metric sample mapped outside the moving image",
     "start closer (pre-alignment 'search', or 'anatomy' with TotalSegmentator segmentations), enlarge the "
     "crop margin, or register with fewer stages (rigid only)"),
    ("Too many samples map outside moving image buffer",
     "The registration lost the overlap: too many metric samples mapped outside the moving image",
     "start closer (pre-alignment 'search' or 'anatomy'), or enlarge the crop margin"),
    ("Joint PDF summed to zero",
     "BRAINSFit found no overlapping intensities (joint histogram empty)",
     "check that both volumes hold data where they overlap; use pre-alignment 'search' and a larger crop margin"),
    ("Fixed image mask",
     "BRAINSFit rejected a mask",
     "give binary label volumes on the same physical space as the volumes, or run without masks"),
    ("bad_alloc",
     "BRAINSFit ran out of memory",
     "increase the spacing scale (coarser working grid) or crop tighter (smaller crop margin)"),
    ("Unknown parameter",
     "BRAINSFit did not accept a parameter (older Slicer version?)",
     "update Slicer, or use engine 'core'"),
)


def brainsfit_parameters(fixed_volume_id: str, moving_volume_id: str, output_transform_id: str,
                         stages=LINEAR_STAGES, initial_transform_id: str | None = None,
                         sampling_percentage: float | None = None, iterations: int | None = None,
                         fixed_mask_id: str | None = None, moving_mask_id: str | None = None,
                         output_volume_id: str | None = None, histogram_bins: int = 50,
                         spline_grid_size=None) -> dict:
    """``slicer.cli.runSync(slicer.modules.brainsfit, None, parameters)`` parameters (BRAINSFit.xml names).

    The pre-alignment goes in as ``initialTransform`` with ``initializeTransformMode`` Off (BRAINSFit
    ignores the mode when an initial transform is given; Off makes that explicit). The output is
    ``linearTransform`` for linear stages and ``bsplineTransform`` when the last stage is BSpline
    (``linearTransform`` is invalid then). ``sampling_percentage`` and ``iterations`` left None keep
    BRAINSFit's defaults (0.002, 1500).
    """
    from ..engines.settings import check_stages  # inside: see the package docstring (scipy)

    stages = check_stages(stages, option="")
    params: dict = {
        "fixedVolume": fixed_volume_id,
        "movingVolume": moving_volume_id,
        "initializeTransformMode": "Off",
        "costMetric": "MMI",
        "numberOfHistogramBins": int(histogram_bins),
    }
    for stage in stages:
        params[BRAINSFIT_STAGE_FLAGS[stage]] = True
    if stages[-1] == "bspline":
        params["bsplineTransform"] = output_transform_id
        if spline_grid_size is not None:
            params["splineGridSize"] = ",".join(str(int(v)) for v in spline_grid_size)
    else:
        params["linearTransform"] = output_transform_id
    if initial_transform_id:
        params["initialTransform"] = initial_transform_id
    if sampling_percentage is not None:
        if not 0 < sampling_percentage <= 1:
            raise InputError(f"Sampling percentage must be in (0, 1], got {sampling_percentage}",
                             "use e.g. 0.002 (BRAINSFit's default) or 0.05")
        params["samplingPercentage"] = float(sampling_percentage)
    if iterations is not None:
        if iterations < 1:
            raise InputError(f"Iterations must be >= 1, got {iterations}", "use e.g. 1500")
        params["numberOfIterations"] = int(iterations)
    if fixed_mask_id or moving_mask_id:
        params["maskProcessingMode"] = "ROI"
        if fixed_mask_id:
            params["fixedBinaryVolume"] = fixed_mask_id
        if moving_mask_id:
            params["movingBinaryVolume"] = moving_mask_id
    else:
        params["maskProcessingMode"] = "NOMASK"
    if output_volume_id:
        params["outputVolume"] = output_volume_id
    return params


def translate_brainsfit_failure(error_text: str, output_text: str = "", status: str = "") -> RegistrationError:
    """One-line cause + fix for a failed BRAINSFit run (known ITK messages first, else its last error line)."""
    text = f"{error_text or ''}\n{output_text or ''}"
    for needle, cause, fix in BRAINSFIT_KNOWN_FAILURES:
        if needle.lower() in text.lower():
            return RegistrationError(cause, fix)
    lines = [line.strip() for line in (error_text or output_text or "").splitlines() if line.strip()]
    interesting = [line for line in lines if re.search(r"error|exception|fail", line, re.IGNORECASE)]
    last = (interesting or lines or [status or "no error text"])[-1]
    return RegistrationError(f"BRAINSFit failed: {last[:200]}",
                             "open the Error Log (View > Error Log) for BRAINSFit's full output, or use engine 'core'")


def cli_failed(cli_node) -> bool:
    """True when a CLI node ended with an error (``runSync`` does not raise: check the status)."""
    return bool(cli_node.GetStatus() & cli_node.ErrorsMask)


def run_brainsfit(run_sync: Callable, brainsfit_module, parameters: dict):
    """Run BRAINSFit synchronously; raise RegistrationError with cause + fix on failure. Returns the CLI node.

    ``run_sync`` is ``slicer.cli.runSync`` (it may raise on failure in some Slicer versions when
    ``update_display`` is on; both paths are translated).
    """
    try:
        cli_node = run_sync(brainsfit_module, None, parameters)
    except Exception as err:  # slicer.cli.runSync raises ValueError("CLI execution failed: ...") in some versions
        raise translate_brainsfit_failure(str(err)) from None
    if cli_failed(cli_node):
        raise translate_brainsfit_failure(cli_node.GetErrorText(), cli_node.GetOutputText(),
                                          _status_string(cli_node))
    return cli_node


def _status_string(cli_node) -> str:
    getter = getattr(cli_node, "GetStatusString", None)
    return getter() if getter else ""


def initial_transform_warnings(stages, initial) -> list:
    """What BRAINSFit does not take from the pre-alignment ``initial`` (fixed->moving, LPS mm) for ``stages``."""
    if stages[0] == "rigid" and not _is_rigid(initial):
        return ["BRAINSFit keeps only the rigid part of a non-rigid pre-alignment for its rigid stage "
                "(scale/shear of the pre-alignment dropped)"]
    return []


def _is_rigid(transform, tolerance: float = 1e-4) -> bool:
    """True for a linear transform whose matrix is a rotation (orthonormal, determinant +1)."""
    if not transforms.is_linear(transform):
        return False
    m = transforms.to_matrix(transform)[:3, :3]
    return bool(np.allclose(m @ m.T, np.eye(3), atol=tolerance) and np.linalg.det(m) > 0)
