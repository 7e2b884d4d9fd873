"""The tools a user would pick instead, run on the same cases. Every runner returns (4x4 fixed->moving LPS mm, info).

* ``elastix-default``: what SlicerElastix runs by default, rigid part: lassoan/SlicerElastix
  ``Elastix/Resources/RegistrationParameters/Parameters_Rigid.txt`` (Euler, AdvancedMattesMI 32 bins, 4
  levels, 250 iterations, 2048 random samples, ASGD, ``AutomaticTransformInitialization`` = geometric
  centres), copied in ``benchmarks/peers/SlicerElastix_Parameters_Rigid.txt``; itk-elastix, full-resolution
  inputs. With an ``initial`` transform (the "same pre-alignment" comparison) the automatic initialisation is
  switched off and the initial transform is given as elastix's external initial transform.
* ``brainsfit-real``: the real BRAINSFit executable as a Slicer user runs General Registration (BRAINS): Rigid,
  ``--initializeTransformMode useGeometryAlign`` (geometry-centre initialisation), everything else BRAINSFit's
  default (samplingPercentage 0.002, 1500 iterations, all threads), on the case files at full resolution. The
  executable: ``$MULTIMODAL_PREALIGN_BRAINSFIT``, ``BRAINSFit`` on PATH, a Slicer installation, else
  ``../shared/tools/brainsfit/bin/BRAINSFit`` (BRAINSTools 5.6.0). Its failures are the rows' notes (e.g. "All
  samples map outside moving image buffer"); a silent non-registration (exit 0, zero gradient) is scored as
  the transform it returned, flagged in the info.
* ``brainsfit-default``: BRAINSFit's defaults reproduced with SimpleITK (BRAINSia/BRAINSTools BRAINSFit.xml):
  geometry-centre initialisation (``initializeTransformMode useGeometryAlign``), VersorRigid3D, Mattes MI
  50 bins, samplingPercentage 0.002 (random), regular-step gradient descent max step 0.05, min step 0.001,
  relaxation 0.5, translationScale 1000, 1500 iterations, one resolution level, full-resolution inputs.
* ``forum-recipe``: the usual Slicer-forum advice for BRAINSFit on hard pairs: crop the fixed image to the
  moving image's region (Crop Volume, after a centre alignment) and run BRAINSFit with samplingPercentage 1
  and 15000 iterations. To stay tractable on 2 cores the cropped volumes are resampled to about 2 mm
  isotropic (Crop Volume's spacing scale); every voxel is then sampled.
* ``ants``: ANTsPy ``ants.registration(type_of_transform="Rigid")`` defaults (own venv, see benchmarks/README.md).
* ``greedy``: picsl-greedy, ``-a -dof 6 -ia-image-centers -m NMI -n 100x50x10`` (own venv).
* ``elastix-default-2mm`` / ``brainsfit-default-2mm``: the two defaults as the search study ran them
  (docs/search.md): on box-averaged ~2 mm copies of both images (full resolution would take 10x longer and
  does not change their capture range). The BRAINSFit one starts from SimpleITK's geometry-centre
  initialiser, stops at a gradient magnitude of 1e-5 and samples the share of the 2 mm copy that 0.002 gives
  at full resolution.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
ELASTIX_PRESET = HERE / "peers" / "SlicerElastix_Parameters_Rigid.txt"
PEERS = ("elastix-default", "brainsfit-default", "forum-recipe", "ants", "greedy", "elastix-default-2mm",
         "brainsfit-default-2mm", "brainsfit-real")
#: Peers that read the case files themselves (real executables): they get the paths, not the images.
FILE_PEERS = ("brainsfit-real",)
#: The real BRAINSFit beside the repository, used when no other is found (BRAINSTools 5.6.0, see its README).
SHARED_BRAINSFIT = HERE.parent.parent / "shared" / "tools" / "brainsfit" / "bin" / "BRAINSFit"


def _matrix(transform: sitk.Transform) -> np.ndarray:
    from MultimodalPrealignLib.geometry import transforms

    return transforms.to_matrix(transform)


def _affine(matrix: np.ndarray) -> sitk.Transform:
    from MultimodalPrealignLib.geometry import transforms

    return transforms.affine_from_matrix(np.asarray(matrix, float))


def geometry_center_initial(fixed: sitk.Image, moving: sitk.Image) -> np.ndarray:
    """Translation between the image box centres (what SlicerElastix / BRAINSFit's geometry init do)."""
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.VersorRigid3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.GEOMETRY)
    return _matrix(init)


