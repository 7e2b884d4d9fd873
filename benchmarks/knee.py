"""The knee family: per-structure registration (``--per-structure``) against one global transform, scored PER BONE.

    python benchmarks/knee.py --cases 20                      # the per-bone table (docs/benchmarks.md)
    python benchmarks/knee.py --cases 2 --fixed-size 160      # a quick look on a coarse microCT (0.35 mm)
    python benchmarks/knee.py --target                         # time and peak RSS with a 600^3 microCT
    python benchmarks/run.py --family knee --cases 2           # the harness's one-transform table (femur's truth)

Cases (``synthetic.knee.make_knee_pair``, seeded by the case index): fixed microCT-like at 0.1 mm, 500^3 voxels (a
50 mm field of view of the joint; ``--fixed-size``), int16; moving MR-like, sagittal, 0.4-0.5 mm in-plane, 2-3 mm
slices, 150-200 mm along the leg; knee flexion 0-15 degrees in the microCT and 5-30 degrees more in the MR (the
patella slides with it); the MR header placed by a random rigid transform (up to 30 degrees, 50 mm) and in about a
quarter of the cases turned head-first/feet-first. Truth: one exact fixed->moving transform (LPS mm) per bone;
error of a bone: mean distance between where the estimated and the true transform send that bone's points (inside
both images); target 0.5 mm.

Methods (each case in its own process: wall time, CPU time and peak RSS of that process):

* ``search``: what ``register`` does today (``--prealign auto`` = search, itk rigid+affine), then
  ``--per-structure femur,tibia,patella`` from the case's fixed segmentation: per-bone errors of the ONE global
  transform and of each structure's transform;
* ``rough-start``: the same global pipeline started from a rough alignment such as a user makes by hand (a few
  landmark pairs or a transform moved in Slicer): the femur's true transform perturbed by a random rigid transform
  of 3-8 degrees and 3-8 mm about the joint, given as the MR header (``--prealign header``); then per-structure
  registration with the itk engine (ours), with the automatic bone labels instead of the segmentation
  (``--structures-from-threshold 300``), and with elastix and BRAINSFit as the structures' engine (the same crops,
  masks and start). Times are each step's own; the global run is counted in ours.

The harness (``run.py --family knee``) scores a single transform against the femur's truth on the femur's points.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "MultimodalPrealign"))
sys.path.insert(0, str(HERE))

import cases

from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.synthetic import knee as knee_phantom

RESULTS = HERE / "results"
SCORED = ("femur", "tibia", "patella")
TARGET_MM = 0.5
#: Fixed microCT size (voxels per axis) of the benchmark cases at 0.1 mm.
FIXED_SIZE = 500


# ------------------------------------------------------------------------------------------------ cases
def _folder(index: int, seed: int, size: int) -> Path:
    return cases.CACHE / f"knee_s{seed}_{index:03d}_{size}"


def knee_case(index: int, seed: int = 0, size: int = FIXED_SIZE) -> cases.Case:
    """Case ``index``: generated once into ``results/cache/knee_s<seed>_<index>_<size>/`` (images as .mha, label
    maps as .seg.nrrd with the bone names, per-bone truths in ``info["truths"]`` and points in
    ``points_<bone>.npy``). ``Case.truth``: the femur's (the harness scores one transform against it)."""
    folder = _folder(index, seed, size)
    cached = cases._open_case(folder)
    if cached is not None:
        return cached
    rng = np.random.default_rng(60_000 + 97 * seed + index)
    moving_spacing = (float(rng.uniform(2.0, 3.0)), float(rng.uniform(0.4, 0.5)), float(rng.uniform(0.4, 0.5)))
    extent = (120.0, 140.0, float(rng.uniform(150.0, 200.0)))
    spacing = 0.1 if size >= 400 else 50.0 / size
    pair = knee_phantom.make_knee_pair(seed=1000 * seed + index, fixed_spacing_mm=spacing, fixed_size=size,
                                       moving_spacing=moving_spacing, moving_extent_mm=extent)
    points = {}
    for bone in SCORED:
        points[bone] = knee_phantom.bone_points(pair, bone, 2000, seed=index)
        np.save(folder / f"points_{bone}.npy", points[bone])
    np.save(folder / "points.npy", points["femur"])
    truths = {bone: transforms.to_matrix(t).tolist() for bone, t in pair.truths.items()}
    info = {**{k: v for k, v in pair.description.items() if k != "convention"}, "truths": truths,
            "points": {bone: str(folder / f"points_{bone}.npy") for bone in SCORED},
            "bone_points": {bone: int(len(p)) for bone, p in points.items()}}
    case = cases.Case("knee", index, cases._write(pair.fixed, folder / "fixed.mha"),
                      cases._write(pair.moving, folder / "moving.mha"), truths["femur"], str(folder / "points.npy"),
                      info, cases._write(pair.fixed_labels, folder / "fixed_labels.seg.nrrd"),
                      cases._write(pair.moving_labels, folder / "moving_labels.seg.nrrd"))
    return cases._store(case, folder)


