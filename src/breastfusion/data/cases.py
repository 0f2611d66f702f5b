"""The cases table: one row per case, flowing through every stage.

Columns
-------
``case_id``     unique string id.
``patient_id``  patient identifier (splits keep a patient on one side); defaults to ``case_id``.
``center``      acquiring centre (leave-one-centre-out validation); defaults to ``"center_0"``.
``label``       class name (string); may be missing only for prediction-time tables.
``image_path``  image file (absolute in memory; relative to the table when saved).
``mask_path``   lesion mask file(s), several joined with ``;``; empty string = "no mask file"
                (an empty mask means "no lesion"), missing (NaN) = "no mask available".
                In a CSV an empty cell reads as missing, so "no lesion" is written there as the text
                ``no lesion`` (:data:`NO_LESION`; read back as ``''``); a Parquet table keeps ``''``.
``bbox``        optional: box(es) around the lesion, ``x0,y0,x1,y1`` in pixels, several joined with ``;``;
                prediction segments a case without a mask from its box (LiteMedSAM).
Any other column is a clinical / biomarker feature (numeric, boolean or categorical; missing allowed).
Columns starting with ``_`` are bookkeeping (e.g. ``_synthetic``) and never used as features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from breastfusion.errors import DataError

CASE_ID, PATIENT_ID, CENTER, LABEL, IMAGE_PATH, MASK_PATH = (
    "case_id", "patient_id", "center", "label", "image_path", "mask_path",
)
#: ``bbox``: box(es) around the lesion for box-prompted segmentation; ``expert_mask_path``: the expert's masks
#: kept beside predicted ones (data.masks: predicted). Neither is ever a clinical feature.
RESERVED = (CASE_ID, PATIENT_ID, CENTER, LABEL, IMAGE_PATH, MASK_PATH, "dup_group", "fold", "bbox", "expert_mask_path",
            # written by breastfusion.segmentation.segment_cases beside predicted masks: never clinical features
            "lesion_prob", "mask_area_px", "n_components", "fallback_used", "segmentation_error")
MASK_SEP = ";"
#: How a CSV cases table says "no lesion" in mask_path (an empty CSV cell is read as "no mask available").
NO_LESION = "no lesion"


def feature_columns(cases: pd.DataFrame) -> list[str]:
    """The clinical / biomarker columns: everything that is not reserved or bookkeeping."""
    return [c for c in cases.columns if c not in RESERVED and not str(c).startswith("_")]


def mask_list(value) -> list[str]:
    """Split a ``mask_path`` cell into a list of paths ([] for empty or missing)."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return []
    return [p for p in str(value).split(MASK_SEP) if p.strip()]


def _resolve(value, root: Path):
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return value
    parts = [str(p).strip() for p in str(value).split(MASK_SEP) if str(p).strip()]
    return MASK_SEP.join(str((root / p).resolve()) if not Path(p).is_absolute() else p for p in parts)


def _relativize(value, root: Path):
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return value
    out = []
    for p in mask_list(value):
        try:
            out.append(str(Path(p).resolve().relative_to(root.resolve())))
        except ValueError:
            out.append(str(Path(p).resolve()))
    return MASK_SEP.join(out)


