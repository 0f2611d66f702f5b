"""Importers that turn a dataset on disk into a cases table, and their registry.

Each importer is a function ``path -> cases table`` (:mod:`breastfusion.data.cases`), listed in :data:`IMPORTERS`
under the name of the layout it reads; :func:`get_importer` finds one by name:

``busi``                BUSI folder (:mod:`.busi`)
``breast_lesions_usg``  BrEaST-Lesions-USG release folder or its ``clinical_data.csv`` (:mod:`.breast_lesions_usg`)
``breakhis``            BreakHis PNGs under a folder, any depth (:mod:`.breakhis`)
``cases``               a cases table file, CSV or Parquet (:func:`breastfusion.data.cases.read_cases`)

:func:`import_cases` tells the layout from the path (a BrEaST-Lesions-USG folder, another folder: BUSI, a file:
a cases table). :func:`breastfusion.data.importers.monuseg.import_monuseg_stacks` is not in the registry: it
cuts tiles into an output folder and returns a cases table *and* a tiles table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from breastfusion.data.cases import read_cases
from breastfusion.data.importers.breakhis import import_breakhis
from breastfusion.data.importers.breast_lesions_usg import (
    find_root,
    import_breast_lesions_usg,
)
from breastfusion.data.importers.busi import IMAGE_SUFFIXES, find_busi_root, import_busi
from breastfusion.errors import ConfigError

__all__ = [
    "IMAGE_SUFFIXES",
    "IMPORTERS",
    "find_busi_root",
    "get_importer",
    "import_breakhis",
    "import_breast_lesions_usg",
    "import_busi",
    "import_cases",
]

#: Importer name -> function ``(path, **kwargs) -> cases table``.
IMPORTERS: dict[str, Callable[..., pd.DataFrame]] = {
    "busi": import_busi,
    "breast_lesions_usg": import_breast_lesions_usg,
    "breakhis": import_breakhis,
    "cases": read_cases,
}


def get_importer(name: str) -> Callable[..., pd.DataFrame]:
    """The importer registered under ``name`` (see :data:`IMPORTERS`); ConfigError naming the known ones."""
    try:
        return IMPORTERS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"Unknown importer {name!r}; known: {', '.join(sorted(IMPORTERS))}.") from None


def import_cases(path: str | Path, importer: str = "auto", **kwargs) -> pd.DataFrame:
    """Import a dataset with the named ``importer`` (``data.importer``; see :data:`IMPORTERS`), or with ``"auto"``
    from a cases table file (CSV/Parquet), a BrEaST-Lesions-USG folder (or its ``clinical_data.csv``) or a
    BUSI-style folder."""
    if importer != "auto":
        read = get_importer(importer)
        return read(path, **kwargs) if kwargs else read(path)
    path = Path(path)
    if find_root(path) is not None:
        return import_breast_lesions_usg(path, **kwargs)
    if path.is_dir():
        return import_busi(path)
    return read_cases(path, **kwargs)

