"""Command line: ``multimodal-prealign register|demo|...``.

Exit codes: 0 success (verdict PASS or WARN), 2 bad input, 3 a stage failed, 4 the verdict is FAIL,
130 interrupted (Ctrl-C / SIGTERM; nothing written).

Each subcommand is a parser with ``set_defaults(handler=fn)``; ``fn(args) -> int``. ``inspect-dicom`` comes
from :func:`io.dicom_series.add_cli`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

from . import __version__, batch, diagnose, engines, prealign, stopping
from .errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, Cancelled, InputError, PrealignError
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
                        help="registration engine: itk (SimpleITK set up like BRAINSFit, default), elastix "
                             "(itk-elastix) or brainsfit (the real BRAINSFit executable, see --brainsfit)")
    parser.add_argument("--brainsfit", default=None, metavar="PATH",
                        help="--engine brainsfit: the BRAINSFit executable (default: $MULTIMODAL_PREALIGN_BRAINSFIT, "
                             "BRAINSFit on PATH, or a Slicer installation's lib/Slicer-5.x/cli-modules/BRAINSFit)")
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
    parser.add_argument("--per-structure", default=None, metavar="NAMES",
                        help="after the global run, register each named structure of the fixed image on its own "
                             "(comma-separated names from --fixed-labels: segment names, TotalSegmentator names or "
                             "label values; or 'all'); writes DIR/structures/<name>/transform.h5 "
                             "(docs/per_structure.md)")
    parser.add_argument("--structure-stages", default="rigid", type=_stages, metavar="STAGES",
                        help="stages of each structure's registration (default rigid; e.g. rigid,affine)")
    parser.add_argument("--structures-from-threshold", type=float, default=None, metavar="HU",
                        help="--per-structure without a label map: bones of a CT/microCT above this value (e.g. 300), "
                             "split at the joint spaces, named bone_1, bone_2, ... (largest first)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def options_from_args(args: argparse.Namespace):
    from .pipeline import PipelineOptions

    options = PipelineOptions.create(prealign=args.prealign, engine=args.engine, stages=args.stages,
                              sampling_percentage=args.sampling_percentage, iterations=args.iterations,
                              seed=args.seed, crop_margin_mm=args.crop_margin, spacing_scale=args.spacing_scale,
                              isotropic=not args.no_isotropic, fallback=not args.no_fallback,
                              no_report=args.no_report, brainsfit_path=getattr(args, "brainsfit", None))
    if options.registration.engine == "brainsfit":  # no executable: exit 2 now, not after the pre-alignment
        engines.find_brainsfit(options.registration.brainsfit_path)
    if options.registration.engine == "elastix":  # itk-elastix is an extra: exit 2 now, naming it
        engines.require_elastix()
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
    from .structures import parse_names

    options.per_structure = parse_names(getattr(args, "per_structure", None))
    options.structure_stages = tuple(getattr(args, "structure_stages", None) or ("rigid",))
    options.structure_threshold = getattr(args, "structures_from_threshold", None)
    if options.structure_threshold is not None and not options.per_structure:
        raise InputError("--structures-from-threshold makes the structures of --per-structure",
                         "add --per-structure all (or the bone names bone_1,bone_2,...)")
    return options.validate()


def _progress(args) -> Progress:
    """Progress lines on stderr (unless --quiet); stops at the next check point after Ctrl-C / SIGTERM."""
    return Progress(None if args.quiet else text_progress(), stopping.ACTIVE)


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
    for entry in (result.report.get("structures") or {}).get("results", []):  # --per-structure
        motion = entry.get("motion_relative_to_global") or {}
        where = (entry.get("files") or {}).get("transform")
        lines.append(f"structure {entry['name']}: {entry['verdict']}" + (
            f" ({entry['error']})" if entry.get("error") else
            f", {motion.get('rotation_deg', 0):.1f} deg / {motion.get('mean_displacement_mm', 0):.1f} mm from the "
            f"global transform" + (f" -> {out_dir / where}" if where else "")))
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
        note = lone_label_map_note(fixed_labels, moving_labels, args.prealign)
        reproduce_with = None
        if args.segment:  # the label files made by --segment are temporary: the command repeats --segment
            reproduce_with = {"fixed_labels": args.fixed_labels, "moving_labels": args.moving_labels,
                              "extra_arguments": ["--segment", args.segment]
                              + (["--fast-segment"] if args.fast_segment else [])}
        result = register_files(args.fixed, args.moving, args.out, options, fixed_labels, moving_labels,
                                _progress(args), command=["multimodal-prealign", *sys.argv[1:]],
                                landmarks_path=args.landmarks, moving_landmarks_path=args.moving_landmarks,
                                reproduce_with=reproduce_with)
    if note:  # said after the run: a bad input of the same run stays a single error line
        print(f"note: {note}")
    print(_summary(result, Path(args.out)))
    return exit_code_for(result.report.get("verdict"))


def lone_label_map_note(fixed_labels, moving_labels, prealign_method: str) -> str | None:
    """What happens to a label map given without the other image's: it is checked but not used (anatomy
    pre-alignment and the structure checks compare structures of both images); None when both or neither are given,
    or with --prealign anatomy (which then refuses the run)."""
    if (fixed_labels is None) == (moving_labels is None) or prealign_method == "anatomy":
        return None
    given, missing = ("fixed", "moving") if fixed_labels is not None else ("moving", "fixed")
    method = "search" if prealign_method == "auto" else prealign_method
    return (f"--{given}-labels is not used without --{missing}-labels: anatomy pre-alignment and the structure checks "
            f"compare the structures of both images; this run uses the '{method}' pre-alignment and judges the result "
            f"from the images. Add --{missing}-labels (or --segment {missing}) to use the label maps")


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
    batch.add_cli(sub, add_registration_arguments, options_from_args)
    return parser


def main(argv: list | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, usage errors (already printed as one line)
        return int(done.code or 0)
    try:
        with stopping.stop_on_signals() as stop:
            code = int(args.handler(args) or 0)
            if stop():  # the signal came after the last check point: the outputs are complete
                print(f"multimodal-prealign {args.command}: interrupted after the outputs were written",
                      file=sys.stderr)
                return EXIT_INTERRUPTED
            return code
    except (Cancelled, KeyboardInterrupt):
        print(f"multimodal-prealign {args.command}: interrupted: nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except PrealignError as err:
        print(f"multimodal-prealign {args.command}: error: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:  # e.g. `multimodal-prealign diagnose F M | head`: the reader has gone, stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
