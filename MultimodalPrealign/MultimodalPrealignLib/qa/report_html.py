"""report.html: one self-contained page (PNG pictures embedded as base64) that proves a registration.

Order: verdict with reasons, fallbacks, pictures (as the headers place the images, after pre-alignment, after
registration), metrics tables, QA checks, inputs, diagnostics, stages with settings and timings (in run order), the
code that reproduces the run, and the full report.json folded away at the end. Each picture carries its own title
and legend (the PNGs are also read on their own), so the page adds no caption of its own.
Everything comes from the report dict (report.json) and the picture files; nothing is fetched from the web.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import os
from pathlib import Path

from .. import __version__
from .pictures import KIND_TITLES, STAGE_ORDER
from .verdict import checks as compute_checks
from .verdict import judge

#: Longer lists of records (e.g. thousands of scored search poses) are cut in the page; report.json has them all.
MAX_TABLE_ROWS = 15

VERDICT_STYLE = {
    "PASS": ("#1b7f3b", "#e6f4ea", "The automatic checks found no sign of misalignment. Still look at the pictures."),
    "WARN": ("#8a5a00", "#fff4dc", "Some checks are borderline. Review the pictures before using the result."),
    "FAIL": ("#b3261e", "#fde8e6", "The result is probably wrong. Do not use it without checking and correcting it."),
}

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px;color:#1d1d1f;max-width:1400px}
h1{font-size:24px;margin-bottom:4px} h2{font-size:19px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
h3{font-size:16px;margin:18px 0 6px} .sub{color:#555;font-size:13px}
.verdict{border-radius:8px;padding:14px 18px;margin:16px 0;border:2px solid}
.verdict .big{font-size:30px;font-weight:700;letter-spacing:1px} .verdict ul{margin:8px 0 0 0}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px} td,th{border:1px solid #ccc;padding:3px 7px;
text-align:left;vertical-align:top} th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
.PASS{color:#1b7f3b;font-weight:600} .WARN{color:#8a5a00;font-weight:600} .FAIL{color:#b3261e;font-weight:600}
.better{color:#1b7f3b} .worse{color:#b3261e}
figure{margin:4px 0 12px} .pair{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:14px} \
figure img{max-width:100%;border:1px solid #ddd} figcaption{font-size:13px;color:#444}
details{margin:6px 0} summary{cursor:pointer;padding:3px 0} \
pre{background:#f7f7f7;padding:10px;font-size:12px;overflow:auto;max-height:600px}
.code{position:relative} .code button{position:absolute;top:6px;right:6px;font-size:12px}
.states{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:12px;margin:4px 0 12px}
.states img{max-width:100%;border:1px solid #ddd}
"""

#: The states of the pictures, in words (the PNG titles name them too).
STATE_WORDS = {"header": "as the headers place the images", "before": "after pre-alignment",
               "after": "after registration"}
#: report.json's ``timings_s`` keys in run order, with their labels; other keys follow in their own order.
TIMING_LABELS = {
    "load": "reading the inputs", "diagnose": "diagnostics", "prealign": "pre-alignment", "qa_setup": "QA setup",
    "crop": "crop and working grids", "register": "registration", "metrics": "metrics and verdict",
    "report": "pictures and report.html",
    "write_resampled": "moving_resampled.nrrd: resampling and writing (a second thread, from the registration on)",
    "write_resampled_wait": "waiting for moving_resampled.nrrd", "write": "writing the outputs",
    "total": "total (the run)",
    "total_with_io": "total with reading and writing",
}

#: The copy buttons' script (inline: the page fetches nothing).
COPY_SCRIPT = """<script>
function mmpCopy(id, button){const text=document.getElementById(id).innerText;
 const done=()=>{button.textContent='Copied';setTimeout(()=>{button.textContent='Copy'},1500)};
 if(navigator.clipboard&&window.isSecureContext){navigator.clipboard.writeText(text).then(done)}
 else{const area=document.createElement('textarea');area.value=text;document.body.appendChild(area);area.select();
  document.execCommand('copy');document.body.removeChild(area);done()}}
</script>"""


def _e(value) -> str:
    return html.escape(str(value))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.6g}"
    if isinstance(value, (list, tuple)) and all(not isinstance(v, (dict, list, tuple)) for v in value):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (list, tuple)) for v in value):
        return "<br>".join("[" + ", ".join(_fmt(x) for x in row) + "]" for row in value)
    return _e(value)


