"""Cross-fitted calibration of out-of-fold predictions, and the coverage it reaches.

The estimators (:class:`~breastfusion.evaluation.calibration.TemperatureScaler`,
:class:`~breastfusion.evaluation.calibration.ConformalClassifier`) live in :mod:`breastfusion.evaluation.calibration`;
this module applies them to a whole table of predictions and measures the result.

For tables of out-of-fold predictions (``case_id, fold, label, prob_<class>..., predicted, model``)
:func:`calibrate_predictions` fits both calibrators cross-fold (each fold is calibrated on the *other*
folds' out-of-fold predictions only), :func:`coverage_report` summarises coverage, set sizes and
calibration error (with the notes a reader must see next to the numbers), and
:func:`plot_reliability_before_after` draws the reliability diagrams.

Caveat: cross-fold calibration pools out-of-fold predictions of slightly different fold models, which is
exchangeable only approximately (see the caveat in :mod:`breastfusion.evaluation.calibration`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from breastfusion.errors import DataError
from breastfusion.evaluation.calibration import (
    CALIBRATED,
    SET_SEPARATOR,
    UNCALIBRATED,
    ConformalClassifier,
    TemperatureScaler,
    _set_strings,
    no_error_note,
    resolve_class_conditional,
)
from breastfusion.evaluation.metrics import _expected_calibration_error, _prepare

log = logging.getLogger(__name__)

CALPROB_PREFIX = "calprob_"


def calibrate_predictions(
    preds: pd.DataFrame,
    classes: list[str] | None = None,
    *,
    method: str = "aps",
    alpha: float = 0.1,
    by_fold: bool = True,
    seed: int = 0,
    k_reg: int = 1,
    lam: float = 0.01,
    randomized: bool = False,
    class_conditional: bool | str = False,
) -> pd.DataFrame:
    """Temperature-scaled probabilities and conformal prediction sets for a prediction table.

    With ``by_fold=True`` (out-of-fold predictions of a cross-validation) each fold is calibrated on the
    *other* folds' rows only (cross-conformal style): a temperature is fitted on them, then a
    :class:`ConformalClassifier` on their temperature-scaled probabilities, and both are applied to the
    fold. A fold's own labels are never used for its calibration, so the coverage measured on the result
    is an honest estimate. Every row needs a fold (>= 0) and there must be at least two folds.

    With ``by_fold=False`` one temperature and one threshold are fitted on all rows and applied to the same
    rows (in-sample): use it to fit calibrators on a dedicated calibration table; the coverage measured on
    that same table is optimistic.

    ``class_conditional=True`` fits one threshold per true class (Mondrian conformal), so that every class,
    the rare malignant one included, is covered at ``1 - alpha`` rather than only the cases on average;
    ``"auto"`` does so when every fold's calibration rows hold enough cases of every class.

    Returns a copy of ``preds`` (same index and row order) with ``calprob_<class>`` for every class,
    ``set`` (the classes in the set, in class order, joined with ``'|'``), ``set_size`` and ``refer``
    (True when the set holds more than one class: the model cannot single out one class at this
    coverage). ``result.attrs["calibration"]`` holds the settings and, per fold, the temperature (with its
    ``temperature_status``: a fold whose calibration rows make no error keeps T = 1, ``"uncalibrated"``), the
    threshold and the number of calibration cases.
    """
    prep = _prepare(preds, classes)
    classes = prep.classes
    bad = [c for c in classes if SET_SEPARATOR in c]
    if bad:
        raise DataError(f"Class name {bad[0]!r} contains '{SET_SEPARATOR}', which separates the classes of a set.")
    ConformalClassifier(method=method, alpha=alpha, k_reg=k_reg, lam=lam)  # validate settings early
    names = np.asarray(classes, dtype=object)
    if class_conditional == "auto":
        cal_sets = ([prep.folds != f for f in np.unique(prep.folds[np.isfinite(prep.folds)])]
                    if by_fold and np.isfinite(prep.folds).any() else [np.ones(prep.n, dtype=bool)])
        fewest = {c: min(int((prep.y[m] == k).sum()) for m in cal_sets) for k, c in enumerate(classes)}
        class_conditional = resolve_class_conditional("auto", fewest, alpha, "the folds' calibration rows")
    n, K = prep.n, prep.K
    calP = np.empty((n, K))
    sets = np.zeros((n, K), dtype=bool)
    per_fold: list[dict[str, Any]] = []

    def fit_apply(cal: np.ndarray, target: np.ndarray, fold_seed: int, fold) -> None:
        ts = TemperatureScaler().fit(prep.P[cal], prep.y[cal])
        cp = ConformalClassifier(method=method, alpha=alpha, k_reg=k_reg, lam=lam, randomized=randomized,
                                 seed=fold_seed, class_conditional=class_conditional)
        try:
            cp.fit(ts.transform(prep.P[cal]), names[prep.y[cal]], classes=list(classes))
        except DataError as e:
            where = "the table" if fold is None else f"the folds other than fold {fold}"
            raise DataError(f"Calibrating on {where}: {e}") from None
        calP[target] = ts.transform(prep.P[target])
        sets[target] = cp.predict_sets(calP[target])
        per_fold.append({"fold": fold, "n_cal": int(cal.sum()), "n": int(target.sum()),
                         "temperature": ts.temperature_, "temperature_status": ts.status_,
                         "temperature_reason": ts.reason_, "n_cal_errors": ts.n_errors_, "qhat": cp.qhat_})

    if by_fold:
        folds = prep.folds
        if not np.isfinite(folds).all():
            i = int(np.flatnonzero(~np.isfinite(folds))[0])
            raise DataError(
                f"Row {i + 2} (case '{prep.case_ids[i]}') has no fold (missing 'fold' column, -1 or empty): "
                "cross-fold calibration needs every row's fold; pass by_fold=False for a single table."
            )
        uniq = np.unique(folds)
        if len(uniq) < 2:
            raise DataError(
                f"Cross-fold calibration needs at least two folds; the table has {len(uniq)} "
                f"(fold {int(uniq[0])}). Pass by_fold=False to calibrate on the table itself."
            )
        for f in uniq:
            target = folds == f
            fit_apply(~target, target, seed + int(f), int(f))
    else:
        everything = np.ones(n, dtype=bool)
        fit_apply(everything, everything, seed, None)

    off = [f for f in per_fold if f["temperature_status"] == UNCALIBRATED]
    if off:
        log.warning("cross-fold calibration: temperature scaling not applied (T kept at 1) for %d of %d calibrator(s): "
                    "%s", len(off), len(per_fold), off[0]["temperature_reason"])
    out = preds.copy()
    for k, c in enumerate(classes):
        out[CALPROB_PREFIX + c] = calP[:, k]
    out["set"] = _set_strings(sets, classes)
    out["set_size"] = sets.sum(axis=1).astype(int)
    out["refer"] = out["set_size"].to_numpy() > 1
    out.attrs["calibration"] = {
        "method": method, "alpha": float(alpha), "target_coverage": 1 - float(alpha), "by_fold": bool(by_fold),
        "randomized": bool(randomized), "k_reg": int(k_reg), "lam": float(lam), "seed": int(seed),
        "class_conditional": bool(class_conditional), "classes": list(classes), "folds": per_fold,
    }
    return out


def _calibrated_matrix(df: pd.DataFrame, classes: list[str]) -> np.ndarray:
    cols = [CALPROB_PREFIX + c for c in classes]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"The table has no '{missing[0]}' column: run calibrate_predictions first.")
    return df[cols].to_numpy(dtype=float)


def _parse_sets(df: pd.DataFrame, classes: list[str]) -> np.ndarray:
    if "set" not in df.columns:
        raise DataError("The table has no 'set' column: run calibrate_predictions first.")
    code = {c: k for k, c in enumerate(classes)}
    M = np.zeros((len(df), len(classes)), dtype=bool)
    for i, s in enumerate(df["set"].tolist()):
        if not isinstance(s, str) or not s:
            raise DataError(f"Row {i + 2}: prediction set {s!r} is empty.")
        for name in s.split(SET_SEPARATOR):
            if name not in code:
                raise DataError(f"Row {i + 2}: prediction set {s!r} names unknown class '{name}'; expected {classes}.")
            M[i, code[name]] = True
    return M


def coverage_report(df: pd.DataFrame, classes: list[str] | None = None) -> dict[str, Any]:
    """Coverage and calibration summary of a :func:`calibrate_predictions` result (JSON-friendly dict).

    Keys: ``n``, ``classes``, ``accuracy`` (top-1 accuracy of ``prob_``: since every set holds the top class,
    coverage can never fall below it), ``coverage`` (fraction of cases whose true class is in the set),
    ``mean_set_size``, ``refer_rate`` (sets with more than one class), ``set_size_distribution``
    (size -> fraction), ``singleton_rate`` and ``singleton_accuracy`` (accuracy among single-class sets),
    ``ece_before`` / ``ece_after`` (top-label ECE, 10 bins, of ``prob_`` and ``calprob_``), ``nll_before`` /
    ``nll_after``, ``per_class`` (class -> n, coverage, mean_set_size), ``per_fold`` (when there are folds)
    and the calibration settings from ``df.attrs`` (``method``, ``alpha``, ``target_coverage``, ...) when
    present. ``n_errors`` counts the top-1 errors; ``calibration_status`` is ``"calibrated"``,
    ``"not calibrated"`` (no fold's temperature could be fitted) or ``"partly calibrated"``, and ``notes`` holds
    plain sentences a reader must see next to the numbers (why a temperature was not fitted; that coverage
    cannot be estimated from predictions without errors).
    """
    base = df[[c for c in df.columns if not str(c).startswith(CALPROB_PREFIX)]]
    prep = _prepare(base, classes)
    classes = prep.classes
    calP = _calibrated_matrix(df, classes)
    if not np.isfinite(calP).all():
        i = int(np.flatnonzero(~np.isfinite(calP).all(axis=1))[0])
        raise DataError(f"Row {i + 2} (case '{prep.case_ids[i]}'): calibrated probabilities are not finite.")
    M = _parse_sets(df.reset_index(drop=True), classes)
    y = prep.y
    idx = np.arange(prep.n)
    covered = M[idx, y]
    size = M.sum(axis=1)
    eps = 1e-15
    nll_b = float(-np.mean(np.log(np.clip(prep.P[idx, y], eps, 1.0))))
    nll_a = float(-np.mean(np.log(np.clip(calP[idx, y], eps, 1.0))))
    single = size == 1
    per_class = {}
    for k, c in enumerate(classes):
        m = y == k
        per_class[c] = {"n": int(m.sum()),
                        "coverage": float(covered[m].mean()) if m.any() else float("nan"),
                        "mean_set_size": float(size[m].mean()) if m.any() else float("nan")}
    sizes, counts = np.unique(size, return_counts=True)
    out: dict[str, Any] = {}
    settings = df.attrs.get("calibration") if isinstance(df.attrs, dict) else None
    if settings:
        out.update({k: settings[k] for k in ("method", "alpha", "target_coverage", "by_fold", "randomized",
                                             "class_conditional")
                    if k in settings})
        out["calibrators"] = settings.get("folds", [])
    out.update({
        "n": prep.n,
        "classes": list(classes),
        "accuracy": float((prep.P.argmax(axis=1) == y).mean()),
        "coverage": float(covered.mean()),
        "mean_set_size": float(size.mean()),
        "refer_rate": float((size > 1).mean()),
        "set_size_distribution": {int(s): float(c / prep.n) for s, c in zip(sizes, counts)},
        "singleton_rate": float(single.mean()),
        "singleton_accuracy": float((M[single].argmax(axis=1) == y[single]).mean()) if single.any() else float("nan"),
        "ece_before": _expected_calibration_error(prep.P, y),
        "ece_after": _expected_calibration_error(calP, y),
        "nll_before": nll_b,
        "nll_after": nll_a,
        "per_class": per_class,
    })
    n_errors = int((prep.P.argmax(axis=1) != y).sum())
    out["n_errors"] = n_errors
    out["calibration_status"], out["notes"] = _calibration_notes(out.get("calibrators") or [], n_errors, prep.n)
    if np.isfinite(prep.folds).any():
        rows = []
        for f in np.unique(prep.folds[np.isfinite(prep.folds)]):
            m = prep.folds == f
            rows.append({"fold": int(f), "n": int(m.sum()), "coverage": float(covered[m].mean()),
                         "mean_set_size": float(size[m].mean())})
        out["per_fold"] = rows
    return out


def _calibration_notes(calibrators: list[dict], n_errors: int, n: int) -> tuple[str, list[str]]:
    """(status, notes) of a cross-fold calibration from its per-fold calibrators."""
    notes = []
    off = [c for c in calibrators if c.get("temperature_status") == UNCALIBRATED]
    if calibrators and len(off) == len(calibrators):
        status = "not calibrated"
        notes.append("temperature scaling was not applied (T kept at 1) in any fold: "
                     + (off[0].get("temperature_reason") or "no finite optimum"))
    elif off:
        status = "partly calibrated"
        notes.append(f"temperature scaling was not applied (T kept at 1) in {len(off)} of {len(calibrators)} "
                     f"folds (fold(s) {', '.join(str(c.get('fold')) for c in off)}): "
                     + (off[0].get("temperature_reason") or "no finite optimum"))
    else:
        status = CALIBRATED
    if n_errors == 0:
        notes.append(no_error_note(n))
    return status, notes


def plot_reliability_before_after(
    df: pd.DataFrame,
    classes: list[str] | None,
    path: str | Path,
    n_bins: int = 10,
    title: str | None = "Reliability before / after temperature scaling",
) -> Path:
    """Top-label reliability diagrams of ``prob_`` (left) and ``calprob_`` (right) side by side, ECE in the
    legends, with the confidence histograms below. PNG, written atomically; returns the path."""
    from breastfusion.evaluation.plots import _COLORS, _new_figure, _save, _short

    base = df[[c for c in df.columns if not str(c).startswith(CALPROB_PREFIX)]]
    prep = _prepare(base, classes)
    calP = _calibrated_matrix(df, prep.classes)
    edges = np.linspace(0, 1, n_bins + 1)

    def curve(P):
        conf = P.max(axis=1)
        hit = (P.argmax(axis=1) == prep.y).astype(float)
        b = np.minimum((conf * n_bins).astype(int), n_bins - 1)
        cnt = np.bincount(b, minlength=n_bins)
        ok = cnt > 0
        mp = np.bincount(b, weights=conf, minlength=n_bins)[ok] / cnt[ok]
        fr = np.bincount(b, weights=hit, minlength=n_bins)[ok] / cnt[ok]
        return conf, mp, fr

    fig = _new_figure(10.4, 6.4)
    gs = fig.add_gridspec(2, 2, height_ratios=[3.2, 1], hspace=0.08, wspace=0.18)
    fitted = (df.attrs.get("calibration") or {}).get("folds", [])
    temps = [f["temperature"] for f in fitted if f.get("temperature_status", CALIBRATED) == CALIBRATED]
    tlabel = ""
    if temps:
        tlabel = f" (T = {temps[0]:.2f})" if len(temps) == 1 else f" (T = {min(temps):.2f}\u2013{max(temps):.2f})"
    after = "after temperature scaling" + tlabel
    if fitted and not temps:  # no fold could be calibrated: say so rather than title it a success
        after = "NOT calibrated (T kept at 1: no finite optimum)"
    elif len(temps) < len(fitted):
        after += f", not applied in {len(fitted) - len(temps)} fold(s)"
    for j, (P, name, color) in enumerate([(prep.P, "before", _COLORS[0]), (calP, after, _COLORS[1])]):
        ax = fig.add_subplot(gs[0, j])
        axh = fig.add_subplot(gs[1, j], sharex=ax)
        conf, mp, fr = curve(P)
        ece = _expected_calibration_error(P, prep.y, n_bins)
        ax.plot([0, 1], [0, 1], ls="--", lw=1, color="#999999", label="perfect calibration")
        ax.bar(mp, fr - mp, bottom=mp, width=0.6 / n_bins, color=color, alpha=0.25, label="gap")
        ax.plot(mp, fr, marker="s", ms=5, lw=2.0, color=color, label=f"top-label (ECE {ece:.3f})")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(_short(name, 50), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8.5, framealpha=0.9)
        ax.tick_params(labelbottom=False)
        if j == 0:
            ax.set_ylabel("Observed accuracy")
            axh.set_ylabel("cases")
        axh.hist(conf, bins=edges, color="#555555", alpha=0.8)
        axh.set_xlim(-0.02, 1.02)
        axh.set_xlabel("Top-label confidence")
        axh.grid(alpha=0.3)
    if title:
        fig.suptitle(f"{_short(title, 70)} (n={prep.n})", fontsize=11)
    return _save(fig, path)
