"""Open report.html in headless Chromium as a user would: check every picture rendered, save a screenshot.

Usage:
    python benchmarks/report_screenshot.py                 # phantom pair through the pipeline (real data)
    python benchmarks/report_screenshot.py --synthetic     # synthetic torso phantom, no real data needed
    python benchmarks/report_screenshot.py --report DIR/report.html   # check an existing report

Needs Debian's `chromium` package (apt-get install -y chromium). Writes into benchmarks/results/report_check/
(or --out): report.html (+ pictures/), report_screenshot.png, and prints a JSON summary. Exit code 0 when
every <img> decoded (naturalWidth > 0) and the screenshot is not blank, 1 otherwise.

The checks themselves (image decoding, screenshot colours, the QA report of a pipeline output folder) live in
``Testing/report_helpers.py``, shared with the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MultimodalPrealign"))
sys.path.insert(0, str(REPO / "Testing"))

from report_helpers import check_images_decoded, find_chromium, qa_report_from_run, screenshot


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
