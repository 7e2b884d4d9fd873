"""What a finished pair records (``<id>/batch_record.json``) and the ``--resume`` check against it.

The record holds the pair's settings (``PipelineOptions.to_dict()`` before the run), a fingerprint of every
input and when/where the pair ran. Fingerprint of a file: size, modification time (ns) and SHA-256 of its
content; of a folder (a DICOM series, TotalSegmentator's mask folder): the same for every file in it, by
relative path. A pair counts as done when its folder holds the record and the outputs it lists, its settings
equal the ones asked for now, and every input still has the recorded size and SHA-256. A file whose size and
modification time are unchanged is not hashed again (its recorded SHA-256 is taken); a file that was touched or
copied is hashed, so a cohort copied to another disk still resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .. import __version__
from ..pipeline import PipelineOptions

RECORD_FILE = "batch_record.json"
RECORD_FORMAT = 1
_CHUNK = 1 << 20


def settings_of(options: PipelineOptions) -> dict:
    """The settings that decide a pair's result, as JSON types (what ``--resume`` compares)."""
    return json.loads(json.dumps(options.to_dict(), default=str))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_entry(path: Path, known: dict | None = None) -> dict:
    """{size, mtime_ns, sha256}; ``known``: a recorded entry whose hash is reused when size and mtime match."""
    stat = path.stat()
    if known and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": known["sha256"]}
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)}


def fingerprint(path, known: dict | None = None) -> dict:
    """Fingerprint of an input file or folder (see the module docstring); ``known``: its recorded fingerprint."""
    path = Path(path)
    if path.is_dir():
        known_files = (known or {}).get("files") or {}
        files = {}
        for item in sorted(path.rglob("*")):
            if item.is_file():
                name = item.relative_to(path).as_posix()
                files[name] = _file_entry(item, known_files.get(name))
        return {"kind": "folder", "files": files}
    return {"kind": "file", **_file_entry(path, known)}


def _same_content(a: dict, b: dict) -> bool:
    """Equal kind, sizes and SHA-256 (modification times may differ)."""
    if a.get("kind") != b.get("kind"):
        return False
    if a["kind"] == "folder":
        return (a["files"].keys() == b["files"].keys()
                and all(_same_content({"kind": "file", **a["files"][k]}, {"kind": "file", **b["files"][k]})
                        for k in a["files"]))
    return a.get("size") == b.get("size") and a.get("sha256") == b.get("sha256")


def input_fingerprints(job, known: dict | None = None) -> dict:
    """{role: fingerprint} of the pair's inputs (``known``: recorded fingerprints, to skip unchanged files)."""
    known = known or {}
    return {role: fingerprint(path, known.get(role)) for role, path in job.input_paths().items()}


def make_record(job, fingerprints: dict, settings: dict, worker: str, started_utc: str, finished_utc: str,
                outputs: list, seconds: float, run_token: str, threads: dict | None = None,
                cpu_seconds: float | None = None) -> dict:
    """The pair's batch_record.json. ``seconds``: wall time of the pair; ``cpu_seconds``: CPU time of its process
    meanwhile (user + system); ``threads``: ITK's default and the thread variables the pair ran with."""
    return {"format": RECORD_FORMAT, "tool": f"multimodal-prealign {__version__}", "id": job.id,
            "run_token": run_token, "threads": threads,
            "manifest_line": job.line, "inputs": {role: str(path) for role, path in job.input_paths().items()},
            "overrides": dict(job.overrides), "settings": settings, "input_fingerprints": fingerprints,
            "worker": worker, "started_utc": started_utc, "finished_utc": finished_utc,
            "seconds": round(seconds, 3),
            "cpu_seconds": round(cpu_seconds, 3) if cpu_seconds is not None else None,
            "outputs": list(outputs), "complete": True}


def read_record(pair_dir: Path) -> dict | None:
    try:
        record = json.loads((Path(pair_dir) / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def done_reason(job, pair_dir: Path) -> str | None:
    """None when ``pair_dir`` holds this job's finished result; else why it must run (one short phrase)."""
    pair_dir = Path(pair_dir)
    if not pair_dir.is_dir():
        return "not run yet"
    record = read_record(pair_dir)
    if record is None or not record.get("complete"):
        return "no batch record"
    missing = [name for name in record.get("outputs", []) if not (pair_dir / name).exists()]
    if missing or not record.get("outputs"):
        return "outputs missing: " + ", ".join(missing or ["(none recorded)"])
    if record.get("settings") != settings_of(job.options):
        return "settings changed"
    recorded = record.get("input_fingerprints") or {}
    if set(recorded) != set(job.input_paths()):
        return "inputs changed"
    for role, path in job.input_paths().items():
        if not os.path.exists(path) or not _same_content(fingerprint(path, recorded[role]), recorded[role]):
            return f"{role} input changed"
    return None
