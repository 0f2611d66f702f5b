"""Classical baselines on numeric feature tables (radiomics, encoded clinical data), scikit-learn style.

:func:`make_classical` builds a :class:`~sklearn.pipeline.Pipeline` by name:
``NumericOnly`` (refuses text columns, naming them) -> ``SimpleImputer(median, add_indicator=True)``
-> ``StandardScaler`` (linear and SVM models only) -> estimator.
:func:`fit_predict_oof` gives the project's common prediction table, out of fold.
:func:`save_classical` / :func:`load_classical` use skops with an explicit allow-list of types: never pickle.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from breastfusion.data.predictions import prediction_table, prob_columns
from breastfusion.errors import BundleError, DataError

CLASSICAL_MODELS = ("logreg", "svm", "rf", "lgbm")
PREDICTION_COLUMNS = ("case_id", "fold", "label")  # then prob_<class>..., predicted, model


class NumericOnly(TransformerMixin, BaseEstimator):
    """Pass a numeric table through as float64; refuse text, category or infinite values, naming the columns.

    Booleans and pandas nullable types (Int64, boolean with ``pd.NA``) become floats with NaN for missing.
    """

    def fit(self, X, y=None):
        _to_float_frame(X)
        if hasattr(X, "columns"):
            self.feature_names_in_ = np.asarray([str(c) for c in X.columns], dtype=object)
        self.n_features_in_ = int(np.shape(X)[1])
        return self

    def transform(self, X):
        return _to_float_frame(X)

    def get_feature_names_out(self, input_features=None):
        if input_features is not None:
            return np.asarray(input_features, dtype=object)
        return getattr(self, "feature_names_in_", np.asarray([f"x{i}" for i in range(self.n_features_in_)], dtype=object))


class LassoSelector(TransformerMixin, BaseEstimator):
    """Keep the features an L1-penalised logistic regression gives a non-zero weight (LASSO selection).

    Expects standardised inputs. Because it is a pipeline step, it is refitted on each training fold only, so
    the selection never sees a test case. If the penalty drops every feature, the ``min_features`` with the
    largest univariate F statistic are kept instead (a model needs at least one input).
    """

    def __init__(self, C: float = 0.1, min_features: int = 5, max_iter: int = 5000, seed: int = 0):
        self.C = C
        self.min_features = min_features
        self.max_iter = max_iter
        self.seed = seed

    def fit(self, X, y):
        from sklearn.feature_selection import f_classif
        from sklearn.linear_model import LogisticRegression

        X = np.asarray(X, dtype=np.float64)
        import sklearn

        # scikit-learn >= 1.8 spells the pure L1 penalty l1_ratio=1 (``penalty`` is deprecated there)
        l1 = {"l1_ratio": 1.0} if tuple(int(v) for v in sklearn.__version__.split(".")[:2]) >= (1, 8) else {"penalty": "l1"}
        lr = LogisticRegression(solver="saga", C=self.C, max_iter=self.max_iter, class_weight="balanced",
                                random_state=self.seed, **l1)
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            lr.fit(X, y)
        weight = np.abs(lr.coef_).max(axis=0)
        support = weight > 1e-8
        if support.sum() == 0:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # constant features: their F is NaN, ranked last
                f, _ = f_classif(X, y)
            f = np.nan_to_num(f, nan=0.0)
            support = np.zeros(X.shape[1], dtype=bool)
            support[np.argsort(-f)[: min(self.min_features, X.shape[1])]] = True
        self.support_ = support
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X):
        return np.asarray(X, dtype=np.float64)[:, self.support_]

    def get_feature_names_out(self, input_features=None):
        names = np.asarray(input_features if input_features is not None else
                           [f"x{i}" for i in range(self.n_features_in_)], dtype=object)
        return names[self.support_]


def _to_float_frame(X) -> pd.DataFrame:
    if not isinstance(X, pd.DataFrame):
        arr = np.asarray(X)
        if arr.ndim != 2:
            raise DataError(f"Classical models need a 2-D feature table. Got an array of shape {arr.shape}.")
        X = pd.DataFrame(arr, columns=[f"x{i}" for i in range(arr.shape[1])])
    bad = [
        str(c) for c in X.columns
        if not (pd.api.types.is_numeric_dtype(X[c]) or pd.api.types.is_bool_dtype(X[c]))
    ]
    if bad:
        shown = ", ".join(f"'{c}' ({X[c].dtype})" for c in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise DataError(
            f"Classical models accept numeric columns only; non-numeric column(s): {shown}. "
            "Encode categorical and text columns first (the tabular encoder does this)."
        )
    out = X.astype("float64")
    inf = np.isinf(out.to_numpy())
    if inf.any():
        cols = [str(c) for c, has in zip(out.columns, inf.any(axis=0)) if has]
        raise DataError(f"Infinite value(s) in column(s) {', '.join(map(repr, cols[:10]))}; use NaN for a missing value.")
    return out


def _estimator(name: str, class_weight, seed: int):
    if name == "logreg":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=1.0, max_iter=5000, class_weight=class_weight, random_state=seed)
    if name == "svm":
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.svm import SVC

        # Sigmoid (Platt) calibration on 3-fold out-of-fold decision values, one final SVC fitted on all rows
        # (SVC(probability=True) is deprecated since scikit-learn 1.9).
        svc = SVC(kernel="rbf", C=1.0, gamma="scale", class_weight=class_weight, random_state=seed)
        return CalibratedClassifierCV(svc, method="sigmoid", cv=3, ensemble=False)
    if name == "rf":
        from sklearn.ensemble import RandomForestClassifier

        return RandomForestClassifier(
            n_estimators=200, min_samples_leaf=2, max_features="sqrt",
            class_weight=class_weight, random_state=seed, n_jobs=1,
        )
    if name == "lgbm":
        from lightgbm import LGBMClassifier

        # Small and regularised for a few hundred rows; n_jobs=1 keeps it reproducible and polite on 2 cores.
        return LGBMClassifier(
            n_estimators=200, learning_rate=0.05, num_leaves=15, min_child_samples=10,
            subsample=0.8, subsample_freq=1, colsample_bytree=0.8, reg_lambda=1.0,
            class_weight=class_weight, random_state=seed, n_jobs=1, verbose=-1,
        )
    raise AssertionError(name)  # pragma: no cover - checked by _check_name


def _check_name(name) -> str:
    if name in CLASSICAL_MODELS:
        return name
    close = difflib.get_close_matches(str(name), CLASSICAL_MODELS, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ValueError(f"Unknown classical model {name!r}.{hint} Known: {', '.join(CLASSICAL_MODELS)}.")


def make_classical(name: str, *, class_weight: str | dict | None = "balanced", seed: int = 0,
                   select: str | None = None) -> Pipeline:
    """A fresh, unfitted pipeline for ``name`` in :data:`CLASSICAL_MODELS`; ``select='lasso'`` adds
    :class:`LassoSelector` (standardise, then select) before the estimator, fitted inside each fold."""
    name = _check_name(name)
    if not (class_weight is None or class_weight == "balanced" or isinstance(class_weight, dict)):
        raise ValueError(
            f"The 'class_weight' parameter of make_classical must be 'balanced', a dict or None. Got {class_weight!r} instead."
        )
    steps = [
        ("numeric", NumericOnly()),
        ("impute", SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True)),
    ]
    if select not in (None, "none", "lasso"):
        raise ValueError(f"The 'select' parameter of make_classical must be None or 'lasso'. Got {select!r} instead.")
    if select == "lasso":
        steps += [("scale", StandardScaler()), ("select", LassoSelector(seed=int(seed)))]
    elif name in ("logreg", "svm"):
        steps.append(("scale", StandardScaler()))
    steps.append(("model", _estimator(name, class_weight, int(seed))))
    return Pipeline(steps)


def adapt_to_size(model: Pipeline, n_train: int) -> Pipeline:
    """Shrink LightGBM's minimum leaf size on small training sets (it otherwise predicts a constant below
    ~30 cases); a no-op for the other estimators and for cohorts of 80 cases or more."""
    est = model.named_steps.get("model")
    if est is not None and type(est).__name__ == "LGBMClassifier":
        model.set_params(model__min_child_samples=int(min(10, max(2, n_train // 8))))
    return model


def predict_proba_frame(model, X, classes: list[str]) -> pd.DataFrame:
    """Probabilities as ``prob_<class>`` columns in the order of ``classes`` (a class the model never saw gets 0)."""
    proba = model.predict_proba(X)
    seen = [str(c) for c in model.classes_]
    unknown = sorted(set(seen) - set(classes))
    if unknown:
        raise DataError(f"The model predicts class(es) {unknown} that are not in classes={list(classes)}.")
    out = np.zeros((proba.shape[0], len(classes)))
    for j, c in enumerate(seen):
        out[:, list(classes).index(c)] = proba[:, j]
    index = X.index if isinstance(X, pd.DataFrame) else None
    return pd.DataFrame(out, columns=prob_columns(classes), index=index)


def _align(X: pd.DataFrame, y: pd.Series, splits: pd.DataFrame, classes: list[str]):
    if not isinstance(X, pd.DataFrame):
        raise TypeError(f"X must be a pandas DataFrame indexed by case_id. Got {type(X).__name__} instead.")
    if "case_id" in X.columns:
        X = X.set_index("case_id")
    X = X.copy()
    X.index = X.index.astype(str)
    if X.index.duplicated().any():
        raise DataError(f"X has duplicate case ids, e.g. '{X.index[X.index.duplicated()][0]}'.")
    if not isinstance(y, pd.Series):
        raise TypeError(f"y must be a pandas Series of labels indexed by case_id. Got {type(y).__name__} instead.")
    y = y.copy()
    y.index = y.index.astype(str)
    missing = X.index.difference(y.index)
    if len(missing):
        raise DataError(f"y has no label for {len(missing)} case(s) of X, e.g. '{missing[0]}'.")
    y = y.reindex(X.index)
    if y.isna().any():
        raise DataError(f"Case '{y.index[y.isna()][0]}' has no label.")
    y = y.astype(str)
    bad = ~y.isin(list(classes))
    if bad.any():
        raise DataError(f"Case '{y.index[bad][0]}' has label '{y[bad].iloc[0]}', not one of classes={list(classes)}.")
    for col in ("case_id", "fold"):
        if col not in splits.columns:
            raise DataError(f"The splits table has no '{col}' column (columns: {', '.join(map(str, splits.columns))}).")
    folds = splits.assign(case_id=splits["case_id"].astype(str)).drop_duplicates("case_id").set_index("case_id")["fold"]
    missing = X.index.difference(folds.index)
    if len(missing):
        raise DataError(f"The splits table has no fold for {len(missing)} case(s) of X, e.g. '{missing[0]}'.")
    folds = folds.reindex(X.index)
    if folds.isna().any():
        raise DataError(f"Case '{folds.index[folds.isna()][0]}' has an empty fold in the splits table.")
    return X, y, folds


def fit_predict_oof(
    X: pd.DataFrame,
    y: pd.Series,
    splits: pd.DataFrame,
    name: str,
    classes: list[str],
    seed: int = 0,
    *,
    class_weight: str | dict | None = "balanced",
    select: str | None = None,
) -> pd.DataFrame:
    """Out-of-fold predictions: for each fold, fit on the other folds and predict this one (feature
    selection, when ``select`` is given, is part of the pipeline and so fitted on the training folds only).

    ``X`` and ``y`` are indexed by case_id (or ``X`` has a ``case_id`` column); ``splits`` maps case_id
    to fold. Returns the common prediction table: ``case_id, fold, label, prob_<class>... (in classes
    order), predicted, model``, in the row order of ``X``.
    """
    name = _check_name(name)
    classes = [str(c) for c in classes]
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise ValueError(f"The 'classes' parameter of fit_predict_oof must list at least 2 distinct classes. Got {classes}.")
    X, y, folds = _align(X, y, splits, classes)
    _to_float_frame(X)  # fail before any fitting, naming bad columns
    template = make_classical(name, class_weight=class_weight, seed=seed, select=select)
    parts = []
    for fold in sorted(folds.unique()):
        test = (folds == fold).to_numpy()
        train_labels = y[~test]
        if train_labels.nunique() < 2:
            raise DataError(f"Fold {fold!r}: the other folds hold only class(es) {sorted(train_labels.unique())}; cannot fit.")
        model = adapt_to_size(clone(template), int((~test).sum())).fit(X[~test], train_labels)
        parts.append(predict_proba_frame(model, X[test], classes))
    proba = pd.concat(parts).reindex(X.index)[prob_columns(classes)]
    return prediction_table(X.index, proba.to_numpy(), classes, model=name, fold=folds.to_numpy(),
                            label=y.to_numpy())


# -------------------------------------------------------------------------------------- safe persistence

#: Types (classes only, no functions) that a classical pipeline of this module may contain and that skops
#: does not trust by default (skops 0.16 already trusts most scikit-learn classes; the sklearn entries keep
#: older/newer skops working). Anything else in a file is refused unless the caller names it in ``trusted``.
ALLOWED_TYPES = frozenset({
    "breastfusion.models.classical.NumericOnly",
    "sklearn.pipeline.Pipeline",
    "sklearn.impute._base.SimpleImputer",
    "sklearn.impute._base.MissingIndicator",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.preprocessing._label.LabelEncoder",
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.svm._classes.SVC",
    "sklearn.calibration.CalibratedClassifierCV",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.ensemble._forest.RandomForestClassifier",
    "sklearn.tree._classes.DecisionTreeClassifier",
    "sklearn.tree._tree.Tree",
    "lightgbm.sklearn.LGBMClassifier",
    "lightgbm.basic.Booster",
    "collections.OrderedDict",
    "numpy.dtype",
    "breastfusion.models.classical.LassoSelector",
})


def _check_types(types: list[str], trusted, where: str) -> list[str]:
    extra = set(trusted or ())
    unexpected = sorted(t for t in types if t not in ALLOWED_TYPES and t not in extra)
    if unexpected:
        raise BundleError(
            f"{where} contains type(s) outside the allow-list of classical models: {', '.join(unexpected)}. "
            "Refusing to load them; if you made this file and trust it, pass them in 'trusted'."
        )
    return list(types)


def save_classical(model, path: str | Path) -> Path:
    """Save a fitted pipeline with skops (no pickle), atomically. Refuses models holding unexpected types."""
    import skops.io as sio

    from breastfusion.utils import atomic_path

    path = Path(path)
    data = sio.dumps(model)
    _check_types(sio.get_untrusted_types(data=data), None, f"Model to save at '{path}'")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def load_classical(path: str | Path, trusted: list[str] | None = None):
    """Load a pipeline saved by :func:`save_classical`.

    Every type skops does not trust by default must be in :data:`ALLOWED_TYPES` or in ``trusted``;
    otherwise :class:`BundleError` names them and nothing is instantiated.
    """
    import skops.io as sio

    path = Path(path)
    if not path.is_file():
        raise BundleError(f"Classical model file not found: '{path}'.")
    data = path.read_bytes()
    try:
        types = sio.get_untrusted_types(data=data)
    except Exception as exc:  # a zip that is not a skops file, or a truncated one
        raise BundleError(f"'{path}' is not a readable skops file ({type(exc).__name__}: {exc}).") from exc
    types = _check_types(types, trusted, f"'{path}'")
    return sio.loads(data, trusted=types)
