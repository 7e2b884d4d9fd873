"""The verdict, measured: does PASS / WARN / FAIL keep its promise on results whose correctness is known?

The promise (docs/qa.md): a wrong result never PASSes (targets: wrong results FAIL in >= 98%, none PASS) and a
correct result is not lost (correct results PASS or WARN in >= 95%). Cases: the families ``synthetic``,
``phantom``, ``phantom-fair`` and ``microct`` of ``benchmarks/cases.py`` and the ``bad-geometry`` family of
``benchmarks/bad_geometry.py``. Two sources of judged results:

* ``run``: ``multimodal-prealign register`` with default options (``--no-report``) in its own process, as a user
  runs it; its exit code, verdict and transform.h5. Bad input is refused with exit code 2 (expected for some
  bad-geometry kinds), a failed stage exits with 3: both leave no result and are counted apart.
* ``judged``: transforms of known correctness judged by the code of ``--report-only`` (``qa.measure.evaluate``
  on the pipeline's 2 mm copies, ``qa.verdict.judge`` with the inputs' geometry; the pre-alignment is the
  headers' placement): the truth and the truth 1.5 mm off (correct by construction); the truth turned 180
  degrees about the A-P and the S-I axis through the object and the truth 15 mm off (wrong by construction);
  for the mirrored-header cases the best rigid pose (the truth followed by a left-right mirror); and every 4x4
  result of earlier ``benchmarks/run.py`` runs (``results/run_*.json``: our methods and the peers) on the same
  cases, scored again against the current truth.

Labels: ``correct``: error <= the case's tolerance (``case.tolerance_mm``: 2.5 mm, the phantom families' fair
rule 3.5 mm); ``wrong``: error > 10 mm, or turned more than 90 degrees from the truth (a flip), or mirrored
against it, or no correct answer exists (bad-geometry kinds whose header is wrong, noise); ``imprecise``: in
between, not counted. Error: ``cases.score`` (mean distance over object points inside both fields of view).

    python benchmarks/verdict_study.py --cases 4 --counts microct=2,bad-geometry=9   # runs and judged
    python benchmarks/verdict_study.py --families synthetic,microct --cases 2 --no-runs
    python benchmarks/verdict_study.py --rescore results/verdict_study_<time>.json   # tables again (or of several
                                                                                    # .json / .partial.jsonl files)

Writes ``results/verdict_study_<UTC time>.json`` (every row) and ``.md`` (the tables). Run it niced; a run of
our pipeline takes 10-60 s per case, a judged transform 1-4 s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bad_geometry  # noqa: E402
import cases  # noqa: E402

RESULTS = HERE / "results"
FAMILIES = ("synthetic", "phantom", "phantom-fair", "microct", "bad-geometry")
WRONG_MM = 10.0
TARGET_WRONG_FAIL = 0.98
TARGET_CORRECT_KEPT = 0.95


# ------------------------------------------------------------------------------------------------ cases, labels
def family_cases(family: str, count: int, seed: int = 0) -> list:
    if family == "bad-geometry":
        return bad_geometry.make_cases(count, seed)
    spec = cases.FAMILIES.get(family)
    if spec is None or not spec.available():
        return []
    return [spec.make(i, seed) for i in range(count)]


def _rotation_part(matrix: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(np.asarray(matrix, float)[:3, :3])
    return u @ vt


def angle_between_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle (degrees) of the rotation taking the linear part of ``a`` to that of ``b`` (polar parts)."""
    r = _rotation_part(a).T @ _rotation_part(b)
    return math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(r) - 1.0) / 2.0))))


def label(case, matrix: np.ndarray | None) -> tuple[str, float | None]:
    """("correct" | "wrong" | "imprecise", error mm or None) of a 4x4 fixed->moving result on ``case``."""
    if matrix is None:
        return "none", None
    wrong_geometry = bool(case.info.get("wrong_geometry"))
    if case.truth is None:
        return "wrong", None
    points = np.load(case.points)
    truths = [np.asarray(t, float) for t in [case.truth, *getattr(case, "alternatives", [])]]
    errors = [cases.mean_error_mm(np.asarray(matrix, float), t, points) for t in truths]
    error = min(errors)
    nearest = truths[int(np.argmin(errors))]
    if wrong_geometry:
        return "wrong", round(error, 3)
    mirrored = np.sign(np.linalg.det(np.asarray(matrix, float)[:3, :3])) != np.sign(np.linalg.det(nearest[:3, :3]))
    if error > WRONG_MM or mirrored or angle_between_deg(matrix, nearest) > 90.0:
        return "wrong", round(error, 3)
    if error <= getattr(case, "tolerance_mm", cases.SUCCESS_MM):
        return "correct", round(error, 3)
    return "imprecise", round(error, 3)


