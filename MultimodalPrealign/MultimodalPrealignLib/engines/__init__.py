"""Stage 5: registration engines sharing one settings object.

``itk``: SimpleITK's ImageRegistrationMethod set up the way BRAINSFit sets up ITK (Mattes MI with 50
bins, sampling percentage, iteration count, rigid -> affine). ``elastix``: itk-elastix, the elastix that
SlicerElastix runs. ``brainsfit``: the real BRAINSFit executable (``brainsfit_engine``; its parameters,
failures and discovery in ``brainsfit_parameters``, shared with the Slicer module). All take working images
(cropped, resampled) plus the pre-alignment and return ONE fixed->moving transform (physical LPS) that already
includes the pre-alignment.

The engine modules are imported inside :func:`register`, so importing this package (and ``settings``,
``brainsfit_parameters``) needs neither scipy nor itk (the Slicer module imports it before they are installed).
itk-elastix is the optional ``elastix`` extra: :func:`elastix_installed` tells without importing ITK,
:func:`require_elastix` is the one-line InputError naming the extra.
"""

from __future__ import annotations

import SimpleITK as sitk

from ..progress import SILENT, Progress
from .brainsfit_parameters import find_brainsfit
from .settings import (
    ELASTIX_INSTALL,
    ENGINES,
    STAGES,
    EngineResult,
    RegistrationSettings,
    elastix_installed,
    engine_installed,
    fallback_engines,
    itk_preset,
    require_elastix,
)

__all__ = ["ELASTIX_INSTALL", "ENGINES", "STAGES", "EngineResult", "RegistrationSettings", "elastix_installed",
           "engine_installed", "fallback_engines", "find_brainsfit", "itk_preset", "register", "require_elastix"]


def register(fixed_work: sitk.Image, moving_work: sitk.Image, initial_fixed_to_moving: sitk.Transform,
             settings: RegistrationSettings, progress: Progress = SILENT,
             fixed_mask: sitk.Image | None = None, moving_mask: sitk.Image | None = None) -> EngineResult:
    """Run the chosen engine's stages in order, each starting from the previous result."""
    settings.validate()
    if settings.engine == "itk":
        from .itk_engine import register_itk

        return register_itk(fixed_work, moving_work, initial_fixed_to_moving, settings, progress, fixed_mask,
                            moving_mask)
    if settings.engine == "brainsfit":
        from .brainsfit_engine import register_brainsfit

        return register_brainsfit(fixed_work, moving_work, initial_fixed_to_moving, settings, progress, fixed_mask,
                                  moving_mask)
    from .elastix_engine import register_elastix

    return register_elastix(fixed_work, moving_work, initial_fixed_to_moving, settings, progress, fixed_mask,
                            moving_mask)
