"""INTEGRATION (QA on real pipeline output): run the `multimodal-prealign register` CLI on a synthetic phantom
pair written to disk, then build the QA block, pictures and report.html from its transform.h5/report.json
with report_helpers.qa_report_from_run (what `report_screenshot.py --run-dir` does). Covers
qa/metrics/pictures/report_html/verdict on what the pipeline really writes; it does NOT test that the CLI
itself writes report.html or sets the exit code from the verdict (that wiring lives in pipeline.py/cli.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from report_helpers import qa_report_from_run

from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.synthetic import phantoms

REPO = Path(__file__).resolve().parents[1]


def test_qa_report_on_cli_output(tmp_path):
    # 6 mm voxels: the QA of the run's outputs is the point, not the run's accuracy (it ends ~0.5 mm off either way)
    pair = phantoms.make_pair(seed=3, rotation_deg=10, translation_mm=20, fixed_spacing=(6.0, 6.0, 6.0),
                              moving_spacing=(6.0, 6.0, 7.0), labels=False)
    sitk.WriteImage(pair.fixed, str(tmp_path / "fixed.nrrd"))
    sitk.WriteImage(pair.moving, str(tmp_path / "moving.nrrd"))
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "MultimodalPrealignLib", "register", "--fixed",
                           str(tmp_path / "fixed.nrrd"), "--moving", str(tmp_path / "moving.nrrd"), "--out", str(out),
                           "--prealign", "moments", "--stages", "rigid", "--quiet"],
                          capture_output=True, text=True, cwd=str(REPO))
    assert done.returncode == 0, done.stderr[-2000:]
    result = transforms.read_transform(out / "transform.h5")
    points = phantoms.body_points(pair, 300)
    assert transforms.mean_point_error(result, pair.fixed_to_moving, points) < 2.0  # the run really worked
    html = qa_report_from_run(out, tmp_path / "fixed.nrrd", tmp_path / "moving.nrrd")
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "PASS", report["verdict_reasons"]
    assert report["metrics"]["after"]["nmi"] > report["metrics"]["before"]["nmi"]
    # no labels: no outlines; 3 kinds x 3 states (as the headers place them, after pre-alignment, after registration)
    assert html.is_file() and html.read_text().count("data:image/png;base64,") == 9
    assert all((out / p).is_file() for p in report["pictures"].values())
    assert np.isfinite(report["metrics"]["probes"]["best_turn"]["relative_gain"])
