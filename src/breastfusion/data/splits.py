"""Cross-validation splits that never leak a patient or a duplicated image across folds.

A *split group* is a connected set of cases: two cases are connected when they share a ``patient_id``
or a duplicate group (exact or near-duplicate images, see :func:`breastfusion.data.audit.duplicate_groups`).
Every split group lies wholly inside one fold. Two strategies:

``stratified_group_kfold``  sklearn's ``StratifiedGroupKFold`` (shuffled with ``seed``) over split groups.
``leave_one_center_out``    one fold per acquiring centre (``center`` column), in sorted centre order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from breastfusion.data.cases import CASE_ID, CENTER, LABEL, PATIENT_ID
from breastfusion.errors import ConfigError, DataError
from breastfusion.utils import UnionFind, atomic_path

STRATEGIES = ("stratified_group_kfold", "leave_one_center_out")
SPLIT_COLUMNS = (CASE_ID, "fold", "group")


def _case_ids(cases: pd.DataFrame) -> pd.Series:
    if not isinstance(cases, pd.DataFrame):
        raise TypeError(f"The cases table must be a pandas DataFrame. Got {type(cases).__name__} instead.")
    if CASE_ID not in cases.columns:
        raise DataError(f"The cases table has no '{CASE_ID}' column.")
    ids = cases[CASE_ID].astype(str).reset_index(drop=True)
    dup = ids.duplicated()
    if dup.any():
        raise DataError(f"case_id '{ids[dup].iloc[0]}' appears more than once in the cases table.")
    return ids


def _dup_lookup(groups, ids: pd.Series) -> list | None:
    """Duplicate-group id of every case (in ``ids`` order), or None when no groups were given."""
    if groups is None:
        return None
    if isinstance(groups, Mapping):
        groups = pd.Series(dict(groups), dtype=object)
    if not isinstance(groups, pd.Series):
        raise TypeError(
            "The 'groups' parameter must be a pandas Series indexed by case_id (e.g. from duplicate_groups) "
            f"or a mapping case_id -> group. Got {type(groups).__name__} instead."
        )
    g = groups.copy()
    g.index = g.index.astype(str)
    if g.index.duplicated().any():
        raise DataError(f"'groups' lists case_id '{g.index[g.index.duplicated()][0]}' more than once.")
    missing = ~ids.isin(g.index)
    if missing.any():
        some = ", ".join(f"'{c}'" for c in ids[missing].head(3))
        raise DataError(
            f"'groups' has no entry for {int(missing.sum())} case(s) of the cases table ({some}"
            f"{', ...' if missing.sum() > 3 else ''}); it must be indexed by case_id and cover every case "
            "(recompute it with duplicate_groups on this cases table)."
        )
    vals = g.reindex(ids).tolist()
    # A missing group id means "no duplicate": a group of its own.
    return [f"solo:{c}" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for c, v in zip(ids, vals)]


def split_groups(cases: pd.DataFrame, groups: pd.Series | Mapping | None = None) -> pd.Series:
    """Connected components of "same patient" and "same duplicate group", as a Series case_id -> 'gNNNN'.

    Components are numbered in order of their first case in ``cases``.
    """
    ids = _case_ids(cases)
    n = len(ids)
    uf = UnionFind(n)
    keys: list[list] = []
    if PATIENT_ID in cases.columns:
        pat = cases[PATIENT_ID].reset_index(drop=True)
        keys.append([None if pd.isna(p) else f"patient:{p}" for p in pat])
    dup = _dup_lookup(groups, ids)
    if dup is not None:
        keys.append([f"dup:{d}" for d in dup])
    for key in keys:
        first: dict = {}
        for i, k in enumerate(key):
            if k is None:
                continue
            if k in first:
                uf.union(first[k], i)
            else:
                first[k] = i
    roots = [uf.find(i) for i in range(n)]
    number: dict[int, int] = {}
    for r in roots:
        number.setdefault(r, len(number))
    width = max(4, len(str(len(number))))
    return pd.Series([f"g{number[r]:0{width}d}" for r in roots], index=pd.Index(ids, name=CASE_ID), name="group")


def _check_n_splits(n_splits) -> int:
    if isinstance(n_splits, (bool, np.bool_)) or not isinstance(n_splits, (int, np.integer)) or n_splits < 2:
        raise ConfigError(
            f"The 'n_splits' parameter of make_splits must be an int in the range [2, inf). Got {n_splits!r} instead."
        )
    return int(n_splits)


def make_splits(
    cases: pd.DataFrame,
    *,
    n_splits: int = 5,
    seed: int = 0,
    groups: pd.Series | Mapping | None = None,
    strategy: str = "stratified_group_kfold",
) -> pd.DataFrame:
    """Assign every case to a fold; a patient or a duplicate group never spans two folds.

    ``groups`` is the duplicate-group id of each case (a Series indexed by case_id, as returned by
    :func:`breastfusion.data.audit.duplicate_groups`); without it only patients are kept together.
    Returns a DataFrame with columns ``case_id``, ``fold`` (int, 0-based) and ``group`` (the split group),
    plus ``center`` for ``leave_one_center_out`` (fold k holds out the k-th centre in sorted order).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"The 'strategy' parameter of make_splits must be one of {list(STRATEGIES)}. Got {strategy!r} instead."
        )
    if strategy == "stratified_group_kfold":
        n_splits = _check_n_splits(n_splits)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"The 'seed' parameter of make_splits must be an int. Got {seed!r} instead.")
    ids = _case_ids(cases)
    if len(ids) == 0:
        raise DataError("The cases table is empty: nothing to split.")
    sg = split_groups(cases, groups)
    out = pd.DataFrame({CASE_ID: ids, "fold": 0, "group": sg.to_numpy()})

    if strategy == "leave_one_center_out":
        if CENTER not in cases.columns:
            raise DataError("leave_one_center_out needs a 'center' column in the cases table.")
        center = cases[CENTER].reset_index(drop=True).fillna("center_0").astype(str)
        centers = sorted(center.unique())
        if len(centers) < 2:
            raise DataError(
                f"leave_one_center_out needs cases from at least 2 centres; the cases table has only "
                f"{len(centers)} ('{centers[0]}'). Use strategy='stratified_group_kfold'."
            )
        span = pd.DataFrame({"group": out["group"], "center": center}).groupby("group")["center"].nunique()
        if (span > 1).any():
            g = span.index[span > 1][0]
            members = out.loc[out["group"] == g, CASE_ID].tolist()
            raise DataError(
                f"Split group '{g}' (cases {members[:5]}) spans centres "
                f"{sorted(center[out['group'] == g].unique())}: the same patient or a duplicated image is "
                "in two centres, so leave-one-centre-out would leak it. Fix the patient ids or remove the duplicate."
            )
        out["fold"] = center.map({c: k for k, c in enumerate(centers)}).astype(int)
        out["center"] = center
        return out

    if LABEL not in cases.columns:
        raise DataError("stratified_group_kfold needs a 'label' column in the cases table.")
    labels = cases[LABEL].reset_index(drop=True)
    missing = labels.isna() | (labels.astype(str).str.strip() == "")
    if missing.any():
        raise DataError(f"Case '{ids[missing].iloc[0]}' has no label; every case needs one to be split.")
    labels = labels.astype(str)
    per_class = pd.DataFrame({"label": labels, "group": out["group"]}).groupby("label")["group"].nunique()
    n_groups = out["group"].nunique()
    if n_groups < n_splits:
        raise DataError(
            f"Only {n_groups} independent groups (patients / duplicate groups) for n_splits={n_splits}; "
            f"use n_splits <= {n_groups}."
        )
    for cls, k in per_class.sort_values().items():
        if k < n_splits:
            raise DataError(
                f"Class '{cls}' has only {k} independent group(s) (patients / duplicate groups), fewer than "
                f"n_splits={n_splits}, so some folds would have no '{cls}' case; use n_splits <= {k} "
                "(or gather more cases of that class)."
            )
    from sklearn.model_selection import StratifiedGroupKFold

    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=int(seed) % (2**32))
    fold = np.full(len(ids), -1, dtype=int)
    for k, (_, test) in enumerate(sgkf.split(np.zeros(len(ids)), labels.to_numpy(), out["group"].to_numpy())):
        fold[test] = k
    out["fold"] = fold
    return out


