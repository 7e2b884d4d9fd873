"""The headless ``brainsfit`` engine with the real BRAINSFit executable (../shared/tools/brainsfit; see
brainsfit_helpers): end to end on a synthetic pair, the demo pair and the Slicer forum's thin slab, its two real
failures (exit 1 "All samples map outside moving image buffer"; the silent "Gradient magnitude tolerance met after 0
iterations"), determinism and its temporary files.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from brainsfit_helpers import (
    blob_phantom,
    brainsfit_executable,
    mean_error,
    moved_copy,
    rigid,
    thin_slab_pair,
)

from MultimodalPrealignLib import cli
from MultimodalPrealignLib.engines import RegistrationSettings, brainsfit_engine, register
from MultimodalPrealignLib.engines import brainsfit_parameters as bf
from MultimodalPrealignLib.errors import Cancelled, RegistrationError
from MultimodalPrealignLib.geometry import image_space, transforms
from MultimodalPrealignLib.progress import Progress

REPO = Path(__file__).resolve().parents[1]
PHANTOM_REFERENCE = REPO.parent / "shared" / "data" / "mridir-phantom" / "reference" / "rigid_ct_to_mr.tfm"


@pytest.fixture(scope="module")
def executable() -> str:
    return brainsfit_executable()


@pytest.fixture(scope="module")
def blob_pair():
    """The blob phantom (64^3, 2 mm) and a copy moved by a known rigid transform (5 deg, 8 mm)."""
    fixed = blob_phantom()
    truth = rigid(5.0, 8.0)
    moving = moved_copy(fixed, truth, fixed.GetSize(), fixed.GetSpacing(), fixed.GetOrigin())
    return fixed, moving, truth


def settings(executable, **values) -> RegistrationSettings:
    return RegistrationSettings(engine="brainsfit", brainsfit_path=executable, **values).validate()


def test_engine_registers_a_synthetic_pair_from_the_prealignment_and_cleans_up(executable, blob_pair, tmp_path,
                                                                               monkeypatch):
    fixed, moving, truth = blob_pair
    initial = transforms.translation([6.0, -3.0, 2.0])  # a rough pre-alignment (the shift only)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the engine's temporary folder goes
    result = register(fixed, moving, initial, settings(executable, stages=("rigid",), sampling_percentage=0.05))
    points = image_space.grid_points(fixed, 5)
    assert mean_error(initial, truth, points) > 3.0
    # BRAINSFit's output includes the initial transform: the result is the whole fixed->moving transform.
    assert mean_error(result.transform, truth, points) < 0.5
    used = result.settings_used
    assert used["engine"] == "brainsfit" and used["version"] == "5.6.0" and used["exit_code"] == 0
    args = used["command_line"]
    assert Path(args[0]).resolve() == Path(executable).resolve()
    assert args[args.index("--initialTransform") + 1] == "initial_transform.h5"
    assert str(tmp_path) not in " ".join(args[1:])  # temporary files named relative to the run's folder
    assert args[args.index("--numberOfThreads") + 1] == "1" and used["deterministic_single_thread"]
    assert used["sampling_percentage"] == max(0.05, 20000 / np.prod(fixed.GetSize()))
    assert result.stages[0]["stage"] == "rigid" and result.stages[0]["iterations"] > 0
    assert "Stop condition" in result.log
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone


def test_engine_keeps_its_files_when_asked_and_repeats_itself_bit_for_bit(executable, blob_pair, tmp_path):
    fixed, moving, _truth = blob_pair
    initial = transforms.identity()
    keep = tmp_path / "kept"
    quick = settings(executable, stages=("rigid", "affine"), iterations=100)
    first = brainsfit_engine.register_brainsfit(fixed, moving, initial, quick, keep_temporary_dir=str(keep))
    folder = Path(first.settings_used["temporary_folder"])
    assert folder.parent == keep
    names = {p.name for p in folder.iterdir()}
    assert {"fixed.nrrd", "moving.nrrd", "initial_transform.h5", "output_transform.h5", "brainsfit_stdout.txt",
            "brainsfit_stderr.txt"} <= names and "fixed_mask.nrrd" not in names  # no mask given
    second = brainsfit_engine.register_brainsfit(fixed, moving, initial, quick)
    assert np.array_equal(transforms.to_matrix(first.transform), transforms.to_matrix(second.transform))
    assert [s["stage"] for s in first.stages] == ["rigid", "affine"]


def test_cancel_kills_brainsfit_and_removes_its_files(executable, blob_pair, tmp_path, monkeypatch):
    fixed, moving, _truth = blob_pair
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    started = time.perf_counter()
    progress = Progress(cancel_requested=lambda: time.perf_counter() - started > 0.5)
    with pytest.raises(Cancelled):
        register(fixed, moving, transforms.identity(), settings(executable, sampling_percentage=1.0), progress)
    assert time.perf_counter() - started < 10.0  # all voxels, rigid + affine: far longer when not stopped
    assert list(tmp_path.iterdir()) == []


def test_brainsfit_accepts_every_parameter_we_build(executable, blob_pair, tmp_path):
    """The builder's fullest command line (B-spline, both masks, output volume, overrides) runs in the real
    BRAINSFit (it exits 1 with "PARSE ERROR" on any unknown flag)."""
    fixed, moving, _truth = blob_pair
    for name, image in (("fixed.nrrd", fixed), ("moving.nrrd", moving)):
        sitk.WriteImage(image, str(tmp_path / name))
        sitk.WriteImage(sitk.Cast(image > 10, sitk.sitkUInt8), str(tmp_path / f"mask_{name}"))
    transforms.write_transform(transforms.affine_from_matrix(np.eye(4)), tmp_path / "initial.h5")
    params = bf.brainsfit_parameters("fixed.nrrd", "moving.nrrd", "out.h5", ("rigid", "affine", "bspline"),
                                     "initial.h5", 0.05, 20, "mask_fixed.nrrd", "mask_moving.nrrd", "resampled.nrrd",
                                     histogram_bins=32, spline_grid_size=(4, 4, 4), number_of_threads=1)
    done = subprocess.run(bf.command_line([executable], params), cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    assert "PARSE ERROR" not in done.stderr
    result = transforms.read_transform(tmp_path / "out.h5")
    assert not transforms.is_linear(result) and (tmp_path / "resampled.nrrd").is_file()


def test_overlap_failure_from_brainsfits_real_stderr_is_cause_and_fix(executable, blob_pair):
    fixed, moving, _truth = blob_pair
    far = transforms.translation([0.0, 0.0, 1000.0])  # every fixed sample maps outside the moving image
    with pytest.raises(RegistrationError) as info:
        register(fixed, moving, far, settings(executable, stages=("rigid",)))
    text = info.value.one_line()
    assert text.startswith("BRAINSFit lost the overlap") and "All samples map outside moving image buffer" in text
    assert "Fix: start closer" in text and "\n" not in text


def test_silent_non_registration_is_detected_not_passed_on(executable, monkeypatch):
    """A 1 mm slab (2 slices of 0.5 mm) at BRAINSFit's 0.002 sampling: exit 0, "Gradient magnitude tolerance met
    after 0 iterations", the initial transform returned. The engine normally samples at least 20000 voxels, which
    avoids it; with that floor off, the real BRAINSFit output is caught."""
    fixed = blob_phantom()
    slab = moved_copy(fixed, sitk.Euler3DTransform(), (64, 64, 2), (2.0, 2.0, 0.5), (-63.0, -63.0, 1.0))
    preset = dict(bf.brainsfit_preset(), min_samples=1)
    monkeypatch.setattr(bf, "brainsfit_preset", lambda: dict(preset))
    nudge = transforms.translation([0.0, 0.0, 0.2])
    with pytest.raises(RegistrationError) as info:
        register(fixed, slab, nudge, settings(executable, stages=("rigid",)))
    text = info.value.one_line()
    assert "did not register" in text and "returned the initial transform unchanged" in text
    assert "Gradient magnitude tolerance met after 0 iterations" in text and "Fix: raise the sampling" in text


def test_thin_slab_forum_case_brainsfit_alone_fails_our_pipeline_succeeds(executable, tmp_path, capsys):
    """The Slicer forum's "All samples map outside moving image buffer": a 0.2 mm slab (4 x 0.05 mm slices) of a
    volume, moved by 8 deg / 10 mm. BRAINSFit alone (Slicer-user defaults: Rigid, geometry-centre initialisation,
    sampling 0.002) exits 1 without a transform; ``register --engine brainsfit`` succeeds."""
    fixed, moving, truth, points = thin_slab_pair()
    sitk.WriteImage(fixed, str(tmp_path / "volume.nrrd"))
    sitk.WriteImage(moving, str(tmp_path / "slab.nrrd"))
    alone = subprocess.run([executable, "--fixedVolume", "volume.nrrd", "--movingVolume", "slab.nrrd", "--useRigid",
                            "--initializeTransformMode", "useGeometryAlign", "--linearTransform", "alone.h5"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert alone.returncode == 1 and "All samples map outside moving image buffer" in alone.stderr
    assert not (tmp_path / "alone.h5").exists()
    code = cli.main(["register", "--fixed", str(tmp_path / "volume.nrrd"), "--moving", str(tmp_path / "slab.nrrd"),
                     "--out", str(tmp_path / "ours"), "--engine", "brainsfit", "--brainsfit", executable,
                     "--no-report", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / "ours" / "report.json").read_text())
    assert report["registration"]["engine"] == "brainsfit"
    assert report["settings"]["engine_settings_used"]["command_line"][0].endswith("BRAINSFit")
    result = transforms.read_transform(tmp_path / "ours" / "transform.h5")
    error = mean_error(result, truth, points)
    assert error < 2.5, f"mean error {error:.2f} mm on the slab"


def test_demo_pair_end_to_end_with_the_real_brainsfit(executable, tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli.main(["demo", "--out", str(out), "--engine", "brainsfit", "--brainsfit", executable, "--stages",
                     "rigid", "--iterations", "200", "--no-report", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "engine: brainsfit (rigid)" in printed
    report = json.loads((out / "report.json").read_text())
    used = report["settings"]["engine_settings_used"]
    assert used["parameters"]["numberOfIterations"] == 200 and used["parameters"]["useRigid"] is True
    assert report["verdict"] in ("PASS", "WARN")
    if PHANTOM_REFERENCE.is_file():  # the demo pair keeps the phantom's frames: its reference applies
        reference = sitk.ReadTransform(str(PHANTOM_REFERENCE))
        ct = sitk.ReadImage(str(cli.demo_pair()[0]))
        array = sitk.GetArrayFromImage(ct)
        index = np.argwhere((array > -300) & (array < 4000))[::97]
        points = np.array([ct.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]]) for p in index])
        error = mean_error(transforms.read_transform(out / "transform.h5"), reference, points)
        assert error < 6.0, f"mean distance from the phantom's rigid reference {error:.2f} mm"
