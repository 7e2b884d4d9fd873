"""Landmarks (point lists) and target registration error (TRE).

Readers return points in physical LPS mm, whatever the file stores:

- Slicer markups JSON (``.mrk.json`` / ``.json``): ``markups[].coordinateSystem`` "LPS" or "RAS"
  (Slicer writes LPS since 4.11; RAS assumed when the field is absent, as older files were RAS).
- Slicer ``.fcsv``: header ``# CoordinateSystem = LPS`` / ``RAS`` or the old numeric form ``0`` (RAS) /
  ``1`` (LPS); a file without that line is RAS (pre-4.11 Slicer).
- CSV of points (``label,x,y,z``) or of PAIRED points (``label,fixed_x,fixed_y,fixed_z,moving_x,moving_y,
  moving_z``). The coordinate system must be stated: a ``coordinate_system`` column (LPS/RAS per row) or a
  first line ``# CoordinateSystem = LPS`` (or RAS). Without it the file is refused.

TRE: for a pair (fixed point p, moving point q) of the same anatomical point and a fixed->moving transform T,
TRE = |T(p) - q| in mm (measured in the moving image's space; equal to the fixed-space distance for rigid T).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..geometry.transforms import LPS_RAS_SIGNS, transform_points


@dataclass
class PointList:
    """Named points in physical LPS mm."""

    labels: list
    points_lps: np.ndarray  # N x 3
    source: str = ""
    coordinate_system_in_file: str = "LPS"


@dataclass
class LandmarkPairs:
    """Corresponding points: ``fixed_lps[i]`` (fixed image space) is the same anatomy as ``moving_lps[i]``."""

    labels: list
    fixed_lps: np.ndarray
    moving_lps: np.ndarray
    sources: list = field(default_factory=list)


def _to_lps(points: np.ndarray, system: str) -> np.ndarray:
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    return points * LPS_RAS_SIGNS if system == "RAS" else points


def _system_name(value, path: Path) -> str:
    text = str(value).strip().upper()
    if text in ("LPS", "1"):
        return "LPS"
    if text in ("RAS", "0"):
        return "RAS"
    raise InputError(f"Landmark file '{path}' states an unknown coordinate system '{value}'",
                     "use LPS or RAS (Slicer writes LPS)")


def read_markups_json(path: str | os.PathLike) -> PointList:
    """Slicer markups JSON: the control points of the first markup (all points if several lists)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        markups = data["markups"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"Cannot read '{path}' as a Slicer markups JSON file ({type(err).__name__})",
                         "export the points from Slicer's Markups module as .mrk.json") from None
    labels, points = [], []
    system = "LPS"
    for markup in markups:
        system = _system_name(markup.get("coordinateSystem", "RAS"), path)
        for cp in markup.get("controlPoints", []):
            if "position" not in cp:
                continue
            labels.append(str(cp.get("label") or f"P{len(labels) + 1}"))
            points.append(_to_lps(cp["position"], system)[0])
    return _point_list(labels, points, path, system)


def read_fcsv(path: str | os.PathLike) -> PointList:
    """Slicer fiducial CSV (.fcsv) with its ``# CoordinateSystem`` header (RAS when absent)."""
    path = Path(path)
    text = _read_text(path)
    system = "RAS"
    columns = ["id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc",
               "associatedNodeID"]
    rows = []
    for line in text.splitlines():
        if line.startswith("#"):
            match = re.match(r"#\s*CoordinateSystem\s*=\s*(\S+)", line)
            if match:
                system = _system_name(match.group(1), path)
            match = re.match(r"#\s*columns\s*=\s*(.+)", line)
            if match:
                columns = [c.strip() for c in match.group(1).split(",")]
            continue
        if line.strip():
            rows.append(next(csv.reader([line])))
    try:
        ix, iy, iz = columns.index("x"), columns.index("y"), columns.index("z")
        il = columns.index("label") if "label" in columns else None
        points = [_to_lps([float(r[ix]), float(r[iy]), float(r[iz])], system)[0] for r in rows]
        labels = [r[il] if il is not None and il < len(r) and r[il] else f"P{k + 1}" for k, r in enumerate(rows)]
    except (ValueError, IndexError):
        raise InputError(f"Cannot read the points in '{path}' (bad .fcsv row)",
                         "export the points from Slicer's Markups module") from None
    return _point_list(labels, points, path, system)


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as err:
        raise InputError(f"Cannot read landmark file '{path}' ({err.strerror})", "check the path") from None


def _point_list(labels, points, path: Path, system: str) -> PointList:
    if not points:
        raise InputError(f"Landmark file '{path}' holds no points", "give a file with at least one point")
    return PointList([str(label) for label in labels], np.asarray(points, dtype=float).reshape(-1, 3),
                     str(path), system)


def _csv_rows(path: Path) -> tuple[str | None, list[dict]]:
    text = _read_text(path)
    system = None
    lines = []
    for line in text.splitlines():
        match = re.match(r"#\s*CoordinateSystem\s*=\s*(\S+)", line)
        if match:
            system = _system_name(match.group(1), path)
        elif line.strip() and not line.startswith("#"):
            lines.append(line)
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
    return system, rows


def _row_system(row: dict, file_system: str | None, path: Path) -> str:
    value = row.get("coordinate_system") or row.get("coordinatesystem") or file_system
    if value is None:
        raise InputError(f"Landmark CSV '{path}' does not state its coordinate system",
                         "add a first line '# CoordinateSystem = LPS' (or RAS), or a coordinate_system column")
    return _system_name(value, path)


