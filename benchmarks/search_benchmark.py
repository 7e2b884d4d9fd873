"""Benchmark of ``--prealign search``: large misalignment, flips and partial fields of view.

Two studies, each with the same random cases for every method:

* ``phantom``: the real MRI-DIR phantom pair (CT fixed, T2 MR moving). The MR header is rewritten by a
  random rigid perturbation P (rotation 0-30 degrees about a random axis through the MR body centre,
  translation 0-100 mm, in a third of the cases an extra 180 degree flip about L, P or S; pixel data
  untouched: new origin = P(origin), new direction = R_P @ direction), and in half of the cases the MR
  is cropped to 35-70% of its slices (geometry kept). The true fixed->moving transform is then exactly
  ``P o reference`` with the reference from ``benchmarks/reference/phantom_ct_to_mr_reference.tfm``.
* ``synthetic``: ``phantoms.make_pair`` CT-like torso (fixed, 2 mm) and an MR-like slab (moving) covering
  20-40% of the torso length, rotation 0-30 degrees, translation 0-250 mm, a third flipped head/feet.

Error of a result: mean distance (mm) between where the true and the estimated transforms send points
inside the object and inside both fields of view (phantom: CT object mask points that the possibly cropped
MR shows; synthetic: torso points inside both images), as in benchmarks/run.py. Success: error <= 2.5 mm.
Phantom rows also record the error over the whole CT object (``info.error_whole_object_mm``).

Methods: ``search`` (search.prealign alone), ``pipeline`` (``run_pipeline`` with default options, i.e.
what ``multimodal-prealign register`` does), ``elastix-default`` (SlicerElastix's default rigid preset
with its automatic geometric-centre initialisation, itk-elastix), ``brainsfit-default`` (BRAINSFit's
defaults reproduced with SimpleITK: useGeometryAlign, Mattes MI 50 bins, sampling 0.002, VersorRigid3D,
regular-step gradient descent max step 0.05, min step 0.001, relaxation 0.5, translation scale 1000,
1500 iterations, one level). The two peers run on box-averaged ~2 mm copies (full resolution would take
10x longer and does not change their capture range); their sample count equals what 0.002 / 2048 would
give at full resolution / in elastix.

    python benchmarks/search_benchmark.py --quick            # 6 cases per study
    python benchmarks/search_benchmark.py --cases 60 --study phantom --methods search,pipeline
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MultimodalPrealign"))

from MultimodalPrealignLib import prealign
from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.geometry.masks import foreground_mask, mask_centroid_and_axes
from MultimodalPrealignLib.prealign import search
from MultimodalPrealignLib.synthetic import phantoms

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (the peer runners shared with benchmarks/run.py)
from cases import _unit as random_unit  # noqa: E402  (shared with benchmarks/run.py's case generator)
from cases import with_header_moved

DATA = REPO.parent / "shared" / "data" / "mridir-phantom"
REFERENCE = REPO / "benchmarks" / "reference" / "phantom_ct_to_mr_reference.tfm"
RESULTS = REPO / "benchmarks" / "results"
SUCCESS_MM = 2.5
METHODS = ("search", "pipeline", "elastix-default", "brainsfit-default")


# ------------------------------------------------------------------------------------------ geometry
def rotation_about(axis, angle_deg: float) -> np.ndarray:
    return search.rotation_vector_matrix(np.asarray(axis, float) / np.linalg.norm(axis) * math.radians(angle_deg))


def mean_error(estimate: np.ndarray, truth: np.ndarray, points: np.ndarray) -> float:
    a = points @ estimate[:3, :3].T + estimate[:3, 3]
    b = points @ truth[:3, :3].T + truth[:3, 3]
    return float(np.mean(np.linalg.norm(a - b, axis=1)))


def shrink_to(image: sitk.Image, target_mm: float) -> sitk.Image:
    factors = search.shrink_factors(image.GetSpacing(), target_mm)
    return sitk.Cast(sitk.BinShrink(image, factors) if max(factors) > 1 else image, sitk.sitkFloat32)


# ------------------------------------------------------------------------------------------ cases
def object_mask(ct: sitk.Image) -> sitk.Image:
    """The phantom object in the CT (> -500 HU, largest component, holes filled), as for the reference."""
    sys.path.insert(0, str(REFERENCE.parent))
    from make_phantom_reference import ct_body_mask

    return ct_body_mask(ct)


def phantom_cases(n: int, seed: int, skip: int = 0):
    """Yield (case dict, fixed, moving, true 4x4, object points, fixed 2 mm copy)."""
    ct = sitk.ReadImage(str(DATA / "ct.nrrd"))
    mr = sitk.ReadImage(str(DATA / "mr_t2.nrrd"))
    reference = transforms.to_matrix(transforms.read_transform(REFERENCE))
    points = phantoms.body_points(object_mask(ct), n=3000, seed=seed)
    mr_centroid = mask_centroid_and_axes(foreground_mask(mr))[0]
    ct_small = shrink_to(ct, 2.0)
    rng = np.random.default_rng(seed)
    flips = {"L": np.diag([1.0, -1.0, -1.0]), "P": np.diag([-1.0, 1.0, -1.0]), "S": np.diag([-1.0, -1.0, 1.0])}
    for i in range(n):
        angle = float(rng.uniform(0, 30))
        r = rotation_about(random_unit(rng), angle)
        flip = None
        if rng.uniform() < 1 / 3:
            flip = str(rng.choice(list(flips)))
            r = r @ flips[flip]
        shift = random_unit(rng) * float(rng.uniform(0, 100))
        p = np.eye(4)
        p[:3, :3] = r
        p[:3, 3] = mr_centroid + shift - r @ mr_centroid
        crop = None
        if rng.uniform() < 0.5:
            fraction = float(rng.uniform(0.35, 0.70))
            n_slices = mr.GetSize()[2]
            keep = max(2, int(round(fraction * n_slices)))
            start = int(rng.integers(0, n_slices - keep + 1))
            crop = {"fraction": round(keep / n_slices, 3), "first_slice": start, "slices": keep}
        if i < skip:  # same random draws, no images: cases keep their numbers and content
            continue
        moving = with_header_moved(mr, p)
        if crop is not None:
            moving = moving[:, :, crop["first_slice"]:crop["first_slice"] + crop["slices"]]
        truth = p @ reference
        shown = overlap_points(points, moving, truth)
        case = {"case": i, "rotation_deg": round(angle, 2), "flip_about": flip,
                "translation_mm": round(float(np.linalg.norm(shift)), 1), "crop": crop,
                "perturbation_4x4": np.round(p, 8).tolist(), "whole_object_points": points}
        yield case, ct, moving, truth, shown, ct_small


def overlap_points(points: np.ndarray, moving: sitk.Image, truth: np.ndarray) -> np.ndarray:
    """The object points that the (possibly cropped) moving image shows under the true transform.

    Errors are scored there, as in benchmarks/cases.py: outside the moving field of view the images say
    nothing about the alignment, and a rigid fit to a slab is an extrapolation there.
    """
    from MultimodalPrealignLib.geometry.image_space import inside_image

    return points[inside_image(moving, points @ truth[:3, :3].T + truth[:3, 3])]


def synthetic_cases(n: int, seed: int, skip: int = 0):
    rng = np.random.default_rng(seed + 1000)
    for i in range(n):
        fraction = float(rng.uniform(0.2, 0.4))
        angle = float(rng.uniform(0, 30))
        shift = float(rng.uniform(0, 250))
        flip = i % 3 == 0
        if i < skip:
            continue
        pair = phantoms.make_pair(seed=seed + 7919 * i, moving_fov="slab", slab_fraction=fraction,
                                  rotation_deg=angle, translation_mm=shift, flip=flip, labels=False,
                                  fixed_spacing=(2.0, 2.0, 2.0), moving_spacing=(1.5, 1.5, 4.0))
        points = phantoms.body_points(pair, n=2000, seed=i, overlap_only=True)
        truth = transforms.to_matrix(pair.fixed_to_moving)
        case = {"case": i, "rotation_deg": round(angle, 2), "flip_about": "P" if flip else None,
                "translation_mm": round(shift, 1), "slab_fraction": round(fraction, 3)}
        yield case, pair.fixed, pair.moving, truth, points, shrink_to(pair.fixed, 2.0)


# ------------------------------------------------------------------------------------------ methods
def run_search(fixed, moving, fixed_small, seed):
    result = search.prealign(prealign.PrealignInputs(fixed=fixed, moving=moving, seed=seed))
    info = {"timings_s": result.details["timings_s"], "chosen": result.details["chosen"]["source"],
            "score": result.details["chosen"]["score"], "warnings": result.warnings}
    return transforms.to_matrix(result.transform), info


def run_pipeline(fixed, moving, fixed_small, seed, options: dict | None = None):
    """``run_pipeline`` with default options, or with ``options`` (PipelineOptions fields) changed."""
    from MultimodalPrealignLib import pipeline

    result = pipeline.run_pipeline(fixed, moving, pipeline.PipelineOptions.create(seed=seed, **(options or {})))
    timings = result.report.get("timings_s", {})
    guard = (result.report.get("registration") or {}).get("guard")
    return transforms.to_matrix(result.transform), {"timings_s": timings, "prealign": result.prealign.method,
                                                    "options_changed": options or {},
                                                    "registration_guard": guard,
                                                    "prealigned_4x4": np.round(transforms.to_matrix(
                                                        result.prealign.transform), 8).tolist()}


def run_elastix_default(fixed, moving, fixed_small, seed):
    """SlicerElastix's default rigid registration (benchmarks/peers.py) on the ~2 mm copies."""
    return peers.run_elastix_default(fixed_small, shrink_to(moving, 2.0), seed)


