"""Prediction reads a clinical cell the way training did (issue #9, item 1): a run's own missing tokens
(``data.missing_values``) and the text it read as missing in a mostly-numeric column travel in the bundle, and
the classical models and the web service use them, not the built-in defaults.

A tiny SYNTHETIC bundle with random weights; the tests check how cells are read, not accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

CLASSES = ["benign", "malignant"]
TOKENS = ["no data", ""]  # this hospital's marker, not in the default list


def _bundle(path: Path) -> Path:
    import timm
    import torch

    from breastfusion.features.tabular import TabularPreprocessor
    from breastfusion.bundles.bundle import save_bundle
    from breastfusion.models.classical import adapt_to_size, make_classical, save_classical
    from breastfusion.models.fusion import FusionClassifier
    from breastfusion.tabular_inputs import numeric_for_classical

    rng = np.random.default_rng(0)
    age = rng.uniform(30, 80, 40).round().astype(object)
    age[::7] = "no data"
    table = pd.DataFrame({"age": age, "density": rng.choice(["A", "B", "C"], 40)})
    pre = TabularPreprocessor(missing_values=TOKENS).fit(table)
    assert pre.kinds_["age"] == "numeric"
    X = numeric_for_classical(table, missing_values=TOKENS)
    y = np.array(CLASSES * 20)
    skops = save_classical(adapt_to_size(make_classical("logreg"), len(X)).fit(X, y), path.parent / "logreg.skops")
    torch.manual_seed(0)
    backbone = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    dims = dict(image_dim=16, tabular_dim=8, tabular_hidden=16, fusion_hidden=16, dropout=0.1)
    model = FusionClassifier(len(CLASSES), variant="fusion", backbone=backbone, n_tabular=pre.n_features_out_, **dims)
    return save_bundle(
        path, model, classes=CLASSES,
        model_meta={"variant": "fusion", "backbone": "test_efficientnet", "n_tabular": pre.n_features_out_, **dims},
        image_meta={"size": 48, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                    "color": "gray_to_rgb"},
        tabular=pre, feature_meta={"clinical_columns": ["age", "density"], "radiomics": None,
                                   "classical": {"models": ["logreg"], "features": list(X.columns), "format": "skops"}},
        config_yaml="", synthetic=True, extra_files={"classical/logreg.skops": skops})


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return _bundle(tmp_path_factory.mktemp("reading") / "bundle")


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> pd.DataFrame:
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    rows = []
    for i, age in enumerate(["no data", "57", "No Data "]):
        p = root / f"c{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(p)  # SYNTHETIC noise image
        rows.append({"case_id": f"c{i}", "image_path": str(p), "age": age, "density": "B"})
    return pd.DataFrame(rows)


def test_classical_model_reads_the_runs_own_missing_tokens(bundle, cases):
    from breastfusion.inference.predictor import Predictor

    pred = Predictor.load(bundle, model="logreg", threads=1)
    out = pred.predict_cases(cases)
    assert pred.last_skipped.empty, pred.last_skipped.to_dict("records")
    assert list(out["case_id"]) == ["c0", "c1", "c2"]
    # 'no data' is missing, like a blank age: both rows get the same probabilities
    blank = pred.predict_cases(cases.assign(age=["", "57", ""]))
    np.testing.assert_allclose(out["prob_benign"].to_numpy(), blank["prob_benign"].to_numpy())


def test_service_reads_the_bundles_own_missing_tokens(bundle):
    from breastfusion.serve.engine import ServeModel

    engine = ServeModel(bundle, threads=1)
    values, _ = engine.parse_clinical([("age", "no data"), ("density", "B")], None)
    assert values["age"] is None
    values, _ = engine.parse_clinical([("age", "61")], None)
    assert values["age"] == 61.0