# ------------------------------------------------------------------------------------------------ runs
def run_case(case, timeout_s: float) -> dict:
    """``multimodal-prealign register`` on the case's files in its own process: exit code, verdict, result."""
    from MultimodalPrealignLib.geometry import transforms

    with tempfile.TemporaryDirectory(prefix="verdict_study_") as scratch:
        out = Path(scratch) / "out"
        command = [sys.executable, "-m", "MultimodalPrealignLib", "register", "--fixed", case.fixed, "--moving",
                   case.moving, "--out", str(out), "--no-report", "--quiet"]
        env = {**os.environ, "PYTHONPATH": str(cases.REPO / "MultimodalPrealign")}
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
            code, stderr = done.returncode, done.stderr.strip()
        except subprocess.TimeoutExpired:
            code, stderr = None, f"timeout after {timeout_s:.0f} s"
        seconds = round(time.perf_counter() - started, 1)
        row = {"source": "run", "what": "multimodal-prealign register", "exit_code": code, "seconds": seconds,
               "stderr": stderr.splitlines()[-1][:300] if stderr else ""}
        if (out / "report.json").exists():
            report = json.loads((out / "report.json").read_text())
            matrix = transforms.to_matrix(transforms.read_transform(out / "transform.h5"))
            row.update({"verdict": report.get("verdict"), "reasons": (report.get("verdict_reasons") or [])[:3],
                        "matrix": matrix.tolist(), "measures": measures(report.get("metrics") or {}),
                        "attempts": len(((report.get("fallback") or {}).get("attempts")) or []) or 1})
    return row


# ------------------------------------------------------------------------------------------------ judged
def _turned(truth: np.ndarray, centre: np.ndarray, axis: int) -> np.ndarray:
    about = np.diag([-1.0, -1.0, -1.0, 1.0])  # 180 degrees about ``axis`` through ``centre``
    about[axis, axis] = 1.0
    about[:3, 3] = centre - about[:3, :3] @ centre
    return truth @ about


def constructed(case) -> list[tuple[str, np.ndarray]]:
    """(name, 4x4) transforms of known correctness around the case's truth (fixed physical points first)."""
    if case.truth is None:
        return []
    truth = np.asarray(case.truth, float)
    points = np.load(case.points)
    centre = points.mean(0)
    rng = np.random.default_rng(case.index)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    scale = float(np.median(np.ptp(points, axis=0))) / 200.0 if case.family == "microct" else 1.0

    def shifted(mm: float) -> np.ndarray:
        move = np.eye(4)
        move[:3, 3] = direction * mm * scale
        return truth @ move

    if case.family == "bad-geometry":
        if case.info["kind"].startswith("mirror"):
            mirror = np.diag([-1.0, 1.0, 1.0, 1.0])
            mirror[0, 3] = 2.0 * centre[0]
            return [("best rigid pose of the mirrored image (truth, then mirrored left-right)", truth @ mirror)]
        return []
    out = [("truth", truth), (f"truth {1.5 * scale:.2g} mm off", shifted(1.5)),
           ("truth turned 180 degrees about A-P", _turned(truth, centre, 1)),
           ("truth turned 180 degrees about S-I", _turned(truth, centre, 2))]
    if scale == 1.0:
        out.append(("truth 15 mm off", shifted(15.0)))
    else:  # the microCT object is ~40 mm: 15 mm is a third of it, and the shift probes move 6 mm x object scale
        out.append(("truth 15 mm off", shifted(15.0 / scale)))
    return out


def earlier_results(family: str, count: int) -> list[tuple[int, str, np.ndarray]]:
    """(case index, method, 4x4) from ``results/run_*.json`` for the family's first ``count`` cases (seed 0).

    Phantom families: only runs scored with the current rule (rows with ``tolerance_mm``)."""
    found, seen = [], set()
    for path in sorted(RESULTS.glob("run_*.json")):
        try:
            rows = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for row in rows if isinstance(rows, list) else []:
            if row.get("family") != family or row.get("seed", 0) != 0 or not row.get("matrix"):
                continue
            if family.startswith("phantom") and "tolerance_mm" not in row:
                continue
            index = int(row.get("index", -1))
            key = (index, row.get("method"), json.dumps(np.round(np.asarray(row["matrix"]), 3).tolist()))
            if 0 <= index < count and key not in seen:
                seen.add(key)
                found.append((index, str(row.get("method")), np.asarray(row["matrix"], float)))
    return found


