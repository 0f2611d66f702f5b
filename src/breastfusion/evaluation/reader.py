"""The radiologist as a baseline: every model compared with the reader's own ordinal score (BI-RADS).

When ``data.roles.reader_score`` names a column, the report compares each model with that reader **on the same
cases** (those with a reader score and an out-of-fold prediction from every model), for one positive class:

* the reader's ROC-AUC (the score's level rank, ties counted 1/2) and each model's AUC on P(positive), with the
  paired difference (model − reader) and a percentile bootstrap CI over patients: one resample draws whole
  patients (and near-duplicate groups, joined with them) and every AUC of the resample is computed on it;
* the reader's sensitivity and specificity at each threshold (≥ 3, ≥ 4a, ...), and each model's at the threshold
  where its specificity first reaches the reader's at the clinical cut-off (≥ 4a by default), re-matched in every
  resample so the CI carries the threshold's uncertainty;
* "<model> + reader": a logistic regression on [logit P(model), reader rank] cross-fitted over the run's folds
  (fitted on the other folds' out-of-fold rows, applied to this fold), so it never scores a case it was fitted
  on; its AUC and paired difference to the reader answer "does the model add to the radiologist?".

:func:`compare_with_reader` returns all of it as a dict (the benchmark calls it); :func:`reader_section` turns
it into a report section with one ROC figure; :func:`run_reader_comparison` is what the pipeline calls.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from breastfusion.data.cases import CASE_ID, LABEL, PATIENT_ID
from breastfusion.data.column_types import category_key
from breastfusion.errors import ConfigError, DataError
from breastfusion.evaluation.metrics import (
    _resample_weights,
    _weighted_auc,
    format_ci,
    to_jsonable,
)
from breastfusion.missing import is_missing, missing_tokens
from breastfusion.utils import UnionFind, write_json

log = logging.getLogger(__name__)

SECTION_TITLE = "Models vs the radiologist"
_LEVEL = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-z]*)$")
_CHUNK_CELLS = 2_000_000  # bootstrap (resample, case) cells evaluated at once (~16 MB per array)
_EPS = 1e-9


# ------------------------------------------------------------------------------------------------ reader levels

def _key(v) -> str:
    # '4A', ' 4a' and 4.0 / '4' name one level each; levels are compared lower-case
    return category_key(v).lower()


def reader_levels(values: pd.Series, order: list[str] | None = None, *,
                  column: str = "reader score") -> tuple[list[str], str]:
    """The reader score's levels from least to most suspicious, and where the order came from ('declared' or
    'default'). Default: numeric order, then the text after the number (2 < 3 < 4 < 4a < 4b < 4c < 5 < 10).
    ``values`` holds no missing cells (drop them first). A value without a leading number has no default order:
    ConfigError asking for ``data.roles.reader_score_order``."""
    if order is not None:
        levels = [_key(v) for v in order]
        if len(set(levels)) != len(levels):
            raise ConfigError(f"data.roles.reader_score_order {list(order)} names a level twice.")
        return levels, "declared"
    seen = list(dict.fromkeys(_key(v) for v in values))
    parsed = {}
    for s in seen:
        m = _LEVEL.match(s)
        if m is None:
            raise ConfigError(f"The reader score column '{column}' holds '{s}', which has no numeric order; declare "
                              "its levels from least to most suspicious in data.roles.reader_score_order (values it "
                              "holds: " + ", ".join(seen[:12]) + ").")
        parsed[s] = (float(m.group(1)), m.group(2))
    return sorted(seen, key=parsed.__getitem__), "default"


def reader_ranks(cases: pd.DataFrame, reader_col: str, order: list[str] | None = None, *,
                 missing_values=None) -> tuple[pd.Series, list[str], str]:
    """(rank per case id, NaN where the score is missing; levels; order source). A value outside a declared order
    is a DataError naming its cases-table row and case."""
    if reader_col not in cases.columns:
        raise ConfigError(f"data.roles.reader_score: '{reader_col}' is not a column of the cases table (columns: "
                          + ", ".join(map(str, cases.columns[:30])) + ").")
    tokens = missing_tokens(missing_values)
    raw = cases[reader_col].tolist()
    missing = np.array([is_missing(v, tokens) for v in raw], dtype=bool)
    present = pd.Series([raw[i] for i in np.flatnonzero(~missing)], dtype=object)
    levels, source = reader_levels(present, order, column=reader_col)
    rank_of = {lv: i for i, lv in enumerate(levels)}
    ranks = np.full(len(raw), np.nan)
    for i in np.flatnonzero(~missing):
        k = _key(raw[i])
        if k not in rank_of:
            raise DataError(f"cases table, row {i + 2} (case '{cases[CASE_ID].iloc[i]}'), column '{reader_col}': "
                            f"'{raw[i]}' is not a level of data.roles.reader_score_order (expected one of "
                            f"{', '.join(levels)}, or a missing-value token).")
        ranks[i] = rank_of[k]
    return pd.Series(ranks, index=cases[CASE_ID].astype(str).to_numpy()), levels, source


def check_reader_column(cases: pd.DataFrame, reader_col: str, order: list[str] | None = None, *,
                        missing_values=None, positive: str | None = None, classes: list[str] | None = None) -> None:
    """Raise before any training when the reader score column is absent, holds a value the order cannot place, or
    ``positive`` (data.roles.reader_positive) is not one of ``classes``."""
    if positive is not None and classes is not None and positive not in classes:
        raise ConfigError(f"data.roles.reader_positive: '{positive}' is not a class of this run (classes: "
                          f"{', '.join(classes)}).")
    _, levels, _ = reader_ranks(cases, reader_col, order, missing_values=missing_values)
    if len(levels) < 2:
        raise DataError(f"cases table, column '{reader_col}': the reader score has {len(levels)} level(s) "
                        f"({', '.join(levels) or 'all missing'}); comparing models with the reader needs two or more.")


def default_cutoff(levels: list[str]) -> str:
    """The clinical cut-off 'reader calls it positive': the first level starting with '4' (BI-RADS 4a: biopsy),
    else the middle level."""
    return next((lv for lv in levels[1:] if lv.startswith("4")), levels[len(levels) // 2])


# ------------------------------------------------------------------------------------------------ statistics

def _clusters(cases: pd.DataFrame, ids: np.ndarray, group_cols) -> tuple[np.ndarray | None, int, str]:
    """Cluster code per case joining every case that shares any of ``group_cols`` (patient, duplicate group)."""
    cols = [c for c in group_cols if c in cases.columns]
    if not cols:
        return None, len(ids), "case"
    table = cases.assign(**{CASE_ID: cases[CASE_ID].astype(str)}).drop_duplicates(CASE_ID).set_index(CASE_ID)
    uf = UnionFind(len(ids))
    for col in cols:
        vals = table[col].reindex(ids)
        first: dict = {}
        for i, v in enumerate(vals.tolist()):
            if v is None or (isinstance(v, float) and np.isnan(v)):
                continue  # no group recorded: the case stands alone in this column
            j = first.setdefault(str(v), i)
            uf.union(i, j)
    roots = np.array([uf.find(i) for i in range(len(ids))])
    codes, uniq = pd.factorize(roots)
    return codes.astype(np.int64), len(uniq), " + ".join(cols)


def _wdiv(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def _matched(W: np.ndarray, score: np.ndarray, y: np.ndarray, target_spec: np.ndarray):
    """Per row of weights: the lowest threshold t ('positive when score >= t') whose specificity reaches
    ``target_spec`` (the most sensitive such threshold); returns (sensitivity, specificity, index into the sorted
    unique scores, len(unique) meaning 'above every score')."""
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    u, start = np.unique(s, return_index=True)
    cut = np.r_[start, len(s)]  # candidate t = u[j] puts sorted positions < cut[j] below it; the last: none positive
    Ws = W[:, order]
    cneg = np.zeros((W.shape[0], len(s) + 1))
    cpos = np.zeros_like(cneg)
    np.cumsum(Ws * ~y[order], axis=1, out=cneg[:, 1:])
    np.cumsum(Ws * y[order], axis=1, out=cpos[:, 1:])
    tneg, tpos = cneg[:, -1], cpos[:, -1]
    spec = _wdiv(cneg[:, cut], tneg[:, None])
    ok = spec >= (target_spec[:, None] - _EPS)
    j = np.argmax(ok, axis=1)  # the last candidate (nothing positive) always reaches any specificity <= 1
    rows = np.arange(W.shape[0])
    sens = _wdiv(tpos - cpos[rows, cut[j]], tpos)
    spec_j = spec[rows, j]
    bad = ~np.isfinite(target_spec) | ~(tneg > 0)
    return np.where(bad, np.nan, sens), np.where(bad, np.nan, spec_j), j, u


def _stats(W: np.ndarray, y: np.ndarray, rank: np.ndarray, n_levels: int, cut_idx: int,
           scores: dict[str, np.ndarray], combos: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every figure of the comparison for each row of case weights (point estimate: one row of ones)."""
    out: dict[str, np.ndarray] = {}
    Wp, Wn = W @ y.astype(float), W @ (~y).astype(float)
    out["reader:auc"] = _weighted_auc(W, rank, y)
    for k in range(1, n_levels):
        call = rank >= k
        out[f"reader:sens:{k}"] = _wdiv(W @ (y & call).astype(float), Wp)
        out[f"reader:spec:{k}"] = _wdiv(W @ (~y & ~call).astype(float), Wn)
    spec_r, sens_r = out[f"reader:spec:{cut_idx}"], out[f"reader:sens:{cut_idx}"]
    for name, s in scores.items():
        out[f"{name}:auc"] = _weighted_auc(W, s, y)
        out[f"{name}:diff"] = out[f"{name}:auc"] - out["reader:auc"]
        sens, spec, _, _ = _matched(W, s, y, spec_r)
        out[f"{name}:sens"], out[f"{name}:spec"] = sens, spec
        out[f"{name}:sens_diff"] = sens - sens_r
    for name, s in combos.items():
        out[f"{name}:auc"] = _weighted_auc(W, s, y)
        out[f"{name}:diff"] = out[f"{name}:auc"] - out["reader:auc"]
    return out


