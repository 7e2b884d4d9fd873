"""The structures of the fixed (and optionally the moving) image, BY NAME: a label map plus {name: label values}.

Sources, in the order a name is looked for:

* a Slicer segmentation (``.seg.nrrd``, also a plain ``.nrrd`` carrying ``SegmentN_Name`` keys): segment names,
  as drawn in the Segment Editor (any names, e.g. ``femur``, ``tibia``, ``patella``);
* a multi-label NIfTI with TotalSegmentator's embedded label table: its names;
* TotalSegmentator's folder of per-structure masks: the file names;
* a plain label map with a known TotalSegmentator task (``--fixed-labels-task`` or inferred): the task's class
  names (``femur_left``, ``hip_right``, ``vertebrae_L1`` ...);
* any label map: the label value itself names the structure (``--per-structure 3`` or ``label_3``).

Unlike ``io.labels.load_labels`` (which re-numbers a label map to one TotalSegmentator task and drops other
names, as anatomy pre-alignment needs), nothing is re-numbered or dropped here: a knee segmentation with femur,
tibia, fibula and patella keeps all four. Label maps may lie on any grid of their image's physical space (LPS mm).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..io import labels as io_labels
from ..io.image_io import check_image, check_label_grid, read_image_file

#: ``--per-structure all`` / ``perStructure="all"``.
ALL = "all"
#: Label map pixel types kept as they are (others become UInt16): a 600^3 UInt8 map stays 216 MB.
KEPT_TYPES = (sitk.sitkUInt8, sitk.sitkUInt16)


@dataclass
class StructureLabels:
    """A label map (UInt8 or UInt16, in its image's physical space) and the names of its structures.

    ``names``: structure name -> label values (a name may cover several values, e.g. a TotalSegmentator group);
    ``source``: where the names came from (report.json); ``path``: the file, when read from one.
    """

    image: sitk.Image
    names: dict = field(default_factory=dict)
    source: str = ""
    path: str | None = None

    def present(self) -> dict:
        """{name: values} of the structures that have at least one voxel, in label-value order."""
        values = set(np.unique(sitk.GetArrayViewFromImage(self.image)).tolist()) - {0}
        named = {name: [v for v in ids if v in values] for name, ids in self.names.items()}
        out = {name: ids for name, ids in named.items() if ids}
        for value in sorted(values - {v for ids in self.names.values() for v in ids}):
            out[f"label_{value}"] = [int(value)]
        return dict(sorted(out.items(), key=lambda item: min(item[1])))

    def values_for(self, name: str) -> list[int] | None:
        """Label values of ``name`` (a structure name, ``label_<v>`` or a bare label value ``<v>``); None when
        unknown."""
        if name in self.names:
            return list(self.names[name])
        match = re.fullmatch(r"(?:label_)?(\d+)", name.strip())
        if match:
            return [int(match.group(1))]
        return None


def _table_names(table: dict[int, str] | None) -> dict[str, list[int]]:
    names: dict[str, list[int]] = {}
    for value, name in sorted((table or {}).items()):
        names.setdefault(str(name), []).append(int(value))
    return names


def from_label_image(image: sitk.Image, task: str | None = None, table: dict[int, str] | None = None,
                     source: str | None = None) -> StructureLabels:
    """Structure labels of an in-memory label map: names from ``table`` ({value: name}), else from its own
    segmentation metadata (``SegmentN_Name``), else from TotalSegmentator ``task``, else label values."""
    if table is None and any(k.startswith("Segment") for k in image.GetMetaDataKeys()):
        table = io_labels.read_segmentation_names(image)
        source = source or "segment names"
    image = image if image.GetPixelID() in KEPT_TYPES else sitk.Cast(image, sitk.sitkUInt16)
    if table:
        return StructureLabels(image, _table_names(table), source or "label names")
    if task is not None:
        return StructureLabels(image, _table_names(io_labels.task_names(task)),
                               source or f"TotalSegmentator task '{task}'")
    return StructureLabels(image, {}, source or "label values")


def read_structure_labels(path: str | os.PathLike, reference: sitk.Image, which: str = "fixed",
                          task: str | None = None) -> StructureLabels:
    """Read the structure labels of the ``which`` image ("fixed" or "moving") from ``path``, names kept.

    ``reference``: that image (the label map must cover its space; a label map on the image's own grid or on a
    coarser grid of the same extent both work). ``task``: the TotalSegmentator task of a plain label map (names of
    its values), else inferred from the values as ``io.labels`` does. One-line InputError for anything unusable.
    """
    path = Path(path)
    name = f"{which} label map"
    if not path.exists():
        raise InputError(f"The {name} '{path}' does not exist", "check the path")
    if path.is_dir():
        return _read_mask_folder(path, reference, name, which)
    raw = read_image_file(path, name)
    if raw.GetNumberOfComponentsPerPixel() > 1 or (raw.GetDimension() == 4 and raw.GetSize()[3] > 1):
        raw, table = io_labels._flatten_segmentation(raw)  # a multi-layer Slicer segmentation
        source = "segment names"
    else:
        table = io_labels.read_nifti_label_table(path)
        source = "TotalSegmentator label table" if table else None
        if not table:
            table = io_labels.read_segmentation_names(raw)
            source = "segment names" if table else None
    raw = check_image(raw, name, allow_labels=True)
    array = sitk.GetArrayViewFromImage(raw)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.mod(array, 1) == 0):
        raise InputError(f"The {name} holds non-integer values", "give an integer label map or a segmentation")
    if float(array.min()) < 0:
        raise InputError(f"The {name} holds negative values", "give a label map with labels >= 0")
    check_covers(raw, reference, name, f"{which} image")
    if not np.any(array):
        raise InputError(f"The {name} '{path}' is empty (every voxel is 0)",
                         f"give the label map or segmentation made for the {which} image")
    labels = raw if raw.GetPixelID() in KEPT_TYPES else sitk.Cast(raw, sitk.sitkUInt16)
    if not table and task is None:
        task, _reason = io_labels.infer_task(labels, reference if io_labels_same_grid(labels, reference) else None)
    out = from_label_image(labels, task, table, source)
    out.path = str(path.resolve())
    return out


def io_labels_same_grid(labels: sitk.Image, image: sitk.Image) -> bool:
    """True when ``labels`` lies on ``image``'s grid (then the image can help tell its TotalSegmentator task)."""
    return labels.GetSize() == image.GetSize() and np.allclose(labels.GetSpacing(), image.GetSpacing(), rtol=1e-3)


def check_covers(labels: sitk.Image, image: sitk.Image, label_name: str, image_name: str) -> None:
    """A label map on its image's grid (checked as ``io``'s label maps are), or on another grid in the same space
    covering the same box within half a voxel of either grid; else a one-line InputError."""
    if io_labels_same_grid(labels, image):
        check_label_grid(labels, image, label_name, image_name)
        return
    from ..geometry.image_space import bounding_box

    a, b = bounding_box(labels), bounding_box(image)
    tolerance = 0.5 * max(max(labels.GetSpacing()), max(image.GetSpacing())) + 1e-3
    if np.any(np.abs(np.asarray(a.lower) - b.lower) > tolerance) or np.any(np.abs(np.asarray(a.upper) - b.upper)
                                                                           > tolerance):
        raise InputError(f"The {label_name} does not cover the {image_name}'s space (its box "
                         f"{a.to_dict()} vs the image's {b.to_dict()}, LPS mm)",
                         f"give a label map made on the {image_name} (same origin, size x spacing and direction)")


def _read_mask_folder(folder: Path, reference: sitk.Image, name: str, which: str) -> StructureLabels:
    """A folder of binary masks (TotalSegmentator's per-structure output or any named masks): file names are the
    structure names; empty masks are skipped; later files win where masks overlap."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and io_labels._mask_name(p))
    if not files:
        raise InputError(f"The {name} '{folder}' holds no mask files",
                         "point it at a folder of masks (femur.nii.gz, tibia.nii.gz, ...) or at one label file")
    out = None
    names: dict[str, list[int]] = {}
    for value, path in enumerate(files, start=1):
        mask = read_image_file(path, f"mask {path.name}")
        check_label_grid(mask, reference, f"mask '{path.name}' of the {name}", f"{which} image")
        inside = sitk.GetArrayViewFromImage(mask) > 0
        if not inside.any():
            continue
        if out is None:
            out = np.zeros(inside.shape, np.uint16)
        out[inside] = value
        names[io_labels._mask_name(path)] = [value]
    if out is None:
        raise InputError(f"Every mask in the {name} '{folder}' is empty", f"give masks of the {which} image")
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(reference)
    return StructureLabels(image, names, "mask file names", str(folder.resolve()))


def select(labels: StructureLabels, requested) -> tuple[list[tuple[str, list[int]]], list[tuple[str, str]]]:
    """([(name, label values)] to register, [(name, one-line problem)]) for ``requested`` names (or ``"all"``).

    ``"all"``: every named structure present in the label map. Unknown names are problems (with the names that
    exist); the other structures still run.
    """
    requested = list(parse_names(requested))
    present = labels.present()
    if [r.strip().lower() for r in requested] == [ALL]:
        return list(present.items()), []
    chosen, problems = [], []
    for name in dict.fromkeys(r.strip() for r in requested if r.strip()):
        values = labels.values_for(name)
        if values is None:
            known = ", ".join(list(present)[:12]) + (" ..." if len(present) > 12 else "")
            problems.append((name, f"Structure '{name}' is not in the fixed label map (names from {labels.source}: "
                                   f"{known or 'none'}). Fix: use one of those names, or 'all'."))
            continue
        chosen.append((name, values))
    return chosen, problems


def parse_names(text) -> tuple:
    """``--per-structure`` text (``femur,tibia`` or ``all``) or a list of names -> a tuple of names."""
    if text is None:
        return ()
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))