def generic(value, depth: int = 0) -> str:
    """Readable HTML for any JSON-like value: dicts as key/value tables, lists of dicts as tables."""
    if isinstance(value, dict):
        if not value:
            return "-"
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{generic(v, depth + 1)}</td></tr>" for k, v in value.items())
        return f"<table>{rows}</table>"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
        if len(value) > MAX_TABLE_ROWS:
            shown = generic(list(value[:MAX_TABLE_ROWS]), depth)
            return f"{shown}<p class='sub'>... {len(value) - MAX_TABLE_ROWS} more rows in report.json</p>"
        keys: list = []
        for item in value:
            keys.extend(k for k in item if k not in keys)
        if len(keys) <= 14 and depth < 4:
            head = "".join(f"<th>{_e(k)}</th>" for k in keys)
            body = "".join("<tr>" + "".join(f"<td>{generic(item.get(k), depth + 1)}</td>" for k in keys) + "</tr>"
                           for item in value)
            return f"<table><tr>{head}</tr>{body}</table>"
        return "".join(generic(item, depth + 1) for item in value)
    if isinstance(value, str) and "\n" in value:
        return f"<pre>{_e(value)}</pre>"
    return _fmt(value)


def trimmed(value, max_items: int = 40):
    """Copy of a JSON-like value with long lists cut (for the embedded report.json view)."""
    if isinstance(value, dict):
        return {k: trimmed(v, max_items) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [trimmed(v, max_items) for v in value[:max_items]]
        if len(value) > max_items:
            items.append(f"... {len(value) - max_items} more items in report.json")
        return items
    return value


def _embed_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def verdict_block(report: dict) -> str:
    verdict = report.get("verdict")
    reasons = report.get("verdict_reasons")
    if verdict is None:
        verdict, reasons = judge(report)
    colour, background, advice = VERDICT_STYLE.get(verdict, VERDICT_STYLE["WARN"])
    items = "".join(f"<li>{_e(r)}</li>" for r in (reasons or []))
    return (f'<div class="verdict" id="verdict" data-verdict="{_e(verdict)}" '
            f'style="border-color:{colour};background:{background}">'
            f'<div class="big" style="color:{colour}">{_e(verdict)}</div><div>{_e(advice)}</div>'
            f"<ul>{items}</ul></div>")


def fallback_block(report: dict) -> str:
    fallback = report.get("fallback")
    if not fallback or not fallback.get("used"):
        return ""
    attempts = fallback.get("attempts", [])
    rows = "".join(
        f"<tr><td>{i + 1}</td><td>{_e(a.get('prealign', '-'))}</td><td>{_e(a.get('engine', '-'))}</td>"
        f"<td class='{_e(a.get('verdict', ''))}'>{_e(a.get('verdict', '-'))}</td>"
        f"<td>{'<br>'.join(_e(r) for r in a.get('reasons', [])[:3])}</td>"
        f"<td>{'<b>used</b>' if i == fallback.get('chosen') else ''}</td></tr>"
        for i, a in enumerate(attempts))
    return ("<h2>Automatic fallback</h2><p>The first attempt failed its checks, so other pre-alignment candidates "
            "or the other engine were tried automatically.</p><table><tr><th>#</th><th>pre-alignment</th>"
            f"<th>engine</th><th>verdict</th><th>reasons</th><th></th></tr>{rows}</table>")


def pictures_block(pictures: dict, base: Path) -> str:
    """One row per kind of picture, one column per state: as the headers place the images, after pre-alignment,
    after registration. No captions: every PNG is titled with its state and kind and carries its legend."""
    if not pictures:
        return "<h2>Pictures</h2><p>No pictures were made (--no-report, or the images do not overlap).</p>"
    kinds = [k for k in KIND_TITLES if any(key.startswith(k + "_") for key in pictures)]
    kinds += sorted({key.rsplit("_", 1)[0] for key in pictures} - set(kinds))
    present = {key.rsplit("_", 1)[1] for key in pictures}
    stages = [s for s in STAGE_ORDER if s in present] + sorted(present - set(STAGE_ORDER))
    order = ", ".join(STATE_WORDS.get(stage, stage) for stage in stages)
    parts = ["<h2>Pictures</h2><p class='sub'>Slices through the centre of the overlap, in the fixed image's frame; "
             f"left to right: {_e(order)}. Radiological convention: the patient's right is on the left of axial and "
             "coronal views; yellow letters mark the patient directions (R/L, A/P, S/I).</p>"]
    for kind in kinds:
        cells = []
        for stage in stages:
            key = f"{kind}_{stage}"
            if key not in pictures:
                continue
            path = Path(pictures[key])
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                cells.append(f"<p class='WARN'>Picture {_e(key)} is missing ({_e(path.name)}).</p>")
                continue
            cells.append(f'<img class="qa" alt="{_e(key)}" data-stage="{_e(stage)}" src="{_embed_png(path)}">')
        parts.append(f"<h3>{_e(KIND_TITLES.get(kind, (kind, ''))[0])}</h3><div class='states'>{''.join(cells)}</div>")
    return "".join(parts)


def _change_cell(before, after, higher_is_better: bool) -> str:
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)):
        return "<td>-</td>"
    delta = after - before
    good = delta > 0 if higher_is_better else delta < 0
    css = "better" if good and abs(delta) > 1e-9 else ("worse" if abs(delta) > 1e-9 else "")
    return f'<td class="num {css}">{delta:+.4g}</td>'


