"""Cohort scaling: the same synthetic pairs with 1 and with 2 local Dask workers (1 thread each).

    python benchmarks/batch_scaling.py                       # 8 pairs at 6 mm, 1 and 2 workers
    python benchmarks/batch_scaling.py --pairs 8 --spacing 6 --workers 1,2 --repeats 1

Measures, per worker count: the batch's wall time (cluster start-up apart), the sum of the pairs' own times,
each worker process's peak resident memory (``ru_maxrss``, read inside the worker at the end), and the
scheduler's overhead per pair = (processing wall x workers - sum of pair times) / pairs (dispatch, result
handling, the first pair's imports on each worker and idle workers at the end), plus the round trip of an
empty task. The single-pair figure is ``multimodal-prealign register`` on the first pair in its own process
(same options). Targets (issue 17): speed-up >= 1.8x from 1 to 2 workers on a 2-core machine; peak RSS per
worker <= single pair + 200 MB; overhead <= 0.5 s per pair. Prints a markdown table (docs/benchmarks.md,
"Cohorts (batch)") and writes it with the raw numbers to ``benchmarks/results/batch_<UTC time>.{md,json}``.
The cases are written once to ``benchmarks/results/cache/batch_*`` (Testing/batch_helpers.make_cohort).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "MultimodalPrealign"))
sys.path.insert(0, str(REPO / "Testing"))
sys.path.insert(0, str(HERE))

RESULTS = HERE / "results"
#: The registration of every pair: moments pre-alignment, then the defaults (itk, rigid + affine), pictures.
OPTIONS = ["--prealign", "moments"]
SPEED_UP_TARGET = 1.8
RSS_MARGIN_MB = 200.0
OVERHEAD_TARGET_S = 0.5


def peak_rss_mb() -> float:
    """This process's peak resident set (MB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def nothing(index: int) -> int:
    return index


