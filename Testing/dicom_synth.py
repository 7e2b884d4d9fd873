"""Write small synthetic DICOM series with pydicom (test and benchmark helper, not part of the package).

Each slice's pixels encode its slice index and position so that sorting mistakes show up.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid


def _ds(value: float) -> str:
    """DICOM decimal string (at most 16 characters)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def uid(*parts) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def axial_positions(origin, spacing_mm: float, count: int, normal=(0.0, 0.0, 1.0)) -> list:
    origin = np.asarray(origin, dtype=float)
    normal = np.asarray(normal, dtype=float)
    return [origin + k * spacing_mm * normal for k in range(count)]


def slice_pixels(rows: int, columns: int, index: int, seed: int = 0) -> np.ndarray:
    """Stored (uint16) pixels: a ramp plus 40 * index, plus a square, deterministic."""
    rng = np.random.default_rng(seed + index)
    y, x = np.mgrid[0:rows, 0:columns]
    pixels = 1000 + 3 * x + 2 * y + 40 * index + rng.integers(0, 5, size=(rows, columns))
    pixels[rows // 4: rows // 2, columns // 4: columns // 2] += 500
    return pixels.astype(np.uint16)


def write_slice(path: Path, *, position, orientation=(1, 0, 0, 0, 1, 0), pixel_spacing=(2.0, 2.0),
                rows: int = 32, columns: int = 32, pixels: np.ndarray | None = None, series_uid: str,
                instance_number: int = 1, modality: str = "CT", patient_position: str = "HFS",
                series_number: int = 1, series_description: str = "synthetic", sop_uid: str | None = None,
                extra: dict | None = None, study_uid: str | None = None) -> None:
    sop_uid = sop_uid or uid(series_uid, "sop", instance_number, path.name)
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or uid("study", series_uid)
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = uid("for", series_uid)
    ds.Modality = modality
    ds.PatientName = "Synthetic^Phantom"
    ds.PatientID = "SYNTH001"
    ds.PatientPosition = patient_position
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.PixelSpacing = [_ds(v) for v in pixel_spacing]
    ds.SliceThickness = "2.5"
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if modality == "CT":
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    if pixels is None:
        pixels = slice_pixels(rows, columns, instance_number)
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    try:
        ds.save_as(path, enforce_file_format=True)  # pydicom >= 3
    except TypeError:  # pragma: no cover - pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)


def write_series(folder: Path, positions: list, *, orientation=(1, 0, 0, 0, 1, 0), series_uid: str | None = None,
                 shuffle_seed: int | None = 7, per_slice: list | None = None, name_prefix: str = "img",
                 **kwargs) -> list:
    """Write one file per position (file names in shuffled order); ``per_slice[k]`` overrides keyword
    arguments of slice k. Returns the paths in slice order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or uid("series", folder.name, name_prefix)
    order = list(range(len(positions)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    paths = [None] * len(positions)
    for file_index, k in enumerate(order):
        path = folder / f"{name_prefix}{file_index:04d}.dcm"
        options = dict(kwargs)
        options.setdefault("orientation", orientation)
        options.update((per_slice or [{}] * len(positions))[k] or {})
        write_slice(path, position=positions[k], series_uid=series_uid, instance_number=k + 1, **options)
        paths[k] = path
    return paths


def read_back(path: Path) -> Dataset:
    return pydicom.dcmread(path)