def similarity_table(metrics: dict) -> str:
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    if not before and not after:
        return ""
    names = {"nmi": ("Normalised mutual information (1 = unrelated, higher = better)", True),
             "mi": ("Mutual information (nats, higher = better)", True),
             "overlap_fraction_fixed": ("Share of the fixed image covered by the moving", True),
             "overlap_fraction_moving": ("Share of the moving image covered by the fixed", True),
             "samples": ("Voxels compared", True)}
    rows = "".join(f"<tr><td>{_e(label)}</td><td class='num'>{_fmt(before.get(k))}</td>"
                   f"<td class='num'>{_fmt(after.get(k))}</td>{_change_cell(before.get(k), after.get(k), hib)}</tr>"
                   for k, (label, hib) in names.items() if k in before or k in after)
    return ("<h3>Image similarity (whole overlap)</h3><table><tr><th>metric</th><th>after pre-alignment</th>"
            f"<th>after registration</th><th>change</th></tr>{rows}</table>")


def structures_table(metrics: dict) -> str:
    block = metrics.get("structures") or {}
    after = {r["name"]: r for r in (block.get("after") or {}).get("structures", [])}
    before = {r["name"]: r for r in (block.get("before") or {}).get("structures", [])}
    if not after:
        return ""
    rows = []
    for name, row in after.items():
        b = before.get(name, {})
        rows.append(f"<tr><td>{_e(name)}</td><td class='num'>{_fmt(b.get('dice'))}</td>"
                    f"<td class='num'>{_fmt(row.get('dice'))}</td><td class='num'>{_fmt(b.get('centroid_distance_mm'))}"
                    f"</td><td class='num'>{_fmt(row.get('centroid_distance_mm'))}</td>"
                    f"<td class='num'>{_fmt(row.get('fixed_volume_ml'))}</td>"
                    f"<td class='num'>{_fmt(row.get('fraction_in_overlap'))}</td>"
                    f"<td>{_e(row.get('note', ''))}</td></tr>")
    summary = (block.get("after") or {}).get("summary", {})
    return ("<h3>Corresponding structures (label maps)</h3><p class='sub'>Dice: 1 = perfect overlap. Centroid "
            "distance: how far apart the centres of the same structure are (mm), measured inside the region both "
            "scans cover.</p><table><tr><th>structure</th><th>Dice before</th><th>Dice after</th>"
            "<th>centroid distance before (mm)</th><th>after (mm)</th><th>fixed volume (ml)</th>"
            f"<th>share inside overlap</th><th>note</th></tr>{''.join(rows)}</table>"
            f"<p class='sub'>Summary after registration: {generic(summary)}</p>")


