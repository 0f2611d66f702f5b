"""Classification metrics on the common prediction table, with bootstrap confidence intervals.

The prediction table
--------------------
One row per case: ``case_id``, ``label`` (true class), ``prob_<class>`` for every class (rows sum to 1),
``predicted`` (class name; derived from the arg-max when absent), and optionally ``fold`` (int; -1 or NaN for
a single hold-out) and ``model``. The class order is the order of the ``prob_`` columns unless an explicit
``classes`` list is given.

Every metric is computed by one vectorised routine from a matrix of case *weights* (``W``, shape
``(B, n)``): the point estimate uses one row of ones, a bootstrap uses one row of resampling counts per
resample and the per-fold metrics use one 0/1 row per fold. The point estimates and the bootstrap
therefore cannot drift apart, and 1000 resamples of a few hundred cases take well under a second.

Conventions (they match scikit-learn where scikit-learn defines the metric):

* ``balanced_accuracy`` is the mean recall over the classes present in the true labels.
* ``macro_f1`` averages the per-class F1 over *all* classes, an undefined F1 (class neither present nor
  predicted) counting as 0 (``f1_score(..., labels=classes, average="macro", zero_division=0)``).
* ``weighted_f1`` weights the per-class F1 by support.
* Per-class sensitivity / specificity / PPV / NPV are NaN when their denominator is 0.
* One-vs-rest ROC-AUC per class is NaN when the class is absent from (or is all of) the true labels;
  ``macro_auc`` is the mean over the classes where it is defined, with a note saying so.
* ``quadratic_weighted_kappa`` (``ordinal=True``) treats the class order as the ordinal scale.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from breastfusion.errors import DataError
from breastfusion.missing import ABSENT, is_missing

PROB_PREFIX = "prob_"
SUM_TOLERANCE = 1e-3
_CHUNK = 200  # bootstrap resamples evaluated at once ...
_CHUNK_CELLS = 2_000_000  # ... and at most this many (resample, case) cells per array (~16 MB)

#: Scalar metrics reported for every evaluation, in display order.
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "macro_auc", "brier")
#: Per-class metrics, in display order.
PER_CLASS = ("sensitivity", "specificity", "ppv", "npv", "f1", "auc")


# ---------------------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------------------


def classes_from(predictions: pd.DataFrame) -> list[str]:
    """The class names, in the order of the ``prob_<class>`` columns."""
    if not isinstance(predictions, pd.DataFrame):
        raise TypeError(f"The prediction table must be a pandas DataFrame. Got {type(predictions).__name__}.")
    classes = [str(c)[len(PROB_PREFIX):] for c in predictions.columns if str(c).startswith(PROB_PREFIX)]
    if not classes:
        raise DataError(
            "Prediction table has no 'prob_<class>' columns (columns: "
            f"{', '.join(map(str, predictions.columns))})."
        )
    return classes


def _as_class_name(v) -> str | None:
    """Class names are strings; 1, 1.0 and '1' all name class '1' (histology grades)."""
    if is_missing(v, ABSENT):
        return None
    if isinstance(v, (bool, np.bool_)):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v).strip()


class _Prepared:
    """Validated arrays of a prediction table."""

    def __init__(self, *, classes, y, pred, P, case_ids, folds, groups, n_groups, model):
        self.classes: list[str] = classes
        self.y: np.ndarray = y  # (n,) int class codes
        self.pred: np.ndarray = pred  # (n,) int class codes
        self.P: np.ndarray = P  # (n, K) probabilities
        self.case_ids: np.ndarray = case_ids
        self.folds: np.ndarray = folds  # (n,) float; NaN = no fold
        self.groups: np.ndarray | None = groups  # (n,) int group codes
        self.n_groups: int = n_groups
        self.model: str | None = model

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def K(self) -> int:
        return len(self.classes)


def _where(source: str, df: pd.DataFrame, i: int) -> str:
    cid = df["case_id"].iloc[i] if "case_id" in df.columns else None
    return f"{source}, row {i + 2} (case '{cid}')"


def _prepare(
    predictions: pd.DataFrame,
    classes: list[str] | None = None,
    group_col: str | None = None,
    source: str = "prediction table",
) -> _Prepared:
    if not isinstance(predictions, pd.DataFrame):
        raise TypeError(f"The prediction table must be a pandas DataFrame. Got {type(predictions).__name__}.")
    df = predictions.reset_index(drop=True)
    if len(df) == 0:
        raise DataError(f"The {source} is empty: no predictions to evaluate.")
    for col in ("case_id", "label"):
        if col not in df.columns:
            raise DataError(
                f"The {source} has no '{col}' column (columns: {', '.join(map(str, df.columns))})."
            )
    found = classes_from(df)
    if classes is None:
        classes = found
    else:
        classes = [_as_class_name(c) for c in classes]
        if len(set(classes)) != len(classes):
            raise DataError(f"The class list {classes} names a class twice.")
        missing = [c for c in classes if c not in found]
        if missing:
            raise DataError(
                f"The {source} has no '{PROB_PREFIX}{missing[0]}' column for class '{missing[0]}' "
                f"(probability columns: {', '.join(PROB_PREFIX + c for c in found)})."
            )
        extra = [c for c in found if c not in classes]
        if extra:
            raise DataError(
                f"The {source} has probability column '{PROB_PREFIX}{extra[0]}' for a class that is not in "
                f"the class list {classes}."
            )
    if len(classes) < 2:
        raise DataError(f"The {source} must have at least two classes; got {classes}.")
    K = len(classes)
    code = {c: k for k, c in enumerate(classes)}

    # case ids
    if df["case_id"].isna().any():
        i = int(np.flatnonzero(df["case_id"].isna().to_numpy())[0])
        raise DataError(f"{source}, row {i + 2}: 'case_id' is empty.")
    case_ids = df["case_id"].astype(str).to_numpy()
    dup = pd.Series(case_ids).duplicated(keep=False).to_numpy()
    if dup.any():
        first = case_ids[dup][0]
        rows = [int(i) + 2 for i in np.flatnonzero(case_ids == first)]
        raise DataError(
            f"{source}: case_id '{first}' appears more than once (rows {rows}); evaluate one prediction per "
            "case (out-of-fold predictions of one model)."
        )

    # probabilities
    P = np.empty((len(df), K), dtype=float)
    for k, c in enumerate(classes):
        col = PROB_PREFIX + c
        try:
            vals = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        except (TypeError, ValueError):  # pragma: no cover
            vals = np.full(len(df), np.nan)
        bad = ~np.isfinite(vals)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{_where(source, df, i)}, column '{col}': probability is {df[col].iloc[i]!r}; every probability "
                f"must be a finite number ({int(bad.sum())} such row(s) in this column)."
            )
        out = (vals < -SUM_TOLERANCE) | (vals > 1 + SUM_TOLERANCE)
        if out.any():
            i = int(np.flatnonzero(out)[0])
            raise DataError(
                f"{_where(source, df, i)}, column '{col}': probability {vals[i]!r} is outside [0, 1]."
            )
        P[:, k] = vals
    sums = P.sum(axis=1)
    off = np.abs(sums - 1.0) > SUM_TOLERANCE
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise DataError(
            f"{_where(source, df, i)}: the probabilities {', '.join(PROB_PREFIX + c for c in classes)} sum to "
            f"{sums[i]:.6g}, not 1 ({int(off.sum())} such row(s)); pass softmax probabilities over exactly these "
            "classes."
        )
    P = np.clip(P, 0.0, 1.0)

    # labels
    def codes(col: str) -> np.ndarray:
        out = np.empty(len(df), dtype=np.int64)
        for i, v in enumerate(df[col].tolist()):
            name = _as_class_name(v)
            if name is None:
                raise DataError(f"{_where(source, df, i)}, column '{col}': value is empty; it must name a class.")
            if name not in code:
                raise DataError(
                    f"{_where(source, df, i)}, column '{col}': unknown class '{name}'; expected one of {classes}."
                )
            out[i] = code[name]
        return out

    y = codes("label")
    pred = codes("predicted") if "predicted" in df.columns else P.argmax(axis=1)

    # folds
    if "fold" in df.columns:
        folds = pd.to_numeric(df["fold"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        bad = df["fold"].notna().to_numpy() & ~np.isfinite(folds)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{_where(source, df, i)}, column 'fold': {df['fold'].iloc[i]!r} is not an integer.")
        folds = np.where(folds < 0, np.nan, folds)
    else:
        folds = np.full(len(df), np.nan)

    # groups (cluster bootstrap)
    groups, n_groups = None, len(df)
    if group_col is not None:
        if group_col not in df.columns:
            raise DataError(
                f"The {source} has no '{group_col}' column for the grouped (cluster) bootstrap; merge it in from the "
                f"cases table (columns: {', '.join(map(str, df.columns))})."
            )
        g = df[group_col]
        if g.isna().any():
            i = int(np.flatnonzero(g.isna().to_numpy())[0])
            raise DataError(f"{_where(source, df, i)}, column '{group_col}': group is empty.")
        groups, uniq = pd.factorize(g.astype(str), sort=True)
        groups = groups.astype(np.int64)
        n_groups = len(uniq)

    model = None
    if "model" in df.columns:
        names = [str(m) for m in pd.unique(df["model"].dropna())]
        if len(names) > 1:
            raise DataError(
                f"The {source} mixes {len(names)} models ({', '.join(names[:5])}); evaluate one model at a time."
            )
        model = names[0] if names else None
    return _Prepared(classes=list(classes), y=y, pred=pred, P=P, case_ids=case_ids, folds=folds,
                     groups=groups, n_groups=n_groups, model=model)


# ---------------------------------------------------------------------------------------------------------
# Vectorised core: every metric from a weight matrix W (B, n)
# ---------------------------------------------------------------------------------------------------------


def _div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def _weighted_auc(W: np.ndarray, score: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC-AUC for each row of weights (Mann-Whitney U with ties counted 1/2). Shape (B,)."""
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    p = pos[order]
    _, start, inv, counts = np.unique(s, return_index=True, return_inverse=True, return_counts=True)
    lo = start[inv]  # first sorted position of each element's tie block
    hi = lo + counts[inv]  # one past its last position
    Ws = W[:, order]
    wneg = Ws * ~p
    cneg = np.zeros((W.shape[0], W.shape[1] + 1))
    np.cumsum(wneg, axis=1, out=cneg[:, 1:])
    below = cneg[:, lo]
    tied = cneg[:, hi] - below
    num = ((Ws * p) * (below + 0.5 * tied)).sum(axis=1)
    npos = (Ws * p).sum(axis=1)
    nneg = wneg.sum(axis=1)
    return _div(num, npos * nneg)


