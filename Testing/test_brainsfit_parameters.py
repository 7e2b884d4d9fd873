"""The one BRAINSFit parameter builder, checked against the real BRAINSFit's own description (``BRAINSFit --xml``),
its command line, executable discovery, the engine names and the fallback order.

The real BRAINSFit is ``../shared/tools/brainsfit/bin/BRAINSFit`` (brainsfit_helpers: skipped only without
``../shared``, failed when it is there but does not run).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import xml.etree.ElementTree as ElementTree

import pytest
from brainsfit_helpers import BRAINSFIT_XML, brainsfit_executable

from MultimodalPrealignLib import cli, engines
from MultimodalPrealignLib.engines import brainsfit_parameters as bf
from MultimodalPrealignLib.errors import InputError, RegistrationError

#: Our outputs (BRAINSFit writes them); every other file parameter we send is an input.
OUTPUTS = {"linearTransform", "bsplineTransform", "outputVolume"}


def xml_parameters(text: str) -> dict:
    root = ElementTree.fromstring(text.strip())
    return {item.findtext("name"): item for group in root.iter("parameters") for item in group
            if item.findtext("name")}


@pytest.fixture(scope="module")
def brainsfit_xml() -> dict:
    """BRAINSFit's parameters as the real executable describes them (the --xml Slicer reads)."""
    done = subprocess.run([brainsfit_executable(), "--xml"], capture_output=True, text=True, timeout=60, check=True)
    return xml_parameters(done.stdout)


def check_against_xml(params: dict, xml: dict, files_are_paths: bool) -> None:
    """Every parameter exists in BRAINSFit's XML with a value of its type (and the channel we mean)."""
    for name, value in params.items():
        assert name in xml, f"{name} is not a BRAINSFit parameter"
        item = xml[name]
        assert item.findtext("longflag") == name, f"{name}: the command line uses --{name}"
        tag = item.tag
        if tag == "boolean":
            assert value is True, f"{name}: a switch, sent only when True"
        elif tag == "integer":
            assert isinstance(value, int) and not isinstance(value, bool), name
        elif tag == "double":
            assert isinstance(value, float), name
        elif tag == "integer-vector":
            assert re.fullmatch(r"-?\d+(,-?\d+)*", str(value)), name
        elif tag == "string-enumeration":
            assert value in [e.text for e in item.findall("element")], f"{name}: {value} not allowed"
        elif tag in ("image", "transform"):
            assert isinstance(value, str) and value, name
            assert item.findtext("channel").strip() == ("output" if name in OUTPUTS else "input"), name
            if files_are_paths and tag == "transform":
                extensions = item.get("fileExtensions", "").split(",")
                assert os.path.splitext(value)[1] in extensions, f"{name}: {value} not one of {extensions}"
            if name in ("fixedBinaryVolume", "movingBinaryVolume"):
                assert item.get("type") == "label", name
        else:
            raise AssertionError(f"{name}: unexpected BRAINSFit parameter type {tag}")


CONFIGURATIONS = [
    dict(stages=("rigid", "affine")),
    dict(stages=("rigid",), initial=True, sampling_percentage=0.05, iterations=300, number_of_threads=1),
    dict(stages=("rigid", "affine", "bspline"), initial=True, masks=True, spline_grid_size=(5, 5, 4),
         output_volume=True, histogram_bins=32),
    dict(stages=("affine",), fixed_mask_only=True, sampling_percentage=1.0),
]


def build(config: dict, names: dict) -> dict:
    return bf.brainsfit_parameters(
        names["fixed"], names["moving"], names["output"], config["stages"],
        names["initial"] if config.get("initial") else None, config.get("sampling_percentage"),
        config.get("iterations"), names["fixed_mask"] if config.get("masks") or config.get("fixed_mask_only") else None,
        names["moving_mask"] if config.get("masks") else None, names["volume"] if config.get("output_volume") else None,
        histogram_bins=config.get("histogram_bins", 50), spline_grid_size=config.get("spline_grid_size"),
        number_of_threads=config.get("number_of_threads"))


