"""DICOM folders: group files into series and candidate volumes, check their geometry, reconstruct them.

Headers are read with pydicom without pixel data (fast on large series). Files are grouped by
SeriesInstanceUID, then into candidate volumes by slice orientation and image size, and -- only where
slice positions repeat -- by time (TemporalPositionIdentifier, EchoNumbers, AcquisitionNumber,
TriggerTime, DiffusionBValue). Each candidate is checked: equal rows/columns and pixel spacing, parallel
slices, no skew (gantry tilt), equal distance between neighbouring slices (missing, duplicate,
overlapping slices) and a single time point.

A regular candidate is reconstructed from the position and orientation tags, never from file order or
SliceThickness: slices sorted along the normal n = row x column cosines, origin = ImagePositionPatient of
the first slice, spacing = (column spacing, row spacing, mean distance between slices along n), direction
columns = (row cosines, column cosines, n). Physical space is DICOM's patient space, LPS mm.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import EXIT_BAD_INPUT, InputError

#: Slices whose row or column cosines differ by more than this angle belong to different candidate volumes.
ORIENTATION_GROUP_DEG = 10.0
#: Slices of one candidate are parallel when their normals differ by at most this angle.
PARALLEL_TOLERANCE_DEG = 0.05
#: Largest angle (degrees) between the slice normal and the line through the slice positions (skew).
SKEW_TOLERANCE_DEG = 0.05
#: Two slices whose positions along the normal differ by less than this share a position (mm).
SAME_POSITION_MM = 0.005
#: Slice distances are equal when they differ from the median by at most max(abs, rel * median).
SPACING_TOLERANCE_MM = 0.01
SPACING_TOLERANCE_RELATIVE = 0.005
#: Relative in-plane pixel spacing difference tolerated inside one volume.
PIXEL_SPACING_TOLERANCE_RELATIVE = 1e-4
#: A candidate needs at least this many slices to be a volume (fewer: localizer or stray slices).
MIN_SLICES = 3
#: Tags that separate time points / echoes when slice positions repeat, tried in this order.
TIME_KEYS = ("TemporalPositionIdentifier", "EchoNumbers", "AcquisitionNumber", "TriggerTime", "DiffusionBValue")
#: Metadata keys written into the reconstructed image.
META_VOLUME = "MultimodalPrealign.dicom_volume"
META_PATIENT_POSITION = "MultimodalPrealign.patient_position"
META_MODALITY = "MultimodalPrealign.modality"
#: How many file names a message lists before "and N more".
MAX_LISTED = 5

_HEADER_TAGS = [
    "SOPInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality", "PatientPosition",
    "Rows", "Columns", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness",
    "InstanceNumber", "RescaleSlope", "RescaleIntercept", "NumberOfFrames", "GantryDetectorTilt", "ImageType",
    "SamplesPerPixel", "FrameOfReferenceUID", *TIME_KEYS,
]


# ----------------------------------------------------------------------------------------------------------
# Data classes
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SliceHeader:
    """The header fields of one DICOM image file that matter for geometry."""

    path: str
    sop_uid: str
    series_uid: str
    series_number: str
    series_description: str
    modality: str
    patient_position: str
    rows: int
    columns: int
    pixel_spacing: tuple | None  # (row spacing, column spacing) mm, DICOM order
    orientation: np.ndarray | None  # 6 direction cosines: row (x) then column (y)
    position: np.ndarray | None  # ImagePositionPatient, LPS mm
    instance_number: int | None
    slope: float
    intercept: float
    number_of_frames: int
    gantry_tilt_deg: float | None
    slice_thickness: float | None
    time_tags: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def normal(self) -> np.ndarray:
        return _unit(np.cross(self.orientation[:3], self.orientation[3:]))


@dataclass
class Finding:
    """One check result. ``severity`` is 'problem' (the volume cannot be used as is) or 'note'."""

    code: str
    severity: str
    message: str
    files: list = field(default_factory=list)
    positions_mm: list = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {"code": self.code, "severity": self.severity, "message": self.message}
        if self.files:
            out["files"] = list(self.files)
        if self.positions_mm:
            out["positions_mm"] = [round(float(v), 4) for v in self.positions_mm]
        if self.details:
            out["details"] = self.details
        return out


@dataclass
class VolumeCandidate:
    """Slices of one series that share orientation, image size and (if positions repeat) time point."""

    label: str  # e.g. "series 3 volume 2"
    series_uid: str
    group: int  # orientation/size group inside the series; time-split siblings share it
    time_key: tuple  # ((tag, value), ...) that separated this time point, () when none was needed
    slices: list  # SliceHeader, sorted along the normal (when orientation is known)
    findings: list = field(default_factory=list)
    geometry: dict | None = None  # size/origin/spacing/direction of the reconstruction (regular only)
    spacing_histogram: list = field(default_factory=list)
    gantry_tilt_deg: float = 0.0

    @property
    def problems(self) -> list:
        return [f for f in self.findings if f.severity == "problem"]

    @property
    def is_volume(self) -> bool:
        return len(self.slices) >= MIN_SLICES

    @property
    def regular(self) -> bool:
        return self.is_volume and not self.problems

    def describe(self) -> str:
        first = self.slices[0]
        text = (f"{self.label}: {len(self.slices)} slices of {first.rows}x{first.columns}, "
                f"{_orientation_name(first.orientation)}")
        if self.time_key:
            text += ", " + ", ".join(f"{k} {v}" for k, v in self.time_key)
        return text

    def to_dict(self) -> dict:
        first = self.slices[0]
        return {
            "label": self.label,
            "description": self.describe(),
            "slices": len(self.slices),
            "rows": first.rows,
            "columns": first.columns,
            "orientation": _round_list(first.orientation, 6),
            "orientation_name": _orientation_name(first.orientation),
            "time_key": {k: v for k, v in self.time_key},
            "regular": self.regular,
            "gantry_tilt_deg": round(self.gantry_tilt_deg, 3),
            "spacing_histogram": self.spacing_histogram,
            "geometry": self.geometry,
            "findings": [f.to_dict() for f in self.findings],
            "files": [s.path for s in self.slices],
        }


@dataclass
class SeriesReport:
    uid: str
    number: str
    description: str
    modality: str
    patient_position: str
    files: int
    volumes: list = field(default_factory=list)
    findings: list = field(default_factory=list)

    def title(self) -> str:
        desc = f" '{self.description}'" if self.description else ""
        return f"series {self.number or '?'}{desc} ({self.modality or '?'}, {self.files} files)"

    def to_dict(self) -> dict:
        return {
            "series_instance_uid": self.uid, "series_number": self.number, "description": self.description,
            "modality": self.modality, "patient_position": self.patient_position, "files": self.files,
            "findings": [f.to_dict() for f in self.findings],
            "volumes": [v.to_dict() for v in self.volumes],
        }


@dataclass
class Selection:
    """Which volume ``read_dicom_volume`` uses, or why it refuses (problem + fix)."""

    volume: VolumeCandidate | None
    reason: str
    fix: str | None = None

    def to_dict(self) -> dict:
        return {"usable": self.volume is not None, "volume": self.volume.label if self.volume else None,
                "reason": self.reason, "fix": self.fix}


@dataclass
class DicomInspection:
    folder: str
    files_scanned: int
    non_dicom_files: list
    non_image_files: list
    series: list
    selection: Selection
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "folder": self.folder,
            "files_scanned": self.files_scanned,
            "non_dicom_files": self.non_dicom_files,
            "non_image_files": self.non_image_files,
            "series": [s.to_dict() for s in self.series],
            "selection": self.selection.to_dict(),
            "header_seconds": round(self.seconds, 3),
        }

    def volumes(self) -> list:
        return [v for s in self.series for v in s.volumes]


# ----------------------------------------------------------------------------------------------------------
# Header reading
# ----------------------------------------------------------------------------------------------------------


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    c = float(np.dot(_unit(a), _unit(b)))
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def _round_list(values, digits: int = 4) -> list:
    return [] if values is None else [round(float(v), digits) for v in np.asarray(values).ravel()]


def _floats(value, count: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        values = [float(v) for v in (value if hasattr(value, "__len__") and not isinstance(value, str) else [value])]
    except (TypeError, ValueError):
        return None
    return np.asarray(values, dtype=float) if len(values) == count and np.all(np.isfinite(values)) else None


def _number(value, default=None):
    try:
        return float(value) if value is not None and str(value).strip() != "" else default
    except (TypeError, ValueError):
        return default


def _text(value) -> str:
    if value is None:
        return ""
    if hasattr(value, "__len__") and not isinstance(value, str):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _list_files(folder: Path) -> list:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and name.upper() != "DICOMDIR":
                files.append(os.path.join(root, name))
    return files


def read_header(path: str) -> SliceHeader | None:
    """The geometry-relevant header of one file (no pixel data), or None when it is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, AttributeError):
        return None
    get = ds.get
    spacing = _floats(get("PixelSpacing"), 2)
    time_tags = {}
    for key in TIME_KEYS:
        value = _text(get(key))
        if value:
            time_tags[key] = value
    instance = _number(get("InstanceNumber"))
    return SliceHeader(
        path=str(path),
        sop_uid=_text(get("SOPInstanceUID")),
        series_uid=_text(get("SeriesInstanceUID")),
        series_number=_text(get("SeriesNumber")),
        series_description=_text(get("SeriesDescription")),
        modality=_text(get("Modality")),
        patient_position=_text(get("PatientPosition")),
        rows=int(_number(get("Rows"), 0)),
        columns=int(_number(get("Columns"), 0)),
        pixel_spacing=tuple(spacing.tolist()) if spacing is not None else None,
        orientation=_orientation(get("ImageOrientationPatient")),
        position=_floats(get("ImagePositionPatient"), 3),
        instance_number=int(instance) if instance is not None else None,
        slope=_number(get("RescaleSlope"), 1.0),
        intercept=_number(get("RescaleIntercept"), 0.0),
        number_of_frames=int(_number(get("NumberOfFrames"), 1) or 1),
        gantry_tilt_deg=_number(get("GantryDetectorTilt")),
        slice_thickness=_number(get("SliceThickness")),
        time_tags=time_tags,
    )