class Judge:
    """Judges transforms on one case as ``--report-only`` does, on the pipeline's QA copies (made once)."""

    def __init__(self, case):
        from MultimodalPrealignLib.geometry import image_space, resample
        from MultimodalPrealignLib.io import image_io

        self.fixed = image_io.load_image(case.fixed, "fixed image")
        self.moving = image_io.load_image(case.moving, "moving image")
        self.fixed_qa = resample.coarse_copy(image_io.as_float32(self.fixed), 2.0)
        self.moving_qa = resample.coarse_copy(image_io.as_float32(self.moving), 2.0)
        self.inputs = {"fixed": image_space.describe_image(self.fixed),
                       "moving": image_space.describe_image(self.moving)}

    def __call__(self, matrix: np.ndarray) -> dict:
        from MultimodalPrealignLib.geometry import transforms
        from MultimodalPrealignLib.qa import measure, verdict

        started = time.perf_counter()
        after = transforms.affine_from_matrix(np.asarray(matrix, float))
        metrics = measure.evaluate(self.fixed_qa, self.moving_qa, transforms.identity(), after, working_spacing_mm=2.0)
        result, reasons = verdict.judge({"inputs": self.inputs, "metrics": metrics})
        return {"verdict": result, "reasons": reasons[:3], "seconds": round(time.perf_counter() - started, 1),
                "measures": measures(metrics)}


def measures(metrics: dict) -> dict:
    """The numbers the verdict's checks compare with their thresholds (for the study's distributions)."""
    probes, after = metrics.get("probes") or {}, metrics.get("after") or {}
    wide = probes.get("wide") or {}
    out = {"nmi_above_chance": round(after["nmi"] - after["nmi_chance"], 5) if "nmi_chance" in after else None,
           "overlap": max(after.get("overlap_fraction_fixed", 0.0), after.get("overlap_fraction_moving", 0.0))}
    for key, block in (("shift", probes), ("turn", probes), ("mirror", probes), ("slide", wide),
                       ("refined_turn", wide), ("refined_result", wide)):
        best = block.get(f"best_{key}") or block.get(key) or {}
        out[key] = best.get("relative_gain")
    out["structure"] = [info.get("structure") for info in (metrics.get("content") or {}).values()]
    return out


# ------------------------------------------------------------------------------------------------ tables
def _share(part: int, whole: int) -> str:
    return f"{part}/{whole} = {100.0 * part / whole:.1f}%" if whole else "-"


