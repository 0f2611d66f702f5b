"""Assemble the tabular modality of each case: clinical/biomarker columns plus handcrafted features."""

from __future__ import annotations

import numpy as np
import pandas as pd

from breastfusion.data.cases import CASE_ID, feature_columns
from breastfusion.errors import DataError
from breastfusion.features.tabular import TabularPreprocessor, _infer_kind, _is_missing


def clinical_columns(cases: pd.DataFrame, requested: list[str] | None = None) -> list[str]:
    available = feature_columns(cases)
    if requested is None:
        return available
    missing = [c for c in requested if c not in cases.columns]
    if missing:
        raise DataError(f"data.tabular_columns names columns the cases table lacks: {missing}; it has: {available}.")
    return list(requested)


def tabular_table(cases: pd.DataFrame, columns: list[str], handcrafted: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per case (index case_id): the chosen clinical columns, then handcrafted features."""
    table = cases.set_index(CASE_ID)[columns].copy()
    if handcrafted is not None and len(handcrafted.columns):
        table = table.join(handcrafted.reindex(table.index), how="left")
    return table


def numeric_for_classical(table: pd.DataFrame) -> pd.DataFrame:
    """Numeric view for scikit-learn pipelines: booleans → 0/1, categoricals → one-hot, missing stays NaN.

    No statistics are learned here (imputation and scaling happen inside each fold's pipeline); only the
    category vocabulary is read, which uses no label information.
    """
    pre = TabularPreprocessor(unknown_category="missing")
    out = {}
    for c in table.columns:
        s = table[c]
        kind = _infer_kind(s)
        if kind == "categorical":
            cats = sorted({str(v).strip() for v in s if not _is_missing(v)})
            miss = np.array([_is_missing(v) for v in s], dtype=bool)
            for k in cats:
                col = np.array([(not m) and str(v).strip() == k for v, m in zip(s, miss)], dtype=float)
                col[miss] = np.nan
                out[f"{c}={k}"] = col
        else:
            out[c] = pre._numeric(s, c, kind, source="tabular table", row_ids=list(table.index))
    return pd.DataFrame(out, index=table.index)


def numeric_like(table: pd.DataFrame, features: list[str], *, source: str = "input") -> pd.DataFrame:
    """Rebuild the columns :func:`numeric_for_classical` produced at training (``features``) for new rows.

    ``col=cat`` columns are one-hot indicators (NaN when the cell is missing); other columns are numbers. A value
    that is not a number, or a category never seen in training, raises :class:`DataError` naming row and column.
    """
    out = {}
    ids = list(table.index)
    onehot: dict[str, list[str]] = {}
    for f in features:
        if f not in table.columns and "=" in f:
            col, cat = f.split("=", 1)
            onehot.setdefault(col, []).append(cat)
    for f in features:
        if f in table.columns:
            s = table[f]
            kind = "bool" if _infer_kind(s) == "bool" and not pd.api.types.is_numeric_dtype(s) else "numeric"
            out[f] = TabularPreprocessor()._numeric(s, f, kind, source=source, row_ids=ids)
        elif "=" in f and f.split("=", 1)[0] in table.columns:
            col, cat = f.split("=", 1)
            s = table[col]
            vals = []
            for i, v in enumerate(s):
                if _is_missing(v):
                    vals.append(np.nan)
                    continue
                if str(v).strip() not in onehot[col]:
                    raise DataError(f"{source}, case '{ids[i]}', column '{col}': unknown category '{v}'; "
                                    f"known: {onehot[col]}.")
                vals.append(float(str(v).strip() == cat))
            out[f] = vals
        else:
            out[f] = np.full(len(table), np.nan)  # column absent: missing for every row
    return pd.DataFrame(out, index=table.index, columns=features)
