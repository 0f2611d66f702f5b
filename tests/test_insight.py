"""Report sections about the bundle: case selection for explanations, cross-fold calibration, failure notes."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from conftest import write_png

from breastfusion.evaluation.insight import (
    ReportSection,
    calibration_section,
    failed_section,
    select_explain_cases,
)
from breastfusion.evaluation.report import write_report

CLASSES = ["benign", "malignant", "normal"]


def _preds(n=90, seed=0, folds=3):
    """SYNTHETIC out-of-fold predictions: mostly right, some confident errors."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), y] += 2.5
    P = np.exp(6 * logits) / np.exp(6 * logits).sum(1, keepdims=True)  # true posterior is softmax(2.5 l): over-confident
    df = pd.DataFrame({"case_id": [f"c{i:03d}" for i in range(n)], "label": np.array(CLASSES)[y],
                       "fold": np.arange(n) % folds})
    for k, c in enumerate(CLASSES):
        df[f"prob_{c}"] = P[:, k]
    return df


def test_selection_covers_each_kind_and_is_exact():
    df = pd.DataFrame({"case_id": list("abcdefg"),
                       "label": ["benign", "benign", "malignant", "normal", "benign", "malignant", "normal"],
                       "prob_benign": [0.9, 0.6, 0.05, 0.1, 0.05, 0.34, 0.2],
                       "prob_malignant": [0.05, 0.3, 0.9, 0.1, 0.9, 0.33, 0.2],
                       "prob_normal": [0.05, 0.1, 0.05, 0.8, 0.05, 0.33, 0.6]})
    sel = select_explain_cases(df, CLASSES, 5)
    # each class's most confident correct case (a, c, d), then the most confident error (e), then the least
    # certain case (f, 0.34, an error too)
    assert sel["case_id"].tolist() == ["a", "c", "d", "e", "f"]
    assert sel.set_index("case_id").loc["e", "why"] == "confident error: benign called malignant"
    assert sel.set_index("case_id").loc["f", "predicted"] == "benign"
    assert select_explain_cases(df, CLASSES, 2)["case_id"].tolist() == ["a", "c"]
    assert select_explain_cases(df, CLASSES, 100)["case_id"].nunique() == 7  # never more than the cases
    assert len(select_explain_cases(df, CLASSES, 0)) == 0
    with pytest.raises(Exception, match="prob_normal"):
        select_explain_cases(df.drop(columns="prob_normal"), CLASSES, 3)


def test_selection_skips_rows_without_probabilities():
    df = _preds(12)
    df.loc[0, "prob_benign"] = np.nan
    assert "c000" not in set(select_explain_cases(df, CLASSES, 12)["case_id"])


def test_calibration_section_is_cross_fold_and_lowers_ece(tmp_path):
    sec = calibration_section({"m": _preds(300)}, CLASSES, tmp_path, method="lac", alpha=0.1)
    row = sec.table.iloc[0]
    assert float(row["ECE after"]) < float(row["ECE before"])  # over-confident scores get a temperature > 1
    cov = json.loads((tmp_path / "coverage.json").read_text())["m"]
    assert abs(cov["coverage"] - 0.9) < 0.06 and len(cov["calibrators"]) == 3  # one calibrator per fold
    assert all(c["n_cal"] == 200 for c in cov["calibrators"])  # each fitted on the other two folds only
    cal = pd.read_csv(tmp_path / "m_calibrated.csv")
    assert {"calprob_benign", "set", "refer"} <= set(cal.columns)
    assert sec.figures and sec.figures[0][0].exists()


def test_calibration_section_notes_a_model_it_cannot_calibrate(tmp_path):
    bad = _preds(30).assign(fold=0)  # one fold: no cross-fold calibration possible
    sec = calibration_section({"good": _preds(120), "bad": bad}, CLASSES, tmp_path)
    assert sec.table["model"].tolist() == ["good"]
    assert any(p.startswith("bad: not calibrated") for p in sec.paragraphs)


def test_sections_render_escaped_and_failed_sections_explain_themselves(tmp_path):
    preds = _preds(60)
    sec = ReportSection("x", "Extra <b>section</b>", ["a <script>alert(1)</script> note"],
                        pd.DataFrame({"col": ["<i>v</i>"]}))
    fail = failed_section("explanations", "Explanations (final bundle)", RuntimeError("no bundle"))
    path = write_report(tmp_path, title="t", model_results={"m": preds}, sections=[sec, fail],
                        evaluate_kwargs={"n_boot": 0})
    html = path.read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html and "Extra &lt;b&gt;section&lt;/b&gt;" in html
    assert 'href="#x-explanations"' in html and "could not be built: RuntimeError: no bundle" in html


# ------------------------------------------------------------------------------ explanations quote predict's output

