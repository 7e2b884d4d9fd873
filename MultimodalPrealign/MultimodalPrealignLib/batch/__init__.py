"""Cohorts: register hundreds of pairs from a manifest, locally or on a Dask cluster (``multimodal-prealign batch``).

Laid out in the order a batch runs (docs/batch.md):

* :mod:`manifest`: read and check the manifest (one row per pair; every bad row reported at once);
* :mod:`record`: the settings and input checksums a finished pair records, and the ``--resume`` check;
* :mod:`pair`: one pair, run into a staging folder and moved into ``<batch folder>/<id>/`` at once
  (:func:`pair.run_pair`; it never raises for the pair's own failure);
* :mod:`executors`: where pairs run: this process (one after another) or Dask (a LocalCluster or a
  running scheduler); Dask is the optional ``batch`` extra, imported only when used;
* :mod:`summary`: one row per pair; ``summary.csv``, ``summary.json``, ``summary.html`` (written atomically);
* :mod:`cohort`: :func:`run`, the whole batch (also what the Slicer script calls); :mod:`command`: the CLI.

Python::

    from MultimodalPrealignLib import batch
    from MultimodalPrealignLib.pipeline import PipelineOptions
    result = batch.run("cohort.csv", "out", PipelineOptions.create(prealign="search"), workers=2)
    result.exit_code, result.counts, result.rows[0]["verdict"]
"""

from __future__ import annotations

from .cohort import BatchResult, run
from .command import add_cli
from .manifest import ROW_OPTIONS, ManifestError, PairJob, read_manifest
from .pair import register_runner, run_pair
from .summary import ROW_FIELDS, SUMMARY_FILES

__all__ = ["ROW_FIELDS", "ROW_OPTIONS", "SUMMARY_FILES", "BatchResult", "ManifestError", "PairJob", "add_cli",
           "read_manifest", "register_runner", "run", "run_pair"]
