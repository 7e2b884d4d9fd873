"""The cohort manifest: one row per pair, checked as a whole before any work starts.

A manifest is a CSV file (comma, semicolon or tab separated; ``#`` lines and empty lines are skipped) with the
columns ``id``, ``fixed``, ``moving`` and optionally ``fixed_labels``, ``moving_labels``, ``landmarks``,
``moving_landmarks``, plus any per-pair ``register`` option as a column (:data:`ROW_OPTIONS`; ``-`` and ``_``
spellings both accepted, e.g. ``sampling-percentage`` or ``sampling_percentage``). A non-empty option cell
overrides the batch's default for that row; an empty cell keeps the default. Paths are relative to the
manifest's folder (absolute paths and ``~`` work too).

:func:`read_manifest` refuses a manifest whose header is wrong (missing or unknown columns, all named) and
collects every bad row (missing file, bad id, duplicate id, bad option value) before raising one
:class:`ManifestError`, unless bad rows are to be skipped.
"""

from __future__ import annotations

import copy
import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import engines, prealign
from ..errors import InputError
from ..pipeline import PipelineOptions

#: Columns every manifest has.
REQUIRED_COLUMNS = ("id", "fixed", "moving")
#: Optional input columns (paths).
PATH_COLUMNS = ("fixed_labels", "moving_labels", "landmarks", "moving_landmarks")
#: Names a pair id may not take (files of the batch folder).
RESERVED_IDS = ("summary.csv", "summary.json", "summary.html")
#: A pair id is a folder name: letters, digits, '.', '_', '-', not starting with '.' or '-', at most 128 characters.
ID_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
#: ``register`` options that are not per-pair settings, with the reason and the fix.
NOT_PER_PAIR = {
    "out": "each pair writes into <batch folder>/<id>/; drop the column",
    "quiet": "the batch prints one progress bar; drop the column",
    "segment": "batch does not run TotalSegmentator; segment first and give fixed_labels / moving_labels columns",
    "fast_segment": "batch does not run TotalSegmentator; segment first and give fixed_labels / moving_labels columns",
    "report_only": "batch registers every pair; use register --report-only per pair",
    "transform": "batch registers every pair; use register --report-only --transform per pair",
}

_TRUE = ("1", "true", "yes", "y", "on")
_FALSE = ("0", "false", "no", "n", "off")


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"'{text}' is not true/false (use 1/0, true/false or yes/no)")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"'{text}' is not a number") from None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"'{text}' is not a whole number") from None


