"""The code behind a run: the command line and the Slicer Python console code that reproduce it.

Every run (command line, Slicer panel, Slicer console) stores ``report["reproduce"]``:

- ``command_line``: the ``multimodal-prealign register ...`` command with every setting that differs from the
  command line's defaults (so it gives the same transform; paths absolute);
- ``slicer_python``: the Slicer Python console code (``logic.run(...)`` with every non-default setting);
- ``engine``: for the BRAINSFit and elastix engines, the tool's own command line / parameters and parameter
  files as run (from the chosen attempt's ``EngineResult.settings_used``).

The settings are read from :class:`PipelineOptions` (the command line's) or from ``logic.run``'s keywords (the
Slicer module's, camelCase); both name the same settings.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .options import PipelineOptions

#: PipelineOptions.to_dict() key -> (command-line flag, logic.run keyword). Booleans whose default is True are
#: written as their negative flag (--no-isotropic, --no-fallback).
SETTINGS = (
    ("prealign", "--prealign", "prealign"),
    ("engine", "--engine", "engine"),
    ("stages", "--stages", "stages"),
    ("sampling_percentage", "--sampling-percentage", "samplingPercentage"),
    ("iterations", "--iterations", "iterations"),
    ("seed", "--seed", "seed"),
    ("crop_margin_mm", "--crop-margin", "cropMarginMm"),
    ("spacing_scale", "--spacing-scale", "spacingScale"),
    ("isotropic", "--no-isotropic", "isotropic"),
    ("max_working_voxels", "--max-working-voxels", None),
    ("fixed_labels_task", "--fixed-labels-task", None),
    ("moving_labels_task", "--moving-labels-task", None),
    ("fallback", "--no-fallback", "fallback"),
    ("no_report", "--no-report", None),
    ("per_structure", "--per-structure", "perStructure"),
    ("structure_stages", "--structure-stages", "structureStages"),
    ("structure_threshold", "--structures-from-threshold", "structureThreshold"),
)

#: logic.run keyword -> PipelineOptions.create keyword (the settings both share).
LOGIC_TO_OPTIONS = {logic: key for key, _flag, logic in SETTINGS if logic is not None}

#: The command line's default engine; the Slicer module's default is 'brainsfit' (both are written explicitly).
ALWAYS_WRITTEN = ("engine",)


def _flag_arguments(key: str, flag: str, value) -> list[str]:
    if isinstance(value, bool):
        negative = flag.startswith("--no-") and key != "no_report"
        return [flag] if (not value if negative else value) else []
    if isinstance(value, (list, tuple)):
        return [flag, ",".join(str(v) for v in value)]
    return [flag, str(value)]


def command_arguments(options: PipelineOptions) -> list[str]:
    """The ``register`` options (after the paths) that give ``options``: every setting differing from the default,
    plus the engine."""
    values, defaults = options.to_dict(), PipelineOptions().to_dict()
    arguments: list[str] = []
    for key, flag, _logic in SETTINGS:
        value = values.get(key)
        if key not in ALWAYS_WRITTEN and value == defaults.get(key):
            continue
        if value is None:
            continue
        arguments += _flag_arguments(key, flag, value)
    anatomy = (options.prealign_options or {}).get("anatomy") or {}
    if anatomy.get("transform"):
        arguments += ["--anatomy-transform", str(anatomy["transform"])]
    if anatomy.get("refine_labels"):
        arguments.append("--anatomy-refine")
    brainsfit_path = getattr(options.registration, "brainsfit_path", None) or getattr(options, "brainsfit_path", None)
    if brainsfit_path:
        arguments += ["--brainsfit", str(brainsfit_path)]
    return arguments


def command_line(fixed, moving, out_dir, options: PipelineOptions, fixed_labels=None, moving_labels=None,
                 landmarks=None, moving_landmarks=None) -> list[str]:
    """``multimodal-prealign register --fixed F --moving M --out DIR ...`` as an argument list (absolute paths)."""

    def path(value) -> str:
        return str(Path(value).resolve())

    arguments = ["multimodal-prealign", "register", "--fixed", path(fixed), "--moving", path(moving),
                 "--out", path(out_dir)]
    for flag, value in (("--fixed-labels", fixed_labels), ("--moving-labels", moving_labels),
                        ("--landmarks", landmarks), ("--moving-landmarks", moving_landmarks)):
        if value is not None:
            arguments += [flag, path(value)]
    return arguments + command_arguments(options)


def logic_keywords(options: PipelineOptions) -> dict:
    """``logic.run`` keywords (camelCase) for ``options``: the settings the Slicer module shares with the CLI."""
    values = options.to_dict()
    return {logic: values[key] for key, _flag, logic in SETTINGS if logic is not None}


def slicer_python(fixed: str, moving: str, keywords: dict, defaults: dict, load_files: bool = False,
                  comments: list | None = None) -> str:
    """Slicer Python console code: ``logic.run(fixed, moving, <every keyword that differs from its default>)``.

    ``fixed`` / ``moving``: node names (``getNode``) or, with ``load_files``, file paths (``loadVolume``).
    ``defaults``: ``logic.run``'s keyword defaults. The engine is always written.
    """
    lines = [f"# {line}" for line in (comments or [])]
    lines.append('logic = slicer.util.getModuleLogic("MultimodalPrealign")')
    if load_files:
        lines += [f"fixed = slicer.util.loadVolume({fixed!r})", f"moving = slicer.util.loadVolume({moving!r})"]
    else:
        lines += [f"fixed = slicer.util.getNode({fixed!r})", f"moving = slicer.util.getNode({moving!r})"]
    arguments = []
    for name, value in keywords.items():
        if isinstance(value, tuple):
            value = list(value)
        default = defaults.get(name)
        if isinstance(default, tuple):
            default = list(default)
        if name not in ALWAYS_WRITTEN and value == default:
            continue
        arguments.append(f"{name}={value!r}")
    lines.append("result = logic.run(" + ", ".join(["fixed", "moving", *arguments]) + ")")
    lines.append("print(result.verdict, result.verdictReasons, result.reportHtmlPath)")
    return "\n".join(lines) + "\n"


def engine_record(settings_used: dict) -> dict:
    """The engine's own command line / parameters and parameter files as run (empty for the itk engine)."""
    keep = ("command_line", "parameters", "parameter_files", "executable", "version")
    return {key: settings_used[key] for key in keep if settings_used.get(key)}