def validate_cases(
    cases: pd.DataFrame,
    *,
    require_labels: bool = True,
    labels: list[str] | None = None,
    check_files: bool = True,
    source: str = "cases table",
    require_images: bool = True,
) -> pd.DataFrame:
    """Check a cases table and return a normalised copy. Errors name the row and column.

    ``labels`` restricts the allowed class names (an unknown label is an error naming the row).
    ``require_images=False`` accepts a table without ``image_path``: histology cases keep their images in a
    tiles table (:mod:`breastfusion.data.tiles`).
    """
    if not isinstance(cases, pd.DataFrame):
        raise TypeError(f"The cases table must be a pandas DataFrame. Got {type(cases).__name__} instead.")
    if len(cases) == 0:
        raise DataError(f"The {source} is empty: no cases to work on.")
    for col in (CASE_ID, IMAGE_PATH) if require_images else (CASE_ID,):
        if col not in cases.columns:
            raise DataError(f"The {source} has no '{col}' column (columns: {', '.join(map(str, cases.columns))}).")
    df = cases.copy().reset_index(drop=True)
    if df[CASE_ID].isna().any():
        row = int(np.flatnonzero(df[CASE_ID].isna().to_numpy())[0])
        raise DataError(f"{source}, row {row + 2}: 'case_id' is empty.")
    df[CASE_ID] = df[CASE_ID].astype(str)
    dup = df[CASE_ID].duplicated(keep=False)
    if dup.any():
        ids = df.loc[dup, CASE_ID]
        first = ids.iloc[0]
        rows = [int(i) + 2 for i in ids.index[ids == first]]
        raise DataError(f"{source}: case_id '{first}' appears more than once (rows {rows}); case ids must be unique.")
    if PATIENT_ID not in df.columns:
        df[PATIENT_ID] = df[CASE_ID]
    df[PATIENT_ID] = df[PATIENT_ID].where(df[PATIENT_ID].notna(), df[CASE_ID]).astype(str)
    if CENTER not in df.columns:
        df[CENTER] = "center_0"
    df[CENTER] = df[CENTER].fillna("center_0").astype(str)
    if MASK_PATH not in df.columns:
        df[MASK_PATH] = np.nan
    if LABEL in df.columns:
        lab = df[LABEL]
        missing = lab.isna() | (lab.astype(str).str.strip() == "")
        if require_labels and missing.any():
            row = int(np.flatnonzero(missing.to_numpy())[0])
            raise DataError(f"{source}, row {row + 2} (case '{df.at[row, CASE_ID]}'): 'label' is empty.")
        df[LABEL] = lab.where(~missing, None)
        df.loc[~missing, LABEL] = lab[~missing].astype(str).str.strip()
        if labels is not None:
            bad = ~missing & ~df[LABEL].isin(labels)
            if bad.any():
                row = int(np.flatnonzero(bad.to_numpy())[0])
                raise DataError(
                    f"{source}, row {row + 2} (case '{df.at[row, CASE_ID]}'): unknown label "
                    f"'{df.at[row, LABEL]}'; expected one of {labels}."
                )
    elif require_labels:
        raise DataError(f"The {source} has no 'label' column, which training and evaluation need.")
    for col in feature_columns(df):
        s = df[col]
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            vals = s.to_numpy(dtype=float, na_value=np.nan)
            inf = np.isinf(vals)
            if inf.any():
                row = int(np.flatnonzero(inf)[0])
                raise DataError(
                    f"{source}, row {row + 2} (case '{df.at[row, CASE_ID]}'), column '{col}': infinite value; "
                    "use an empty cell for a missing value."
                )
    if check_files and IMAGE_PATH in df.columns:
        for i, p in enumerate(df[IMAGE_PATH]):
            if p is None or (isinstance(p, float) and np.isnan(p)) or not Path(str(p)).is_file():
                raise DataError(
                    f"{source}, row {i + 2} (case '{df.at[i, CASE_ID]}'): image file not found: '{p}'."
                )
            for m in mask_list(df.at[i, MASK_PATH]):
                if not Path(m).is_file():
                    raise DataError(f"{source}, row {i + 2} (case '{df.at[i, CASE_ID]}'): mask file not found: '{m}'.")
    return df


def read_table(path: str | Path, what: str, dtype: dict) -> pd.DataFrame:
    """Read a CSV / TSV / Parquet table; errors name the file and say what it was meant to be."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what.capitalize()} not found: '{path}'.")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if suffix in (".csv", ".tsv", ".txt"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=dtype, keep_default_na=True)
    except Exception as exc:  # pandas raises many types for bad files
        raise DataError(f"Cannot read {what} '{path}': {exc}") from exc
    raise DataError(f"{what.capitalize()} '{path}' must be .csv, .tsv or .parquet.")


def read_cases(path: str | Path, **validate_kwargs) -> pd.DataFrame:
    """Load a cases table (CSV or Parquet); image and mask paths are resolved relative to the table."""
    path = Path(path)
    df = read_table(path, "cases table", {CASE_ID: str, PATIENT_ID: str, CENTER: str, LABEL: str,
                                          IMAGE_PATH: str, MASK_PATH: str})
    root = path.parent
    if IMAGE_PATH in df.columns:
        df[IMAGE_PATH] = [_resolve(v, root) for v in df[IMAGE_PATH]]
    if MASK_PATH in df.columns:
        df[MASK_PATH] = ["" if isinstance(v, str) and v.strip().lower() == NO_LESION else _resolve(v, root)
                         for v in df[MASK_PATH]]
    validate_kwargs.setdefault("source", f"cases table '{path}'")
    return validate_cases(df, **validate_kwargs)


def write_cases(cases: pd.DataFrame, path: str | Path) -> Path:
    """Write a cases table (CSV or Parquet, by suffix) with paths relative to it, atomically."""
    return write_table(cases, path, (IMAGE_PATH, MASK_PATH))


def write_table(table: pd.DataFrame, path: str | Path, path_columns: tuple[str, ...]) -> Path:
    """Write a table (CSV or Parquet, by suffix) atomically, with ``path_columns`` made relative to it."""
    from breastfusion.utils import atomic_path

    path = Path(path)
    df = table.copy()
    root = path.parent
    csv = path.suffix.lower() not in (".parquet", ".pq")
    for col in path_columns:
        if col in df.columns:
            df[col] = [_relativize(v, root) for v in df[col]]
            if csv and col == MASK_PATH:  # '' ("no lesion") would come back from a CSV as NaN ("no mask")
                df[col] = [NO_LESION if isinstance(v, str) and v == "" else v for v in df[col]]
    with atomic_path(path) as tmp:
        if not csv:
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
    return path