def _core(W: np.ndarray, prep: _Prepared, ordinal: bool = False) -> dict[str, np.ndarray]:
    """All metrics for each row of weights. Scalars have shape (B,), per-class metrics (B, K)."""
    W = np.asarray(W, dtype=float)
    K, n = prep.K, prep.n
    onehot = np.zeros((n, K * K))
    onehot[np.arange(n), prep.y * K + prep.pred] = 1.0
    cm = (W @ onehot).reshape(-1, K, K)  # rows: true, cols: predicted
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    npred = cm.sum(axis=1)
    N = cm.sum(axis=(1, 2))
    fn = support - tp
    fp = npred - tp
    tn = N[:, None] - tp - fn - fp
    sens = _div(tp, support)
    spec = _div(tn, tn + fp)
    ppv = _div(tp, npred)
    npv = _div(tn, tn + fn)
    f1 = np.nan_to_num(_div(2 * tp, 2 * tp + fp + fn), nan=0.0)
    present = support > 0
    with np.errstate(invalid="ignore"):
        bal = np.where(present.any(axis=1), np.nansum(sens, axis=1) / np.maximum(present.sum(axis=1), 1), np.nan)
    out = {
        "confusion_matrix": cm,
        "support": support,
        "accuracy": _div(tp.sum(axis=1), N),
        "balanced_accuracy": bal,
        "macro_f1": f1.mean(axis=1),
        "weighted_f1": _div((f1 * support).sum(axis=1), N),
        "sensitivity": sens,
        "specificity": spec,
        "ppv": ppv,
        "npv": npv,
        "f1": f1,
    }
    auc = np.column_stack([_weighted_auc(W, prep.P[:, k], prep.y == k) for k in range(K)])
    out["auc"] = auc
    defined = np.isfinite(auc)
    with np.errstate(invalid="ignore"):
        out["macro_auc"] = np.where(defined.any(axis=1),
                                    np.nansum(auc, axis=1) / np.maximum(defined.sum(axis=1), 1), np.nan)
    target = np.zeros_like(prep.P)
    target[np.arange(n), prep.y] = 1.0
    brier_case = ((prep.P - target) ** 2).sum(axis=1)
    out["brier"] = _div(W @ brier_case, W.sum(axis=1))
    if ordinal:
        idx = np.arange(K)
        wq = (idx[:, None] - idx[None, :]) ** 2 / (K - 1) ** 2
        expected = _div(support[:, :, None] * npred[:, None, :], N[:, None, None])
        observed_d = (wq * cm).sum(axis=(1, 2))
        expected_d = (wq * expected).sum(axis=(1, 2))
        out["quadratic_weighted_kappa"] = 1.0 - _div(observed_d, expected_d)
    return out