def _cross_fit(logit: np.ndarray, rank: np.ndarray, y: np.ndarray, folds: np.ndarray):
    """Out-of-fold P(positive) of a logistic regression on [logit P(model), reader rank]: each fold scored by a fit
    on the other folds' rows. Returns (scores, standardised coefficients fitted on every row) or (None, why)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if not np.isfinite(folds).all():
        return None, "some cases have no fold (not out-of-fold predictions of a cross-validation)"
    uniq = np.unique(folds)
    if len(uniq) < 2:
        return None, "the predictions come from fewer than two folds"
    X = np.column_stack([logit, rank])
    out = np.full(len(y), np.nan)
    for f in uniq:
        test = folds == f
        if len(np.unique(y[~test])) < 2:
            return None, f"the folds other than fold {int(f)} hold one class only"
        fit = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X[~test], y[~test])
        out[test] = fit.predict_proba(X[test])[:, 1]
    full = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X, y)
    coef = full[-1].coef_[0]
    return out, {"model_logit": float(coef[0]), "reader_rank": float(coef[1]), "folds": len(uniq)}


def _verdict(lo: float, hi: float, what: str = "AUC", *, combined: bool = False) -> str:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "no CI (bootstrap off or undefined)"
    if lo > 0:
        return "adds to the reader (CI above 0)" if combined else f"{what} higher than the reader (CI above 0)"
    if hi < 0:
        return ("below the reader alone (CI below 0)" if combined
                else f"{what} lower than the reader (CI below 0)")
    return "the CI includes 0: no difference shown"


# ------------------------------------------------------------------------------------------------ public API

def compare_with_reader(predictions: dict[str, pd.DataFrame] | pd.DataFrame, cases: pd.DataFrame, reader_col: str,
                        order: list[str] | None = None, positive: str | None = None, n_boot: int = 1000,
                        seed: int = 0, *, missing_values=None, cutoff: str | None = None, alpha: float = 0.05,
                        group_cols: tuple[str, ...] = (PATIENT_ID, "dup_group")) -> dict:
    """Compare every model's out-of-fold predictions with the reader score ``reader_col`` of ``cases``.

    ``predictions``: model name -> prediction table (``case_id``, ``label``, ``prob_<class>``, ``fold``), or one
    table. ``order``: the reader's levels, least to most suspicious (default :func:`reader_levels`).
    ``positive``: the class a high score points to (default 'malignant' when a class, else the last class).
    ``cutoff``: the reader's clinical cut-off level (default :func:`default_cutoff`). Resamples draw whole
    clusters of ``group_cols`` (joined), so a patient's images stay together. Returns a JSON-friendly dict
    (see :func:`reader_section` for what it shows)."""
    if isinstance(predictions, pd.DataFrame):
        name = str(predictions["model"].iloc[0]) if "model" in predictions.columns and len(predictions) else "model"
        predictions = {name: predictions}
    if not predictions:
        raise DataError("compare_with_reader: no model predictions to compare with the reader.")
    ranks, levels, source = reader_ranks(cases, reader_col, order, missing_values=missing_values)
    if len(levels) < 2:
        raise DataError(f"cases table, column '{reader_col}': the reader score has fewer than two levels.")
    first = next(iter(predictions.values()))
    classes = [str(c)[5:] for c in first.columns if str(c).startswith("prob_")]
    if positive is None:
        positive = "malignant" if "malignant" in classes else classes[-1]
    tables = {}
    for name, df in predictions.items():
        where = f"prediction table of '{name}'"
        for col in (CASE_ID, LABEL, f"prob_{positive}"):
            if col not in df.columns:
                if col == f"prob_{positive}":
                    raise ConfigError(f"data.roles.reader_positive: '{positive}' is not a class of the model "
                                      f"'{name}' (its classes: {', '.join(str(c)[5:] for c in df.columns if str(c).startswith('prob_'))}).")
                raise DataError(f"The {where} has no '{col}' column.")
        t = df.assign(**{CASE_ID: df[CASE_ID].astype(str)})
        dup = t[CASE_ID].duplicated()
        if dup.any():
            raise DataError(f"The {where} holds case '{t[CASE_ID][dup].iloc[0]}' twice; one out-of-fold prediction "
                            "per case is needed.")
        tables[name] = t.set_index(CASE_ID)
    # the common cases: a reader score and a prediction from every model
    predicted = list(dict.fromkeys(i for t in tables.values() for i in t.index))
    scored = ranks[np.isfinite(ranks.to_numpy())]
    has_reader = set(scored.index)
    no_reader = [i for i in predicted if i not in has_reader]
    every = set.intersection(*(set(t.index) for t in tables.values()))
    ids = np.array([i for i in predicted if i in has_reader and i in every], dtype=object)
    partial = [i for i in predicted if i in has_reader and i not in every]
    unpredicted = len(has_reader - set(predicted))
    if len(ids) == 0:
        raise DataError(f"No case has both a reader score ('{reader_col}') and an out-of-fold prediction.")
    labels = {name: t.loc[ids, LABEL].map(lambda v: category_key(v)).to_numpy() for name, t in tables.items()}
    y_names = next(iter(labels.values()))
    for name, lab in labels.items():
        if (lab != y_names).any():
            i = ids[np.flatnonzero(lab != y_names)[0]]
            raise DataError(f"case '{i}': the prediction tables disagree on its true label ('{name}' says "
                            f"'{tables[name].at[i, LABEL]}').")
    y = y_names == positive
    if y.all() or not y.any():
        raise DataError(f"The {len(ids)} cases with a reader score and a prediction are all "
                        f"{'' if y.all() else 'not '}'{positive}': no ROC comparison is possible.")
    rank = ranks.reindex(ids).to_numpy(dtype=float)
    # operating points: '>= level' for the levels that split these cases (not the lowest one present)
    lo_k, hi_k = int(rank.min()) + 1, int(rank.max())
    if hi_k < lo_k:
        raise DataError(f"Every one of the {len(ids)} compared cases has the reader score '{levels[hi_k]}': the "
                        "reader has no operating point to compare with.")
    usable = levels[lo_k:hi_k + 1]
    if cutoff is None:
        cutoff = default_cutoff(levels[lo_k - 1:hi_k + 1])
    elif _key(cutoff) not in usable:
        raise ConfigError(f"reader cut-off '{cutoff}' is not an operating point of these cases (levels: "
                          f"{', '.join(usable)}).")
    cut_idx = levels.index(_key(cutoff))
    scores = {name: t.loc[ids, f"prob_{positive}"].to_numpy(dtype=float) for name, t in tables.items()}
    notes = []
    if source == "default" and "0" in levels:
        notes.append(f"'{reader_col}' holds level 0, ranked below 1 by the default order; BI-RADS 0 means an "
                     "incomplete assessment, not the least suspicious: list it in data.missing_values or declare "
                     "data.roles.reader_score_order without it.")
    combos, combo_meta = {}, {}
    for name, s in scores.items():
        folds = pd.to_numeric(tables[name].loc[ids, "fold"], errors="coerce").to_numpy(dtype=float) \
            if "fold" in tables[name].columns else np.full(len(ids), np.nan)
        p = np.clip(s, 1e-6, 1 - 1e-6)
        comb, meta = _cross_fit(np.log(p / (1 - p)), rank, y, folds)
        if comb is None:
            notes.append(f"'{name} + reader' not computed: {meta}.")
            continue
        combos[f"{name} + reader"], combo_meta[f"{name} + reader"] = comb, meta

    groups, n_units, unit = _clusters(cases, ids, group_cols)
    point = {k: float(v[0]) for k, v in _stats(np.ones((1, len(ids))), y, rank, len(levels), cut_idx, scores,
                                              combos).items()}
    ci: dict[str, tuple[float, float]] = {}
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        draws: dict[str, list[np.ndarray]] = {}
        done = 0
        while done < n_boot:
            b = min(n_boot - done, max(1, _CHUNK_CELLS // len(ids)))
            W = _resample_weights(rng, b, len(ids), groups, n_units)
            for k, v in _stats(W, y, rank, len(levels), cut_idx, scores, combos).items():
                draws.setdefault(k, []).append(v)
            done += b
        q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
        undefined = 0.0
        for k, parts in draws.items():
            arr = np.concatenate(parts)
            ok = np.isfinite(arr)
            undefined = max(undefined, 1 - ok.mean())
            ci[k] = tuple(float(x) for x in np.percentile(arr[ok], q)) if ok.any() else (np.nan, np.nan)
        if undefined > 0:
            notes.append(f"Up to {100 * undefined:.1f}% of resamples held one class only; they are left out of the "
                         "intervals they leave undefined.")
        if n_units < 30:
            notes.append(f"Only {n_units} patients (clusters): the bootstrap intervals are rough.")

    def entry(key):
        return point.get(key, float("nan")), list(ci.get(key, (float("nan"), float("nan"))))

    res: dict = {
        "reader_column": reader_col, "positive": positive, "levels": levels, "order": source, "cutoff": levels[cut_idx],
        "n_cases": len(ids), "n_positive": int(y.sum()), "n_negative": int((~y).sum()),
        "excluded": {"no_reader_score": len(no_reader), "no_reader_score_examples": no_reader[:10],
                     "not_scored_by_every_model": len(partial), "reader_score_but_no_prediction": unpredicted},
        "bootstrap": {"method": "percentile bootstrap, paired (one resample for every model and the reader)",
                      "level": 1 - alpha, "n_boot": int(n_boot), "seed": seed, "unit": unit, "n_units": int(n_units)},
    }
    auc, auc_ci = entry("reader:auc")
    thresholds = []
    # a declared level no case reaches (BI-RADS 1 once the normal cases are set aside) is no operating point
    for k in range(lo_k, hi_k + 1):
        se, se_ci = entry(f"reader:sens:{k}")
        sp, sp_ci = entry(f"reader:spec:{k}")
        thresholds.append({"level": levels[k], "sensitivity": se, "sensitivity_ci": se_ci, "specificity": sp,
                           "specificity_ci": sp_ci, "called_positive": int((rank >= k).sum())})
    res["reader"] = {"auc": auc, "auc_ci": auc_ci, "thresholds": thresholds}
    spec_r = np.array([point[f"reader:spec:{cut_idx}"]])
    res["models"] = {}
    for name, s in scores.items():
        a, a_ci = entry(f"{name}:auc")
        d, d_ci = entry(f"{name}:diff")
        _, _, j, u = _matched(np.ones((1, len(ids))), s, y, spec_r)
        se, se_ci = entry(f"{name}:sens")
        sp, sp_ci = entry(f"{name}:spec")
        sd, sd_ci = entry(f"{name}:sens_diff")
        res["models"][name] = {
            "auc": a, "auc_ci": a_ci, "auc_diff": d, "auc_diff_ci": d_ci, "verdict": _verdict(*d_ci),
            "matched": {"reader_level": levels[cut_idx], "reader_specificity": float(spec_r[0]),
                        "threshold": float(u[j[0]]) if j[0] < len(u) else float("inf"),
                        "sensitivity": se, "sensitivity_ci": se_ci, "specificity": sp, "specificity_ci": sp_ci,
                        "sensitivity_diff": sd, "sensitivity_diff_ci": sd_ci,
                        "verdict": _verdict(*sd_ci, what="sensitivity")}}
    res["combined"] = {}
    for name in combos:
        a, a_ci = entry(f"{name}:auc")
        d, d_ci = entry(f"{name}:diff")
        res["combined"][name] = {"auc": a, "auc_ci": a_ci, "auc_diff": d, "auc_diff_ci": d_ci,
                                 "verdict": _verdict(*d_ci, combined=True), "coefficients": {k: v for k, v in combo_meta[name].items()
                                                                              if k != "folds"},
                                 "folds": combo_meta[name]["folds"]}
    res["notes"] = notes
    res["_curves"] = {"y": y, "rank": rank, "scores": scores, "combos": combos}  # for the figure; not written
    return res


# ------------------------------------------------------------------------------------------------ report

def plot_reader_roc(res: dict, path: str | Path) -> Path:
    """The models' ROC curves (P(positive)) with the reader's operating points (each '≥ level') on them."""
    from breastfusion.evaluation.plots import (
        _COLORS,
        _new_figure,
        _roc_points,
        _save,
        _short,
    )

    cur = res["_curves"]
    y = np.asarray(cur["y"], bool)
    fig = _new_figure(6.0, 5.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="#999999", label="chance")
    for i, (name, s) in enumerate({**cur["scores"], **cur["combos"]}.items()):
        fpr, tpr = _roc_points(np.asarray(s, float), y)
        m = res["models"].get(name) or res["combined"][name]
        ax.plot(fpr, tpr, lw=1.6, color=_COLORS[(i + 2) % len(_COLORS)], ls=":" if name in cur["combos"] else "-",
                label=f"{_short(name, 30)} (AUC {m['auc']:.3f})")
    th = res["reader"]["thresholds"]
    fx = [0.0] + [1 - t["specificity"] for t in reversed(th)] + [1.0]
    fy = [0.0] + [t["sensitivity"] for t in reversed(th)] + [1.0]
    ax.plot(fx, fy, color="black", lw=1.2, marker="o", ms=6,
            label=f"reader {_short(res['reader_column'], 16)} (AUC {res['reader']['auc']:.3f})")
    for t in th:
        x, yy = 1 - t["specificity"], t["sensitivity"]
        bold = t["level"] == res["cutoff"]
        ax.annotate(f"\u2265{_short(t['level'], 6)}", (x, yy), textcoords="offset points", xytext=(6, -12),
                    fontsize=9 if bold else 8, fontweight="bold" if bold else "normal")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 \u2212 specificity")
    ax.set_ylabel(f"sensitivity ({_short(res['positive'], 20)})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    ax.set_title(f"Models vs the reader on the same {res['n_cases']} cases", fontsize=11)
    return _save(fig, path)


def reader_section(res: dict, out_dir: str | Path):
    """The report section 'Models vs the radiologist' from a :func:`compare_with_reader` result; the ROC figure
    goes to ``out_dir``."""
    from breastfusion.evaluation.insight import ReportSection

    sec = ReportSection("reader", SECTION_TITLE)
    ex = res["excluded"]
    pct = f"{100 * res['bootstrap']['level']:.0f}%"
    left = [f"{ex['no_reader_score']} without a reader score"] if ex["no_reader_score"] else []
    left += [f"{ex['not_scored_by_every_model']} not scored by every model"] if ex["not_scored_by_every_model"] else []
    sec.paragraphs.append(
        f"Every model compared with the radiologist's '{res['reader_column']}' on the same {res['n_cases']} cases "
        f"({res['n_positive']} {res['positive']}, {res['n_negative']} other) that have both a reader score and an "
        "out-of-fold prediction from every model" + (f"; left out: {', '.join(left)}" if left else "") + ". "
        f"Model score: its out-of-fold P({res['positive']}); reader score: the rank of its level "
        f"({' < '.join(res['levels'])}, {'as declared' if res['order'] == 'declared' else 'default order'}). "
        f"Intervals: {pct} percentile bootstrap over {res['bootstrap']['unit']} ({res['bootstrap']['n_units']} "
        f"clusters, {res['bootstrap']['n_boot']} resamples), paired: each resample scores models and reader on the "
        "same cases. A difference is claimed only when its interval excludes 0.")
    ops = "; ".join(f"\u2265 {t['level']}: sensitivity {format_ci(t['sensitivity'], t['sensitivity_ci'])}, "
                    f"specificity {format_ci(t['specificity'], t['specificity_ci'])}"
                    for t in res["reader"]["thresholds"])
    sec.paragraphs.append(f"Reader operating points (called positive at or above the level): {ops}.")
    sec.paragraphs.append(
        f"Each model's sensitivity is read at its threshold where its specificity first reaches the reader's at "
        f"\u2265 {res['cutoff']} (the clinical cut-off); the threshold is matched again in every resample. "
        "'<model> + reader' is a logistic regression on the model's logit and the reader's rank, cross-fitted over "
        "the run's folds (each fold scored by a fit on the other folds), so its AUC is out-of-sample: it tells "
        "whether the model adds to the radiologist.")
    sec.paragraphs += res["notes"]
    cut = next(t for t in res["reader"]["thresholds"] if t["level"] == res["cutoff"])
    rows = [{"model": f"reader ({res['reader_column']})",
             "AUC": format_ci(res["reader"]["auc"], res["reader"]["auc_ci"]), "AUC \u2212 reader": "", "verdict": "",
             f"sensitivity at reader's specificity (\u2265 {res['cutoff']})":
                 format_ci(cut["sensitivity"], cut["sensitivity_ci"]),
             "specificity": format_ci(cut["specificity"], cut["specificity_ci"]), "sensitivity \u2212 reader": ""}]
    for name, m in res["models"].items():
        mt = m["matched"]
        rows.append({"model": name, "AUC": format_ci(m["auc"], m["auc_ci"]),
                     "AUC \u2212 reader": format_ci(m["auc_diff"], m["auc_diff_ci"]), "verdict": m["verdict"],
                     f"sensitivity at reader's specificity (\u2265 {res['cutoff']})":
                         format_ci(mt["sensitivity"], mt["sensitivity_ci"]),
                     "specificity": format_ci(mt["specificity"], mt["specificity_ci"]),
                     "sensitivity \u2212 reader": format_ci(mt["sensitivity_diff"], mt["sensitivity_diff_ci"])})
    for name, m in res["combined"].items():
        rows.append({"model": name, "AUC": format_ci(m["auc"], m["auc_ci"]),
                     "AUC \u2212 reader": format_ci(m["auc_diff"], m["auc_diff_ci"]), "verdict": m["verdict"]})
    sec.table = pd.DataFrame(rows).fillna("")
    try:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        fig = plot_reader_roc(res, out_dir / "roc_vs_reader.png")
        caption = (f"ROC curves of the models (out-of-fold P({res['positive']})) with the reader's operating "
                   f"points; the cut-off \u2265 {res['cutoff']} in bold; dotted: model + reader.")
        sec.figures.append((fig, caption))
    except Exception as exc:  # noqa: BLE001 - a figure never loses the section's numbers
        log.warning("reader ROC figure failed: %s", exc)
    return sec


def result_for_json(res: dict) -> dict:
    """The comparison without its in-memory curves, NaN as null."""
    return to_jsonable({k: v for k, v in res.items() if not k.startswith("_")})


def run_reader_comparison(results: dict[str, dict], cases: pd.DataFrame, cfg, run_dir: str | Path):
    """The pipeline's step: compare every evaluated model with ``cfg.data.roles.reader_score``, write
    ``<run_dir>/reader_comparison.json`` and return the report section (a failure becomes a note; the run goes on)."""
    from breastfusion.evaluation.insight import failed_section

    roles = cfg.data.roles
    run_dir = Path(run_dir)
    (run_dir / "reader_comparison.json").unlink(missing_ok=True)  # an earlier run's figures must not outlive a failure
    try:
        res = compare_with_reader({n: r["predictions"] for n, r in results.items()}, cases, roles.reader_score,
                                  roles.reader_score_order, roles.reader_positive, cfg.experiment.n_boot, cfg.seed,
                                  missing_values=cfg.data.missing_values)
        write_json(result_for_json(res), run_dir / "reader_comparison.json")
        return reader_section(res, run_dir / "reader")
    except (DataError, ConfigError, ValueError) as exc:
        return failed_section("reader", SECTION_TITLE, exc)


def summary_note(res: dict) -> str:
    """One sentence for the report's summary: the reader on the same cases, and the best model against it."""
    r = res["reader"]
    models = res.get("models") or {}
    text = (f"The radiologist ({res['reader_column']}) on the same {res['n_cases']} cases: AUC {r['auc']:.3f} "
            f"({r['auc_ci'][0]:.3f}–{r['auc_ci'][1]:.3f}) for {res['positive']}.")
    if models:
        name, m = max(models.items(), key=lambda kv: kv[1]["auc"])
        lo, hi = m["auc_diff_ci"]
        text += (f" Best model, {name}: AUC {m['auc']:.3f}, {m['auc_diff']:+.3f} against the reader "
                 f"(95% CI {lo:+.3f} to {hi:+.3f}): {m['verdict']}.")
    combined = res.get("combined") or {}
    if combined:
        name, m = max(combined.items(), key=lambda kv: kv[1]["auc"])
        text += f" Best model + reader, {name}: {m['auc_diff']:+.3f} over the reader alone ({m['verdict']})."
    return text + " See 'Models vs the radiologist'."