def knee_family():
    """The harness's entry (``cases.FAMILIES["knee"]``): one global transform scored against the femur's truth."""
    return cases.Family(knee_case, "Knee: microCT 500^3 @ 0.1 mm (fixed) vs MR 0.4-0.5 mm x 2-3 mm slices (moving), "
                                   "flexion differs 5-30 deg (one transform, scored on the femur)",
                        ("ours-auto",), ("ours-auto",), in_all=False)


def bone_errors(case: dict, matrix) -> dict:
    """{bone: mean error (mm)} of a 4x4 fixed->moving estimate against each bone's truth on its points."""
    out = {}
    for bone in SCORED:
        points = np.load(case["info"]["points"][bone])
        if len(points):
            out[bone] = round(cases.mean_error_mm(np.asarray(matrix, float), np.asarray(case["info"]["truths"][bone]),
                                                  points), 4)
    return out


# ------------------------------------------------------------------------------------------------ worker
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rough_start(case: dict, seed: int) -> np.ndarray:
    """A rough alignment as a user gives by hand: the femur's truth after a random rigid of 3-8 degrees and 3-8 mm
    about the femur's points' centre (4x4 fixed->moving)."""
    from MultimodalPrealignLib.synthetic.phantoms import rigid_transform, rotation_about_axis

    rng = np.random.default_rng(70_000 + 97 * seed + case["index"])
    centre = np.load(case["info"]["points"]["femur"]).mean(0)
    axis = rng.normal(size=3)
    shift = rng.normal(size=3)
    perturbation = rigid_transform(rotation_about_axis(axis, float(rng.uniform(3, 8))),
                                   shift / np.linalg.norm(shift) * float(rng.uniform(3, 8)), centre)
    return np.asarray(case["info"]["truths"]["femur"]) @ transforms.to_matrix(perturbation)


def _structure_rows(results, case, back, label_to_bone=None) -> dict:
    """{bone: its structure's verdict, transform (``back`` maps it to the case's MR) and error (mm)}."""
    rows = {}
    for result in results:
        bone = (label_to_bone or {}).get(result.name, result.name)
        if bone not in SCORED:
            continue
        entry = {"structure": result.name, "verdict": result.verdict, "reasons": result.reasons[:2],
                 "error": result.error}
        if result.transform is not None:
            entry["matrix"] = back(transforms.to_matrix(result.transform)).tolist()
            entry["error_mm"] = bone_errors(case, entry["matrix"])[bone]
            entry["motion"] = {k: result.motion.get(k) for k in ("rotation_deg", "mean_displacement_mm")}
            check = (result.metrics or {}).get("consistency") or {}
            entry["consistency"] = {k: check.get(k) for k in ("switched", "switched_mm", "switched_from",
                                                              "disagreement_mm")}
            entry["guard_kept"] = (result.guard or {}).get("kept")
        rows[bone] = entry
    return rows


