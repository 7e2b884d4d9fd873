"""Register a cohort headlessly inside 3D Slicer with the Multimodal Prealign module.

    Slicer --no-splash --no-main-window --python-script docs/examples/register_cohort.py -- MANIFEST.csv OUT \
        [--engine brainsfit|elastix|itk] [--resume] [--skip-bad-rows] [--prealign M] [--stages rigid,affine] ...

The same manifest as ``multimodal-prealign batch`` (docs/batch.md), read by the same code
(``MultimodalPrealignLib.batch``), which also writes each pair's folder ``OUT/<id>/`` atomically (the pair's
outputs, then ``batch_record.json``), skips finished pairs with ``--resume`` and writes ``OUT/summary.csv``,
``summary.json`` and ``summary.html``. Only the registration of one pair differs: it goes through the module's
logic (``MultimodalPrealignLogic.run``), so this Slicer's CropVolume and BRAINSFit / SlicerElastix do the work.
Pairs run one after another in this Slicer (no Dask); the scene is cleared after each pair.

Per pair, ``OUT/<id>/`` holds ``transform.h5`` (fixed->moving, ITK/LPS), ``moving_resampled.nrrd``,
``report.json``, ``report.html`` and ``pictures/`` (without ``--no-report``: report.json only), and
``batch_record.json``. Label maps: ``fixed_labels`` / ``moving_labels`` as Slicer segmentations (.seg.nrrd);
``landmarks`` and the options the logic does not take (``max_working_voxels``, ``anatomy_*``, ``*_labels_task``)
are refused for the pair (use ``multimodal-prealign batch`` for those). The manifest's ``engine`` column
(itk / elastix) overrides ``--engine`` for its row.
Exit codes (as ``multimodal-prealign batch``): 0 every pair PASS or WARN, 4 some pair FAIL or errored, 2 bad
manifest or options (every bad row listed), 130 interrupted, 1 unexpected.
Slicer does not exit by itself after a script: this one always ends with ``sys.exit``.
"""

import argparse
import os
import sys
import traceback

EXIT_OK, EXIT_UNEXPECTED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
ENGINES = ["brainsfit", "elastix", "itk"]  # the module logic's engine names (the command line's)
PREALIGN_METHODS = ["auto", "search", "anatomy", "moments", "geometry", "header", "none"]


