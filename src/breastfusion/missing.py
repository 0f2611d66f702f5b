"""Which values are missing: one rule for the whole toolkit.

A value is *absent* when it is None, NaN, pandas' NA or NaT. A cell of a clinical table is also missing when,
compared stripped and case-insensitively, it is one of the *missing tokens* (``data.missing_values``; default
:data:`DEFAULT_MISSING_VALUES`); a token that reads as a number (``-999``) also matches that number. Use
``is_missing(v)`` for a clinical cell under the default tokens, ``is_missing(v, tokens)`` under a config's, and
``is_missing(v, ABSENT)`` where text is a value in its own right (a path, a mask cell where ``''`` means "no
lesion"). How tokens decide a column's type: :mod:`breastfusion.data.column_types`.

Kept free of pandas so that the configuration can name the defaults cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

# Compared stripped and case-insensitively. Left out on purpose, because each is a value somewhere: "0",
# "no", "none" (no calcifications), "-" (receptor negative), "negative", "nd" (not detected vs not done).
DEFAULT_MISSING_VALUES: tuple[str, ...] = (
    "", "na", "n/a", "n.a.", "#n/a", "nan", "null", "nil", "?", ".",
    "missing", "unknown", "unk", "not available", "not applicable", "not known", "not recorded",
    "not reported", "not done", "not assessed",
)
# Before missing tokens existed only a blank cell was missing; bundles from then are read that way.
LEGACY_MISSING_VALUES: tuple[str, ...] = ("",)


class MissingTokens:
    """A normalised set of missing tokens: the words, and the numbers among them."""

    __slots__ = ("numbers", "original", "words")

    def __init__(self, tokens: Iterable[str]):
        self.original = [str(t) for t in tokens]
        self.words = frozenset(t.strip().lower() for t in self.original)
        nums = set()
        for t in self.words:
            try:
                x = float(t)
            except ValueError:
                continue
            if math.isfinite(x):
                nums.add(x)
        self.numbers = frozenset(nums)


def missing_tokens(tokens: Iterable[str] | MissingTokens | None) -> MissingTokens:
    if isinstance(tokens, MissingTokens):
        return tokens
    return MissingTokens(DEFAULT_MISSING_VALUES if tokens is None else tokens)


_DEFAULT = MissingTokens(DEFAULT_MISSING_VALUES)
ABSENT = MissingTokens(())
"""No tokens: only None, NaN, NA and NaT are missing (text, even ``''``, is a value)."""

_PANDAS_MISSING = ("NAType", "NaTType")  # pd.NA and pd.NaT, recognised without importing pandas


def is_missing(v, tokens: Iterable[str] | MissingTokens | None = None) -> bool:
    """True for None/NaN/NA/NaT and for a missing token (default :data:`DEFAULT_MISSING_VALUES`)."""
    if v is None or type(v).__name__ in _PANDAS_MISSING:
        return True
    tok = _DEFAULT if tokens is None else missing_tokens(tokens)
    if isinstance(v, str):
        return v.strip().lower() in tok.words
    if isinstance(v, (bool, np.bool_)):
        return False
    if isinstance(v, (float, np.floating)) and math.isnan(v):
        return True
    if isinstance(v, (int, float, np.integer, np.floating)) and tok.numbers:
        return float(v) in tok.numbers
    return False