def _threshold_names(labels, case: dict) -> dict:
    """{bone_k: bone name} by the largest overlap of each automatic label with the case's true fixed labels."""
    truth = sitk.ReadImage(case["fixed_labels"])
    names = knee_phantom.bone_labels()
    on_grid = sitk.Resample(truth, labels.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    t = sitk.GetArrayViewFromImage(on_grid)
    a = sitk.GetArrayViewFromImage(labels.image)
    out = {}
    for name, values in labels.names.items():
        counts = np.bincount(t[a == values[0]].ravel(), minlength=5)
        counts[0] = 0
        if counts.max() > 0:
            out[name] = names[int(np.argmax(counts))]
    return out


def work(request: dict) -> dict:
    """Run one method on one case (in this process) and return its row."""
    from MultimodalPrealignLib import pipeline, structures
    from MultimodalPrealignLib.io.image_io import as_float32

    case, method, seed = request["case"], request["method"], request.get("seed", 0)
    engines = request.get("engines", ["itk", "elastix", "brainsfit"])
    fixed = sitk.ReadImage(case["fixed"])
    moving = sitk.ReadImage(case["moving"])
    fixed_labels = structures.read_structure_labels(case["fixed_labels"], fixed, "fixed")
    row = {"case": f"knee-{case['index']:03d}", "index": case["index"], "method": method,
           "case_info": {k: case["info"].get(k) for k in ("flexion_difference_deg", "placement_rotation_deg",
                                                          "placement_translation_mm", "flip_head_feet",
                                                          "fixed_size", "moving_spacing_mm")}}
    start = None
    options = pipeline.PipelineOptions.create(seed=seed, per_structure=("femur", "tibia", "patella"))
    if method == "rough-start":
        start = rough_start(case, seed)
        row["start_errors_mm"] = bone_errors(case, start)
        moved = sitk.Image(moving)  # the MR header moved by start^-1: identity (--prealign header) = start
        inverse = np.linalg.inv(start)
        moved.SetOrigin((inverse[:3, :3] @ np.asarray(moving.GetOrigin()) + inverse[:3, 3]).tolist())
        moved.SetDirection((inverse[:3, :3] @ np.asarray(moving.GetDirection()).reshape(3, 3)).ravel().tolist())
        moving = moved
        options.prealign = "header"
    cpu0 = _cpu()
    started = time.perf_counter()
    result = pipeline.run_pipeline(fixed, moving, options, structure_labels=fixed_labels)
    seconds = time.perf_counter() - started

    def back(matrix):  # estimates for the moved header -> for the case's MR
        return np.asarray(matrix) if start is None else start @ np.asarray(matrix)

    global_matrix = back(transforms.to_matrix(result.transform))
    row["global"] = {"matrix": global_matrix.tolist(), "errors_mm": bone_errors(case, global_matrix),
                     "verdict": result.verdict, "prealign": result.prealign.method,
                     "seconds": round(seconds - result.report["timings_s"].get("structures", 0.0), 2)}
    rows = _structure_rows(result.structures, case, back)
    row["ours"] = {"bones": rows, "seconds": round(seconds, 2),
                   "structures_seconds": round(result.report["timings_s"].get("structures", 0.0), 2),
                   "cpu_seconds": round(_cpu() - cpu0, 2), "peak_rss_mb": round(_rss_mb(), 1)}
    if method == "rough-start":
        fixed_f, moving_f = as_float32(fixed), as_float32(moving)
        variants = [("threshold", "itk")] if request.get("threshold", True) else []
        variants += [(engine, engine) for engine in engines if engine != "itk"]
        for label, engine in variants:
            settings = structures.StructureSettings()
            settings.registration.engine = engine
            settings.registration.seed = seed
            if engine == "brainsfit":
                import peers

                settings.registration.brainsfit_path = peers.real_brainsfit().path
            labels, mapping, names = fixed_labels, None, "femur,tibia,patella"
            started = time.perf_counter()
            try:
                if label == "threshold":
                    labels = structures.threshold_bone_labels(fixed_f, 300.0)
                    mapping = _threshold_names(labels, case)
                    names = ",".join(k for k, v in mapping.items() if v in SCORED)
                results, _ = structures.run(fixed_f, moving_f, result.transform, labels, names, settings)
            except Exception as err:  # a peer that cannot run: its row says why
                row[label] = {"failure": str(err).splitlines()[-1][:200]}
                continue
            entries = _structure_rows(results, case, back, mapping)
            row[label] = {"bones": entries, "seconds": round(time.perf_counter() - started, 2),
                          "labels": labels.source}
    row["peak_rss_mb"] = round(_rss_mb(), 1)
    return row


def run_isolated(request: dict, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="knee_worker_") as folder:
        path, out = Path(folder) / "request.json", Path(folder) / "row.json"
        path.write_text(json.dumps({**request, "result": str(out)}))
        started = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(path)],
                                  capture_output=True, text=True, timeout=timeout_s,
                                  env={**os.environ, "PYTHONHASHSEED": "0"})
        except subprocess.TimeoutExpired:
            return {**_row_head(request), "failure": f"timeout after {timeout_s:.0f} s"}
        if out.exists():
            row = json.loads(out.read_text())
        else:
            tail = " | ".join((done.stderr or "").strip().splitlines()[-3:])
            row = {**_row_head(request), "failure": "worker died: " + tail[:300]}
        row["process_seconds"] = round(time.perf_counter() - started, 1)
        return row