SLICER_IDS = {"fixed": "vtkMRMLScalarVolumeNode1", "moving": "vtkMRMLScalarVolumeNode2",
              "output": "vtkMRMLLinearTransformNode3", "initial": "vtkMRMLLinearTransformNode4",
              "fixed_mask": "vtkMRMLLabelMapVolumeNode5", "moving_mask": "vtkMRMLLabelMapVolumeNode6",
              "volume": "vtkMRMLScalarVolumeNode7"}
FILE_NAMES = {"fixed": "fixed.nrrd", "moving": "moving.nrrd", "output": "output_transform.h5",
              "initial": "initial_transform.h5", "fixed_mask": "fixed_mask.nrrd", "moving_mask": "moving_mask.nrrd",
              "volume": "moving_resampled.nrrd"}


@pytest.mark.parametrize("config", CONFIGURATIONS, ids=lambda c: "+".join(c["stages"]))
def test_every_parameter_the_module_or_the_engine_sends_is_in_brainsfit_xml_with_its_type(brainsfit_xml, config):
    slicer_params = build(config, SLICER_IDS)  # what slicer.cli.run gets in Slicer
    engine_params = build(config, FILE_NAMES)  # what the headless engine turns into a command line
    check_against_xml(slicer_params, brainsfit_xml, files_are_paths=False)
    check_against_xml(engine_params, brainsfit_xml, files_are_paths=True)
    # The same builder: the same parameters, only the node IDs / file names differ.
    assert set(slicer_params) == set(engine_params)
    assert {k: v for k, v in slicer_params.items() if k not in bf.FILE_PARAMETERS} == \
        {k: v for k, v in engine_params.items() if k not in bf.FILE_PARAMETERS}
    assert set(bf.FILE_PARAMETERS) <= set(brainsfit_xml)


def test_the_shipped_brainsfit_xml_is_what_the_executable_prints(brainsfit_xml):
    assert BRAINSFIT_XML.is_file()
    assert set(xml_parameters(BRAINSFIT_XML.read_text())) == set(brainsfit_xml)


def test_builder_stages_overrides_and_masks():
    params = build(CONFIGURATIONS[2], SLICER_IDS)
    assert params["useRigid"] and params["useAffine"] and params["useBSpline"]
    assert params["bsplineTransform"] == SLICER_IDS["output"] and "linearTransform" not in params
    assert params["splineGridSize"] == "5,5,4" and params["numberOfHistogramBins"] == 32
    assert params["maskProcessingMode"] == "ROI" and params["initializeTransformMode"] == "Off"
    plain = build(CONFIGURATIONS[0], SLICER_IDS)
    # None keeps BRAINSFit's own defaults: the keys are not sent at all.
    assert not {"samplingPercentage", "numberOfIterations", "initialTransform", "numberOfThreads"} & set(plain)
    assert plain["maskProcessingMode"] == "NOMASK" and plain["linearTransform"] == SLICER_IDS["output"]
    only_fixed = build(CONFIGURATIONS[3], SLICER_IDS)
    assert only_fixed["maskProcessingMode"] == "ROI" and "movingBinaryVolume" not in only_fixed
    with pytest.raises(InputError, match="Sampling percentage"):
        bf.brainsfit_parameters("f", "m", "o", sampling_percentage=1.5)
    with pytest.raises(InputError, match="order"):
        bf.brainsfit_parameters("f", "m", "o", ("affine", "rigid"))