def landmarks_table(metrics: dict) -> str:
    block = metrics.get("landmarks") or {}
    after = block.get("after") or {}
    if not after.get("points"):
        return ""
    before = {p["label"]: p for p in (block.get("before") or {}).get("points", [])}
    rows = "".join(f"<tr><td>{_e(p['label'])}</td><td class='num'>{_fmt(before.get(p['label'], {}).get('tre_mm'))}"
                   f"</td><td class='num'>{_fmt(p['tre_mm'])}</td></tr>" for p in after["points"])
    b = block.get("before") or {}
    rows += (f"<tr><th>mean</th><td class='num'>{_fmt(b.get('mean_tre_mm'))}</td>"
             f"<td class='num'>{_fmt(after.get('mean_tre_mm'))}</td></tr>"
             f"<tr><th>max</th><td class='num'>{_fmt(b.get('max_tre_mm'))}</td>"
             f"<td class='num'>{_fmt(after.get('max_tre_mm'))}</td></tr>")
    return ("<h3>Landmarks: target registration error (mm)</h3><table><tr><th>landmark</th>"
            f"<th>after pre-alignment</th><th>after registration</th></tr>{rows}</table>")


def checks_table(report: dict) -> str:
    checks = report.get("qa_checks")
    if checks is None:
        checks = compute_checks(report)
    if not checks:
        return ""
    rows = "".join(f"<tr><td>{_e(c['check'])}</td><td class='{_e(c['status'])}'>{_e(c['status'])}</td>"
                   f"<td>{_e(c['message'])}</td></tr>" for c in checks)
    return ("<h3>Checks behind the verdict</h3><table><tr><th>check</th><th>result</th><th>finding</th></tr>"
            f"{rows}</table>")


def _labelled_table(values: dict, labels: dict) -> str:
    """Two columns (what, value) for the ``labels`` keys present in ``values``, in the labels' order."""
    rows = "".join(f"<tr><td>{_e(label)}</td><td class='num'>{_fmt(values[key])}</td></tr>"
                   for key, label in labels.items() if values.get(key) is not None)
    return f"<table>{rows}</table>" if rows else ""


def content_table(metrics: dict) -> str:
    content = metrics.get("content") or {}
    if not content:
        return ""
    rows = "".join(f"<tr><td>{_e(role)}</td><td>{_fmt(info.get('extent_mm_lps'))}</td>"
                   f"<td class='num'>{_fmt(info.get('voxels'))}</td><td>{_fmt(info.get('spacing_mm'))}</td>"
                   f"<td class='num'>{_fmt(info.get('structure'))}</td></tr>" for role, info in content.items())
    return ("<h3>What each image holds (on the copies the metrics use)</h3><table><tr><th>image</th>"
            "<th>extent L, P, S (mm)</th><th>voxels</th><th>voxel size (mm)</th><th>structure ratio (noise about "
            f"0.25, scans 2-10)</th></tr>{rows}</table>")


def probes_table(probes: dict) -> str:
    """The probes in words: the result, then every shift, turn and mirror with its NMI and change; best marked."""
    rows = probes.get("probes") or []
    if "result_nmi" not in probes or not rows:
        return ""
    best_names = {(probes.get(f"best_{kind}") or {}).get("name") for kind in ("shift", "turn", "mirror")} - {None}
    body = f"<tr><td><b>the result itself</b></td><td class='num'>{_fmt(probes['result_nmi'])}</td><td>-</td></tr>"
    for row in rows:
        gain = row.get("relative_gain")
        change = f"{gain * 100:+.1f}%" if isinstance(gain, (int, float)) else "-"
        css = "worse" if isinstance(gain, (int, float)) and gain > 0 else ""
        mark = " (best of its kind)" if row.get("name") in best_names else ""
        body += (f"<tr><td>{_e(row.get('name'))}{_e(mark)}</td><td class='num'>{_fmt(row.get('nmi'))}</td>"
                 f"<td class='num {css}'>{_e(change)}</td></tr>")
    centre = probes.get("centre_mm_lps")
    where = f" ({', '.join(f'{v:.0f}' for v in centre)} mm, L, P, S)" if centre else ""
    return ("<h3>Self-consistency probes (normalised mutual information on a 4 mm grid)</h3><p class='sub'>The "
            "result moved a little, turned 180 degrees and mirrored: none should fit better (a positive change). "
            f"Turns and mirrors are about the point midway between the two objects' centres{_e(where)}.</p>"
            "<table><tr><th>probe</th><th>NMI</th><th>change of (NMI - 1) against the result</th></tr>"
            f"{body}</table>" + wide_probes_table(probes.get("wide") or {}))