def _orientation(value) -> np.ndarray | None:
    cosines = _floats(value, 6)
    if cosines is None:
        return None
    row, col = cosines[:3], cosines[3:]
    if np.linalg.norm(row) < 0.5 or np.linalg.norm(col) < 0.5:
        return None
    return np.concatenate([_unit(row), _unit(col)])


# ----------------------------------------------------------------------------------------------------------
# Grouping
# ----------------------------------------------------------------------------------------------------------


def _group_by_orientation_and_size(slices: list) -> list:
    """Lists of slices sharing orientation (within ORIENTATION_GROUP_DEG) and rows x columns."""
    groups: list = []  # (reference orientation, rows, cols, members)
    for s in slices:
        for ref, rows, cols, members in groups:
            if (rows, cols) == (s.rows, s.columns) and _angle_deg(ref[:3], s.orientation[:3]) < ORIENTATION_GROUP_DEG \
                    and _angle_deg(ref[3:], s.orientation[3:]) < ORIENTATION_GROUP_DEG:
                members.append(s)
                break
        else:
            groups.append((s.orientation, s.rows, s.columns, [s]))
    return [members for _, _, _, members in groups]


def _position_along(slices: list, normal: np.ndarray) -> np.ndarray:
    return np.array([float(np.dot(s.position, normal)) for s in slices])


