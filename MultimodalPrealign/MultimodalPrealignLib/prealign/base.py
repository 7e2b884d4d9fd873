"""What every pre-alignment method takes (:class:`PrealignInputs`) and returns (:class:`PrealignResult`).

A result's transform maps fixed physical points to moving physical points (LPS mm, ITK resampling direction);
its ``details`` and ``candidates`` are JSON-ready for report.json (:func:`rounded`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from ..progress import SILENT, Progress


@dataclass
class PrealignInputs:
    """Everything a pre-alignment method may use. Images are float32; label maps UInt16 on their image's grid."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_labels: sitk.Image | None = None
    moving_labels: sitk.Image | None = None
    fixed_labels_task: str | None = None  # TotalSegmentator task, e.g. "total" or "total_mr"
    moving_labels_task: str | None = None
    seed: int = 0
    options: dict = field(default_factory=dict)  # method-specific settings (e.g. search budget)
    progress: Progress = SILENT


@dataclass
class PrealignResult:
    """Outcome of one method: ``transform`` maps fixed physical points to moving physical points (LPS)."""

    method: str
    transform: sitk.Transform
    details: dict = field(default_factory=dict)  # JSON-ready, goes into report.json
    warnings: list = field(default_factory=list)
    candidates: list = field(default_factory=list)  # JSON-ready list of tried poses and scores


def rounded(values, digits: int = 3) -> list[float]:
    """``values`` (any array shape) as a flat list of floats rounded to ``digits``, for ``details``."""
    return [round(float(v), digits) for v in np.asarray(values).ravel()]
