"""Label inputs for anatomy pre-alignment: TotalSegmentator label maps, mask folders, Slicer segmentations.

Accepted inputs (each on its image's voxel grid):

* a multi-label image (TotalSegmentator ``--ml`` output, ``.nii.gz``): class ids of a TotalSegmentator
  task. When the file carries TotalSegmentator's NIfTI header extension (a CaretExtension XML label
  table: id -> name), the names are read from it and the task is inferred from them;
* a folder of per-structure masks (TotalSegmentator's default output: ``liver.nii.gz``, ...): the
  file names are the structure names;
* a Slicer ``.seg.nrrd`` segmentation whose segment names are TotalSegmentator class names;
* in Slicer, named masks (segment name -> binary image): :func:`labels_from_masks`.

Everything is turned into ONE UInt16 label image that uses the class ids of a known TotalSegmentator
task (``resources/totalsegmentator_classes.json``), plus that task's name. Structures are always
matched by NAME between images, never by id (ids differ between tasks).
"""

from __future__ import annotations

import gzip
import os
import re
import struct
from functools import cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..resource_files import load_resource_json
from .image_io import check_image, check_label_grid, read_image_file
from .modality import ct_or_mr

MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@cache
def _classes_resource() -> dict:
    return load_resource_json("totalsegmentator_classes.json")


def known_tasks() -> list[str]:
    """TotalSegmentator tasks whose class maps ship with the package."""
    return list(_classes_resource()["tasks"])


def task_names(task: str) -> dict[int, str]:
    """{class id: name} of a TotalSegmentator task."""
    tasks = _classes_resource()["tasks"]
    if task not in tasks:
        raise InputError(f"Unknown TotalSegmentator task '{task}'", "use one of " + ", ".join(tasks))
    return {int(k): v for k, v in tasks[task].items()}


def task_ids(task: str) -> dict[str, int]:
    """{name: class id} of a TotalSegmentator task."""
    return {name: cid for cid, name in task_names(task).items()}


def task_modality(task: str) -> str | None:
    """"ct" or "mr" for a known task (None when not recorded)."""
    return _classes_resource().get("modality", {}).get(task)


# ----------------------------------------------------------------------------------- embedded names
_LABEL_RE = re.compile(r"<Label\s+Key=\"(\d+)\"[^>]*>\s*<!\[CDATA\[(.*?)\]\]>\s*</Label>", re.S)


def read_nifti_label_table(path: str | os.PathLike) -> dict[int, str] | None:
    """{id: name} from TotalSegmentator's NIfTI header extension (CaretExtension XML), None when absent.

    TotalSegmentator's ``--ml`` output stores its label table in a NIfTI-1 extension
    (``nifti_ext_header.add_label_map_to_nifti``); it is parsed here without nibabel.
    """
    path = Path(path)
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return None
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(352)
            if len(header) < 352:
                return None
            endian = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
            if struct.unpack(endian + "i", header[:4])[0] != 348 or header[348] == 0:
                return None
            vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
            extensions = handle.read(max(vox_offset - 352, 0))
    except (OSError, EOFError, struct.error):
        return None
    table: dict[int, str] = {}
    position = 0
    while position + 8 <= len(extensions):
        size, _code = struct.unpack(endian + "ii", extensions[position:position + 8])
        if size < 8:
            break
        content = extensions[position + 8:position + size].decode("utf-8", "replace")
        table.update({int(k): v.strip() for k, v in _LABEL_RE.findall(content)})
        position += size
    return table or None


def read_segmentation_names(image: sitk.Image) -> dict[int, str] | None:
    """{label value: segment name} from a single-layer Slicer ``.seg.nrrd`` header, None when absent."""
    segments = _segments(image)
    if not segments:
        return None
    return {value: segment_name for segment_name, _layer, value in segments}


def _segments(image: sitk.Image) -> list[tuple[str, int, int]]:
    """(name, layer, label value) of each segment recorded in a Slicer ``.seg.nrrd`` header."""
    keys = set(image.GetMetaDataKeys())
    segments = []
    for key in sorted(keys):
        match = re.fullmatch(r"Segment(\d+)_Name", key)
        if not match:
            continue
        number = match.group(1)
        value_key, layer_key = f"Segment{number}_LabelValue", f"Segment{number}_Layer"
        value = int(image.GetMetaData(value_key)) if value_key in keys else int(number) + 1
        layer = int(image.GetMetaData(layer_key)) if layer_key in keys else 0
        segments.append((image.GetMetaData(key).strip(), layer, value))
    return segments


