"""Run TotalSegmentator (optional extra) to get the label maps that anatomy pre-alignment needs.

TotalSegmentator (https://github.com/wasserth/TotalSegmentator, Apache-2.0) is imported lazily: the
rest of the package works without it. Install the extra with
``pip install "multimodal-prealign[totalsegmentator]" torch==2.13.0 vtk==9.6.2`` (pinning torch and vtk
keeps pip from pulling gigabytes of CUDA wheels on Linux).

Model weights are NOT downloaded by this module: TotalSegmentator would try the network and fail
with a long traceback on offline machines. :func:`check_weights` looks for them first and stops with
one line naming ``TOTALSEG_HOME_DIR`` / ``TOTALSEG_WEIGHTS_PATH`` and how to get them.
"""

from __future__ import annotations

import os
import tempfile
from functools import cache
from pathlib import Path

import SimpleITK as sitk

from ..errors import InputError, RegistrationError
from ..resource_files import load_resource_json


def is_installed() -> bool:
    """True when the ``totalsegmentator`` package can be imported (without importing torch)."""
    import importlib.util

    return importlib.util.find_spec("totalsegmentator") is not None


def weights_dir() -> Path:
    """Where TotalSegmentator looks for weights (same rule as its ``config.get_weights_dir``).

    ``TOTALSEG_WEIGHTS_PATH`` if set, else ``TOTALSEG_HOME_DIR/nnunet/results``, else
    ``~/.totalsegmentator/nnunet/results`` (``/tmp/.totalsegmentator`` when the home folder is ``/``).
    """
    if os.environ.get("TOTALSEG_WEIGHTS_PATH"):
        return Path(os.environ["TOTALSEG_WEIGHTS_PATH"])
    if os.environ.get("TOTALSEG_HOME_DIR"):
        home = Path(os.environ["TOTALSEG_HOME_DIR"])
    else:
        user_home = Path.home()
        home = (Path("/tmp") if str(user_home) == "/" else user_home) / ".totalsegmentator"
    return home / "nnunet" / "results"


@cache
def _weights_table() -> dict:
    return load_resource_json("totalsegmentator_weights.json")


def _installed_weight_folders(task: str, fast: bool) -> list[list[str]] | None:
    """Weight folder names the INSTALLED TotalSegmentator uses for ``task`` (from its map_tasks_config)."""
    try:
        from totalsegmentator import map_tasks_config as config  # light module: no torch import
    except ImportError:
        return None
    tasks = getattr(config, "TASK_CONFIGS", None)
    folders = getattr(config, "TASK_ID_WEIGHTS_CONFIGS", None)
    if not isinstance(tasks, dict) or not isinstance(folders, dict) or task not in tasks:
        return None
    entry = tasks[task]
    if "sub_modes" in entry:
        modes = entry["sub_modes"]
        entry = modes.get("fast" if fast else "default") or modes.get("default") or {}
    ids = entry.get("task_id")
    if ids is None:
        return None
    ids = ids if isinstance(ids, list) else [ids]
    names = []
    for i in ids:
        info = folders.get(i, {})
        name = info.get("foldername") or f"Dataset{int(i):03d}"
        names.append(str(Path(info["rel_path"]) / name) if info.get("rel_path") else name)
    return [names]


def _table_weight_folders(task: str, fast: bool) -> list[list[str]] | None:
    entry = _weights_table()["tasks"].get(task)
    if entry is None:
        return None
    return [[f"Dataset{int(i):03d}" for i in ids] for ids in entry["fast" if fast else "full"]]


def missing_weights(task: str, fast: bool = False, folder: Path | None = None) -> list[str] | None:
    """Weight folders still missing for ``task`` ([] when ready, None when the task is unknown).

    Folder names come from the installed TotalSegmentator (exact names) or, without it, from
    ``resources/totalsegmentator_weights.json`` (nnU-Net dataset id prefixes, several releases).
    """
    alternatives = _installed_weight_folders(task, fast) or _table_weight_folders(task, fast)
    if alternatives is None:
        return None
    folder = weights_dir() if folder is None else Path(folder)
    present = set()
    if folder.is_dir():
        present = {child.name for child in folder.iterdir() if child.is_dir()}

    def found(name: str) -> bool:
        if "/" in name:
            return (folder / name).is_dir()
        return name in present or any(p.startswith(name + "_") for p in present)

    best: list[str] | None = None
    for names in alternatives:
        missing = [n for n in names if not found(n)]
        if best is None or len(missing) < len(best):
            best = missing
    return best or []


def _download_name(task: str, fast: bool) -> str:
    names = _weights_table().get("download_task_name", {}).get(task)
    return names["fast" if fast else "full"] if names else task