def _row_head(request: dict) -> dict:
    return {"case": f"knee-{request['case']['index']:03d}", "index": request["case"]["index"],
            "method": request["method"]}


# ------------------------------------------------------------------------------------------------ tables
def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _errors(rows: list[dict], key: str, bone: str) -> list[float]:
    out = []
    for row in rows:
        if key == "global":
            value = (row.get("global") or {}).get("errors_mm", {}).get(bone)
        else:
            value = ((row.get(key) or {}).get("bones") or {}).get(bone, {}).get("error_mm")
        out.append(math.inf if value is None else float(value))
    return out


def table(rows: list[dict], method: str) -> str:
    rows = [r for r in rows if r.get("method") == method]
    if not rows:
        return ""
    lines = [f"**Knee, {method}** ({len(rows)} cases; per-bone mean error, target <= {TARGET_MM} mm)", "",
             "| transform | " + " | ".join(f"{b} <= {TARGET_MM} mm | {b} median / 95th pct (mm)" for b in SCORED)
             + " | all three <= 0.5 mm | time (s, median) | verdicts (PASS / WARN / FAIL) | PASS with error > 1 mm |",
             "|---|" + "---|---|" * len(SCORED) + "---|---|---|---|"]
    keys = [("global", "one global transform (rigid+affine)"), ("ours", "per-structure, itk (ours)"),
            ("threshold", "per-structure, itk, automatic bone labels"), ("elastix", "per-structure, elastix"),
            ("brainsfit", "per-structure, BRAINSFit")]
    all_rows = rows
    for key, label in keys:
        rows = [r for r in all_rows if key in r]
        if not rows:
            continue
        label += f" ({len(rows)} cases)" if len(rows) != len(all_rows) else ""
        cells, all_ok = [], np.ones(len(rows), bool)
        for bone in SCORED:
            errors = np.array(_errors(rows, key, bone))
            ok = errors <= TARGET_MM
            all_ok &= ok
            cells.append(f"{int(ok.sum())}/{len(rows)}")
            p95 = float(np.percentile(errors, 95, method="higher"))
            cells.append(f"{_fmt(float(np.median(errors)))} / {_fmt(p95)}")
        if key == "global":
            seconds = [r["global"]["seconds"] for r in rows if "global" in r]
            verdicts = [r["global"]["verdict"] for r in rows if "global" in r]
            wrong_pass = sum(1 for r in rows if r.get("global", {}).get("verdict") == "PASS"
                             and min(r["global"]["errors_mm"].values()) > 1.0)
        else:
            seconds = [(r.get(key) or {}).get("seconds") for r in rows]
            verdicts = [e.get("verdict") for r in rows for e in ((r.get(key) or {}).get("bones") or {}).values()]
            wrong_pass = sum(1 for r in rows for e in ((r.get(key) or {}).get("bones") or {}).values()
                             if e.get("verdict") == "PASS" and (e.get("error_mm") or math.inf) > 1.0)
        seconds = [s for s in seconds if s is not None]
        counts = "/".join(str(verdicts.count(v)) for v in ("PASS", "WARN", "FAIL"))
        cpu = [(r.get("ours") or {}).get("cpu_seconds") for r in rows] if key == "ours" else []
        cpu = [c for c in cpu if c is not None]
        time_cell = _fmt(float(np.median(seconds)) if seconds else None, 1) + (
            f" (CPU {_fmt(float(np.median(cpu)), 1)})" if cpu else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {int(all_ok.sum())}/{len(rows)} | "
                     f"{time_cell} | {counts} | {wrong_pass} |")
    rows = all_rows
    rss = [r.get("peak_rss_mb") for r in rows if r.get("peak_rss_mb")]
    if rss:
        lines.append("")
        lines.append(f"Peak RSS of the worker (all of the above in one process): max {max(rss):.0f} MB.")
    failures = sorted({r["failure"][:100] for r in rows if r.get("failure")})
    if failures:
        lines.append("Failures: " + "; ".join(failures))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ phantom