def _calibrated_bundle(tmp_path):
    """A tiny random-weight fusion bundle (SYNTHETIC) whose calibration sharpens its probabilities (T < 1)."""
    import timm
    import torch

    from breastfusion.evaluation.calibration import fit_bundle_calibration
    from breastfusion.features.tabular import TabularPreprocessor
    from breastfusion.bundles.bundle import save_bundle
    from breastfusion.models.fusion import FusionClassifier

    clinical = pd.DataFrame({"age": [40.0, 55.0, 63.0, 48.0], "palpable": ["yes", "no", "yes", "no"]})
    pre = TabularPreprocessor().fit(clinical)
    torch.manual_seed(0)
    backbone = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    model = FusionClassifier(3, variant="fusion", backbone=backbone, n_tabular=pre.n_features_out_, image_dim=32,
                             tabular_dim=16, tabular_hidden=32, fusion_hidden=32, dropout=0.1).eval()
    # under-confident out-of-fold predictions (right 85% of the time with p = 0.5): the fitted temperature is < 1
    rng = np.random.default_rng(0)
    y = np.arange(300) % 3
    top = np.where(rng.random(300) < 0.85, y, (y + 1) % 3)
    P = np.full((300, 3), 0.25)
    P[np.arange(300), top] = 0.5
    oof = pd.DataFrame({"label": np.array(CLASSES)[y], **{f"prob_{c}": P[:, k] for k, c in enumerate(CLASSES)}})
    cal = fit_bundle_calibration(oof, CLASSES, alpha=0.1)
    assert cal["temperature"]["temperature"] < 0.8
    meta = {"variant": "fusion", "backbone": "tf_efficientnet_lite0", "n_tabular": pre.n_features_out_,
            "image_dim": 32, "tabular_dim": 16, "tabular_hidden": 32, "fusion_hidden": 32, "dropout": 0.1}
    image = {"size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    path = save_bundle(tmp_path / "bundle", model, classes=CLASSES, model_meta=meta, image_meta=image, tabular=pre,
                       feature_meta={"clinical_columns": list(clinical.columns), "radiomics": None}, config_yaml="",
                       synthetic=True, calibration=cal)
    rows = []
    for i in range(3):
        img = np.clip(rng.normal(90 + 40 * i, 30, (80, 80)), 0, 255).astype(np.uint8)
        p = write_png(tmp_path / "images" / f"case{i}.png", img)
        rows.append({"case_id": f"c{i}", "image_path": str(p), "label": CLASSES[i], **clinical.iloc[i].to_dict()})
    return path, pd.DataFrame(rows)


def test_explanations_quote_the_calibrated_probabilities_predict_returns(tmp_path):
    from breastfusion.evaluation.insight import explanation_section
    from breastfusion.explain.runner import explain_selection, quoted_probability
    from breastfusion.bundles.bundle import load_bundle
    from breastfusion.inference.predictor import Predictor

    bundle, cases = _calibrated_bundle(tmp_path)
    selection = pd.DataFrame({"case_id": cases["case_id"], "label": cases["label"], "predicted": "benign",
                              "probability": 0.5, "why": "least certain"})
    explained = explain_selection(bundle, cases, selection, tmp_path / "explain", seed=0)  # computed by the runner
    sec = explanation_section(explained, selection)                                          # only rendered
    expected = Predictor(load_bundle(bundle), threads=1, io_workers=1).predict_cases(cases).set_index("case_id")
    assert expected["calibrated"].all()
    raw = pd.read_csv(tmp_path / "explain" / "explanations.csv", dtype={"case_id": str}).set_index("case_id")
    caps = [cap for _, cap in sec.figures if cap.startswith("c")]
    assert len(caps) == 3
    col = "bundle prediction (calibrated)"
    assert col in sec.table.columns, list(sec.table.columns)
    for cap, (_, row) in zip(caps, sec.table.iterrows()):
        cid = row["case"]
        pred = expected.loc[cid, "predicted"]
        p = float(expected.loc[cid, f"prob_{pred}"])
        assert abs(p - float(raw.loc[cid, "probability"])) > 0.02  # calibration visibly changes this probability
        m = re.search(r"bundle (\w+) p = ([0-9.]+) \(calibrated", cap)
        assert m, cap
        assert m.group(1) == pred and abs(float(m.group(2)) - p) < 0.005, (cap, pred, p)
        assert row[col].startswith(f"{pred} {p:.2f}"), row[col]
        assert expected.loc[cid, "prediction_set"] in cap
        # the figure's own title (drawn by the explain runner) quotes the same calibrated probability
        probs = raw.loc[cid, [f"prob_{c}" for c in CLASSES]].to_numpy(dtype=float)
        title = quoted_probability(load_bundle(bundle), probs, CLASSES.index(pred))
        m = re.fullmatch(r"p = ([0-9.]+), calibrated", title)
        assert m and abs(float(m.group(1)) - p) < 0.0015, (title, p)