def wide_probes_table(wide: dict) -> str:
    """The wide probes in words: the best slide along each axis and every refined turn."""
    if "result_nmi" not in wide:
        return ""
    best_slides: dict = {}
    for row in wide.get("slides") or []:
        axis = row["name"].rsplit(" ", 1)[-1]
        if axis not in best_slides or row["nmi"] > best_slides[axis]["nmi"]:
            best_slides[axis] = row
    rows = list(best_slides.values()) + list(wide.get("refined_turns") or [])
    if wide.get("refined_result"):
        rows.append(wide["refined_result"])
    body = f"<tr><td><b>the result itself</b></td><td class='num'>{_fmt(wide['result_nmi'])}</td><td>-</td></tr>"
    for row in rows:
        gain = row.get("relative_gain")
        css = "worse" if isinstance(gain, (int, float)) and gain > 0 else ""
        change = f"{gain * 100:+.1f}%" if isinstance(gain, (int, float)) else "-"
        body += (f"<tr><td>{_e(row['name'])}</td><td class='num'>{_fmt(row.get('nmi'))}</td>"
                 f"<td class='num {css}'>{_e(change)}</td></tr>")
    return (f"<p class='sub'>Far from the result ({_fmt(wide.get('grid_mm'))} mm grid): slid along each axis in "
            f"steps of {_fmt(wide.get('slide_step_mm'))} mm (the best position per axis), turned 180 degrees "
            "about each axis then refined (compared with the result refined the same way), and the result refined. "
            "None should fit clearly better.</p><table><tr><th>probe</th><th>NMI</th>"
            f"<th>change of (NMI - 1) against the result</th></tr>{body}</table>")


TRANSFORM_LABELS = {"determinant": "determinant of the linear part (negative = mirror)",
                    "scale": "overall scale (cube root of the determinant)",
                    "principal_scales": "scale along the principal directions"}
JACOBIAN_LABELS = {"min": "smallest Jacobian determinant", "max": "largest Jacobian determinant",
                   "mean": "mean Jacobian determinant", "percentile_1": "1st percentile",
                   "percentile_99": "99th percentile", "folding_percent": "folding voxels (%)",
                   "voxels": "voxels measured", "grid_spacing_mm": "grid spacing (mm)"}


def metrics_block(report: dict) -> str:
    metrics = report.get("metrics") or {}
    parts = ["<h2>Measurements</h2>", similarity_table(metrics), structures_table(metrics),
             landmarks_table(metrics), content_table(metrics)]
    if metrics.get("jacobian"):
        parts.append("<h3>Deformation (Jacobian determinant inside the overlap)</h3>"
                     + _labelled_table(metrics["jacobian"], JACOBIAN_LABELS))
    if metrics.get("transform"):
        parts.append("<h3>Final transform</h3>" + _labelled_table(metrics["transform"], TRANSFORM_LABELS))
    if metrics.get("probes"):
        parts.append(probes_table(metrics["probes"]))
    parts.append(checks_table(report))
    return "".join(parts)


def timings_table(timings: dict) -> str:
    """Each stage's time in run order (:data:`TIMING_LABELS`), totals last."""
    keys = [k for k in TIMING_LABELS if k in timings and not k.startswith("total")]
    keys += [k for k in timings if k not in TIMING_LABELS]
    keys += [k for k in TIMING_LABELS if k in timings and k.startswith("total")]
    rows = "".join(f"<tr><td>{_e(TIMING_LABELS.get(k, k))}</td><td class='num'>{_fmt(timings[k])}</td></tr>"
                   for k in keys)
    return f"<table><tr><th>stage</th><th>seconds</th></tr>{rows}</table>"


def inputs_block(inputs: dict) -> str:
    """One row per input (file, voxels, voxel size, extent); anything else as a generic table."""
    rows, rest = [], {}
    for name, info in inputs.items():
        if isinstance(info, dict) and "size" in info:
            rows.append(f"<tr><td>{_e(name)}</td><td>{_e(info.get('path', ''))}</td><td>{_fmt(info.get('size'))}</td>"
                        f"<td>{_fmt(info.get('spacing_mm'))}</td><td>{_fmt(info.get('extent_mm_lps'))}</td>"
                        f"<td>{_e(info.get('pixel_type', ''))}</td></tr>")
        elif info is not None:
            rest[name] = info
    table = ("<table><tr><th>input</th><th>file</th><th>voxels</th><th>voxel size (mm)</th>"
             f"<th>extent L, P, S (mm)</th><th>type</th></tr>{''.join(rows)}</table>") if rows else ""
    return f"<h2>Inputs</h2>{table}{generic(rest) if rest else ''}"


