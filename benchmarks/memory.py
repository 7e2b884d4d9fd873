"""Run one (method, case) in its own process and measure wall time and peak memory (RSS).

``run_isolated`` starts ``python benchmarks/memory.py --worker REQUEST.json``; the worker loads the case, runs
the method, and writes the estimated transform (4x4 fixed->moving, LPS mm), its CPU time (user + system, case
loading included), the method's wall time (images already in memory; ``ours-files`` includes reading and
writing files) and ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the process's peak resident set, imports and
case loading included) to RESULT.json. ANTs / greedy run with the Python of their own environment
(``--peer-python`` / ``MMP_PEER_PYTHON``), so their pins never touch the project's venv.

Methods: ``OURS`` (``run_pipeline`` variants), ``PREALIGN_ONLY`` (one pre-alignment method alone, no
registration), ``ours-files`` (``register_files``, the speed targets) and the peers of ``peers.py``
(``<peer>-from-prealign``: the peer started from our pre-alignment, computed before its clock starts). A case
whose ``info`` has ``method_seed`` runs with that seed; ``extra["options"]`` changes PipelineOptions fields of
our pipeline methods.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "MultimodalPrealign"))
sys.path.insert(0, str(HERE))

#: Our pipeline variants: method name -> (pre-alignment, engine, use label maps).
OURS = {
    "ours-auto": ("auto", "itk", False),
    "ours-search": ("search", "itk", False),
    "ours-moments": ("moments", "itk", False),
    "ours-geometry": ("geometry", "itk", False),
    "ours-anatomy": ("anatomy", "itk", True),
    "ours-auto-elastix": ("auto", "elastix", False),
    "ours-auto-brainsfit": ("auto", "brainsfit", False),
}
#: One pre-alignment method alone (what the search and anatomy studies measured): method name -> prealign method.
PREALIGN_ONLY = {"ours-search-only": "search", "ours-anatomy-only": "anatomy"}
EXTERNAL = ("ants", "greedy")


def run_isolated(method: str, case: dict, seed: int = 0, python: str | None = None, timeout_s: float = 600.0,
                 extra: dict | None = None) -> dict:
    """Run ``method`` on ``case`` (a Case.to_json() dict) in a fresh process; returns the worker's JSON result."""
    python = python or sys.executable
    with tempfile.TemporaryDirectory(prefix="bench_worker_") as folder:
        request = Path(folder) / "request.json"
        result_path = Path(folder) / "result.json"
        request.write_text(json.dumps({"method": method, "case": case, "seed": seed, "result": str(result_path),
                                       "extra": extra or {}}))
        started = time.perf_counter()
        try:
            done = subprocess.run([python, str(Path(__file__).resolve()), "--worker", str(request)],
                                  capture_output=True, text=True, timeout=timeout_s,
                                  env={**os.environ, "PYTHONHASHSEED": "0"})
        except subprocess.TimeoutExpired:
            return {"method": method, "error": f"timeout after {timeout_s:.0f} s", "seconds": timeout_s,
                    "peak_rss_mb": None, "matrix": None}
        if result_path.exists():
            result = json.loads(result_path.read_text())
        else:
            tail = (done.stderr or "").strip().splitlines()[-3:]
            result = {"method": method, "error": "worker died: " + " | ".join(tail)[:300], "matrix": None,
                      "seconds": None, "peak_rss_mb": None}
        result["process_seconds"] = round(time.perf_counter() - started, 2)
        return result


# ------------------------------------------------------------------------------------------------ worker
def _peak_rss_mb() -> float:
    # KiB on Linux; a method that runs a program (the real BRAINSFit) counts that child's peak when it is larger
    return max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024.0


