"""Command line: ``multimodal-prealign register|demo|...``.

Exit codes: 0 success (verdict PASS or WARN), 2 bad input, 3 a stage failed, 4 the verdict is FAIL.

Each subcommand is a parser with ``set_defaults(handler=fn)``; ``fn(args) -> int``. ``inspect-dicom`` comes
from :func:`io.dicom_series.add_cli`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from . import __version__, diagnose, engines, prealign
from .errors import EXIT_BAD_INPUT, InputError, PrealignError
from .io import dicom_series, image_io
from .progress import Progress, text_progress


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line (plus the --help hint) and exits with code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}. Fix: see '{self.prog} --help'.\n")


def _stages(text: str) -> tuple:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_registration_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``register`` and ``demo``."""
    parser.add_argument("--prealign", default="auto", choices=prealign.ALL_METHODS,
                        help="initial alignment: auto (default: anatomy with label maps, else the strongest "
                             "available search), none, header (trust both headers), geometry (box centres), "
                             "moments (centres of the foreground masks), anatomy, search")
    parser.add_argument("--engine", default="itk", choices=engines.ENGINES,
                        help="registration engine: itk (SimpleITK set up like BRAINSFit, default) or elastix")
    parser.add_argument("--stages", default="rigid,affine", type=_stages,
                        help="comma-separated stages run in order: rigid, affine, bspline (default rigid,affine)")
    parser.add_argument("--sampling-percentage", type=float, default=None, metavar="P",
                        help="share of working voxels the metric samples, in (0, 1] (BRAINSFit's "
                             "samplingPercentage; default 0.002 for itk, preset's for elastix)")
    parser.add_argument("--iterations", type=int, default=None, metavar="N",
                        help="iterations per stage and level (BRAINSFit numberOfIterations, default 1500 for itk; "
                             "elastix MaximumNumberOfIterations, preset's by default)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for metric sampling (default 0)")
    parser.add_argument("--crop-margin", type=float, default=20.0, metavar="MM",
                        help="margin added around the overlap when cropping, mm (default 20)")
    parser.add_argument("--spacing-scale", type=float, default=1.0, metavar="S",
                        help="working spacing = coarser input spacing x S, like CropVolume's spacing scale (default 1)")
    parser.add_argument("--no-isotropic", action="store_true",
                        help="keep per-axis working spacing instead of isotropic voxels")
    parser.add_argument("--max-working-voxels", type=int, default=None, metavar="N",
                        help="cap on the fixed working grid's voxel count (default 1500000)")
    parser.add_argument("--anatomy-transform", choices=("rigid", "similarity"), default=None,
                        help="anatomy pre-alignment model: rigid (default) or similarity (isotropic scale, for "
                             "label maps of different subjects)")
    parser.add_argument("--anatomy-refine", action="store_true",
                        help="anatomy pre-alignment: refine the structure fit by the overlap of the label maps")
    parser.add_argument("--no-fallback", action="store_true",
                        help="do not retry with the next pre-alignment candidate or the other engine on a FAIL verdict")
    parser.add_argument("--no-report", action="store_true",
                        help="batch use: metrics and verdict in report.json only, no pictures and no report.html")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def options_from_args(args: argparse.Namespace):
    from .pipeline import PipelineOptions

    options = PipelineOptions.create(prealign=args.prealign, engine=args.engine, stages=args.stages,
                              sampling_percentage=args.sampling_percentage, iterations=args.iterations,
                              seed=args.seed, crop_margin_mm=args.crop_margin, spacing_scale=args.spacing_scale,
                              isotropic=not args.no_isotropic, fallback=not args.no_fallback,
                              no_report=args.no_report)
    if args.max_working_voxels is not None:
        options.max_working_voxels = args.max_working_voxels
    anatomy = {}
    if args.anatomy_transform:
        anatomy["transform"] = args.anatomy_transform
    if args.anatomy_refine:
        anatomy["refine_labels"] = True
    if anatomy:
        options.prealign_options["anatomy"] = anatomy
    for name in ("fixed_labels_task", "moving_labels_task"):
        if getattr(args, name, None):
            setattr(options, name, getattr(args, name))
    return options.validate()


def _progress(args) -> Progress:
    return Progress(None if args.quiet else text_progress())


