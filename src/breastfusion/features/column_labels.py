"""Names of clinical columns for people: a display label, a unit and a description per column.

The model reads columns by their table names (``age_years``, ``family_history``); a form or a model card shows
them to a clinician. ``data.column_info`` in the config gives ``{column: {label, unit, description}}``; columns it
does not name get their name humanised (``family_history`` -> "Family history") and no unit, which is a guess
and therefore only a label, never a unit. The resolved table is saved in the bundle's metadata
(``features.column_info``) so that the web service and the model card show what the trainer declared.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

#: Tokens shown in capitals when a column name is humanised.
ACRONYMS = {"bmi", "er", "pr", "her2", "bi", "rads", "birads", "ca", "cea", "ldh", "id", "mri", "us", "ct", "psa",
            "ki67", "brca", "brca1", "brca2", "hrt"}


def humanise(name: str) -> str:
    """A display label from a column name: separators become spaces, camelCase is split, the first letter is a
    capital and known acronyms (BMI, HER2, ...) are capitals."""
    text = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", str(name))
    words = [w for w in re.split(r"[\s_.\-]+", text) if w]
    if not words:
        return str(name)
    out = [w.upper() if w.lower() in ACRONYMS else w.lower() for w in words]
    out[0] = out[0][:1].upper() + out[0][1:]
    return " ".join(out)


def _entry(given: Any) -> dict[str, Any]:
    if given is None:
        return {}
    if hasattr(given, "model_dump"):  # the config's ColumnInfo model
        given = given.model_dump()
    return {k: v for k, v in dict(given).items() if v not in (None, "")}


def resolve_column_info(columns: list[str], configured: Mapping[str, Any] | None = None) -> dict[str, dict]:
    """``{column: {"label", "unit", "description"}}`` for ``columns``: what ``configured`` (``data.column_info``)
    declares, else the humanised name, no unit and no description. Entries for columns that are not among
    ``columns`` are ignored with a logged warning (a typo there would otherwise go unnoticed)."""
    configured = dict(configured or {})
    unused = sorted(set(configured) - set(columns))
    if unused:
        log.warning("data.column_info names %s, which %s not among the clinical inputs of this model (%s); ignored",
                    unused, "is" if len(unused) == 1 else "are", list(columns)[:20])
    out = {}
    for c in columns:
        e = _entry(configured.get(c))
        out[c] = {"label": str(e.get("label") or humanise(c)), "unit": e.get("unit"),
                  "description": e.get("description")}
    return out
