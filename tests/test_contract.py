"""The contract every task keeps (SYNTHETIC data throughout).

Each task (``breastfusion.tasks``) and each of its bundle variants goes the same way: cross-validated fit →
out-of-fold prediction table → final bundle → ``Predictor.load`` → predict → ONNX export → predict with ONNX
Runtime; every step returns the one prediction-table schema of :mod:`breastfusion.data.predictions`. A new task
added to ``tasks.TASKS`` without a cohort here fails ``test_every_task_has_a_contract_cohort``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import breastfusion as bf
from breastfusion.config import load_config
from breastfusion.data.predictions import prob_columns
from breastfusion.inference.base import BundlePredictor
from breastfusion.bundles.bundle import load_bundle
from breastfusion.models.registry import network_kinds
from breastfusion.tasks.base import Task

ULTRASOUND = ["image.size=48", "model.backbone=test_efficientnet", "model.pretrained=false", "cv.n_splits=2",
              "train.stage1_epochs=1", "train.stage2_epochs=1", "train.tabular_epochs=2", "train.batch_size=8",
              "train.channels_last=false", "experiment.n_boot=20", "experiment.classical_models=[logreg]",
              "experiment.deep_models=[fusion,image,tabular]", "experiment.final_models=[fusion,image,tabular]",
              "experiment.explain_cases=0"]
HISTOLOGY = ["task=histology", "image.size=32", "train.batch_size=8", "train.stage1_epochs=1", "train.stage2_epochs=1",
             "experiment.classical_models=[logreg]", "experiment.n_boot=20", "experiment.explain_cases=0",
             "histology.token_grid=2", "histology.attention_dim=32", "histology.attention_heads=2",
             "histology.variants=[multiscale]", "cv.strategy=leave_one_center_out", 'data.labels=["1","2","3"]', "histology.pretrained=none"]


def _ultrasound(root):
    from breastfusion.data.synthetic import make_synthetic_cohort

    make_synthetic_cohort(root / "cohort", n_cases=30, image_size=64, seed=3)
    cfg = load_config(None, [*ULTRASOUND, f"data.source={root / 'cohort' / 'cases.csv'}"])
    result = bf.run_experiment(cfg, root / "run", progress=False)
    return result, {"source": root / "cohort" / "cases.csv"}


def _histology(root):
    from breastfusion.data.synthetic_histology import make_synthetic_grading

    make_synthetic_grading(root / "cohort", n_patients=9, stacks_per_case=2, size=32, n_centers=3, seed=2)
    cfg = load_config(None, [*HISTOLOGY, f"data.source={root / 'cohort' / 'cases.csv'}",
                             f"histology.tiles={root / 'cohort' / 'tiles.csv'}"])
    result = bf.run_experiment(cfg, root / "run", progress=False)
    return result, {"source": root / "cohort" / "tiles.csv", "cases": root / "cohort" / "cases.csv"}


COHORTS = {"ultrasound": _ultrasound, "histology": _histology}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request):
    cache = {}

    def get(task: str):
        if task not in cache:
            request.getfixturevalue("monkeypatch_offline")
            cache[task] = COHORTS[task](tmp_path_factory.mktemp(f"contract_{task}"))
        return cache[task]

    return get


@pytest.fixture(scope="module")
def monkeypatch_offline():
    mp = pytest.MonkeyPatch()
    mp.setenv("BREASTFUSION_OFFLINE", "1")
    yield
    mp.undo()


def check_schema(df: pd.DataFrame, classes: list[str]) -> None:
    """case_id first; prob_<class> for every class, in order, then predicted and model; rows sum to 1."""
    cols = list(df.columns)
    probs = prob_columns(classes)
    assert cols[0] == "case_id"
    assert probs[0] in cols, cols
    i = cols.index(probs[0])
    assert cols[i:i + len(probs) + 2] == [*probs, "predicted", "model"], cols
    assert not any(c.startswith("prob_") for c in cols[i + len(probs):]), cols
    if len(df):
        P = df[probs].to_numpy(dtype=float)
        np.testing.assert_allclose(P.sum(1), 1.0, atol=1e-5)
        assert (df["predicted"].to_numpy() == np.asarray(classes, dtype=object)[P.argmax(1)]).all()


def test_every_task_has_the_task_surface_and_a_predictor_for_its_networks():
    from breastfusion.inference.predictor import predictor_classes

    scored = {k for cls in predictor_classes() for k in cls.kinds}
    assert bf.tasks.names() == list(bf.tasks.TASKS)
    for task in bf.tasks.TASKS.values():
        assert isinstance(task, Task), task
        assert task.network_kinds and set(task.network_kinds) <= set(network_kinds()) and \
            set(task.network_kinds) <= scored, task.name
        assert bf.tasks.get(task.name) is task
    with pytest.raises(bf.ConfigError, match="known: ultrasound, histology"):
        bf.tasks.get("mammography")


def test_every_task_has_a_contract_cohort():
    assert set(COHORTS) == set(bf.tasks.names())


@pytest.mark.parametrize("task", list(COHORTS))
def test_out_of_fold_tables_share_one_schema(task, runs):
    result, _ = runs(task)
    classes = load_bundle(result.bundle).classes
    tables = sorted(p for p in (result.run_dir / "predictions").glob("*.csv") if not p.name.startswith("stacks_"))
    assert len(tables) >= 2  # a classical and a deep model at least
    for path in tables:
        df = pd.read_csv(path, dtype={"case_id": str, "label": str, "predicted": str})
        check_schema(df, classes)
        assert {"fold", "label"} <= set(df.columns), path.name
        assert df["model"].nunique() == 1 and df["model"].iloc[0] == path.stem


@pytest.mark.parametrize("task", list(COHORTS))
def test_every_bundle_goes_load_predict_onnx_predict_with_one_schema(task, runs, tmp_path):
    from breastfusion.inference.onnx_export import export_onnx

    result, inputs = runs(task)
    bundles = sorted(p for p in (result.run_dir / "bundles").iterdir() if (p / "bundle.json").exists())
    assert bundles
    for path in bundles:
        assert bf.tasks.for_bundle(load_bundle(path).meta) is bf.tasks.get(task)
        predictor = bf.Predictor.load(path)
        assert isinstance(predictor, BundlePredictor)
        preds = predictor.predict(inputs["source"], cases=inputs.get("cases"))
        check_schema(preds, predictor.classes)
        assert len(preds) > 0 and predictor.last_absent == []
        assert all(isinstance(t, pd.DataFrame) for t in predictor.extra_outputs().values())
        export_onnx(path)
        onnx = bf.Predictor.load(path, backend="onnx")
        again = onnx.predict(inputs["source"], cases=inputs.get("cases"))
        assert list(again.columns) == list(preds.columns), path.name
        probs = prob_columns(predictor.classes)
        np.testing.assert_allclose(again[probs].to_numpy(float), preds[probs].to_numpy(float), atol=1e-4)
