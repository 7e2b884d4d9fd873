"""Finish a report: judge its metrics (verdict), write the pictures and report.html; and ``--report-only``,
which measures and judges a given transform without registering.

``before`` is the pre-alignment, ``after`` the final transform; both map fixed physical points to moving
physical points (LPS mm). The pictures show three states: as the headers place the images (the identity), after
pre-alignment and after registration (two when the pre-alignment is the headers' placement).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..geometry import transforms as tx
from ..io.landmarks import LandmarkPairs
from .measure import evaluate
from .verdict import apply_verdict

PICTURES_DIR = "pictures"


def finish_report(report: dict, out_dir: str | os.PathLike, fixed: sitk.Image, moving: sitk.Image,
                  before: sitk.Transform, after: sitk.Transform, fixed_labels: sitk.Image | None = None,
                  moving_labels: sitk.Image | None = None, pairs: Sequence | None = None,
                  write_pictures: bool = True, html_name: str = "report.html") -> dict:
    """Judge ``report`` (its ``metrics`` must be filled), then write pictures and ``out_dir/report.html``.

    Returns {"verdict", "pictures": {name: path relative to out_dir}, "html": path or None}. Also stores
    ``report["pictures"]`` (relative paths) and ``report["verdict"]``/``["verdict_reasons"]``/``["qa_checks"]``.
    With ``write_pictures=False`` (``--no-report``) only the verdict is computed.
    """
    out_dir = Path(out_dir)
    verdict = apply_verdict(report)
    if not write_pictures:
        return {"verdict": verdict, "pictures": {}, "html": None}
    from .pictures import render_pictures
    from .report_html import write_report_html

    names = render_pictures(fixed, moving, picture_states(before, after), out_dir / PICTURES_DIR,
                            fixed_labels, moving_labels, pairs)
    pictures = {key: f"{PICTURES_DIR}/{name}" for key, name in names.items()}
    report["pictures"] = pictures
    html = write_report_html(report, pictures, out_dir / html_name)
    return {"verdict": verdict, "pictures": pictures, "html": str(html)}


def picture_states(before: sitk.Transform, after: sitk.Transform) -> dict:
    """{state: fixed->moving transform} for the pictures: ``header`` (the identity: where the headers put the
    images), ``before`` (the pre-alignment) and ``after``; ``before`` is left out when it is the identity."""
    states = {"header": tx.identity()}
    if not _is_identity(before):
        states["before"] = before
    states["after"] = after
    return states


def _is_identity(transform: sitk.Transform, tolerance: float = 1e-6) -> bool:
    if not tx.is_linear(transform):
        return False
    return bool(np.allclose(tx.to_matrix(transform), np.eye(4), atol=tolerance))


def rewrite_report_html(out_dir: str | os.PathLike, report_name: str = "report.json",
                        html_name: str = "report.html") -> Path:
    """``--report-only`` helper: rebuild report.html from an existing ``report.json`` and its pictures."""
    from .report_html import write_report_html

    out_dir = Path(out_dir)
    report = json.loads((out_dir / report_name).read_text())
    if "verdict" not in report:
        apply_verdict(report)
    return write_report_html(report, report.get("pictures") or {}, out_dir / html_name)


def report_for_transform(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform,
                         out_dir: str | os.PathLike, before: sitk.Transform | None = None,
                         fixed_labels: sitk.Image | None = None, moving_labels: sitk.Image | None = None,
                         pairs: Sequence | None = None, landmarks: LandmarkPairs | None = None,
                         write_pictures: bool = True, extra: dict | None = None) -> dict:
    """``--report-only`` with a given transform: judge an existing registration without re-running it.

    ``before`` defaults to the identity (trust both headers). Writes ``out_dir/report.json``, the pictures and
    report.html (atomically per file) and returns the report dict.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    before = before if before is not None else tx.identity()
    report = dict(extra or {})
    report.setdefault("mode", "report-only: the given transform was judged, nothing was registered")
    report["transform"] = {"summary": tx.summarize(transform)}
    report["metrics"] = evaluate(fixed, moving, before, transform, fixed_labels, moving_labels, landmarks, pairs)
    finish_report(report, out_dir, fixed, moving, before, transform, fixed_labels, moving_labels, pairs,
                  write_pictures=write_pictures)
    temporary = out_dir / "report.json.part"
    temporary.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(temporary, out_dir / "report.json")
    return report
