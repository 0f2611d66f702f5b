"""Temperature scaling and split-conformal prediction sets, on synthetic probabilities made here."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from breastfusion.errors import DataError
from breastfusion.evaluation.calibration import (
    ConformalClassifier,
    TemperatureScaler,
    min_calibration_size,
)
from breastfusion.evaluation.coverage import (
    calibrate_predictions,
    coverage_report,
    plot_reliability_before_after,
)

CLASSES = ["benign", "malignant", "normal", "other"]


def synthetic(n: int, *, K: int = 4, T: float = 2.5, seed: int = 0):
    """Labels drawn from softmax(z); the 'model' reports softmax(T * z): over-confident by temperature T."""
    r = np.random.default_rng(seed)
    z = 1.2 * r.normal(size=(n, K))
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    y = (r.uniform(size=n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    y = np.minimum(y, K - 1)
    q = np.exp(T * (z - z.max(axis=1, keepdims=True)))
    q /= q.sum(axis=1, keepdims=True)
    return q, y, p


def nll(P, y):
    return float(-np.mean(np.log(np.clip(P[np.arange(len(y)), y], 1e-15, 1))))


def table(P, y, folds, classes=CLASSES, model="m"):
    df = pd.DataFrame({"case_id": [f"c{i:05d}" for i in range(len(y))], "fold": folds,
                       "label": [classes[k] for k in y]})
    for k, c in enumerate(classes):
        df[f"prob_{c}"] = P[:, k]
    df["predicted"] = [classes[k] for k in P.argmax(axis=1)]
    df["model"] = model
    return df


# --------------------------------------------------------------------------------------------------------
# Temperature scaling
# --------------------------------------------------------------------------------------------------------


def test_temperature_recovers_known_value_and_lowers_nll():
    q, y, _ = synthetic(5000, T=2.5, seed=1)
    ts = TemperatureScaler().fit(q, y)
    assert ts.temperature_ == pytest.approx(2.5, rel=0.08)
    qt, yt, pt = synthetic(3000, T=2.5, seed=2)
    out = ts.transform(qt)
    assert np.allclose(out.sum(axis=1), 1.0)
    assert (out.argmax(axis=1) == qt.argmax(axis=1)).all()  # the predicted class never changes
    assert nll(out, yt) < nll(qt, yt) - 0.1
    assert nll(out, yt) == pytest.approx(nll(pt, yt), abs=0.02)
    assert ts.nll_after_ < ts.nll_before_
    assert ts.nll(qt, yt) == pytest.approx(nll(out, yt), rel=1e-6)


def test_temperature_from_logits_and_under_confident():
    q, y, _ = synthetic(4000, T=0.5, seed=3)  # under-confident: T < 1 sharpens
    ts = TemperatureScaler().fit(q, y)
    assert ts.temperature_ == pytest.approx(0.5, rel=0.1)
    logits = np.log(q) + 7.0  # logits are only defined up to a per-row constant
    ts2 = TemperatureScaler().fit(logits, y, from_logits=True)
    assert ts2.temperature_ == pytest.approx(ts.temperature_, rel=1e-4)
    assert np.allclose(ts2.transform(logits, from_logits=True), ts.transform(q), atol=1e-6)


def test_temperature_round_trip_and_class_names():
    q, y, _ = synthetic(500, seed=4)
    names = [CLASSES[k] for k in y]
    ts = TemperatureScaler().fit(q, names, classes=CLASSES)
    d = json.loads(json.dumps(ts.to_dict()))
    back = TemperatureScaler.from_dict(d)
    assert back.temperature_ == ts.temperature_ and back.classes_ == CLASSES
    assert np.array_equal(back.transform(q), ts.transform(q))
    with pytest.raises(DataError, match="temperature"):
        TemperatureScaler.from_dict({**d, "temperature": -1.0})
    with pytest.raises(DataError, match="not fitted"):
        TemperatureScaler().transform(q)


def test_temperature_errors_name_the_problem():
    q, y, _ = synthetic(50, seed=5)
    with pytest.raises(DataError, match="empty"):
        TemperatureScaler().fit(np.zeros((0, 4)), [])
    bad = q.copy()
    bad[7, 2] = np.nan
    with pytest.raises(DataError, match=r"row index 7"):
        TemperatureScaler().fit(bad, y)
    with pytest.raises(DataError, match=r"row index 3.*label 9 is outside"):
        TemperatureScaler().fit(q, np.r_[y[:3], 9, y[4:]])
    with pytest.raises(DataError, match=r"unknown class 'cyst'"):
        TemperatureScaler().fit(q, ["benign"] * 49 + ["cyst"], classes=CLASSES)
    off = q.copy()
    off[4] *= 1.5
    with pytest.raises(DataError, match=r"row index 4.*sum to"):
        TemperatureScaler().fit(off, y)


# --------------------------------------------------------------------------------------------------------
# Conformal prediction sets
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,randomized", [("aps", False), ("aps", True), ("raps", False), ("raps", True),
                                               ("lac", False)])
@pytest.mark.parametrize("alpha", [0.1, 0.2])
def test_coverage_on_exchangeable_data(method, randomized, alpha):
    """Marginal coverage >= 1 - alpha (up to sampling noise) on many exchangeable cases, never empty sets."""
    covs, sizes = [], []
    for rep in range(8):
        q, y, _ = synthetic(3000, seed=100 + rep)
        cal, test = slice(0, 1000), slice(1000, None)
        cp = ConformalClassifier(method, alpha=alpha, randomized=randomized, seed=rep).fit(q[cal], y[cal])
        S = cp.predict_sets(q[test])
        assert S.dtype == bool and S.shape == (2000, 4)
        assert S.any(axis=1).all()
        assert S[np.arange(2000), q[test].argmax(axis=1)].all()  # the top class is always in the set
        covs.append(S[np.arange(2000), y[test]].mean())
        sizes.append(S.sum(axis=1).mean())
    cov = float(np.mean(covs))
    assert cov >= 1 - alpha - 0.015
    # non-randomised APS is conservative (valid but over-covers); the others are close to exact
    assert cov <= 1 - alpha + (0.06 if (method == "aps" and not randomized) else 0.03)
    assert 1.0 <= np.mean(sizes) < 4.0


def test_sets_grow_with_coverage_and_are_never_empty():
    q, y, _ = synthetic(2000, seed=6)
    sizes = []
    for alpha in (0.5, 0.2, 0.1, 0.05):
        S = ConformalClassifier("lac", alpha=alpha).fit(q[:1000], y[:1000]).predict_sets(q[1000:])
        assert S.sum(axis=1).min() >= 1
        sizes.append(S.sum(axis=1).mean())
    assert sizes == sorted(sizes)
    # a very permissive alpha gives a threshold below every test score: only the forced top class remains
    S = ConformalClassifier("aps", alpha=0.9).fit(q[:1000], y[:1000]).predict_sets(q[1000:])
    assert (S.sum(axis=1) >= 1).all()


def test_deterministic_by_default_and_seeded_when_randomized():
    q, y, _ = synthetic(1500, seed=7)
    a = ConformalClassifier("aps").fit(q[:500], y[:500]).predict_sets(q[500:])
    b = ConformalClassifier("aps").fit(q[:500], y[:500]).predict_sets(q[500:])
    assert np.array_equal(a, b)
    r1 = ConformalClassifier("raps", randomized=True, seed=3).fit(q[:500], y[:500]).predict_sets(q[500:])
    r2 = ConformalClassifier("raps", randomized=True, seed=3).fit(q[:500], y[:500]).predict_sets(q[500:])
    assert np.array_equal(r1, r2)


def test_finite_sample_quantile_rank():
    # scores 1 - p_y; with n = 19 and alpha = 0.1 the threshold is the ceil(20 * 0.9) = 18th smallest score
    p = np.linspace(0.3, 0.95, 19)
    P = np.column_stack([p, 1 - p])
    cp = ConformalClassifier("lac", alpha=0.1).fit(P, np.zeros(19, dtype=int))
    assert cp.qhat_ == pytest.approx(np.sort(1 - p)[17])
    assert min_calibration_size(0.1) == 9
    assert min_calibration_size(0.05) == 19
    assert min_calibration_size(0.2) == 4


def test_conformal_round_trip():
    q, y, _ = synthetic(800, seed=8)
    for method in ("aps", "raps", "lac"):
        cp = ConformalClassifier(method, alpha=0.1, k_reg=2, lam=0.05).fit(q[:400], [CLASSES[k] for k in y[:400]],
                                                                            classes=CLASSES)
        d = json.loads(json.dumps(cp.to_dict()))
        back = ConformalClassifier.from_dict(d)
        assert (back.method, back.alpha, back.k_reg, back.lam, back.qhat_, back.classes_) == (
            method, 0.1, 2, 0.05, cp.qhat_, CLASSES)
        assert np.array_equal(back.predict_sets(q[400:]), cp.predict_sets(q[400:]))
    with pytest.raises(DataError, match="split-conformal"):
        ConformalClassifier.from_dict({"kind": "temperature_scaling"})


def test_conformal_errors_name_the_problem():
    q, y, _ = synthetic(30, seed=9)
    with pytest.raises(DataError, match=r"has 5 case\(s\).*at least 19 calibration cases"):
        ConformalClassifier(alpha=0.05).fit(q[:5], y[:5])
    bad = q.copy()
    bad[12, 0] = np.nan
    with pytest.raises(DataError, match=r"row index 12"):
        ConformalClassifier().fit(bad, y)
    with pytest.raises(DataError, match=r"unknown class 'cyst'"):
        ConformalClassifier().fit(q, ["cyst"] + ["benign"] * 29, classes=CLASSES)
    with pytest.raises(DataError, match=r"label 4 is outside the classes 0..3"):
        ConformalClassifier().fit(q, np.r_[4, y[1:]])
    with pytest.raises(DataError, match="Unknown conformal method"):
        ConformalClassifier("naive")
    with pytest.raises(DataError, match="alpha"):
        ConformalClassifier(alpha=1.5)
    cp = ConformalClassifier().fit(q, y)
    with pytest.raises(DataError, match="3 class columns"):
        cp.predict_sets(q[:, :3])


# --------------------------------------------------------------------------------------------------------
# Prediction tables
# --------------------------------------------------------------------------------------------------------


def test_calibrate_predictions_columns_and_report(tmp_path):
    q, y, _ = synthetic(1200, seed=10)
    df = table(q, y, folds=np.arange(1200) % 4)
    out = calibrate_predictions(df, CLASSES, method="aps", alpha=0.1)
    assert list(out.index) == list(df.index) and out["case_id"].tolist() == df["case_id"].tolist()
    for c in CLASSES:
        assert f"calprob_{c}" in out.columns
    cal = out[[f"calprob_{c}" for c in CLASSES]].to_numpy()
    assert np.allclose(cal.sum(axis=1), 1.0)
    assert (out["set_size"] == out["set"].str.split("|").str.len()).all()
    assert out["set_size"].min() >= 1
    assert (out["refer"] == (out["set_size"] > 1)).all() and out["refer"].dtype == bool
    folds = out.attrs["calibration"]["folds"]
    assert [f["fold"] for f in folds] == [0, 1, 2, 3] and all(f["n_cal"] == 900 for f in folds)
    assert all(f["temperature"] == pytest.approx(2.5, rel=0.15) for f in folds)

    r = coverage_report(out, CLASSES)
    assert r["coverage"] == pytest.approx(0.9, abs=0.04)
    assert r["ece_after"] < r["ece_before"]
    assert r["nll_after"] < r["nll_before"]
    assert r["refer_rate"] == pytest.approx(float(out["refer"].mean()))
    assert r["mean_set_size"] == pytest.approx(float(out["set_size"].mean()))
    assert set(r["per_class"]) == set(CLASSES) and len(r["per_fold"]) == 4
    assert r["method"] == "aps" and r["target_coverage"] == pytest.approx(0.9)
    json.dumps(r)

    png = plot_reliability_before_after(out, CLASSES, tmp_path / "rel.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrate_predictions_never_uses_a_folds_own_rows():
    """Flipping every label of fold 0 must not change fold 0's calibrated output (its calibration comes
    from folds 1-3 only) but must change the other folds' (fold 0 is part of their calibration set)."""
    q, y, _ = synthetic(1200, seed=11)
    folds = np.arange(1200) % 4
    df = table(q, y, folds)
    flipped_y = y.copy()
    f0 = folds == 0
    flipped_y[f0] = q[f0].argmin(axis=1)  # each fold-0 case relabelled as its least likely class
    df_flip = table(q, flipped_y, folds)
    for method in ("aps", "lac"):
        a = calibrate_predictions(df, CLASSES, method=method, alpha=0.1)
        b = calibrate_predictions(df_flip, CLASSES, method=method, alpha=0.1)
        cols = [f"calprob_{c}" for c in CLASSES] + ["set", "set_size", "refer"]
        pd.testing.assert_frame_equal(a.loc[f0, cols], b.loc[f0, cols])
        assert a.attrs["calibration"]["folds"][0] == b.attrs["calibration"]["folds"][0]
        assert not a.loc[~f0, "set"].equals(b.loc[~f0, "set"])
        # and by construction: fold 0's output equals calibrators fitted on the other folds by hand
        ts = TemperatureScaler().fit(q[~f0], flipped_y[~f0])
        cp = ConformalClassifier(method, alpha=0.1).fit(ts.transform(q[~f0]), flipped_y[~f0])
        sets = cp.predict_sets(ts.transform(q[f0]))
        assert np.allclose(b.loc[f0, [f"calprob_{c}" for c in CLASSES]].to_numpy(), ts.transform(q[f0]))
        assert b.loc[f0, "set_size"].tolist() == sets.sum(axis=1).tolist()
    # the flipped fold is badly covered: its labels are the classes the calibration says are least likely
    assert coverage_report(b)["per_fold"][0]["coverage"] < 0.5