def _cpu_seconds() -> float:
    """CPU time of this process and of the programs it ran and waited for (the real BRAINSFit)."""
    return sum(usage.ru_utime + usage.ru_stime
               for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


def _read_labels(case: dict):
    """(fixed, moving) label maps of a case as UInt16, or an error when the case has none."""
    import SimpleITK as sitk

    if not case.get("fixed_labels"):
        raise RuntimeError("this case has no label maps")
    return (sitk.Cast(sitk.ReadImage(case["fixed_labels"]), sitk.sitkUInt16),
            sitk.Cast(sitk.ReadImage(case["moving_labels"]), sitk.sitkUInt16))


def _run_prealign_only(method: str, case: dict, seed: int, options: dict | None = None):
    """``search.prealign`` / ``anatomy.prealign`` alone on the images as read (no registration); ``options``: the
    pre-alignment options (``PipelineOptions.prealign_options``, e.g. {"anatomy": {"refine_labels": False}})."""
    import SimpleITK as sitk

    from MultimodalPrealignLib.geometry import transforms
    from MultimodalPrealignLib.prealign import PrealignInputs, anatomy, search

    fixed = sitk.ReadImage(case["fixed"])
    moving = sitk.ReadImage(case["moving"])
    started = time.perf_counter()
    if PREALIGN_ONLY[method] == "search":
        result = search.prealign(PrealignInputs(fixed=fixed, moving=moving, seed=seed, options=options or {}))
        info = {"timings_s": result.details["timings_s"], "chosen": result.details["chosen"]["source"],
                "score": result.details["chosen"]["score"], "warnings": result.warnings}
    else:
        fixed_labels, moving_labels = _read_labels(case)
        result = anatomy.prealign(PrealignInputs(fixed, moving, fixed_labels, moving_labels, case["fixed_task"],
                                                 case["moving_task"], seed=seed, options=options or {}))
        info = {"used": len(result.details["used"]), "rejected": len(result.details["rejected"]),
                "type": result.details["transform_type"], "warnings": result.warnings}
    return transforms.to_matrix(result.transform), time.perf_counter() - started, info


def _pipeline_info(result) -> dict:
    """Stage timings (s), the pre-alignment used, the engine's stages and the warnings of a pipeline run."""
    stages = [{k: stage.get(k) for k in ("stage", "seconds", "iterations", "guard", "skipped", "precheck")}
              for stage in result.engine.stages]
    return {"timings_s": result.report["timings_s"], "prealign": result.prealign.method, "stages": stages,
            "warnings": result.warnings}


def _run_ours(method: str, case: dict, seed: int, extra: dict):
    import SimpleITK as sitk

    from MultimodalPrealignLib import pipeline
    from MultimodalPrealignLib.geometry import transforms

    if method in PREALIGN_ONLY:
        return _run_prealign_only(method, case, seed, extra.get("options", {}).get("prealign_options"))
    if method == "ours-files":
        options = pipeline.PipelineOptions.create(seed=seed, **extra.get("options", {}))
        with tempfile.TemporaryDirectory(prefix="bench_out_") as out:
            started = time.perf_counter()
            result = pipeline.register_files(case["fixed"], case["moving"], Path(out) / "run", options)
            seconds = time.perf_counter() - started
        return transforms.to_matrix(result.transform), seconds, _pipeline_info(result)
    prealign_method, engine, labels = OURS[method]
    fixed = sitk.ReadImage(case["fixed"])
    moving = sitk.ReadImage(case["moving"])
    fixed_labels = moving_labels = None
    options = pipeline.PipelineOptions.create(prealign=prealign_method, engine=engine, seed=seed,
                                              **extra.get("options", {}))
    if engine == "brainsfit" and options.registration.brainsfit_path is None:  # the real BRAINSFit (peers.py)
        import peers

        options.registration.brainsfit_path = peers.real_brainsfit().path
    if labels:
        fixed_labels, moving_labels = _read_labels(case)
        options.fixed_labels_task, options.moving_labels_task = case["fixed_task"], case["moving_task"]
    started = time.perf_counter()
    result = pipeline.run_pipeline(fixed, moving, options, fixed_labels, moving_labels)
    seconds = time.perf_counter() - started
    return transforms.to_matrix(result.transform), seconds, _pipeline_info(result)


def _run_peer(method: str, case: dict, seed: int, extra: dict):
    import peers

    if method in EXTERNAL:
        started = time.perf_counter()
        matrix, info = peers.peer_runner(method)(case["fixed"], case["moving"], seed)
        return matrix, time.perf_counter() - started, info
    import SimpleITK as sitk

    fixed = sitk.ReadImage(case["fixed"])
    moving = sitk.ReadImage(case["moving"])
    initial = None
    info_extra = {}
    if method.endswith("-from-prealign"):
        # The same pre-alignment our pipeline starts from (search), computed before the clock starts.
        from MultimodalPrealignLib import prealign
        from MultimodalPrealignLib.geometry import transforms
        from MultimodalPrealignLib.io import image_io

        t = time.perf_counter()
        pre = prealign.run_prealign(extra.get("prealign", "auto"), prealign.PrealignInputs(
            fixed=image_io.as_float32(fixed), moving=image_io.as_float32(moving), seed=seed))
        initial = transforms.to_matrix(pre.transform)
        info_extra = {"prealign": pre.method, "prealign_seconds": round(time.perf_counter() - t, 2)}
        method = method[: -len("-from-prealign")]
    if method in peers.FILE_PEERS:  # the real BRAINSFit reads the case files itself (our Python)
        started = time.perf_counter()
        matrix, info = peers.peer_runner(method)(case["fixed"], case["moving"], seed, initial)
        return matrix, time.perf_counter() - started, {**info, **info_extra}
    started = time.perf_counter()
    matrix, info = peers.peer_runner(method)(fixed, moving, seed, initial)
    seconds = time.perf_counter() - started
    return matrix, seconds, {**info, **info_extra}


def worker(request_path: str) -> int:
    request = json.loads(Path(request_path).read_text())
    method, case = request["method"], request["case"]
    seed = (case.get("info") or {}).get("method_seed", request["seed"])
    out = {"method": method, "case": f"{case['family']}-{case['index']:03d}", "matrix": None, "error": None,
           "seconds": None, "info": {}}
    cpu_start = _cpu_seconds()
    try:
        if method.startswith("ours"):
            matrix, seconds, info = _run_ours(method, case, seed, request.get("extra", {}))
        else:
            matrix, seconds, info = _run_peer(method, case, seed, request.get("extra", {}))
        out.update(matrix=np.asarray(matrix, float).tolist(), seconds=round(seconds, 3), info=info)
    except Exception as err:  # a method that throws failed the case; the message goes into the table's notes
        lines = str(err).strip().splitlines()
        out["error"] = (lines[-1] if lines else repr(err))[:300]
    out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    # CPU time of the whole call (case loading included): on a loaded machine a fairer speed figure than wall time.
    out["cpu_seconds"] = round(_cpu_seconds() - cpu_start, 2)
    Path(request["result"]).write_text(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2]))
    print("usage: python benchmarks/memory.py --worker REQUEST.json (started by benchmarks/run.py)", file=sys.stderr)
    sys.exit(2)
