"""Tabular preprocessing: clinical, biomarker and handcrafted columns → a numeric matrix.

Fitted on the training part only. Numeric columns: median imputation + standardisation + a missing
indicator; booleans: 0/1 + indicator; categoricals: one-hot over the categories seen in training +
indicator. Which type a column has, and which text means "missing", is decided in
:mod:`breastfusion.features.column_types` (declared types win; ambiguous columns are logged). The fitted
state is plain JSON (stored in bundles; nothing pickled) and carries the kinds and the missing tokens, so
prediction reads a cell the way training did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from breastfusion.errors import DataError
from breastfusion.features.column_types import (
    DEFAULT_MISSING_VALUES,
    FALSE_WORDS,
    TRUE_WORDS,
    ColumnType,
    MissingTokens,
    category_key,
    default_row_ids,
    infer_column_type,
    is_missing,
    missing_tokens,
    report_ambiguous,
    yes_no,
)
from breastfusion.features.missing_tokens import LEGACY_MISSING_VALUES

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MISSING_VALUES", "ColumnType", "TabularPreprocessor", "infer_column_type", "is_missing",
           "parse_numbers"]

# Kept for callers that import the old names (serve/engine.py): the default missing tokens apply.
_TRUE, _FALSE = set(TRUE_WORDS), set(FALSE_WORDS)


def _is_missing(v) -> bool:
    return is_missing(v)


def _row(i: int, row_ids) -> str:
    return f"case '{row_ids[i]}'" if row_ids is not None else f"row {i}"


def parse_numbers(s: pd.Series, col: str, kind: str, tokens: "MissingTokens | list[str] | None" = None, *,
                  text_as_missing=(), source: str = "table", row_ids=None) -> np.ndarray:
    """A numeric or yes/no column as floats (NaN where missing). ``text_as_missing``: text that training read
    as missing in this column (see the column_types rule 4). Anything else that is not a number (a yes/no
    value) raises DataError naming the row and column."""
    tok = missing_tokens(tokens)
    extra = {str(t).strip().lower() for t in text_as_missing}
    out = np.full(len(s), np.nan, dtype=np.float64)
    for i, v in enumerate(s.tolist()):
        if is_missing(v, tok) or (extra and isinstance(v, str) and v.strip().lower() in extra):
            continue
        if kind == "bool":
            x = yes_no(v)
            if x is None:
                raise DataError(f"{source}, {_row(i, row_ids)}, column '{col}': '{v}' is not a yes/no value.")
            out[i] = x
            continue
        try:
            out[i] = float(v)
        except (TypeError, ValueError, OverflowError):
            raise DataError(f"{source}, {_row(i, row_ids)}, column '{col}': '{v}' is not a number.") from None
        if np.isinf(out[i]):
            raise DataError(f"{source}, {_row(i, row_ids)}, column '{col}': infinite value.")
    return out


@dataclass
class TabularPreprocessor:
    """Fit on a training table; ``transform`` returns float32 (n, n_features_out_).

    ``missing_values``: text read as missing (stripped, case-insensitive; default
    :data:`~breastfusion.features.column_types.DEFAULT_MISSING_VALUES`). ``column_types``: declared kinds
    (``numeric`` / ``bool`` / ``categorical``) of some columns; the rest are inferred.
    """

    unknown_category: str = "error"  # or "missing"
    missing_values: list[str] = field(default_factory=lambda: list(DEFAULT_MISSING_VALUES))
    column_types: dict[str, str] = field(default_factory=dict)
    columns_: list[str] = field(default_factory=list)
    kinds_: dict[str, str] = field(default_factory=dict)
    medians_: dict[str, float] = field(default_factory=dict)
    means_: dict[str, float] = field(default_factory=dict)
    scales_: dict[str, float] = field(default_factory=dict)
    categories_: dict[str, list[str]] = field(default_factory=dict)
    text_as_missing_: dict[str, list[str]] = field(default_factory=dict)
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
                                   source="training table")
            report_ambiguous(ct, codes_level=logging.INFO)
            self.types_[c] = ct
            self.kinds_[c] = ct.kind
            if ct.text_as_missing:
                self.text_as_missing_[c] = list(ct.text_as_missing)
            if ct.kind == "categorical":
                self.categories_[c] = sorted({category_key(v) for v in vocab if not is_missing(v, self._tokens)})
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
        return parse_numbers(s, col, kind, self._tokens, text_as_missing=self.text_as_missing_.get(col, ()),
                             source=source, row_ids=row_ids)

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
            if self.kinds_[c] == "categorical":
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
            else:
                x = self._numeric(s, c, self.kinds_[c], source, row_ids)
                x = np.where(np.isfinite(x), x, self.medians_[c])
                blocks.append(((x - self.means_[c]) / self.scales_[c]).astype(np.float32)[:, None])
            blocks.append(miss.astype(np.float32)[:, None])
        return np.concatenate(blocks, axis=1) if blocks else np.zeros((n, 0), dtype=np.float32)

    def fit_transform(self, table: pd.DataFrame, columns: list[str] | None = None, **kw) -> np.ndarray:
        return self.fit(table, columns).transform(table, **kw)

    def to_dict(self) -> dict:
        return {
            "unknown_category": self.unknown_category, "columns": self.columns_, "kinds": self.kinds_,
            "medians": self.medians_, "means": self.means_, "scales": self.scales_, "categories": self.categories_,
            "missing_values": list(self.missing_values), "column_types": dict(self.column_types),
            "text_as_missing": self.text_as_missing_,
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
                   text_as_missing_={k: list(v) for k, v in (d.get("text_as_missing") or {}).items()})
