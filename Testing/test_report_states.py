"""The report shows the original misalignment and reads cleanly.

Three states side by side (as the headers place the images, after pre-alignment, after registration: on a pair
whose fix is a head-first/feet-first flip the first column must differ from the others), every caption once (the
PNGs carry their titles), slice positions as anatomical letters ("S 12 mm", never "P -0 mm"), the probes table
in words, timings in run order, thin slabs shown with their surroundings rather than as strips, and report.json
without thousands of pre-alignment candidates.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from MultimodalPrealignLib import prealign
from MultimodalPrealignLib.engines import EngineResult
from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.pipeline import PipelineOptions, run_pipeline
from MultimodalPrealignLib.qa import measure, pictures, reporting
from MultimodalPrealignLib.synthetic import phantoms


@pytest.fixture(scope="module")
def flipped_pair():
    """Headers that share no orientation: the true transform includes a head-first/feet-first flip."""
    return phantoms.make_pair(seed=11, rotation_deg=5, translation_mm=20, flip=True, fixed_spacing=(4.0, 4.0, 4.0),
                              moving_spacing=(4.0, 4.0, 5.0), labels=False)


@pytest.fixture(scope="module")
def report_dir(flipped_pair, tmp_path_factory):
    pair = flipped_pair
    out = tmp_path_factory.mktemp("states")
    before = transforms.compose(transforms.translation((4.0, -3.0, 6.0)), pair.fixed_to_moving)  # pre-alignment
    report = {"inputs": {"fixed": {"path": "/data/ct.nrrd"}, "moving": {"path": "/data/mr.nrrd"}},
              "timings_s": {"total_with_io": 30.0, "write": 2.0, "register": 20.0, "load": 1.0, "prealign": 4.0,
                            "total": 27.0, "diagnose": 0.5, "metrics": 1.0}}
    report["metrics"] = measure.evaluate(pair.fixed, pair.moving, before, pair.fixed_to_moving)
    result = reporting.finish_report(report, out, pair.fixed, pair.moving, before, pair.fixed_to_moving)
    return out, report, result


def _pictures_section(html: str) -> str:
    return html[html.index("<h2>Pictures"):html.index("<h2>Measurements")]


def test_three_states_as_the_headers_place_them_after_prealignment_after_registration(report_dir):
    """Before: only BEFORE (already after pre-alignment) and AFTER, which look alike when pre-alignment did the
    work (the demo's 178-degree flip)."""
    out, _, result = report_dir
    for kind in ("fusion", "checkerboard", "edges"):
        assert {f"{kind}_header", f"{kind}_before", f"{kind}_after"} <= set(result["pictures"]), result["pictures"]
    header = np.asarray(Image.open(out / result["pictures"]["fusion_header"]).convert("RGB")).astype(int)
    before = np.asarray(Image.open(out / result["pictures"]["fusion_before"]).convert("RGB")).astype(int)
    assert header.shape != before.shape or np.mean(np.abs(header - before)) > 3.0
    section = _pictures_section((out / "report.html").read_text(encoding="utf-8"))
    stages = re.findall(r'<img[^>]+data-stage="([a-z]+)"', section)
    assert stages[:3] == ["header", "before", "after"], stages


def test_every_caption_appears_once(report_dir):
    """Before: each picture's title was its PNG's title AND an HTML caption, the legend likewise."""
    out, _, _ = report_dir
    section = _pictures_section((out / "report.html").read_text(encoding="utf-8"))
    assert "<figcaption" not in section
    for _short, legend in pictures.KIND_TITLES.values():
        assert legend not in section, legend
    for title in pictures.STAGE_TITLES.values():
        assert title not in section, title


@pytest.mark.parametrize("plane, centre, expected", [
    ("coronal", (10.0, -0.3, 5.0), "P 0 mm"), ("coronal", (0.0, -12.4, 0.0), "A 12 mm"),
    ("axial", (0.0, 0.0, 40.2), "S 40 mm"), ("axial", (0.0, 0.0, -7.0), "I 7 mm"),
    ("sagittal", (-25.0, 0.0, 0.0), "R 25 mm"), ("sagittal", (0.4, 0.0, 0.0), "L 0 mm"),
])
def test_slice_positions_read_as_anatomical_letters(plane, centre, expected):
    """Before: 'P -0 mm' (a signed LPS coordinate rounded to minus zero)."""
    caption = pictures.plane_caption(plane, np.asarray(centre))
    assert expected in caption and "-0" not in caption, caption


def test_probes_table_is_in_words(report_dir):
    """Before: the raw keys of report.json (result_nmi, best_shift, relative_gain, centre_mm_lps)."""
    out, report, _ = report_dir
    html = (out / "report.html").read_text(encoding="utf-8")
    measurements = html[html.index("<h2>Measurements"):html.index("<h2>Inputs") if "<h2>Inputs" in html else None]
    for key in ("result_nmi", "best_shift", "best_turn", "relative_gain", "centre_mm_lps", "shift_mm"):
        assert key not in measurements, key
    assert "mirrored left-right" in measurements and "180 degrees about the A-P axis" in measurements


def test_timings_are_listed_in_run_order(report_dir):
    """Before: in the order the numbers were recorded (total_with_io first here)."""
    out, _, _ = report_dir
    html = (out / "report.html").read_text(encoding="utf-8")
    block = html[html.index("Timing of each stage"):]
    positions = [block.index(label) for label in ("reading the inputs", "diagnostics", "pre-alignment",
                                                  "registration", "metrics", "writing the outputs",
                                                  "total (the run)", "total with reading and writing")]
    assert positions == sorted(positions), positions


def test_a_thin_slab_is_shown_with_its_surroundings():
    """Before: the display grid hugged the slab's overlap, so the coronal and sagittal panels were thin strips."""
    pair = phantoms.make_pair(seed=3, rotation_deg=5, translation_mm=10, moving_fov="slab", slab_fraction=0.05,
                              fixed_spacing=(4.0, 4.0, 4.0), moving_spacing=(4.0, 4.0, 5.0), labels=False)
    grid = pictures.display_grid(pair.fixed, pair.moving, pair.fixed_to_moving)
    size = np.asarray(grid.box.size)
    assert size.min() >= 0.45 * size.max(), size
    coronal = pictures.sample_plane(pair.fixed, grid, "coronal")
    assert min(coronal.shape) >= 0.45 * max(coronal.shape), coronal.shape


def test_report_json_keeps_only_the_best_prealignment_candidates(monkeypatch, flipped_pair):
    """Before: every scored pose of the search went into report.json (342 KB of a 600 KB file on the demo)."""
    pair = flipped_pair
    rng = np.random.default_rng(0)
    truth = transforms.to_matrix(pair.fixed_to_moving)[:3].tolist()
    many = [{"stage": "global", "source": f"grid {i}", "score": float(rng.uniform(0, 0.3)),
             "matrix_4x4": np.eye(4)[:3].tolist()} for i in range(3000)]
    many.append({"stage": "final", "source": "refined", "score": 0.9, "matrix_4x4": truth})

    def fake_prealign(method, inputs):
        return prealign.PrealignResult("search", pair.fixed_to_moving, {"stand_in": True}, [], many)

    def keep_initial(fixed, moving, initial, settings, progress, fixed_mask=None, moving_mask=None):
        return EngineResult(initial, [])

    monkeypatch.setattr(prealign, "run_prealign", fake_prealign)
    result = run_pipeline(pair.fixed, pair.moving, PipelineOptions.create(prealign="search", fallback=False),
                          register_fn=keep_initial)
    kept = result.report["prealign"]["candidates"]
    assert 1 <= len(kept) <= 10 and kept[0]["score"] == 0.9
    assert result.report["prealign"]["candidates_total"] == len(many)
    assert len(json.dumps(result.report, default=str)) < 100_000
    assert len(result.prealign.candidates) == len(many)  # the fallback still sees them all


def test_report_only_shows_two_states_when_the_pre_alignment_is_the_header(flipped_pair, tmp_path):
    """--report-only judges a transform against the headers: the header state is not drawn twice."""
    pair = flipped_pair
    report = reporting.report_for_transform(pair.fixed, pair.moving, pair.fixed_to_moving, tmp_path)
    stages = {key.rsplit("_", 1)[1] for key in report["pictures"]}
    assert stages == {"header", "after"}, stages
    assert sitk.ReadImage(str(tmp_path / report["pictures"]["fusion_header"])).GetSize()[0] > 0
