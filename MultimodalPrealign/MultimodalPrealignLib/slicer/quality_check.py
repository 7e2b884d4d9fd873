"""A Slicer run's quality check: the verdict, the metrics table node, and the per-run report folder.

``write_quality_check`` judges the report and writes the pictures, report.html and report.json (the core's
``reporting.finish_report``) without leaving half-written folders; ``fill_quality_table`` puts the metrics table
into a ``vtkMRMLTableNode`` (nothing here imports slicer). The panel shows both (``result_panel``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np


def fill_quality_table(table_node, report: dict) -> None:
    """``tables.fill_table_node`` plus display settings: column names as headers, read-only (locked) in the GUI.

    ``table_node`` is a ``vtkMRMLTableNode``; nothing here imports slicer. The verdict is also stored as the
    node attribute ``MultimodalPrealign.Verdict``.
    """
    from ..qa.tables import fill_table_node

    was_modifying = table_node.StartModify()
    try:
        table_node.SetLocked(False)
        fill_table_node(table_node, report)
        if hasattr(table_node, "SetUseColumnTitleAsColumnHeader"):
            table_node.SetUseColumnTitleAsColumnHeader(True)
        else:  # Slicer before 5.4
            table_node.SetUseColumnNameAsColumnHeader(True)
        table_node.SetLocked(True)
        table_node.SetAttribute("MultimodalPrealign.Verdict", str(report.get("verdict") or ""))
    finally:
        table_node.EndModify(was_modifying)


def _safe_name(text: str, limit: int = 40) -> str:
    return (re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "volume")[:limit]


def new_report_directory(root, moving_name: str, fixed_name: str, now=None) -> Path:
    """A new per-run folder ``root/MultimodalPrealign/<UTC time>_<moving>_to_<fixed>[_N]`` (not created here)."""
    import datetime

    now = now or datetime.datetime.now(datetime.timezone.utc)
    base = Path(root) / "MultimodalPrealign" / (f"{now:%Y%m%d-%H%M%S}_{_safe_name(moving_name)}"
                                                 f"_to_{_safe_name(fixed_name)}")
    candidate, index = base, 1
    while candidate.exists():
        index += 1
        candidate = base.with_name(f"{base.name}_{index}")
    return candidate


def _json_value(value):
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def write_quality_check(report: dict, directory, fixed, moving, before, after, fixed_labels=None,
                        moving_labels=None, pairs=None, write_pictures: bool = True) -> dict:
    """Judge ``report`` and write the pictures, report.html and report.json into ``directory``.

    ``before``/``after``: fixed->moving transforms (LPS mm) of the pre-alignment alone and of the result.
    Calls ``reporting.finish_report`` in a staging folder next to ``directory`` and moves the files into place at the
    end (no half-written outputs); ``directory`` may hold only a previous run's outputs
    (``pipeline.check_output_dir``). ``write_pictures=False``: verdict only, nothing is written.
    Returns {"verdict", "directory", "pictures": {key: absolute path}, "html": absolute path or None}.
    """
    import json
    import shutil
    import tempfile

    from ..pipeline import check_output_dir, move_into_place
    from ..qa import reporting

    if not write_pictures:
        verdict = reporting.finish_report(report, directory or ".", fixed, moving, before, after, fixed_labels,
                                   moving_labels, pairs, write_pictures=False)["verdict"]
        return {"verdict": verdict, "directory": None, "pictures": {}, "html": None}
    directory = Path(directory).resolve()
    check_output_dir(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=str(directory.parent)))
    try:
        outputs = reporting.finish_report(report, staging, fixed, moving, before, after, fixed_labels, moving_labels,
                                   pairs, write_pictures=True)
        (staging / "report.json").write_text(json.dumps(_json_value(report), indent=2) + "\n", encoding="utf-8")
        move_into_place(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    pictures = {key: str(directory / relative) for key, relative in outputs["pictures"].items()}
    html = str(directory / Path(outputs["html"]).name) if outputs.get("html") else None
    return {"verdict": outputs["verdict"], "directory": str(directory), "pictures": pictures, "html": html}
