"""The module panel's display pieces: the verdict line, the picture thumbnails, the Quality check section.

Text and layout are pure functions (tested without Slicer); the Qt widgets (``qt`` imported lazily inside the
functions) are made here and put into the widgets of Resources/UI/MultimodalPrealign.ui, passed as ``ui``.
"""

from __future__ import annotations

import html
from pathlib import Path

#: Largest side (pixels) of a picture thumbnail in the module panel.
THUMBNAIL_PIXELS = 170
#: Reasons shown under the verdict in the panel (all of them are in the table and report.html).
PANEL_REASONS = 3


def _escape(text) -> str:
    return html.escape(str(text), quote=False)


def verdict_rich_text(verdict: str | None, reasons=(), max_reasons: int = PANEL_REASONS) -> str:
    """Qt rich text for the panel's verdict line: coloured PASS/WARN/FAIL, its advice, the first reasons.

    ``NOTE:`` reasons (automatic fallback) are always listed, after the first ``max_reasons`` others.

    Colours and advice are report.html's (``report_html.VERDICT_STYLE``); an unknown or missing verdict is
    shown like WARN.
    """
    from ..qa.report_html import VERDICT_STYLE

    shown = verdict if verdict in VERDICT_STYLE else "WARN"
    colour, background, advice = VERDICT_STYLE[shown]
    reasons = [str(r) for r in (reasons or [])]
    notes = [r for r in reasons if r.startswith("NOTE:")]  # e.g. the automatic fallback: always shown
    others = [r for r in reasons if r not in notes]
    items = "".join(f"<li>{_escape(r)}</li>" for r in others[:max_reasons] + notes)
    more = len(others) - max_reasons
    if more > 0:
        items += f"<li>... {more} more in the table and in report.html</li>"
    label = _escape(verdict or "not judged")
    return (f'<div style="background-color:{background}"><b style="color:{colour}; font-size:large">{label}</b> '
            f"{_escape(advice)}" + (f"<ul>{items}</ul>" if items else "") + "</div>")


def picture_entries(pictures: dict, base_dir) -> list:
    """Thumbnails for the panel: one grid row per kind of picture, column 0 = before, 1 = after registration.

    ``pictures``: ``report["pictures"]`` ({"<kind>_<stage>": path relative to ``base_dir`` or absolute}).
    Returns dicts {key, kind, stage, row, column, title, tooltip, path (absolute str)} in the order of
    ``pictures.KIND_TITLES`` (most telling first); files that do not exist are left out.
    """
    from ..qa.pictures import KIND_TITLES, STAGE_TITLES

    base = Path(base_dir)
    by_kind: dict = {}
    for key, relative in (pictures or {}).items():
        kind, _, stage = key.rpartition("_")
        path = Path(relative)
        path = path if path.is_absolute() else base / path
        if kind and path.is_file():
            by_kind.setdefault(kind, {})[stage] = (key, path)
    kinds = [k for k in KIND_TITLES if k in by_kind] + sorted(set(by_kind) - set(KIND_TITLES))
    entries = []
    for row, kind in enumerate(kinds):
        short, legend = KIND_TITLES.get(kind, (kind, ""))
        stages = ["before", "after"] + sorted(set(by_kind[kind]) - {"before", "after"})
        column = 0
        for stage in stages:
            if stage not in by_kind[kind]:
                column += stage in ("before", "after")
                continue
            key, path = by_kind[kind][stage]
            entries.append({"key": key, "kind": kind, "stage": stage, "row": row, "column": column,
                            "title": f"{short}: {stage}", "path": str(path.resolve()),
                            "tooltip": f"{STAGE_TITLES.get(stage, stage)}. {legend}. Click to open full size."})
            column += 1
    return entries


def open_local_file(path) -> None:
    """Open a file or folder with the desktop's default application (browser for .html, viewer for .png)."""
    import qt

    qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(path)))


