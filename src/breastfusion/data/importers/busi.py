"""The BUSI layout (Al-Dhabyani et al., Data in Brief 2020): ``<class>/<name>.png`` with ``<name>_mask.png``."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from breastfusion.data.cases import MASK_SEP, validate_cases
from breastfusion.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
_MASK_RE = re.compile(r"^(?P<stem>.+?)_mask(?:_(?P<k>\d+))?$", re.IGNORECASE)


def find_busi_root(path: str | Path) -> Path:
    """Accept either the folder holding ``benign/ malignant/ normal/`` or one level above it."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"BUSI folder not found: '{path}'.")
    if any((path / c).is_dir() for c in ("benign", "malignant", "normal")):
        return path
    for sub in sorted(path.iterdir()):
        if sub.is_dir() and any((sub / c).is_dir() for c in ("benign", "malignant", "normal")):
            return sub
    raise DataError(f"'{path}' does not look like BUSI: no 'benign/', 'malignant/' or 'normal/' folder inside.")


def import_busi(path: str | Path) -> pd.DataFrame:
    """Import the BUSI layout: ``<class>/<name>.png`` with ``<name>_mask.png``, ``<name>_mask_1.png``, ...

    BUSI has no patient ids; each image is its own patient here. The audit's near-duplicate groups
    are what keeps copies of one lesion on one side of a split.
    """
    root = find_busi_root(path)
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        label = class_dir.name.strip().lower()
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        masks: dict[str, list[Path]] = {}
        images = []
        for f in files:
            m = _MASK_RE.match(f.stem)
            if m:
                masks.setdefault(m.group("stem"), []).append(f)
            else:
                images.append(f)
        for img in images:
            ms = sorted(masks.pop(img.stem, []), key=lambda p: (len(p.stem), p.stem))
            case_id = f"{label}/{img.stem}"
            rows.append({
                "case_id": case_id,
                "patient_id": case_id,
                "center": "BUSI",
                "label": label,
                "image_path": str(img.resolve()),
                "mask_path": MASK_SEP.join(str(m.resolve()) for m in ms),
            })
        for orphan in masks.values():
            log.warning("BUSI: mask(s) without an image: %s", ", ".join(str(o) for o in orphan))
    if not rows:
        raise DataError(f"No images found under '{root}'.")
    return validate_cases(pd.DataFrame(rows), source=f"BUSI folder '{root}'")