def _scalar_names(ordinal: bool) -> list[str]:
    return list(HEADLINE) + (["quadratic_weighted_kappa"] if ordinal else [])


def _f(x) -> float:
    return float(x) if np.isfinite(x) else float("nan")


def _expected_calibration_error(P: np.ndarray, y: np.ndarray, n_bins: int = 10) -> float:
    conf = P.max(axis=1)
    correct = (P.argmax(axis=1) == y).astype(float)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            total += m.sum() * abs(correct[m].mean() - conf[m].mean())
    return float(total / len(y))


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def _metrics_from(prep: _Prepared, ordinal: bool) -> dict[str, Any]:
    r = _core(np.ones((1, prep.n)), prep, ordinal)
    classes = prep.classes
    notes = []
    support = r["support"][0]
    per_class = {}
    for k, c in enumerate(classes):
        per_class[c] = {m: _f(r[m][0, k]) for m in PER_CLASS}
        per_class[c]["support"] = int(round(support[k]))
    absent = [c for k, c in enumerate(classes) if support[k] == 0]
    if absent:
        notes.append(
            f"Class(es) {', '.join(repr(c) for c in absent)} absent from the true labels: their sensitivity and "
            "ROC-AUC are undefined (NaN); macro-AUC averages the other classes and balanced accuracy ignores them."
        )
    only = [c for k, c in enumerate(classes) if support[k] == prep.n]
    if only:
        notes.append(f"Every case has the true label {only[0]!r}: no ROC-AUC can be computed.")
    out: dict[str, Any] = {"n": prep.n, "classes": list(classes)}
    for m in _scalar_names(ordinal):
        out[m] = _f(r[m][0])
    eps = 1e-15
    out["log_loss"] = float(-np.mean(np.log(np.clip(prep.P[np.arange(prep.n), prep.y], eps, 1.0))))
    out["ece"] = _expected_calibration_error(prep.P, prep.y)
    out["per_class"] = per_class
    out["confusion_matrix"] = np.rint(r["confusion_matrix"][0]).astype(int).tolist()
    out["notes"] = notes
    return out


