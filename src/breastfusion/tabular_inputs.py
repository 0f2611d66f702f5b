"""Assemble the tabular modality of each case: clinical/biomarker columns plus handcrafted features."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from breastfusion.data.cases import CASE_ID, feature_columns
from breastfusion.data.column_types import (
    DEFAULT_SEPARATOR,
    category_key,
    infer_column_type,
    ordinal_rank,
    parse_numbers,
    report_ambiguous,
    split_multi,
    yes_no,
)
from breastfusion.errors import DataError
from breastfusion.missing import is_missing, missing_tokens


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


def classical_matrix(table: pd.DataFrame, data) -> pd.DataFrame:
    """:func:`numeric_for_classical` reading cells as ``data`` (the config's ``data`` section) says."""
    return numeric_for_classical(table, missing_values=data.missing_values, column_types=data.column_types,
                                 separator=data.multi_value_separator, ordinal_levels=data.ordinal_levels)


def numeric_for_classical(table: pd.DataFrame, *, missing_values: list[str] | None = None,
                          column_types: dict[str, str] | None = None, separator: str = DEFAULT_SEPARATOR,
                          ordinal_levels: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """Numeric view for scikit-learn pipelines: booleans → 0/1, categoricals → one-hot, multi-valued columns →
    one indicator per value, ordinal columns → rank; missing stays NaN.

    Column types are read as :class:`TabularPreprocessor` reads them (missing tokens, declared types; an
    ambiguous column is logged), so a numeric column stays one numeric feature here too. No statistics are
    learned here (imputation and scaling happen inside each fold's pipeline); only the category vocabulary
    and the ordinal levels are read, which uses no label information. ``result.attrs['reading']`` holds what
    :func:`numeric_like` needs to read new rows the same way (see :func:`classical_reading`).
    """
    tok = missing_tokens(missing_values)
    types = column_types or {}
    levels = ordinal_levels or {}
    ids = list(table.index)
    out = {}
    reading: dict = {"missing_values": list(tok.original), "text_as_missing": {}, "separator": separator,
                     "multi": [], "ordinal_levels": {}}
    for c in table.columns:
        s = table[c]
        ct = infer_column_type(s, str(c), tok, declared=types.get(c), row_ids=ids, source="tabular table",
                               separator=separator, levels=levels.get(c))
        report_ambiguous(ct, codes_level=logging.INFO)
        if ct.kind == "categorical":
            keys = [None if is_missing(v, tok) else category_key(v) for v in s]
            for k in sorted({k for k in keys if k is not None}):
                col = np.array([np.nan if key is None else float(key == k) for key in keys], dtype=float)
                out[f"{c}={k}"] = col
        elif ct.kind == "multi":
            reading["multi"].append(str(c))
            parts = [None if is_missing(v, tok) else split_multi(v, separator, tok) for v in s]
            for k in sorted({k for p in parts if p for k in p}):
                out[f"{c}={k}"] = np.array([np.nan if not p else float(k in p) for p in parts], dtype=float)
        elif ct.kind == "ordinal":
            reading["ordinal_levels"][str(c)] = list(ct.levels)
            out[c] = np.array([np.nan if is_missing(v, tok) else ordinal_rank(v, ct.levels) for v in s], dtype=float)
        else:
            if ct.text_as_missing:
                reading["text_as_missing"][str(c)] = list(ct.text_as_missing)
            out[c] = parse_numbers(s, c, ct.kind, tok, text_as_missing=ct.text_as_missing,
                                   source="tabular table", row_ids=ids)
    frame = pd.DataFrame(out, index=table.index)
    frame.attrs["reading"] = reading
    return frame


def classical_reading(pre) -> dict:
    """How :func:`numeric_like` reads cells as training did, from a fitted TabularPreprocessor (or ``{}``)."""
    if pre is None:
        return {}
    return {"missing_values": pre.missing_values, "text_as_missing": pre.text_as_missing_,
            "separator": pre.multi_separator, "multi": [c for c, k in pre.kinds_.items() if k == "multi"],
            "ordinal_levels": dict(pre.levels_)}


def numeric_like(table: pd.DataFrame, features: list[str], *, source: str = "input",
                 missing_values: list[str] | None = None,
                 text_as_missing: dict[str, list[str]] | None = None, separator: str = DEFAULT_SEPARATOR,
                 multi: list[str] | None = None,
                 ordinal_levels: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """Rebuild the columns :func:`numeric_for_classical` produced at training (``features``) for new rows.

    ``col=cat`` columns are one-hot indicators (NaN when the cell is missing); other columns are numbers (a
    missing token, default
    :data:`~breastfusion.data.column_types.DEFAULT_MISSING_VALUES`, is NaN). A value that is not a number, or a category
    never seen in training, raises :class:`DataError` naming row and column. ``text_as_missing``: per column, the
    text that training read as missing in a mostly-numeric column (as the fitted preprocessor records it).
    ``multi``: the multi-valued columns (cells split on ``separator``; a value never seen in training is an
    error); ``ordinal_levels``: the levels of each ordinal column (a cell becomes its rank; another value is an
    error). Both as ``numeric_for_classical(...).attrs['reading']`` records them.
    """
    tok = missing_tokens(missing_values)
    text_as_missing = text_as_missing or {}
    multi_cols = set(multi or ())
    levels = ordinal_levels or {}
    out = {}
    ids = list(table.index)
    onehot: dict[str, list[str]] = {}
    for f in features:
        if f not in table.columns and "=" in f:
            col, cat = f.split("=", 1)
            onehot.setdefault(col, []).append(cat)
    for f in features:
        if f in table.columns and f in levels:
            ranks = []
            for i, v in enumerate(table[f]):
                r = None if is_missing(v, tok) else ordinal_rank(v, levels[f])
                if r is None and not is_missing(v, tok):
                    raise DataError(f"{source}, case '{ids[i]}', column '{f}': unknown level '{v}'; "
                                    f"levels: {levels[f]}.")
                ranks.append(np.nan if r is None else r)
            out[f] = ranks
        elif f in table.columns:
            s = table[f]
            # A yes/no word is 0/1 (a bool column at training); anything else must be a number.
            present = [v for v in s if not is_missing(v, tok)]
            kind = "bool" if present and not pd.api.types.is_numeric_dtype(s) and all(
                yes_no(v) is not None for v in present) else "numeric"
            out[f] = parse_numbers(s, f, kind, tok, text_as_missing=text_as_missing.get(f, ()), source=source,
                                   row_ids=ids)
        elif "=" in f and f.split("=", 1)[0] in table.columns:
            col, cat = f.split("=", 1)
            s = table[col]
            vals = []
            for i, v in enumerate(s):
                if is_missing(v, tok):
                    vals.append(np.nan)
                    continue
                if col in multi_cols:
                    parts = split_multi(v, separator, tok)
                    unknown = [k for k in parts if k not in onehot[col]]
                    if unknown:
                        raise DataError(f"{source}, case '{ids[i]}', column '{col}': unknown value '{unknown[0]}' "
                                        f"in '{v}'; known: {onehot[col]}.")
                    vals.append(float(cat in parts) if parts else np.nan)
                    continue
                key = category_key(v)
                if key not in onehot[col]:
                    raise DataError(f"{source}, case '{ids[i]}', column '{col}': unknown category '{v}'; "
                                    f"known: {onehot[col]}.")
                vals.append(float(key == cat))
            out[f] = vals
        else:
            out[f] = np.full(len(table), np.nan)  # column absent: missing for every row
    return pd.DataFrame(out, index=table.index, columns=features)
