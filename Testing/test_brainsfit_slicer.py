"""BRAINSFit as the Slicer module runs it: asynchronously through Slicer's CLI machinery, cancellable, its CLI node
removed afterwards, with the parameters the headless engine sends.

The CLI machinery is ``slicer_cli_double.SlicerCLIDouble`` (``slicer.cli.run``'s stand-in: the Slicer application
cannot run here); behind it run a real ``vtkMRMLScene``, real volume / transform / CLI nodes, Slicer's transform
storage node and the real BRAINSFit executable (../shared/tools/brainsfit, see brainsfit_helpers).

Slicer defects fixed here: 3 (Cancel did not work during BRAINSFit: ``runSync`` blocked the GUI and never called
``cliNode.Cancel()``) and 8 (every BRAINSFit run left a ``vtkMRMLCommandLineModuleNode`` in the scene).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed")

from brainsfit_helpers import blob_phantom, brainsfit_executable, mean_error, moved_copy, rigid, thin_slab_pair
from slicer_cli_double import SlicerCLIDouble

from MultimodalPrealignLib import pipeline
from MultimodalPrealignLib.engines import brainsfit_parameters as bf
from MultimodalPrealignLib.errors import Cancelled, RegistrationError
from MultimodalPrealignLib.geometry import image_space, transforms
from MultimodalPrealignLib.progress import Progress
from MultimodalPrealignLib.slicer import brainsfit, engine_run, mrml_bridge
from MultimodalPrealignLib.synthetic import phantoms

CLI_NODE_CLASS = "vtkMRMLCommandLineModuleNode"


@pytest.fixture(scope="module")
def executable() -> str:
    return brainsfit_executable()


@pytest.fixture()
def scene():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


@pytest.fixture()
def double(scene, executable, tmp_path):
    cli = SlicerCLIDouble(scene, executable, work_dir=tmp_path / "cli")
    yield cli
    for run in cli.runs:  # never leave a BRAINSFit behind, whatever a test did
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()


@pytest.fixture(scope="module")
def blob_pair():
    fixed = blob_phantom()
    truth = rigid(5.0, 8.0)
    return fixed, moved_copy(fixed, truth, fixed.GetSize(), fixed.GetSpacing(), fixed.GetOrigin()), truth


def nodes_for(scene, fixed, moving, initial=None):
    """Fixed / moving volume nodes, the initial transform node (fixed->moving ``initial``) and an output node."""
    fixed_node = mrml_bridge.add_volume_from_sitk(scene, fixed, "CT")
    moving_node = mrml_bridge.add_volume_from_sitk(scene, moving, "MR")
    initial_node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "pre-alignment")
    mrml_bridge.set_transform_node_from_sitk(initial_node, initial or transforms.identity())
    output_node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    return fixed_node, moving_node, initial_node, output_node


def parameters(nodes, stages=("rigid", "affine"), sampling=0.02, **extra) -> dict:
    fixed_node, moving_node, initial_node, output_node = nodes
    return bf.brainsfit_parameters(fixed_node.GetID(), moving_node.GetID(), output_node.GetID(), stages,
                                   initial_node.GetID(), sampling, number_of_threads=1, **extra)


class Recorder:
    """A progress callback that records what it got, and a cancel request after ``cancel_after`` GUI events."""

    def __init__(self, double=None, cancel_after: int | None = None):
        self.reports, self.double, self.cancel_after = [], double, cancel_after

    def __call__(self, stage, fraction, message):
        self.reports.append((stage, fraction, message))

    def cancel_requested(self) -> bool:
        return self.cancel_after is not None and self.double.events_processed >= self.cancel_after


def test_brainsfit_runs_asynchronously_keeps_the_gui_alive_forwards_progress_and_leaves_no_cli_node(
        scene, double, blob_pair):
    """Defect 3 (GUI blocked, no progress) and defect 8 (CLI node left in the scene), success path."""
    fixed, moving, truth = blob_pair
    nodes = nodes_for(scene, fixed, moving)
    recorder = Recorder()
    run = brainsfit.run_brainsfit(double.run, double.module, parameters(nodes), process_events=double.process_events,
                                  progress=Progress(recorder, recorder.cancel_requested), poll_seconds=0.01)
    record = double.runs[0]
    assert record.exit_code == 0 and record.args[0] == double.executable
    # The GUI processed events all along (BRAINSFit ran asynchronously), and the progress reached the callback.
    assert double.events_processed >= 5
    assert recorder.reports and all(stage == "register" for stage, _, _ in recorder.reports)
    assert "BRAINSFit running" in recorder.reports[0][2]
    # The output node holds BRAINSFit's result, read back the way Slicer reads it (storage node).
    result = mrml_bridge.sitk_from_transform_node(nodes[3])
    assert mean_error(result, truth, image_space.grid_points(fixed, 5)) < 0.5
    assert "Stop condition" in run.output_text and run.status == "Completed"
    assert scene.GetNumberOfNodesByClass(CLI_NODE_CLASS) == 0  # defect 8: removed after the run


def test_cancel_stops_brainsfit_and_raises_cancelled(scene, double, blob_pair):
    """Defect 3: a cancel request while BRAINSFit runs calls cliNode.Cancel(), waits for it to stop, raises
    Cancelled; the process is gone, the output node untouched, the CLI node removed (defect 8)."""
    fixed, moving, _truth = blob_pair
    nodes = nodes_for(scene, fixed, moving)
    before = mrml_bridge.sitk_from_transform_node(nodes[3])
    recorder = Recorder(double, cancel_after=3)
    started = time.perf_counter()
    with pytest.raises(Cancelled):
        brainsfit.run_brainsfit(double.run, double.module, parameters(nodes, sampling=1.0, iterations=1500),
                                process_events=double.process_events,
                                progress=Progress(recorder, recorder.cancel_requested), poll_seconds=0.01)
    record = double.runs[0]
    assert record.cancel_requested and record.process.poll() is not None
    assert record.exit_code != 0  # killed, not finished
    assert time.perf_counter() - started < 10.0
    after = mrml_bridge.sitk_from_transform_node(nodes[3])
    assert np.array_equal(transforms.to_matrix(before), transforms.to_matrix(after))
    assert scene.GetNumberOfNodesByClass(CLI_NODE_CLASS) == 0


def test_brainsfit_failure_in_slicer_is_cause_and_fix_and_leaves_no_cli_node(scene, double):
    """The thin slab at BRAINSFit's default sampling: the CLI ends CompletedWithErrors with ITK's "All samples map
    outside moving image buffer" on stderr -> one line, cause + fix; the CLI node is removed (defect 8)."""
    fixed, moving, _truth, _points = thin_slab_pair()
    nodes = nodes_for(scene, fixed, moving)
    with pytest.raises(RegistrationError) as info:
        brainsfit.run_brainsfit(double.run, double.module, parameters(nodes, stages=("rigid",), sampling=None),
                                process_events=double.process_events, poll_seconds=0.01)
    assert double.runs[0].exit_code == 1
    assert info.value.one_line().startswith("BRAINSFit lost the overlap") and "Fix:" in info.value.one_line()
    assert scene.GetNumberOfNodesByClass(CLI_NODE_CLASS) == 0