def _reference_normal(slices: list) -> np.ndarray:
    return slices[0].normal


def _has_repeated_positions(slices: list) -> bool:
    s = np.sort(_position_along(slices, _reference_normal(slices)))
    return bool(np.any(np.diff(s) < SAME_POSITION_MM))


def _time_sort_value(value):
    number = _number(value)
    return (0, number, "") if number is not None else (1, 0.0, str(value))


def _split_by_time(slices: list, key_so_far: tuple = ()) -> list:
    """[(time_key, slices)]: split where positions repeat, by the first time tag that separates them."""
    if len(slices) < 2 or not _has_repeated_positions(slices):
        return [(key_so_far, slices)]
    for key in TIME_KEYS:
        values = {s.time_tags.get(key) for s in slices}
        if len(values) < 2:
            continue
        parts: dict = {}
        for s in slices:
            parts.setdefault(s.time_tags.get(key), []).append(s)
        if min(len(p) for p in parts.values()) < MIN_SLICES:
            continue  # would shatter the series into single slices: not a time split
        out = []
        for value in sorted(parts, key=lambda v: _time_sort_value(v) if v is not None else (2, 0.0, "")):
            out.extend(_split_by_time(parts[value], key_so_far + ((key, value if value is not None else "none"),)))
        return out
    return [(key_so_far, slices)]


# ----------------------------------------------------------------------------------------------------------
# Checks on one candidate volume
# ----------------------------------------------------------------------------------------------------------


def _name_files(slices: list) -> str:
    names = [s.name for s in slices]
    text = ", ".join(names[:MAX_LISTED])
    if len(names) > MAX_LISTED:
        text += f" and {len(names) - MAX_LISTED} more"
    return text


def _check_candidate(candidate: VolumeCandidate) -> None:
    """Run every check, fill findings, spacing histogram, tilt and (when regular) the geometry."""
    slices = candidate.slices
    findings = candidate.findings
    normal = _reference_normal(slices)
    along = _position_along(slices, normal)
    order = np.argsort(along, kind="stable")
    slices[:] = [slices[i] for i in order]
    along = along[order]
    if not candidate.is_volume:
        findings.append(Finding("too_few_slices", "problem",
                                f"only {len(slices)} slice(s) ({_name_files(slices)}): not a volume "
                                "(a localizer or stray slices)", [s.path for s in slices]))
        return
    _check_size_and_pixel_spacing(slices, findings)
    _check_parallel(slices, findings)
    _check_positions(candidate, along, normal)
    if not candidate.problems:
        candidate.geometry = _geometry(slices, _position_along(slices, normal))  # after dropping copies


