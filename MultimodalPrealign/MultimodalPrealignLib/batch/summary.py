"""One row per pair and the cohort's summary files: ``summary.csv``, ``summary.json``, ``summary.html``.

A row comes from a finished pair's folder (its report.json and batch_record.json, :func:`row_from_folder`) or
from an error (:func:`error_row`), so a pair read back by ``--resume`` and a pair just run look the same. Every
summary file is written to a temporary file next to it and renamed into place (readers never see half a file);
the batch rewrites them as pairs finish, so an interrupted run keeps the summary of what finished.

``summary.html`` is one self-contained page (no network, no scripts from elsewhere): verdict counts, a table
sortable by any column (click a header), and per pair a small thumbnail (embedded) of its fusion picture
linking to its report.html (relative link: keep the batch folder together).
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import json
import os
import uuid
from pathlib import Path

from .. import __version__
from .record import read_record

SUMMARY_FILES = ("summary.csv", "summary.json", "summary.html")
#: Verdicts in the summary: the pair's QA verdict, or ERROR when it ended without one.
VERDICTS = ("PASS", "WARN", "FAIL", "ERROR")
ERROR = "ERROR"
#: Columns of summary.csv (summary.json has the same keys, reasons as a list).
ROW_FIELDS = (
    "id", "verdict", "exit_code", "reasons", "error", "resumed", "seconds", "cpu_seconds", "register_seconds", "worker",
    "started_utc", "prealign", "engine", "attempts", "nmi_before", "nmi_after", "mi_before", "mi_after",
    "mean_dice_before", "mean_dice_after", "mean_tre_mm_before", "mean_tre_mm_after", "rotation_deg",
    "translation_mm", "manifest_line", "fixed", "moving", "folder", "report",
)
#: Pictures tried for a pair's thumbnail, best first.
THUMBNAIL_PICTURES = ("fusion_after", "checkerboard_after", "edges_after", "fusion_before")
THUMBNAIL_HEIGHT_PX = 96


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _get(block, *keys):
    for key in keys:
        if not isinstance(block, dict):
            return None
        block = block.get(key)
    return block


def _round(value, digits: int = 4):
    return round(float(value), digits) if isinstance(value, (int, float)) else None


def empty_row(job) -> dict:
    row = dict.fromkeys(ROW_FIELDS)
    row.update({"id": job.id, "manifest_line": job.line, "fixed": job.fixed, "moving": job.moving,
                "resumed": False, "reasons": []})
    return row


def error_row(job, exit_code: int, error: str, seconds: float | None = None, worker: str | None = None,
              started_utc: str | None = None) -> dict:
    """The row of a pair that ended without a verdict: ``error`` is one line, ``exit_code`` what register returns."""
    row = empty_row(job)
    row.update({"verdict": ERROR, "exit_code": int(exit_code), "error": " ".join(str(error).split()),
                "seconds": _round(seconds, 2) if seconds is not None else None, "worker": worker,
                "started_utc": started_utc})
    return row


def row_from_folder(job, pair_dir: Path, out_dir: Path, resumed: bool = False) -> dict:
    """The row of a finished pair, read from its folder (report.json and batch_record.json)."""
    from ..qa.verdict import exit_code_for

    pair_dir = Path(pair_dir)
    report = json.loads((pair_dir / "report.json").read_text(encoding="utf-8"))
    record = read_record(pair_dir) or {}
    metrics = report.get("metrics") or {}
    verdict = report.get("verdict") or ERROR
    row = empty_row(job)
    translation = _get(report, "transform", "summary", "translation_mm")
    row.update({
        "verdict": verdict, "exit_code": exit_code_for(verdict) if verdict in VERDICTS[:3] else 3,
        "reasons": list(report.get("verdict_reasons") or []), "error": report.get("error"), "resumed": resumed,
        "seconds": _round(record.get("seconds"), 2), "cpu_seconds": _round(record.get("cpu_seconds"), 2),
        "register_seconds": _round(_get(report, "timings_s",
                                                                                       "total_with_io"), 2),
        "worker": record.get("worker"), "started_utc": record.get("started_utc"),
        "prealign": _get(report, "prealign", "method"), "engine": _get(report, "registration", "engine"),
        "attempts": len(_get(report, "fallback", "attempts") or []) or None,
        "nmi_before": _round(_get(metrics, "before", "nmi")), "nmi_after": _round(_get(metrics, "after", "nmi")),
        "mi_before": _round(_get(metrics, "before", "mi")), "mi_after": _round(_get(metrics, "after", "mi")),
        "mean_dice_before": _round(_get(metrics, "structures", "before", "summary", "mean_dice")),
        "mean_dice_after": _round(_get(metrics, "structures", "after", "summary", "mean_dice")),
        "mean_tre_mm_before": _round(_get(metrics, "landmarks", "before", "mean_tre_mm"), 3),
        "mean_tre_mm_after": _round(_get(metrics, "landmarks", "after", "mean_tre_mm"), 3),
        "rotation_deg": _round(_get(report, "transform", "summary", "rotation_deg"), 3),
        "translation_mm": (_round(sum(float(v) ** 2 for v in translation) ** 0.5, 3)
                           if isinstance(translation, list) else None),
        "folder": _relative(pair_dir, out_dir),
        "report": _relative(pair_dir / ("report.html" if (pair_dir / "report.html").is_file() else "report.json"),
                            out_dir),
    })
    return row


def _relative(path: Path, out_dir: Path) -> str:
    try:
        return Path(os.path.relpath(path, out_dir)).as_posix()
    except ValueError:  # another drive (Windows)
        return str(path)


def counts(rows: list) -> dict:
    return {verdict: sum(1 for r in rows if r.get("verdict") == verdict) for verdict in VERDICTS}


def batch_exit_code(rows: list, total: int) -> int:
    """0 when all ``total`` pairs ended PASS or WARN, else 4 (some FAIL, error, skipped or missing)."""
    from ..errors import EXIT_VERDICT_FAIL

    good = sum(1 for r in rows if r.get("verdict") in ("PASS", "WARN"))
    return 0 if good == total else EXIT_VERDICT_FAIL


# ------------------------------------------------------------------------------------------------ files
def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a new hidden file next to ``path`` and rename it over ``path`` (permissions by umask)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temp, "x", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def csv_text(rows: list) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ROW_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("; ".join(v) if isinstance(v, list) else ("" if v is None else v))
                         for k, v in row.items()})
    return buffer.getvalue()


def write_summary(out_dir: Path, rows: list, meta: dict, thumbnails: dict | None = None,
                  html_page: bool = True) -> None:
    """Write summary.csv and summary.json (and summary.html unless ``html_page`` is False), each atomically.

    ``rows`` in manifest order; ``meta``: run facts for summary.json (counts and the exit code are added);
    ``thumbnails``: {id: data URI} (cached by the caller).
    """
    out_dir = Path(out_dir)
    rows = sorted(rows, key=lambda r: (r.get("manifest_line") or 0, r["id"]))
    document = {"tool": f"multimodal-prealign {__version__}", "written_utc": utc_now(), **meta,
                "counts": counts(rows), "pairs": [{k: row.get(k) for k in ROW_FIELDS} for row in rows]}
    _write_atomic(out_dir / "summary.json", json.dumps(document, indent=2) + "\n")
    _write_atomic(out_dir / "summary.csv", csv_text(rows))
    if html_page:
        _write_atomic(out_dir / "summary.html", html_text(rows, document, thumbnails or {}))


def thumbnail(pair_dir: Path) -> str | None:
    """A small JPEG (``THUMBNAIL_HEIGHT_PX`` high) of the pair's best picture, as a data URI; None without
    pictures."""
    from PIL import Image

    for name in THUMBNAIL_PICTURES:
        path = Path(pair_dir) / "pictures" / f"{name}.png"
        if not path.is_file():
            continue
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                width = max(1, round(image.width * THUMBNAIL_HEIGHT_PX / image.height))
                small = image.resize((width, THUMBNAIL_HEIGHT_PX), Image.LANCZOS)
        except OSError:
            continue
        buffer = io.BytesIO()
        small.save(buffer, format="JPEG", quality=85)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return None


_COLUMNS_SHOWN = (("id", "pair"), ("verdict", "verdict"), ("picture", "picture"), ("reasons", "reasons / error"),
                  ("seconds", "time (s)"), ("prealign", "pre-alignment"), ("engine", "engine"),
                  ("nmi_before", "NMI before"), ("nmi_after", "NMI after"), ("mean_dice_after", "mean Dice after"),
                  ("mean_tre_mm_after", "TRE after (mm)"), ("rotation_deg", "rotation (deg)"),
                  ("translation_mm", "shift (mm)"), ("worker", "worker"), ("resumed", "resumed"))
#: Columns shown only when some row has a value (label maps, landmarks, a resumed run).
_OPTIONAL_COLUMNS = ("mean_dice_after", "mean_tre_mm_after", "resumed")
_COLOURS = {"PASS": "#1b7f3b", "WARN": "#b26a00", "FAIL": "#b3261e", "ERROR": "#6b2c91"}

_SCRIPT = """
document.querySelectorAll('th[data-col]').forEach(function (th, index) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0];
    var ascending = th.getAttribute('data-order') !== 'asc';
    table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('data-order'); });
    th.setAttribute('data-order', ascending ? 'asc' : 'desc');
    var rows = Array.prototype.slice.call(body.rows);
    function key(row) {
      var cell = row.cells[index], text = cell.getAttribute('data-sort');
      if (text === null) { text = cell.textContent.trim(); }
      var number = parseFloat(text);
      return (text !== '' && !isNaN(number) && isFinite(text)) ? number : text.toLowerCase();
    }
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === y) { return 0; }
      if (x === '') { return 1; }
      if (y === '') { return -1; }
      if (typeof x !== typeof y) { x = String(x); y = String(y); }
      return (x < y ? -1 : 1) * (ascending ? 1 : -1);
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
document.querySelectorAll('button[data-verdict]').forEach(function (button) {
  button.addEventListener('click', function () {
    var wanted = button.getAttribute('data-verdict');
    document.querySelectorAll('tbody tr').forEach(function (row) {
      row.style.display = (wanted === 'ALL' || row.getAttribute('data-verdict') === wanted) ? '' : 'none';
    });
  });
});
"""

_STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 1.5em; color: #1d1d1f; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; } .meta { color: #555; font-size: 0.9em; margin-bottom: 1em; }
.counts button { font-size: 1em; margin-right: 0.4em; padding: 0.35em 0.8em; border-radius: 6px; cursor: pointer;
  border: 1px solid #bbb; background: #fafafa; }
table { border-collapse: collapse; margin-top: 1em; font-size: 0.88em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.35em 0.55em; text-align: left; vertical-align: top; }
th { background: #f0f0f3; cursor: pointer; position: sticky; top: 0; white-space: nowrap; }
th[data-order='asc']::after { content: ' \\25B2'; } th[data-order='desc']::after { content: ' \\25BC'; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.verdict { font-weight: 600; color: white; border-radius: 4px; padding: 0.1em 0.45em; }
td.reasons { min-width: 14em; max-width: 30em; } .error { color: #b3261e; } img { display: block; border-radius: 3px; }
"""


