"""Open report.html in headless Chromium as a user would: check every picture rendered, save a screenshot.

Usage:
    python benchmarks/report_screenshot.py                 # phantom pair through the pipeline (real data)
    python benchmarks/report_screenshot.py --synthetic     # synthetic torso phantom, no real data needed
    python benchmarks/report_screenshot.py --report DIR/report.html   # check an existing report

Needs Debian's `chromium` package (apt-get install -y chromium). Writes into benchmarks/results/report_check/
(or --out): report.html (+ pictures/), report_screenshot.png, and prints a JSON summary. Exit code 0 when
every <img> decoded (naturalWidth > 0) and the screenshot is not blank, 1 otherwise.

The check: a copy of the page gets a tiny script that, on the load event, writes the number of images and
of decoded images into <body data-...>; Chromium's --dump-dom prints the DOM after load, so the counts show
whether the browser really decoded every embedded PNG. The screenshot is then examined for colour (the
fusion overlay is orange, the structure outlines green/magenta) so a blank or broken page fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MultimodalPrealign"))

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
    """Full-width screenshot; reports how much of it is coloured (fusion orange, outlines) vs blank."""
    done = _run_chromium(chromium, [f"--window-size={size[0]},{size[1]}", f"--screenshot={png_path.resolve()}",
                                    "--virtual-time-budget=5000", html_path.resolve().as_uri()])
    if not png_path.is_file():
        return {"ok": False, "returncode": done.returncode, "stderr": done.stderr[-500:]}
    rgb = np.asarray(Image.open(png_path).convert("RGB")).astype(int)
    spread = rgb.max(-1) - rgb.min(-1)
    orange = (rgb[..., 0] > 180) & (rgb[..., 1] > 80) & (rgb[..., 1] < 200) & (rgb[..., 2] < 90)
    non_white = np.any(rgb < 235, axis=-1)
    return {"ok": True, "size": list(rgb.shape[1::-1]), "coloured_fraction": round(float(np.mean(spread > 60)), 4),
            "orange_fraction": round(float(np.mean(orange)), 4), "non_white_fraction": round(float(np.mean(non_white)), 4)}


def build_synthetic_report(out_dir: Path) -> Path:
    """A report for the synthetic torso phantom: true transform as 'after', the truth 15 mm off as 'before'."""
    from MultimodalPrealignLib.geometry import transforms
    from MultimodalPrealignLib.qa import measure, metrics, reporting
    from MultimodalPrealignLib.synthetic import phantoms

    pair = phantoms.make_pair(seed=2, rotation_deg=25, translation_mm=30, moving_fov="slab",
                              fixed_spacing=(3.0, 3.0, 3.0), moving_spacing=(2.5, 2.5, 4.0))
    before = transforms.compose(transforms.translation((9.0, -6.0, 10.0)), pair.fixed_to_moving)
    pairs = metrics.structure_pairs(pair.fixed_task, pair.moving_task)
    report = {"inputs": {"fixed": {"path": "synthetic_ct (phantoms.make_pair seed 2)"},
                         "moving": {"path": "synthetic_mr slab"}},
              "note": "benchmark: synthetic pair, 'after' is the TRUE transform, 'before' the truth 15 mm off"}
    report["metrics"] = measure.evaluate(pair.fixed, pair.moving, before, pair.fixed_to_moving, pair.fixed_labels,
                                    pair.moving_labels, pairs=pairs)
    out_dir.mkdir(parents=True, exist_ok=True)
    reporting.finish_report(report, out_dir, pair.fixed, pair.moving, before, pair.fixed_to_moving, pair.fixed_labels,
                     pair.moving_labels, pairs)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return out_dir / "report.html"


def build_phantom_report(out_dir: Path, data: Path) -> Path:
    """Run the CLI on the MRI-DIR phantom pair (CT fixed, T2 MR moving) and return its report.html.

    Uses the pipeline's own outputs when it already writes report.html; otherwise builds the QA report from
    its transform.h5 with measure.evaluate / reporting.finish_report.
    """
    ct, mr = data / "mridir-phantom" / "ct.nrrd", data / "mridir-phantom" / "mr_t2.nrrd"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    command = [sys.executable, "-m", "MultimodalPrealignLib", "register", "--fixed", str(ct), "--moving", str(mr),
               "--out", str(out_dir)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=str(REPO))
    print(f"pipeline exit code {done.returncode} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if not (out_dir / "transform.h5").is_file():
        raise SystemExit("pipeline produced no transform:\n" + done.stderr[-2000:])
    if (out_dir / "report.html").is_file():
        return out_dir / "report.html"
    return qa_report_from_run(out_dir, ct, mr)


def qa_report_from_run(out_dir: Path, fixed_path: Path, moving_path: Path) -> Path:
    """Add the QA block, pictures and report.html to a pipeline output folder (transform.h5 + report.json)."""
    from MultimodalPrealignLib.geometry import transforms
    from MultimodalPrealignLib.io import image_io
    from MultimodalPrealignLib.qa import measure, reporting

    report = json.loads((out_dir / "report.json").read_text())
    fixed = image_io.load_image(fixed_path, "fixed image")
    moving = image_io.load_image(moving_path, "moving image")
    after = transforms.read_transform(out_dir / "transform.h5")
    before = _prealign_transform(report) or after
    started = time.perf_counter()
    metrics_block = measure.evaluate(fixed, moving, before, after)
    report["metrics"] = {**report.get("metrics", {}), **metrics_block}
    reporting.finish_report(report, out_dir, fixed, moving, before, after)
    print(f"QA (metrics, pictures, html) in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return out_dir / "report.html"


def _prealign_transform(report: dict):
    from MultimodalPrealignLib.geometry import transforms

    matrix = (((report.get("prealign") or {}).get("transform")) or {}).get("matrix_4x4")
    return transforms.affine_from_matrix(np.asarray(matrix)) if matrix else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", action="store_true", help="use the synthetic phantom (no real data)")
    parser.add_argument("--report", type=Path, help="check this existing report.html instead of building one")
    parser.add_argument("--run-dir", type=Path, help="existing pipeline output folder of the phantom pair: add the QA "
                        "report to it instead of running the pipeline")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "report_check")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("MULTIMODAL_PREALIGN_SHARED_DATA",
                                                                          REPO.parent / "shared" / "data")))
    args = parser.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("chromium not found: apt-get install -y chromium", file=sys.stderr)
        return 2
    if args.report:
        html = args.report
    elif args.run_dir:
        html = qa_report_from_run(args.run_dir, args.data / "mridir-phantom" / "ct.nrrd",
                                  args.data / "mridir-phantom" / "mr_t2.nrrd")
    elif args.synthetic or not (args.data / "mridir-phantom" / "ct.nrrd").is_file():
        html = build_synthetic_report(args.out / "synthetic")
    else:
        html = build_phantom_report(args.out / "phantom", args.data)
    images = check_images_decoded(html, chromium)
    shot = screenshot(html, html.with_name("report_screenshot.png"), chromium)
    ok = (images["images_total"] is not None and images["images_total"] == images["images_in_html"] > 0
          and images["images_decoded"] == images["images_total"] and shot.get("ok")
          and shot.get("coloured_fraction", 0) > 0.01)
    print(json.dumps({"html": str(html), "images": images, "screenshot": shot, "ok": bool(ok)}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