def _check_size_and_pixel_spacing(slices: list, findings: list) -> None:
    sizes = Counter((s.rows, s.columns) for s in slices)
    if len(sizes) > 1:  # cannot happen after grouping by size; kept for callers that group differently
        common = sizes.most_common(1)[0][0]
        odd = [s for s in slices if (s.rows, s.columns) != common]
        findings.append(Finding("mixed_image_size", "problem",
                                f"rows x columns differ: {dict((f'{r}x{c}', n) for (r, c), n in sizes.items())}; "
                                f"odd files: {_name_files(odd)}", [s.path for s in odd]))
    missing = [s for s in slices if s.pixel_spacing is None]
    if missing:
        findings.append(Finding("no_pixel_spacing", "problem",
                                f"{len(missing)} file(s) have no PixelSpacing: {_name_files(missing)}",
                                [s.path for s in missing]))
        return
    reference = np.asarray(Counter(s.pixel_spacing for s in slices).most_common(1)[0][0])
    odd = [s for s in slices
           if np.any(np.abs(np.asarray(s.pixel_spacing) - reference) > PIXEL_SPACING_TOLERANCE_RELATIVE * reference)]
    if odd:
        values = Counter(tuple(round(v, 5) for v in s.pixel_spacing) for s in slices)
        findings.append(Finding(
            "mixed_pixel_spacing", "problem",
            "pixel spacing differs between slices ("
            + ", ".join(f"{a:g} x {b:g} mm: {n} slices" for (a, b), n in values.most_common())
            + f"); odd files: {_name_files(odd)}",
            [s.path for s in odd], [], {"pixel_spacings_mm": [[a, b, n] for (a, b), n in values.most_common()]}))


def _check_parallel(slices: list, findings: list) -> None:
    normal = _reference_normal(slices)
    angles = np.array([_angle_deg(normal, s.normal) for s in slices])
    rows = np.array([_angle_deg(slices[0].orientation[:3], s.orientation[:3]) for s in slices])
    worst = float(max(angles.max(), rows.max()))
    if worst > PARALLEL_TOLERANCE_DEG:
        odd = [s for s, a, r in zip(slices, angles, rows) if max(a, r) > PARALLEL_TOLERANCE_DEG]
        findings.append(Finding("non_parallel_slices", "problem",
                                f"slice orientations differ by up to {worst:.2f} degrees "
                                f"(ImageOrientationPatient); files: {_name_files(odd)}",
                                [s.path for s in odd], [], {"max_angle_deg": round(worst, 4)}))


def _check_positions(candidate: VolumeCandidate, along: np.ndarray, normal: np.ndarray) -> None:
    slices, findings = candidate.slices, candidate.findings
    # Duplicates: the same instance stored twice is dropped; other repeated positions are problems.
    gaps = np.diff(along)
    same = gaps < SAME_POSITION_MM
    if np.any(same):
        _report_repeated(candidate, along, same)
        if candidate.problems:
            return
        along = _position_along(slices, normal)
        gaps = np.diff(along)
    _check_skew(candidate, normal)
    if len(gaps) == 0:
        return
    typical = float(np.median(gaps))
    tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_RELATIVE * typical)
    histogram = Counter(round(float(g), 3) for g in gaps)
    candidate.spacing_histogram = [{"spacing_mm": k, "count": n} for k, n in sorted(histogram.items())]
    odd = np.nonzero(np.abs(gaps - typical) > tolerance)[0]
    if len(odd) == 0:
        return
    missing, closer, uneven = [], [], []  # (gap index, text); missing also counts the slices lost
    missing_count = 0
    for i in odd:
        ratio = gaps[i] / typical
        where = (f"between {along[i]:.3f} and {along[i + 1]:.3f} mm ({slices[i].name}, {slices[i + 1].name}; "
                 f"gap {gaps[i]:.3f} mm)")
        if round(ratio) >= 2 and abs(ratio - round(ratio)) < 0.05:
            missing.append((i, f"{int(round(ratio)) - 1} {where}"))
            missing_count += int(round(ratio)) - 1
        elif ratio < 1:
            closer.append((i, where))
        else:
            uneven.append((i, where))
    for code, gap_list, headline in (
            ("missing_slices", missing, f"{missing_count} slice(s) missing (typical spacing {typical:.3f} mm): "),
            ("overlapping_slices", closer, f"{len(closer)} slice gap(s) shorter than the typical {typical:.3f} mm "
                                           "(extra or overlapping slices): "),
            ("uneven_spacing", uneven, f"{len(uneven)} slice gap(s) differ from the typical {typical:.3f} mm: ")):
        if gap_list:
            findings.append(_gap_finding(code, headline, gap_list, candidate, along, typical))


def _gap_finding(code: str, headline: str, gap_list: list, candidate: VolumeCandidate, along: np.ndarray,
                 typical: float) -> Finding:
    """A problem finding for irregular slice gaps (``gap_list``: (gap index, text)); the first MAX_LISTED are
    named, followed by the spacing histogram. Files: both slices of each gap."""
    slices = candidate.slices
    hist_text = ", ".join(f"{h['spacing_mm']:g} mm x{h['count']}" for h in candidate.spacing_histogram)
    return Finding(code, "problem",
                   headline + "; ".join(text for _, text in gap_list[:MAX_LISTED]) + f"; spacings: {hist_text}",
                   [p for i, _ in gap_list for p in (slices[i].path, slices[i + 1].path)],
                   [along[i] for i, _ in gap_list], {"typical_spacing_mm": round(typical, 4)})


