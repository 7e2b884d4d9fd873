"""CT or MR: one rule for the whole project, and the TotalSegmentator task of each modality.

The DICOM Modality tag decides when it is known; otherwise the intensities do (Hounsfield air at -1000 HU, CT
padding below -1000). Thresholds live in ``resources/diagnostics_rules.json`` (docs/diagnostics.md).
TotalSegmentator (Wasserthal et al., Radiology: AI 2023) segments CT with task ``total`` and MR with ``total_mr``.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..geometry.masks import padding_value
from ..resource_files import load_settings

#: Metadata keys that carry the DICOM Modality into an image (dicom_series sets the first; GDCM the tag).
MODALITY_KEYS = ("MultimodalPrealign.modality", "0008|0060")
#: TotalSegmentator task per modality (``total`` = CT, 117 classes; ``total_mr`` = MR, 50 classes).
TOTALSEGMENTATOR_TASKS = {"CT": "total", "MR": "total_mr"}
#: Names of MR weightings and sequences that count as MR.
MR_NAMES = ("MR", "MRI", "T1", "T2", "FLAIR", "PD", "DWI")


def rules() -> dict:
    """Thresholds from ``resources/diagnostics_rules.json`` (keys starting with '_' dropped)."""
    return load_settings("diagnostics_rules.json")


def metadata(image: sitk.Image, keys) -> str | None:
    """The first non-empty metadata value of ``keys`` (DICOM tags or our own keys), else None."""
    for key in keys:
        if image.HasMetaDataKey(key):
            value = image.GetMetaData(key).strip()
            if value:
                return value
    return None


def intensity_summary(image: sitk.Image, settings: dict | None = None) -> dict:
    """Min/max over all voxels, percentiles, air fraction and padding value over an even subsample."""
    settings = settings or rules()
    array = sitk.GetArrayViewFromImage(image)
    step = max(1, int(math.ceil((array.size / float(settings["intensity_max_samples"])) ** (1 / 3))))
    sample = np.asarray(array[::step, ::step, ::step], dtype=np.float64).ravel()
    p1, p50, p99 = np.percentile(sample, [1, 50, 99])
    air = np.mean((sample >= settings["ct_air_hu_low"]) & (sample <= settings["ct_air_hu_high"]))
    return {
        "min": float(array.min()), "max": float(array.max()),
        "p1": round(float(p1), 3), "median": round(float(p50), 3), "p99": round(float(p99), 3),
        "air_fraction_hu": round(float(air), 4),
        "padding_value": padding_value(image[::step, ::step, ::step]),
    }


def guess_modality(intensity: dict, dicom_modality: str | None, settings: dict | None = None) -> dict:
    """'CT', 'MR' or 'unknown', from the DICOM Modality tag when known, else from the intensities.

    CT: values reach below ``ct_min_value`` and either a share of the voxels sits at air (-1000 HU) or
    a padding value below -1000 exists. MR: the 1st percentile is at least ``mr_min_value`` and nothing
    reaches ``ct_min_value`` (interpolated MR may dip slightly below 0). A CT stored without its
    rescale intercept (values 0..4095) looks like MR to this rule.
    """
    settings = settings or rules()
    if dicom_modality:
        guess = dicom_modality.upper() if dicom_modality.upper() in ("CT", "MR", "PT", "US") else dicom_modality
        return {"guess": guess, "source": "DICOM Modality tag"}
    pad = intensity.get("padding_value")
    air = intensity["air_fraction_hu"] >= settings["ct_min_air_fraction"]
    if intensity["min"] < settings["ct_min_value"] and (air or (pad is not None and pad <= -1000)):
        return {"guess": "CT", "source": "intensities",
                "reason": f"Hounsfield-like: {100 * intensity['air_fraction_hu']:.0f}% of voxels at air (-1000)"}
    if intensity["p1"] >= settings["mr_min_value"] and intensity["min"] > settings["ct_min_value"]:
        return {"guess": "MR", "source": "intensities", "reason": "(almost) no negative values, no air at -1000"}
    return {"guess": "unknown", "source": "intensities",
            "reason": "negative values without Hounsfield air; cannot tell"}


def image_modality(image: sitk.Image) -> str:
    """:func:`guess_modality` of one image: 'CT', 'MR', another DICOM modality, or 'unknown'."""
    settings = rules()
    return guess_modality(intensity_summary(image, settings), metadata(image, MODALITY_KEYS), settings)["guess"]


def ct_or_mr(image: sitk.Image) -> str:
    """'CT' when :func:`image_modality` says CT, else 'MR' (an 'unknown' image counts as MR): the choice between
    the two TotalSegmentator tasks and the two label-task families."""
    return "CT" if image_modality(image) == "CT" else "MR"


def totalsegmentator_task(modality: str) -> str:
    """TotalSegmentator task for a modality: CT -> ``total``; MR or any MR weighting (T1, T2, ...) -> ``total_mr``.

    Case-insensitive; ``mr_t2`` and the like count as MR. Raises InputError for anything else (PET, US...).
    """
    key = (modality or "").strip().upper()
    if key.startswith("MR") or key in MR_NAMES:
        key = "MR"
    if key not in TOTALSEGMENTATOR_TASKS:
        raise InputError(f"No TotalSegmentator task for modality '{modality}'",
                         "use CT (task total) or MR (task total_mr)")
    return TOTALSEGMENTATOR_TASKS[key]