def check_no_leakage(
    splits: pd.DataFrame, cases: pd.DataFrame, groups: pd.Series | Mapping | None = None
) -> None:
    """Raise :class:`DataError` if a patient or a duplicate group of ``cases`` spans two folds of ``splits``.

    Only the cases present in both tables are checked.
    """
    for col in (CASE_ID, "fold"):
        if col not in splits.columns:
            raise DataError(f"The splits table has no '{col}' column.")
    sg = split_groups(cases, groups)
    fold = pd.Series(splits["fold"].to_numpy(), index=splits[CASE_ID].astype(str))
    if fold.index.duplicated().any():
        raise DataError(f"case_id '{fold.index[fold.index.duplicated()][0]}' appears twice in the splits table.")
    df = pd.DataFrame({"group": sg}).join(fold.rename("fold"), how="inner")
    nfold = df.groupby("group")["fold"].nunique()
    bad = nfold[nfold > 1]
    if len(bad):
        g = bad.index[0]
        part = df[df["group"] == g]
        desc = "; ".join(
            f"fold {f}: {sorted(part.index[part['fold'] == f])[:4]}" for f in sorted(part["fold"].unique())
        )
        raise DataError(
            f"Leakage: {len(bad)} patient/duplicate group(s) span several folds, e.g. group '{g}' -> {desc}."
        )


