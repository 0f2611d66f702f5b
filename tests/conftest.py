"""Shared test fixtures.

Real-data tests use ``../shared/data`` (next to the repository root) and skip with a clear reason when it
is absent, as it is in a user's clone. Everything else runs on small synthetic data made here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BREASTFUSION_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
BUSI_ROOT = SHARED_DATA / "busi" / "Dataset_BUSI_with_GT"


def require_shared(*parts: str) -> Path:
    """Return a path under ../shared/data or skip the test, saying what is missing."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: '{p}' is absent (tests read ../shared/data when it is there)")
    return p


@pytest.fixture
def busi_root() -> Path:
    return require_shared("busi", "Dataset_BUSI_with_GT")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def write_png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)
    return path