def test_slicer_silent_non_registration_is_reported(scene, double):
    """BRAINSFit exits 0 but returns the initial transform ("Gradient magnitude tolerance met after 0 iterations"):
    the Slicer path checks the output node against the initial one."""
    fixed = blob_phantom()
    slab = moved_copy(fixed, sitk.Euler3DTransform(), (64, 64, 2), (2.0, 2.0, 0.5), (-63.0, -63.0, 1.0))
    nudge = transforms.translation([0.0, 0.0, 0.2])
    nodes = nodes_for(scene, fixed, slab, nudge)
    run = brainsfit.run_brainsfit(double.run, double.module, parameters(nodes, stages=("rigid",), sampling=None),
                                  process_events=double.process_events, poll_seconds=0.01)
    with pytest.raises(RegistrationError, match="did not register.*initial transform unchanged"):
        brainsfit.check_registered(run.output_text, mrml_bridge.sitk_from_transform_node(nodes[2]),
                                   mrml_bridge.sitk_from_transform_node(nodes[3]),
                                   brainsfit.volume_corners_lps(nodes[0]))
    corners = brainsfit.volume_corners_lps(nodes[0])
    assert np.allclose(np.sort(corners, 0)[[0, -1]], [[-64.0, -64.0, -64.0], [64.0, 64.0, 64.0]])


def test_slicer_pipeline_sends_brainsfit_what_the_headless_engine_sends(scene, double, executable, tmp_path):
    """CropVolume + BRAINSFit in Slicer (engine_run) and the headless engine: the same BRAINSFit parameters (only
    node IDs vs file names, and the sampling share of each's working grid, may differ); the CLI node is gone."""
    from test_slicer_tools import FakeCropVolumeLogic

    pair = phantoms.make_pair(seed=1, fixed_spacing=(5.0, 5.0, 5.0), moving_spacing=(5.0, 5.0, 6.0), rotation_deg=8.0,
                              translation_mm=12.0, labels=False)
    fixed_node = mrml_bridge.add_volume_from_sitk(scene, pair.fixed, "CT")
    moving_node = mrml_bridge.add_volume_from_sitk(scene, pair.moving, "MR")
    services = engine_run.SlicerServices(scene=scene, crop_logic=FakeCropVolumeLogic(), temp_dir=str(tmp_path),
                                         run_cli=double.run, brainsfit_module=double.module,
                                         process_events=double.process_events)
    run = engine_run.SlicerToolsRun(services, "brainsfit", fixed_node, moving_node)
    options = pipeline.PipelineOptions.create(prealign="moments", stages=("rigid",), iterations=200)
    in_slicer = engine_run.run_pipeline_with_slicer_tools(pair.fixed, pair.moving, options, run)
    assert scene.GetNumberOfNodesByClass(CLI_NODE_CLASS) == 0
    points = image_space.grid_points(pair.fixed, 6)
    assert transforms.mean_point_error(in_slicer.transform, pair.fixed_to_moving, points) < 2.5

    headless = pipeline.run_pipeline(pair.fixed, pair.moving, pipeline.PipelineOptions.create(
        prealign="moments", stages=("rigid",), iterations=200, engine="brainsfit", brainsfit_path=executable,
        fallback=False))
    assert transforms.mean_point_error(headless.transform, pair.fixed_to_moving, points) < 2.5
    sent_in_slicer = double.runs[0].parameters
    sent_headless = headless.engine.settings_used["parameters"]
    assert set(sent_in_slicer) == set(sent_headless)
    differ = {k for k in sent_headless if sent_in_slicer[k] != sent_headless[k]}
    assert differ <= set(bf.FILE_PARAMETERS) | {"samplingPercentage"}
    assert differ >= {"fixedVolume", "movingVolume", "initialTransform", "linearTransform"}