def _report_repeated(candidate: VolumeCandidate, along: np.ndarray, same: np.ndarray) -> None:
    """Handle slices sharing a position: drop copies of one instance, report the rest."""
    slices = candidate.slices
    clusters: list = [[0]]
    for i, s in enumerate(same):
        if s:
            clusters[-1].append(i + 1)
        else:
            clusters.append([i + 1])
    keep = []
    dropped = []
    repeats = []
    for cluster in clusters:
        by_uid: dict = {}
        for i in cluster:
            by_uid.setdefault(slices[i].sop_uid or slices[i].path, []).append(i)
        for members in by_uid.values():
            keep.append(members[0])
            dropped.extend(members[1:])
        unique = [members[0] for members in by_uid.values()]
        if len(unique) > 1:
            repeats.append(unique)
    if dropped:
        candidate.findings.append(Finding(
            "same_instance_twice", "note",
            f"{len(dropped)} file(s) repeat an instance already present (same SOPInstanceUID) and were ignored: "
            f"{_name_files([slices[i] for i in dropped])}", [slices[i].path for i in dropped]))
    if repeats:
        positions = [float(along[r[0]]) for r in repeats]
        counts = Counter(len(r) for r in repeats)
        every = len(repeats) == len([c for c in clusters]) and len(counts) == 1
        files = [slices[i].path for r in repeats for i in r]
        listed = "; ".join(f"{along[r[0]]:.3f} mm: {_name_files([slices[i] for i in r])}" for r in repeats[:MAX_LISTED])
        if every:
            k = next(iter(counts))
            candidate.findings.append(Finding(
                "repeated_positions", "problem",
                f"every slice position appears {k} times and no tag (TemporalPositionIdentifier, EchoNumbers, "
                f"AcquisitionNumber, TriggerTime, DiffusionBValue) tells the {k} copies apart: several time points "
                f"or echoes in one series ({listed})", files, positions))
        else:
            candidate.findings.append(Finding(
                "duplicate_slices", "problem",
                f"{len(repeats)} position(s) hold more than one slice: {listed}", files, positions))
    candidate.slices[:] = [slices[i] for i in sorted(keep)]


def _check_skew(candidate: VolumeCandidate, normal: np.ndarray) -> None:
    slices = candidate.slices
    first, last = slices[0].position, slices[-1].position
    line = last - first
    if np.linalg.norm(line) < SAME_POSITION_MM:
        return
    tilt = _angle_deg(line, normal)
    tilt = min(tilt, 180.0 - tilt)
    candidate.gantry_tilt_deg = tilt
    tag = [s.gantry_tilt_deg for s in slices if s.gantry_tilt_deg]
    tag_text = f"; GantryDetectorTilt tag {tag[0]:g} degrees" if tag else ""
    if tilt > SKEW_TOLERANCE_DEG:
        candidate.findings.append(Finding(
            "skewed_slices", "problem",
            f"the slices are sheared: the line through the slice positions is {tilt:.2f} degrees off the slice "
            f"normal (gantry tilt{tag_text}); from {slices[0].name} to {slices[-1].name}",
            [slices[0].path, slices[-1].path], [], {"gantry_tilt_deg": round(tilt, 4)}))
        return
    # Positions must lie on the line (no jitter sideways).
    offsets = [s.position - first for s in slices]
    sideways = [float(np.linalg.norm(o - np.dot(o, normal) * normal)) for o in offsets]
    worst = int(np.argmax(sideways))
    limit = max(SPACING_TOLERANCE_MM, math.tan(math.radians(SKEW_TOLERANCE_DEG)) * float(np.linalg.norm(line)))
    if sideways[worst] > limit:
        candidate.findings.append(Finding(
            "positions_off_line", "problem",
            f"slice {slices[worst].name} lies {sideways[worst]:.3f} mm sideways of the stack's axis",
            [slices[worst].path]))


def _geometry(slices: list, along: np.ndarray) -> dict:
    """Size, origin, spacing and direction (LPS) from the position and orientation tags of sorted slices."""
    first = slices[0]
    row, col = first.orientation[:3], first.orientation[3:]
    normal = first.normal
    spacing_z = float((along[-1] - along[0]) / (len(slices) - 1)) if len(slices) > 1 else (first.slice_thickness or 1.0)
    direction = np.column_stack([row, col, normal])
    return {
        "size": [first.columns, first.rows, len(slices)],
        "origin_mm_lps": [float(v) for v in first.position],
        "spacing_mm": [float(first.pixel_spacing[1]), float(first.pixel_spacing[0]), spacing_z],
        "direction": [float(v) for v in direction.ravel()],
    }


# ----------------------------------------------------------------------------------------------------------
# Inspection of a folder
# ----------------------------------------------------------------------------------------------------------