def run_brainsfit_default(fixed, moving, fixed_small, seed):
    moving_small = shrink_to(moving, 2.0)
    full_voxels = float(np.prod(fixed.GetSize()))
    work_voxels = float(np.prod(fixed_small.GetSize()))
    sampling = float(min(1.0, 0.002 * full_voxels / work_voxels))
    initial = sitk.CenteredTransformInitializer(fixed_small, moving_small, sitk.VersorRigid3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.GEOMETRY)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(50)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling, seed + 1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=0.05, minStep=0.001, numberOfIterations=1500,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-5)
    method.SetOptimizerScales([1.0, 1.0, 1.0, 1e-3, 1e-3, 1e-3])
    method.SetInitialTransform(initial, inPlace=True)
    method.Execute(fixed_small, moving_small)
    return transforms.to_matrix(initial), {"sampling_percentage_on_2mm_copy": round(sampling, 4)}


RUNNERS = {"search": run_search, "pipeline": run_pipeline, "elastix-default": run_elastix_default,
           "brainsfit-default": run_brainsfit_default}


# ------------------------------------------------------------------------------------------ driver
def run_study(study: str, n: int, methods: list[str], seed: int, log, limits: dict | None = None,
              skip: int = 0, pipeline_options: dict | None = None) -> list[dict]:
    """All methods on the same ``n`` cases; ``limits`` {method: k} runs a method on the first k cases only;
    ``skip`` leaves out the first cases (to continue an earlier run); ``pipeline_options`` changes
    PipelineOptions fields of the ``pipeline`` method."""
    limits = limits or {}
    runners = {**RUNNERS, "pipeline": functools.partial(run_pipeline, options=pipeline_options)}
    cases = phantom_cases(n, seed, skip) if study == "phantom" else synthetic_cases(n, seed, skip)
    rows = []
    for case, fixed, moving, truth, points, fixed_small in cases:
        whole = case.pop("whole_object_points", None)
        for name in methods:
            if case["case"] >= limits.get(name, n):
                continue
            started = time.perf_counter()
            cpu_started = time.process_time()
            estimate = None
            try:
                estimate, info = runners[name](fixed, moving, fixed_small, seed)
                error = mean_error(estimate, truth, points)
                if whole is not None:
                    info = {**info, "error_whole_object_mm": round(mean_error(estimate, truth, whole), 3)}
                failure = None
            except Exception as err:  # a peer that throws (e.g. elastix losing the overlap) failed the case
                error, info, failure = float("inf"), {}, str(err).strip().splitlines()[-1][:160] if str(err) else repr(err)
            seconds = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
            row = {"study": study, "method": name, **case, "error_mm": round(error, 3) if math.isfinite(error) else None,
                   "success": bool(error <= SUCCESS_MM), "seconds": round(seconds, 2), "cpu_s": round(cpu, 2),
                   "failure": failure, "info": info,
                   "estimate_4x4": None if estimate is None else np.round(estimate, 8).tolist()}
            rows.append(row)
            log(f"{study} case {case['case']:3d} {name:18s} error {error:9.2f} mm  {seconds:6.1f} s (cpu {cpu:6.1f} s)"
                + (f"  FAILED: {failure}" if failure else ""))
    return rows