def diagnostics_block(diagnostics) -> str:
    """The diagnosis in words first (verdict, advice, warnings), the numbers folded away."""
    if not isinstance(diagnostics, dict):
        return f"<h2>Diagnostics</h2>{generic(diagnostics)}"
    words = []
    for key in ("verdict", "summary", "findings", "advice", "warnings"):
        value = diagnostics.get(key)
        if isinstance(value, str) and value:
            words.append(f"<p><b>{_e(value)}</b></p>")
        elif isinstance(value, (list, tuple)) and value:
            words.append("<ul>" + "".join(f"<li>{_e(v)}</li>" for v in value) + "</ul>")
    shown = {"verdict", "summary", "findings", "advice", "warnings"}
    rest = {k: v for k, v in diagnostics.items() if k not in shown}
    details = f"<details><summary>Diagnostic measurements</summary>{generic(rest)}</details>" if rest else ""
    return f"<h2>Diagnostics</h2>{''.join(words)}{details}"


def _code(block_id: str, text: str) -> str:
    return (f"<div class='code'><button type='button' onclick=\"mmpCopy('{block_id}', this)\">Copy</button>"
            f"<pre id='{block_id}'>{_e(text)}</pre></div>")


def reproduce_block(report: dict) -> str:
    """The code behind the run: the command line, the Slicer console code, the engine's own command / files."""
    entry = report.get("reproduce") or {}
    if not entry:
        return ""
    parts = ["<h2>Reproduce this run</h2><p class='sub'>The same settings give the same transform (fixed seed).</p>"]
    if entry.get("command_line"):
        parts.append("<h3>Command line</h3>" + _code("mmp-command", entry["command_line"]))
    if entry.get("slicer_python"):
        parts.append("<h3>3D Slicer Python console</h3>" + _code("mmp-slicer", entry["slicer_python"]))
    engine = entry.get("engine") or {}
    if engine.get("command_line"):
        command = engine["command_line"]
        text = command if isinstance(command, str) else " ".join(str(part) for part in command)
        parts.append("<h3>The engine's own command line (as run)</h3>" + _code("mmp-engine-command", text))
    if engine.get("parameters"):
        parts.append("<h3>The engine's parameters (as run)</h3>"
                     + _code("mmp-engine-parameters", json.dumps(engine["parameters"], indent=1, default=str)))
    for index, (name, text) in enumerate((engine.get("parameter_files") or {}).items()):
        parts.append(f"<h3>Parameter file: {_e(name)}</h3>" + _code(f"mmp-parameter-file-{index}", text))
    if entry.get("note"):
        parts.append(f"<p class='sub'>{_e(entry['note'])}</p>")
    return "".join(parts) + COPY_SCRIPT


def stages_block(report: dict) -> str:
    """Warnings and timings in the open; each stage's settings and details folded (click to open)."""
    parts = []
    for key, title in (("warnings", "Warnings"), ("stages", "Stages"), ("timings_s", "Timing of each stage (s)"),
                       ("timings", "Timing of each stage (s)")):
        if report.get(key):
            table = timings_table(report[key]) if key.startswith("timings") and isinstance(report[key], dict) \
                else generic(report[key])
            parts.append(f"<h3>{_e(title)}</h3>{table}")
    for key, title in (("prealign", "Pre-alignment"), ("crop", "Crop and working grid"),
                       ("registration", "Registration"), ("transform", "Final transform"),
                       ("settings", "Settings"), ("fallback", "Fallback attempts"), ("outputs", "Outputs"),
                       ("command", "Command"), ("tool", "Software")):
        if report.get(key):
            parts.append(f"<details><summary><b>{_e(title)}</b></summary>{generic(report[key])}</details>")
    return ("<h2>How the result was made</h2>" + "".join(parts)) if parts else ""