def inspect_dicom(folder: str | os.PathLike) -> DicomInspection:
    """Scan ``folder`` (recursively, headers only) and check every series and candidate volume."""
    import time

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"The DICOM folder '{folder}' does not exist or is not a folder",
                         "give the folder that holds the series' .dcm files")
    started = time.perf_counter()
    paths = _list_files(folder)
    headers, non_dicom, non_image = [], [], []
    for path in paths:
        header = read_header(path)
        if header is None:
            non_dicom.append(path)
        elif header.position is None or header.orientation is None or header.rows <= 0:
            non_image.append(path)
        else:
            headers.append(header)
    by_series: dict = {}
    for h in headers:
        by_series.setdefault(h.series_uid, []).append(h)
    series = [_inspect_series(i + 1, members) for i, members in enumerate(
        sorted(by_series.values(), key=lambda m: (_number(m[0].series_number, 1e9), m[0].series_uid)))]
    inspection = DicomInspection(str(folder), len(paths), non_dicom, non_image, series, Selection(None, ""))
    inspection.selection = _select(inspection)
    inspection.seconds = time.perf_counter() - started
    return inspection


def _inspect_series(index: int, members: list) -> SeriesReport:
    first = members[0]
    report = SeriesReport(first.series_uid, first.series_number, first.series_description, first.modality,
                          first.patient_position, len(members))
    label = f"series {first.series_number or index}"
    multiframe = [m for m in members if m.number_of_frames > 1]
    if multiframe:
        report.findings.append(Finding(
            "multi_frame", "problem",
            f"{len(multiframe)} multi-frame file(s) ({_name_files(multiframe)}); only one-slice-per-file series "
            "are reconstructed here", [m.path for m in multiframe]))
    groups = _group_by_orientation_and_size([m for m in members if m.number_of_frames <= 1])
    groups.sort(key=len, reverse=True)
    number = 0
    for g, group in enumerate(groups):
        parts = _split_by_time(group)
        if len(parts) > 1:
            keys = sorted({k for key, _ in parts for k, _ in key})
            report.findings.append(Finding(
                "multiple_time_points", "note",
                f"{len(parts)} time points / echoes share the slice positions of one stack "
                f"(told apart by {', '.join(keys)}): split into {len(parts)} volumes",
                details={"volumes": len(parts), "tags": keys}))
        for time_key, part in parts:
            number += 1
            candidate = VolumeCandidate(f"{label} volume {number}", first.series_uid, g, time_key, list(part))
            _check_candidate(candidate)
            report.volumes.append(candidate)
        if len(parts) == 1:
            _note_unsplit_time_tags(group, report)
    if len(groups) > 1:
        report.findings.append(Finding(
            "several_orientations_or_sizes", "note",
            f"the series holds {len(groups)} stacks with different orientation or image size: "
            + "; ".join(f"{_orientation_name(gr[0].orientation)} {gr[0].rows}x{gr[0].columns}: {len(gr)} slices"
                        for gr in groups)))
    return report


def _note_unsplit_time_tags(group: list, report: SeriesReport) -> None:
    for key in TIME_KEYS:
        values = {s.time_tags.get(key) for s in group}
        if len(values) > 1:
            report.findings.append(Finding(
                "time_tags_vary", "note",
                f"{key} takes {len(values)} values but no slice position repeats: kept as one volume"))


def _orientation_name(orientation) -> str:
    """'axial', 'coronal', 'sagittal' (closest plane of the normal) or 'oblique' when > 10 degrees off."""
    if orientation is None:
        return "unknown"
    normal = _unit(np.cross(orientation[:3], orientation[3:]))
    axis = int(np.argmax(np.abs(normal)))
    name = ("sagittal", "coronal", "axial")[axis]
    off = math.degrees(math.acos(min(1.0, abs(float(normal[axis])))))
    return name if off <= ORIENTATION_GROUP_DEG else f"oblique (near {name}, {off:.0f} degrees off)"


def _select(inspection: DicomInspection) -> Selection:
    """The volume a reader should use: unique, or the first time point of one stack; else why not."""
    if not inspection.series:
        if inspection.files_scanned == 0:
            return Selection(None, "the folder holds no files", "give the folder that holds the series' .dcm files")
        return Selection(None, f"none of the {inspection.files_scanned} files is a DICOM image with position and "
                               "orientation tags", "give a folder with a CT or MR image series")
    with_volumes = [s for s in inspection.series if any(v.is_volume for v in s.volumes)]
    if not with_volumes:
        multiframe = [f for s in inspection.series for f in s.findings if f.code == "multi_frame"]
        if multiframe:
            return Selection(None, "the folder holds multi-frame (enhanced) DICOM files",
                             "convert them to NIfTI or NRRD (e.g. load in 3D Slicer and save, or dcm2niix) "
                             "and pass that file")
        return Selection(None, "no series in the folder has at least 3 slices of one orientation",
                         "give the folder of a 3D series (not a localizer)")
    if len(with_volumes) > 1:
        return Selection(None, f"the folder holds {len(with_volumes)} series with volumes ("
                         + "; ".join(s.title() for s in with_volumes) + ")",
                         "put each series in its own folder and pass one (inspect-dicom lists the files)")
    series = with_volumes[0]
    volumes = [v for v in series.volumes if v.is_volume]
    groups = {v.group for v in volumes}
    if len(groups) > 1:
        return Selection(None, f"{series.title()} holds {len(volumes)} volumes of different orientation or image "
                         "size (" + "; ".join(v.describe() for v in volumes) + ")",
                         "move the files of the wanted volume into their own folder "
                         "(`multimodal-prealign inspect-dicom DIR` lists them)")
    chosen = volumes[0]  # time points are sorted; the first one is used
    if not chosen.regular:
        problems = "; ".join(f.message for f in chosen.problems)
        return Selection(None, f"{series.title()}, {chosen.label} is not a regular volume: {problems}",
                         _fix_for(chosen.problems))
    reason = f"used {chosen.describe()} of {series.title()}"
    if len(volumes) > 1:
        reason += f" (the first of {len(volumes)} time points / echoes)"
    return Selection(chosen, reason)


