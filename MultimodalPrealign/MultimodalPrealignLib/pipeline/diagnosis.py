"""``diagnose`` with a pre-alignment: the pair's diagnostics plus its overlap under a pre-alignment method."""

from __future__ import annotations

import SimpleITK as sitk

from .. import diagnose, prealign
from ..geometry import resample


def diagnose_with_prealign(fixed: sitk.Image, moving: sitk.Image, prealign_method: str = "auto",
                           seed: int = 0) -> dict:
    """:func:`diagnose.diagnose_pair` with the overlap under ``prealign_method`` (fixed->moving, LPS mm).

    The method runs on the diagnostic working copies (:func:`geometry.resample.box_average_copy`, a few mm);
    ``header`` and ``none`` report the header alignment only.
    """
    diagnose.check_3d(fixed, moving)
    transform, method, warnings = None, prealign_method, []
    if prealign_method not in ("none", "header"):
        spacing = diagnose.rules()["working_copy_spacing_mm"]
        inputs = prealign.PrealignInputs(resample.box_average_copy(fixed, spacing),
                                         resample.box_average_copy(moving, spacing), seed=seed)
        done = prealign.run_prealign(prealign_method, inputs)
        transform, method, warnings = done.transform, done.method, done.warnings
    return diagnose.diagnose_pair(fixed, moving, transform, method, warnings)
