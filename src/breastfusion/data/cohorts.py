"""Several sources (hospitals, datasets) read as one multi-centre cohort.

``data.source`` may map a centre name to a source (a cases table, a BUSI-style folder or a BrEaST-Lesions-USG
folder)::

    data:
      source:
        BUSI: ../shared/data/busi
        BrEaST: ../shared/data/breast_lesions_usg

Each source is imported as usual; its cases get ``center`` = the name given here (a source whose own table
already lists several centres keeps them). Case and patient ids that occur in two sources are prefixed with
``<centre>/`` in every source (logged), so no case is silently merged with another hospital's. Clinical columns
are the union of the sources' columns; a column that one centre lacks entirely is missing for all its cases,
which identifies the centre: it is logged as a warning (a model can learn the hospital from it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from breastfusion.data.cases import CASE_ID, CENTER, PATIENT_ID, feature_columns, validate_cases
from breastfusion.errors import DataError

log = logging.getLogger(__name__)


def import_sources(source, **kwargs) -> pd.DataFrame:
    """The cases table of ``source``: one path (str/Path), or a mapping centre name → path (see the module doc)."""
    from breastfusion.data.importers import import_cases

    if not isinstance(source, Mapping):
        return import_cases(source, **kwargs)
    if not source:
        raise DataError("data.source is an empty mapping: name at least one centre and its data.")
    parts: dict[str, pd.DataFrame] = {}
    for name, path in source.items():
        name = str(name).strip()
        if not name or "/" in name:
            raise DataError(f"data.source: centre name '{name}' must be non-empty and without '/'.")
        if not Path(str(path)).exists():
            raise DataError(f"data.source: centre '{name}': '{path}' does not exist.")
        try:
            df = import_cases(path, **kwargs).copy()
        except DataError as exc:
            raise DataError(f"data.source: centre '{name}' ('{path}'): {exc}") from None
        if df[CENTER].nunique() <= 1:
            df[CENTER] = name
        parts[name] = df
    for col in (CASE_ID, PATIENT_ID):
        seen: dict[str, str] = {}
        clash = set()
        for name, df in parts.items():
            for v in df[col].astype(str).unique():
                if v in seen and seen[v] != name:
                    clash.add(v)
                seen.setdefault(v, name)
        if clash:
            log.warning("%d %s value(s) occur in more than one source (e.g. '%s'): every %s is prefixed with its "
                        "centre ('<centre>/<id>')", len(clash), col, sorted(clash)[0], col)
            for name, df in parts.items():
                df[col] = name + "/" + df[col].astype(str)
    columns = {name: set(feature_columns(df)) for name, df in parts.items()}
    every = set().union(*columns.values())
    for name, cols in columns.items():
        absent = sorted(every - cols)
        if absent and len(parts) > 1:
            log.warning("centre '%s' has no column(s) %s: missing for all its %d cases, which tells a model the "
                        "centre; leave them out of data.tabular_columns for a cross-site model",
                        name, ", ".join(absent[:10]) + (" ..." if len(absent) > 10 else ""), len(parts[name]))
    cases = pd.concat(list(parts.values()), ignore_index=True, sort=False)
    counts = ", ".join(f"{n}: {len(df)}" for n, df in parts.items())
    log.info("multi-centre cohort: %d cases (%s)", len(cases), counts)
    return validate_cases(cases, check_files=False, source="multi-centre cohort (data.source)")
