"""The one interface of every bundle's predictor.

``Predictor.load(path)`` (:mod:`breastfusion.inference.predictor`; also ``breastfusion.Predictor.load``) reads a
bundle and returns the predictor made for its network kind (:mod:`breastfusion.models.registry`): the ultrasound
:class:`~breastfusion.inference.predictor.Predictor` or the histology
:class:`~breastfusion.inference.grading.GradingPredictor`. Every predictor has the same surface, so callers never
ask which one they hold:

- ``predict(source, *, cases=None, progress=False, strict=False)`` → one row per case: ``case_id``,
  ``prob_<class>``..., ``predicted`` (+ calibration columns when the bundle is calibrated);
- ``last_skipped`` (what the last call could not score, and why) and ``last_absent`` (clinical columns the input
  lacked, scored as unknown);
- ``extra_outputs()``: further tables of the last call worth writing beside the predictions (e.g. per-stack
  attention of a histology bundle), by name;
- ``inputs``: what ``source`` is (``"images"``: an image, a folder or a cases table; ``"tiles"``: a tiles table,
  a ``breastfusion tile`` output or a folder of tiles).

A predictor class names the network kinds it scores (``kinds = ("mykind",)``) and is listed in
:func:`breastfusion.inference.predictor.predictor_classes`.
"""

from __future__ import annotations

import difflib
import logging
import re
from typing import ClassVar

import pandas as pd

from breastfusion.data.cases import feature_columns
from breastfusion.errors import DataError

log = logging.getLogger(__name__)

ABSENT_CLINICAL = "absent_clinical_columns"
"""Output column naming the clinical columns the input lacked (scored as unknown)."""


class BundlePredictor:
    """Base class of the bundle predictors; see the module docstring."""

    kinds: ClassVar[tuple[str, ...]] = ()
    inputs: ClassVar[str] = "images"
    max_pixels: int | None = None
    """Cap on the pixels of one decoded input image (predictors that read whole images; ``None``: no cap)."""

    # ------------------------------------------------------------------ the surface every predictor keeps

    last_skipped: pd.DataFrame
    last_absent: list[str]

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes  # type: ignore[attr-defined]

    def predict(self, source, *, cases=None, progress: bool = False, strict: bool = False) -> pd.DataFrame:
        raise NotImplementedError

    def extra_outputs(self) -> dict[str, pd.DataFrame]:
        return {}


def _near_miss(name: str, candidates: list[str]) -> str | None:
    """The input column a user most likely meant for ``name`` ('Age' for 'age', 'breast_density' for 'density')."""
    norm = re.sub(r"[^0-9a-z]", "", name.lower())
    for c in candidates:
        if re.sub(r"[^0-9a-z]", "", str(c).lower()) == norm:
            return str(c)
    close = difflib.get_close_matches(name.lower(), [str(c).lower() for c in candidates], n=1, cutoff=0.6)
    if close:
        return next(str(c) for c in candidates if str(c).lower() == close[0])
    contains = [str(c) for c in candidates if len(norm) >= 3 and norm in re.sub(r"[^0-9a-z]", "", str(c).lower())]
    return contains[0] if len(contains) == 1 else None


def check_clinical_columns(expected: list[str], columns, *, source: str, model: str, strict: bool = False) -> list[str]:
    """The ``expected`` clinical columns absent from an input table's ``columns``. Absent columns are scored as
    unknown for every case, which silently turns a fusion model into an image model; so they are logged as a
    warning naming the expected, found and missing columns (with near-miss suggestions), or, with ``strict``,
    refused with a :class:`DataError`."""
    present = set(map(str, columns))
    missing = [c for c in expected if str(c) not in present]
    if not missing:
        return []
    found = [c for c in feature_columns(pd.DataFrame(columns=list(columns))) if c not in expected]
    hints = []
    for c in missing:
        near = _near_miss(str(c), found)
        hints.append(f"'{c}'" + (f" (did you mean '{near}'?)" if near else ""))
    shown = found[:30] + ([f"... {len(found) - 30} more"] if len(found) > 30 else [])
    msg = (f"{source} lacks {len(missing)} of the {len(expected)} clinical column(s) that model '{model}' reads: "
           f"{', '.join(hints)}; expected: {list(expected)}; found other columns: {shown}.")
    if strict:
        raise DataError(msg + " Refused (strict): rename the columns, or leave out --strict to score them as unknown.")
    log.warning("%s Scoring every case with %s unknown (recorded in the '%s' output column).", msg,
                "that value" if len(missing) == 1 else "those values", ABSENT_CLINICAL)
    return missing