def _summary(result, out_dir: Path) -> str:
    t = result.report["transform"]["summary"]
    lines = [f"pre-alignment: {result.prealign.method}; engine: {result.report['registration']['engine']} "
             f"({', '.join(s['stage'] for s in result.engine.stages)})"]
    if "rotation_deg" in t:
        lines.append(f"transform: rotation {t['rotation_deg']:.1f} deg, translation "
                     f"{', '.join(f'{v:.1f}' for v in t['translation_mm'])} mm (fixed->moving, LPS)")
    before, after = result.report["metrics"]["before"], result.report["metrics"]["after"]
    lines.append(f"normalised mutual information: {before['nmi']:.3f} after pre-alignment -> {after['nmi']:.3f} "
                 "after registration")
    for warning in result.warnings:
        lines.append(f"warning: {warning}")
    reasons = result.report.get("verdict_reasons") or []
    lines.append(f"verdict: {result.report.get('verdict')}" + (f" ({reasons[0]})" if reasons else ""))
    names = ["transform.h5", "moving_resampled.nrrd", "report.json"]
    if (out_dir / "report.html").exists():
        names.append("report.html")
    lines.append("outputs: " + ", ".join(str(out_dir / name) for name in names))
    return "\n".join(lines)


def run_register(args: argparse.Namespace) -> int:
    from .pipeline import register_files
    from .qa.verdict import exit_code_for

    if args.report_only:
        return run_report_only(args)
    if args.transform is not None:
        raise InputError("--transform is only used with --report-only", "add --report-only, or drop --transform")
    if args.moving_landmarks is not None and args.landmarks is None:
        raise InputError("--moving-landmarks needs --landmarks (the fixed image's points)", "add --landmarks F")
    options = options_from_args(args)
    with tempfile.TemporaryDirectory(prefix="mmp_labels_") as scratch:
        fixed_labels, moving_labels = segment_if_asked(args, Path(scratch))
        options = options_from_args(args)  # --segment may have set the label tasks
        result = register_files(args.fixed, args.moving, args.out, options, fixed_labels, moving_labels,
                                _progress(args), command=["multimodal-prealign", *sys.argv[1:]],
                                landmarks_path=args.landmarks, moving_landmarks_path=args.moving_landmarks)
    print(_summary(result, Path(args.out)))
    return exit_code_for(result.report.get("verdict"))


def segment_if_asked(args: argparse.Namespace, scratch: Path) -> tuple:
    """Label maps for --segment fixed|moving|both: TotalSegmentator runs where no label map was given.

    Its label files go to ``scratch`` (deleted after the run)."""
    fixed_labels, moving_labels = args.fixed_labels, args.moving_labels
    if not args.segment:
        return fixed_labels, moving_labels
    from .io import image_io, modality
    from .prealign import totalseg

    for which in ("fixed", "moving"):
        if args.segment not in (which, "both") or getattr(args, f"{which}_labels") is not None:
            continue
        path = getattr(args, which)
        image = image_io.load_image(path, f"{which} image")
        task = modality.totalsegmentator_task(modality.ct_or_mr(image))
        target = scratch / f"{which}_labels_{task}.nii.gz"
        totalseg.segment(path, task, fast=args.fast_segment, out_path=target)
        setattr(args, f"{which}_labels_task", getattr(args, f"{which}_labels_task") or task)
        if which == "fixed":
            fixed_labels = target
        else:
            moving_labels = target
    return fixed_labels, moving_labels


