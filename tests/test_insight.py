"""Report sections about the bundle: case selection for explanations, cross-fold calibration, failure notes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

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