def record(report: dict, command: list[str] | None, slicer_code: str, settings_used: dict | None = None,
           note: str | None = None) -> dict:
    """Store ``report["reproduce"]``: the command line (list and one shell-quoted string), the Slicer console code
    and the engine's own record. Returns it."""
    entry = {
        "command_line": shlex.join(command) if command else None,
        "command_arguments": list(command) if command else None,
        "slicer_python": slicer_code,
        "engine": engine_record(settings_used or {}),
    }
    if note:
        entry["note"] = note
    report["reproduce"] = entry
    return entry


def for_files(report: dict, result_settings_used: dict, fixed, moving, out_dir, options: PipelineOptions,
              fixed_labels=None, moving_labels=None, landmarks=None, moving_landmarks=None,
              logic_defaults: dict | None = None, extra_arguments: list | None = None) -> dict:
    """``report["reproduce"]`` of a run on files (the command line, ``demo``, a batch row); ``extra_arguments``
    are appended to the command (e.g. ``--segment both``)."""
    command = command_line(fixed, moving, out_dir, options, fixed_labels, moving_labels, landmarks, moving_landmarks)
    command += list(extra_arguments or [])
    keywords = logic_keywords(options)
    comments = ["In Slicer's Python console (the module must be installed). The engine runs in Slicer: itk and",
                "elastix as here; brainsfit as Slicer's General Registration (BRAINS)."]
    if fixed_labels is not None or moving_labels is not None:
        comments.append("Label maps: load them as segmentations with TotalSegmentator segment names and pass "
                        "fixedSegmentation= / movingSegmentation=.")
    code = slicer_python(str(Path(fixed).resolve()), str(Path(moving).resolve()), keywords,
                         logic_defaults or LOGIC_DEFAULTS, load_files=True, comments=comments)
    return record(report, command, code, result_settings_used)


#: ``MultimodalPrealignLogic.run``'s keyword defaults for the settings it shares with the command line (checked
#: against the module's signature by a test).
LOGIC_DEFAULTS = {"prealign": "auto", "engine": "brainsfit", "stages": ["rigid", "affine"],
                  "samplingPercentage": None, "iterations": None, "cropMarginMm": 20.0, "spacingScale": 1.0,
                  "isotropic": True, "seed": 0, "fallback": True, "perStructure": [], "structureStages": ["rigid"],
                  "structureThreshold": None}
