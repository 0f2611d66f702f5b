"""The tiles table: the images of a case when a case has many (histology), beside the one-row-per-case table.

A histology case (a tumour, a slide, a patient's block) is still one row of the cases table — ``case_id``,
``patient_id``, ``center``, ``label`` and any clinical columns — so splits, metrics, bootstrap and bundles work
per case exactly as for ultrasound. Its images live in a second, long table linked by ``case_id``:

``case_id``        the case the tile belongs to (must exist in the cases table).
``stack_id``       a location inside the case; the tiles of one location at different magnifications form a
                   concentric *stack* (same centre, different field of view).
``magnification``  objective magnification of the tile (number, e.g. 40, 20, 10).
``image_path``     the tile file (absolute in memory, relative to the table when saved).

Columns starting with ``_`` are bookkeeping. :func:`stack_table` pivots the long table to one row per stack and
one path column per magnification, which is what the multiscale model reads. A stack that lacks one of the
requested magnifications is dropped with a logged warning (never silently, never the whole case).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from breastfusion.data.cases import CASE_ID, IMAGE_PATH, _resolve, read_table, write_table
from breastfusion.errors import DataError

log = logging.getLogger(__name__)

STACK_ID, MAGNIFICATION = "stack_id", "magnification"
TILE_COLUMNS = (CASE_ID, STACK_ID, MAGNIFICATION, IMAGE_PATH)


def mag_column(mag: float) -> str:
    """Column name of a magnification in :func:`stack_table` (``mag_40``, ``mag_2.5``)."""
    m = float(mag)
    return f"mag_{int(m)}" if m.is_integer() else f"mag_{m:g}"


def validate_tiles(tiles: pd.DataFrame, cases: pd.DataFrame | None = None, *, check_files: bool = True,
                   source: str = "tiles table") -> pd.DataFrame:
    """Check a tiles table (errors name the row) and return a normalised copy."""
    if not isinstance(tiles, pd.DataFrame):
        raise TypeError(f"The tiles table must be a pandas DataFrame. Got {type(tiles).__name__} instead.")
    if len(tiles) == 0:
        raise DataError(f"The {source} is empty: no tiles to work on.")
    missing = [c for c in (CASE_ID, MAGNIFICATION, IMAGE_PATH) if c not in tiles.columns]
    if missing:
        raise DataError(f"The {source} lacks column(s) {missing} (columns: {', '.join(map(str, tiles.columns))}).")
    df = tiles.copy().reset_index(drop=True)
    df[CASE_ID] = df[CASE_ID].astype(str)
    if STACK_ID not in df.columns:  # one image per case and magnification: a single stack per case
        df[STACK_ID] = "0"
    df[STACK_ID] = df[STACK_ID].fillna("0").astype(str)
    mags = pd.to_numeric(df[MAGNIFICATION], errors="coerce")
    bad = mags.isna() | ~np.isfinite(mags) | (mags <= 0)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{source}, row {row + 2} (case '{df.at[row, CASE_ID]}'): magnification "
                        f"{df.at[row, MAGNIFICATION]!r} is not a positive number (e.g. 40, 20, 10).")
    df[MAGNIFICATION] = mags.astype(float)
    dup = df.duplicated([CASE_ID, STACK_ID, MAGNIFICATION], keep=False)
    if dup.any():
        rows = [int(i) + 2 for i in np.flatnonzero(dup.to_numpy())[:2]]
        raise DataError(f"{source}, rows {rows}: the same case, stack and magnification appear twice.")
    if cases is not None:
        known = set(cases[CASE_ID].astype(str))
        unknown = ~df[CASE_ID].isin(known)
        if unknown.any():
            row = int(np.flatnonzero(unknown.to_numpy())[0])
            raise DataError(f"{source}, row {row + 2}: case '{df.at[row, CASE_ID]}' is not in the cases table.")
    if check_files:
        for i, p in enumerate(df[IMAGE_PATH]):
            if p is None or (isinstance(p, float) and np.isnan(p)) or not Path(str(p)).is_file():
                raise DataError(f"{source}, row {i + 2} (case '{df.at[i, CASE_ID]}'): tile file not found: '{p}'.")
    return df


def read_tiles(path: str | Path, cases: pd.DataFrame | None = None, **kwargs) -> pd.DataFrame:
    """Load a tiles table (CSV or Parquet); tile paths are resolved relative to the table."""
    path = Path(path)
    df = read_table(path, "tiles table", {CASE_ID: str, STACK_ID: str, IMAGE_PATH: str})
    if IMAGE_PATH in df.columns:
        df[IMAGE_PATH] = [_resolve(v, path.parent) for v in df[IMAGE_PATH]]
    kwargs.setdefault("source", f"tiles table '{path}'")
    return validate_tiles(df, cases, **kwargs)


def write_tiles(tiles: pd.DataFrame, path: str | Path) -> Path:
    """Write a tiles table with paths relative to it, atomically."""
    return write_table(tiles, path, (IMAGE_PATH,))


def stack_table(tiles: pd.DataFrame, magnifications: list[float] | tuple[float, ...]) -> pd.DataFrame:
    """One row per (case_id, stack_id) with a path column per requested magnification (:func:`mag_column`).

    Stacks missing a requested magnification are dropped with a warning naming them."""
    if not magnifications:
        raise DataError("No magnifications requested.")
    want = [float(m) for m in magnifications]
    sub = tiles[tiles[MAGNIFICATION].isin(want)]
    wide = sub.pivot(index=[CASE_ID, STACK_ID], columns=MAGNIFICATION, values=IMAGE_PATH)
    for m in want:
        if m not in wide.columns:
            wide[m] = np.nan
    wide = wide[want]
    incomplete = wide.isna().any(axis=1)
    if incomplete.any():
        bad = [f"{c}/{s}" for c, s in wide.index[incomplete][:5]]
        log.warning("dropping %d stack(s) that lack one of magnifications %s, e.g. %s",
                    int(incomplete.sum()), [f"{m:g}x" for m in want], ", ".join(bad))
        wide = wide[~incomplete]
    if len(wide) == 0:
        raise DataError(f"No stack has every requested magnification {[f'{m:g}x' for m in want]}.")
    wide.columns = [mag_column(m) for m in want]
    return wide.reset_index()
