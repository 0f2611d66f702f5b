"""Importer for BrEaST-Lesions-USG (Pawłowska et al., Scientific Data 2024; TCIA doi:10.7937/9WKK-Q141).

The release folder holds ``clinical_data.csv`` (one row per patient, one image per patient) and
``BrEaST-Lesions_USG-images_and_masks/`` with ``caseNNN.png``, the expert lesion mask ``caseNNN_tumor.png`` and,
for a few cases, ``caseNNN_otherK.png`` (another structure in the field: never the lesion, never read here).

The cases table keeps every sheet column as written, read as text (``dtype=str, keep_default_na=False``): a
cell ``not available`` stays visible to the column typing (:mod:`breastfusion.data.column_types`) instead
of becoming a NaN nobody declared. ``Classification`` becomes ``label`` (and is not kept a second time: a copy
of the label among the clinical columns would be an input that is the answer). Which columns are inputs, a
reader's block or excluded is the config's job (``configs/breast_lesions_usg.yaml``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from breastfusion.data.cases import CASE_ID, CENTER, IMAGE_PATH, LABEL, MASK_PATH, MASK_SEP, PATIENT_ID, validate_cases
from breastfusion.errors import DataError

log = logging.getLogger(__name__)

SHEET = "clinical_data.csv"
IMAGES_DIR = "BrEaST-Lesions_USG-images_and_masks"
CENTER_NAME = "BrEaST-Lesions-USG"
#: Columns the importer needs; the rest are kept unchanged.
REQUIRED = ("CaseID", "Image_filename", "Mask_tumor_filename", "Classification")
LABEL_COLUMN = "Classification"
PIXEL_SIZE_COLUMN = "Pixel_size"  # cm per pixel (about 0.007: ~4 cm across a ~550 px image)
#: Labels whose cases have no lesion: an empty tumour-mask cell there means "no lesion", not "mask unknown".
NO_LESION = ("normal",)
_SEP = "&"  # the sheet joins several file names in one cell with '&'


def find_root(path: str | Path) -> Path | None:
    """The release folder (holding ``clinical_data.csv`` and the images folder) at ``path`` or one level below,
    or the folder of ``path`` when it is that sheet; None when ``path`` is not this dataset."""
    path = Path(path)
    if path.is_file():
        return path.parent if path.name == SHEET and (path.parent / IMAGES_DIR).is_dir() else None
    if not path.is_dir():
        return None
    for cand in (path, *sorted(p for p in path.iterdir() if p.is_dir())):
        if (cand / SHEET).is_file() and (cand / IMAGES_DIR).is_dir():
            return cand
    return None


def _files(cell: str, folder: Path) -> list[str]:
    return [str((folder / f.strip()).resolve()) for f in str(cell).split(_SEP) if f.strip()]


def import_breast_lesions_usg(path: str | Path, **validate_kwargs) -> pd.DataFrame:
    """The cases table of a BrEaST-Lesions-USG folder: ``case_id`` (``caseNNN``), ``patient_id`` (= the case:
    one image per patient), ``image_path``, ``mask_path`` (the ``_tumor`` mask; ``''`` for a normal case, which
    has no lesion), ``label`` (``Classification``), ``center``, then every other sheet column as text."""
    root = find_root(path)
    if root is None:
        raise DataError(f"'{path}' is not a BrEaST-Lesions-USG folder: expected '{SHEET}' and '{IMAGES_DIR}/' in it.")
    sheet, folder = root / SHEET, root / IMAGES_DIR
    try:
        raw = pd.read_csv(sheet, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises many types for bad files
        raise DataError(f"Cannot read '{sheet}': {exc}") from exc
    absent = [c for c in REQUIRED if c not in raw.columns]
    if absent:
        raise DataError(f"'{sheet}' lacks column(s) {absent}; it has: {list(raw.columns)}.")
    clash = [c for c in (CASE_ID, PATIENT_ID, CENTER, LABEL, IMAGE_PATH, MASK_PATH) if c in raw.columns]
    if clash:
        raise DataError(f"'{sheet}' already has column(s) {clash}, which the importer writes.")
    ids = []
    for i, v in enumerate(raw["CaseID"]):
        try:
            ids.append(f"case{int(str(v).strip()):03d}")
        except ValueError:
            raise DataError(f"'{sheet}', row {i + 2}, column 'CaseID': '{v}' is not a case number.") from None
    labels = raw[LABEL_COLUMN].str.strip().str.lower()
    masks, unknown = [], []
    for cid, lab, cell in zip(ids, labels, raw["Mask_tumor_filename"]):
        files = _files(cell, folder)
        if files:
            masks.append(MASK_SEP.join(files))
        elif lab in NO_LESION:
            masks.append("")  # no lesion, so no lesion mask: radiomics read it as 'no lesion'
        else:
            masks.append(np.nan)  # a lesion without its mask: 'mask unknown', never 'no lesion'
            unknown.append(cid)
    if unknown:
        log.warning("BrEaST-Lesions-USG: %d case(s) with a lesion but no tumour mask (radiomics unknown): %s",
                    len(unknown), ", ".join(unknown[:20]))
    cases = pd.DataFrame({
        CASE_ID: ids, PATIENT_ID: ids,
        IMAGE_PATH: [str((folder / str(f).strip()).resolve()) for f in raw["Image_filename"]],
        MASK_PATH: masks, LABEL: labels.where(labels != "", None), CENTER: CENTER_NAME,
    })
    rest = raw.drop(columns=[LABEL_COLUMN])
    cases = pd.concat([cases, rest.reset_index(drop=True)], axis=1)
    validate_kwargs.setdefault("source", f"BrEaST-Lesions-USG sheet '{sheet}'")
    out = validate_cases(cases, **validate_kwargs)
    log.info("BrEaST-Lesions-USG: %d cases (%s) from '%s'", len(out),
             ", ".join(f"{k} {v}" for k, v in out[LABEL].value_counts().sort_index().items()), root)
    return out