def _choice(*values: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in values:
            raise ValueError(f"'{text}' is not one of {', '.join(values)}")
        return text

    return parse


def _stages(text: str) -> tuple:
    """'rigid,affine' (inside quotes in a CSV cell), 'rigid+affine', 'rigid;affine' or 'rigid affine'."""
    return tuple(part for part in re.split(r"[,;+\s]+", text.strip()) if part)


def _set_registration(name: str):
    def apply(options: PipelineOptions, value) -> None:
        setattr(options.registration, name, value)

    return apply


def _set(name: str, negate: bool = False):
    def apply(options: PipelineOptions, value) -> None:
        setattr(options, name, (not value) if negate else value)

    return apply


def _set_anatomy(key: str):
    def apply(options: PipelineOptions, value) -> None:
        anatomy = options.prealign_options.setdefault("anatomy", {})
        if value is False:  # the command line sets refine_labels only when asked
            anatomy.pop(key, None)
        else:
            anatomy[key] = value
        if not anatomy:
            options.prealign_options.pop("anatomy")

    return apply


@dataclass(frozen=True)
class RowOption:
    """A per-pair option column: how its text is read and where its value goes in :class:`PipelineOptions`."""

    parse: Callable[[str], object]
    apply: Callable[[PipelineOptions, object], None]


#: Per-pair option columns, named like the ``register`` options (``--crop-margin`` -> ``crop_margin``), read with
#: the same types and choices. Testing/test_batch_manifest.py checks them against ``cli.add_registration_arguments``.
ROW_OPTIONS = {
    "prealign": RowOption(_choice(*prealign.ALL_METHODS), _set("prealign")),
    "engine": RowOption(_choice(*engines.ENGINES), _set_registration("engine")),
    "brainsfit": RowOption(str, _set_registration("brainsfit_path")),
    "stages": RowOption(_stages, _set_registration("stages")),
    "sampling_percentage": RowOption(_float, _set_registration("sampling_percentage")),
    "iterations": RowOption(_int, _set_registration("iterations")),
    "seed": RowOption(_int, _set_registration("seed")),
    "crop_margin": RowOption(_float, _set("crop_margin_mm")),
    "spacing_scale": RowOption(_float, _set("spacing_scale")),
    "no_isotropic": RowOption(_bool, _set("isotropic", negate=True)),
    "max_working_voxels": RowOption(_int, _set("max_working_voxels")),
    "anatomy_transform": RowOption(_choice("rigid", "similarity"), _set_anatomy("transform")),
    "anatomy_refine": RowOption(_bool, _set_anatomy("refine_labels")),
    "no_fallback": RowOption(_bool, _set("fallback", negate=True)),
    "no_report": RowOption(_bool, _set("no_report")),
    "fixed_labels_task": RowOption(str, _set("fixed_labels_task")),
    "moving_labels_task": RowOption(str, _set("moving_labels_task")),
    "per_structure": RowOption(lambda text: _parse_structure_names(text), _set("per_structure")),
    "structure_stages": RowOption(_stages, _set("structure_stages")),
    "structures_from_threshold": RowOption(_float, _set("structure_threshold")),
}


def _parse_structure_names(text: str):
    from ..structures import parse_names

    return parse_names(text)


@dataclass
class PairJob:
    """One pair to register: absolute input paths, the run's options (defaults + this row's overrides).

    ``line``: the manifest line (1 = header); ``overrides``: the row's option cells as written (column -> text).
    """

    id: str
    line: int
    fixed: str
    moving: str
    options: PipelineOptions
    fixed_labels: str | None = None
    moving_labels: str | None = None
    landmarks: str | None = None
    moving_landmarks: str | None = None
    overrides: dict = field(default_factory=dict)

    def input_paths(self) -> dict:
        """{role: absolute path} of every input the pair reads."""
        roles = ("fixed", "moving", *PATH_COLUMNS)
        return {role: getattr(self, role) for role in roles if getattr(self, role)}


@dataclass
class BadRow:
    """A manifest row that cannot run: its line, its id (may be empty) and every problem found."""

    line: int
    id: str
    problems: list

    def one_line(self) -> str:
        who = f"line {self.line}" + (f" (id {self.id})" if self.id else "")
        return f"{who}: " + "; ".join(self.problems)


@dataclass
class Manifest:
    path: Path
    jobs: list
    bad_rows: list


class ManifestError(InputError):
    """The manifest cannot be used: its header is wrong, or some rows are bad (``bad_rows``, all of them)."""

    def __init__(self, problem: str, fix: str, bad_rows: list | None = None, headline: str | None = None):
        self.bad_rows = list(bad_rows or [])
        #: the problem without the list of rows (for a caller that prints one line per bad row)
        self.headline = headline or problem
        super().__init__(problem, fix)


def column_key(name: str) -> str:
    """Header cell -> column key: trimmed, lower case, leading '--' dropped, '-' read as '_'."""
    return name.strip().lstrip("-").strip().lower().replace("-", "_")


def read_manifest(path, defaults: PipelineOptions | None = None, skip_bad_rows: bool = False) -> Manifest:
    """The jobs of the manifest at ``path`` with ``defaults`` (not modified) overridden per row.

    Raises :class:`ManifestError` (exit code 2) for a missing/unreadable/empty manifest, a bad header, or bad rows
    (every one listed) unless ``skip_bad_rows``; then the bad rows come back in ``Manifest.bad_rows``.
    """
    path = Path(path).expanduser()
    defaults = (defaults or PipelineOptions()).validate()
    rows = _read_rows(path)
    header, body = rows[0], rows[1:]
    keys = _check_header(path, header[1])
    base = path.resolve().parent
    jobs, bad_rows, first_line_of = [], [], {}
    brainsfit_checked = {}
    for line, cells in body:
        cells = cells + [""] * (len(keys) - len(cells))
        values = {key: cells[i].strip() for i, key in enumerate(keys)}
        problems = [f"{len(cells)} cells for {len(keys)} columns"] if len(cells) > len(keys) else []
        job = _job(line, values, base, defaults, problems)
        if job is not None and job.options.registration.engine == "brainsfit":
            problem = _brainsfit_problem(job.options.registration.brainsfit_path, brainsfit_checked)
            if problem:
                problems.append(problem)
        seen = first_line_of.get(values["id"].lower())
        if values["id"] and seen is not None:
            problems.append(f"duplicate id (also on line {seen})")
        elif values["id"]:
            first_line_of[values["id"].lower()] = line
        if problems:
            bad_rows.append(BadRow(line, values["id"], problems))
        else:
            jobs.append(job)
    if not jobs and not bad_rows:
        raise ManifestError(f"The manifest '{path}' has a header but no pairs", "add one row per pair under the header")
    if bad_rows and not skip_bad_rows:
        listed = " | ".join(bad.one_line() for bad in bad_rows)
        headline = (f"{len(bad_rows)} of {len(body)} rows of the manifest '{path}' are bad (lines "
                    + ", ".join(str(bad.line) for bad in bad_rows) + "); nothing was run")
        raise ManifestError(f"{headline}: {listed}", "correct those rows, or pass --skip-bad-rows to run the good "
                            "ones only", bad_rows, headline)
    return Manifest(path, jobs, bad_rows)


def _brainsfit_problem(path: str | None, checked: dict) -> str | None:
    """Why the BRAINSFit executable of a row cannot run (None when it runs); each path is checked once."""
    if path not in checked:
        try:
            engines.find_brainsfit(path)
            checked[path] = None
        except InputError as err:
            checked[path] = err.problem
    return checked[path]


def _read_rows(path: Path) -> list:
    """[(line number, cells)] of the non-empty, non-comment lines; the first is the header."""
    if not path.is_file():
        raise ManifestError(f"The manifest '{path}' does not exist" if not path.exists()
                            else f"The manifest '{path}' is not a file", "give the path of a CSV file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"Cannot read the manifest '{path}' as UTF-8 text ({err})",
                            "save it as a UTF-8 CSV file") from None
    lines = text.splitlines()
    header_line = next((line for line in lines if line.strip() and not line.lstrip().startswith("#")), "")
    delimiter = max(",;\t", key=header_line.count) if header_line else ","
    rows = []
    reader = csv.reader(lines, delimiter=delimiter)
    for cells in reader:
        if not any(cell.strip() for cell in cells) or cells[0].lstrip().startswith("#"):
            continue
        rows.append((reader.line_num, cells))
    if not rows:
        raise ManifestError(f"The manifest '{path}' is empty",
                            "write a header 'id,fixed,moving' and one row per pair (docs/batch.md)")
    return rows


def _check_header(path: Path, header: list) -> list:
    keys = [column_key(name) for name in header]
    known = set(REQUIRED_COLUMNS) | set(PATH_COLUMNS) | set(ROW_OPTIONS)
    problems = []
    missing = [name for name in REQUIRED_COLUMNS if name not in keys]
    if missing:
        problems.append("missing column" + ("s " if len(missing) > 1 else " ") + ", ".join(missing))
    repeated = sorted({key for key in keys if keys.count(key) > 1 and key})
    if repeated:
        problems.append("repeated column" + ("s " if len(repeated) > 1 else " ") + ", ".join(repeated))
    if "" in keys:
        problems.append(f"an empty column name (column {keys.index('') + 1})")
    not_per_pair = [name for name, key in zip(header, keys) if key in NOT_PER_PAIR]
    for name in not_per_pair:
        problems.append(f"column '{name.strip()}' is not a per-pair option ({NOT_PER_PAIR[column_key(name)]})")
    unknown = [name.strip() for name, key in zip(header, keys) if key and key not in known and key not in NOT_PER_PAIR]
    if unknown:
        problems.append("unknown column" + ("s " if len(unknown) > 1 else " ") + ", ".join(f"'{u}'" for u in unknown))
    if problems:
        raise ManifestError(f"The manifest '{path}' has a bad header: " + "; ".join(problems),
                            "use the columns id, fixed, moving, optionally " + ", ".join(PATH_COLUMNS)
                            + " and per-pair options named like register's (" + ", ".join(ROW_OPTIONS) + ")")
    return keys


def _job(line: int, values: dict, base: Path, defaults: PipelineOptions, problems: list) -> PairJob | None:
    """The row's job; every problem found is appended to ``problems`` (then the job is None)."""
    pair_id = values["id"]
    if not pair_id:
        problems.append("empty id")
    elif not ID_PATTERN.match(pair_id) or pair_id.lower() in RESERVED_IDS:
        problems.append(f"id '{pair_id}' cannot be a folder name (use letters, digits, '.', '_', '-'; "
                        "not starting with '.' or '-'; at most 128 characters)")
    paths = {}
    for role in ("fixed", "moving", *PATH_COLUMNS):
        text = values.get(role, "")
        if not text:
            if role in REQUIRED_COLUMNS:
                problems.append(f"no {role} image given")
            continue
        target = Path(text).expanduser()
        target = target if target.is_absolute() else base / target
        if not target.exists():
            problems.append(f"{role} '{text}' does not exist (looked for {target})")
        paths[role] = str(target)
    if paths.get("moving_landmarks") and not paths.get("landmarks"):
        problems.append("moving_landmarks needs landmarks (the fixed image's points)")
    options = copy.deepcopy(defaults)
    overrides = {}
    for key, option in ROW_OPTIONS.items():
        text = values.get(key, "")
        if not text:
            continue
        try:
            option.apply(options, option.parse(text))
            overrides[key] = text
        except ValueError as err:
            problems.append(f"{key}: {err}")
    if overrides:
        try:
            options.validate()
        except InputError as err:
            problems.append(err.problem)
    if problems:
        return None
    return PairJob(id=pair_id, line=line, fixed=paths["fixed"], moving=paths["moving"], options=options,
                   fixed_labels=paths.get("fixed_labels"), moving_labels=paths.get("moving_labels"),
                   landmarks=paths.get("landmarks"), moving_landmarks=paths.get("moving_landmarks"),
                   overrides=overrides)
