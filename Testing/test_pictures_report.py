"""QA pictures (orientation, before/after, outlines) and report.html (self-contained, verdict first); the HTML
is opened in headless Chromium when it is installed (Debian package `chromium`) to check every image decodes."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.qa import measure, metrics, pictures, report_html, reporting, tables
from MultimodalPrealignLib.synthetic import phantoms


def _blob_image() -> sitk.Image:
    """Identity-direction LPS image, 2 mm voxels, dark background with one bright blob at the patient's
    LEFT (+x), ANTERIOR (-y), SUPERIOR (+z) side of the centre."""
    size = 40
    z, y, x = np.indices((size,) * 3).astype(float)
    origin = -size  # centre at 0 mm
    px, py, pz = origin + 2 * x, origin + 2 * y, origin + 2 * z
    array = np.where((px - 20) ** 2 + (py + 20) ** 2 + (pz - 20) ** 2 < 8 ** 2, 1000.0, 0.0)
    array += np.where(px ** 2 / 35 ** 2 + py ** 2 / 35 ** 2 + pz ** 2 / 35 ** 2 < 1, 100.0, 0.0)
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.0))
    image.SetOrigin((origin,) * 3)
    return image


def _bright_position(view: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(view > 500)
    return rows.mean() / view.shape[0], cols.mean() / view.shape[1]


def test_planes_are_shown_in_radiological_orientation():
    image = _blob_image()
    grid = pictures.DisplayGrid(pictures.bounding_box(image), 2.0, np.array([20.0, -20.0, 20.0]))
    row, col = _bright_position(pictures.sample_plane(image, grid, "axial"))
    assert col > 0.5 and row < 0.5  # patient's left on the viewer's right, anterior up
    row, col = _bright_position(pictures.sample_plane(image, grid, "coronal"))
    assert col > 0.5 and row < 0.5  # left on the right, superior up
    row, col = _bright_position(pictures.sample_plane(image, grid, "sagittal"))
    assert col < 0.5 and row < 0.5  # anterior on the left, superior up


def test_window_ignores_ct_padding():
    values = np.concatenate([np.full(5000, -3024.0), np.linspace(-1000, 1000, 5000)])
    lo, hi = pictures.window([values])
    assert lo > -1001 and hi < 1001


@pytest.fixture(scope="module")
def pair():
    return phantoms.make_pair(seed=4, rotation_deg=20, translation_mm=30, fixed_spacing=(4.0, 4.0, 4.0),
                              moving_spacing=(4.0, 4.0, 5.0))


@pytest.fixture(scope="module")
def report_dir(pair, tmp_path_factory):
    """A complete QA report on a synthetic pair: 'after' = the true transform, 'before' = the truth 20 mm off."""
    out = tmp_path_factory.mktemp("qa_report")
    before = transforms.compose(transforms.translation((12.0, 0.0, 16.0)), pair.fixed_to_moving)
    pairs = metrics.structure_pairs(pair.fixed_task, pair.moving_task)
    report = {"inputs": {"fixed": {"path": "/data/ct.nrrd"}, "moving": {"path": "/data/mr.nrrd"}},
              "diagnostics": {"findings": ["head-first vs feet-first"], "overlap_percent": 12.0},
              "timings_s": {"prealign": 1.5, "register": 20.0}, "settings": {"engine": "itk"}}
    report["metrics"] = measure.evaluate(pair.fixed, pair.moving, before, pair.fixed_to_moving, pair.fixed_labels,
                                    pair.moving_labels, pairs=pairs, probes=False)
    result = reporting.finish_report(report, out, pair.fixed, pair.moving, before, pair.fixed_to_moving,
                              pair.fixed_labels, pair.moving_labels, pairs)
    (out / "report.json").write_text(json.dumps(report, default=str))
    return out, report, result


def test_pictures_before_and_after_with_outlines(report_dir):
    out, report, result = report_dir
    assert result["verdict"] == "PASS"
    expected = {f"{kind}_{stage}" for kind in ("fusion", "checkerboard", "edges", "outlines")
                for stage in ("header", "before", "after")}
    assert set(result["pictures"]) == expected
    for name in result["pictures"].values():
        image = Image.open(out / name)
        assert image.format == "PNG" and image.size[0] > 500 and image.size[1] > 250
    before = np.asarray(Image.open(out / result["pictures"]["fusion_before"]).convert("RGB"))
    after = np.asarray(Image.open(out / result["pictures"]["fusion_after"]).convert("RGB"))
    assert before.shape != after.shape or np.mean(np.abs(before.astype(int) - after.astype(int))) > 1.0
    outline = np.asarray(Image.open(out / result["pictures"]["outlines_after"]).convert("RGB")).astype(int)
    magenta = (outline[..., 0] > 200) & (outline[..., 1] < 120) & (outline[..., 2] > 200)
    assert magenta.sum() > 200  # moving structure outlines are drawn


def test_outlines_coincide_after_and_not_before(pair):
    """Independent check of the outline picture: fixed and warped moving outlines overlap far more after."""
    before = transforms.compose(transforms.translation((12.0, 0.0, 16.0)), pair.fixed_to_moving)
    pairs = metrics.structure_pairs(pair.fixed_task, pair.moving_task)
    grid = pictures.display_grid(pair.fixed, pair.moving, pair.fixed_to_moving)
    fixed_table = pictures._structure_lookup(pairs, True, 200)
    moving_table = pictures._structure_lookup(pairs, False, 200)
    fixed_view = fixed_table[pictures.sample_plane(pair.fixed_labels, grid, "coronal", labels=True)]

    def agreement(transform):
        moving_view = moving_table[pictures.sample_plane(pair.moving_labels, grid, "coronal", transform, True)]
        return metrics.dice(fixed_view > 0, moving_view > 0)

    assert agreement(pair.fixed_to_moving) > 0.9 > agreement(before) + 0.05


def test_report_html_is_self_contained_and_starts_with_the_verdict(report_dir):
    out, report, result = report_dir
    text = (out / "report.html").read_text(encoding="utf-8")
    assert text.index('id="verdict"') < text.index("<h2>Pictures")
    assert 'data-verdict="PASS"' in text
    images = re.findall(r'<img[^>]+src="([^"]+)"', text)
    assert len(images) == len(result["pictures"]) == 12  # 4 kinds x 3 states (headers, pre-alignment, registration)
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text
    for needle in ("Inputs", "Diagnostics", "head-first vs feet-first", "Timing of each stage", "Dice",
                   "Normalised mutual information", "Checks behind the verdict"):
        assert needle in text, needle


def test_report_only_rebuilds_html_from_report_json(report_dir, tmp_path):
    out, _, _ = report_dir
    (out / "report.html").unlink()
    html = reporting.rewrite_report_html(out)
    assert html.is_file() and html.read_text().count("data:image/png;base64,") == 12


def test_fail_report_shows_reasons_first(tmp_path):
    report = {"metrics": {"before": {"nmi": 1.2}, "after": {"nmi": 1.05}, "transform": {"determinant": -1.0}}}
    reporting.finish_report(report, tmp_path, None, None, None, None, write_pictures=False)
    path = report_html.write_report_html(report, {}, tmp_path / "report.html")
    text = path.read_text()
    assert 'data-verdict="FAIL"' in text and "mirrors the image" in text
    assert text.index("mirrors the image") < text.index("<h2>Measurements")


def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    """Opens report.html the way a user would (headless Chromium) and checks every picture decoded."""
    import report_helpers as shot

    chromium = shot.find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    out, _, result = report_dir
    images = shot.check_images_decoded(out / "report.html", chromium)
    assert images["images_total"] == images["images_decoded"] == len(result["pictures"])
    picture = shot.screenshot(out / "report.html", tmp_path / "shot.png", chromium, size=(1300, 2600))
    assert picture["ok"] and picture["coloured_fraction"] > 0.01
    # The check can fail: a report whose picture is corrupt is caught.
    broken = tmp_path / "broken.html"
    text = (out / "report.html").read_text()
    broken.write_text(text.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAAA", 1))
    images = shot.check_images_decoded(broken, chromium)
    assert images["images_decoded"] == images["images_total"] - 1


def test_metrics_table_fills_a_real_slicer_table_node(report_dir):
    slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed")
    _, report, _ = report_dir
    table = slicer.vtkMRMLTableNode()
    tables.fill_table_node(table, report)
    columns, rows = tables.metrics_table(report)
    assert table.GetNumberOfColumns() == len(columns) == 4
    assert table.GetNumberOfRows() == len(rows)
    assert table.GetCellText(0, 0) == "Verdict" and table.GetCellText(0, 3) == "PASS"
    texts = [table.GetCellText(r, 0) for r in range(table.GetNumberOfRows())]
    assert "Structures: mean Dice" in texts and "Normalised mutual information" in texts
    nmi_row = texts.index("Normalised mutual information")
    assert float(table.GetCellText(nmi_row, 2)) == pytest.approx(report["metrics"]["after"]["nmi"], rel=1e-3)


def test_report_only_judges_a_given_broken_transform(pair, tmp_path):
    shifted = transforms.compose(transforms.translation((0.0, 30.0, 0.0)), pair.fixed_to_moving)
    pairs = metrics.structure_pairs(pair.fixed_task, pair.moving_task)
    report = reporting.report_for_transform(pair.fixed, pair.moving, shifted, tmp_path, before=pair.fixed_to_moving,
                                     fixed_labels=pair.fixed_labels, moving_labels=pair.moving_labels, pairs=pairs)
    assert report["verdict"] == "FAIL"
    stored = json.loads((tmp_path / "report.json").read_text())
    assert stored["verdict"] == "FAIL" and stored["verdict_reasons"] == report["verdict_reasons"]
    assert 'data-verdict="FAIL"' in (tmp_path / "report.html").read_text()
    quiet = reporting.report_for_transform(pair.fixed, pair.moving, pair.fixed_to_moving, tmp_path / "batch",
                                    write_pictures=False)
    assert quiet["verdict"] == "PASS" and not (tmp_path / "batch" / "report.html").exists()
