"""Command line: ``multimodal-prealign register|demo|...``. Exit codes: 0 success, 2 bad input, 3 failure.

Stage modules add their own subcommands: each module named in COMMAND_MODULES may define
``add_cli(subparsers)`` that adds a parser with ``set_defaults(handler=fn)``; ``fn(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from . import __version__, engines, prealign
from .errors import EXIT_BAD_INPUT, InputError, PrealignError
from .progress import Progress, text_progress

COMMAND_MODULES = ("diagnostics", "dicom_series", "totalseg")


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
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def options_from_args(args: argparse.Namespace):
    from .pipeline import PipelineOptions

    options = PipelineOptions(prealign=args.prealign, engine=args.engine, stages=args.stages,
                              sampling_percentage=args.sampling_percentage, iterations=args.iterations,
                              seed=args.seed, crop_margin_mm=args.crop_margin, spacing_scale=args.spacing_scale,
                              isotropic=not args.no_isotropic)
    if args.max_working_voxels is not None:
        options.max_working_voxels = args.max_working_voxels
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
    lines.append(f"mutual information: {before['mi']:.3f} after pre-alignment -> {after['mi']:.3f} after registration")
    for warning in result.warnings:
        lines.append(f"warning: {warning}")
    lines.append(f"outputs: {out_dir / 'transform.h5'}, {out_dir / 'moving_resampled.nrrd'}, {out_dir / 'report.json'}")
    return "\n".join(lines)


def run_register(args: argparse.Namespace) -> int:
    from .pipeline import register_files

    options = options_from_args(args)
    result = register_files(args.fixed, args.moving, args.out, options, args.fixed_labels, args.moving_labels,
                            _progress(args), command=["multimodal-prealign", *sys.argv[1:]])
    print(_summary(result, Path(args.out)))
    return 0


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
    print(f"demo finished: open {Path(args.out).resolve()} (load transform.h5 in 3D Slicer and apply it to the MR)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="multimodal-prealign",
                           description="Pre-align, crop and register CT/MR pairs that differ a lot; explain the result.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True

    reg = sub.add_parser("register", help="register MOVING to FIXED and write transform.h5, "
                         "moving_resampled.nrrd, report.json", description=(
                             "Register MOVING to FIXED. Writes DIR/transform.h5 (ITK transform mapping FIXED physical "
                             "LPS points to MOVING points; apply it to the moving volume in Slicer), "
                             "DIR/moving_resampled.nrrd and DIR/report.json. Exit codes: 0 ok, 2 bad input, 3 failed."))
    reg.add_argument("--fixed", required=True, help="fixed image: .nrrd, .nii(.gz), .mha/.mhd or a DICOM series folder")
    reg.add_argument("--moving", required=True, help="moving image (same formats)")
    reg.add_argument("--out", required=True, help="output folder (new, empty, or holding a previous run's outputs)")
    reg.add_argument("--fixed-labels", default=None, help="label map of the fixed image (e.g. TotalSegmentator)")
    reg.add_argument("--moving-labels", default=None, help="label map of the moving image")
    reg.add_argument("--fixed-labels-task", default=None, help="TotalSegmentator task of --fixed-labels (e.g. total)")
    reg.add_argument("--moving-labels-task", default=None, help="TotalSegmentator task of --moving-labels (e.g. total_mr)")
    add_registration_arguments(reg)
    reg.set_defaults(handler=run_register)

    demo = sub.add_parser("demo", help="run the pipeline on the embedded demo CT/MR pair",
                          description="Register the embedded, downsampled MRI-DIR phantom pair (T2 MR to CT).")
    demo.add_argument("--out", default="multimodal_prealign_demo", help="output folder (default ./multimodal_prealign_demo)")
    add_registration_arguments(demo)
    demo.set_defaults(handler=run_demo)

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ImportError:
            continue
        if hasattr(module, "add_cli"):
            module.add_cli(sub)
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