# ------------------------------------------------------------------------------------------------ elastix
def run_elastix_default(fixed: sitk.Image, moving: sitk.Image, seed: int = 0, initial: np.ndarray | None = None):
    import itk

    from MultimodalPrealignLib.engines.elastix_engine import (
        elastix_map_to_sitk,
        itk_affine_transform,
        parse_parameter_text,
        to_itk_image,
        translate_elastix_log,
    )
    from MultimodalPrealignLib.geometry import transforms

    params = parse_parameter_text(ELASTIX_PRESET.read_text())
    params["RandomSeed"] = [str(121212 + seed)]
    params["WriteResultImage"] = ["false"]
    if initial is not None:
        params["AutomaticTransformInitialization"] = ["false"]
    parameter_object = itk.ParameterObject.New()
    parameter_object.AddParameterMap(params)
    method = itk.ElastixRegistrationMethod.New(to_itk_image(sitk.Cast(fixed, sitk.sitkFloat32)),
                                               to_itk_image(sitk.Cast(moving, sitk.sitkFloat32)))
    method.SetParameterObject(parameter_object)
    if initial is not None:
        method.SetExternalInitialTransform(itk_affine_transform(_affine(initial)))
    method.SetLogToConsole(False)
    with tempfile.TemporaryDirectory(prefix="bench_elastix_") as folder:
        method.SetOutputDirectory(folder)
        method.SetLogToFile(True)
        method.SetLogFileName("elastix.log")
        try:
            method.UpdateLargestPossibleRegion()
        except RuntimeError:
            log_path = Path(folder) / "elastix.log"
            log = log_path.read_text(errors="replace") if log_path.exists() else ""
            raise RuntimeError(translate_elastix_log(log)) from None
    result = method.GetTransformParameterObject()
    last_map = dict(result.GetParameterMap(result.GetNumberOfParameterMaps() - 1))
    stage = elastix_map_to_sitk({k: list(v) for k, v in last_map.items()})
    total = stage if initial is None else transforms.compose(_affine(initial), stage)
    return _matrix(total), {"initial": "given" if initial is not None else "automatic geometric centre"}


# ------------------------------------------------------------------------------------------------ BRAINSFit
def _brainsfit_rigid(fixed: sitk.Image, moving: sitk.Image, initial: np.ndarray, sampling: float, iterations: int,
                     seed: int) -> tuple[np.ndarray, dict]:
    """BRAINSFit's rigid phase in SimpleITK: VersorRigid3D on top of ``initial`` (fixed->moving 4x4)."""
    from MultimodalPrealignLib.geometry import image_space, transforms

    rigid = sitk.VersorRigid3DTransform()
    rigid.SetCenter(image_space.image_center(fixed).tolist())
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(50)
    method.SetMetricSamplingStrategy(method.RANDOM if sampling < 1.0 else method.NONE)
    if sampling < 1.0:
        method.SetMetricSamplingPercentage(sampling, seed + 1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=0.05, minStep=0.001, numberOfIterations=iterations,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-4)
    method.SetOptimizerScales([1.0, 1.0, 1.0, 1e-3, 1e-3, 1e-3])  # BRAINSFit translationScale 1000
    method.SetMovingInitialTransform(_affine(initial))
    method.SetInitialTransform(rigid, inPlace=True)
    counter = {"n": 0}
    method.AddCommand(sitk.sitkIterationEvent, lambda: counter.__setitem__("n", counter["n"] + 1))
    method.Execute(sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32))
    total = transforms.compose(rigid, _affine(initial))
    return _matrix(total), {"iterations": counter["n"], "stop": method.GetOptimizerStopConditionDescription()[:120]}


def run_brainsfit_default(fixed: sitk.Image, moving: sitk.Image, seed: int = 0, initial: np.ndarray | None = None):
    start = geometry_center_initial(fixed, moving) if initial is None else initial
    return _brainsfit_rigid(fixed, moving, start, 0.002, 1500, seed)


def _crop_volume(image: sitk.Image, box, spacing_mm: float) -> sitk.Image:
    from MultimodalPrealignLib.geometry.resample import resample_box

    background = float(np.percentile(sitk.GetArrayViewFromImage(image)[::4, ::4, ::4], 1))
    return resample_box(image, box, [spacing_mm] * 3, background)


