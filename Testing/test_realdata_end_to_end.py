"""End to end on real data: the full-resolution MRI-DIR phantom pair and the embedded demo."""

from __future__ import annotations

import json
import subprocess
import sys

import SimpleITK as sitk

from MultimodalPrealignLib import cli
from MultimodalPrealignLib.geometry import transforms

REPORT_KEYS = ("tool", "inputs", "settings", "prealign", "crop", "registration", "transform", "metrics",
               "timings_s", "warnings", "outputs", "command")


def _check_report(report: dict) -> None:
    for key in REPORT_KEYS:
        assert key in report, key
    assert report["inputs"]["fixed"]["path"] and report["inputs"]["moving"]["path"]
    settings = report["settings"]
    for key in ("prealign", "engine", "stages", "seed", "crop_margin_mm", "spacing_scale", "isotropic",
                "prealign_used", "engine_settings_used"):
        assert key in settings, key
    assert report["prealign"]["transform"]["type"]
    assert [s["stage"] for s in report["registration"]["stages"]] == settings["stages"]
    for stage in report["registration"]["stages"]:
        assert stage["seconds"] >= 0
    for when in ("before", "after"):
        assert {"mi", "nmi", "overlap_fraction_fixed", "overlap_fraction_moving"} <= set(report["metrics"][when])
    assert report["timings_s"]["total"] > 0


def test_register_full_resolution_phantom_pair(phantom_pair, tmp_path):
    ct, mr = phantom_pair
    out = tmp_path / "phantom"
    code = cli.main(["register", "--fixed", str(ct), "--moving", str(mr), "--out", str(out), "--quiet"])
    report = json.loads((out / "report.json").read_text())
    # It must finish with a complete report; its exit code follows the verdict (alignment is the search's job).
    assert code == (4 if report["verdict"] == "FAIL" else 0), (code, report["verdict"])
    _check_report(report)
    assert report["verdict"] in ("PASS", "WARN", "FAIL") and report["verdict_reasons"]
    assert report["inputs"]["fixed"]["size"] == [512, 512, 409]
    assert report["inputs"]["moving"]["size"] == [512, 512, 94]
    written = transforms.read_transform(out / "transform.h5")
    summary = transforms.summarize(written)
    assert summary["matrix_4x4"] == report["transform"]["summary"]["matrix_4x4"]
    resampled = sitk.ReadImage(str(out / "moving_resampled.nrrd"))
    assert resampled.GetSize() == (512, 512, 409)


def test_demo_command_from_a_fresh_process(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "MultimodalPrealignLib", "demo", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "demo finished" in done.stdout and str(out.resolve()) in done.stdout
    _check_report(json.loads((out / "report.json").read_text()))
    assert (out / "transform.h5").is_file() and (out / "moving_resampled.nrrd").is_file()