def structures_block(report: dict, base: Path) -> str:
    """``--per-structure``: one row per structure (verdict with reasons, motion relative to the global transform,
    masked MI, Dice with moving labels, its transform file) and its pictures; empty without report.json
    ``structures``."""
    block = report.get("structures")
    if not block:
        return ""
    rows = []
    for entry in block.get("results", []):
        motion, metrics = entry.get("motion_relative_to_global") or {}, entry.get("metrics") or {}
        mi, labels = metrics.get("mi") or {}, ((metrics.get("labels") or {}).get("after") or {})
        reasons = "<br>".join(_e(r) for r in entry.get("verdict_reasons") or [])
        rows.append(f"<tr><td>{_e(entry['name'])}</td><td class='{_e(entry['verdict'])}'>{_e(entry['verdict'])}</td>"
                    f"<td>{reasons}</td><td class='num'>{_fmt(motion.get('rotation_deg'))}</td>"
                    f"<td class='num'>{_fmt(motion.get('mean_displacement_mm'))}</td>"
                    f"<td class='num'>{_fmt(mi.get('global'))} &rarr; {_fmt(mi.get('registered'))}</td>"
                    f"<td class='num'>{_fmt(labels.get('dice'))}</td>"
                    f"<td>{_e((entry.get('files') or {}).get('transform') or '-')}</td></tr>")
    parts = ["<h2 id='structures'>Per-structure registration</h2><p class='sub'>Each structure of the fixed image "
             f"(names from {_e(block.get('names_from'))}) registered on its own from the global transform, in its own "
             "crop with a mask around it. Its transform file maps fixed to moving points like transform.h5 and applies "
             "to that structure only. The verdict above is the global transform's.</p>"
             "<table><tr><th>structure</th><th>verdict</th><th>reasons</th><th>rotation vs global (deg)</th>"
             "<th>mean displacement vs global (mm)</th><th>masked MI global &rarr; own (nats)</th>"
             "<th>Dice (moving labels)</th><th>transform</th></tr>" + "".join(rows) + "</table>"]
    figures = [(key, path) for key, path in (block.get("composite") or {}).items()]
    for entry in block.get("results", []):
        pictures = (entry.get("files") or {}).get("pictures") or {}
        figures += [(f"{entry['name']}: {key}", path) for key, path in pictures.items() if key.startswith("checker")]
    cells = []
    for key, path in figures:
        path = Path(path) if Path(path).is_absolute() else base / path
        if path.is_file():
            cells.append(f'<figure><img class="qa" alt="{_e(key)}" src="{_embed_png(path)}">'
                         f"<figcaption>{_e(key)}</figcaption></figure>")
    return "".join(parts) + (f"<div class='pair'>{''.join(cells)}</div>" if cells else "")


def _input_name(value) -> str:
    if isinstance(value, dict):
        value = value.get("path") or value.get("name") or ""
    return Path(str(value)).name if value else "?"


def render_html(report: dict, pictures: dict | None = None, base: str | os.PathLike = ".") -> str:
    """The whole page as a string (pictures read from ``base`` when their paths are relative)."""
    base = Path(base)
    inputs = report.get("inputs") or {}
    created = (report.get("created_utc") or report.get("created")
               or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    subtitle = " | ".join([f"fixed: {_input_name(inputs.get('fixed'))}", f"moving: {_input_name(inputs.get('moving'))}",
                           str(created), f"MultimodalPrealign {report.get('version', __version__)}"])
    sections = [
        f"<h1>Registration report</h1><div class='sub'>{_e(subtitle)}</div>",
        verdict_block(report),
        fallback_block(report),
        pictures_block(pictures or {}, base),
        structures_block(report, base),
        metrics_block(report),
    ]
    if inputs:
        sections.append(inputs_block(inputs))
    if report.get("diagnostics"):
        sections.append(diagnostics_block(report["diagnostics"]))
    sections.append(stages_block(report))
    sections.append(reproduce_block(report))
    sections.append("<h2>Technical details</h2><details><summary>report.json (long lists shortened)</summary><pre>"
                    f"{_e(json.dumps(trimmed(report), indent=1, default=str))}</pre></details>"
                    "<p class='sub'>Transforms map fixed-image points to moving-image points (physical LPS mm, "
                    "ITK convention).</p>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>Registration report - {_e(report.get('verdict', ''))}</title><style>{CSS}</style></head>"
            f"<body>{''.join(sections)}</body></html>")


def write_report_html(report: dict, pictures: dict | None, out_path: str | os.PathLike) -> Path:
    """Write the self-contained page to ``out_path`` atomically; relative picture paths are taken from its folder."""
    out_path = Path(out_path)
    text = render_html(report, pictures, out_path.parent)
    temporary = out_path.with_name(out_path.name + ".part")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, out_path)
    return out_path