def _flatten_segmentation(image: sitk.Image) -> tuple[sitk.Image, dict[int, str] | None]:
    """A multi-layer segmentation (vector voxels or a 4th axis) as one 3D label image; later segments win."""
    segments = _segments(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        layers = [sitk.VectorIndexSelectionCast(image, i) for i in range(image.GetNumberOfComponentsPerPixel())]
    else:
        layers = [image[:, :, :, i] for i in range(image.GetSize()[3])]
    arrays = [sitk.GetArrayViewFromImage(layer) for layer in layers]
    out = np.zeros(arrays[0].shape, dtype=np.uint16)
    table: dict[int, str] = {}
    if segments:
        for number, (segment_name, layer, value) in enumerate(segments, start=1):
            if layer < len(arrays):
                out[arrays[layer] == value] = number
                table[number] = segment_name
    else:
        for array in arrays:
            out[array > 0] = np.asarray(array[array > 0], dtype=np.uint16)
    flat = sitk.GetImageFromArray(out)
    flat.CopyInformation(layers[0])
    return flat, table or None


# ------------------------------------------------------------------------------------ task inference
def infer_task_from_names(names, preferred_modality: str | None = None) -> tuple[str | None, list[str]]:
    """The known task that holds most of ``names`` (ties: the one matching ``preferred_modality``).

    Returns (task or None, names that task does not have).
    """
    names = [n for n in dict.fromkeys(names) if n]
    best: tuple | None = None
    for order, task in enumerate(known_tasks()):
        have = set(task_names(task).values())
        hits = sum(n in have for n in names)
        modality_bonus = 1 if preferred_modality and task_modality(task) == preferred_modality else 0
        # more hits first; then tasks of the right modality; then the resource's order (total, total_mr first)
        key = (hits, modality_bonus, -order)
        if hits and (best is None or key > best[0]):
            best = (key, task, [n for n in names if n not in have])
    if best is None:
        return None, names
    return best[1], best[2]


def infer_task(labels: sitk.Image, image: sitk.Image | None = None,
               table: dict[int, str] | None = None) -> tuple[str | None, str]:
    """Guess the TotalSegmentator task of a label image. Returns (task or None, reason).

    Uses, in order: an embedded label table (names), label values above 50 (only `total`-like tasks go
    that high), and the image's intensities (CT-like HU -> `total`, else `total_mr`).
    """
    modality = None
    if image is not None:
        modality = ct_or_mr(image).lower()
    if table:
        task, missing = infer_task_from_names(table.values(), modality)
        if task is not None:
            reason = f"label names in the file match task '{task}'"
            if missing:
                reason += f" ({len(missing)} names not in it: {', '.join(missing[:5])})"
            return task, reason
    values = np.unique(sitk.GetArrayViewFromImage(labels))
    values = values[values > 0]
    if values.size == 0:
        return None, "the label map is empty"
    if int(values.max()) > max(task_names("total_mr")):
        return "total", f"label values up to {int(values.max())} exist only in task 'total'"
    if modality is None:
        return None, "label values fit several tasks and there is no image to tell CT from MR"
    task = "total" if modality == "ct" else "total_mr"
    return task, f"the image looks like {modality.upper()}, so its labels are taken as task '{task}'"


# ------------------------------------------------------------------------------------------ builders
def relabel_to_task(labels: sitk.Image, table: dict[int, str], task: str) -> tuple[sitk.Image, list[str]]:
    """Re-number ``labels`` (values named by ``table``) to the class ids of ``task``; unknown names -> 0.

    Returns (UInt16 label image, dropped names).
    """
    ids = task_ids(task)
    array = sitk.GetArrayViewFromImage(labels)
    top = int(max(int(array.max()), max(table) if table else 0))
    lut = np.zeros(top + 1, dtype=np.uint16)
    dropped = []
    for value, name in table.items():
        if name in ids:
            lut[value] = ids[name]
        elif value <= top:
            dropped.append(name)
    out = sitk.GetImageFromArray(lut[np.asarray(array, dtype=np.int64)])
    out.CopyInformation(labels)
    return out, dropped


def labels_from_masks(masks: dict, reference: sitk.Image, task: str | None = None,
                      name: str = "label masks", image_name: str = "image") -> tuple[sitk.Image, str]:
    """One UInt16 label image from named binary masks (structure name -> sitk.Image on ``reference``'s grid).

    ``task`` None: inferred from the names. Later masks win where masks overlap. Names the task does not
    know are skipped.
    """
    if not masks:
        raise InputError(f"The {name} hold no masks", "give TotalSegmentator masks named after their structures")
    if task is None:
        task, missing = infer_task_from_names(masks.keys(), ct_or_mr(reference).lower())
        if task is None:
            raise InputError(f"None of the {name} ({', '.join(list(masks)[:5])}...) is a TotalSegmentator "
                             "structure name", "name each mask after its TotalSegmentator class (e.g. liver)")
    ids = task_ids(task)
    out = np.zeros(sitk.GetArrayViewFromImage(reference).shape, dtype=np.uint16)
    for structure, mask in masks.items():
        if structure not in ids:
            continue
        check_label_grid(mask, reference, f"mask '{structure}' of the {name}", image_name)
        out[np.asarray(sitk.GetArrayViewFromImage(mask)) > 0] = ids[structure]
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(reference)
    return image, task


def _mask_name(path: Path) -> str | None:
    lower = path.name.lower()
    for suffix in MASK_SUFFIXES:
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def load_mask_folder(folder: str | os.PathLike, reference: sitk.Image, name: str = "label folder",
                     task: str | None = None, image_name: str = "image") -> tuple[sitk.Image, str]:
    """TotalSegmentator's per-structure output folder (``liver.nii.gz``...) as one label image + task.

    Empty masks are skipped (TotalSegmentator writes one file per class, most of them empty).
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and _mask_name(p))
    if not files:
        raise InputError(f"The {name} '{folder}' holds no mask files",
                         "point it at TotalSegmentator's output folder (liver.nii.gz, spleen.nii.gz, ...) "
                         "or at a multi-label file")
    if task is None:
        task, _ = infer_task_from_names([_mask_name(p) for p in files], ct_or_mr(reference).lower())
        if task is None:
            raise InputError(f"No file in {name} '{folder}' is named after a TotalSegmentator structure",
                             "give TotalSegmentator's output folder (file names such as liver.nii.gz)")
    ids = task_ids(task)
    masks = {}
    for path in files:
        structure = _mask_name(path)
        if structure not in ids:
            continue
        mask = read_image_file(path, f"mask {path.name}")
        if not np.any(sitk.GetArrayViewFromImage(mask)):
            continue
        masks[structure] = mask
    if not masks:
        raise InputError(f"Every mask in {name} '{folder}' is empty", "check that TotalSegmentator found structures")
    return labels_from_masks(masks, reference, task, name, image_name)


def load_labels(path: str | os.PathLike, reference_image: sitk.Image, name: str = "label map",
                task: str | None = None, image_name: str = "image") -> tuple[sitk.Image, str | None]:
    """Read a label input for ``reference_image``: multi-label file, mask folder or ``.seg.nrrd``.

    Returns (UInt16 label image on the reference grid, TotalSegmentator task or None when it cannot
    be told). Ids are converted to the task's class ids when the file names its labels.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"The {name} '{path}' does not exist", "check the path")
    if path.is_dir():
        return load_mask_folder(path, reference_image, name, task, image_name)
    raw = read_image_file(path, name)
    if raw.GetNumberOfComponentsPerPixel() > 1 or (raw.GetDimension() == 4 and raw.GetSize()[3] > 1):
        raw, table = _flatten_segmentation(raw)
    else:
        table = read_nifti_label_table(path) or read_segmentation_names(raw)
    raw = check_image(raw, name, allow_labels=True)
    array = sitk.GetArrayViewFromImage(raw)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.mod(array, 1) == 0):
        raise InputError(f"The {name} holds non-integer values",
                         "give an integer label map (e.g. TotalSegmentator's --ml output)")
    if float(array.min()) < 0:
        raise InputError(f"The {name} holds negative values", "give a label map with labels >= 0")
    check_label_grid(raw, reference_image, name, image_name)
    if not np.any(array):
        raise InputError(f"The {name} '{path}' is empty (every voxel is 0)",
                         f"give the label map made for the {image_name} (check that TotalSegmentator found structures "
                         "in it), or leave the label maps out to pre-align from the images alone")
    labels = sitk.Cast(raw, sitk.sitkUInt16)
    if task is None:
        task, _reason = infer_task(labels, reference_image, table)
    elif task not in known_tasks():
        raise InputError(f"Unknown TotalSegmentator task '{task}'", "use one of " + ", ".join(known_tasks()))
    if table and task is not None:
        expected = task_names(task)
        if any(expected.get(v) != n for v, n in table.items() if n in task_ids(task)):
            labels, _ = relabel_to_task(labels, table, task)
    return labels, task


def names_in(labels: sitk.Image, task: str) -> dict[int, str]:
    """{class id: name} of the labels present in ``labels`` (task ``task``); unknown ids are left out."""
    names = task_names(task)
    values = np.unique(sitk.GetArrayViewFromImage(labels))
    return {int(v): names[int(v)] for v in values if v and int(v) in names}
