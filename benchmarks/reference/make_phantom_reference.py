"""Establish the reference rigid transform of the MRI-DIR phantom pair (fixed CT -> moving T2 MR, LPS mm).

Run once (about 2-4 minutes on 2 cores):

    python benchmarks/reference/make_phantom_reference.py [--data ../shared/data/mridir-phantom]

How (independent of the code under test in search.py):

1. Initialisation from the principal axes of the two body masks (Otsu, ``masks.foreground_mask``): the
   4 proper sign combinations are scored with SimpleITK's Mattes MI (50 bins) at 4 mm; the best one
   (printed with the others, the margin shows the choice is unambiguous) starts the registration.
2. Multi-start dense rigid registration: 8 starts (the initialisation and 7 perturbations of 6 degrees
   and 6 mm), VersorRigid3D, Mattes MI 50 bins, regular-step gradient descent, levels 4 / 2 mm (on 2 mm
   copies, 20% sampling), then 1 mm (both images on 1 mm isotropic grids, 2% sampling). The MR is ITK's
   sampled ("fixed") image with its body mask dilated 5 mm, because its body lies inside the CT field of
   view (the CT body reaches past the MR slab ends). The 2 best distinct results plus 2 perturbations
   (2 degrees, 2 mm) of the best continue at 1 mm;
   the best final metric wins and the spread of the 1 mm runs over the CT body is printed as the
   reference's repeatability.
3. Output: ``phantom_ct_to_mr_reference.tfm`` (next to this script) and a checkerboard PNG of CT and
   resampled MR through the body centre (``docs/images/phantom_reference_checkerboard.png``), to be
   inspected by eye.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "MultimodalPrealign"))

from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.geometry.masks import foreground_mask, mask_centroid_and_axes
from MultimodalPrealignLib.geometry.resample import resample_to_spacing

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mridir-phantom"


def ct_body_mask(ct: sitk.Image, threshold_hu: float = -500.0) -> sitk.Image:
    """The CT object: > -500 HU on a 2 mm copy, largest connected component, holes filled.

    (Kept independent of ``masks.foreground_mask`` on purpose: the reference must not depend on the code
    it is used to test.)
    """
    from scipy import ndimage

    small = resample_to_spacing(ct, [2.0] * 3, default_value=-1024.0)
    array = sitk.GetArrayFromImage(small)
    labels, count = ndimage.label(array > threshold_hu)
    sizes = ndimage.sum(np.ones_like(labels), labels, index=np.arange(1, count + 1))
    body = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)
    mask = sitk.GetImageFromArray(body.astype(np.uint8))
    mask.CopyInformation(small)
    return mask


def rotation_about(axis, angle_deg: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.radians(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def versor_from_matrix(matrix: np.ndarray, center) -> sitk.VersorRigid3DTransform:
    euler = transforms.rigid_from_matrix(matrix, center)
    versor = sitk.VersorRigid3DTransform()
    versor.SetCenter(euler.GetCenter())
    versor.SetMatrix(euler.GetMatrix())
    versor.SetTranslation(euler.GetTranslation())
    return versor


def metric_value(fixed, moving, matrix, center, mask=None) -> float:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(50)
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)
    if mask is not None:
        method.SetMetricFixedMask(mask)
    method.SetInitialTransform(versor_from_matrix(matrix, center))
    return float(method.MetricEvaluate(fixed, moving))


def register(fixed, moving, mask, matrix, center, shrink, sigmas, sampling, seed, iterations=300,
             learning_rate=2.0) -> tuple[np.ndarray, float]:
    versor = versor_from_matrix(matrix, center)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(50)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling, seed)
    method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=learning_rate, minStep=1e-4,
                                                    numberOfIterations=iterations, relaxationFactor=0.6,
                                                    gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel(sigmas)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(versor, inPlace=True)
    method.Execute(fixed, moving)
    return transforms.to_matrix(versor), float(method.GetMetricValue())


def register_deterministic(fixed, moving, mask, matrix, center, sampling: float | None,
                           iterations: int = 300) -> tuple[np.ndarray, float]:
    """One level, no random sampling (all mask voxels, or a regular grid share): a noise-free metric, so the
    regular-step optimiser does not stop early on sampling noise."""
    versor = versor_from_matrix(matrix, center)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(50)
    if sampling is None:
        method.SetMetricSamplingStrategy(method.NONE)
    else:
        method.SetMetricSamplingStrategy(method.REGULAR)
        method.SetMetricSamplingPercentage(sampling, 1)
    method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=iterations,
                                                    relaxationFactor=0.7, gradientMagnitudeTolerance=1e-10)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(versor, inPlace=True)
    method.Execute(fixed, moving)
    return transforms.to_matrix(versor), float(method.GetMetricValue())


def elastix_refine(mr_work, ct_work, mask, start: np.ndarray) -> np.ndarray:
    """elastix (an independent implementation) from ``start`` (CT -> MR 4x4): Euler, AdvancedMattesMI 50 bins,
    ASGD, 2 levels, 600 iterations, 20000 random-coordinate samples per iteration; the MR is elastix's
    fixed image (masked). Returns CT -> MR 4x4."""
    import itk

    from MultimodalPrealignLib.engines.elastix_engine import elastix_map_to_sitk, itk_affine_transform, to_itk_image

    params = {
        "Registration": ["MultiResolutionRegistration"], "Metric": ["AdvancedMattesMutualInformation"],
        "Transform": ["EulerTransform"], "Optimizer": ["AdaptiveStochasticGradientDescent"],
        "NumberOfResolutions": ["2"], "MaximumNumberOfIterations": ["600"], "NumberOfSpatialSamples": ["20000"],
        "ImageSampler": ["RandomCoordinate"], "NewSamplesEveryIteration": ["true"], "NumberOfHistogramBins": ["50"],
        "AutomaticScalesEstimation": ["true"], "AutomaticTransformInitialization": ["false"],
        "HowToCombineTransforms": ["Compose"], "FixedImagePyramid": ["FixedSmoothingImagePyramid"],
        "MovingImagePyramid": ["MovingSmoothingImagePyramid"], "Interpolator": ["LinearInterpolator"],
        "ResampleInterpolator": ["FinalLinearInterpolator"], "Resampler": ["DefaultResampler"],
        "WriteResultImage": ["false"], "FixedInternalImagePixelType": ["float"],
        "MovingInternalImagePixelType": ["float"], "RandomSeed": ["121212"], "ErodeMask": ["false"]}
    parameter_object = itk.ParameterObject.New()
    parameter_object.AddParameterMap(params)
    method = itk.ElastixRegistrationMethod.New(to_itk_image(mr_work), to_itk_image(ct_work))
    method.SetParameterObject(parameter_object)
    method.SetLogToConsole(False)
    method.SetFixedMask(to_itk_image(mask, np.uint8))
    initial = transforms.affine_from_matrix(np.linalg.inv(start))  # MR -> CT
    method.SetExternalInitialTransform(itk_affine_transform(initial))
    method.UpdateLargestPossibleRegion()
    result = method.GetTransformParameterObject()
    stage = elastix_map_to_sitk({k: list(v) for k, v in
                                 dict(result.GetParameterMap(result.GetNumberOfParameterMaps() - 1)).items()})
    return np.linalg.inv(transforms.to_matrix(transforms.compose(initial, stage)))


def ct_elastix_input(ct: sitk.Image) -> sitk.Image:
    """elastix_refine's moving image: the CT at 1.5 mm, -1024 HU outside."""
    return resample_to_spacing(sitk.Cast(ct, sitk.sitkFloat32), [1.5] * 3, default_value=-1024.0)