def single_pair(manifest: Path, out: Path) -> dict:
    """``register`` on the manifest's first pair in its own process: wall time and peak RSS."""
    import csv

    with open(manifest, newline="", encoding="utf-8") as f:
        first = next(csv.DictReader(f))
    base = manifest.parent
    code = ("import resource, sys, time; from MultimodalPrealignLib import cli; t = time.perf_counter(); "
            f"c = cli.main(['register', '--fixed', {str(base / first['fixed'])!r}, '--moving', "
            f"{str(base / first['moving'])!r}, '--out', {str(out)!r}, '--quiet', *{OPTIONS!r}]); "
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, c)")
    env = {**os.environ, "PYTHONPATH": str(REPO / "MultimodalPrealign"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    seconds, rss, exit_code = done.stdout.split()[-3:]
    return {"seconds": float(seconds), "peak_rss_mb": float(rss), "exit_code": int(exit_code)}


def run_workers(manifest: Path, out: Path, workers: int) -> dict:
    """One batch on a fresh LocalCluster of ``workers`` processes (1 thread each)."""
    from MultimodalPrealignLib import batch, cli
    from MultimodalPrealignLib.batch import executors

    parser = cli.build_parser()
    options = cli.options_from_args(parser.parse_args(["batch", str(manifest), "--out", str(out), *OPTIONS]))
    started = time.perf_counter()
    cluster, client = executors.local_cluster(workers, 1, retries=2)
    try:
        start_up = time.perf_counter() - started
        begun = time.perf_counter()
        result = batch.run(manifest, out, options, client=client, quiet=True)
        wall = time.perf_counter() - begun
        rss = sorted(client.run(peak_rss_mb).values())
        tick = time.perf_counter()
        client.gather(client.map(nothing, range(200), pure=False))
        round_trip = (time.perf_counter() - tick) / 200
    finally:
        client.close()
        cluster.close()
    pair_seconds = sum(row["seconds"] or 0.0 for row in result.rows)
    pair_cpu = sum(row["cpu_seconds"] or 0.0 for row in result.rows)
    return {"workers": workers, "pairs": len(result.rows), "counts": result.counts, "start_up_s": round(start_up, 2),
            "wall_s": round(wall, 2), "pair_seconds_sum": round(pair_seconds, 2), "pair_cpu_sum": round(pair_cpu, 2),
            "overhead_per_pair_s": round((wall * workers - pair_seconds) / len(result.rows), 3),
            "empty_task_round_trip_ms": round(round_trip * 1000, 2), "worker_peak_rss_mb": [round(v) for v in rss]}


def table(single: dict, runs: list, machine: str) -> str:
    base = next(r for r in runs if r["workers"] == min(r["workers"] for r in runs))
    lines = ["| workers x threads | pairs | wall (s, start-up apart) | cluster start-up (s) | sum of pair times (s) | "
             "sum of pair CPU (s) | speed-up | overhead per pair (s) | empty task round trip (ms) | "
             "peak RSS per worker (MB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['workers']} x 1 | {r['pairs']} | {r['wall_s']:.1f} | {r['start_up_s']:.1f} | "
                     f"{r['pair_seconds_sum']:.1f} | {r['pair_cpu_sum']:.1f} | {base['wall_s'] / r['wall_s']:.2f}x | "
                     f"{r['overhead_per_pair_s']:.2f} | {r['empty_task_round_trip_ms']:.1f} | "
                     f"{', '.join(str(v) for v in r['worker_peak_rss_mb'])} |")
    lines.append(f"| single pair, `register` in its own process | 1 | {single['seconds']:.1f} | - | - | - | - | - | "
                 f"- | {single['peak_rss_mb']:.0f} |")
    two = next((r for r in runs if r["workers"] == 2), None)
    targets = ["", "| target | status |", "|---|---|"]
    if two is not None and two is not base:
        speed_up = base["wall_s"] / two["wall_s"]
        targets.append(f"| speed-up >= {SPEED_UP_TARGET}x from 1 to 2 workers | "
                       f"{'met' if speed_up >= SPEED_UP_TARGET else '**missed**'}: {speed_up:.2f}x |")
    worst_rss = max(v for r in runs for v in r["worker_peak_rss_mb"])
    limit = single["peak_rss_mb"] + RSS_MARGIN_MB
    targets.append(f"| peak RSS per worker <= single pair + {RSS_MARGIN_MB:.0f} MB ({limit:.0f} MB) | "
                   f"{'met' if worst_rss <= limit else '**missed**'}: {worst_rss} MB |")
    worst_overhead = max(r["overhead_per_pair_s"] for r in runs)
    targets.append(f"| scheduler overhead <= {OVERHEAD_TARGET_S} s per pair | "
                   f"{'met' if worst_overhead <= OVERHEAD_TARGET_S else '**missed**'}: {worst_overhead:.2f} s |")
    return "\n".join([f"Machine: {machine}", "", *lines, *targets])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--spacing", type=float, default=6.0, help="fixed voxel size in mm (moving: +1 mm in z)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--repeats", type=int, default=1, help="runs per worker count (the fastest is kept)")
    args = parser.parse_args(argv)
    from batch_helpers import make_cohort
    from run import machine_line

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    cases = RESULTS / "cache" / f"batch_n{args.pairs}_s{args.spacing:g}"
    manifest = make_cohort(cases, args.pairs, fixed_spacing=(args.spacing,) * 3,
                           moving_spacing=(args.spacing, args.spacing, args.spacing + 1.0))
    work = RESULTS / f"batch_{stamp}"
    machine = machine_line()
    print(f"{machine}\n{args.pairs} pairs at {args.spacing:g} mm, options {' '.join(OPTIONS)}", file=sys.stderr)
    single = single_pair(manifest, work / "single")
    print(f"single pair: {single}", file=sys.stderr)
    runs = []
    for workers in [int(w) for w in args.workers.split(",")]:
        best = None
        for repeat in range(args.repeats):
            run = run_workers(manifest, work / f"w{workers}_r{repeat}", workers)
            print(f"{workers} workers: {run} (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
            best = run if best is None or run["wall_s"] < best["wall_s"] else best
        runs.append(best)
    text = table(single, runs, machine)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"batch_{stamp}.md").write_text(text + "\n", encoding="utf-8")
    (RESULTS / f"batch_{stamp}.json").write_text(json.dumps({"single": single, "runs": runs, "machine": machine,
                                                             "pairs": args.pairs, "spacing_mm": args.spacing,
                                                             "options": OPTIONS}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
