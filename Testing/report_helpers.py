"""Checks of a QA report as a user sees it, shared by the tests and ``benchmarks/report_screenshot.py``.

* ``qa_report_from_run``: add the QA block, pictures and report.html to a pipeline output folder
  (transform.h5 + report.json), from the images and the transforms the run wrote.
* ``check_images_decoded`` / ``screenshot``: open report.html in headless Chromium (Debian package
  ``chromium``). A copy of the page gets a tiny script that, on the load event, writes the number of images
  and of decoded images into <body data-...>; Chromium's --dump-dom prints the DOM after load, so the counts
  show whether the browser really decoded every embedded PNG. The screenshot is examined for colour (the
  fusion overlay is orange, the structure outlines green/magenta) so a blank or broken page fails.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--mute-audio"]

CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-decoded', String(ok));
});
</script>"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run_chromium(chromium: str, args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def check_images_decoded(html_path: Path, chromium: str) -> dict:
    """Counts of <img> elements and of those Chromium decoded, from --dump-dom of a copy with CHECK_SCRIPT."""
    text = html_path.read_text(encoding="utf-8")
    probe = html_path.with_name(html_path.stem + ".imgcheck.html")
    probe.write_text(text.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    try:
        done = _run_chromium(chromium, ["--virtual-time-budget=5000", "--dump-dom", probe.resolve().as_uri()])
    finally:
        probe.unlink(missing_ok=True)
    total = re.search(r'data-images-total="(\d+)"', done.stdout)
    decoded = re.search(r'data-images-decoded="(\d+)"', done.stdout)
    return {"images_in_html": len(re.findall(r"<img\b", text)),
            "images_total": int(total.group(1)) if total else None,
            "images_decoded": int(decoded.group(1)) if decoded else None,
            "returncode": done.returncode}


def screenshot(html_path: Path, png_path: Path, chromium: str, size=(1300, 5200)) -> dict:
    """Full-width screenshot (``size`` in pixels); reports how much of it is coloured (fusion orange,
    outlines) vs blank."""
    done = _run_chromium(chromium, [f"--window-size={size[0]},{size[1]}", f"--screenshot={png_path.resolve()}",
                                    "--virtual-time-budget=5000", html_path.resolve().as_uri()])
    if not png_path.is_file():
        return {"ok": False, "returncode": done.returncode, "stderr": done.stderr[-500:]}
    rgb = np.asarray(Image.open(png_path).convert("RGB")).astype(int)
    spread = rgb.max(-1) - rgb.min(-1)
    orange = (rgb[..., 0] > 180) & (rgb[..., 1] > 80) & (rgb[..., 1] < 200) & (rgb[..., 2] < 90)
    non_white = np.any(rgb < 235, axis=-1)
    return {"ok": True, "size": list(rgb.shape[1::-1]), "coloured_fraction": round(float(np.mean(spread > 60)), 4),
            "orange_fraction": round(float(np.mean(orange)), 4),
            "non_white_fraction": round(float(np.mean(non_white)), 4)}


def qa_report_from_run(out_dir: Path, fixed_path: Path, moving_path: Path) -> Path:
    """Add the QA block, pictures and report.html to a pipeline output folder (transform.h5 + report.json).

    'before' is the pre-alignment recorded in report.json (fixed->moving, LPS mm), 'after' the run's
    transform.h5; returns the path of report.html.
    """
    from MultimodalPrealignLib.geometry import transforms
    from MultimodalPrealignLib.io import image_io
    from MultimodalPrealignLib.qa import measure, reporting

    report = json.loads((out_dir / "report.json").read_text())
    fixed = image_io.load_image(fixed_path, "fixed image")
    moving = image_io.load_image(moving_path, "moving image")
    after = transforms.read_transform(out_dir / "transform.h5")
    before = prealign_transform(report) or after
    started = time.perf_counter()
    metrics_block = measure.evaluate(fixed, moving, before, after)
    report["metrics"] = {**report.get("metrics", {}), **metrics_block}
    reporting.finish_report(report, out_dir, fixed, moving, before, after)
    print(f"QA (metrics, pictures, html) in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return out_dir / "report.html"


def prealign_transform(report: dict):
    """The pre-alignment of a report.json (fixed->moving, LPS mm) as an affine transform, or None."""
    from MultimodalPrealignLib.geometry import transforms

    matrix = (((report.get("prealign") or {}).get("transform")) or {}).get("matrix_4x4")
    return transforms.affine_from_matrix(np.asarray(matrix)) if matrix else None