def run_forum_recipe(fixed: sitk.Image, moving: sitk.Image, seed: int = 0, initial: np.ndarray | None = None,
                     spacing_mm: float = 2.0):
    from MultimodalPrealignLib.geometry import image_space

    start = geometry_center_initial(fixed, moving) if initial is None else initial
    # Crop the fixed image to where the (centre-aligned) moving image lies, 10 mm margin.
    corners = image_space.physical_corners(moving)
    inverse = np.linalg.inv(start)
    in_fixed = corners @ inverse[:3, :3].T + inverse[:3, 3]
    box = image_space.Box(tuple((in_fixed.min(0) - 10).tolist()), tuple((in_fixed.max(0) + 10).tolist()))
    fixed_box = image_space.bounding_box(fixed)
    lower = np.maximum(box.lower, fixed_box.lower)
    upper = np.minimum(box.upper, fixed_box.upper)
    if np.any(upper <= lower):
        raise RuntimeError("crop box outside the fixed image")
    fixed_crop = _crop_volume(fixed, image_space.Box(tuple(lower.tolist()), tuple(upper.tolist())), spacing_mm)
    moving_crop = _crop_volume(moving, image_space.bounding_box(moving), spacing_mm)
    matrix, info = _brainsfit_rigid(fixed_crop, moving_crop, start, 1.0, 15000, seed)
    info["cropped_fixed_size"] = list(fixed_crop.GetSize())
    return matrix, info


# ------------------------------------------------------------------------------------------------ on 2 mm copies
def shrink_to(image: sitk.Image, target_mm: float) -> sitk.Image:
    """Box-averaged float32 copy at about ``target_mm`` spacing (the search's integer shrink factors)."""
    from MultimodalPrealignLib.prealign import search

    factors = search.shrink_factors(image.GetSpacing(), target_mm)
    return sitk.Cast(sitk.BinShrink(image, factors) if max(factors) > 1 else image, sitk.sitkFloat32)


def run_elastix_default_2mm(fixed: sitk.Image, moving: sitk.Image, seed: int = 0, initial: np.ndarray | None = None):
    """SlicerElastix's default rigid registration on ~2 mm copies (automatic initialisation only)."""
    if initial is not None:
        raise ValueError("elastix-default-2mm takes no initial transform")
    return run_elastix_default(shrink_to(fixed, 2.0), shrink_to(moving, 2.0), seed)


def run_brainsfit_default_2mm(fixed: sitk.Image, moving: sitk.Image, seed: int = 0,
                              initial: np.ndarray | None = None):
    """BRAINSFit's defaults on ~2 mm copies, sampling what 0.002 gives at full resolution (search study)."""
    if initial is not None:
        raise ValueError("brainsfit-default-2mm takes no initial transform")
    fixed_small = shrink_to(fixed, 2.0)
    moving_small = shrink_to(moving, 2.0)
    full_voxels = float(np.prod(fixed.GetSize()))
    work_voxels = float(np.prod(fixed_small.GetSize()))
    sampling = float(min(1.0, 0.002 * full_voxels / work_voxels))
    start = sitk.CenteredTransformInitializer(fixed_small, moving_small, sitk.VersorRigid3DTransform(),
                                              sitk.CenteredTransformInitializerFilter.GEOMETRY)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(50)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling, seed + 1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=0.05, minStep=0.001, numberOfIterations=1500,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-5)
    method.SetOptimizerScales([1.0, 1.0, 1.0, 1e-3, 1e-3, 1e-3])  # BRAINSFit translationScale 1000
    method.SetInitialTransform(start, inPlace=True)
    method.Execute(fixed_small, moving_small)
    return _matrix(start), {"sampling_percentage_on_2mm_copy": round(sampling, 4)}


# ------------------------------------------------------------------------------------------------ the real BRAINSFit
def real_brainsfit():
    """The BRAINSFit executable (``engines.brainsfit_parameters.find_brainsfit``), else the one in ../shared."""
    from MultimodalPrealignLib.engines import brainsfit_parameters as bf
    from MultimodalPrealignLib.errors import InputError

    try:
        return bf.find_brainsfit(None)
    except InputError:
        if SHARED_BRAINSFIT.is_file():
            return bf.find_brainsfit(str(SHARED_BRAINSFIT))
        raise


