"""Large integer images without full-size float32 copies (issue 19, a 1024^3 int16 microCT in <= 3 GB): the slab-wise
cast-and-shrink gives BinShrink's values bit for bit, moving_resampled.nrrd written slab by slab equals the whole
resampling, and a run on int16 images is the run on their float32 copies. Small images with the slab sizes
lowered, so the slab paths run; the 1024^3 case itself is in benchmarks/speed.py."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from MultimodalPrealignLib.geometry import resample, transforms
from MultimodalPrealignLib.io import image_io
from MultimodalPrealignLib.pipeline import outputs
from MultimodalPrealignLib.synthetic import phantoms


def _int_image(shape_zyx, pixel=np.int16, seed=0) -> sitk.Image:
    info = np.iinfo(pixel)
    low, high = max(int(info.min), -32768), min(int(info.max), 32767)  # the full 8/16-bit ranges
    values = np.random.default_rng(seed).integers(low, high, size=shape_zyx, endpoint=True)
    image = sitk.GetImageFromArray(values.astype(pixel))
    image.SetSpacing([0.3, 0.4, 0.5])
    image.SetOrigin([1.0, -2.0, 3.5])
    image.SetDirection(sitk.VersorTransform([0.3, 0.2, 1.0], 0.7).GetMatrix())
    return image


@pytest.mark.parametrize("pixel", [np.int16, np.uint16, np.uint8, np.int8, np.int32])  # int32: ITK's slabs
@pytest.mark.parametrize("shape_zyx, factors, region", [
    ((41, 30, 37), [2, 3, 4], None),
    ((41, 30, 37), [7, 2, 3], ([2, 1, 0], [35, 29, 40])),  # x: one reduction; the others: strided sums
    ((20, 30, 40), [3, 3, 3], ([0, 0, 1], [39, 30, 19])),  # a region: only its slabs are read
    ((23, 17, 50), [5, 2, 1], ([4, 3, 2], [40, 12, 21])),
    ((7, 8, 9), [1, 1, 3], None),
])
def test_slab_wise_cast_and_shrink_equals_binshrink_of_a_float_copy(monkeypatch, pixel, shape_zyx, factors, region):
    monkeypatch.setattr(resample, "SLAB_VOXELS", 600)  # several slabs, a thin last one
    image = _int_image(shape_zyx, pixel)
    source = image if region is None else sitk.RegionOfInterest(image, region[1], region[0])
    expected = sitk.BinShrink(sitk.Cast(source, sitk.sitkFloat32), factors)
    got = resample.float32_bin_shrink(image, factors, region)
    assert got.GetPixelID() == sitk.sitkFloat32 and got.GetSize() == expected.GetSize()
    assert got.GetOrigin() == expected.GetOrigin() and got.GetSpacing() == expected.GetSpacing()
    assert got.GetDirection() == expected.GetDirection()
    assert np.array_equal(sitk.GetArrayViewFromImage(got), sitk.GetArrayViewFromImage(expected))


def test_anti_aliased_crop_of_an_int16_image_equals_the_float32_one(monkeypatch):
    monkeypatch.setattr(resample, "SLAB_VOXELS", 500)
    image = _int_image((40, 36, 44))
    box = resample.bounding_box(image)
    box = type(box)(np.asarray(box.lower) + 2.0, np.asarray(box.upper) - 3.0)
    from_int = resample.resample_box(image, box, [1.3, 1.1, 1.7], -1024.0)
    from_float = resample.resample_box(sitk.Cast(image, sitk.sitkFloat32), box, [1.3, 1.1, 1.7], -1024.0)
    assert np.array_equal(sitk.GetArrayViewFromImage(from_int), sitk.GetArrayViewFromImage(from_float))


@pytest.mark.parametrize("pixel_id, small_moving", [(sitk.sitkInt16, False), (sitk.sitkFloat32, False),
                                                    (sitk.sitkInt16, True), (sitk.sitkUInt8, True)])
def test_streamed_moving_resampled_equals_the_whole_resampling(tmp_path, monkeypatch, pixel_id, small_moving):
    pair = phantoms.make_pair(seed=1, labels=False, fixed_spacing=(4.0, 4.0, 4.0), moving_spacing=(6.0, 6.0, 8.0))
    fixed = sitk.Cast(pair.fixed, sitk.sitkInt16)
    fixed.SetDirection(sitk.VersorTransform([0.1, 0.9, 0.2], 0.4).GetMatrix())  # oblique: slab origins in 3D
    moving = sitk.Cast(sitk.RescaleIntensity(pair.moving, 0, 250) if pixel_id == sitk.sitkUInt8 else pair.moving,
                       pixel_id)
    if small_moving:  # a corner of it: most of the fixed grid is outside, filled without resampling
        moving = sitk.RegionOfInterest(moving, [max(2, n // 3) for n in moving.GetSize()], [2, 3, 1])
        lower, upper = outputs._footprint_box(fixed, moving, pair.fixed_to_moving)
        assert 0 < np.prod(np.subtract(upper, lower)) < 0.5 * np.prod(fixed.GetSize())
    monkeypatch.setattr(outputs, "STREAMED_WRITE_VOXELS", 1000)
    monkeypatch.setattr(outputs, "STREAMED_SLAB_VOXELS", 3 * fixed.GetSize()[0] * fixed.GetSize()[1] + 1)
    assert outputs.streamed(fixed)
    ahead = outputs.ResampleAhead(fixed, moving)
    ahead.start(pair.fixed_to_moving)  # a streamed grid is not resampled ahead (it would be held whole)
    assert ahead.take(pair.fixed_to_moving) is None
    ahead.close()
    path = tmp_path / "moving_resampled.nrrd"
    outputs.write_resampled(fixed, moving, pair.fixed_to_moving, path, ahead=ahead)
    written = sitk.ReadImage(str(path))
    expected = outputs.resample_moving(fixed, moving, pair.fixed_to_moving)
    assert written.GetPixelID() == pixel_id and written.GetSize() == expected.GetSize()
    np.testing.assert_allclose(written.GetOrigin(), expected.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(written.GetSpacing(), expected.GetSpacing(), rtol=1e-12)
    np.testing.assert_allclose(written.GetDirection(), expected.GetDirection(), atol=1e-12)
    assert np.array_equal(sitk.GetArrayViewFromImage(written), sitk.GetArrayViewFromImage(expected))
    assert "encoding: raw" in path.read_bytes()[:1000].split(b"\n\n")[0].decode()


def test_slabs_that_do_not_fill_the_grid_are_refused(tmp_path):
    grid = sitk.Image([4, 3, 5], sitk.sitkInt16)
    with pytest.raises(ValueError, match="2 of the grid's 5 slices"):
        image_io.write_nrrd_slabs(tmp_path / "a.nrrd", grid, sitk.sitkInt16, [np.zeros((2, 3, 4), np.int16)])
    with pytest.raises(ValueError, match="pixel type"):
        image_io.write_nrrd_slabs(tmp_path / "b.nrrd", grid, sitk.sitkInt16, [np.zeros((5, 3, 4), np.uint8)])
    with pytest.raises(ValueError, match="first two sizes"):
        image_io.write_nrrd_slabs(tmp_path / "c.nrrd", grid, sitk.sitkInt16, [np.zeros((5, 4, 3), np.int16)])
    image_io.write_nrrd_slabs(tmp_path / "d.nrrd", grid, sitk.sitkInt16,
                              [np.full((3, 3, 4), 7, np.int16), np.arange(24, dtype=np.int16).reshape(2, 3, 4)])
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "d.nrrd")))
    assert np.array_equal(written[:3], np.full((3, 3, 4), 7)) and np.array_equal(written[3:].ravel(), np.arange(24))


def test_int16_inputs_give_the_float32_results_stage_by_stage(monkeypatch):
    """The stages read int16 inputs as given (no float32 copy of the whole image where they shrink it: block sums
    in slabs) and give what they give on float32 copies, bit for bit: the search's pose and scores, the crop's
    working grids, the QA's coarse copies and the foreground masks."""
    from MultimodalPrealignLib import crop, prealign
    from MultimodalPrealignLib.geometry.masks import foreground_mask
    from MultimodalPrealignLib.prealign import search

    pair = phantoms.make_pair(seed=4, labels=False, rotation_deg=12.0, translation_mm=10.0,
                              fixed_spacing=(3.0, 3.0, 3.0), moving_spacing=(3.0, 3.0, 4.0))
    images16 = [sitk.Cast(sitk.Round(image), sitk.sitkInt16) for image in (pair.fixed, pair.moving)]
    images32 = [sitk.Cast(image, sitk.sitkFloat32) for image in images16]
    slabs, block_means = [], resample._exact_block_means

    def recording_block_means(array, factors, index, out_size):
        slabs.append(factors)
        return block_means(array, factors, index, out_size)

    def stages(fixed, moving):
        found = search.prealign(prealign.PrealignInputs(fixed=fixed, moving=moving, seed=0, options={"budget_s": 3.0}))
        plan = crop.plan_crop(fixed, moving, found.transform)
        work = crop.apply_crop(fixed, moving, plan)
        coarse = [resample.coarse_copy(image, 9.0) for image in (fixed, moving)]
        masks = [foreground_mask(image) for image in (fixed, moving)]
        arrays = [sitk.GetArrayFromImage(image) for image in (*work, *coarse, *masks)]
        return transforms.to_matrix(found.transform), found.candidates, arrays

    expected = stages(*images32)
    monkeypatch.setattr(resample, "_exact_block_means", recording_block_means)
    monkeypatch.setattr(resample, "SLAB_VOXELS", 20_000)
    got = stages(*images16)
    assert slabs, "the int16 images were not shrunk by block sums"
    assert np.array_equal(got[0], expected[0]) and got[1] == expected[1]
    for a, b in zip(got[2], expected[2]):
        assert a.dtype == b.dtype and np.array_equal(a, b)