def run_report_only(args: argparse.Namespace) -> int:
    """--report-only: judge a given transform (no registration); writes report.json, pictures, report.html."""
    from . import pipeline
    from .geometry import transforms
    from .pipeline.inputs import load_inputs
    from .qa import reporting
    from .qa.metrics import structure_pairs
    from .qa.verdict import exit_code_for

    if args.transform is None:
        raise InputError("--report-only needs the transform to judge", "add --transform DIR/transform.h5")
    transform_path = Path(args.transform)
    if not transform_path.is_file():
        raise InputError(f"The transform file '{transform_path}' does not exist", "check the path given to --transform")
    try:
        transform = transforms.read_transform(transform_path)
    except RuntimeError:
        raise InputError(f"Cannot read '{transform_path}' as an ITK transform",
                         "give a .h5/.tfm/.txt transform file (fixed->moving, as register writes)") from None
    out_dir = Path(args.out)
    pipeline.check_output_dir(out_dir)
    both = bool(args.fixed_labels and args.moving_labels)  # structures are compared only with both label maps
    tasks = pipeline.PipelineOptions(fixed_labels_task=args.fixed_labels_task,
                                     moving_labels_task=args.moving_labels_task)
    loaded = load_inputs(args.fixed, args.moving, tasks, Progress(), args.fixed_labels if both else None,
                         args.moving_labels if both else None, args.landmarks, args.moving_landmarks)
    pairs = structure_pairs(tasks.fixed_labels_task, tasks.moving_labels_task) if both else None
    report = reporting.report_for_transform(loaded.fixed, loaded.moving, transform, out_dir,
                                            fixed_labels=loaded.fixed_labels, moving_labels=loaded.moving_labels,
                                            pairs=pairs, landmarks=loaded.landmarks, write_pictures=not args.no_report,
                                            extra={"command": ["multimodal-prealign", *sys.argv[1:]],
                                                   "transform_file": str(transform_path.resolve())})
    reasons = report.get("verdict_reasons") or []
    print(f"verdict: {report.get('verdict')}" + (f" ({reasons[0]})" if reasons else ""))
    print(f"outputs: {out_dir / 'report.json'}" + ("" if args.no_report else f", {out_dir / 'report.html'}"))
    return exit_code_for(report.get("verdict"))


def demo_pair() -> tuple[Path, Path]:
    from importlib import resources as importlib_resources

    folder = importlib_resources.files(__package__).joinpath("data", "demo")
    return Path(str(folder.joinpath("ct_demo.nrrd"))), Path(str(folder.joinpath("mr_demo.nrrd")))


def run_demo(args: argparse.Namespace) -> int:
    from .pipeline import register_files

    fixed, moving = demo_pair()
    if not fixed.exists() or not moving.exists():
        raise InputError("The embedded demo images are missing from this installation",
                         "reinstall the package (pip install -e .) from a complete checkout")
    options = options_from_args(args)
    print(f"demo: registering the embedded MRI-DIR phantom pair (CC BY 4.0, TCIA MRI-DIR; Ger et al., "
          f"Med Phys 2018): fixed CT {fixed.name}, moving T2 MR {moving.name}")
    result = register_files(fixed, moving, args.out, options, None, None, _progress(args),
                            command=["multimodal-prealign", *sys.argv[1:]])
    print(_summary(result, Path(args.out)))
    print(f"demo finished: open {Path(args.out).resolve()} (report.html shows the result; load transform.h5 in "
          "3D Slicer and apply it to the MR)")
    from .qa.verdict import exit_code_for

    return exit_code_for(result.report.get("verdict"))


def run_diagnose(args) -> int:
    """``diagnose``: the pair's diagnostics, with the overlap under ``--prealign``."""
    from .pipeline.diagnosis import diagnose_with_prealign

    fixed = image_io.load_image(args.fixed, "fixed image")
    moving = image_io.load_image(args.moving, "moving image")
    result = diagnose_with_prealign(fixed, moving, args.prealign, args.seed)
    print(json.dumps(result, indent=2) if args.json else diagnose.format_diagnostics(result))
    return 0


def add_diagnose_command(subparsers) -> None:
    """``diagnose FIXED MOVING [--json] [--prealign METHOD] [--seed S]``."""
    p = subparsers.add_parser(
        "diagnose", help="explain why registration may fail on a pair, with advice",
        description="Measure both images (extents along the patient axes, spacing, orientation, patient position, "
                    "intensities, modality guess, foreground), their overlap under the header alignment and under "
                    "the best available pre-alignment, the moving/fixed ratios, and give advice and a verdict.")
    p.add_argument("fixed", metavar="FIXED", help="fixed image: .nrrd, .nii(.gz), .mha/.mhd or a DICOM series folder")
    p.add_argument("moving", metavar="MOVING", help="moving image (same formats)")
    p.add_argument("--json", action="store_true", help="print the diagnostics as JSON")
    p.add_argument("--prealign", default="auto", choices=[m for m in prealign.ALL_METHODS if m != "anatomy"],
                   help="pre-alignment whose overlap is reported next to the header's (default auto; "
                        "header/none: report the header alignment only)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the pre-alignment (default 0)")
    p.set_defaults(handler=run_diagnose)


