"""The verdict, metrics and checks of a report as a table of strings (a Slicer table node, CSV).

Reads report.json's ``verdict``, ``metrics`` (before = pre-alignment, after = registration) and ``qa_checks``;
no Slicer import here (the table node is passed in).
"""

from __future__ import annotations

from .verdict import checks, judge

TABLE_COLUMNS = ("Measure", "After pre-alignment", "After registration", "Result")


def _cell(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def metrics_table(report: dict) -> tuple[tuple[str, ...], list[list[str]]]:
    """(columns, rows of strings) summarising the verdict, metrics and checks, for a Slicer table node or CSV.

    Rows: verdict; NMI, MI and overlap before/after; structure summary (median centroid distance, mean Dice);
    landmark TRE; Jacobian folding; then one row per check with its status and message.
    """
    metrics = report.get("metrics") or {}
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    rows = [["Verdict", "", "", str(report.get("verdict") or judge(report)[0])]]
    for key, label in (("nmi", "Normalised mutual information"), ("mi", "Mutual information (nats)"),
                       ("overlap_fraction_fixed", "Share of fixed covered"),
                       ("overlap_fraction_moving", "Share of moving covered")):
        if key in before or key in after:
            rows.append([label, _cell(before.get(key)), _cell(after.get(key)), ""])
    structures = metrics.get("structures") or {}
    if structures.get("after"):
        b = (structures.get("before") or {}).get("summary", {})
        a = structures["after"].get("summary", {})
        rows.append(["Structures: median centroid distance (mm)", _cell(b.get("median_centroid_distance_mm")),
                     _cell(a.get("median_centroid_distance_mm")), ""])
        rows.append(["Structures: mean Dice", _cell(b.get("mean_dice")), _cell(a.get("mean_dice")), ""])
    landmark_block = metrics.get("landmarks") or {}
    if landmark_block.get("after"):
        rows.append(["Landmarks: mean TRE (mm)", _cell((landmark_block.get("before") or {}).get("mean_tre_mm")),
                     _cell(landmark_block["after"].get("mean_tre_mm")), ""])
        rows.append(["Landmarks: max TRE (mm)", _cell((landmark_block.get("before") or {}).get("max_tre_mm")),
                     _cell(landmark_block["after"].get("max_tre_mm")), ""])
    jac = metrics.get("jacobian") or {}
    if "folding_percent" in jac:
        rows.append(["Jacobian: folding voxels (%)", "", _cell(jac["folding_percent"]), ""])
        rows.append(["Jacobian: min determinant", "", _cell(jac["min"]), ""])
    checks_done = report.get("qa_checks")
    if checks_done is None:
        checks_done = checks(report)
    for check in checks_done:
        rows.append([f"Check: {check['check']}", "", check["message"], check["status"]])
    return TABLE_COLUMNS, rows


def fill_table_node(table_node, report: dict) -> None:
    """Fill a Slicer ``vtkMRMLTableNode`` (string columns) with :func:`metrics_table` (no slicer import here)."""
    columns, rows = metrics_table(report)
    table_node.RemoveAllColumns()
    for name in columns:
        table_node.AddColumn().SetName(name)
    for row in rows:
        index = table_node.AddEmptyRow()
        for column, text in enumerate(row):
            table_node.SetCellText(index, column, text)