def _fix_for(problems: list) -> str:
    codes = {p.code for p in problems}
    if "skewed_slices" in codes:
        return ("resample the series onto a regular grid first (3D Slicer's DICOM module does this with "
                "'Acquisition geometry regularization' enabled; dcm2niix corrects gantry tilt) and pass the result")
    if codes & {"missing_slices", "duplicate_slices", "overlapping_slices", "uneven_spacing"}:
        return ("export the complete series again from the scanner/PACS, or remove the extra files; "
                "a volume with uneven slices must be resampled (e.g. 3D Slicer's acquisition geometry "
                "regularization) before it can be registered")
    if "repeated_positions" in codes:
        return "separate the time points / echoes into their own folders and pass one"
    if codes & {"mixed_pixel_spacing", "mixed_image_size", "non_parallel_slices"}:
        return "remove the odd files named above (they belong to another acquisition) or export the series again"
    return "export the series again or convert it to NRRD/NIfTI with 3D Slicer"


# ----------------------------------------------------------------------------------------------------------
# Reading a volume
# ----------------------------------------------------------------------------------------------------------


def read_dicom_volume(folder: str | os.PathLike) -> sitk.Image:
    """The one regular volume in a DICOM folder as a SimpleITK image (LPS geometry from the tags).

    Refuses irregular or ambiguous folders with an InputError naming the reason and the fix; takes the
    first time point when a series holds several. Metadata keys ``MultimodalPrealign.dicom_volume``
    (which volume was used), ``MultimodalPrealign.patient_position`` (HFS, FFS, ...) and
    ``MultimodalPrealign.modality`` are set, as are the DICOM tags 0008|0060 and 0018|5100.
    """
    inspection = inspect_dicom(folder)
    selection = inspection.selection
    if selection.volume is None:
        raise InputError(f"Cannot use the DICOM folder '{folder}': {selection.reason}", selection.fix)
    return build_volume(selection.volume, selection.reason)


def build_volume(candidate: VolumeCandidate, description: str = "") -> sitk.Image:
    """Read the pixel data of a regular candidate (rescale applied) and give it the derived geometry."""
    if candidate.geometry is None:
        raise InputError(f"{candidate.label} is not a regular volume",
                         _fix_for(candidate.problems) if candidate.problems else None)
    array = _read_pixels(candidate.slices)
    image = sitk.GetImageFromArray(array)
    geometry = candidate.geometry
    image.SetOrigin(geometry["origin_mm_lps"])
    image.SetSpacing(geometry["spacing_mm"])
    image.SetDirection(geometry["direction"])
    first = candidate.slices[0]
    image.SetMetaData(META_VOLUME, description or candidate.describe())
    if first.patient_position:
        image.SetMetaData(META_PATIENT_POSITION, first.patient_position)
        image.SetMetaData("0018|5100", first.patient_position)
    if first.modality:
        image.SetMetaData(META_MODALITY, first.modality)
        image.SetMetaData("0008|0060", first.modality)
    if first.series_description:
        image.SetMetaData("0008|103e", first.series_description)
    image.SetMetaData("0020|000e", first.series_uid)
    return image


def _read_pixels(slices: list) -> np.ndarray:
    """(slices, rows, columns) array with RescaleSlope/Intercept applied, in the smallest exact type."""
    import pydicom

    first = slices[0]
    stored = None
    try:
        for k, s in enumerate(slices):
            pixels = pydicom.dcmread(s.path).pixel_array
            if pixels.shape != (first.rows, first.columns):
                raise InputError(f"DICOM file '{s.path}' holds {pixels.shape} pixels, not one grey-level slice of "
                                 f"{first.rows} x {first.columns}", "give a grey-level CT or MR series")
            if stored is None:
                stored = np.empty((len(slices), *pixels.shape), dtype=pixels.dtype)
            stored[k] = pixels
    except InputError:
        raise
    except Exception:  # noqa: BLE001 - compressed transfer syntax without a pydicom decoder: let GDCM decode
        return _read_pixels_gdcm(slices)
    return _rescale(stored, np.array([s.slope for s in slices]), np.array([s.intercept for s in slices]))