def compute_metrics(
    predictions: pd.DataFrame, classes: list[str] | None = None, *, ordinal: bool = False
) -> dict[str, Any]:
    """Point estimates of every metric on a prediction table.

    Returns a JSON-friendly dict: ``n``, ``classes``, ``accuracy``, ``balanced_accuracy``, ``macro_f1``,
    ``weighted_f1``, ``macro_auc``, ``brier`` (multi-class Brier score), ``log_loss``, ``ece`` (top-label
    expected calibration error, 10 bins), ``quadratic_weighted_kappa`` (only when ``ordinal``), ``per_class``
    (class -> sensitivity, specificity, ppv, npv, f1, auc, support), ``confusion_matrix`` (list of lists,
    rows = true class, columns = predicted class, in class order) and ``notes`` (list of strings).
    """
    return _metrics_from(_prepare(predictions, classes), ordinal)


def _resample_weights(rng: np.random.Generator, b: int, n: int, groups: np.ndarray | None, n_groups: int):
    """(b, n) case weights: how often each case is drawn when sampling cases or whole groups with replacement."""
    m = n if groups is None else n_groups
    draws = rng.integers(0, m, size=(b, m))
    counts = np.bincount((draws + (np.arange(b) * m)[:, None]).ravel(), minlength=b * m).reshape(b, m)
    return counts.astype(float) if groups is None else counts[:, groups].astype(float)