def test_calibrate_predictions_errors():
    q, y, _ = synthetic(40, seed=12)
    df = table(q, y, folds=0)
    with pytest.raises(DataError, match="at least two folds"):
        calibrate_predictions(df, CLASSES)
    with pytest.raises(DataError, match=r"has no fold"):
        calibrate_predictions(table(q, y, folds=-1), CLASSES)
    small = table(q[:12], y[:12], folds=np.arange(12) % 4)
    with pytest.raises(DataError, match=r"other than fold 0.*at least 19 calibration cases"):
        calibrate_predictions(small, CLASSES, alpha=0.05)
    bad = df.copy()
    bad.loc[5, "prob_benign"] = np.nan
    with pytest.raises(DataError, match=r"row 7 \(case 'c00005'\)"):
        calibrate_predictions(bad, CLASSES, by_fold=False)
    unknown = df.copy()
    unknown.loc[3, "label"] = "cyst"
    with pytest.raises(DataError, match=r"unknown class 'cyst'"):
        calibrate_predictions(unknown, CLASSES, by_fold=False)
    out = calibrate_predictions(df, CLASSES, by_fold=False)  # in-sample: one calibrator on the whole table
    assert out.attrs["calibration"]["folds"][0]["n_cal"] == 40
    with pytest.raises(DataError, match="calibrate_predictions first"):
        coverage_report(df, CLASSES)


