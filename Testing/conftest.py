"""Shared pytest fixtures. Real data lives in ../shared/data next to the repository (optional)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MultimodalPrealign"))  # works without `pip install -e` too

SHARED_DATA = Path(os.environ.get("MULTIMODAL_PREALIGN_SHARED_DATA", REPO.parent / "shared" / "data"))


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
