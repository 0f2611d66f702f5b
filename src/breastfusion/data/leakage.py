"""The leakage guard: refuse an input column that alone predicts the label almost perfectly.

A hospital sheet often carries the answer in plain sight (the histology, how the diagnosis was verified, the
radiologist's conclusion). A model given such a column scores near-perfectly in cross-validation and is useless in
the clinic. Before any model trains, each clinical input column is scored on its own, inside the training folds.

How a column is scored (documented because it decides whether a run may go on)
-------------------------------------------------------------------------------
For each outer fold, only that fold's *training* cases and their labels are used (the test fold never is). The
score is the column's univariate AUC for the label; with more than two classes, the macro one-vs-rest AUC.

* numeric and ordinal columns: the value itself (an ordinal level by its rank), symmetric (max(AUC, 1 - AUC) per
  class), so a column predicting "low = malignant" counts too. Because the models see whether a cell is missing, a
  missing cell is ranked once below and once above every value; the better of the two counts.
* categorical, yes/no and multi-valued columns: each value's label rate (smoothed towards the overall rate by one
  case) is learned on one half of the training fold and scores the other half, and vice versa (a 2-fold split
  inside the training fold that keeps a patient's cases together; the mean of the two halves' AUCs). A value seen in one half only scores the
  overall rate, so an identifier unique to each case (or patient) cannot win by memorising. A missing cell is a
  value of its own; a multi-valued case scores the mean rate of its values.

A column whose AUC reaches ``data.roles.leakage_auc`` in the median fold is flagged. Flagged and not declared in
``data.roles.intended``: :class:`DataError` before any model trains. Declared: a logged warning; the run goes on.
Cells are read as the models read them (:mod:`breastfusion.data.column_types`: missing tokens, declared
types; ``multi`` split at ``data.multi_value_separator``; ``ordinal`` ranked by ``data.ordinal_levels``, else in
natural order: numbers first by value, then text, so ``4a`` < ``4b`` < ``5``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.stats import rankdata

from breastfusion.config import DataConfig
from breastfusion.data.cases import CASE_ID, LABEL
from breastfusion.data.column_types import (
    category_key,
    infer_column_type,
    ordinal_rank,
    parse_numbers,
    split_multi,
    yes_no,
)
from breastfusion.errors import DataError
from breastfusion.missing import is_missing, missing_tokens
from breastfusion.utils import atomic_path, stable_seed, write_json

log = logging.getLogger(__name__)

_MISSING = "\x00missing"  # a missing cell as a value of its own (never a real cell's text)
_SMOOTH = 1.0  # cases' worth of the overall rate mixed into each value's rate


@dataclass
class ColumnReading:
    """One column as the guard reads it: numbers (NaN missing) or, per case, the list of its values."""

    name: str
    kind: str  # numeric | ordinal | bool | categorical | multi
    n_missing: int
    values: np.ndarray | None = None       # numeric / ordinal
    indicators: sparse.csr_matrix | None = None  # categorical / bool / multi: case x value, rows sum to 1
    note: str = ""


@dataclass
class ColumnLeakage:
    name: str
    kind: str
    fold_auc: list[float]
    auc: float  # median over folds
    flagged: bool
    intended: bool = False

    def to_dict(self) -> dict:
        return {"kind": self.kind, "auc_median": _r(self.auc), "auc_per_fold": [_r(a) for a in self.fold_auc],
                "flagged": self.flagged, "intended": self.intended}


@dataclass
class LeakageResult:
    threshold: float
    n_folds: int
    columns: dict[str, ColumnLeakage] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def flagged(self) -> list[ColumnLeakage]:
        return [c for c in self.columns.values() if c.flagged]

    def table(self) -> pd.DataFrame:
        rows = [{"column": c.name, "type": c.kind, "auc_median": _r(c.auc),
                 "auc_min": _r(np.nanmin(c.fold_auc)) if np.isfinite(c.fold_auc).any() else None,
                 "auc_max": _r(np.nanmax(c.fold_auc)) if np.isfinite(c.fold_auc).any() else None,
                 "flagged": c.flagged, "intended": c.intended} for c in self.columns.values()]
        return pd.DataFrame(rows, columns=["column", "type", "auc_median", "auc_min", "auc_max", "flagged",
                                           "intended"])

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "folds": self.n_folds, "seconds": round(self.seconds, 3),
                "rule": "univariate AUC for the label inside each training fold (macro one-vs-rest); median over "
                        "folds; flagged when >= threshold",
                "columns": {n: c.to_dict() for n, c in self.columns.items()}}


def _r(x) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


# ------------------------------------------------------------------------------------------------ reading


def read_column(s: pd.Series, name: str, data: DataConfig, *, row_ids=None,
                source: str = "cases table") -> ColumnReading:
    """Read one clinical column as the models read it (see the module docstring): the same typing rule,
    missing tokens, multi-value splitting and ordinal levels (:mod:`breastfusion.data.column_types`)."""
    tok = missing_tokens(data.missing_values)
    ids = list(s.index) if row_ids is None else list(row_ids)
    ct = infer_column_type(s, name, tok, declared=data.column_types.get(name), row_ids=ids, source=source,
                           separator=data.multi_value_separator, levels=data.ordinal_levels.get(name))
    cells = s.tolist()
    miss = np.array([is_missing(v, tok) for v in cells], dtype=bool)
    if ct.kind == "ordinal":
        x = np.full(len(cells), np.nan)
        for i, (v, m) in enumerate(zip(cells, miss)):
            r = None if m else ordinal_rank(v, ct.levels)
            if r is None and not m:  # the typing rule refuses this already; never rank a stranger silently
                raise DataError(f"{source}, case '{ids[i]}', column '{name}': '{v}' is not one of the ordinal "
                                f"levels {list(ct.levels)} (data.ordinal_levels).")
            x[i] = np.nan if r is None else r
        return ColumnReading(name, "ordinal", int(miss.sum()), values=x, note=ct.note)
    if ct.kind == "multi":
        sep = data.multi_value_separator
        vals = [split_multi(v, sep, tok) or [_MISSING] for v in cells]
        return ColumnReading(name, "multi", int(miss.sum()), indicators=_indicators(vals))
    if ct.kind == "numeric":
        x = parse_numbers(s, name, "numeric", tok, text_as_missing=ct.text_as_missing, source=source, row_ids=ids)
        return ColumnReading(name, "numeric", int(np.isnan(x).sum()), values=x)
    if ct.kind == "bool":
        keys = [[_MISSING] if m else [category_key(yes_no(v))] for v, m in zip(cells, miss)]
        return ColumnReading(name, "bool", int(miss.sum()), indicators=_indicators(keys))
    keys = [[_MISSING] if m else [category_key(v)] for v, m in zip(cells, miss)]
    return ColumnReading(name, ct.kind, int(miss.sum()), indicators=_indicators(keys))


def _indicators(values: list[list[str]]) -> sparse.csr_matrix:
    vocab: dict[str, int] = {}
    rows, cols, w = [], [], []
    for i, vs in enumerate(values):
        vs = list(dict.fromkeys(vs))
        for v in vs:
            rows.append(i)
            cols.append(vocab.setdefault(v, len(vocab)))
            w.append(1.0 / len(vs))
    return sparse.csr_matrix((w, (rows, cols)), shape=(len(values), max(len(vocab), 1)))


# ------------------------------------------------------------------------------------------------ scoring


def _auc(score: np.ndarray, pos: np.ndarray) -> float:
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    r = rankdata(score)
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _macro(scores: np.ndarray, y: np.ndarray, n_classes: int, symmetric: bool) -> float:
    """Macro one-vs-rest AUC; ``scores``: one score per case (every class) or a column per class. Binary: the AUC
    of the second class (the first's is the same)."""
    ks = [1] if n_classes == 2 else range(n_classes)
    out = []
    for k in ks:
        a = _auc(scores if scores.ndim == 1 else scores[:, k], y == k)
        if np.isfinite(a):
            out.append(max(a, 1 - a) if symmetric else a)
    return float(np.mean(out)) if out else math.nan


def _numeric_auc(x: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    miss = np.isnan(x)
    if miss.all():
        return math.nan
    if not miss.any():
        return _macro(x, y, n_classes, symmetric=True)
    lo, hi = np.nanmin(x) - 1.0, np.nanmax(x) + 1.0
    return max(_macro(np.where(miss, fill, x), y, n_classes, symmetric=True) for fill in (lo, hi))


def _category_auc(m: sparse.csr_matrix, y: np.ndarray, n_classes: int, half: np.ndarray) -> float:
    """Each value's label rate learned on one half scores the other half, both ways; the mean of the two AUCs.
    (One AUC over both halves would compare scores from two different rate tables: a constant column would then
    separate the halves by their base rates.)"""
    onehot = np.eye(n_classes)[y]
    binary = (m > 0).astype(np.float64)
    aucs = []
    for h in (0, 1):
        learn, apply = half == h, half != h
        if not learn.any() or not apply.any():
            continue
        prior = onehot[learn].mean(0)
        counts = binary[learn].T @ onehot[learn]  # value x class
        n_v = np.asarray(binary[learn].sum(0)).ravel()[:, None]
        rate = (counts + _SMOOTH * prior) / (n_v + _SMOOTH)
        score = m[apply] @ rate
        aucs.append(_macro(score, y[apply], n_classes, symmetric=False))
    aucs = [a for a in aucs if np.isfinite(a)]
    return float(np.mean(aucs)) if aucs else math.nan


def _halves(y: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """A 2-way split of a training fold: whole split groups (a patient, duplicates) to one half, alternating within
    each class (a group's class: its first case's) after a seeded shuffle, so both halves hold every class."""
    rng = np.random.default_rng(seed)
    first = pd.DataFrame({"g": groups, "y": y}).drop_duplicates("g")
    side: dict = {}
    for _, part in first.groupby("y", sort=True):
        gs = part["g"].to_numpy()[rng.permutation(len(part))]
        start = int(rng.integers(2))
        for i, g in enumerate(gs):
            side[g] = (i + start) % 2
    return np.array([side[g] for g in groups])


def fold_auc(reading: ColumnReading, y: np.ndarray, train: np.ndarray, n_classes: int, *,
             groups: np.ndarray | None = None, seed: int = 0) -> float:
    """The column's AUC for the label on the training cases ``train`` (a boolean mask) only; ``y`` holds class
    indices (the other cases' entries are never read)."""
    yt = y[train]
    if reading.values is not None:
        return _numeric_auc(reading.values[train], yt, n_classes)
    g = np.arange(len(yt)) if groups is None else np.asarray(groups)[train]
    return _category_auc(reading.indicators[np.flatnonzero(train)], yt, n_classes, _halves(yt, g, seed))


def leakage_scores(cases: pd.DataFrame, columns: list[str], splits: pd.DataFrame, classes: list[str],
                   data: DataConfig, *, seed: int = 0, intended: list[str] | None = None,
                   source: str = "cases table") -> LeakageResult:
    """Score every column in ``columns`` inside each training fold of ``splits`` (case_id, fold[, group])."""
    import time

    t0 = time.perf_counter()
    intended = set(intended or [])
    s = splits.set_index(splits[CASE_ID].astype(str))
    df = cases.assign(**{CASE_ID: cases[CASE_ID].astype(str)})
    df = df[df[CASE_ID].isin(s.index) & df[LABEL].isin(classes)].reset_index(drop=True)
    fold = s["fold"].reindex(df[CASE_ID]).to_numpy()
    groups = s["group"].reindex(df[CASE_ID]).to_numpy() if "group" in s.columns else df[CASE_ID].to_numpy()
    y = df[LABEL].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=int)
    folds = sorted(pd.unique(fold))
    threshold = data.roles.leakage_auc
    result = LeakageResult(threshold=threshold, n_folds=len(folds))
    ids = df[CASE_ID].tolist()
    for c in columns:
        reading = read_column(df[c], c, data, row_ids=ids, source=source)
        aucs = [fold_auc(reading, y, fold != f, len(classes), groups=groups, seed=stable_seed(seed, "leakage", f))
                for f in folds]
        med = float(np.nanmedian(aucs)) if np.isfinite(aucs).any() else math.nan
        result.columns[c] = ColumnLeakage(c, reading.kind, aucs, med, bool(np.isfinite(med) and med >= threshold),
                                          intended=c in intended)
    result.seconds = time.perf_counter() - t0
    return result


def write_leakage(result: LeakageResult, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    write_json(result.to_dict(), out_dir / "leakage.json")
    with atomic_path(out_dir / "leakage.csv") as tmp:
        result.table().to_csv(tmp, index=False)


def enforce(result: LeakageResult, *, where: str = "") -> None:
    """DataError listing every flagged column not declared intended; a warning for the intended ones."""
    for c in result.flagged:
        if c.intended:
            log.warning("leakage guard: input column '%s' alone predicts the label with AUC %.3f inside the training "
                        "folds (>= %.2f); it is declared in data.roles.intended, so the run goes on",
                        c.name, c.auc, result.threshold)
    bad = [c for c in result.flagged if not c.intended]
    if not bad:
        return
    listed = "\n".join(f"  '{c.name}' ({c.kind}): AUC {c.auc:.3f}" for c in sorted(bad, key=lambda c: -c.auc))
    raise DataError(
        f"Leakage guard: {len(bad)} input column(s) predict the label almost perfectly on their own (univariate AUC "
        f"inside the training folds, median over {result.n_folds} folds, >= data.roles.leakage_auc = "
        f"{result.threshold}); nothing was trained:\n{listed}\n"
        "A column that carries the answer (how the truth was established, the histology, the radiologist's "
        "conclusion) must not be an input: declare it under data.roles.exclude. If it is meant to be an input, "
        "declare it under data.roles.intended (the run goes on and the report says so)."
        + (f" Details: '{where}'." if where else ""))


def run_leakage_guard(cases: pd.DataFrame, columns: list[str], splits: pd.DataFrame, classes: list[str],
                      data: DataConfig, run_dir: str | Path, *, seed: int = 0) -> LeakageResult:
    """Score ``columns``, write ``leakage.json`` and ``leakage.csv`` into ``run_dir``, then refuse or warn."""
    result = leakage_scores(cases, columns, splits, classes, data, seed=seed, intended=data.roles.intended)
    write_leakage(result, run_dir)
    log.info("leakage guard: %d column(s) scored in %.2f s; flagged: %s", len(result.columns), result.seconds,
             [c.name for c in result.flagged] or "none")
    enforce(result, where=str(Path(run_dir) / "leakage.csv"))
    return result
