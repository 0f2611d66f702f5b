"""Tabular preprocessing: clinical, biomarker and handcrafted columns → a numeric matrix.

Fitted on the training part only. Numeric columns: median imputation + standardisation + a missing
indicator; booleans: 0/1 + indicator; categoricals: one-hot over the categories seen in training +
indicator; multi-valued columns (declared ``multi``): one 0/1 indicator per value seen in training +
indicator; ordinal columns (declared ``ordinal``): the rank among the levels, then as numeric. Which type a column has, and which text means "missing", is decided in
:mod:`breastfusion.data.column_types` (declared types win; ambiguous columns are logged). The fitted
state is plain JSON (stored in bundles; nothing pickled) and carries the kinds and the missing tokens, so
prediction reads a cell the way training did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from breastfusion.data.column_types import (
    DEFAULT_SEPARATOR,
    FALSE_WORDS,
    TRUE_WORDS,
    ColumnType,
    category_key,
    default_row_ids,
    infer_column_type,
    ordinal_rank,
    parse_numbers,
    report_ambiguous,
    split_multi,
)
from breastfusion.errors import DataError
from breastfusion.missing import (
    DEFAULT_MISSING_VALUES,
    LEGACY_MISSING_VALUES,
    MissingTokens,
    is_missing,
)

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MISSING_VALUES", "ColumnType", "TabularPreprocessor", "infer_column_type", "is_missing"]

# Kept for callers that import the old names (serve/engine.py): the default missing tokens apply.
_TRUE, _FALSE = set(TRUE_WORDS), set(FALSE_WORDS)


def _row(i: int, row_ids) -> str:
    return f"case '{row_ids[i]}'" if row_ids is not None else f"row {i}"


@dataclass
class TabularPreprocessor:
    """Fit on a training table; ``transform`` returns float32 (n, n_features_out_).

    ``missing_values``: text read as missing (stripped, case-insensitive; default
    :data:`~breastfusion.data.column_types.DEFAULT_MISSING_VALUES`). ``column_types``: declared kinds
    (``numeric`` / ``bool`` / ``categorical`` / ``multi`` / ``ordinal``) of some columns; the rest are inferred.
    ``multi_separator`` joins the values of a ``multi`` cell; ``ordinal_levels``: declared levels per ordinal
    column (lowest first; without them the levels seen are put in natural order and reported).
    """

    unknown_category: str = "error"  # or "missing"
    missing_values: list[str] = field(default_factory=lambda: list(DEFAULT_MISSING_VALUES))
    column_types: dict[str, str] = field(default_factory=dict)
    multi_separator: str = DEFAULT_SEPARATOR
    ordinal_levels: dict[str, list[str]] = field(default_factory=dict)
    columns_: list[str] = field(default_factory=list)
    kinds_: dict[str, str] = field(default_factory=dict)
    medians_: dict[str, float] = field(default_factory=dict)
    means_: dict[str, float] = field(default_factory=dict)
    scales_: dict[str, float] = field(default_factory=dict)
    categories_: dict[str, list[str]] = field(default_factory=dict)
    text_as_missing_: dict[str, list[str]] = field(default_factory=dict)
    levels_: dict[str, list[str]] = field(default_factory=dict)  # fitted levels of each ordinal column
    types_: dict[str, ColumnType] = field(default_factory=dict, repr=False)  # this fit's decisions (not saved)

    def __post_init__(self) -> None:
        self.missing_values = [str(t) for t in self.missing_values]
        self._tokens = MissingTokens(self.missing_values)

    def fit(self, table: pd.DataFrame, columns: list[str] | None = None,
            vocabulary: pd.DataFrame | None = None) -> "TabularPreprocessor":
        """Learn imputation and scaling from ``table``. Kinds and category lists come from ``vocabulary`` when
        given (e.g. the whole cohort, so a category that happens to fall only in a test fold is not "unknown";
        reading types and category names uses no label information)."""
        columns = list(table.columns) if columns is None else list(columns)
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise DataError(f"Tabular columns not in the table: {missing}.")
        self._tokens = MissingTokens(self.missing_values)
        self.columns_ = columns
        for c in columns:
            s = table[c]
            vocab = vocabulary[c] if vocabulary is not None and c in vocabulary.columns else s
            ct = infer_column_type(vocab, str(c), self._tokens, declared=self.column_types.get(c),
                                   source="training table", separator=self.multi_separator,
                                   levels=self.ordinal_levels.get(c))
            report_ambiguous(ct, codes_level=logging.INFO)
            self.types_[c] = ct
            self.kinds_[c] = ct.kind
            if ct.text_as_missing:
                self.text_as_missing_[c] = list(ct.text_as_missing)
            if ct.kind == "ordinal":
                self.levels_[c] = list(ct.levels)
            if ct.kind == "categorical":
                self.categories_[c] = sorted({category_key(v) for v in vocab if not is_missing(v, self._tokens)})
            elif ct.kind == "multi":
                self.categories_[c] = sorted({k for v in vocab for k in split_multi(v, self.multi_separator,
                                                                                      self._tokens)})
            else:
                x = self._numeric(s, c, ct.kind, source="training table", row_ids=default_row_ids(s))
                finite = x[np.isfinite(x)]
                med = float(np.median(finite)) if finite.size else 0.0
                self.medians_[c] = med
                filled = np.where(np.isfinite(x), x, med)
                self.means_[c] = float(filled.mean()) if filled.size else 0.0
                sd = float(filled.std()) if filled.size else 0.0
                self.scales_[c] = sd if sd > 1e-12 else 1.0
        return self

    def _numeric(self, s: pd.Series, col: str, kind: str, source: str, row_ids=None) -> np.ndarray:
        if kind == "ordinal":
            return self._ranks(s, col, source, row_ids)
        return parse_numbers(s, col, kind, self._tokens, text_as_missing=self.text_as_missing_.get(col, ()),
                             source=source, row_ids=row_ids)

    def _ranks(self, s: pd.Series, col: str, source: str, row_ids=None) -> np.ndarray:
        """An ordinal column as ranks (NaN where missing). A value that is not a level: DataError naming the row,
        or missing with a warning under ``unknown_category='missing'``."""
        levels = self.levels_.get(col, [])
        out = np.full(len(s), np.nan, dtype=np.float64)
        for i, v in enumerate(s.tolist()):
            if is_missing(v, self._tokens):
                continue
            r = ordinal_rank(v, levels)
            if r is None:
                if self.unknown_category == "missing":
                    log.warning("%s, %s, column '%s': unknown level '%s' treated as missing", source,
                                self._row(i, row_ids), col, v)
                    continue
                raise DataError(f"{source}, {self._row(i, row_ids)}, column '{col}': unknown level '{v}'; "
                                f"levels: {levels}.")
            out[i] = r
        return out

    def _multi(self, s: pd.Series, col: str, miss: np.ndarray, source: str, row_ids=None) -> np.ndarray:
        """A multi-valued column as one 0/1 indicator per training value; ``miss`` is updated in place (a cell
        whose every value is unknown, under ``unknown_category='missing'``, becomes missing)."""
        cats = self.categories_[col]
        index = {k: j for j, k in enumerate(cats)}
        block = np.zeros((len(s), len(cats)), dtype=np.float32)
        for i, v in enumerate(s.tolist()):
            if miss[i]:
                continue
            parts = split_multi(v, self.multi_separator, self._tokens)
            unknown = [k for k in parts if k not in index]
            if unknown:
                if self.unknown_category != "missing":
                    raise DataError(f"{source}, {self._row(i, row_ids)}, column '{col}': unknown value "
                                    f"'{unknown[0]}' in '{v}'; known: {cats}.")
                log.warning("%s, %s, column '%s': unknown value(s) %s in '%s' ignored", source,
                            self._row(i, row_ids), col, unknown, v)
            known = [index[k] for k in parts if k in index]
            if not known:
                miss[i] = True
                continue
            block[i, known] = 1.0
        return block

    def is_missing(self, v) -> bool:
        """Whether a cell is missing under this preprocessor's tokens."""
        return is_missing(v, self._tokens)

    @staticmethod
    def _row(i: int, row_ids) -> str:
        return _row(i, row_ids)

    @property
    def feature_names_(self) -> list[str]:
        names = []
        for c in self.columns_:
            if self.kinds_[c] in ("categorical", "multi"):
                names += [f"{c}={k}" for k in self.categories_[c]]
            else:
                names.append(c)
            names.append(f"{c}__missing")
        return names

    @property
    def n_features_out_(self) -> int:
        return len(self.feature_names_)

    def transform(self, table: pd.DataFrame, *, row_ids=None, source: str = "table") -> np.ndarray:
        """Encode ``table``. Absent columns count as missing for every row (a case without tabular data)."""
        if not self.columns_ and not self.kinds_:
            return np.zeros((len(table), 0), dtype=np.float32)
        n = len(table)
        blocks = []
        for c in self.columns_:
            s = table[c] if c in table.columns else pd.Series([None] * n, index=table.index)
            extra = {t.lower() for t in self.text_as_missing_.get(c, ())}
            miss = np.array([is_missing(v, self._tokens) or (isinstance(v, str) and v.strip().lower() in extra)
                             for v in s.tolist()], dtype=bool)
            if self.kinds_[c] == "categorical":
                cats = self.categories_[c]
                onehot = np.zeros((n, len(cats)), dtype=np.float32)
                index = {k: j for j, k in enumerate(cats)}
                for i, v in enumerate(s.tolist()):
                    if miss[i]:
                        continue
                    j = index.get(category_key(v))
                    if j is None:
                        if self.unknown_category == "missing":
                            log.warning("%s, %s, column '%s': unknown category '%s' treated as missing",
                                        source, self._row(i, row_ids), c, v)
                            miss[i] = True
                            continue
                        raise DataError(
                            f"{source}, {self._row(i, row_ids)}, column '{c}': unknown category '{v}'; "
                            f"known: {cats}."
                        )
                    onehot[i, j] = 1.0
                blocks.append(onehot)
            elif self.kinds_[c] == "multi":
                blocks.append(self._multi(s, c, miss, source, row_ids))
            else:
                x = self._numeric(s, c, self.kinds_[c], source, row_ids)
                if self.kinds_[c] == "ordinal":
                    miss |= ~np.isfinite(x)  # an unknown level read as missing (unknown_category='missing')
                x = np.where(np.isfinite(x), x, self.medians_[c])
                blocks.append(((x - self.means_[c]) / self.scales_[c]).astype(np.float32)[:, None])
            blocks.append(miss.astype(np.float32)[:, None])
        return np.concatenate(blocks, axis=1) if blocks else np.zeros((n, 0), dtype=np.float32)

    @classmethod
    def for_config(cls, data) -> "TabularPreprocessor":
        """An unfitted preprocessor that reads cells as ``data`` (the config's ``data`` section) says."""
        return cls(unknown_category=data.unknown_category, missing_values=data.missing_values,
                   column_types=data.column_types, multi_separator=data.multi_value_separator,
                   ordinal_levels=data.ordinal_levels)

    def fit_transform(self, table: pd.DataFrame, columns: list[str] | None = None, **kw) -> np.ndarray:
        return self.fit(table, columns).transform(table, **kw)

    def to_dict(self) -> dict:
        return {
            "unknown_category": self.unknown_category, "columns": self.columns_, "kinds": self.kinds_,
            "medians": self.medians_, "means": self.means_, "scales": self.scales_, "categories": self.categories_,
            "missing_values": list(self.missing_values), "column_types": dict(self.column_types),
            "text_as_missing": self.text_as_missing_, "multi_separator": self.multi_separator,
            "ordinal_levels": dict(self.ordinal_levels), "levels": self.levels_,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TabularPreprocessor":
        # A bundle saved before missing tokens were stored read only blank cells as missing: keep that, so its
        # categories (which may include 'unknown') mean what they meant in training.
        return cls(unknown_category=d.get("unknown_category", "error"),
                   missing_values=list(d.get("missing_values", LEGACY_MISSING_VALUES)),
                   column_types=dict(d.get("column_types") or {}), columns_=list(d["columns"]),
                   kinds_=dict(d["kinds"]), medians_=dict(d["medians"]), means_=dict(d["means"]),
                   scales_=dict(d["scales"]), categories_={k: list(v) for k, v in d["categories"].items()},
                   text_as_missing_={k: list(v) for k, v in (d.get("text_as_missing") or {}).items()},
                   # bundles saved before multi/ordinal columns existed hold neither (and need neither)
                   multi_separator=str(d.get("multi_separator") or DEFAULT_SEPARATOR),
                   ordinal_levels={k: list(v) for k, v in (d.get("ordinal_levels") or {}).items()},
                   levels_={k: list(v) for k, v in (d.get("levels") or {}).items()})
