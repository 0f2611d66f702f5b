"""BreakHis (Spanhol et al., IEEE TBME 2016): file-name parsing and import as a cases table.

File names are ``SOB_<B|M>_<subtype>-<year>-<slide id>-<magnification>-<seq>.png``, e.g.
``SOB_B_A-14-22549AB-40-001.png``: benign adenosis, 2014, slide 22549AB, 40x objective, image 001.

Patients: BreakHis's "patient" field is a slide/patient code such as ``22549AB``; a few numbers occur with
several letter suffixes (e.g. ``22549AB``, ``22549CD``, ``22549G`` in the full dataset). ``patient_id`` is
``<year>-<code>`` as written; ``_patient_number`` keeps only ``<year>-<digits>`` so that a stricter,
leakage-safe grouping is one column away (``cases['patient_id'] = cases['_patient_number']``).

Label leakage: the subtype determines the class, so the subtype, magnification, sequence and patient number
are stored in bookkeeping columns (``_subtype``, ``_subtype_name``, ``_magnification``, ``_seq``,
``_patient_number``), which the cases-table convention never uses as features.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from breastfusion.errors import DataError

log = logging.getLogger(__name__)

CENTER = "BreakHis"
MAGNIFICATIONS = (40, 100, 200, 400)
SUBTYPES: dict[str, tuple[str, str]] = {
    "A": ("benign", "adenosis"),
    "F": ("benign", "fibroadenoma"),
    "PT": ("benign", "phyllodes tumor"),
    "TA": ("benign", "tubular adenoma"),
    "DC": ("malignant", "ductal carcinoma"),
    "LC": ("malignant", "lobular carcinoma"),
    "MC": ("malignant", "mucinous carcinoma"),
    "PC": ("malignant", "papillary carcinoma"),
}
_CLASS = {"B": "benign", "M": "malignant"}
_NAME_RE = re.compile(
    r"^SOB_(?P<cls>[BM])_(?P<subtype>[A-Z]+)-(?P<year>\d{2})-(?P<patient>[0-9A-Z]+)"
    r"-(?P<mag>\d+)-(?P<seq>\d+)\.png$",
    re.IGNORECASE,
)
_EXPECTED = "SOB_<B|M>_<subtype>-<year>-<patient>-<magnification>-<seq>.png"


def parse_breakhis_name(name: str | Path) -> dict:
    """Parse a BreakHis file name (a path is fine; only its name is used).

    Returns ``{"class", "subtype", "subtype_name", "year", "patient_code", "patient_id", "patient_number",
    "magnification", "seq"}``: class 'benign'/'malignant', subtype code ('DC') and full name
    ('ductal carcinoma'), patient_id '<year>-<code>', magnification int (40/100/200/400), seq int.
    Raises :class:`DataError` naming the file when the name does not follow the BreakHis pattern, the
    subtype is unknown, the subtype contradicts the class letter, or the magnification is not one of BreakHis's.
    """
    fname = Path(str(name)).name
    m = _NAME_RE.match(fname)
    if m is None:
        raise DataError(f"'{name}' is not a BreakHis file name (expected {_EXPECTED}, e.g. "
                        "SOB_B_A-14-22549AB-40-001.png).")
    cls = _CLASS[m["cls"].upper()]
    code = m["subtype"].upper()
    if code not in SUBTYPES:
        raise DataError(f"'{name}': unknown BreakHis subtype '{code}' (known: {', '.join(SUBTYPES)}).")
    sub_cls, sub_name = SUBTYPES[code]
    if sub_cls != cls:
        raise DataError(f"'{name}': subtype '{code}' ({sub_name}) is {sub_cls}, but the name says "
                        f"{m['cls'].upper()} ({cls}).")
    mag = int(m["mag"])
    if mag not in MAGNIFICATIONS:
        raise DataError(f"'{name}': magnification {mag} is not a BreakHis magnification {MAGNIFICATIONS}.")
    year, code_p = m["year"], m["patient"].upper()
    digits = re.match(r"\d+", code_p)
    return {
        "class": cls,
        "subtype": code,
        "subtype_name": sub_name,
        "year": int(year),
        "patient_code": code_p,
        "patient_id": f"{year}-{code_p}",
        "patient_number": f"{year}-{digits.group(0) if digits else code_p}",
        "magnification": mag,
        "seq": int(m["seq"]),
    }


def import_breakhis(folder: str | Path, *, strict: bool = True) -> pd.DataFrame:
    """Find every BreakHis PNG under ``folder`` (any depth: the original nested layout or a flat folder).

    Returns a validated cases table: ``case_id`` (file stem), ``patient_id``, ``center`` ('BreakHis'),
    ``label`` ('benign'/'malignant'), ``image_path`` (absolute), ``mask_path`` (NaN: none available) and the
    bookkeeping columns ``_subtype``, ``_subtype_name``, ``_magnification``, ``_seq``, ``_patient_number``.
    Hidden files are ignored. Another PNG name raises :class:`DataError` naming it (``strict=False``: skipped
    with a warning). The same file name twice (a copied folder) raises :class:`DataError`.
    """
    from breastfusion.data.cases import validate_cases

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"BreakHis folder not found: '{folder}'.")
    rows, seen = [], {}
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() != ".png" or p.name.startswith(".") or not p.is_file():
            continue
        try:
            info = parse_breakhis_name(p)
        except DataError:
            if strict:
                raise DataError(
                    f"'{p}' is not a BreakHis file name (expected {_EXPECTED}); move it out of '{folder}' or "
                    "use strict=False to skip such files."
                ) from None
            log.warning("BreakHis import: skipping '%s' (not a BreakHis file name).", p)
            continue
        if p.stem in seen:
            raise DataError(f"BreakHis image '{p.name}' appears twice: '{seen[p.stem]}' and '{p}'.")
        seen[p.stem] = p
        rows.append({
            "case_id": p.stem,
            "patient_id": info["patient_id"],
            "center": CENTER,
            "label": info["class"],
            "image_path": str(p.resolve()),
            "mask_path": float("nan"),
            "_subtype": info["subtype"],
            "_subtype_name": info["subtype_name"],
            "_magnification": info["magnification"],
            "_seq": info["seq"],
            "_patient_number": info["patient_number"],
        })
    if not rows:
        raise DataError(f"No BreakHis images (SOB_*.png) found under '{folder}'.")
    return validate_cases(pd.DataFrame(rows), source=f"BreakHis folder '{folder}'")


def group_by_patient_magnification(cases: pd.DataFrame, *, patient_col: str = "patient_id") -> pd.DataFrame:
    """One row per (patient, magnification): label, subtype, image count and the case ids / paths.

    Columns: ``patient_id``, ``magnification``, ``label``, ``subtype``, ``n_images``, ``case_ids`` (list),
    ``image_paths`` (list). Raises :class:`DataError` when one patient carries two labels.
    """
    need = [patient_col, "label", "image_path", "case_id"]
    mag_col = "_magnification" if "_magnification" in cases.columns else "magnification"
    sub_col = "_subtype" if "_subtype" in cases.columns else "subtype"
    missing = [c for c in need + [mag_col] if c not in cases.columns]
    if missing:
        raise DataError(f"BreakHis cases table lacks columns {missing} (use import_breakhis).")
    labels = cases.groupby(patient_col)["label"].nunique()
    if (labels > 1).any():
        p = labels.index[labels > 1][0]
        raise DataError(f"BreakHis patient '{p}' has images with different labels "
                        f"{sorted(cases.loc[cases[patient_col] == p, 'label'].unique())}.")
    rows = []
    for (pid, mag), g in cases.sort_values("case_id").groupby([patient_col, mag_col], sort=True):
        rows.append({
            "patient_id": pid,
            "magnification": int(mag),
            "label": g["label"].iloc[0],
            "subtype": ";".join(sorted(g[sub_col].astype(str).unique())) if sub_col in g.columns else None,
            "n_images": int(len(g)),
            "case_ids": list(g["case_id"]),
            "image_paths": list(g["image_path"]),
        })
    return pd.DataFrame(rows)
