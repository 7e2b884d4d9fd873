"""Per-structure registration: after the global run, each named structure of the FIXED image (a bone, an organ) is
registered on its own, from the global result, with its own crop and metric mask; one transform per structure.

Why: when the parts of the anatomy moved relative to each other between the scans (a knee at another flexion
angle: femur, tibia and patella), no single rigid or affine transform aligns them all. "Do the bones
independently."

* :mod:`.labels`: the structures BY NAME (:class:`StructureLabels`): segment names of a Slicer segmentation,
  TotalSegmentator names, mask file names, or label values; nothing re-numbered or dropped;
* :mod:`.bones`: automatic bone labels of a CT/microCT (threshold, fill, split at the joint space);
* :mod:`.register`: :func:`register_structures` (crop, mask, engine, measures, motion relative to the global
  transform) -> one :class:`StructureResult` per structure; a missing, too small or out-of-view structure gets a
  one-line error and the others still run;
* :mod:`.verdict`: each structure's PASS / WARN / FAIL with reasons (``resources/structure_thresholds.json``);
* :mod:`.outputs` and :mod:`.pictures`: ``structures/<name>/transform.h5``, the moving image resampled in the
  structure's region, pictures, report.json's ``structures`` block.

Layer: above ``qa`` (it uses ``engines``, ``crop``, ``qa``, ``io``, ``geometry``), beside ``pipeline``, which calls
it (``pipeline.stages.register_structures``); it never imports ``pipeline``. Every transform maps FIXED physical
points to MOVING physical points (LPS mm); a structure's transform includes the global one.
"""

from __future__ import annotations

import time

import SimpleITK as sitk

from ..progress import Progress
from .bones import threshold_bone_labels
from .labels import ALL, StructureLabels, from_label_image, parse_names, read_structure_labels, select
from .outputs import report_block, write_structure_outputs
from .register import StructureResult, StructureSettings, register_structures

__all__ = ["ALL", "StructureLabels", "StructureResult", "StructureSettings", "from_label_image", "parse_names",
           "read_structure_labels", "register_structures", "report_block", "run", "select", "threshold_bone_labels",
           "write_structure_outputs"]


def run(fixed: sitk.Image, moving: sitk.Image, global_fixed_to_moving: sitk.Transform,
        fixed_labels: StructureLabels, names, settings: StructureSettings | None = None,
        moving_labels: StructureLabels | None = None, progress: Progress | None = None, register_fn=None,
        crop_fn=None) -> tuple[list[StructureResult], dict]:
    """:func:`register_structures` plus report.json's ``structures`` block: (results, block)."""
    started = time.perf_counter()
    settings = (settings or StructureSettings()).resolved()
    results = register_structures(fixed, moving, global_fixed_to_moving, fixed_labels, names, settings, moving_labels,
                                  progress, register_fn, crop_fn)
    block = report_block(results, fixed_labels, names, settings.to_dict(), time.perf_counter() - started,
                         moving_labels)
    return results, block
