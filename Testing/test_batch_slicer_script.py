"""docs/examples/register_cohort.py, the headless Slicer batch, as far as it runs outside the Slicer application.

Real: the script, the module file ``MultimodalPrealign.py`` and its logic over Slicer's own module machinery
(slicer_app_stand_ins), slicer-core's MRML scene, the core's batch (manifest, per-pair folders, resume, summary)
and the REAL BRAINSFit executable run through a stand-in for Slicer's CLI machinery (slicer_cli_double).
Stood in: ``slicer.util.loadVolume`` (the application's IO manager) by :class:`LoadVolumeStandIn`, CropVolume's
interpolated crop (test_slicer_tools.FakeCropVolumeLogic), ``slicer.util.getModuleLogic``.
Not run here (needs the Slicer application): ``Slicer --no-main-window --python-script`` itself, Slicer's own
volume and segmentation readers, CropVolume, SlicerElastix, the Slicer-side ``Ctrl-C``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed")

from batch_helpers import make_cohort
from slicer_app_stand_ins import load_module

from MultimodalPrealignLib.batch import ROW_FIELDS, record
from MultimodalPrealignLib.slicer import engine_run, mrml_bridge

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "docs" / "examples" / "register_cohort.py"


def load_script():
    spec = importlib.util.spec_from_file_location("register_cohort", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


class LoadVolumeStandIn:
    """Stands in for ``slicer.util.loadVolume`` (it needs the Slicer application's IO manager): reads the file
    with SimpleITK into a new scalar volume node of the real scene; ``calls`` lists the paths read."""

    def __init__(self):
        self.calls = []

    def __call__(self, path, properties=None):
        self.calls.append(str(path))
        name = (properties or {}).get("name", Path(path).stem)
        return mrml_bridge.add_volume_from_sitk(slicer.mrmlScene, sitk.ReadImage(str(path)), name)


@pytest.fixture()
def slicer_batch(monkeypatch, tmp_path):
    """The module loaded, the real BRAINSFit behind its logic, loadVolume and getModuleLogic stood in."""
    from brainsfit_helpers import brainsfit_executable
    from slicer_cli_double import SlicerCLIDouble
    from test_slicer_tools import FakeCropVolumeLogic

    module = load_module(monkeypatch, tmp_path)
    cli = SlicerCLIDouble(slicer.mrmlScene, brainsfit_executable(), work_dir=tmp_path / "cli")

    def services(self, temp_dir, keep_temporary_files=False):
        return engine_run.SlicerServices(scene=slicer.mrmlScene, crop_logic=FakeCropVolumeLogic(), temp_dir=temp_dir,
                                         run_cli=cli.run, brainsfit_module=cli.module,
                                         process_events=cli.process_events,
                                         keep_temporary_files=keep_temporary_files)

    monkeypatch.setattr(module.MultimodalPrealignLogic, "slicerServices", services)
    load_volume = LoadVolumeStandIn()
    monkeypatch.setattr(slicer.util, "loadVolume", load_volume, raising=False)
    monkeypatch.setattr(slicer.util, "getModuleLogic", lambda name: module.MultimodalPrealignLogic(), raising=False)
    yield cli, load_volume
    slicer.mrmlScene.Clear(1)


def run_script(script, argv) -> int:
    with pytest.raises(SystemExit) as done:
        script.main(["--", *argv])
    return done.value.code


def test_cohort_through_the_module_logic_and_the_real_brainsfit(slicer_batch, tmp_path, capsys):
    cli, load_volume = slicer_batch
    manifest = make_cohort(tmp_path / "cohort", 3, flipped=("p03",),
                           extra_columns={"engine": {"p02": "itk"}, "prealign": {"p03": "none"},
                                          "no_fallback": {"p03": "yes"}})
    out = tmp_path / "out"
    options = ["--prealign", "moments", "--stages", "rigid", "--iterations", "50", "--quiet"]
    assert run_script(load_script(), [str(manifest), str(out), *options]) == 4  # p03 FAIL
    summary = json.loads((out / "summary.json").read_text())
    rows = {row["id"]: row for row in summary["pairs"]}
    assert list(summary["pairs"][0]) == list(ROW_FIELDS)  # the same summary as multimodal-prealign batch
    assert summary["scheduler"] == "this process (one pair after another)"
    assert [rows[i]["engine"] for i in ("p01", "p02", "p03")] == ["brainsfit", "itk", "brainsfit"]
    assert rows["p01"]["verdict"] in ("PASS", "WARN") and rows["p02"]["verdict"] in ("PASS", "WARN")
    assert rows["p03"]["verdict"] == "FAIL" and rows["p03"]["exit_code"] == 4
    assert len(cli.runs) == 2  # BRAINSFit ran for p01 and p03 (p03 without fallback)
    for pair_id in rows:
        folder = out / pair_id
        assert {"transform.h5", "moving_resampled.nrrd", "report.json", "report.html", "pictures",
                record.RECORD_FILE} <= {p.name for p in folder.iterdir()}
        report = json.loads((folder / "report.json").read_text())
        assert report["outputs"]["transform"] == "transform.h5" and report["verdict"] == rows[pair_id]["verdict"]
        fixed = sitk.ReadImage(str(tmp_path / "cohort" / "images" / f"{pair_id}{'_flipped' if pair_id == 'p03' else ''}"
                                   "_ct.nrrd"))
        assert sitk.ReadImage(str(folder / "moving_resampled.nrrd")).GetSize() == fixed.GetSize()
    assert "summary.html" in {p.name for p in out.iterdir()} and not (out / ".work").exists()
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0  # cleared after each pair

    # --resume: nothing registered or even read again.
    reads, brainsfit_runs = len(load_volume.calls), len(cli.runs)
    assert run_script(load_script(), [str(manifest), str(out), *options, "--resume"]) == 4
    assert (len(load_volume.calls), len(cli.runs)) == (reads, brainsfit_runs)
    assert all(row["resumed"] for row in json.loads((out / "summary.json").read_text())["pairs"])
    capsys.readouterr()


def test_bad_manifest_and_unsupported_columns(slicer_batch, tmp_path, capsys):
    cli, load_volume = slicer_batch
    manifest = make_cohort(tmp_path / "cohort", 2, extra_columns={"max_working_voxels": {"p02": "200000"}})
    script = load_script()
    text = manifest.read_text()
    bad = manifest.with_name("bad.csv")
    bad.write_text(text + "p01,images/none.nrrd,images/p01_mr.nrrd,\n")
    assert run_script(script, [str(bad), str(tmp_path / "bad_out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "ERROR: bad row: line 4 (id p01): fixed 'images/none.nrrd' does not exist" in err
    assert "duplicate id (also on line 2)" in err and not (tmp_path / "bad_out").exists()
    out = tmp_path / "out"
    options = ["--engine", "itk", "--prealign", "moments", "--stages", "rigid", "--iterations", "50", "--no-report",
               "--quiet"]
    assert run_script(script, [str(manifest), str(out), *options]) == 4
    rows = {row["id"]: row for row in json.loads((out / "summary.json").read_text())["pairs"]}
    assert rows["p01"]["verdict"] in ("PASS", "WARN") and not (out / "p01" / "report.html").exists()
    assert rows["p02"]["verdict"] == "ERROR" and rows["p02"]["exit_code"] == 2
    assert "does not take max_working_voxels" in rows["p02"]["error"] and not (out / "p02").exists()
    assert cli.runs == []  # engine itk: no BRAINSFit


def test_script_arguments_match_the_batch_defaults():
    script = load_script()
    args = script.parse_args(["--", "cohort.csv", "out", "--prealign", "search", "--stages", "rigid",
                              "--crop-margin", "5", "--no-fallback"])
    options = script.default_options(args)
    assert (args.manifest, args.out, args.engine) == ("cohort.csv", "out", "brainsfit")
    assert options.prealign == "search" and options.registration.stages == ("rigid",)
    assert options.crop_margin_mm == 5.0 and options.fallback is False
    assert script.parse_args(["m.csv", "o"]).resume is False
