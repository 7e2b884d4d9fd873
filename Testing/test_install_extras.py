"""The base install (``pip install -e .``, no extras) runs: itk-elastix is the ``elastix`` extra.

Each check runs in a subprocess where ``itk`` (and ``itk.*``) cannot be imported, as on a machine without
itk-elastix: every core module imports, the default engine registers, ``--engine elastix`` is one line with the
fix and exit 2, and a fallback that would try elastix skips it and says so.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import SimpleITK as sitk

from MultimodalPrealignLib.pipeline import fallback
from MultimodalPrealignLib.synthetic import phantoms

#: Prepended to each subprocess's code: a meta-path finder that makes ``itk`` unimportable.
NO_ITK = '''
import sys


class _NoItk:
    def find_spec(self, name, path=None, target=None):
        if name == "itk" or name.startswith("itk."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoItk())
'''

CLI = NO_ITK + "from MultimodalPrealignLib.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def _run(code: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A small CT/MR phantom pair (6 mm voxels) on disk."""
    folder = tmp_path_factory.mktemp("tiny_pair")
    pair = phantoms.make_pair(seed=0, rotation_deg=5.0, translation_mm=5.0, labels=False,
                              fixed_spacing=(6.0, 6.0, 6.0), moving_spacing=(6.0, 6.0, 6.0))
    fixed, moving = folder / "fixed.nrrd", folder / "moving.nrrd"
    sitk.WriteImage(pair.fixed, str(fixed))
    sitk.WriteImage(pair.moving, str(moving))
    return fixed, moving


def test_every_core_module_imports_and_a_fallback_skips_elastix_without_itk():
    code = NO_ITK + '''
import importlib, json, pkgutil
try:
    import itk  # noqa: F401
    raise SystemExit("itk was importable")
except ImportError:
    pass
import MultimodalPrealignLib
names = [m.name for m in pkgutil.walk_packages(MultimodalPrealignLib.__path__, "MultimodalPrealignLib.")
         if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)

from MultimodalPrealignLib import engines
from MultimodalPrealignLib.pipeline import PipelineOptions, run_pipeline
from MultimodalPrealignLib.synthetic import phantoms

# a head-feet flip the rigid stage cannot undo: the first attempt FAILs, the fallback would try elastix
pair = phantoms.make_pair(seed=6, rotation_deg=0.0, translation_mm=0.0, flip=True, labels=False,
                          fixed_spacing=(6.0, 6.0, 6.0), moving_spacing=(6.0, 6.0, 6.0))
options = PipelineOptions.create(prealign="geometry", stages=("rigid",), iterations=30)
report = run_pipeline(pair.fixed, pair.moving, options).report
print(json.dumps({"modules": len(names), "elastix_installed": engines.elastix_installed(),
                  "fallback": report["fallback"], "reasons": report["verdict_reasons"]}))
'''
    done = _run(code)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["modules"] > 50 and found["elastix_installed"] is False
    engines_tried = [a["engine"] for a in found["fallback"]["attempts"]]
    assert "elastix" not in engines_tried and found["fallback"]["attempts"][0]["verdict"] == "FAIL"
    assert found["fallback"]["skipped_engines"] == [
        {"engine": "elastix", "reason": "itk-elastix is not installed",
         "fix": 'pip install "multimodal-prealign[elastix]"'}]
    assert any("elastix engine was not tried" in r and "multimodal-prealign[elastix]" in r for r in found["reasons"])


def test_default_engine_registers_without_itk(tiny_pair, tmp_path):
    fixed, moving = tiny_pair
    out = tmp_path / "out"
    done = _run(CLI, "register", "--fixed", fixed, "--moving", moving, "--out", out, "--prealign", "moments",
                "--stages", "rigid", "--no-fallback", "--no-report", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["registration"]["engine"] == "itk" and (out / "transform.h5").is_file()


def test_elastix_engine_without_itk_elastix_is_one_line_exit_2_and_writes_nothing(tiny_pair, tmp_path):
    fixed, moving = tiny_pair
    out = tmp_path / "out"
    done = _run(CLI, "register", "--fixed", fixed, "--moving", moving, "--out", out, "--engine", "elastix",
                "--quiet")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "itk-elastix" in lines[0] and 'Fix: pip install "multimodal-prealign[elastix]"' in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_fallback_plan_leaves_out_engines_not_installed(monkeypatch):
    monkeypatch.setattr(fallback, "engine_installed", lambda engine: engine != "elastix")
    plan = fallback.fallback_plan(["geometry", "candidate 2"], ["itk", "elastix"])
    assert list(plan) == [("geometry", "itk"), ("candidate 2", "itk")] and plan.skipped == ("elastix",)
    # the chosen engine itself is never left out (an explicit elastix fails before, with one line)
    assert fallback.fallback_plan(["geometry"], ["elastix", "itk"]) == [("geometry", "elastix"), ("geometry", "itk")]
    # recorded only when the first attempt failed, i.e. when the fallback would have tried it
    passed = {"verdict_reasons": []}
    fallback.record_fallback(passed, [{"prealign": "geometry", "engine": "itk", "verdict": "PASS"}], 0, ("elastix",))
    assert "skipped_engines" not in passed["fallback"] and passed["verdict_reasons"] == []