def picture_thumbnail_button(path, title: str, tool_tip: str):
    """A flat ``qt.QToolButton`` showing the picture scaled to a thumbnail; clicking opens the full-size PNG."""
    import qt

    button = qt.QToolButton()
    pixmap = qt.QPixmap(str(path))
    size = THUMBNAIL_PIXELS
    if not pixmap.isNull():
        pixmap = pixmap.scaled(size, size, qt.Qt.KeepAspectRatio, qt.Qt.SmoothTransformation)
        button.setIcon(qt.QIcon(pixmap))
        button.setIconSize(pixmap.size())
    button.setToolButtonStyle(qt.Qt.ToolButtonTextUnderIcon)
    button.setAutoRaise(True)
    button.text = title
    button.toolTip = tool_tip
    button.connect("clicked()", lambda: open_local_file(path))
    return button


# ---------------------------------------------------------------------------------- the Quality check section

def clear_quality_check(ui, picture_buttons: list) -> None:
    """Empty the Quality check section; ``picture_buttons`` (its thumbnails) is emptied in place."""
    ui.verdictLabel.text = "Apply to see the verdict, the metrics table and the pictures."
    ui.qualityTableView.setMRMLTableNode(None)
    _clear_pictures(ui, picture_buttons)
    ui.picturesHintLabel.text = ""
    ui.openReportButton.enabled = False
    ui.openReportFolderButton.enabled = False
    ui.reproduceTextEdit.setPlainText("")
    ui.copyReproduceButton.enabled = False


def show_quality_check(ui, result, picture_buttons: list) -> None:
    """Verdict line, the metrics table node, one thumbnail per picture (click: full size), report buttons.

    ``result``: a ``MultimodalPrealignResult``; ``picture_buttons`` (the section's thumbnails) is replaced in place.
    """
    ui.verdictLabel.text = verdict_rich_text(result.verdict, result.verdictReasons)
    ui.qualityTableView.setMRMLTableNode(result.tableNode)
    ui.qualityTableView.resizeColumnsToContents()
    _clear_pictures(ui, picture_buttons)
    layout = ui.picturesWidget.layout()
    base = result.reportDirectory or ""
    for entry in picture_entries(result.pictures, base):
        button = picture_thumbnail_button(entry["path"], entry["title"], entry["tooltip"])
        layout.addWidget(button, entry["row"], entry["column"])
        picture_buttons.append(button)
    ui.picturesHintLabel.text = ("Pictures (click one to open it full size):" if picture_buttons else
                                 "No pictures were written for this run.")
    ui.openReportButton.enabled = bool(result.reportHtmlPath)
    ui.openReportFolderButton.enabled = bool(result.reportDirectory)
    ui.reproduceTextEdit.setPlainText(reproduce_text(result.reproduce))
    ui.copyReproduceButton.enabled = bool(result.reproduce)
    ui.qualityCollapsibleButton.collapsed = False


def reproduce_text(entry: dict) -> str:
    """The panel's "Reproduce this run" text: the console code, the command line, the engine's own command."""
    if not entry:
        return ""
    parts = ["# Python console", entry.get("slicer_python") or ""]
    if entry.get("command_line"):
        parts += ["# Command line (headless core)", entry["command_line"], ""]
    engine = entry.get("engine") or {}
    if engine.get("command_line"):
        command = engine["command_line"]
        parts += ["# The engine's own command line, as run",
                  command if isinstance(command, str) else " ".join(str(part) for part in command), ""]
    if engine.get("parameters"):
        parts += ["# The engine's parameters, as run",
                  "\n".join(f"{key} = {value}" for key, value in engine["parameters"].items()), ""]
    for name, text in (engine.get("parameter_files") or {}).items():
        parts += [f"# Parameter file {name}", text]
    if entry.get("note"):
        parts += [f"# {entry['note']}"]
    return "\n".join(parts).rstrip() + "\n"


def _clear_pictures(ui, picture_buttons: list) -> None:
    layout = ui.picturesWidget.layout()
    for button in picture_buttons:
        layout.removeWidget(button)
        button.setParent(None)
        button.deleteLater()
    picture_buttons.clear()