def rescore_phantom(rows: list[dict], seed: int) -> None:
    """Recompute phantom errors with the current reference (truth = perturbation o reference)."""
    reference = transforms.to_matrix(transforms.read_transform(REFERENCE))
    ct = sitk.ReadImage(str(DATA / "ct.nrrd"))
    mr = sitk.ReadImage(str(DATA / "mr_t2.nrrd"))
    points = phantoms.body_points(object_mask(ct), n=3000, seed=seed)
    for row in rows:
        if row["study"] != "phantom" or row.get("estimate_4x4") is None:
            continue
        p = np.asarray(row["perturbation_4x4"])
        truth = p @ reference
        moving = with_header_moved(mr, p)
        if row.get("crop"):
            moving = moving[:, :, row["crop"]["first_slice"]:row["crop"]["first_slice"] + row["crop"]["slices"]]
        error = mean_error(np.asarray(row["estimate_4x4"]), truth, overlap_points(points, moving, truth))
        row["error_mm"], row["success"] = round(error, 3), bool(error <= SUCCESS_MM)


def table(rows: list[dict], methods: list[str], title: str) -> str:
    lines = [f"**{title}**", "",
             "| method | cases | success (<= 2.5 mm) | median error (mm) | 95th pct error (mm) | median wall time (s) "
             "| median CPU time (s) |",
             "|---|---|---|---|---|---|---|"]
    for name in methods:
        sel = [r for r in rows if r["method"] == name]
        if not sel:
            continue
        errors = np.array([r["error_mm"] if r["error_mm"] is not None else np.inf for r in sel])
        ok = sum(r["success"] for r in sel)
        with np.errstate(invalid="ignore"):
            p95 = float(np.percentile(errors, 95, method="higher"))
        times = [r["seconds"] for r in sel]
        cpu = [r["cpu_s"] for r in sel]
        lines.append(f"| {name} | {len(sel)} | {ok}/{len(sel)} ({100.0 * ok / len(sel):.0f}%) | "
                     f"{_fmt(float(np.median(errors)))} | {_fmt(p95)} | {np.median(times):.1f} | {np.median(cpu):.1f} |")
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "inf"