def tables(rows: list[dict]) -> str:
    """Markdown: counts per family and source, then the two targets."""
    lines = ["| family | source | results | correct: PASS / WARN / FAIL | wrong: PASS / WARN / FAIL | imprecise | "
             "refused (exit 2) | stage failed (exit 3) |", "|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["family"], row["source"]), []).append(row)

    def count(items, lab, verdict=None):
        return sum(1 for r in items if r.get("label") == lab and (verdict is None or r.get("verdict") == verdict))

    for (family, source), items in sorted(groups.items()):
        results = [r for r in items if r.get("verdict")]
        lines.append(
            f"| {family} | {source} | {len(results)} | "
            f"{count(results, 'correct', 'PASS')} / {count(results, 'correct', 'WARN')} / "
            f"{count(results, 'correct', 'FAIL')} | {count(results, 'wrong', 'PASS')} / "
            f"{count(results, 'wrong', 'WARN')} / {count(results, 'wrong', 'FAIL')} | "
            f"{count(results, 'imprecise')} | {sum(1 for r in items if r.get('exit_code') == 2)} | "
            f"{sum(1 for r in items if r.get('exit_code') == 3)} |")
    judged = [r for r in rows if r.get("verdict")]
    wrong = [r for r in judged if r["label"] == "wrong"]
    correct = [r for r in judged if r["label"] == "correct"]
    wrong_fail = sum(1 for r in wrong if r["verdict"] == "FAIL")
    wrong_pass = sum(1 for r in wrong if r["verdict"] == "PASS")
    kept = sum(1 for r in correct if r["verdict"] in ("PASS", "WARN"))
    refusals = [r for r in rows if r.get("expected") == "refused"]
    lines += ["", f"- wrong results that FAIL: {_share(wrong_fail, len(wrong))} (target >= {TARGET_WRONG_FAIL:.0%}); "
                  f"wrong results that PASS: {wrong_pass} (target 0)",
              f"- correct results that PASS or WARN: {_share(kept, len(correct))} (target >= "
              f"{TARGET_CORRECT_KEPT:.0%})",
              f"- bad input refused as expected (exit 2, one line): "
              f"{_share(sum(1 for r in refusals if r.get('exit_code') == 2), len(refusals))}"]
    misses = [r for r in wrong if r["verdict"] != "FAIL"] + [r for r in correct if r["verdict"] == "FAIL"]
    if misses:
        lines += ["", "Misses:", ""]
        lines += [f"- {r['case']} {r['source']} ({r['what']}): {r['label']}, error {r.get('error_mm')} mm, verdict "
                  f"{r['verdict']}: {(r.get('reasons') or [''])[0][:220]}" for r in misses]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
class _Rows(list):
    """A list of rows that also appends each new row to a JSON-lines file."""

    def __init__(self, path: Path | None):
        super().__init__()
        self.path = path

    def append(self, row: dict) -> None:
        super().append(row)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")


def study(families: list[str], counts: dict, runs: bool, judged: bool, timeout_s: float, log,
          partial: Path | None = None) -> list[dict]:
    """Every row of the study (``counts``: cases per family; ``partial``: each row is also appended there as one
    JSON line as soon as it exists, so an interrupted study keeps what it measured)."""
    rows = _Rows(partial)
    for family in families:
        count = counts[family]
        items = family_cases(family, count)
        if not items:
            print(f"{family}: no cases (data missing?)", file=log)
            continue
        earlier = earlier_results(family, count) if judged and family != "bad-geometry" else []
        for case in items:
            base = {"family": family, "case": case.name, "kind": case.info.get("kind"),
                    "expected": case.info.get("expected")}
            if runs:
                row = {**base, **run_case(case, timeout_s)}
                row["label"], row["error_mm"] = label(case, np.asarray(row["matrix"]) if "matrix" in row else None)
                row.pop("matrix", None)
                rows.append(row)
                print(f"{case.name} run: exit {row['exit_code']} verdict {row.get('verdict')} {row['label']} "
                      f"error {row['error_mm']} ({row['seconds']} s) {row['stderr'][:120]}", file=log, flush=True)
            if not judged or case.info.get("expected") == "refused":
                continue
            candidates = constructed(case) + [(f"earlier run: {method}", matrix)
                                              for index, method, matrix in earlier if index == case.index]
            if not candidates:
                continue
            judge = Judge(case)
            for what, matrix in candidates:
                row = {**base, "source": "judged", "what": what, **judge(matrix)}
                row["label"], row["error_mm"] = label(case, matrix)
                rows.append(row)
                print(f"{case.name} judged {what}: {row['verdict']} {row['label']} error {row['error_mm']}",
                      file=log, flush=True)
    return rows


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--cases", type=int, default=4, help="cases per family (bad-geometry: 9 kinds per base pair)")
    parser.add_argument("--counts", default="", help="cases of some families, e.g. microct=2,bad-geometry=9")
    parser.add_argument("--no-runs", action="store_true", help="judged transforms only (no registration)")
    parser.add_argument("--no-judged", action="store_true", help="runs only")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--rescore", default=None,
                        help="print the tables of earlier studies (comma-separated .json or .partial.jsonl files)")
    args = parser.parse_args(argv)
    if args.rescore:
        rows = []
        for path in args.rescore.split(","):
            text = Path(path).read_text()
            rows += json.loads(text)["rows"] if path.endswith(".json") else [json.loads(line) for line in
                                                                                text.splitlines() if line.strip()]
        print(tables(rows))
        return 0
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    started = datetime.datetime.now(datetime.timezone.utc)
    stamp = started.strftime("%Y%m%dT%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    counts = {family: args.cases for family in families}
    counts.update({k.strip(): int(v) for k, v in (item.split("=") for item in args.counts.split(",") if item.strip())})
    rows = list(study(families, counts, not args.no_runs, not args.no_judged, args.timeout, sys.stderr,
                      RESULTS / f"verdict_study_{stamp}.partial.jsonl"))
    text = tables(rows)
    header = (f"Verdict study {started:%Y-%m-%d %H:%M} UTC; cases per family: "
              f"{', '.join(f'{f} {counts[f]}' for f in families)}; {os.cpu_count()} cores, load average at start "
              f"{os.getloadavg()[0]:.1f}")
    (RESULTS / f"verdict_study_{stamp}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    (RESULTS / f"verdict_study_{stamp}.md").write_text(header + "\n\n" + text + "\n")
    print(header + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
