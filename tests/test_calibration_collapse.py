"""Issue 9, item 2: temperature scaling must not collapse to its search bound, and an uncalibrated model must
say so (bundle calibration dict, cross-fold report section, model card). SYNTHETIC probabilities made here."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from breastfusion.evaluation.calibration import (
    T_BOUNDS,
    TemperatureScaler,
    apply_bundle_calibration,
    fit_bundle_calibration,
)
from breastfusion.evaluation.coverage import calibrate_predictions, coverage_report

CLASSES = ["benign", "malignant", "normal"]


def separable(n: int = 150, seed: int = 0):
    """SYNTHETIC out-of-fold probabilities that make no error: the true class is always the top class, with a
    confidence between 0.5 and 0.95 (what the demo's fusion model gives on its easy synthetic cohort)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    top = rng.uniform(0.5, 0.95, n)
    rest = rng.dirichlet([1, 1], n) * (1 - top)[:, None]
    P = np.empty((n, 3))
    for i in range(n):
        others = [k for k in range(3) if k != y[i]]
        P[i, y[i]] = top[i]
        P[i, others] = rest[i]
    return P, y


def table(P, y, folds):
    df = pd.DataFrame({"case_id": [f"c{i:04d}" for i in range(len(y))], "fold": folds,
                       "label": np.asarray(CLASSES, dtype=object)[y]})
    for k, c in enumerate(CLASSES):
        df[f"prob_{c}"] = P[:, k]
    df["predicted"] = np.asarray(CLASSES, dtype=object)[P.argmax(1)]
    df["model"] = "m"
    return df


def noisy(n: int = 300, seed: int = 1):
    """SYNTHETIC over-confident probabilities with errors: labels from softmax(z), model says softmax(3 z)."""
    rng = np.random.default_rng(seed)
    z = 1.2 * rng.normal(size=(n, 3))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.minimum((rng.uniform(size=n)[:, None] > np.cumsum(p, 1)).sum(1), 2)
    q = np.exp(3 * z) / np.exp(3 * z).sum(1, keepdims=True)
    return q, y


# ---------------------------------------------------------------------------------------- the scaler itself


def test_no_errors_keeps_temperature_one_and_says_uncalibrated():
    P, y = separable()
    ts = TemperatureScaler().fit(P, y)
    # before the fix: T ran to the bound 0.01 and every probability became 0 or 1
    assert ts.temperature_ == 1.0
    assert ts.status_ == "uncalibrated" and not ts.calibrated
    assert "no error" in ts.reason_ and ts.n_errors_ == 0
    out = ts.transform(P)
    assert np.allclose(out, P, atol=1e-9)  # probabilities are left as the model gave them
    assert out.max() < 0.999 and out.min() > 1e-6
    d = json.loads(json.dumps(ts.to_dict()))
    assert d["status"] == "uncalibrated" and "no error" in d["reason"] and d["temperature"] == 1.0
    back = TemperatureScaler.from_dict(d)
    assert back.status_ == "uncalibrated" and back.reason_ == ts.reason_


def test_optimum_at_the_upper_bound_is_refused_too():
    # the true class is always the *least* likely one: the likelihood keeps rising as T grows without bound
    P, y = separable(120, seed=3)
    wrong = (y + 1) % 3
    ts = TemperatureScaler().fit(P, wrong)
    assert ts.temperature_ == 1.0 and ts.status_ == "uncalibrated"
    assert "bound" in ts.reason_ and f"{T_BOUNDS[1]:g}" in ts.reason_


def test_a_normal_case_still_calibrates():
    q, y = noisy()
    ts = TemperatureScaler().fit(q, y)
    assert ts.status_ == "calibrated" and ts.calibrated and ts.reason_ is None and ts.n_errors_ > 0
    assert 2.0 < ts.temperature_ < 4.5 and ts.nll_after_ < ts.nll_before_


def test_old_descriptions_without_a_status_read_as_calibrated():
    d = {"kind": "temperature_scaling", "temperature": 1.7, "n_classes": 3}
    ts = TemperatureScaler.from_dict(d)
    assert ts.status_ == "calibrated" and ts.calibrated and ts.temperature_ == 1.7


# ------------------------------------------------------------------------------------------ bundle and report


def test_bundle_calibration_without_errors_is_honest():
    P, y = separable()
    df = table(P, y, np.arange(len(y)) % 3)
    cal = fit_bundle_calibration(df, CLASSES, method="lac", alpha=0.1)
    assert cal["status"] == "uncalibrated" and "no error" in cal["reason"]
    assert cal["temperature"]["temperature"] == 1.0 and cal["n_errors"] == 0
    notes = " ".join(cal["warnings"])
    assert "single class" in notes and "refer" in notes
    Pc, sets, size, refer = apply_bundle_calibration(P[:5], cal, CLASSES)
    assert np.allclose(Pc, P[:5])  # not pushed to 0/1 (before the fix: 1e-125 for the other classes)
    json.dumps(cal)  # stored in bundle.json


def test_bundle_calibration_with_errors_is_calibrated():
    q, y = noisy()
    cal = fit_bundle_calibration(table(q, y, np.arange(len(y)) % 3), CLASSES, method="lac", alpha=0.1)
    assert cal["status"] == "calibrated" and cal["reason"] is None and cal["n_errors"] > 0
    assert cal["temperature"]["temperature"] > 1.5 and not cal["warnings"]


def test_cross_fold_calibration_without_errors_keeps_probabilities_and_reports_it():
    P, y = separable()
    df = table(P, y, np.arange(len(y)) % 3)
    out = calibrate_predictions(df, CLASSES, method="lac", alpha=0.1)
    cal = out[[f"calprob_{c}" for c in CLASSES]].to_numpy()
    assert np.allclose(cal, P, atol=1e-9)
    folds = out.attrs["calibration"]["folds"]
    assert all(f["temperature"] == 1.0 and f["temperature_status"] == "uncalibrated" for f in folds)
    rep = coverage_report(out, CLASSES)
    assert rep["calibration_status"] == "not calibrated" and rep["n_errors"] == 0
    notes = " ".join(rep["notes"])
    assert "no error" in notes and "cannot be estimated" in notes


def test_report_section_says_not_calibrated_instead_of_a_success_ece(tmp_path):
    from breastfusion.evaluation.insight import calibration_section

    P, y = separable()
    q, yq = noisy()
    sec = calibration_section({"easy": table(P, y, np.arange(len(y)) % 3),
                               "hard": table(q, yq, np.arange(len(yq)) % 3)}, CLASSES, tmp_path,
                              method="lac", alpha=0.1)
    rows = sec.table.set_index("model")
    assert rows.loc["easy", "status"].startswith("not calibrated")
    assert rows.loc["easy", "ECE after"] == "—"  # before the fix: 0.000, shown as a success
    assert rows.loc["hard", "status"] == "calibrated" and rows.loc["hard", "ECE after"] != "—"
    text = " ".join(sec.paragraphs)
    assert "easy: not calibrated:" in text and "no error" in text
    assert "hard: not calibrated" not in text
    cov = json.loads((tmp_path / "coverage.json").read_text())
    assert cov["easy"]["calibration_status"] == "not calibrated"


def test_model_card_says_not_calibrated():
    from breastfusion.bundles.card import model_card

    P, y = separable()
    cal = fit_bundle_calibration(table(P, y, np.arange(len(y)) % 3), CLASSES)
    card = model_card({"classes": CLASSES, "calibration": cal})
    section = card.split("## Calibration and deferral", 1)[1].split("## Intended use", 1)[0]
    assert "Not calibrated" in section and "no error" in section and "T = 1.000" not in section
    assert "refer" in section
    q, yq = noisy()
    good = model_card({"classes": CLASSES, "calibration": fit_bundle_calibration(
        table(q, yq, np.arange(len(yq)) % 3), CLASSES)})
    assert "Temperature scaling, T = " in good and "Not calibrated" not in good


def test_model_card_lists_clinical_inputs_with_labels_and_units():
    from breastfusion.bundles.card import model_card

    card = model_card({"classes": CLASSES, "features": {
        "clinical_columns": ["age", "density"],
        "column_info": {"age": {"label": "Age at diagnosis", "unit": "years", "description": None}}}})
    assert "Clinical inputs: Age at diagnosis (`age`, years); Density (`density`)." in card