def parse_args(argv):
    """The script's arguments (after Slicer's ``--``); argparse exits with code 2 on a mistake."""
    if "--" in argv:
        argv = argv[argv.index("--") + 1:]
    parser = argparse.ArgumentParser(prog="register_cohort.py", description=__doc__.splitlines()[0])
    parser.add_argument("manifest", metavar="MANIFEST", help="CSV, one row per pair (docs/batch.md)")
    parser.add_argument("out", metavar="OUT", help="batch folder (new, empty, or an earlier batch's)")
    parser.add_argument("--engine", default="brainsfit", choices=ENGINES,
                        help="brainsfit (default, Slicer's BRAINSFit), elastix (SlicerElastix), itk (built in)")
    parser.add_argument("--resume", action="store_true", help="skip pairs finished with the same settings and inputs")
    parser.add_argument("--skip-bad-rows", action="store_true", help="run the good rows of a manifest with bad rows")
    parser.add_argument("--prealign", default="auto", choices=PREALIGN_METHODS)
    parser.add_argument("--stages", default="rigid,affine", help="comma separated: rigid,affine,bspline")
    parser.add_argument("--sampling-percentage", type=float, default=None)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crop-margin", type=float, default=20.0, help="mm")
    parser.add_argument("--spacing-scale", type=float, default=1.0)
    parser.add_argument("--no-isotropic", action="store_true")
    parser.add_argument("--no-fallback", action="store_true", help="no retry on a FAIL verdict")
    parser.add_argument("--no-report", action="store_true", help="report.json only (no pictures, no report.html)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def default_options(args):
    """The batch defaults (``PipelineOptions``) from the script's arguments; each row may override them."""
    from MultimodalPrealignLib.pipeline import PipelineOptions

    return PipelineOptions.create(
        prealign=args.prealign, stages=tuple(s.strip() for s in args.stages.split(",") if s.strip()),
        sampling_percentage=args.sampling_percentage, iterations=args.iterations, seed=args.seed,
        crop_margin_mm=args.crop_margin, spacing_scale=args.spacing_scale, isotropic=not args.no_isotropic,
        fallback=not args.no_fallback, no_report=args.no_report)


def unsupported_settings(job):
    """What the module's logic cannot take for this pair (names), compared with the core's defaults."""
    from MultimodalPrealignLib.pipeline import PipelineOptions

    default = PipelineOptions()
    options = job.options
    names = []
    if job.landmarks or job.moving_landmarks:
        names.append("landmarks")
    if options.max_working_voxels != default.max_working_voxels:
        names.append("max_working_voxels")
    if options.prealign_options:
        names.append("anatomy_transform / anatomy_refine")
    if options.fixed_labels_task or options.moving_labels_task:
        names.append("fixed_labels_task / moving_labels_task")
    return names


def load_volume(slicer, path, name):
    """A volume node from a file (Slicer's reader) or a DICOM series folder (the core's reader)."""
    if os.path.isdir(path):
        from MultimodalPrealignLib.io import image_io
        from MultimodalPrealignLib.slicer import mrml_bridge

        return mrml_bridge.add_volume_from_sitk(slicer.mrmlScene, image_io.load_image(path, f"{name} image"), name)
    return slicer.util.loadVolume(path, {"name": name, "show": False})


def load_segmentation(slicer, path, which):
    from MultimodalPrealignLib.errors import InputError

    if path is None:
        return None
    if not str(path).lower().endswith(".seg.nrrd"):
        raise InputError(f"The {which} label map '{path}' is not a Slicer segmentation (.seg.nrrd)",
                         "save it as .seg.nrrd in Slicer, or register this cohort with 'multimodal-prealign batch'")
    return slicer.util.loadSegmentation(path)


def slicer_pair_runner(slicer, logic, engine):
    """``runner(job, folder, progress) -> report``: one pair through the module's logic, outputs into ``folder``."""
    import json

    from MultimodalPrealignLib.errors import InputError
    from MultimodalPrealignLib.geometry import transforms
    from MultimodalPrealignLib.io import image_io
    from MultimodalPrealignLib.slicer import mrml_bridge

    def runner(job, folder, progress):
        unsupported = unsupported_settings(job)
        if unsupported:
            raise InputError(f"The Slicer module's logic does not take {', '.join(unsupported)}",
                             "drop those columns, or register this cohort with 'multimodal-prealign batch'")
        options = job.options
        try:
            fixed = load_volume(slicer, job.fixed, "fixed")
            moving = load_volume(slicer, job.moving, "moving")
            resampled = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{job.id} moving resampled")
            result = logic.run(
                fixed, moving, load_segmentation(slicer, job.fixed_labels, "fixed"),
                load_segmentation(slicer, job.moving_labels, "moving"), prealign=options.prealign,
                engine=options.registration.engine if "engine" in job.overrides else engine,
                stages=list(options.registration.stages), samplingPercentage=options.registration.sampling_percentage,
                iterations=options.registration.iterations, cropMarginMm=options.crop_margin_mm,
                spacingScale=options.spacing_scale, isotropic=options.isotropic, seed=options.registration.seed,
                fallback=options.fallback, outputVolumeNode=resampled, reportDirectory=str(folder),
                writeReport=not options.no_report, cancelRequested=progress.cancel_requested)
            os.makedirs(folder, exist_ok=True)
            transforms.write_transform(result.transform, os.path.join(folder, "transform.h5"))
            image_io.write_image(mrml_bridge.volume_node_to_sitk(resampled),
                                 os.path.join(folder, "moving_resampled.nrrd"))
            report = dict(result.report)
            report["outputs"] = {"transform": "transform.h5", "moving_resampled": "moving_resampled.nrrd",
                                 "report": "report.json"}
            if not options.no_report:
                report["outputs"].update({"report_html": "report.html", "pictures": "pictures/"})
            with open(os.path.join(folder, "report.json"), "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2, default=_json_default)
            return report
        finally:
            slicer.mrmlScene.Clear(0)  # hundreds of pairs: keep one pair in memory at a time

    return runner


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def module_logic(slicer):
    """The module's logic, or None when the module is not loaded."""
    try:
        return slicer.util.getModuleLogic("MultimodalPrealign")
    except (RuntimeError, AttributeError):
        return None


def run(args):
    """Run the cohort; returns the exit code."""
    import slicer

    logic = module_logic(slicer)
    if logic is None:
        print("ERROR: the Multimodal Prealign module is not loaded. Fix: install the extension, or start Slicer "
              "with --additional-module-paths <repo>/MultimodalPrealign.", file=sys.stderr)
        return EXIT_BAD_INPUT
    from MultimodalPrealignLib import batch
    from MultimodalPrealignLib.errors import PrealignError

    def progress(done, failed, running, total, eta_s):
        if not args.quiet:
            eta = "--" if eta_s is None else f"{eta_s:.0f} s"
            print(f"[{done}/{total} done, {failed} failed, {running} running, ETA {eta}]", flush=True)

    try:
        result = batch.run(args.manifest, args.out, default_options(args),
                           pair_runner=slicer_pair_runner(slicer, logic, args.engine), resume=args.resume,
                           skip_bad_rows=args.skip_bad_rows, progress=progress, quiet=args.quiet)
    except batch.ManifestError as err:
        for bad in err.bad_rows:
            print(f"ERROR: bad row: {bad.one_line()}", file=sys.stderr)
        print(f"ERROR: {err.headline}. Fix: {err.fix}.", file=sys.stderr)
        return err.exit_code
    except PrealignError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("Interrupted: finished pairs kept, summary written; run again with --resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"Done: {result.counts} (summary {result.summary_files['summary.html']})")
    return result.exit_code


def main(argv=None):
    try:
        code = run(parse_args(sys.argv[1:] if argv is None else argv))
    except SystemExit as err:  # argparse errors (already printed)
        code = err.code if isinstance(err.code, int) else EXIT_BAD_INPUT
    except Exception:
        traceback.print_exc()
        code = EXIT_UNEXPECTED
    sys.exit(code)


if __name__ == "__main__":
    main()
