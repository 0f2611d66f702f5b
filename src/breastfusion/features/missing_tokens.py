"""The default missing-value tokens, in a module of their own so that the config can name them without
importing pandas. How they are used: :mod:`breastfusion.features.column_types`."""

from __future__ import annotations

# Compared stripped and case-insensitively. Left out on purpose, because each is a value somewhere: "0",
# "no", "none" (no calcifications), "-" (receptor negative), "negative", "nd" (not detected vs not done).
DEFAULT_MISSING_VALUES: tuple[str, ...] = (
    "", "na", "n/a", "n.a.", "#n/a", "nan", "null", "nil", "?", ".",
    "missing", "unknown", "unk", "not available", "not applicable", "not known", "not recorded",
    "not reported", "not done", "not assessed",
)
# Before missing tokens existed only a blank cell was missing; bundles from then are read that way.
LEGACY_MISSING_VALUES: tuple[str, ...] = ("",)
