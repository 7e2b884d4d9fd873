"""Register a pair headlessly inside 3D Slicer with the Multimodal Prealign module.

    Slicer --no-splash --no-main-window --python-script register_pair.py -- \
        --fixed ct.nrrd --moving mr.nrrd --out result_folder [--engine itk|elastix|brainsfit]

Writes into ``--out``, all at once at the end (a staging folder beside it is moved into place, so a failed or
interrupted run leaves ``--out`` as it was): ``transform.h5`` (fixed->moving, ITK/LPS: load it in Slicer and put
the moving volume under it), ``moving_resampled.nrrd``, ``report.json`` (same content as the CLI's, with the
code that reproduces the run), ``report.html`` and ``pictures/``.
Exit codes (as ``multimodal-prealign register``): 0 verdict PASS or WARN, 4 verdict FAIL, 2 bad input (the
message says the fix), 3 registration failed, 130 interrupted, 1 unexpected.
Slicer does not exit by itself after a script: this one always ends with ``sys.exit``.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

EXIT_OK, EXIT_UNEXPECTED, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_VERDICT_FAIL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
ENGINES = ["itk", "elastix", "brainsfit"]  # the command line's --engine names


def parse_args(argv):
    if "--" in argv:
        argv = argv[argv.index("--") + 1:]
    parser = argparse.ArgumentParser(prog="register_pair.py", description=__doc__.splitlines()[0])
    parser.add_argument("--fixed", required=True, help="fixed volume file (e.g. CT)")
    parser.add_argument("--moving", required=True, help="moving volume file (e.g. MR)")
    parser.add_argument("--out", required=True, help="output folder (created; must not hold other files)")
    parser.add_argument("--engine", default="brainsfit", choices=ENGINES)
    parser.add_argument("--prealign", default="auto")
    parser.add_argument("--stages", default="rigid,affine", help="comma separated: rigid,affine,bspline")
    parser.add_argument("--sampling-percentage", type=float, default=None)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--crop-margin", type=float, default=20.0, help="mm")
    parser.add_argument("--spacing-scale", type=float, default=1.0)
    parser.add_argument("--no-fallback", action="store_true", help="no retry on a FAIL verdict")
    parser.add_argument("--keep-temporary-files", action="store_true",
                        help="keep the run's working folder (engine inputs, parameter files, logs)")
    return parser.parse_args(argv)


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def module_logic(slicer):
    """The module's logic, or None when the module is not loaded (``getModuleLogic`` raises then)."""
    try:
        return slicer.util.getModuleLogic("MultimodalPrealign")
    except RuntimeError:
        return None


def run(args):
    import slicer

    logic = module_logic(slicer)
    if logic is None:
        print("ERROR: the Multimodal Prealign module is not loaded. Fix: install the extension, or start Slicer "
              "with --additional-module-paths <repo>/MultimodalPrealign.", file=sys.stderr)
        return EXIT_BAD_INPUT
    from MultimodalPrealignLib import pipeline
    from MultimodalPrealignLib.errors import InputError, PrealignError
    from MultimodalPrealignLib.geometry import transforms

    out = Path(os.path.abspath(args.out))
    try:
        pipeline.check_output_dir(out)
        for path, what in ((args.fixed, "fixed"), (args.moving, "moving")):
            if not os.path.exists(path):
                raise InputError(f"The {what} file '{path}' does not exist", "check the path")
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.part-", dir=out.parent))
    except PrealignError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return err.exit_code
    try:
        fixed = slicer.util.loadVolume(args.fixed)
        moving = slicer.util.loadVolume(args.moving)
        result = logic.run(
            fixed, moving, engine=args.engine, prealign=args.prealign,
            stages=[s.strip() for s in args.stages.split(",") if s.strip()],
            samplingPercentage=args.sampling_percentage, iterations=args.iterations,
            cropMarginMm=args.crop_margin, spacingScale=args.spacing_scale, fallback=not args.no_fallback,
            keepTemporaryFiles=args.keep_temporary_files,
            outputVolumeNode=slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "moving resampled"),
            reportDirectory=str(staging),
            progressCallback=lambda stage, fraction, message: print(f"[{fraction * 100:3.0f}%] {stage}: {message}",
                                                                    flush=True))
        transforms.write_transform(result.transform, str(staging / "transform.h5"))
        slicer.util.saveNode(result.outputVolumeNode, str(staging / "moving_resampled.nrrd"))
        report = dict(result.report)
        report["outputs"] = {"transform": "transform.h5", "moving_resampled": "moving_resampled.nrrd",
                             "report": "report.json", "report_html": "report.html", "pictures": "pictures/"}
        (staging / "report.json").write_text(json.dumps(report, indent=2, default=_json_default), encoding="utf-8")
        pipeline.move_into_place(staging, out)
    except PrealignError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return err.exit_code
    except ValueError as err:  # Slicer-side bad input
        print(f"ERROR: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("Interrupted: nothing was written.", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for warning in result.warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    if result.temporaryDirectory:
        print(f"Temporary files kept in {result.temporaryDirectory}")
    print(f"Done: {out} (verdict {result.verdict})")
    return EXIT_VERDICT_FAIL if result.verdict == "FAIL" else EXIT_OK


def main():
    try:
        code = run(parse_args(sys.argv[1:]))
    except SystemExit as err:  # argparse errors
        code = err.code if isinstance(err.code, int) else EXIT_BAD_INPUT
    except Exception:
        traceback.print_exc()
        code = EXIT_UNEXPECTED
    sys.exit(code)


if __name__ == "__main__":
    main()