def _imbalanced(n: int, seed: int):
    """SYNTHETIC 3-class data with a rare class (about 10 %) that the scores under-rate."""
    r = np.random.default_rng(seed)
    z = r.normal(size=(n, 3)) + np.array([1.6, 0.6, 0.0])
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = np.minimum((r.uniform(size=n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1), 2)
    return p, y


def test_class_conditional_sets_cover_every_class():
    marginal, mondrian = [], []
    for rep in range(6):
        p, y = _imbalanced(6000, seed=300 + rep)
        cal, test = slice(0, 3000), slice(3000, None)
        for out, cc in ((marginal, False), (mondrian, True)):
            cp = ConformalClassifier("lac", alpha=0.1, class_conditional=cc).fit(p[cal], y[cal])
            S = cp.predict_sets(p[test])
            yt = y[test]
            out.append([S[np.arange(len(yt)), yt][yt == k].mean() for k in range(3)])
    marginal, mondrian = np.mean(marginal, 0), np.mean(mondrian, 0)
    assert marginal.min() < 0.85  # average coverage hides a badly covered class
    assert (mondrian >= 0.9 - 0.02).all() and (mondrian <= 0.9 + 0.04).all()


def test_class_conditional_round_trip_and_small_class_error():
    p, codes = _imbalanced(2000, seed=7)
    y = np.array(["a", "b", "c"])[codes]
    cp = ConformalClassifier("aps", alpha=0.1, class_conditional=True).fit(p, y, classes=["a", "b", "c"])
    d = json.loads(json.dumps(cp.to_dict()))
    assert d["class_conditional"] is True and len(d["qhat_per_class"]) == 3
    back = ConformalClassifier.from_dict(d)
    assert np.array_equal(back.predict_sets(p[:50]), cp.predict_sets(p[:50]))
    with pytest.raises(DataError, match="per-class thresholds"):
        ConformalClassifier.from_dict({**d, "qhat_per_class": None})
    few = np.concatenate([np.flatnonzero(codes != 2)[:200], np.flatnonzero(codes == 2)[:5]])
    with pytest.raises(DataError, match="'c' has 5"):
        ConformalClassifier("lac", alpha=0.1, class_conditional=True).fit(p[few], y[few], classes=["a", "b", "c"])


def test_calibrate_predictions_class_conditional_reports_per_class_coverage():
    p, y = _imbalanced(3000, seed=11)
    df = table(p, y, np.arange(3000) % 3, classes=["benign", "malignant", "normal"])
    out = calibrate_predictions(df, method="lac", alpha=0.1, class_conditional=True)
    rep = coverage_report(out)
    assert rep["class_conditional"] is True
    assert all(abs(v["coverage"] - 0.9) < 0.05 for v in rep["per_class"].values())


def test_auto_uses_per_class_thresholds_only_with_enough_cases_of_every_class():
    from breastfusion.evaluation.calibration import fit_bundle_calibration, resolve_class_conditional

    assert resolve_class_conditional("auto", {"a": 9, "b": 40}, 0.1) is True  # 9 = the minimum at alpha 0.1
    assert resolve_class_conditional("auto", {"a": 8, "b": 40}, 0.1) is False
    assert resolve_class_conditional(True, {"a": 1}, 0.1) is True
    p, y = _imbalanced(400, seed=3)
    df = table(p, y, np.arange(400) % 4, classes=["benign", "malignant", "normal"])
    assert fit_bundle_calibration(df, ["benign", "malignant", "normal"])["conformal"]["class_conditional"] is True
    rare = df[(df["label"] != "normal") | (np.arange(400) < 40)]  # keeps only a handful of 'normal' cases
    assert (rare["label"] == "normal").sum() < 9
    cal = fit_bundle_calibration(rare, ["benign", "malignant", "normal"])
    assert cal["conformal"]["class_conditional"] is False
    out = calibrate_predictions(rare, method="lac", alpha=0.1, class_conditional="auto")
    assert out.attrs["calibration"]["class_conditional"] is False