def save_splits(splits: pd.DataFrame, path: str | Path) -> Path:
    """Write a splits table as CSV (or JSON records when the suffix is .json), atomically."""
    path = Path(path)
    for col in (CASE_ID, "fold"):
        if col not in splits.columns:
            raise DataError(f"The splits table has no '{col}' column.")
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".json":
            Path(tmp).write_text(json.dumps(splits.to_dict(orient="records"), indent=1, default=str) + "\n")
        else:
            splits.to_csv(tmp, index=False)
    return path


def load_splits(path: str | Path) -> pd.DataFrame:
    """Read a table written by :func:`save_splits`; checks columns and fold values."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Splits file not found: '{path}'.")
    try:
        if path.suffix.lower() == ".json":
            df = pd.DataFrame(json.loads(path.read_text()))
        else:
            df = pd.read_csv(path, dtype={CASE_ID: str, "group": str, "center": str}, keep_default_na=False)
    except Exception as exc:  # pandas / json raise many types for bad files
        raise DataError(f"Cannot read splits file '{path}': {exc}") from exc
    for col in (CASE_ID, "fold"):
        if col not in df.columns:
            raise DataError(f"Splits file '{path}' has no '{col}' column (columns: {list(df.columns)}).")
    df[CASE_ID] = df[CASE_ID].astype(str)
    fold = pd.to_numeric(df["fold"], errors="coerce")
    if fold.isna().any() or (fold != fold.round()).any() or (fold < 0).any():
        bad = df.loc[fold.isna() | (fold != fold.round()) | (fold < 0), CASE_ID].iloc[0]
        raise DataError(f"Splits file '{path}': case '{bad}' has an invalid fold (must be an integer >= 0).")
    df["fold"] = fold.astype(int)
    if df[CASE_ID].duplicated().any():
        dup = df[CASE_ID][df[CASE_ID].duplicated()].iloc[0]
        raise DataError(f"Splits file '{path}': case_id '{dup}' appears twice.")
    return df