def _cell(row: dict, key: str, thumbnails: dict) -> str:
    value = row.get(key)
    if key == "id":
        link = row.get("report")
        text = html.escape(str(value))
        return f'<td><a href="{html.escape(link)}">{text}</a></td>' if link else f"<td>{text}</td>"
    if key == "verdict":
        colour = _COLOURS.get(str(value), "#444")
        return (f'<td data-sort="{VERDICTS.index(value) if value in VERDICTS else 9}"><span class="verdict" '
                f'style="background:{colour}">{html.escape(str(value))}</span></td>')
    if key == "picture":
        uri, link = thumbnails.get(row["id"]), row.get("report")
        if not uri:
            return '<td data-sort="">-</td>'
        image = f'<img src="{uri}" alt="{html.escape(row["id"])}" height="{THUMBNAIL_HEIGHT_PX}">'
        return '<td data-sort="">' + (f'<a href="{html.escape(link)}">{image}</a>' if link else image) + "</td>"
    if key == "reasons":
        if row.get("error"):
            return f'<td class="reasons error">{html.escape(str(row["error"]))}</td>'
        reasons = row.get("reasons") or []
        if row.get("verdict") == "PASS":  # PASS lists what was checked; the details are one hover away
            text = f"all {len(reasons)} checks passed"
        else:  # WARN/FAIL: worst first
            text = (reasons[0] if reasons else "") + (f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else "")
        title = html.escape("\n".join(reasons), quote=True)
        return f'<td class="reasons" title="{title}">{html.escape(text)}</td>'
    if isinstance(value, bool):
        return f"<td>{'yes' if value else ''}</td>"
    if isinstance(value, (int, float)):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape('' if value is None else str(value))}</td>"


