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


def save_tiny_fusion_bundle(path: Path, table, features: dict, classes: list[str], *,
                            segmenter: Path | None = None) -> Path:
    """A SYNTHETIC fusion bundle (random ``test_efficientnet`` backbone, tiny heads) whose tabular preprocessor is
    fitted on ``table``; ``features`` is its feature metadata. ``segmenter``: a lesion segmenter file sealed in the
    bundle (the metadata then says masks are predicted)."""
    import timm
    import torch

    from breastfusion.bundles.bundle import save_bundle
    from breastfusion.bundles.integrity import SEGMENTER_FILE
    from breastfusion.features.tabular import TabularPreprocessor
    from breastfusion.models.fusion import FusionClassifier

    pre = TabularPreprocessor().fit(table)
    torch.manual_seed(0)
    backbone = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    dims = {"image_dim": 16, "tabular_dim": 8, "tabular_hidden": 16, "fusion_hidden": 16, "dropout": 0.1}
    model = FusionClassifier(len(classes), variant="fusion", backbone=backbone, n_tabular=pre.n_features_out_, **dims)
    extra = {}
    if segmenter is not None:
        extra[SEGMENTER_FILE] = segmenter
        features["segmenter"] = {"file": SEGMENTER_FILE, "require_lesion": True, "out_of_fold_quality": {}}
    return save_bundle(
        path, model, classes=classes,
        model_meta={"variant": "fusion", "backbone": "test_efficientnet", "n_tabular": pre.n_features_out_, **dims},
        image_meta={"size": 48, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                    "color": "gray_to_rgb"},
        tabular=pre, feature_meta=features, config_yaml="", synthetic=True, extra_files=extra)