def add_register_command(subparsers) -> None:
    """``register --fixed F --moving M --out DIR [...]`` (and ``--report-only``)."""
    reg = subparsers.add_parser("register", help="register MOVING to FIXED and write transform.h5, "
                                "moving_resampled.nrrd, report.json", description=(
                                    "Register MOVING to FIXED. Writes DIR/transform.h5 (ITK transform mapping FIXED "
                                    "physical LPS points to MOVING points; apply it to the moving volume in Slicer), "
                                    "DIR/moving_resampled.nrrd, DIR/report.json, DIR/report.html and DIR/pictures/. "
                                    "Exit codes: 0 verdict PASS or WARN, 4 verdict FAIL, 2 bad input, 3 a stage "
                                    "failed."))
    reg.add_argument("--fixed", required=True, help="fixed image: .nrrd, .nii(.gz), .mha/.mhd or a DICOM series folder")
    reg.add_argument("--moving", required=True, help="moving image (same formats)")
    reg.add_argument("--out", required=True, help="output folder (new, empty, or holding a previous run's outputs)")
    reg.add_argument("--fixed-labels", default=None,
                     help="labels of the fixed image on its grid: a multi-label file (TotalSegmentator --ml), "
                          "TotalSegmentator's folder of per-structure masks, or a Slicer .seg.nrrd")
    reg.add_argument("--moving-labels", default=None, help="labels of the moving image (same forms)")
    reg.add_argument("--fixed-labels-task", default=None, help="TotalSegmentator task of --fixed-labels (e.g. total)")
    reg.add_argument("--moving-labels-task", default=None,
                     help="TotalSegmentator task of --moving-labels (e.g. total_mr)")
    reg.add_argument("--segment", choices=("fixed", "moving", "both"), default=None,
                     help="run TotalSegmentator (optional extra) on these images first (task total for CT, total_mr "
                          "for MR); needs its model weights (TOTALSEG_HOME_DIR / TOTALSEG_WEIGHTS_PATH)")
    reg.add_argument("--fast-segment", action="store_true", help="TotalSegmentator's fast (3 mm) models")
    reg.add_argument("--landmarks", default=None, metavar="F",
                     help="landmarks for target registration errors: a paired CSV (fixed_x..moving_z, LPS or RAS "
                          "stated), or the fixed image's points (.mrk.json, .fcsv) with --moving-landmarks")
    reg.add_argument("--moving-landmarks", default=None, metavar="F", help="the moving image's landmark points")
    reg.add_argument("--report-only", action="store_true",
                     help="do not register: judge the transform given with --transform and write the report")
    reg.add_argument("--transform", default=None, metavar="T", help="with --report-only: the transform to judge")
    add_registration_arguments(reg)
    reg.set_defaults(handler=run_register)


def add_demo_command(subparsers) -> None:
    """``demo [--out DIR]``: the embedded CT/MR pair."""
    demo = subparsers.add_parser("demo", help="run the pipeline on the embedded demo CT/MR pair",
                                 description="Register the embedded, downsampled MRI-DIR phantom pair (T2 MR to CT).")
    demo.add_argument("--out", default="multimodal_prealign_demo",
                      help="output folder (default ./multimodal_prealign_demo)")
    add_registration_arguments(demo)
    demo.set_defaults(handler=run_demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``multimodal-prealign`` parser: register, demo, diagnose, inspect-dicom."""
    parser = OneLineParser(prog="multimodal-prealign",
                           description="Pre-align, crop and register CT/MR pairs that differ a lot; "
                                       "explain the result.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    add_register_command(sub)
    add_demo_command(sub)
    add_diagnose_command(sub)
    dicom_series.add_cli(sub)
    return parser


def main(argv: list | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, usage errors (already printed as one line)
        return int(done.code or 0)
    try:
        return int(args.handler(args) or 0)
    except PrealignError as err:
        print(f"multimodal-prealign {args.command}: error: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"multimodal-prealign {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