def read_csv_points(path: str | os.PathLike) -> PointList | LandmarkPairs:
    """CSV of points (label,x,y,z) -> PointList, or of paired points (fixed_x.., moving_x..) -> LandmarkPairs."""
    path = Path(path)
    system, rows = _csv_rows(path)
    if not rows:
        raise InputError(f"Landmark CSV '{path}' holds no points", "give a header line and one row per point")
    paired = all(k in rows[0] for k in ("fixed_x", "fixed_y", "fixed_z", "moving_x", "moving_y", "moving_z"))
    single = all(k in rows[0] for k in ("x", "y", "z"))
    if not paired and not single:
        raise InputError(f"Landmark CSV '{path}' lacks coordinate columns",
                         "use columns label,x,y,z or label,fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z")
    labels, fixed, moving = [], [], []
    systems = [_row_system(row, system, path) for row in rows]
    try:
        for k, (row, row_system) in enumerate(zip(rows, systems)):
            labels.append(row.get("label") or row.get("name") or f"P{k + 1}")
            if paired:
                fixed.append(_to_lps([float(row[f"fixed_{a}"]) for a in "xyz"], row_system)[0])
                moving.append(_to_lps([float(row[f"moving_{a}"]) for a in "xyz"], row_system)[0])
            else:
                fixed.append(_to_lps([float(row[a]) for a in "xyz"], row_system)[0])
    except ValueError:
        raise InputError(f"Landmark CSV '{path}' has a non-numeric coordinate (row {len(labels)})",
                         "write coordinates as plain numbers in mm") from None
    if paired:
        return LandmarkPairs(labels, np.asarray(fixed), np.asarray(moving), [str(path)])
    return PointList(labels, np.asarray(fixed), str(path), system or "per-row")


def read_points(path: str | os.PathLike) -> PointList | LandmarkPairs:
    """Read a landmark file by its extension (.mrk.json/.json, .fcsv, .csv/.txt)."""
    path = Path(path)
    name = path.name.lower()
    if not path.is_file():
        raise InputError(f"Landmark file '{path}' does not exist", "check the path")
    if name.endswith(".json"):
        return read_markups_json(path)
    if name.endswith(".fcsv"):
        return read_fcsv(path)
    if name.endswith((".csv", ".txt", ".tsv")):
        return read_csv_points(path)
    raise InputError(f"Unknown landmark file type '{path.name}'", "give a .mrk.json, .fcsv or .csv file")


def pair_point_lists(fixed: PointList, moving: PointList) -> LandmarkPairs:
    """Pair two point lists by label (when the labels are unique and shared), else by order."""
    fixed_labels, moving_labels = list(fixed.labels), list(moving.labels)
    unique = len(set(fixed_labels)) == len(fixed_labels) and len(set(moving_labels)) == len(moving_labels)
    shared = [label for label in fixed_labels if label in set(moving_labels)]
    if unique and shared:
        fi = [fixed_labels.index(label) for label in shared]
        mi = [moving_labels.index(label) for label in shared]
        return LandmarkPairs(shared, fixed.points_lps[fi], moving.points_lps[mi], [fixed.source, moving.source])
    if len(fixed_labels) != len(moving_labels):
        raise InputError(f"The landmark lists have {len(fixed_labels)} and {len(moving_labels)} points and no "
                         "shared unique labels", "give both lists the same labels, or the same points in order")
    return LandmarkPairs(fixed_labels, fixed.points_lps, moving.points_lps, [fixed.source, moving.source])


def load_landmark_pairs(fixed_path: str | os.PathLike, moving_path: str | os.PathLike | None = None) -> LandmarkPairs:
    """Pairs from one paired CSV, or from two point files (fixed image points, moving image points)."""
    first = read_points(fixed_path)
    if isinstance(first, LandmarkPairs):
        return first
    if moving_path is None:
        raise InputError(f"'{fixed_path}' holds points of one image only",
                         "also give the moving image's landmark file, or a CSV with fixed_x..moving_z columns")
    second = read_points(moving_path)
    if isinstance(second, LandmarkPairs):
        raise InputError(f"'{moving_path}' holds paired points", "give it alone as the landmark file")
    return pair_point_lists(first, second)


def target_registration_error(pairs: LandmarkPairs, fixed_to_moving: sitk.Transform) -> dict:
    """Per-point TRE |T(p_fixed) - p_moving| (mm) and its mean/median/max."""
    mapped = transform_points(fixed_to_moving, pairs.fixed_lps)
    errors = np.linalg.norm(mapped - pairs.moving_lps, axis=1)
    points = [{"label": str(label), "tre_mm": round(float(e), 3)} for label, e in zip(pairs.labels, errors)]
    return {"points": points, "count": int(errors.size),
            "mean_tre_mm": round(float(errors.mean()), 3), "median_tre_mm": round(float(np.median(errors)), 3),
            "max_tre_mm": round(float(errors.max()), 3)}


def write_markups_json(points: PointList, path: str | os.PathLike) -> None:
    """Write a Slicer markups JSON (LPS) for the points (e.g. landmarks mapped onto the fixed image)."""
    data = {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                       "Resources/Schema/markups-schema-v1.0.3.json#",
            "markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "controlPoints": [
                {"label": str(label), "position": [float(v) for v in p]}
                for label, p in zip(points.labels, points.points_lps)]}]}
    Path(path).write_text(json.dumps(data, indent=2))