def mr_elastix_inputs(mr: sitk.Image, mr_mask: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """elastix_refine's fixed image and mask: the MR at 1.5 mm and its object mask dilated by 3 voxels."""
    mr15 = resample_to_spacing(sitk.Cast(mr, sitk.sitkFloat32), [1.5] * 3, default_value=0.0)
    mask15 = sitk.BinaryDilate(sitk.Resample(mr_mask, mr15, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                             sitk.sitkUInt8), [3, 3, 3])
    return mr15, mask15


def mean_distance(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> float:
    pa = points @ a[:3, :3].T + a[:3, 3]
    pb = points @ b[:3, :3].T + b[:3, 3]
    return float(np.mean(np.linalg.norm(pa - pb, axis=1)))


def body_points(mask: sitk.Image, n: int = 4000, seed: int = 0) -> np.ndarray:
    idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1]
    rng = np.random.default_rng(seed)
    idx = idx[rng.choice(idx.shape[0], min(n, idx.shape[0]), replace=False)]
    a = np.asarray(mask.GetDirection()).reshape(3, 3) @ np.diag(mask.GetSpacing())
    return idx @ a.T + np.asarray(mask.GetOrigin())


def checkerboard_png(ct: sitk.Image, mr: sitk.Image, matrix: np.ndarray, center_mm, path: Path,
                     square_mm: float = 20.0, spacing_mm: float = 0.5) -> None:
    """Three orthogonal planes (axial, coronal, sagittal) through ``center_mm``: CT / MR checkerboard."""
    from PIL import Image

    half = 110.0
    panels = []
    for plane in ("axial", "coronal", "sagittal"):
        n = int(2 * half / spacing_mm)
        u, v = np.meshgrid((np.arange(n) + 0.5) * spacing_mm - half, (np.arange(n) + 0.5) * spacing_mm - half)
        pts = np.zeros((n, n, 3)) + np.asarray(center_mm)
        if plane == "axial":  # x right-left, y anterior-posterior
            pts[..., 0] += u
            pts[..., 1] += v
        elif plane == "coronal":  # x, z (superior up)
            pts[..., 0] += u
            pts[..., 2] -= v
        else:  # y, z
            pts[..., 1] += u
            pts[..., 2] -= v
        ct_vals = sample(ct, pts.reshape(-1, 3)).reshape(n, n)
        mr_pts = pts.reshape(-1, 3) @ matrix[:3, :3].T + matrix[:3, 3]
        mr_vals = sample(mr, mr_pts).reshape(n, n)
        ct_disp = np.clip((ct_vals + 300.0) / 600.0, 0, 1)
        lo, hi = np.percentile(mr_vals[mr_vals > 0], [1, 99.5]) if np.any(mr_vals > 0) else (0, 1)
        mr_disp = np.clip((mr_vals - lo) / max(hi - lo, 1e-6), 0, 1)
        squares = ((np.floor((u + half) / square_mm) + np.floor((v + half) / square_mm)) % 2).astype(bool)
        panel = np.where(squares, ct_disp, mr_disp)
        panels.append((panel * 255).astype(np.uint8))
    gap = np.full((panels[0].shape[0], 6), 255, np.uint8)
    row = np.hstack([panels[0], gap, panels[1], gap, panels[2]])
    Image.fromarray(row).save(path)


def sample(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    array = sitk.GetArrayViewFromImage(image)
    a = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    idx = (points - np.asarray(image.GetOrigin())) @ np.linalg.inv(a).T
    return ndimage.map_coordinates(array.astype(np.float32), idx[:, ::-1].T, order=1, mode="constant",
                                   cval=float(array.min()))


def finish(best, c_ct, ct, mr, points, args, started, init) -> None:
    reference = transforms.rigid_from_matrix(best, center=c_ct)
    transforms.write_transform(reference, args.out)
    summary = transforms.summarize(reference)
    extra = {} if init is None else {"init_to_reference_mm": round(mean_distance(init, best, points), 2)}
    print(json.dumps({"reference": summary, **extra}, indent=1))
    args.png.parent.mkdir(parents=True, exist_ok=True)
    checkerboard_png(ct, mr, best, c_ct, args.png)
    print(f"wrote {args.out} and {args.png} in {time.perf_counter() - started:.0f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=HERE / "phantom_ct_to_mr_reference.tfm")
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "images" / "phantom_reference_checkerboard.png")
    parser.add_argument("--starts", type=int, default=8)
    parser.add_argument("--elastix-from", type=Path, nargs="+", default=None,
                        help="final step: refine these transform files (CT -> MR) with elastix; they must agree")
    parser.add_argument("--polish-only", type=Path, nargs="+", default=None,
                        help="skip the multi-start; polish these transform files (fixed CT -> moving MR)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    ct = sitk.ReadImage(str(args.data / "ct.nrrd"), sitk.sitkFloat32)
    mr = sitk.ReadImage(str(args.data / "mr_t2.nrrd"), sitk.sitkFloat32)
    ct_mask = ct_body_mask(ct)
    mr_mask = foreground_mask(mr)
    c_ct, axes_ct, var_ct, vol_ct = mask_centroid_and_axes(ct_mask)
    c_mr, axes_mr, var_mr, vol_mr = mask_centroid_and_axes(mr_mask)
    print(f"body volumes: CT {vol_ct / 1000:.0f} ml, MR {vol_mr / 1000:.0f} ml; principal std CT "
          f"{np.sqrt(var_ct).round(1)} MR {np.sqrt(var_mr).round(1)} mm")

    # ITK samples its FIXED image. The MR is used as ITK's fixed image (the CT as ITK's moving one) because
    # the MR body lies inside the CT field of view while the CT body reaches beyond the MR's slab ends:
    # sampling the CT would let samples drop out of the MR and reward sliding. Transforms are inverted
    # back to the project's convention (fixed CT -> moving MR) for everything printed and written.
    ct4 = resample_to_spacing(ct, [4.0] * 3, default_value=-1024.0)
    mr4 = resample_to_spacing(mr, [4.0] * 3, default_value=0.0)
    mr_mask4 = sitk.Resample(mr_mask, mr4, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    inits = []
    for signs in np.ndindex(2, 2, 2):
        s = np.diag([1.0 if v == 0 else -1.0 for v in signs])
        r = axes_mr @ s @ axes_ct.T
        if np.linalg.det(r) < 0:
            continue
        m = np.eye(4)
        m[:3, :3] = r
        m[:3, 3] = c_mr - r @ c_ct
        value = metric_value(mr4, ct4, np.linalg.inv(m), c_mr, mr_mask4)
        inits.append((value, m))
        print(f"principal-axes init signs {np.diag(s)}: rotation {transforms.rotation_angle_deg(m):6.1f} deg, "
              f"Mattes MI {value:.4f}")
    inits.sort(key=lambda x: x[0])
    init = inits[0][1]

    ct1 = resample_to_spacing(ct, [1.0] * 3, default_value=-1024.0)
    # the MR on a 1 mm isotropic grid too: ITK's pyramid shrinks both images by the same factors, which
    # would turn the MR's 2.5 mm slices into 10 mm ones at the 4 mm level
    mr1 = resample_to_spacing(mr, [1.0] * 3, default_value=0.0)
    mask1 = sitk.Resample(mr_mask, mr1, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    mask1 = sitk.BinaryDilate(mask1, [5, 5, 5])
    ct2 = resample_to_spacing(ct1, [2.0] * 3, default_value=-1024.0)
    mr2 = resample_to_spacing(mr1, [2.0] * 3, default_value=0.0)
    mask2 = sitk.Resample(mask1, mr2, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    points = body_points(ct_mask)

    def run(m, level, sampling, seed, iterations=300, learning_rate=2.0):
        fixed, moving, mask, shrink, sigmas = ((mr2, ct2, mask2, [2, 1], [2.0, 0.0]) if level == "coarse"
                                               else (mr1, ct1, mask1, [1], [0.0]))
        result, value = register(fixed, moving, mask, np.linalg.inv(m), c_mr, shrink, sigmas, sampling, seed,
                                 iterations, learning_rate)
        return np.linalg.inv(result), value

    def polish(m):
        """Deterministic 2 mm (all mask voxels) then 1 mm (regular 10% grid) refinement; MR sampled."""
        result, _ = register_deterministic(mr2, ct2, mask2, np.linalg.inv(m), c_mr, None)
        result, value = register_deterministic(mr1, ct1, mask1, result, c_mr, 0.1)
        return np.linalg.inv(result), value

    if args.elastix_from:
        ct15 = ct_elastix_input(ct)
        mr15, mask15 = mr_elastix_inputs(mr, mr_mask)
        results = []
        for path in args.elastix_from:
            start = transforms.to_matrix(transforms.read_transform(path))
            result = elastix_refine(mr15, ct15, mask15, start)
            results.append(result)
            print(f"elastix from {path.name}: moved {mean_distance(result, start, points):.2f} mm")
        spread = [round(mean_distance(r, results[0], points), 3) for r in results]
        print("mean distance over the CT object between the elastix results (mm):", spread)
        finish(results[0], c_ct, ct, mr, points, args, started, init=None)
        return 0

    if args.polish_only:
        polished = []
        for path in args.polish_only:
            start = transforms.to_matrix(transforms.read_transform(path))
            result, value = polish(start)
            polished.append((value, result))
            print(f"polish from {path.name}: metric {value:.4f}, moved {mean_distance(result, start, points):.2f} mm")
        polished.sort(key=lambda x: x[0])
        best = polished[0][1]
        print("mean distance over the CT object of the polished results to the best (mm):",
              [round(mean_distance(m, best, points), 2) for _, m in polished])
        finish(best, c_ct, ct, mr, points, args, started, init=None)
        return 0

    rng = np.random.default_rng(2024)

    def perturb(m, degrees, mm):
        p = np.eye(4)
        p[:3, :3] = rotation_about(rng.normal(size=3), degrees)
        p[:3, 3] = c_ct + rng.normal(size=3) / np.sqrt(3) * mm - p[:3, :3] @ c_ct
        return m @ p

    starts = [init] + [perturb(init, 6.0, 6.0) for _ in range(args.starts - 1)]
    coarse = []
    for i, m in enumerate(starts):
        result, value = run(m, "coarse", 0.2, seed=i + 1)
        coarse.append((value, result))
        print(f"start {i}: 4/2 mm metric {value:.4f}, distance to start {mean_distance(result, m, points):.2f} mm")
    coarse.sort(key=lambda x: x[0])
    chosen = []
    for value, m in coarse:
        if all(mean_distance(m, other, points) > 0.5 for _, other in chosen):
            chosen.append((value, m))
        if len(chosen) >= 3:
            break
    fine_starts = [m for _, m in chosen[:2]] + [perturb(coarse[0][1], 2.0, 2.0) for _ in range(2)]
    fine = []
    for i, m in enumerate(fine_starts):
        result, value = run(m, "fine", 0.02, seed=100 + i, iterations=150, learning_rate=0.5)
        fine.append((value, result))
        print(f"fine run {i}: 1 mm metric {value:.4f}")
    fine.sort(key=lambda x: x[0])
    best = fine[0][1]
    spread_coarse = [mean_distance(m, best, points) for _, m in coarse]
    spread_fine = [mean_distance(m, best, points) for _, m in fine]
    print("mean distance over the CT body of the 4/2 mm results to the reference (mm):",
          np.round(spread_coarse, 2).tolist())
    print("mean distance over the CT body of the 1 mm results to the reference (mm):",
          np.round(spread_fine, 2).tolist())
    polished = []
    for _, m in fine[:3]:
        result, value = polish(m)
        polished.append((value, result))
        print(f"deterministic polish: metric {value:.4f}, moved {mean_distance(result, m, points):.2f} mm")
    polished.sort(key=lambda x: x[0])
    best = polished[0][1]
    print("mean distance over the CT object of the polished results to the best (mm):",
          [round(mean_distance(m, best, points), 2) for _, m in polished])
    finish(best, c_ct, ct, mr, points, args, started, init)
    return 0


if __name__ == "__main__":
    sys.exit(main())
