"""Shared pytest fixtures. Real data lives in ../shared/data next to the repository (optional)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MultimodalPrealign"))  # works without `pip install -e` too

SHARED_DATA = Path(os.environ.get("MULTIMODAL_PREALIGN_SHARED_DATA", REPO.parent / "shared" / "data"))

#: The longest test files, longest first (by their summed test durations on 2 cores, measured 2026-11-30): collected
#: first, so that with ``--dist loadfile --no-loadscope-reorder`` (pyproject addopts) xdist starts them first and the
#: short files fill in at the end. xdist's default order (most tests first) left the 2-test cohort file (~80 s) for
#: the very end, on one worker while the other sat idle. The order changes nothing else: a file's tests keep theirs.
LONG_FILES_FIRST = (
    "test_batch_summary.py",  # 20-pair cohort on a local Dask cluster
    "test_structures.py",
    "test_pipeline_elastix.py",
    "test_pipeline_synthetic.py",
    "test_batch_dask.py",
    "test_realdata_end_to_end.py",
    "test_slicer_defects.py",
    "test_batch_resume.py",
    "test_search.py",
    "test_speed_choices.py",
    "test_structures_slicer.py",
    "test_anatomy.py",
    "test_brainsfit_engine.py",
    "test_slicer_tools.py",
    "test_verdict.py",
    "test_slicer_parameter_node.py",
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def phantom_pair(shared_data) -> tuple[Path, Path]:
    """(CT, T2 MR) of the MRI-DIR porcine phantom (CC BY 4.0, see its SOURCE.md)."""
    folder = shared_data / "mridir-phantom"
    return folder / "ct.nrrd", folder / "mr_t2.nrrd"


@pytest.fixture(scope="session")
def totalseg_examples(shared_data) -> Path:
    return shared_data / "totalseg-examples"


def pytest_collection_modifyitems(config, items):
    """Put the files of :data:`LONG_FILES_FIRST` first, in that order (a stable sort: the other files keep their
    order after them, and every file's tests keep theirs)."""
    rank = {name: index for index, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
