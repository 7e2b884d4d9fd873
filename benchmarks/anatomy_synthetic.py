"""Anatomy pre-alignment on random synthetic torso phantoms with exact truth (issue 4 "done when").

Each case: CT-like fixed (TotalSegmentator `total` labels) and MR-like moving (`total_mr` labels), a random
rotation up to 40 degrees about a random axis, a head-first/feet-first flip in ~1/3 of the cases, a random
translation up to 150 mm, and (in most cases) an MR slab that cuts organs at its edges. Error = mean
distance (mm) between where the found and the true fixed->moving transforms send points of the body in
the region both images show. Prints a table and the success rates: anatomy alone < 5 mm and full
pipeline (anatomy pre-alignment + registration) < 2 mm.

Usage:
    python benchmarks/anatomy_synthetic.py --cases 30                 # anatomy alone + full pipeline (itk)
    python benchmarks/anatomy_synthetic.py --cases 30 --no-pipeline   # anatomy alone (about 2 s per case)
    python benchmarks/anatomy_synthetic.py --engine elastix --stages rigid --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MultimodalPrealign"))

from MultimodalPrealignLib.geometry import transforms
from MultimodalPrealignLib.prealign import (
    PrealignInputs,
    anatomy,
)
from MultimodalPrealignLib.synthetic import phantoms


def case_parameters(index: int, base_seed: int) -> dict:
    rng = np.random.default_rng(base_seed + index)
    return {
        "seed": int(base_seed + index),
        "rotation_deg": float(rng.uniform(0.0, 40.0)),
        "translation_mm": float(rng.uniform(0.0, 150.0)),
        "flip": bool(rng.random() < 1 / 3),
        "moving_fov": "slab" if rng.random() < 0.75 else "full",
        "slab_fraction": float(rng.uniform(0.3, 0.5)),
        "moving_spacing": (2.5, 2.5, float(rng.choice([3.0, 4.0, 5.0]))),
    }


def run_case(params: dict, fixed_spacing: float, pipeline: bool, engine: str, stages: tuple,
             supersample: int = 2) -> dict:
    pair = phantoms.make_pair(seed=params["seed"], rotation_deg=params["rotation_deg"],
                              translation_mm=params["translation_mm"], flip=params["flip"],
                              moving_fov=params["moving_fov"], slab_fraction=params["slab_fraction"],
                              fixed_spacing=(fixed_spacing,) * 3, moving_spacing=params["moving_spacing"],
                              supersample=supersample)
    points = phantoms.body_points(pair, 2000, seed=params["seed"])
    row = dict(params)
    row["moving_cut"] = len(pair.description["moving_structures_touching_border"])
    started = time.perf_counter()
    inputs = PrealignInputs(pair.fixed, pair.moving, pair.fixed_labels, pair.moving_labels, pair.fixed_task,
                            pair.moving_task, seed=params["seed"])
    result = anatomy.prealign(inputs)
    row["anatomy_s"] = round(time.perf_counter() - started, 2)
    row["anatomy_mm"] = round(transforms.mean_point_error(result.transform, pair.fixed_to_moving, points), 3)
    row["used"] = len(result.details["used"])
    row["rejected"] = len(result.details["rejected"])
    row["type"] = result.details["transform_type"]
    if pipeline:
        from MultimodalPrealignLib.pipeline import PipelineOptions, run_pipeline

        started = time.perf_counter()
        try:
            out = run_pipeline(pair.fixed, pair.moving,
                               PipelineOptions.create(prealign="anatomy", engine=engine, stages=stages, seed=params["seed"],
                                               fixed_labels_task=pair.fixed_task,
                                               moving_labels_task=pair.moving_task),
                               fixed_labels=pair.fixed_labels, moving_labels=pair.moving_labels)
            row["pipeline_mm"] = round(transforms.mean_point_error(out.transform, pair.fixed_to_moving, points), 3)
        except Exception as err:  # noqa: BLE001 - a benchmark records failures instead of stopping
            row["pipeline_mm"] = None
            row["pipeline_error"] = f"{type(err).__name__}: {str(err)[:160]}"
        row["pipeline_s"] = round(time.perf_counter() - started, 1)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--fixed-spacing", type=float, default=3.0, help="fixed (CT) voxel size in mm")
    parser.add_argument("--no-pipeline", action="store_true", help="anatomy pre-alignment only")
    parser.add_argument("--engine", default="itk", choices=("itk", "elastix"))
    parser.add_argument("--stages", default="rigid,affine")
    parser.add_argument("--supersample", type=int, default=2,
                        help="phantom partial-volume sub-samples per axis (1 = sharp voxels, faster to render)")
    parser.add_argument("--json", help="write all rows to this JSON file")
    args = parser.parse_args(argv)
    stages = tuple(s for s in args.stages.split(",") if s)
    rows = []
    header = (f"{'case':>4} {'rot':>5} {'trans':>6} {'flip':>4} {'fov':>5} {'cut':>3} {'used':>4} {'rej':>3} "
              f"{'anat_mm':>8} {'pipe_mm':>8} {'s':>6}")
    print(header)
    for i in range(args.cases):
        row = run_case(case_parameters(i, args.seed), args.fixed_spacing, not args.no_pipeline, args.engine, stages,
                       args.supersample)
        rows.append(row)
        pipe = row.get("pipeline_mm")
        pipe_text = "-" if args.no_pipeline else ("FAIL" if pipe is None else f"{pipe:.2f}")
        print(f"{i:>4} {row['rotation_deg']:5.1f} {row['translation_mm']:6.1f} {('yes' if row['flip'] else 'no'):>4} "
              f"{row['moving_fov']:>5} {row['moving_cut']:>3} {row['used']:>4} {row['rejected']:>3} "
              f"{row['anatomy_mm']:8.2f} {pipe_text:>8} {row['anatomy_s'] + row.get('pipeline_s', 0):6.1f}",
              flush=True)
    anatomy_errors = np.array([r["anatomy_mm"] for r in rows])
    print(f"\nanatomy alone  < 5 mm: {np.mean(anatomy_errors < 5) * 100:5.1f}% of {len(rows)} cases "
          f"(median {np.median(anatomy_errors):.2f} mm, max {anatomy_errors.max():.2f} mm)")
    if not args.no_pipeline:
        pipe = np.array([np.inf if r.get("pipeline_mm") is None else r["pipeline_mm"] for r in rows])
        print(f"full pipeline  < 2 mm: {np.mean(pipe < 2) * 100:5.1f}% of {len(rows)} cases "
              f"(engine {args.engine}, stages {','.join(stages)}; median {np.median(pipe):.2f} mm)")
        for r in rows:
            if r.get("pipeline_error"):
                print(f"  case seed {r['seed']}: {r['pipeline_error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