def html_text(rows: list, document: dict, thumbnails: dict) -> str:
    tally = document["counts"]
    total = document.get("pairs_total", len(rows))
    buttons = [f'<button data-verdict="ALL">all {len(rows)}</button>'] + [
        f'<button data-verdict="{v}" style="border-color:{_COLOURS[v]};color:{_COLOURS[v]}">{v} {tally[v]}</button>'
        for v in VERDICTS]
    state = "interrupted" if document.get("interrupted") else ("running" if document.get("running") else "finished")
    meta = (f"{len(rows)} of {total} pairs in this summary ({state}); manifest "
            f"{html.escape(str(document.get('manifest', '')))}; written {document['written_utc']}; "
            f"{html.escape(str(document.get('scheduler', '')))}")
    shown = [(key, title) for key, title in _COLUMNS_SHOWN
             if key not in _OPTIONAL_COLUMNS or any(row.get(key) not in (None, False) for row in rows)]
    head = "".join(f'<th data-col="{key}">{html.escape(title)}</th>' for key, title in shown)
    body = "\n".join(f'<tr data-verdict="{html.escape(str(row.get("verdict")))}">'
                     + "".join(_cell(row, key, thumbnails) for key, _ in shown) + "</tr>" for row in rows)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Cohort summary</title>"
            f"<style>{_STYLE}</style></head><body>\n<h1>Cohort registration summary</h1>\n"
            f'<div class="meta">{meta}</div>\n<div class="counts">{"".join(buttons)}</div>\n'
            f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>\n"
            f"<p class=\"meta\">Click a column header to sort; click a verdict to show only those pairs. Each pair's "
            f"name and picture open its report.html.</p>\n<script>{_SCRIPT}</script>\n</body></html>\n")