def phantom_check(out_dir: Path, threshold: float = 300.0) -> dict:
    """The real phantom pair (CT fixed, T2 MR moving; one piece of meat with one bone): ``register --per-structure
    all --structures-from-threshold 300``, each automatic bone scored by the shared reference's fair rule restricted
    to that bone: the CT voxels of the bone x, L = the least-squares rigid fit of x -> x + u(x) over them (u: the
    deformable reference), truth = rigid o L, alternatively the whole-object rigid reference; within 3.5 mm passes."""
    from MultimodalPrealignLib import pipeline
    from MultimodalPrealignLib.prealign.anatomy import kabsch

    options = pipeline.PipelineOptions.create(per_structure=("all",), structure_threshold=threshold)
    started = time.perf_counter()
    result = pipeline.register_files(cases.DATA / "ct.nrrd", cases.DATA / "mr_t2.nrrd", out_dir, options)
    seconds = time.perf_counter() - started
    rigid = transforms.to_matrix(transforms.read_transform(cases.RIGID_REFERENCE))
    field = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(cases.DEFORMABLE_REFERENCE)),
                                                      sitk.sitkVectorFloat64))
    labels = result.structure_labels
    rows = []
    for entry, structure in zip(result.report["structures"]["results"], result.structures):
        row = {"name": entry["name"], "verdict": entry["verdict"], "reasons": entry["verdict_reasons"][:2],
               "error": entry["error"]}
        values = structure.label_values
        array = sitk.GetArrayViewFromImage(labels.image)
        zyx = np.argwhere(np.isin(array, values))
        zyx = zyx[np.random.default_rng(0).choice(len(zyx), size=min(3000, len(zyx)), replace=False)]
        from MultimodalPrealignLib.geometry.image_space import index_to_physical_points

        points = index_to_physical_points(labels.image, zyx[:, ::-1].astype(float))
        displaced = np.array([field.TransformPoint(tuple(float(v) for v in p)) for p in points])
        local = rigid @ kabsch(points, displaced)
        row["volume_ml"] = round(len(np.argwhere(np.isin(array, values))) * float(np.prod(labels.image.GetSpacing()))
                                 / 1000.0, 1)
        row["bone_local_vs_rigid_mm"] = round(cases.mean_error_mm(local, rigid, points), 3)
        row["global_error_mm"] = {"bone_local": round(cases.mean_error_mm(transforms.to_matrix(result.transform),
                                                                          local, points), 3),
                                  "whole_rigid": round(cases.mean_error_mm(transforms.to_matrix(result.transform),
                                                                           rigid, points), 3)}
        if structure.transform is not None:
            matrix = transforms.to_matrix(structure.transform)
            row["error_mm"] = {"bone_local": round(cases.mean_error_mm(matrix, local, points), 3),
                               "whole_rigid": round(cases.mean_error_mm(matrix, rigid, points), 3)}
            row["within_3_5_mm"] = min(row["error_mm"].values()) <= cases.FAIR_TOLERANCE_MM
            row["motion"] = {k: entry["motion_relative_to_global"].get(k)
                             for k in ("rotation_deg", "mean_displacement_mm")}
        rows.append(row)
    return {"seconds": round(seconds, 1), "global_verdict": result.verdict, "names_from": labels.source,
            "structures": rows, "timings_s": result.report["timings_s"]}


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--first-case", type=int, default=0)
    parser.add_argument("--methods", default="rough-start,search")
    parser.add_argument("--limit", default="search=5,peers=5",
                        help="method=k: run a method on cases < k only; peers=k: the automatic bone labels, elastix "
                             "and BRAINSFit variants of rough-start on cases < k only")
    parser.add_argument("--engines", default="itk,elastix,brainsfit", help="the structures' engines of rough-start")
    parser.add_argument("--fixed-size", type=int, default=FIXED_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--target", action="store_true",
                        help="time and peak RSS of ours (global + 3 bones) on one 600^3 microCT case")
    parser.add_argument("--phantom", default=None, metavar="OUT",
                        help="the real phantom pair: --per-structure all --structures-from-threshold 300 into OUT, "
                             "each bone scored by the reference's fair rule")
    parser.add_argument("--tables", nargs="+", default=None, metavar="ROWS.jsonl",
                        help="only print the tables of earlier rows (results/knee_<time>.jsonl)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tables:
        rows = [json.loads(line) for path in args.tables for line in Path(path).read_text().splitlines() if line]
        print("\n\n".join(t for t in (table(rows, m) for m in dict.fromkeys(r.get("method") for r in rows)) if t))
        return 0
    if args.phantom:
        print(json.dumps(phantom_check(Path(args.phantom)), indent=1))
        return 0
    if args.worker:
        request = json.loads(Path(args.worker).read_text())
        try:
            row = work(request)
        except Exception as err:  # the row says why the method failed
            row = {**_row_head(request), "failure": (str(err).strip().splitlines() or [repr(err)])[-1][:300]}
        Path(request["result"]).write_text(json.dumps(row, default=str))
        return 0

    def log(text):
        print(text, file=sys.stderr, flush=True)

    limits = {k: int(v) for k, _, v in (item.partition("=") for item in args.limit.split(",") if item)}
    methods = [m for m in args.methods.split(",") if m]
    engines = [e for e in args.engines.split(",") if e]
    if args.target:
        args.fixed_size, args.cases, methods, engines = 600, 1, ["rough-start"], ["itk"]
    rows = []
    started = datetime.datetime.now(datetime.timezone.utc)
    stamp = started.strftime("%Y%m%dT%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    for index in range(args.first_case, args.first_case + args.cases):
        t = time.perf_counter()
        case = knee_case(index, args.seed, args.fixed_size).to_json()
        log(f"knee-{index:03d} ready ({time.perf_counter() - t:.0f} s): {case['info']['fixed_size']} voxels, flexion "
            f"difference {case['info']['flexion_difference_deg']:.1f} deg, flip {case['info']['flip_head_feet']}")
        for method in methods:
            if index >= limits.get(method, math.inf):
                continue
            with_peers = index < limits.get("peers", math.inf)
            row = run_isolated({"case": case, "method": method, "seed": args.seed,
                                "engines": engines if with_peers else ["itk"], "threshold": with_peers}, args.timeout)
            rows.append(row)
            with open(RESULTS / f"knee_{stamp}.jsonl", "a") as handle:  # every row as soon as it is there
                handle.write(json.dumps(row, default=str) + "\n")
            summary = {k: {b: e.get("error_mm") for b, e in (row.get(k) or {}).get("bones", {}).items()}
                       for k in ("ours", "threshold", "elastix", "brainsfit") if k in row}
            log(f"knee-{index:03d} {method}: global {(row.get('global') or {}).get('errors_mm')} {summary} "
                f"time {(row.get('ours') or {}).get('seconds')} s RSS {row.get('peak_rss_mb')} MB "
                f"{row.get('failure') or ''}")
    import run as harness

    header = f"Knee benchmark {started.strftime('%Y-%m-%d %H:%M UTC')}; {harness.machine_line()}"
    text = "\n\n".join(t for t in (table(rows, m) for m in methods) if t)
    (RESULTS / f"knee_{stamp}.json").write_text(json.dumps(rows, indent=1, default=str))
    (RESULTS / f"knee_{stamp}.md").write_text(header + "\n\n" + text + "\n")
    print(header + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