def test_command_line_switches_values_and_lists():
    params = build(CONFIGURATIONS[2], FILE_NAMES)
    args = bf.command_line(["/opt/BRAINSFit"], params)
    assert args[0] == "/opt/BRAINSFit"
    assert "--useRigid" in args and "--useBSpline" in args and args[args.index("--useRigid") + 1].startswith("--")
    assert args[args.index("--splineGridSize") + 1] == "5,5,4"
    assert args[args.index("--initialTransform") + 1] == "initial_transform.h5"
    assert len(args) == 1 + sum(1 if v is True else 2 for v in params.values())
    assert bf.command_line(("Slicer", "--launch", "BRAINSFit"), {"useAffine": False})[:3] == ["Slicer", "--launch",
                                                                                               "BRAINSFit"]


def test_effective_sampling_never_below_the_minimum_sample_count():
    preset = bf.brainsfit_preset()
    assert bf.effective_sampling_percentage(None, 10_000_000) == preset["default_sampling_percentage"]
    assert bf.effective_sampling_percentage(0.05, 100_000) == pytest.approx(preset["min_samples"] / 100_000)
    assert bf.effective_sampling_percentage(None, 1000) == 1.0
    assert bf.effective_sampling_percentage(0.5, 1_000_000) == 0.5


def test_known_failures_translate_to_cause_and_fix():
    real_stderr = ("Description: ITK ERROR: MattesMutualInformationImageToImageMetricv4(0x55e981c347d0): All samples "
                   "map outside moving image buffer. The images do not sufficiently overlap.")
    err = bf.translate_failure(real_stderr, "", exit_code=1)
    assert isinstance(err, RegistrationError)
    text = err.one_line()
    assert "lost the overlap" in text and "Fix:" in text and "sampling percentage" in text and "\n" not in text
    assert "PARSE ERROR" in bf.brainsfit_preset()["known_failures"][-2][0]
    assert "did not accept a parameter" in bf.translate_failure("PARSE ERROR: Argument: --bogus").one_line()
    other = bf.translate_failure("reading\nERROR: could not open /x.nrrd\n", exit_code=134).one_line()
    assert other.startswith("BRAINSFit failed (exit code 134): ERROR: could not open /x.nrrd")


def test_stop_conditions_and_stage_progress_from_brainsfit_output():
    out = ("=== ITKv4 Registration: Starting Transform Estimations for Rigid(1 of 2).===\n"
           "Stop condition from optimizer.RegularStepGradientDescentOptimizerv4: Gradient magnitude tolerance met "
           "after 0 iterations. Gradient magnitude (0) is less than gradient magnitude tolerance (0.0001).\n"
           "=== ITKv4 Registration: Starting Transform Estimations for Affine(2 of 2).===\n"
           "Stop condition from optimizer.ConjugateGradientLineSearchOptimizerv4Template: Convergence checker "
           "passed at iteration 9.\n")
    stops = bf.stop_conditions(out)
    assert [s["iterations"] for s in stops] == [0, 9]
    assert bf.stage_progress(out) == ("Affine", 2, 2)
    assert bf.stage_progress("nothing yet") is None


# ------------------------------------------------------------------------------------------ discovery

