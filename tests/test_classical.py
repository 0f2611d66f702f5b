"""Tests of breastfusion.models.classical: one contract every model passes, OOF table, safe persistence."""

from __future__ import annotations

import collections

import numpy as np
import pandas as pd
import pytest

from breastfusion.errors import BundleError, DataError
from breastfusion.models.classical import (
    CLASSICAL_MODELS,
    fit_predict_oof,
    load_classical,
    make_classical,
    save_classical,
)

CLASSES = ["malignant", "benign", "normal"]  # deliberately not sorted: columns must follow this order


def _dataset(n_per_class=30, seed=0):
    """SYNTHETIC: three Gaussian blobs in 6 features (2 informative), a few NaN, case ids as index."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(CLASSES, n_per_class)
    centers = {"malignant": (0.0, 0.0), "benign": (3.0, 0.0), "normal": (0.0, 3.0)}
    X = rng.normal(size=(len(labels), 6))
    X[:, :2] += np.array([centers[c] for c in labels])
    X[rng.random(X.shape) < 0.03] = np.nan
    ids = [f"case{i:03d}" for i in range(len(labels))]
    X = pd.DataFrame(X, columns=[f"f{j}" for j in range(6)], index=pd.Index(ids, name="case_id"))
    y = pd.Series(labels, index=X.index, name="label")
    folds = pd.DataFrame({"case_id": ids, "fold": np.arange(len(ids)) % 3})
    return X, y, folds


@pytest.mark.parametrize("name", CLASSICAL_MODELS)
def test_classical_contract(name, tmp_path):
    X, y, splits = _dataset()
    Xt, yt, _ = _dataset(n_per_class=20, seed=1)
    model = make_classical(name, seed=0).fit(X, y)
    proba = model.predict_proba(Xt)
    assert proba.shape == (len(Xt), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    accuracy = (model.classes_[proba.argmax(axis=1)] == yt.to_numpy()).mean()
    assert accuracy > 0.6, f"{name}: accuracy {accuracy:.2f} barely beats chance (0.33)"

    # skops round trip: identical probabilities, no pickle.
    path = save_classical(model, tmp_path / f"{name}.skops")
    np.testing.assert_array_equal(load_classical(path).predict_proba(Xt), proba)

    oof = fit_predict_oof(X, y, splits, name, CLASSES, seed=0)
    assert list(oof.columns) == ["case_id", "fold", "label", *[f"prob_{c}" for c in CLASSES], "predicted", "model"]
    assert list(oof["case_id"]) == list(X.index) and (oof["model"] == name).all()
    assert (oof["fold"].to_numpy() == splits["fold"].to_numpy()).all()
    np.testing.assert_allclose(oof[[f"prob_{c}" for c in CLASSES]].sum(axis=1), 1.0, atol=1e-6)
    assert set(oof["predicted"]) <= set(CLASSES)
    assert (oof["predicted"] == oof["label"]).mean() > 0.6
    # Column order follows `classes`: the true class gets the highest mean probability.
    for c in CLASSES:
        means = oof.loc[oof["label"] == c, [f"prob_{k}" for k in CLASSES]].mean()
        assert means.idxmax() == f"prob_{c}"


def test_oof_does_not_see_the_predicted_fold():
    """Relabelling the cases of fold 0 must not change fold 0's predictions (only the other folds')."""
    X, y, splits = _dataset()
    base = fit_predict_oof(X, y, splits, "logreg", CLASSES)
    in_fold0 = (splits.set_index("case_id")["fold"] == 0).reindex(X.index).to_numpy()
    y2 = y.copy()
    y2[in_fold0] = np.roll(y2[in_fold0].to_numpy(), 7)
    other = fit_predict_oof(X, y2, splits, "logreg", CLASSES)
    prob = [f"prob_{c}" for c in CLASSES]
    np.testing.assert_allclose(base.loc[in_fold0, prob], other.loc[in_fold0, prob])
    assert not np.allclose(base.loc[~in_fold0, prob], other.loc[~in_fold0, prob])


def test_oof_accepts_case_id_column_and_checks_inputs():
    X, y, splits = _dataset(n_per_class=10)
    oof = fit_predict_oof(X.reset_index(), y, splits, "logreg", CLASSES)
    assert len(oof) == len(X)
    with pytest.raises(DataError, match="case000"):
        fit_predict_oof(X, y, splits[splits["case_id"] != "case000"], "logreg", CLASSES)
    with pytest.raises(DataError, match="not one of classes"):
        fit_predict_oof(X, y, splits, "logreg", ["malignant", "benign"])


def test_unknown_name_suggests_close_match():
    with pytest.raises(ValueError, match=r"Unknown classical model 'lgb'\. Did you mean 'lgbm'\? Known: logreg, svm, rf, lgbm"):
        make_classical("lgb")
    with pytest.raises(ValueError, match="Did you mean 'logreg'"):
        fit_predict_oof(*_dataset(n_per_class=5), "logreq", CLASSES)


def test_non_numeric_columns_are_named():
    X, y, splits = _dataset(n_per_class=10)
    X = X.assign(site=["A", "B"] * (len(X) // 2), birads=pd.Categorical(["3", "4"] * (len(X) // 2)))
    with pytest.raises(DataError, match=r"'site' \((object|str)\).*'birads' \(category\)"):
        make_classical("rf").fit(X, y)
    with pytest.raises(DataError, match="'site'"):
        fit_predict_oof(X, y, splits, "lgbm", CLASSES)


def test_booleans_and_nullable_ints_are_numeric():
    X, y, _ = _dataset(n_per_class=10)
    X = X.assign(
        flag=pd.array([True, False, None] * (len(X) // 3), dtype="boolean"),
        count=pd.array([1, None, 3] * (len(X) // 3), dtype="Int64"),
    )
    proba = make_classical("logreg").fit(X, y).predict_proba(X)
    assert np.isfinite(proba).all()


def test_infinite_values_are_named():
    X, y, _ = _dataset(n_per_class=10)
    X.iloc[4, 2] = np.inf
    with pytest.raises(DataError, match="'f2'"):
        make_classical("logreg").fit(X, y)


def test_load_refuses_unexpected_types(tmp_path):
    import skops.io as sio

    X, y, _ = _dataset(n_per_class=10)
    model = make_classical("logreg").fit(X, y)
    model.extra_ = collections.Counter(a=1)  # a type outside the allow-list
    with pytest.raises(BundleError, match="collections.Counter"):
        save_classical(model, tmp_path / "refused.skops")
    assert not (tmp_path / "refused.skops").exists()
    path = tmp_path / "foreign.skops"
    sio.dump(model, path)
    with pytest.raises(BundleError, match="collections.Counter"):
        load_classical(path)
    loaded = load_classical(path, trusted=["collections.Counter"])
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))
    not_skops = tmp_path / "model.pkl"
    not_skops.write_bytes(b"\x80\x04not a zip")
    with pytest.raises(BundleError, match="model.pkl"):
        load_classical(not_skops)