def weights_error(task: str, fast: bool, missing: list[str] | None = None) -> InputError:
    """The one-line error for missing weights (names both environment variables and how to get weights)."""
    ids = f" (missing {', '.join(missing)})" if missing else ""
    mode = " fast" if fast else ""
    return InputError(
        f"TotalSegmentator{mode} weights for task '{task}' are not installed in {weights_dir()}{ids}, "
        "and they cannot be downloaded from here",
        f"on a machine with internet run `totalseg_download_weights -t {_download_name(task, fast)}` (or "
        "`totalseg_import_weights -i <zip>` for a downloaded zip), copy the weights folder here and set "
        "TOTALSEG_HOME_DIR to the folder that holds nnunet/results, or TOTALSEG_WEIGHTS_PATH to the folder "
        "that holds the Dataset... folders; or run TotalSegmentator elsewhere and pass its output with "
        "--fixed-labels/--moving-labels",
    )


def check_weights(task: str, fast: bool = False) -> None:
    """Raise :class:`InputError` (one line, with the fix) when the weights for ``task`` are not installed."""
    missing = missing_weights(task, fast)
    if missing is None:  # a task without a known weights table: at least the folder must exist
        if not weights_dir().is_dir():
            raise weights_error(task, fast)
        return
    if missing:
        raise weights_error(task, fast, missing)


def check_installed() -> None:
    if not is_installed():
        raise InputError(
            "TotalSegmentator is not installed, so --segment cannot run",
            'pip install "multimodal-prealign[totalsegmentator]" torch==2.13.0 vtk==9.6.2, '
            "or pass existing TotalSegmentator output with --fixed-labels/--moving-labels",
        )


def _network_error(err: BaseException) -> bool:
    text = f"{type(err).__module__}.{type(err).__name__}: {err}".lower()
    return any(word in text for word in ("connection", "urlopen", "resolve", "network", "timed out",
                                         "max retries", "name or service", "download", "zenodo", "github"))


def segment(image_path_or_image, task: str, fast: bool = False, out_path: str | os.PathLike | None = None,
            device: str = "cpu", quiet: bool = True) -> sitk.Image:
    """Run TotalSegmentator on one image and return its multi-label map (UInt16, the image's grid).

    ``image_path_or_image``: a NIfTI path, any image file SimpleITK reads, or an ``sitk.Image`` (written to
    a temporary NIfTI first). ``task``: "total", "total_mr", ... ``fast``: TotalSegmentator's 3 mm models.
    ``out_path``: where the ``--ml`` label file is written (a temporary file when None). Raises
    :class:`InputError` when TotalSegmentator or its weights are missing (checked BEFORE any download
    attempt), :class:`RegistrationError` when the run itself fails.
    """
    check_installed()
    check_weights(task, fast)
    from totalsegmentator.python_api import totalsegmentator  # lazy: pulls torch

    with tempfile.TemporaryDirectory(prefix="mmp_totalseg_") as tmp:
        tmp_dir = Path(tmp)
        if isinstance(image_path_or_image, sitk.Image):
            source = tmp_dir / "input.nii.gz"
            sitk.WriteImage(image_path_or_image, str(source))
        else:
            source = Path(image_path_or_image)
            lower = source.name.lower()
            if not (lower.endswith(".nii") or lower.endswith(".nii.gz")):
                converted = tmp_dir / "input.nii.gz"
                sitk.WriteImage(sitk.ReadImage(str(source)), str(converted))
                source = converted
        target = Path(out_path) if out_path is not None else tmp_dir / f"labels_{task}.nii.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name.replace(".nii", ".partial.nii"))
        try:
            totalsegmentator(str(source), str(partial), ml=True, task=task, fast=fast, device=device, quiet=quiet)
        except SystemExit as err:  # TotalSegmentator calls sys.exit on licence problems
            raise InputError(f"TotalSegmentator stopped (exit {err.code}) for task '{task}'",
                             "run it by hand to see why (licensed tasks need `totalseg_set_license`)") from None
        except Exception as err:  # noqa: BLE001 - any failure of the third-party run becomes one line
            if _network_error(err):
                raise weights_error(task, fast) from None
            raise RegistrationError(f"TotalSegmentator failed on task '{task}': {type(err).__name__}: "
                                    f"{str(err).splitlines()[0][:200] if str(err) else ''}",
                                    "check the input image; run TotalSegmentator by hand for details") from None
        os.replace(partial, target)
        labels = sitk.Cast(sitk.ReadImage(str(target)), sitk.sitkUInt16)
        labels.SetMetaData("totalsegmentator_task", task)
        return labels