def _script(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


@pytest.fixture()
def only_slicer_home(monkeypatch, tmp_path):
    """Discovery restricted to $SLICER_HOME and ~/Slicer* (home = tmp_path), so a Slicer on this machine is not
    found by accident."""
    preset = dict(bf.brainsfit_preset(), slicer_homes=["$SLICER_HOME", "~/Slicer*"])
    monkeypatch.setattr(bf, "brainsfit_preset", lambda: dict(preset))
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_discovery_explicit_path_environment_variable_and_errors(tmp_path, only_slicer_home):
    real = brainsfit_executable()
    found = bf.find_brainsfit(real, environ={})
    assert found.found_by == "--brainsfit" and found.version == "5.6.0" and found.command == (os.path.abspath(real),)
    by_variable = bf.find_brainsfit(None, environ={"MULTIMODAL_PREALIGN_BRAINSFIT": real, "PATH": ""})
    assert by_variable.found_by == "$MULTIMODAL_PREALIGN_BRAINSFIT"
    with pytest.raises(InputError, match="--brainsfit .*nope: no BRAINSFit executable there"):
        bf.find_brainsfit(str(tmp_path / "nope"), environ={"MULTIMODAL_PREALIGN_BRAINSFIT": real})
    broken = _script(tmp_path / "broken" / "BRAINSFit", "#!/bin/sh\necho 'error while loading shared libraries' >&2\n"
                                                        "exit 127\n")
    with pytest.raises(InputError, match="does not run: error while loading shared libraries"):
        bf.find_brainsfit(broken, environ={})
    with pytest.raises(InputError) as info:
        bf.find_brainsfit(None, environ={"PATH": str(tmp_path / "empty")})
    text = info.value.one_line()
    assert "none was found" in text and "$MULTIMODAL_PREALIGN_BRAINSFIT (not set)" in text and "PATH" in text
    assert "$SLICER_HOME" in text and "Fix: pass --brainsfit /path/to/BRAINSFit" in text


def test_discovery_on_path_and_in_a_slicer_installation_through_its_launcher(tmp_path, only_slicer_home):
    real = brainsfit_executable()
    on_path = tmp_path / "bin"
    on_path.mkdir()
    os.symlink(real, on_path / "BRAINSFit")
    assert bf.find_brainsfit(None, environ={"PATH": str(on_path)}).found_by == "PATH"
    # A Slicer installation: lib/Slicer-5.8/cli-modules/BRAINSFit, started through the launcher (Slicer --launch).
    home = tmp_path / "Slicer-5.8.1-linux-amd64"
    (home / "lib" / "Slicer-5.8" / "cli-modules").mkdir(parents=True)
    os.symlink(real, home / "lib" / "Slicer-5.8" / "cli-modules" / "BRAINSFit")
    _script(home / "Slicer", '#!/bin/sh\n[ "$1" = "--launch" ] && shift && exec "$@"\nexit 9\n')
    found = bf.find_brainsfit(None, environ={"PATH": str(tmp_path / "empty"), "SLICER_HOME": str(home)})
    assert found.found_by == "Slicer installation" and found.version == "5.6.0"
    assert found.command == (str(home / "Slicer"), "--launch", str(home / "lib/Slicer-5.8/cli-modules/BRAINSFit"))
    # ~/Slicer* is searched too (home = tmp_path here)
    assert bf.find_brainsfit(None, environ={"PATH": ""}).path == found.path


def test_cli_engine_brainsfit_without_executable_exits_2_before_reading_anything(tmp_path, only_slicer_home,
                                                                                 monkeypatch, capsys):
    monkeypatch.delenv("MULTIMODAL_PREALIGN_BRAINSFIT", raising=False)
    monkeypatch.delenv("SLICER_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code = cli.main(["register", "--fixed", str(tmp_path / "not_read.nrrd"), "--moving", str(tmp_path / "x.nrrd"),
                     "--out", str(tmp_path / "out"), "--engine", "brainsfit", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "brainsfit engine needs the BRAINSFit executable" in err and "--brainsfit" in err
    assert "not_read.nrrd" not in err and not (tmp_path / "out").exists()
    code = cli.main(["register", "--fixed", "f.nrrd", "--moving", "m.nrrd", "--out", str(tmp_path / "o"),
                     "--engine", "brainsfit", "--brainsfit", str(tmp_path / "missing" / "BRAINSFit")])
    assert code == 2 and "no BRAINSFit executable there" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ names and fallback

def test_engine_names_and_fallback_order_only_name_engines_that_always_run():
    assert engines.ENGINES == ("itk", "elastix", "brainsfit")
    assert engines.fallback_engines("itk") == ("elastix",)
    assert engines.fallback_engines("elastix") == ("itk",)
    assert engines.fallback_engines("brainsfit") == ("itk", "elastix")
    assert all("brainsfit" not in engines.fallback_engines(e) for e in engines.ENGINES)
    with pytest.raises(InputError, match="itk, elastix or brainsfit"):
        engines.RegistrationSettings(engine="ants").validate()