def run_brainsfit_real(fixed_path: str, moving_path: str, seed: int = 0, initial: np.ndarray | None = None):
    """The real BRAINSFit with a Slicer user's settings (Rigid, geometry-centre initialisation, the rest default).

    ``initial`` (4x4 fixed->moving) replaces the initialisation (``--initialTransform``, mode Off). BRAINSFit has no
    seed option: ``seed`` is unused (its sampling repeats from run to run).
    """
    import subprocess

    from MultimodalPrealignLib.engines import brainsfit_parameters as bf
    from MultimodalPrealignLib.geometry import transforms

    executable = real_brainsfit()
    with tempfile.TemporaryDirectory(prefix="bench_brainsfit_") as folder:
        out = Path(folder) / "rigid.h5"
        args = [*executable.command, "--fixedVolume", str(fixed_path), "--movingVolume", str(moving_path),
                "--useRigid", "--linearTransform", str(out)]
        if initial is None:
            args += ["--initializeTransformMode", "useGeometryAlign"]
        else:
            transforms.write_transform(_affine(initial), Path(folder) / "initial.h5")
            args += ["--initializeTransformMode", "Off", "--initialTransform", str(Path(folder) / "initial.h5")]
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(bf.translate_failure(done.stderr, done.stdout, exit_code=done.returncode).one_line())
        transform = transforms.read_transform(out)
    stops = bf.stop_conditions(done.stdout)
    info = {"brainsfit": f"{executable.version} ({executable.found_by})",
            "stop": stops[-1]["stop_condition"][:120] if stops else None,
            "iterations": stops[-1]["iterations"] if stops else None,
            "zero_gradient": any("Gradient magnitude (0)" in s["stop_condition"] for s in stops)}
    return _matrix(transform), info


# ------------------------------------------------------------------------------------------------ ANTs, greedy
def ants_available() -> bool:
    try:
        import ants  # noqa: F401
    except ImportError:
        return False
    return True


def greedy_available() -> bool:
    try:
        import picsl_greedy  # noqa: F401
    except ImportError:
        return False
    return True


def run_ants(fixed_path: str, moving_path: str, seed: int = 0, initial: np.ndarray | None = None):
    """ANTsPy rigid registration with its defaults (Mattes MI, centre-of-mass initialisation)."""
    import ants

    fixed = ants.image_read(fixed_path)
    moving = ants.image_read(moving_path)
    result = ants.registration(fixed, moving, type_of_transform="Rigid", random_seed=seed + 1)
    transform = sitk.ReadTransform(result["fwdtransforms"][0])  # ANTs forward transform: fixed -> moving points
    return _matrix_plain(transform), {"transform_file": Path(result["fwdtransforms"][0]).name}


def _matrix_plain(transform: sitk.Transform) -> np.ndarray:
    """4x4 of a linear SimpleITK transform without importing MultimodalPrealignLib (other venvs)."""
    if transform.GetName() == "CompositeTransform":
        transform = sitk.CompositeTransform(transform).GetNthTransform(0)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(transform.GetMatrix())
    affine.SetTranslation(transform.GetTranslation())
    affine.SetCenter(transform.GetCenter())
    m = np.eye(4)
    a = np.asarray(affine.GetMatrix()).reshape(3, 3)
    c = np.asarray(affine.GetCenter())
    m[:3, :3] = a
    m[:3, 3] = np.asarray(affine.GetTranslation()) + c - a @ c
    return m


def run_greedy(fixed_path: str, moving_path: str, seed: int = 0, initial: np.ndarray | None = None):
    """greedy (picsl-greedy) rigid: image-centre initialisation, NMI, 3 levels. Its matrix is RAS -> LPS here."""
    from picsl_greedy import Greedy3D

    with tempfile.TemporaryDirectory(prefix="bench_greedy_") as folder:
        out = str(Path(folder) / "rigid.mat")
        g = Greedy3D()
        g.execute(f"-d 3 -a -dof 6 -ia-image-centers -m NMI -n 100x50x10 -i {fixed_path} {moving_path} -o {out} "
                  "-threads 2")
        ras = np.loadtxt(out)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ ras @ flip, {}


def peer_runner(name: str):
    return {"elastix-default": run_elastix_default, "brainsfit-default": run_brainsfit_default,
            "forum-recipe": run_forum_recipe, "ants": run_ants, "greedy": run_greedy,
            "elastix-default-2mm": run_elastix_default_2mm, "brainsfit-default-2mm": run_brainsfit_default_2mm,
            "brainsfit-real": run_brainsfit_real}[name]


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


__all__ = ["PEERS", "FILE_PEERS", "peer_runner", "run_brainsfit_real", "run_elastix_default", "run_brainsfit_default",
           "run_forum_recipe", "run_ants", "run_greedy", "run_elastix_default_2mm", "run_brainsfit_default_2mm",
           "shrink_to", "geometry_center_initial", "timed", "math"]