def subgroup_table(rows: list[dict], method: str) -> str:
    groups = {
        "no flip, full FOV": lambda r: not r["flip_about"] and not r.get("crop"),
        "flip, full FOV": lambda r: r["flip_about"] and not r.get("crop"),
        "no flip, cropped": lambda r: not r["flip_about"] and r.get("crop"),
        "flip, cropped": lambda r: r["flip_about"] and r.get("crop"),
    }
    lines = [f"**{method} by subgroup (phantom)**", "",
             "| subgroup | cases | success | median error (mm) | median error over the whole CT object (mm) |",
             "|---|---|---|---|---|"]
    for label, keep in groups.items():
        sel = [r for r in rows if r["method"] == method and keep(r)]
        if sel:
            errors = np.array([r["error_mm"] if r["error_mm"] is not None else np.inf for r in sel])
            ok = sum(r["success"] for r in sel)
            whole = [r["info"].get("error_whole_object_mm", np.inf) for r in sel if r.get("info") is not None]
            lines.append(f"| {label} | {len(sel)} | {ok}/{len(sel)} | {_fmt(np.median(errors))} | "
                         f"{_fmt(float(np.median(whole))) if whole else '-'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 cases per study")
    parser.add_argument("--cases", type=int, default=60, help="cases per study (default 60)")
    parser.add_argument("--study", choices=("phantom", "synthetic", "both"), default="both")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma separated: " + ", ".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", type=int, default=0, help="leave out the first cases (continue an earlier run)")
    parser.add_argument("--limit", default="", help="run some methods on the first k cases only, e.g. "
                        "pipeline=10,brainsfit-default=20 (same cases as the others)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for all rows (default benchmarks/results/...)")
    parser.add_argument("--pipeline-options", type=json.loads, default=None, metavar="JSON",
                        help='PipelineOptions fields for the pipeline method, e.g. \'{"max_working_voxels": 3000000}\'')
    parser.add_argument("--rescore", type=Path, nargs="+", default=None,
                        help="only print the tables of earlier JSON rows (phantom errors recomputed with the current reference)")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in RUNNERS:
            parser.error(f"unknown method {m}; use {', '.join(METHODS)}")
    if args.rescore:
        rows = [r for path in args.rescore for r in json.loads(path.read_text())]
        rescore_phantom(rows, args.seed)
        print_tables(rows, sorted({r["study"] for r in rows}, reverse=True), [m for m in METHODS if m in methods])
        return 0
    n = 6 if args.quick else args.cases
    studies = ["phantom", "synthetic"] if args.study == "both" else [args.study]
    if "phantom" in studies and not (DATA / "ct.nrrd").exists():
        print(f"phantom data not found in {DATA}; skipping the phantom study", file=sys.stderr)
        studies.remove("phantom")

    def log(message):
        print(message, file=sys.stderr, flush=True)

    limits = {}
    for item in filter(None, (x.strip() for x in args.limit.split(","))):
        name, _, value = item.partition("=")
        if name not in RUNNERS or not value.isdigit():
            parser.error(f"bad --limit item '{item}'; use method=count")
        limits[name] = int(value)
    all_rows = []
    for study in studies:
        all_rows += run_study(study, n, methods, args.seed, log, limits, args.skip, args.pipeline_options)
    out = args.out or RESULTS / f"search_benchmark_{'_'.join(studies)}_{n}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(all_rows, indent=1))
    print_tables(all_rows, studies, methods)
    print(f"rows: {out}")
    return 0


def print_tables(all_rows: list[dict], studies: list[str], methods: list[str]) -> None:
    for study in studies:
        rows = [r for r in all_rows if r["study"] == study]
        title = ("Phantom pair, random header perturbations (CT fixed, MR moving)" if study == "phantom"
                 else "Synthetic partial field of view (CT-like torso, MR-like slab 20-40%)")
        print(table(rows, methods, title))
        print()
        if study == "phantom":
            for method in methods:
                print(subgroup_table(rows, method))
                print()


if __name__ == "__main__":
    sys.exit(main())
