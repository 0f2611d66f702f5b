"""What a clinical column holds: numbers, yes/no, or categories, and which cells are missing.

Hospital exports write a missing value as text (``not available``, ``N/A``, ``unknown``). Read naively, one
such cell turns an age column into a category per distinct age: the model loses the order of the numbers and a
patient with an age not seen in training cannot be scored. So missing markers are removed first and the type is
read from what is left.

Missing markers
---------------
A cell is missing when it is empty, NaN/None/NA, or, compared stripped and case-insensitively, one of the
*missing tokens* (``data.missing_values``; default :data:`DEFAULT_MISSING_VALUES`). A token that reads as a
number (``-999``) also matches that number in a numeric column. The default list leaves out every word that is
a value somewhere: ``0``, ``no``, ``none`` (no calcifications), ``-`` (receptor negative), ``negative``
(see :mod:`breastfusion.missing`).

The rule (documented because it decides data)
---------------------------------------------
1. A type declared in ``data.column_types`` wins. A declared numeric column with a cell that is neither a
   number nor a missing token is an error naming the case and the column (likewise yes/no for ``bool``).
2. Otherwise, of the non-missing cells: a boolean dtype, or a text column of only yes/no words
   (yes/no/true/false/y/n/t/f/1/0) -> ``bool``. (A number column of 0/1 stays numeric; it encodes the same.)
   No value at all -> ``numeric`` for a number column, else ``categorical`` (as before).
3. Only numbers -> ``numeric``. If they are whole numbers with 3 to 7 distinct levels, each seen on average
   at least 3 times, they may be codes (tumour grade 1-3, a coded ethnicity): still numeric (ordered scores are
   meaningful as numbers), flagged ``few_integer_levels``.
4. At least :data:`NUMERIC_SHARE` of the cells are numbers and the rest is text -> ``numeric``; the text
   values (``>90``, ``66 yrs``, ``approx 50``) are read as missing, flagged ``text_in_numbers``. Only the
   values seen here are read as missing later; new text in that column at prediction is an error.
5. Anything else -> ``categorical``; if some cells are numbers the column is flagged
   ``mixed_numbers_and_text`` (``4a``, ``4b``, ``5``: BI-RADS with sub-categories). If some cells hold the
   multi-value separator (``data.multi_value_separator``, ``skin retraction&palpable``) the column is flagged
   ``looks_multi_valued``: it is NOT split (each combination stays one category) until it is declared ``multi``.

Two kinds are only ever declared, never inferred:

- ``multi``: several values in one cell joined by the separator; read as one 0/1 indicator per value.
- ``ordinal``: ordered levels (``data.ordinal_levels``), read as their rank (0, 1, ...). A value that is not a
  level is an error naming the case. Without declared levels, the levels are the values seen, in natural order
  (numbers by value, then text: ``2 < 3 < 4a < 4b < 4c < 5``); that is a decision from data, so the column is
  flagged ``ordinal_levels_inferred`` and reported.

A flagged column is *ambiguous*: the decision is logged as a warning naming the column, the decision, the
values behind it with a case where each occurs, and how to declare the type; the audit lists it too.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pandas as pd

from breastfusion.errors import DataError
from breastfusion.missing import (
    MissingTokens,
    is_missing,
    missing_tokens,
)

log = logging.getLogger(__name__)

KINDS = ("numeric", "bool", "categorical", "multi", "ordinal")
DEFAULT_SEPARATOR = "&"
TRUE_WORDS = frozenset({"true", "yes", "y", "1", "t"})
FALSE_WORDS = frozenset({"false", "no", "n", "0", "f"})
NUMERIC_SHARE = 0.8
_CODE_LEVELS = (3, 7)
_CODE_MIN_PER_LEVEL = 3
_EXAMPLES = 5


def as_number(v) -> float | None:
    """``v`` as a float, or None when it is not a number (text, a yes/no value)."""
    if isinstance(v, (bool, np.bool_)):
        return None
    try:
        return float(v)
    except (TypeError, ValueError, OverflowError):
        return None


def category_key(v) -> str:
    """How a categorical cell is named: text stripped; a whole number read as such (2.0 and '2' both '2')."""
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)):
        x = float(v)
        if math.isfinite(x) and x == int(x):
            return str(int(x))
    return str(v).strip()


@dataclass
class ColumnType:
    """The decided type of one column and what it was decided from."""

    name: str
    kind: str
    declared: bool = False
    n: int = 0
    n_missing: int = 0
    tokens_seen: dict = field(default_factory=dict)     # missing token as written -> count
    text_as_missing: list = field(default_factory=list)  # text read as missing in a numeric column
    flags: list = field(default_factory=list)
    examples: list = field(default_factory=list)          # (value, row) behind the flags
    note: str = ""
    levels: list = field(default_factory=list)           # an ordinal column's levels, lowest first

    @property
    def ambiguous(self) -> bool:
        return bool(self.flags)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "declared": self.declared, "n": self.n, "missing": self.n_missing,
                "missing_tokens_seen": self.tokens_seen, "text_read_as_missing": self.text_as_missing,
                "flags": self.flags, "examples": [{"value": v, "row": r} for v, r in self.examples],
                "note": self.note, **({"levels": list(self.levels)} if self.kind == "ordinal" else {})}

    def message(self) -> str:
        ex = ", ".join(f"'{v}' ({r})" for v, r in self.examples)
        c = self.name
        if "ordinal_levels_inferred" in self.flags:
            hint = f"To confirm or correct the order, list the levels in data.ordinal_levels: {{{c}: [...]}}."
        elif "looks_multi_valued" in self.flags:
            hint = (f"To read one indicator per value, declare data.column_types: {{{c}: multi}}; to keep each "
                    f"combination as one category, declare {{{c}: categorical}}.")
        elif "text_in_numbers" in self.flags:
            hint = (f"To confirm, list that text in data.missing_values; to make every value a category, declare "
                    f"data.column_types: {{{c}: categorical}}.")
        elif "mixed_numbers_and_text" in self.flags:
            hint = (f"To read numbers, fix the text or list it in data.missing_values and declare "
                    f"data.column_types: {{{c}: numeric}}; for ordered levels ('4a' < '4b'), declare {{{c}: ordinal}} "
                    f"with data.ordinal_levels; to confirm, declare {{{c}: categorical}}.")
        else:
            hint = (f"If these are codes, declare data.column_types: {{{c}: categorical}}; to confirm, declare "
                    f"{{{c}: numeric}}.")
        return f"Column '{c}': {self.note} Values: {ex}. {hint}"


def _row(i: int, row_ids) -> str:
    return f"case '{row_ids[i]}'" if row_ids is not None else f"row {i}"


def default_row_ids(s: pd.Series) -> list | None:
    """Case ids from the index when it holds them (not a plain 0..n-1 RangeIndex)."""
    return None if isinstance(s.index, pd.RangeIndex) else list(s.index)


def infer_column_type(s: pd.Series, name: str, tokens=None, *, declared: str | None = None,
                      row_ids=None, source: str = "table", separator: str = DEFAULT_SEPARATOR,
                      levels: list[str] | None = None) -> ColumnType:
    """Decide the type of column ``s`` by the rule in the module docstring; raise DataError for a declared
    type the values contradict. ``separator``: joins values of a multi-valued cell; ``levels``: the declared
    levels of an ordinal column (``data.ordinal_levels``), lowest first."""
    tok = missing_tokens(tokens)
    if declared is not None and declared not in KINDS:
        raise DataError(f"data.column_types: column '{name}' is declared '{declared}'; expected one of {list(KINDS)}.")
    values = s.tolist()
    row_ids = default_row_ids(s) if row_ids is None else list(row_ids)
    seen: Counter = Counter()
    present = []  # (i, v) of non-missing cells
    for i, v in enumerate(values):
        if is_missing(v, tok):
            if isinstance(v, str) or (isinstance(v, (int, float, np.integer, np.floating)) and not _isnan(v)):
                seen[str(v).strip()] += 1
            continue
        present.append((i, v))
    ct = ColumnType(name=name, kind="categorical", n=len(values), n_missing=len(values) - len(present),
                    tokens_seen=dict(seen.most_common()), declared=declared is not None)
    nums = {i: as_number(v) for i, v in present}
    text = [(i, v) for i, v in present if nums[i] is None]
    if declared is not None:
        ct.kind = declared
        bad = None
        if declared == "numeric" and text:
            bad = (text[0], "is not a number")
        elif declared == "bool":
            for i, v in present:
                if not _yes_no(v):
                    bad = ((i, v), "is not a yes/no value")
                    break
        elif declared == "ordinal":
            if levels:
                ct.levels = [str(x).strip() for x in levels]
                known = {x.lower() for x in ct.levels}
                for i, v in present:
                    if category_key(v).lower() not in known:
                        bad = ((i, v), f"is not one of its levels {ct.levels} (data.ordinal_levels)")
                        break
            else:
                ct.levels = natural_levels(category_key(v) for _, v in present)
                ct.flags.append("ordinal_levels_inferred")
                ct.note = (f"declared ordinal without data.ordinal_levels: levels read from the data in natural "
                           f"order, lowest first: {ct.levels}.")
                ct.examples = [(lv, _row(next(i for i, v in present if category_key(v) == lv), row_ids))
                               for lv in ct.levels[:_EXAMPLES]]
                return ct
        if bad:
            (i, v), why = bad
            raise DataError(f"{source}, {_row(i, row_ids)}, column '{name}': '{v}' {why} (the column is declared "
                            f"{declared} in data.column_types; a missing value is one of data.missing_values).")
        ct.note = f"declared {declared}."
        return ct
    # A number column of 0/1 stays numeric (as it always was; encoded the same either way).
    text_dtype = not pd.api.types.is_numeric_dtype(s)
    if pd.api.types.is_bool_dtype(s) or (text_dtype and present and all(_yes_no(v) for _, v in present)):
        ct.kind, ct.note = "bool", "yes/no values."
        return ct
    if not present:  # nothing to read the type from: a number column stays one (a lesion feature never measured)
        ct.kind = "numeric" if pd.api.types.is_numeric_dtype(s) else "categorical"
        ct.note = "no values."
        return ct
    n_num = len(present) - len(text)
    if not text:
        ct.kind, ct.note = "numeric", "numbers."
        x = np.array([nums[i] for i, _ in present])
        levels = np.unique(x[np.isfinite(x)])
        lo, hi = _CODE_LEVELS
        if (np.all(levels == np.round(levels)) and lo <= len(levels) <= hi
                and len(x) >= _CODE_MIN_PER_LEVEL * len(levels)):
            ct.flags.append("few_integer_levels")
            ct.note = (f"only {len(levels)} whole-number levels ({', '.join(category_key(v) for v in levels)}), "
                       "which may be codes; treated as numeric (ordered).")
            first_at: dict[float, int] = {}
            for i, _ in present:
                first_at.setdefault(nums[i], i)
            ct.examples = [(category_key(v), _row(first_at[v], row_ids)) for v in levels]
        return ct
    firsts: dict[str, int] = {}
    for i, v in text:
        firsts.setdefault(str(v).strip(), i)
    ct.examples = [(v[:60], _row(i, row_ids)) for v, i in list(firsts.items())[:_EXAMPLES]]
    if n_num >= NUMERIC_SHARE * len(present):
        ct.kind = "numeric"
        ct.text_as_missing = sorted(firsts)
        ct.flags.append("text_in_numbers")
        ct.note = (f"{n_num} of {len(present)} values are numbers and {len(text)} are text that is not a known "
                   f"missing marker; treated as numeric with that text read as missing.")
    elif n_num:
        ct.flags.append("mixed_numbers_and_text")
        ct.note = (f"{n_num} of {len(present)} values are numbers, the rest text; treated as categorical "
                   f"(each distinct value a category).")
    else:
        ct.note = "text values."
    joined = [(i, v) for i, v in text if separator in str(v)]
    if joined:
        ct.flags.append("looks_multi_valued")
        ct.note += (f" {len(joined)} cell(s) hold the separator '{separator}' and look like several values in one "
                    f"cell; not split: each combination is one category.")
        first = [(str(v).strip()[:60], _row(i, row_ids)) for i, v in joined[:3]]  # the joined cells first
        ct.examples = first + [e for e in ct.examples if e[0] not in {v for v, _ in first}][:_EXAMPLES - len(first)]
    return ct


def split_multi(v, separator: str = DEFAULT_SEPARATOR, tokens=None) -> list[str]:
    """The values of a multi-valued cell, in cell order without repeats (a part that is a missing token is
    dropped); [] for a missing cell."""
    if is_missing(v, tokens):
        return []
    out: list[str] = []
    for part in str(category_key(v)).split(separator):
        k = part.strip()
        if k and not is_missing(k, tokens) and k not in out:
            out.append(k)
    return out


def _natural_key(text: str) -> tuple:
    import re

    parts = re.findall(r"\d+(?:\.\d+)?|\D+", text.strip().lower())
    # a number part sorts before a text part at the same place, so '4' < '4a' < '4b' < '5'
    return tuple((0, float(p), "") if p[0].isdigit() else (1, 0.0, p.strip()) for p in parts)


def natural_levels(values: Iterable[str]) -> list[str]:
    """Distinct values in natural order: numbers by value, then text (``2 < 3 < 4a < 4b < 4c < 5 < 10``)."""
    return sorted({str(v).strip() for v in values if str(v).strip()}, key=lambda x: (_natural_key(x), x))


def ordinal_rank(v, levels: list[str]) -> float | None:
    """The rank (0 = lowest) of ``v`` among ``levels`` (stripped, case-insensitive), or None when not a level."""
    key = category_key(v).lower()
    for j, lv in enumerate(levels):
        if lv.strip().lower() == key:
            return float(j)
    return None


def _isnan(v) -> bool:
    return isinstance(v, (float, np.floating)) and math.isnan(v)


def yes_no(v) -> float | None:
    """1.0 / 0.0 for a yes/no value (a word, a bool, the number 1 or 0), else None."""
    if isinstance(v, (bool, np.bool_)):
        return float(bool(v))
    t = str(v).strip().lower()
    if t in TRUE_WORDS:
        return 1.0
    if t in FALSE_WORDS:
        return 0.0
    x = as_number(v)
    return x if x in (0.0, 1.0) else None


def _yes_no(v) -> bool:
    return yes_no(v) is not None


def parse_numbers(s: pd.Series, col: str, kind: str, tokens: "MissingTokens | list[str] | None" = None, *,
                  text_as_missing=(), source: str = "table", row_ids=None) -> np.ndarray:
    """A numeric or yes/no column as floats (NaN where missing). ``text_as_missing``: text that training read
    as missing in this column (see rule 4 in the module docstring). Anything else that is not a number (a yes/no
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


_REPORTED: set[str] = set()


def report_ambiguous(ct: ColumnType, *, codes_level: int = logging.WARNING, level: int | None = None) -> None:
    """Log an ambiguous column's decision as a warning, once per process for the same message (a preprocessor
    is fitted once per fold and model; the decision, read from the whole cohort, is the same each time).

    ``codes_level``: the level for a column flagged only ``few_integer_levels``. Training passes INFO: it also
    sees computed features (a lesion count from radiomics) that are numbers by construction; the audit, which
    sees exactly the clinical columns, warns. ``level``: one level for every flag (the audit logs columns that are
    not model inputs, such as excluded ones, at INFO: they are listed in the audit report, not warned about).
    """
    if not ct.ambiguous:
        return
    msg = ct.message()
    if msg in _REPORTED:
        log.debug("%s", msg)
        return
    _REPORTED.add(msg)
    if level is None:
        level = codes_level if ct.flags == ["few_integer_levels"] else logging.WARNING
    log.log(level, "%s", msg)