def _bootstrap(prep: _Prepared, n_boot: int, seed: int, alpha: float, ordinal: bool):
    if not (0 < alpha < 1):
        raise ValueError(f"alpha must be in (0, 1); got {alpha}.")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1; got {n_boot}.")
    rng = np.random.default_rng(seed)
    scalars = _scalar_names(ordinal)
    samples: dict[str, list[np.ndarray]] = {m: [] for m in scalars}
    per: dict[str, list[np.ndarray]] = {m: [] for m in PER_CLASS}
    done = 0
    while done < n_boot:
        b = min(_CHUNK, max(1, _CHUNK_CELLS // prep.n), n_boot - done)
        W = _resample_weights(rng, b, prep.n, prep.groups, prep.n_groups)
        r = _core(W, prep, ordinal)
        for m in scalars:
            samples[m].append(r[m])
        for m in PER_CLASS:
            per[m].append(r[m])
        done += b
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    ci: dict[str, tuple[float, float]] = {}
    undefined: dict[str, float] = {}

    def put(key, arr):
        ok = np.isfinite(arr)
        if not ok.any():
            ci[key] = (float("nan"), float("nan"))
        else:
            lo, hi = np.percentile(arr[ok], q)
            ci[key] = (float(lo), float(hi))
        if not ok.all():
            undefined[key] = float(1 - ok.mean())

    for m in scalars:
        put(m, np.concatenate(samples[m]))
    for m in PER_CLASS:
        arr = np.concatenate(per[m], axis=0)
        for k, c in enumerate(prep.classes):
            put(f"{m}[{c}]", arr[:, k])
    return ci, undefined


def bootstrap_ci(
    predictions: pd.DataFrame,
    classes: list[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    group_col: str | None = None,
    *,
    ordinal: bool = False,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals: metric -> (low, high).

    Cases are resampled with replacement; with ``group_col`` (e.g. ``patient_id`` or ``dup_group``) whole
    groups are resampled instead (cluster bootstrap), which is the honest choice when cases are correlated.
    Keys are the scalar metrics (``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``weighted_f1``,
    ``macro_auc``, ``brier``, ``quadratic_weighted_kappa`` when ``ordinal``) and per-class metrics named
    ``"<metric>[<class>]"``, e.g. ``"sensitivity[malignant]"``. Resamples where a metric is undefined (a
    class drawn zero times) are left out of that metric's interval; an interval is (nan, nan) when it is
    never defined. The same ``seed`` gives the same intervals.
    """
    prep = _prepare(predictions, classes, group_col=group_col)
    ci, _ = _bootstrap(prep, n_boot, seed, alpha, ordinal)
    return ci


def _fold_results(prep: _Prepared, ordinal: bool):
    has = np.isfinite(prep.folds)
    folds = np.unique(prep.folds[has])
    if len(folds) < 2:
        return [], {}
    W = np.stack([(prep.folds == f).astype(float) for f in folds])
    r = _core(W, prep, ordinal)
    names = _scalar_names(ordinal)
    rows = []
    for i, f in enumerate(folds):
        row: dict[str, Any] = {"fold": int(f), "n": int(W[i].sum())}
        for m in names:
            row[m] = _f(r[m][i])
        for k, c in enumerate(prep.classes):
            row[f"sensitivity[{c}]"] = _f(r["sensitivity"][i, k])
        rows.append(row)
    summary = {}
    for key in [m for m in rows[0] if m not in ("fold", "n")]:
        vals = np.array([row[key] for row in rows], dtype=float)
        ok = vals[np.isfinite(vals)]
        summary[key] = {
            "mean": float(ok.mean()) if len(ok) else float("nan"),
            "sd": float(ok.std(ddof=1)) if len(ok) > 1 else float("nan"),
            "n_folds": int(len(ok)),
        }
    return rows, summary


def evaluate(
    predictions: pd.DataFrame,
    classes: list[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    group_col: str | None = None,
    *,
    ordinal: bool = False,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Pooled metrics, bootstrap CIs and per-fold metrics of one model's prediction table.

    Returns a dict (JSON-serialisable after :func:`to_jsonable`):

    * ``model``: the ``model`` column's value (or None), ``classes``, ``n``;
    * ``pooled``: :func:`compute_metrics` on all rows (out-of-fold predictions pooled);
    * ``ci``: :func:`bootstrap_ci` intervals, metric -> [low, high] (empty when ``n_boot=0``);
    * ``ci_method``: level, n_boot, seed, unit ("case" or the group column) and n_units;
    * ``per_fold``: one dict per fold (fold, n, scalar metrics, ``sensitivity[<class>]``); empty for a single
      hold-out (``fold`` absent, -1 or NaN everywhere);
    * ``fold_summary``: metric -> {mean, sd, n_folds} across folds;
    * ``notes``: caveats found on the way (absent classes, undefined resamples, ...).
    """
    prep = _prepare(predictions, classes, group_col=group_col)
    pooled = _metrics_from(prep, ordinal)
    notes = list(pooled["notes"])
    ci: dict[str, list[float]] = {}
    if n_boot:
        raw, undefined = _bootstrap(prep, n_boot, seed, alpha, ordinal)
        ci = {k: [lo, hi] for k, (lo, hi) in raw.items()}
        worst = {k: v for k, v in undefined.items() if v > 0}
        if worst:
            k = max(worst, key=worst.get)
            notes.append(
                f"{len(worst)} bootstrap interval(s) leave out resamples where the metric is undefined (a class "
                f"drawn zero times); worst: {k} undefined in {100 * worst[k]:.1f}% of resamples."
            )
        if group_col is not None and prep.n_groups < 30:
            notes.append(f"Only {prep.n_groups} groups in '{group_col}': the cluster-bootstrap interval is rough.")
    per_fold, fold_summary = _fold_results(prep, ordinal)
    n_nofold = int((~np.isfinite(prep.folds)).sum())
    if per_fold and n_nofold:
        notes.append(f"{n_nofold} row(s) have no fold (-1/NaN): they count in the pooled metrics only.")
    if per_fold:
        notes.append(
            "Pooled metrics are computed on all out-of-fold predictions together; the bootstrap interval reflects "
            "sampling of test cases, not the variability of retraining (see the per-fold spread)."
        )
    return {
        "model": prep.model,
        "classes": list(prep.classes),
        "n": prep.n,
        "pooled": pooled,
        "ci": ci,
        "ci_method": {
            "method": "percentile bootstrap",
            "level": 1 - alpha,
            "n_boot": int(n_boot),
            "seed": seed,
            "unit": "case" if group_col is None else group_col,
            "n_units": prep.n if group_col is None else prep.n_groups,
        },
        "per_fold": per_fold,
        "fold_summary": fold_summary,
        "ordinal": bool(ordinal),
        "notes": notes,
    }


def to_jsonable(obj):
    """A copy of ``obj`` with NaN/inf floats as None and tuples/arrays as lists (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


# ---------------------------------------------------------------------------------------------------------
# Comparison across models
# ---------------------------------------------------------------------------------------------------------


def _num(x) -> float:
    return float(x) if x is not None and np.isfinite(x) else float("nan")


def format_ci(value, ci=None, digits: int = 3) -> str:
    """``0.912 (0.887–0.934)``; ``n/a`` for an undefined value; the bare value without a usable interval."""
    v = _num(value)
    if not np.isfinite(v):
        return "n/a"
    s = f"{v:.{digits}f}"
    if ci is not None and len(ci) == 2 and np.isfinite(_num(ci[0])) and np.isfinite(_num(ci[1])):
        s += f" ({_num(ci[0]):.{digits}f}\u2013{_num(ci[1]):.{digits}f})"
    return s


def format_mean_sd(summary: dict | None, digits: int = 3) -> str:
    if not summary or not np.isfinite(_num(summary.get("mean"))):
        return "n/a"
    sd = _num(summary.get("sd"))
    return f"{summary['mean']:.{digits}f} \u00b1 {sd:.{digits}f}" if np.isfinite(sd) else f"{summary['mean']:.{digits}f}"


def metric_value(result: dict, key: str) -> float:
    """A pooled metric of an :func:`evaluate` result by CI-style key (``macro_f1``, ``sensitivity[benign]``)."""
    if "[" in key and key.endswith("]"):
        m, c = key[:-1].split("[", 1)
        return _num(result["pooled"]["per_class"].get(c, {}).get(m))
    return _num(result["pooled"].get(key))


def comparison_table(results: dict[str, dict], *, numeric: bool = False) -> pd.DataFrame:
    """One row per model: macro-F1 [CI], weighted-F1, balanced accuracy, macro-AUC [CI], QWK (ordinal),
    macro-F1 across folds (mean ± sd) and per-class sensitivity [CI].

    ``results`` maps model name -> :func:`evaluate` output. Cells are strings like ``0.912 (0.887–0.934)``;
    with ``numeric=True`` the table holds floats instead (``<metric>``, ``<metric>_low``, ``<metric>_high``).
    """
    if not results:
        raise ValueError("comparison_table needs at least one model result.")
    classes: list[str] = []
    for r in results.values():
        for c in r["classes"]:
            if c not in classes:
                classes.append(c)
    any_kappa = any("quadratic_weighted_kappa" in r["pooled"] for r in results.values())
    level = next(iter(results.values())).get("ci_method", {}).get("level", 0.95)
    pct = f"{100 * level:.0f}% CI"
    rows = []
    for name, r in results.items():
        ci = r.get("ci", {})
        if numeric:
            row: dict[str, Any] = {"model": name, "n": r["n"]}
            keys = ["macro_f1", "weighted_f1", "balanced_accuracy", "accuracy", "macro_auc"]
            keys += ["quadratic_weighted_kappa"] if any_kappa else []
            keys += [f"sensitivity[{c}]" for c in classes]
            for k in keys:
                row[k] = metric_value(r, k)
                lo, hi = ci.get(k, (float("nan"), float("nan")))
                row[f"{k}_low"], row[f"{k}_high"] = _num(lo), _num(hi)
            fs = r.get("fold_summary", {}).get("macro_f1")
            row["macro_f1_fold_mean"] = _num(fs["mean"]) if fs else float("nan")
            row["macro_f1_fold_sd"] = _num(fs["sd"]) if fs else float("nan")
        else:
            row = {
                "model": name,
                "n": r["n"],
                f"macro-F1 ({pct})": format_ci(metric_value(r, "macro_f1"), ci.get("macro_f1")),
                "weighted-F1": format_ci(metric_value(r, "weighted_f1"), ci.get("weighted_f1")),
                "balanced accuracy": format_ci(metric_value(r, "balanced_accuracy"), ci.get("balanced_accuracy")),
                f"macro-AUC ({pct})": format_ci(metric_value(r, "macro_auc"), ci.get("macro_auc")),
            }
            if any_kappa:
                row["quadratic weighted kappa"] = format_ci(
                    metric_value(r, "quadratic_weighted_kappa"), ci.get("quadratic_weighted_kappa"))
            row["macro-F1 across folds (mean ± sd)"] = format_mean_sd(r.get("fold_summary", {}).get("macro_f1"))
            for c in classes:
                k = f"sensitivity[{c}]"
                row[f"sensitivity {c}"] = format_ci(metric_value(r, k), ci.get(k))
        rows.append(row)
    return pd.DataFrame(rows)
