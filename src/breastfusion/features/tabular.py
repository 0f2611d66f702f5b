"""Tabular preprocessing: clinical, biomarker and handcrafted columns → a numeric matrix.

Fitted on the training part only. Numeric columns: median imputation + standardisation + a missing
indicator; booleans: 0/1 + indicator; categoricals: one-hot over the categories seen in training +
indicator. The fitted state is plain JSON (stored in bundles; nothing pickled).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from breastfusion.errors import DataError

log = logging.getLogger(__name__)

_TRUE = {"true", "yes", "y", "1", "t"}
_FALSE = {"false", "no", "n", "0", "f"}


def _is_missing(v) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and v.strip() == "")


def _infer_kind(s: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(s):
        return "bool"
    if pd.api.types.is_numeric_dtype(s):
        return "numeric"
    vals = {str(v).strip().lower() for v in s if not _is_missing(v)}
    if vals and vals <= (_TRUE | _FALSE):
        return "bool"
    # Numbers stored as strings (a CSV cell like "12.5")
    converted = pd.to_numeric(s.map(lambda v: None if _is_missing(v) else v), errors="coerce")
    if converted.notna().sum() == sum(not _is_missing(v) for v in s) and converted.notna().any():
        return "numeric"
    return "categorical"


@dataclass
class TabularPreprocessor:
    """Fit on a training table; ``transform`` returns float32 (n, n_features_out_)."""

    unknown_category: str = "error"  # or "missing"
    columns_: list[str] = field(default_factory=list)
    kinds_: dict[str, str] = field(default_factory=dict)
    medians_: dict[str, float] = field(default_factory=dict)
    means_: dict[str, float] = field(default_factory=dict)
    scales_: dict[str, float] = field(default_factory=dict)
    categories_: dict[str, list[str]] = field(default_factory=dict)

    def fit(self, table: pd.DataFrame, columns: list[str] | None = None,
            vocabulary: pd.DataFrame | None = None) -> "TabularPreprocessor":
        """Learn imputation and scaling from ``table``. Category lists come from ``vocabulary`` when given
        (e.g. the whole cohort, so a category that happens to fall only in a test fold is not "unknown";
        reading category names uses no label information)."""
        columns = list(table.columns) if columns is None else list(columns)
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise DataError(f"Tabular columns not in the table: {missing}.")
        self.columns_ = columns
        for c in columns:
            s = table[c]
            vocab = vocabulary[c] if vocabulary is not None and c in vocabulary.columns else s
            kind = _infer_kind(vocab)
            self.kinds_[c] = kind
            if kind == "categorical":
                cats = sorted({str(v).strip() for v in vocab if not _is_missing(v)})
                self.categories_[c] = cats
            else:
                x = self._numeric(s, c, kind, source="training table")
                finite = x[np.isfinite(x)]
                med = float(np.median(finite)) if finite.size else 0.0
                self.medians_[c] = med
                filled = np.where(np.isfinite(x), x, med)
                self.means_[c] = float(filled.mean()) if filled.size else 0.0
                sd = float(filled.std()) if filled.size else 0.0
                self.scales_[c] = sd if sd > 1e-12 else 1.0
        return self

    def _numeric(self, s: pd.Series, col: str, kind: str, source: str, row_ids=None) -> np.ndarray:
        out = np.full(len(s), np.nan, dtype=np.float64)
        for i, v in enumerate(s.tolist()):
            if _is_missing(v):
                continue
            if kind == "bool":
                t = str(v).strip().lower() if not isinstance(v, (bool, np.bool_)) else str(bool(v)).lower()
                if t in _TRUE:
                    out[i] = 1.0
                elif t in _FALSE:
                    out[i] = 0.0
                else:
                    raise DataError(f"{source}, {self._row(i, row_ids)}, column '{col}': '{v}' is not a yes/no value.")
            else:
                try:
                    out[i] = float(v)
                except (TypeError, ValueError):
                    raise DataError(f"{source}, {self._row(i, row_ids)}, column '{col}': '{v}' is not a number.") from None
                if np.isinf(out[i]):
                    raise DataError(f"{source}, {self._row(i, row_ids)}, column '{col}': infinite value.")
        return out

    @staticmethod
    def _row(i: int, row_ids) -> str:
        return f"case '{row_ids[i]}'" if row_ids is not None else f"row {i}"

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
            miss = np.array([_is_missing(v) for v in s.tolist()], dtype=bool)
            if self.kinds_[c] == "categorical":
                cats = self.categories_[c]
                onehot = np.zeros((n, len(cats)), dtype=np.float32)
                index = {k: j for j, k in enumerate(cats)}
                for i, v in enumerate(s.tolist()):
                    if miss[i]:
                        continue
                    j = index.get(str(v).strip())
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
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TabularPreprocessor":
        return cls(unknown_category=d.get("unknown_category", "error"), columns_=list(d["columns"]),
                   kinds_=dict(d["kinds"]), medians_=dict(d["medians"]), means_=dict(d["means"]),
                   scales_=dict(d["scales"]), categories_={k: list(v) for k, v in d["categories"].items()})
