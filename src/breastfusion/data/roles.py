"""Column roles: which columns of a clinical sheet are model inputs, and what every other column is.

A real hospital sheet holds more than clinical history: the radiologist's reading of the image (BI-RADS lexicon
descriptors), the reader's own score (BI-RADS), and columns that carry the answer (how the truth was established,
the histology, the radiologist's conclusion). ``data.roles`` names them, so none becomes an input unnoticed.

The rule (documented because it decides what a model reads)
-----------------------------------------------------------
* Inputs are ``data.tabular_columns`` when given, else every feature column (:func:`~breastfusion.data.cases.
  feature_columns`) minus ``roles.reader_block``, ``roles.reader_score``, ``roles.exclude`` and the
  ``data.pixel_size_column`` (image geometry, used for physical units; an input only when listed explicitly).
* An ``exclude`` column or the ``reader_score`` in ``data.tabular_columns`` is a ConfigError naming it and its role.
* A ``reader_block`` column in ``data.tabular_columns`` is allowed (the user wants the radiologist's reading as
  input); its role says so and the report shows it.
* A role naming a column the table lacks is a ConfigError with a close-match suggestion; so is a column named under
  two roles that contradict each other.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field

import pandas as pd

from breastfusion.config import DataConfig
from breastfusion.data.cases import feature_columns
from breastfusion.errors import ConfigError, DataError

log = logging.getLogger(__name__)

INPUT = "input"
READER_INPUT = "radiologist's reading used as input"
READER_BLOCK = "radiologist's reading (not an input)"
READER_SCORE = "reader score (not an input)"
EXCLUDED = "excluded"
PIXEL_SIZE = "pixel size (not an input)"
UNUSED = "unused"
INPUT_ROLES = (INPUT, READER_INPUT)


@dataclass
class ColumnRoleMap:
    """The resolved roles: ``inputs`` in order, and the role of every feature column of the table."""

    inputs: list[str]
    roles: dict[str, str] = field(default_factory=dict)
    intended: list[str] = field(default_factory=list)

    @property
    def reader_inputs(self) -> list[str]:
        return [c for c in self.inputs if self.roles.get(c) == READER_INPUT]

    def to_dict(self) -> dict:
        return {"inputs": list(self.inputs), "roles": dict(self.roles), "intended": list(self.intended)}


def _suggest(name: str, columns: list[str]) -> str:
    close = difflib.get_close_matches(name, columns, n=1, cutoff=0.6)
    if not close:  # a case difference ('age' vs 'Age') scores low in difflib
        close = [c for c in columns if c.lower() == name.lower()][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_present(names: list[str], key: str, columns: list[str]) -> None:
    absent = [n for n in names if n not in columns]
    if absent:
        listed = ", ".join(f"'{n}'{_suggest(n, columns)}" for n in absent)
        raise ConfigError(f"{key} names column(s) the cases table lacks: {listed}; its columns: "
                          f"{', '.join(map(str, columns))}.")


def resolve_roles(cases: pd.DataFrame, data: DataConfig) -> ColumnRoleMap:
    """Resolve ``data.roles`` and ``data.tabular_columns`` against the cases table (rule in the module docstring)."""
    r = data.roles
    columns = [str(c) for c in cases.columns]
    reader_score = [r.reader_score] if r.reader_score else []
    _check_present(r.reader_block, "data.roles.reader_block", columns)
    _check_present(reader_score, "data.roles.reader_score", columns)
    _check_present(r.exclude, "data.roles.exclude", columns)
    _check_present(r.intended, "data.roles.intended", columns)
    named = {"data.roles.reader_block": set(r.reader_block), "data.roles.reader_score": set(reader_score),
             "data.roles.exclude": set(r.exclude)}
    keys = list(named)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            both = sorted(named[a] & named[b])
            if both:
                raise ConfigError(f"Column(s) {both} are named in both {a} and {b}; give each column one role.")
    contradict = sorted(set(r.intended) & (set(r.exclude) | set(reader_score)))
    if contradict:
        raise ConfigError(f"data.roles.intended names {contradict}, which data.roles also declares never an input "
                          "(exclude or reader_score); give each column one role.")
    feats = feature_columns(cases)
    pixel = data.pixel_size_column
    if data.tabular_columns is not None:
        requested = list(dict.fromkeys(data.tabular_columns))
        absent = [c for c in requested if c not in columns]
        if absent:
            listed = ", ".join(f"'{n}'{_suggest(n, feats)}" for n in absent)
            raise DataError(f"data.tabular_columns names columns the cases table lacks: {listed}; it has: {feats}.")
        for c in requested:
            if c in r.exclude:
                raise ConfigError(f"data.tabular_columns lists '{c}', which data.roles.exclude declares never an "
                                  "input; remove it from one of them.")
            if c in reader_score:
                raise ConfigError(f"data.tabular_columns lists '{c}', the reader score (data.roles.reader_score): "
                                  "it is the radiologist's conclusion the models are compared with, never an input.")
        inputs = requested
    else:
        never = set(r.reader_block) | set(reader_score) | set(r.exclude) | ({pixel} if pixel else set())
        inputs = [c for c in feats if c not in never]
    roles: dict[str, str] = {}
    for c in feats:
        if c in inputs:
            roles[c] = READER_INPUT if c in r.reader_block else INPUT
        elif c in r.exclude:
            roles[c] = EXCLUDED
        elif c in reader_score:
            roles[c] = READER_SCORE
        elif c in r.reader_block:
            roles[c] = READER_BLOCK
        elif pixel and c == pixel:
            roles[c] = PIXEL_SIZE
        else:
            roles[c] = UNUSED
    for c in inputs:  # a reserved column requested as input keeps its place in the map too
        roles.setdefault(c, READER_INPUT if c in r.reader_block else INPUT)
    not_inputs = [c for c in r.intended if c not in inputs]
    if not_inputs:
        log.warning("data.roles.intended names %s, which are not inputs of this run; nothing to allow there",
                    not_inputs)
    out = ColumnRoleMap(inputs=inputs, roles=roles, intended=[c for c in r.intended if c in inputs])
    if out.reader_inputs:
        log.warning("the models read the radiologist's reading as input (data.tabular_columns lists reader_block "
                    "columns %s): a comparison with the radiologist is then not independent of the radiologist",
                    out.reader_inputs)
    return out
