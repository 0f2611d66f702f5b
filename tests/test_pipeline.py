"""End to end on a small SYNTHETIC cohort: train → report → bundle → predict (CLI and Python API)."""

import json

import numpy as np
import pandas as pd
import pytest

from breastfusion.cli import main
from breastfusion.config import load_config
from breastfusion.data.synthetic import make_synthetic_cohort
from breastfusion.errors import BundleError, DataError
from breastfusion.bundles.bundle import load_bundle
from breastfusion.inference.predictor import Predictor
from breastfusion.experiment import run_experiment

FAST = ["image.size=48", "model.backbone=test_efficientnet", "model.pretrained=false", "cv.n_splits=2",
        "train.stage1_epochs=1", "train.stage2_epochs=1", "train.tabular_epochs=3", "train.batch_size=8",
        "experiment.n_boot=50", "experiment.classical_models=[logreg, lgbm]", "train.channels_last=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    make_synthetic_cohort(root / "cohort", n_cases=36, image_size=64, seed=1)
    cfg = load_config(None, FAST + [f"data.source={root / 'cohort' / 'cases.csv'}"])
    result = run_experiment(cfg, root / "run", progress=False)
    return root, result


def test_run_outputs(run):
    root, result = run
    rd = result.run_dir
    for f in ("config.yaml", "cases.csv", "splits.csv", "audit/audit.json", "audit/audit.md", "metrics.json",
              "report/report.html", "features/radiomics.parquet"):
        assert (rd / f).exists(), f
    metrics = json.loads((rd / "metrics.json").read_text())
    assert metrics["synthetic_data"] is True
    assert set(metrics["models"]) == {"logreg", "lgbm", "fusion", "image_only", "tabular_only"}
    for name in metrics["models"]:
        preds = pd.read_csv(rd / "predictions" / f"{name}.csv")
        assert len(preds) == 36 and set(preds["fold"]) == {0, 1}
        np.testing.assert_allclose(preds.filter(like="prob_").sum(axis=1), 1.0, atol=1e-5)
    html = (rd / "report" / "report.html").read_text()
    assert "SYNTHETIC DATA" in html and "image_only" in html
    # the bundle's sections: cross-fold calibration and explained cases, as pictures
    assert "Calibration and deferral" in html and "Explanations (final bundle: fusion)" in html
    assert "reliability before and after temperature scaling" in html and "most confident correct" in html
    cov = json.loads((rd / "calibration" / "coverage.json").read_text())
    assert set(cov) == {"fusion"} and 0 <= cov["fusion"]["coverage"] <= 1
    pngs = sorted((rd / "explanations" / "cases").glob("*.png"))
    assert len(pngs) == 6 and html.count("data:image/png;base64") >= 6 + 2
    expl = pd.read_csv(rd / "explanations" / "explanations.csv")
    assert {"delta_image", "delta_tabular", "top1_feature"} <= set(expl.columns)
    # splits keep each patient inside one fold
    cases = pd.read_csv(rd / "cases.csv").merge(pd.read_csv(rd / "splits.csv"), on="case_id")
    assert cases.groupby("patient_id")["fold"].nunique().max() == 1


def test_bundle_contents_and_resume_reuses_outputs(run):
    root, result = run
    bundle = load_bundle(result.bundle)
    assert bundle.synthetic and bundle.classes == ["benign", "malignant", "normal"]
    assert bundle.meta["model"]["variant"] == "fusion" and bundle.meta["features"]["radiomics"]["columns"]
    assert not list(result.bundle.glob("*.pt")) and not list(result.bundle.glob("*.pkl"))
    before = (result.run_dir / "predictions" / "fusion.csv").stat().st_mtime_ns
    weights = (result.bundle / "model.safetensors").stat().st_mtime_ns
    report = (result.run_dir / "report" / "report.html").stat().st_mtime_ns
    cfg = load_config(result.run_dir / "config.yaml")
    run_experiment(cfg, result.run_dir, resume=True, progress=False)
    assert (result.run_dir / "predictions" / "fusion.csv").stat().st_mtime_ns == before
    assert (result.bundle / "model.safetensors").stat().st_mtime_ns == weights  # the finished bundle is reused
    assert (result.run_dir / "report" / "report.html").stat().st_mtime_ns > report  # the report is rebuilt


def test_predict_skips_bad_items_and_keeps_the_rest(run, tmp_path):
    root, result = run
    cases = pd.read_csv(root / "cohort" / "cases.csv")
    cases["image_path"] = [str(root / "cohort" / p) for p in cases["image_path"]]
    cases["mask_path"] = [";".join(str(root / "cohort" / q) for q in str(p).split(";")) if isinstance(p, str) and p else p
                          for p in cases["mask_path"]]
    sub = cases.head(6).copy()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    sub.loc[1, "image_path"] = str(tmp_path / "broken.png")
    sub.loc[2, "image_path"] = str(tmp_path / "absent.png")
    sub["age"] = sub["age"].astype(object)
    sub.loc[3, "age"] = "old"
    sub.to_csv(tmp_path / "in.csv", index=False)
    rc = main(["predict", str(result.bundle), str(tmp_path / "in.csv"), "--out", str(tmp_path / "out.csv"), "--quiet"])
    assert rc == 0
    out = pd.read_csv(tmp_path / "out.csv")
    skipped = pd.read_csv(tmp_path / "out.csv.skipped.csv")
    assert sorted(out["case_id"]) == sorted(sub["case_id"].iloc[[0, 4, 5]])
    assert {f"prob_{c}" for c in ("benign", "malignant", "normal")} <= set(out.columns)
    np.testing.assert_allclose(out.filter(like="prob_").sum(axis=1), 1.0, atol=1e-5)
    reasons = dict(zip(skipped["case_id"], skipped["reason"]))
    assert "broken.png" in reasons[sub.at[1, "case_id"]] and "absent.png" in reasons[sub.at[2, "case_id"]]
    assert "'age'" in reasons[sub.at[3, "case_id"]]


def test_predict_single_image_without_tabular_data(run):
    root, result = run
    img = sorted((root / "cohort" / "images").glob("*.png"))[0]
    out = Predictor.load(result.bundle).predict(img)
    assert len(out) == 1 and out["predicted"].iloc[0] in ("benign", "malignant", "normal")


def test_errors(run, tmp_path):
    root, result = run
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No images"):
        Predictor.load(result.bundle).predict(tmp_path / "empty")
    assert main(["predict", str(tmp_path / "nope"), str(tmp_path), "--out", str(tmp_path / "o.csv")]) == 2
    assert not (tmp_path / "o.csv").exists()


def test_bundle_carries_classical_models_for_prediction(run, tmp_path):
    from breastfusion.errors import BundleError

    root, result = run
    assert sorted(load_bundle(result.bundle).meta["features"]["classical"]["models"]) == ["lgbm", "logreg"]
    cases = pd.read_csv(root / "cohort" / "cases.csv").head(5)
    cases.to_csv(root / "cohort" / "five.csv", index=False)
    out = Predictor.load(result.bundle, model="lgbm").predict(root / "cohort" / "five.csv")
    assert len(out) == 5 and (out["model"] == "lgbm").all()
    np.testing.assert_allclose(out.filter(like="prob_").sum(axis=1), 1.0, atol=1e-6)
    with pytest.raises(BundleError, match="no model 'xgb'.*lgbm"):
        Predictor.load(result.bundle, model="xgb")


def test_bundle_is_calibrated_with_prediction_sets_and_a_model_card(run):
    """The final bundle stores temperature + conformal settings fitted on out-of-fold predictions; prediction
    outputs gain the set and a refer flag; MODEL_CARD.md is written and marks synthetic data."""
    _, result = run
    meta = load_bundle(result.bundle).meta
    cal = meta["calibration"]
    assert cal["target_coverage"] == pytest.approx(0.9) and cal["temperature"]["temperature"] > 0
    assert cal["conformal"]["method"] == "lac"
    card = (result.bundle / "MODEL_CARD.md").read_text()
    assert card.startswith("> **SYNTHETIC DATA.**") and "Calibration and deferral" in card and "macro_f1" in card
    root = result.run_dir.parent
    out = Predictor.load(result.bundle).predict(root / "cohort" / "cases.csv")
    assert {"prediction_set", "set_size", "refer", "calibrated"} <= set(out.columns)
    for _, row in out.iterrows():
        members = row["prediction_set"].split("|")
        assert row["predicted"] in members and len(members) == row["set_size"]
        assert row["refer"] == (row["set_size"] > 1)
    probs = out[[c for c in out.columns if c.startswith("prob_")]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-6)


def test_calibrate_adds_sets_and_card_to_an_existing_bundle(run, tmp_path):
    import shutil

    _, result = run
    b = tmp_path / "old_bundle"
    shutil.copytree(result.bundle, b)
    meta = json.loads((b / "bundle.json").read_text())
    meta["calibration"] = None  # as a bundle made before calibration existed
    meta.pop("integrity")  # (and before checksums existed)
    (b / "bundle.json").write_text(json.dumps(meta))
    (b / "MODEL_CARD.md").unlink()
    weights = (b / "model.safetensors").read_bytes()
    assert main(["calibrate", str(b), str(result.run_dir / "predictions" / "fusion.csv"), "--method", "aps",
                 "--alpha", "0.2"]) == 0
    cal = load_bundle(b).meta["calibration"]
    assert cal["conformal"]["method"] == "aps" and cal["target_coverage"] == pytest.approx(0.8)
    assert (b / "MODEL_CARD.md").exists() and (b / "model.safetensors").read_bytes() == weights
