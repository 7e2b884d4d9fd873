"""Ctrl-C (SIGINT) and SIGTERM stop a command-line run within about a second, at any stage: exit 130, nothing
written, the output folder as it was (and no staging folder left beside it).

Before: in the itk stage the KeyboardInterrupt raised inside ITK's iteration callback became an engine failure
(traceback, automatic fallback, full outputs, exit 0); in the elastix stage it was ignored.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk

from MultimodalPrealignLib.synthetic import phantoms


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("interrupt")
    pair = phantoms.make_pair(seed=2, fixed_spacing=(2.5,) * 3, moving_spacing=(2.5, 2.5, 3.0), labels=False)
    sitk.WriteImage(pair.fixed, str(folder / "fixed.nrrd"))
    sitk.WriteImage(pair.moving, str(folder / "moving.nrrd"))
    return folder


def interrupt_at(pair_files: Path, out: Path, stage_text: str, signum: int, *extra: str) -> tuple[int, float, str]:
    """Start `register`, send ``signum`` when a progress line containing ``stage_text`` appears; (exit code,
    seconds from the signal to the exit, stderr)."""
    command = [sys.executable, "-m", "MultimodalPrealignLib", "register", "--fixed", str(pair_files / "fixed.nrrd"),
               "--moving", str(pair_files / "moving.nrrd"), "--out", str(out), "--iterations", "5000",
               "--sampling-percentage", "0.2", *extra]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in process.stderr:
        lines.append(line)
        if stage_text in line:
            break
    else:
        process.wait()
        pytest.fail(f"the run never reached '{stage_text}':\n{''.join(lines)}")
    sent = time.perf_counter()
    process.send_signal(signum)
    rest = process.stderr.read()
    code = process.wait(timeout=60)
    return code, time.perf_counter() - sent, "".join(lines) + rest


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stop_during_the_itk_registration(pair_files, tmp_path, signum):
    out = tmp_path / "out"
    code, seconds, stderr = interrupt_at(pair_files, out, "stage (itk)", signum, "--prealign", "moments")
    assert code == 130, stderr
    assert seconds < 2.0, f"stopped {seconds:.1f} s after the signal"
    assert "interrupted: nothing was written" in stderr
    assert "Traceback" not in stderr and "fallback" not in stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_stop_during_an_elastix_stage_that_cannot_be_interrupted(pair_files, tmp_path):
    pytest.importorskip("itk")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{\"previous\": true}")  # a previous run's outputs stay as they were
    code, seconds, stderr = interrupt_at(pair_files, out, "stage (elastix)", signal.SIGINT, "--prealign", "moments",
                                         "--engine", "elastix")
    assert code == 130, stderr
    assert seconds < 3.0, f"stopped {seconds:.1f} s after the signal"
    assert "Traceback" not in stderr
    assert [p.name for p in out.iterdir()] == ["report.json"] and "previous" in (out / "report.json").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left beside it
