"""Benchmark harness: our pipeline and its peers, side by side, on cases with known transforms (benchmarks/README.md).

    python benchmarks/run.py --quick --family synthetic   # smoke run: 1 case, fewer methods
    python benchmarks/run.py --family synthetic --cases 6
    python benchmarks/run.py --family slab --cases 50     # the search study (docs/search.md)
    python benchmarks/run.py --family targets             # speed / memory targets of issue 8

Prints one markdown table per case family (``benchmarks/cases.py``, ``FAMILIES``): success rate (mean error
<= 2.5 mm over points inside the object), median and 95th-percentile error, median wall and CPU time, peak
memory (RSS, max over runs), and a success count per subgroup where the family defines subgroups. Every
(method, case) runs in its own process (``benchmarks/memory.py``). Results (all rows, JSON, and the tables,
markdown, with the date and machine line) go to ``benchmarks/results/`` (git-ignored). ANTs and greedy run with
the Python given by ``--peer-python``, else ``$MMP_PEER_PYTHON``, else this Python; they are listed as
"not installed" when that Python cannot import them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cases
import memory

RESULTS = HERE / "results"
PEER_PYTHON_ENV = "MMP_PEER_PYTHON"
PEER_MODULES = {"ants": "ants", "greedy": "picsl_greedy"}


def peer_python_has(python: str, module: str) -> bool:
    if not Path(python).exists():
        return False
    done = subprocess.run([python, "-c", f"import {module}"], capture_output=True)
    return done.returncode == 0


def peer_python(given: str | None) -> str:
    """The Python that runs ANTs / greedy: ``--peer-python``, else ``$MMP_PEER_PYTHON``, else this Python."""
    return given or os.environ.get(PEER_PYTHON_ENV) or sys.executable


def _versions() -> str:
    from importlib import metadata

    found = []
    for name in ("SimpleITK", "itk-elastix", "numpy"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    memory_gib = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory_gib = int(line.split()[1]) / 1024.0**2
                break
    except OSError:
        pass
    load = os.getloadavg()
    memory_text = f", {memory_gib:.0f} GiB" if memory_gib else ""
    return (f"{os.cpu_count()} cores ({cpu}){memory_text}, Python {platform.python_version()}, {_versions()}, "
            f"load average at start {load[0]:.1f}")


# ------------------------------------------------------------------------------------------------ families
def run_family(family: str, n: int, methods: list[str], seed: int, python: str, timeout_s: float, log,
               first: int = 0, limits: dict | None = None, extra: dict | None = None) -> list[dict]:
    """Every method on cases ``first`` .. ``first + n - 1``; ``limits`` {method: k} runs a method on cases < k
    only; ``extra`` goes to every worker (e.g. {"options": {...}}: PipelineOptions fields of our methods)."""
    limits = limits or {}
    rows = []
    for case in cases.make_cases(family, n, seed, first):
        points = np.load(case.points)
        for method in methods:
            if case.index >= limits.get(method, math.inf):
                continue
            result = memory.run_isolated(method, case.to_json(), seed, python if method in memory.EXTERNAL else None,
                                         timeout_s, extra)
            error, success, errors = (cases.score(case, result["matrix"], points) if result.get("matrix") is not None
                                      else (math.inf, False, []))
            row = {"family": family, "case": case.name, "index": case.index, "seed": seed, "method": method,
                   "case_info": case.info, "error_mm": round(error, 3) if math.isfinite(error) else None,
                   "errors_vs_truths_mm": [round(e, 3) for e in errors], "tolerance_mm": case.tolerance_mm,
                   "success": success, "seconds": result.get("seconds"),
                   "cpu_seconds": result.get("cpu_seconds"), "peak_rss_mb": result.get("peak_rss_mb"),
                   "failure": result.get("error"), "info": result.get("info"), "matrix": result.get("matrix")}
            rows.append(row)
            log(f"{case.name:18s} {method:22s} error {error:9.2f} mm  {_fmt(row['seconds'], 1):>6s} s  "
                f"RSS {_fmt(row['peak_rss_mb'], 0):>6s} MB" + (f"  FAILED: {row['failure']}" if row["failure"] else ""))
    return rows


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-" if value is None else "inf"
    return f"{value:.{digits}f}"


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def _errors(rows: list[dict]) -> np.ndarray:
    return np.array([r["error_mm"] if r["error_mm"] is not None else np.inf for r in rows])


def family_table(rows: list[dict], methods: list[str], title: str) -> str:
    tolerances = sorted({r.get("tolerance_mm") or cases.SUCCESS_MM for r in rows if r.get("case")})
    within = "/".join(f"{t:g}" for t in tolerances) or f"{cases.SUCCESS_MM:g}"
    lines = [f"**{title}**", "",
             f"| method | cases | success (<= {within} mm) | median error (mm) | 95th pct error (mm) | "
             "median time (s) | median CPU (s) | peak RSS (MB, max) | failures |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
        sel = [r for r in rows if r["method"] == method]
        if not sel:
            continue
        if all(r["failure"] == "not installed" for r in sel):
            lines.append(f"| {method} | - | not installed | | | | | | |")
            continue
        errors = _errors(sel)
        ok = sum(r["success"] for r in sel)
        rss = [r["peak_rss_mb"] for r in sel if r["peak_rss_mb"] is not None]
        p95 = float(np.percentile(errors, 95, method="higher"))
        failures = sorted({r["failure"][:60] for r in sel if r["failure"]})
        seconds = _median(r["seconds"] for r in sel)
        cpu = _median(r.get("cpu_seconds") for r in sel)
        lines.append(f"| {method} | {len(sel)} | {ok}/{len(sel)} ({100.0 * ok / len(sel):.0f}%) | "
                     f"{_fmt(float(np.median(errors)))} | {_fmt(p95)} | {_fmt(seconds, 1)} | {_fmt(cpu, 1)} | "
                     f"{_fmt(max(rss) if rss else None, 0)} | {'; '.join(failures)} |")
    return "\n".join(lines)


def subgroup_table(rows: list[dict], methods: list[str], subgroups: dict) -> str:
    """Successes per subgroup (label -> predicate on the case's info) and method; empty when no subgroups."""
    ran = [m for m in methods if any(r["method"] == m and r["failure"] != "not installed" for r in rows)]
    if not subgroups or not ran:
        return ""
    lines = ["| subgroup | cases | " + " | ".join(ran) + " |", "|---|---|" + "---|" * len(ran)]
    for label, keep in subgroups.items():
        names = sorted({r["case"] for r in rows if r.get("case_info") is not None and keep(r["case_info"])})
        if not names:
            continue
        cells = []
        for method in ran:
            sel = [r for r in rows if r["method"] == method and r["case"] in names]
            cells.append(f"{sum(r['success'] for r in sel)}/{len(sel)}" if sel else "-")
        lines.append(f"| {label} | {len(names)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def family_tables(family: str, rows: list[dict], methods: list[str]) -> str:
    spec = cases.FAMILIES[family]
    table = family_table(rows, methods, spec.title)
    groups = subgroup_table(rows, methods, spec.subgroups)
    return table + ("\n\n" + groups if groups else "")


def rescore(rows: list[dict]) -> None:
    """Recompute the errors of earlier rows against the current cases (e.g. after a new phantom reference)."""
    for row in rows:
        if row.get("matrix") is None or row.get("index") is None or row.get("family") not in cases.FAMILIES:
            continue
        case = cases.FAMILIES[row["family"]].make(row["index"], row.get("seed", 0))
        error, success, errors = cases.score(case, row["matrix"])
        row["error_mm"], row["success"], row["tolerance_mm"] = round(error, 3), success, case.tolerance_mm
        row["errors_vs_truths_mm"] = [round(e, 3) for e in errors]


# ------------------------------------------------------------------------------------------------ targets
def _phantom_full_case() -> dict:
    """The unperturbed full-resolution phantom pair, scored by the fair rule (cases.fair_truths)."""
    import SimpleITK as sitk

    folder = cases.CACHE / f"phantom_full_{cases._reference_key()}"
    folder.mkdir(parents=True, exist_ok=True)
    mr = sitk.ReadImage(str(cases.DATA / "mr_t2.nrrd"))
    local, whole, points = cases.fair_truths(np.eye(4), mr)
    np.save(folder / "points.npy", points)
    return cases.Case("phantom", 999, str(cases.DATA / "ct.nrrd"), str(cases.DATA / "mr_t2.nrrd"), local.tolist(),
                      str(folder / "points.npy"), {"what": "unperturbed full-resolution phantom pair"},
                      alternatives=[whole.tolist()], tolerance_mm=cases.FAIR_TOLERANCE_MM).to_json()


def _upsampled_ct_case() -> dict:
    """The phantom CT with 2x the slices (linear interpolation), same physical extent, same MR."""
    import SimpleITK as sitk

    folder = cases.CACHE / "phantom_ct_2x"
    path = folder / "ct_2x_slices.mha"
    base = _phantom_full_case()
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        ct = sitk.ReadImage(base["fixed"])
        size = list(ct.GetSize())
        spacing = list(ct.GetSpacing())
        new_size = [size[0], size[1], 2 * size[2]]
        new_spacing = [spacing[0], spacing[1], spacing[2] * size[2] / new_size[2]]
        direction = np.asarray(ct.GetDirection()).reshape(3, 3)
        first = np.asarray(ct.GetOrigin()) + direction @ np.array([0, 0, (new_spacing[2] - spacing[2]) / 2.0])
        ref = sitk.Image(new_size, ct.GetPixelID())
        ref.SetSpacing(new_spacing)
        ref.SetDirection(ct.GetDirection())
        ref.SetOrigin(first.tolist())
        sitk.WriteImage(sitk.Resample(ct, ref, sitk.Transform(), sitk.sitkLinear, -2048.0), str(path), False)
    return {**base, "fixed": str(path), "index": 998, "info": {"what": "CT with 2x slices"}}


def run_targets(repeats: int, seed: int, timeout_s: float, log, with_elastix: bool = True) -> tuple[list[dict], str]:
    rows = []
    full = _phantom_full_case()
    runs = [("full pipeline, phantom pair (register_files: read, register rigid+affine, write)", "ours-files", full)]
    if with_elastix:
        runs.append(("elastix default rigid, full resolution, from the same pre-alignment",
                     "elastix-default-from-prealign", full))
    runs.append(("full pipeline, phantom CT with 2x slices", "ours-files", _upsampled_ct_case()))
    micro = cases.microct_case(0, seed)
    runs.append(("microCT-like 400^3 @ 0.1 mm vs MR 0.5x0.5x3 mm (run_pipeline)", "ours-auto", micro.to_json()))
    for label, method, case in runs:
        scored = cases.Case.from_json(case)
        for r in range(repeats):
            result = memory.run_isolated(method, case, seed, None, timeout_s)
            error = (cases.score(scored, result["matrix"])[0] if result.get("matrix") is not None else math.inf)
            row = {"target": label, "method": method, "repeat": r,
                   "error_mm": round(error, 3) if math.isfinite(error) else None,
                   "seconds": result.get("seconds"), "cpu_seconds": result.get("cpu_seconds"),
                   "peak_rss_mb": result.get("peak_rss_mb"), "failure": result.get("error"), "info": result.get("info"),
                   "matrix": result.get("matrix"), "load_average": os.getloadavg()[0]}
            rows.append(row)
            log(f"target {label[:60]:60s} error {error:7.2f} mm {_fmt(row['seconds'], 1):>6s} s RSS "
                f"{_fmt(row['peak_rss_mb'], 0)} MB load {row['load_average']:.1f}"
                + (f" FAILED: {row['failure']}" if row["failure"] else ""))
    return rows, targets_table(rows)


def _min_median(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return min(values), float(np.median(values))


def targets_table(rows: list[dict]) -> str:
    lines = ["**Speed and memory targets (issue 8)**", "",
             "| run | repeats | error vs truth (phantom: fair rule, mm) | wall time min / median (s) | "
             "CPU time min (s) | peak RSS (MB, max) | load average | notes |", "|---|---|---|---|---|---|---|---|"]
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        by_label.setdefault(r["target"], []).append(r)
    for label, sel in by_label.items():
        t_min, t_med = _min_median([r["seconds"] for r in sel])
        errors = [r["error_mm"] for r in sel if r["error_mm"] is not None]
        rss = [r["peak_rss_mb"] for r in sel if r["peak_rss_mb"] is not None]
        cpu_min, _ = _min_median([r.get("cpu_seconds") for r in sel])
        load = [r["load_average"] for r in sel]
        notes = sorted({r["failure"][:60] for r in sel if r["failure"]})
        info = sel[0].get("info") or {}
        if "timings_s" in info:
            notes.append("stages " + ", ".join(f"{k} {v:.1f}" for k, v in info["timings_s"].items()
                                               if k in ("load", "prealign", "crop", "register", "metrics", "write")))
        if "prealign_seconds" in info:
            notes.append(f"pre-alignment ({info.get('prealign')}) {info['prealign_seconds']} s not counted")
        lines.append(f"| {label} | {len(sel)} | {_fmt(float(np.median(errors)) if errors else None)} | "
                     f"{_fmt(t_min, 1)} / {_fmt(t_med, 1)} | {_fmt(cpu_min, 1)} | "
                     f"{_fmt(max(rss) if rss else None, 0)} | {min(load):.1f}-{max(load):.1f} | {'; '.join(notes)} |")
    lines += speedup_lines(rows)
    return "\n".join(lines)


def speedup_lines(rows: list[dict]) -> list[str]:
    """Our pipeline vs elastix's default rigid from the same pre-alignment: whole run and registration part."""
    ours = [r for r in rows if r["method"] == "ours-files" and "phantom pair" in r["target"] and r["seconds"]]
    peer = [r["seconds"] for r in rows if r["method"] == "elastix-default-from-prealign" and r["seconds"]]
    if not ours or not peer:
        return []
    peer_median = float(np.median(peer))
    whole = float(np.median([r["seconds"] for r in ours]))
    stage = [(r.get("info") or {}).get("timings_s", {}) for r in ours]
    part = [t["crop"] + t["register"] for t in stage if "crop" in t and "register" in t]
    out = ["", f"Speed-up vs elastix's default rigid ({peer_median:.1f} s, median): whole pipeline (read, search, "
               f"crop, register, QA, write) {whole:.1f} s = {peer_median / whole:.1f}x"]
    if part:
        part_median = float(np.median(part))
        out[-1] += (f"; the same work as elastix's run (crop + register from the same pre-alignment) "
                    f"{part_median:.1f} s = {peer_median / part_median:.1f}x")
    return out


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 case per family, fewer methods, no targets")
    parser.add_argument("--family", default="all", choices=("all", *cases.FAMILIES, "targets"),
                        help="all = " + ", ".join(f for f, spec in cases.FAMILIES.items() if spec.in_all)
                        + " and the targets")
    parser.add_argument("--cases", type=int, default=6, help="cases per family (default 6)")
    parser.add_argument("--first-case", type=int, default=0, help="index of the first case (to extend a run)")
    parser.add_argument("--methods", default=None, help="comma separated methods (default: the family's list)")
    parser.add_argument("--limit", default="", help="run some methods on the first k cases only, e.g. "
                        "brainsfit-default-2mm=10,ours-auto=20 (case index < k)")
    parser.add_argument("--options", type=json.loads, default=None, metavar="JSON",
                        help="PipelineOptions fields for our pipeline methods, e.g. "
                        "'{\"max_working_voxels\": 3000000}'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="repeats of each target run (default 2)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a run counts as failed")
    parser.add_argument("--peer-python", default=None,
                        help=f"Python with antspyx / picsl-greedy (default ${PEER_PYTHON_ENV}, else this Python)")
    parser.add_argument("--rescore", type=Path, nargs="+", default=None, metavar="ROWS.json",
                        help="only print the tables of earlier rows, errors recomputed against the current cases")
    args = parser.parse_args(argv)
    args.limits = {}
    for item in filter(None, (x.strip() for x in args.limit.split(","))):
        name, _, value = item.partition("=")
        if not value.isdigit():
            parser.error(f"bad --limit item '{item}'; use method=count")
        args.limits[name] = int(value)
    return args


def print_rescored(paths: list[Path]) -> int:
    rows = [r for path in paths for r in json.loads(path.read_text()) if r.get("family") in cases.FAMILIES]
    rescore(rows)
    for family in dict.fromkeys(r["family"] for r in rows):
        sel = [r for r in rows if r["family"] == family]
        print(family_tables(family, sel, list(dict.fromkeys(r["method"] for r in sel))) + "\n")
    return 0


def chosen_families(args, log) -> list[str]:
    if args.family != "all":
        families = [args.family]
    else:
        families = [f for f, spec in cases.FAMILIES.items() if spec.in_all] + ([] if args.quick else ["targets"])
    for family in [f for f in families if f in cases.FAMILIES and not cases.FAMILIES[f].available()]:
        log(f"data of the {family} family not found: skipping it")
        families.remove(family)
    if "targets" in families and not cases.phantom_available():
        log("phantom data or reference transform not found: skipping the targets")
        families.remove("targets")
    return families


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rescore:
        return print_rescored(args.rescore)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    families = chosen_families(args, log)
    python = peer_python(args.peer_python)
    installed = {m: peer_python_has(python, module) for m, module in PEER_MODULES.items()}
    n = 1 if args.quick else args.cases
    extra = {"options": args.options} if args.options else None
    started = datetime.datetime.now(datetime.timezone.utc)
    header = [f"Benchmark run {started.strftime('%Y-%m-%d %H:%M UTC')}; {machine_line()}; "
              f"{n} case(s) per family; ANTs {'installed' if installed['ants'] else 'not installed'}, "
              f"greedy {'installed' if installed['greedy'] else 'not installed'} ({python})", ""]
    all_rows, tables = [], []
    for family in families:
        if family == "targets":
            rows, table = run_targets(args.repeats, args.seed, args.timeout, log)
        else:
            spec = cases.FAMILIES[family]
            methods = ([m.strip() for m in args.methods.split(",")] if args.methods
                       else list(spec.quick_methods if args.quick else spec.methods))
            runnable = [m for m in methods if m not in memory.EXTERNAL or installed[m]]
            rows = run_family(family, n, runnable, args.seed, python, args.timeout, log, args.first_case,
                              args.limits, extra)
            rows += [{"family": family, "method": m, "failure": "not installed", "case": None, "error_mm": None,
                      "success": False, "seconds": None, "peak_rss_mb": None} for m in methods if m not in runnable]
            table = family_tables(family, rows, methods)
        all_rows += rows
        tables.append(table)
        print(table + "\n", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%S")
    (RESULTS / f"run_{stamp}.json").write_text(json.dumps(all_rows, indent=1, default=str))
    (RESULTS / f"run_{stamp}.md").write_text("\n".join(header) + "\n" + "\n\n".join(tables) + "\n")
    print("\n".join(header))
    print(f"results: {RESULTS / f'run_{stamp}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