def _rescale(stored: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray) -> np.ndarray:
    """stored * slope + intercept per slice, in the smallest integer type that holds it exactly, else float32."""
    if np.all(slopes == 1.0) and np.all(intercepts == 0.0):
        return stored
    integral = np.all(np.mod(slopes, 1) == 0) and np.all(np.mod(intercepts, 1) == 0)
    if integral and np.issubdtype(stored.dtype, np.integer):
        ends = np.array([float(stored.min()), float(stored.max())])
        values = ends[None, :] * slopes[:, None] + intercepts[:, None]  # range of every slice's values
        lo, hi = float(values.min()), float(values.max())
        for dtype in (np.int16, np.uint16, np.int32):
            info = np.iinfo(dtype)
            if lo >= info.min and hi <= info.max:
                out = np.empty(stored.shape, dtype=dtype)
                for k in range(stored.shape[0]):
                    out[k] = stored[k].astype(np.int64) * int(slopes[k]) + int(intercepts[k])
                return out
    out = np.empty(stored.shape, dtype=np.float32)
    for k in range(stored.shape[0]):
        out[k] = stored[k].astype(np.float32) * np.float32(slopes[k]) + np.float32(intercepts[k])
    return out


def _read_pixels_gdcm(slices: list) -> np.ndarray:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([s.path for s in slices])
    try:
        image = reader.Execute()
    except RuntimeError as err:
        last_line = str(err).strip().splitlines()[-1][:100]
        raise InputError(f"Cannot decode the pixel data of the DICOM series ({last_line})",
                         "convert the series to NRRD or NIfTI (e.g. in 3D Slicer) and pass that file") from None
    return sitk.GetArrayFromImage(image)


# ----------------------------------------------------------------------------------------------------------
# Text report and CLI
# ----------------------------------------------------------------------------------------------------------


def format_inspection(inspection: DicomInspection) -> str:
    """Plain-text report: series, candidate volumes, findings, and which volume would be used."""
    lines = [f"DICOM folder {inspection.folder}: {inspection.files_scanned} files, "
             f"{len(inspection.series)} image series (headers read in {inspection.seconds:.2f} s)"]
    if inspection.non_dicom_files:
        lines.append(f"  {len(inspection.non_dicom_files)} non-DICOM file(s) ignored")
    if inspection.non_image_files:
        lines.append(f"  {len(inspection.non_image_files)} DICOM file(s) without image position/orientation "
                     "ignored (reports, structure sets, ...)")
    for series in inspection.series:
        lines.append("")
        lines.append(f"{series.title()}, patient position {series.patient_position or 'unknown'}")
        lines.append(f"  SeriesInstanceUID {series.uid}")
        for f in series.findings:
            lines.append(f"  {f.severity.upper()}: {f.message}")
        for volume in series.volumes:
            state = "regular" if volume.regular else "NOT usable"
            lines.append(f"  {volume.describe()} -> {state}")
            if volume.geometry:
                g = volume.geometry
                lines.append("    origin (LPS mm) " + ", ".join(f"{v:.3f}" for v in g["origin_mm_lps"])
                             + "; spacing (mm) " + " x ".join(f"{v:.4g}" for v in g["spacing_mm"])
                             + "; size " + " x ".join(str(v) for v in g["size"]))
            if volume.spacing_histogram and len(volume.spacing_histogram) > 1:
                lines.append("    slice spacing histogram: " + ", ".join(
                    f"{h['spacing_mm']:g} mm x{h['count']}" for h in volume.spacing_histogram))
            if volume.gantry_tilt_deg > SKEW_TOLERANCE_DEG:
                lines.append(f"    gantry tilt {volume.gantry_tilt_deg:.2f} degrees")
            for f in volume.findings:
                lines.append(f"    {f.severity.upper()}: {f.message}")
    lines.append("")
    selection = inspection.selection
    if selection.volume is not None:
        lines.append("Registration input: " + selection.reason)
    else:
        lines.append(f"Registration input: REFUSED: {selection.reason}."
                     + (f" Fix: {selection.fix}." if selection.fix else ""))
    return "\n".join(lines)


def _run_inspect(args) -> int:
    inspection = inspect_dicom(args.folder)
    if args.json:
        print(json.dumps(inspection.to_dict(), indent=2))
    else:
        print(format_inspection(inspection))
    return 0 if inspection.selection.volume is not None else EXIT_BAD_INPUT


def add_cli(subparsers) -> None:
    """Register ``inspect-dicom DIR [--json]`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "inspect-dicom", help="check whether a DICOM folder can be stacked into a volume",
        description="Group a DICOM folder into series and candidate volumes and check each: equal image size "
                    "and pixel spacing, parallel slices, gantry tilt, missing/duplicate/uneven slices, time "
                    "points. Exit code 0 when a volume can be used for registration, 2 when not (bad input: the report "
                    "says why and how to fix it).")
    p.add_argument("folder", metavar="DIR", help="folder with the DICOM files (searched recursively)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(handler=_run_inspect)
