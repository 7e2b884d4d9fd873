"""``diagnose`` with a pre-alignment: the pair's diagnostics plus its overlap under a pre-alignment method."""

from __future__ import annotations

import SimpleITK as sitk

from .. import diagnose, prealign


def diagnose_with_prealign(fixed: sitk.Image, moving: sitk.Image, prealign_method: str = "auto",
                           seed: int = 0) -> dict:
    """:func:`diagnose.diagnose_pair` with the overlap under ``prealign_method`` (fixed->moving, LPS mm).

    The method runs on the diagnostics' own coarse copies (:func:`diagnose.working_copies`, made once for both);
    ``header`` and ``none`` report the header alignment only.
    """
    diagnose.check_3d(fixed, moving)
    work = diagnose.working_copies(fixed, moving)
    transform, method, warnings = None, prealign_method, []
    if prealign_method not in ("none", "header"):
        done = prealign.run_prealign(prealign_method, prealign.PrealignInputs(*work, seed=seed))
        transform, method, warnings = done.transform, done.method, done.warnings
    return diagnose.finish_diagnosis(diagnose.diagnose_images(fixed, moving, work), fixed, moving, transform, method,
                                     warnings)
