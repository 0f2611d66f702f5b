"""Predicted lesion masks for a cases table, written in the cases-table layout.

    from breastfusion.segmentation import load_lesion_segmenter, segment_cases
    out = segment_cases(cases, load_lesion_segmenter("segmenter.safetensors"), "pred/")

Files
-----
``out_dir/masks/<name>_mask.png``, ``<name>_mask_1.png``, ... : one 8-bit PNG (0 / 255, the image's own size) per
predicted lesion (connected part), the largest first, BUSI-style; ``<name>`` is the case id, with ``/`` kept as
sub-folders and any other character outside ``A-Za-z0-9 ._()+-`` replaced (such a name also gets a short hash of
the id, so two ids never share files). A case predicted without lesion gets one empty ``<name>_mask.png``: an
explicit "no lesion", as BUSI's normal images have. ``out_dir/records/<name>.json`` records, per case, the model
file's digest, the image (path, size, modification time), ``require_lesion`` and the results; a case whose record
and mask files exist and match is not segmented again (a killed run resumes).

The returned table is ``cases`` with ``mask_path`` = the predicted mask files (absolute, joined with ``;``) and the
columns of :data:`SEGMENTATION_COLUMNS`: ``lesion_prob`` (highest pixel probability), ``mask_area_px``,
``n_components``, ``fallback_used`` (``require_lesion`` kept the most likely region although nothing passed the
threshold) and ``segmentation_error``. A case whose image cannot be read keeps its row with the reason in
``segmentation_error`` and ``mask_path`` NaN ("no mask available", never "no lesion"); the batch goes on. These
columns are bookkeeping, not clinical inputs: drop them (``drop(columns=SEGMENTATION_COLUMNS)``) before a table is
read for features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from breastfusion.data.cases import CASE_ID, IMAGE_PATH, MASK_PATH, MASK_SEP
from breastfusion.errors import DataError
from breastfusion.segmentation.unet import (
    LesionSegmenter,
    SegmentationResult,
    as_segmenter,
)
from breastfusion.utils import atomic_path, write_json

__all__ = ["SEGMENTATION_COLUMNS", "mask_file_stem", "segment_cases", "write_masks"]

log = logging.getLogger(__name__)

SEGMENTATION_COLUMNS = ("lesion_prob", "mask_area_px", "n_components", "fallback_used", "segmentation_error")
_SAFE = re.compile(r"[^A-Za-z0-9 ._()+\-]")
RECORD_VERSION = 1


def mask_file_stem(case_id: str) -> str:
    """The relative file stem of a case's masks (see the module docstring)."""
    cid = str(case_id)
    parts = [p for p in re.split(r"[\\/]", cid)]
    clean = []
    for p in parts:
        q = _SAFE.sub("_", p).strip()
        clean.append("_" if q in ("", ".", "..") else q)
    stem = "/".join(clean)
    if stem != cid.replace("\\", "/") or not parts[-1]:
        stem += "_" + hashlib.sha1(cid.encode("utf-8")).hexdigest()[:8]
    return stem


def mask_file_names(stem: str, n: int) -> list[str]:
    """BUSI-style names of ``n`` mask files: ``<stem>_mask.png``, ``<stem>_mask_1.png``, ..."""
    return [f"{stem}_mask.png"] + [f"{stem}_mask_{k}.png" for k in range(1, max(n, 1))]


def write_masks(result: SegmentationResult, masks_dir: Path, stem: str) -> list[Path]:
    """Write one PNG per lesion (an empty ``_mask.png`` for none), remove this case's older extra files."""
    return write_mask_files(result.components() or [np.zeros(result.labels.shape, dtype=bool)], masks_dir, stem)


def write_mask_files(comps, masks_dir: Path, stem: str) -> list[Path]:
    """One 8-bit PNG (0 / 255) per boolean mask, BUSI-style names; this case's older ``_mask_k`` files beyond the
    new count are removed (shared by the trained U-Net and LiteMedSAM)."""
    from PIL import Image

    paths = [masks_dir / name for name in mask_file_names(stem, len(comps))]
    for comp, path in zip(comps, paths):
        with atomic_path(path) as tmp:
            Image.fromarray(np.asarray(comp).astype(np.uint8) * 255, mode="L").save(tmp, format="PNG")
    base = Path(stem).name
    pattern = re.compile(rf"^{re.escape(base)}_mask_(\d+)\.png$")
    folder = paths[0].parent
    for old in folder.iterdir():
        m = pattern.match(old.name)
        if m and int(m.group(1)) >= len(comps):
            old.unlink(missing_ok=True)
    return paths


def _image_key(path) -> dict:
    p = Path(str(path))
    try:
        st = p.stat()
        return {"image_path": str(p.resolve()), "image_bytes": st.st_size, "image_mtime_ns": st.st_mtime_ns}
    except OSError:
        return {"image_path": str(p)}


def _reusable(rec_path: Path, key: dict, masks_dir: Path) -> dict | None:
    if not rec_path.is_file():
        return None
    try:
        rec = json.loads(rec_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(rec, dict) or rec.get("version") != RECORD_VERSION:
        return None
    if any(rec.get(k) != v for k, v in key.items()):
        return None
    masks = rec.get("masks")
    if not isinstance(masks, list) or not masks or not all((masks_dir / m).is_file() for m in masks):
        return None
    return rec


def segment_cases(cases: pd.DataFrame, segmenter: LesionSegmenter | str | Path, out_dir: str | Path, *,
                  require_lesion: bool = False, progress: bool = True, batch_size: int = 8) -> pd.DataFrame:
    """Predict every case's lesion masks, write them under ``out_dir/masks/`` and return the cases table with
    ``mask_path`` = the predicted masks plus :data:`SEGMENTATION_COLUMNS` (see the module docstring).

    ``require_lesion``: for cohorts whose every image holds a lesion, an image with nothing above the threshold
    keeps its most likely region (``fallback_used``)."""
    from breastfusion.segmentation.train import read_case_arrays

    seg = as_segmenter(segmenter)
    if not isinstance(cases, pd.DataFrame):
        raise TypeError(f"cases must be a pandas DataFrame; got {type(cases).__name__}.")
    for col in (CASE_ID, IMAGE_PATH):
        if col not in cases.columns:
            raise DataError(f"The cases table has no '{col}' column (columns: {', '.join(map(str, cases.columns))}).")
    ids = cases[CASE_ID].astype(str)
    if ids.duplicated().any():
        raise DataError(f"case_id '{ids[ids.duplicated()].iloc[0]}' appears more than once in the cases table.")
    out_dir = Path(out_dir)
    masks_dir, rec_dir = out_dir / "masks", out_dir / "records"
    n = len(cases)
    mask_col: list = [np.nan] * n
    fields = {c: [np.nan] * n for c in SEGMENTATION_COLUMNS[:-1]}
    errors: list = [None] * n
    stems = [mask_file_stem(c) for c in ids]
    if len(set(stems)) != n:
        raise DataError("Two case ids map to the same mask file name; make the case ids unique ignoring case "
                        "and punctuation.")
    base_key = {"version": RECORD_VERSION, "model_digest": seg.digest, "require_lesion": bool(require_lesion)}

    def fill(i: int, rec: dict) -> None:
        mask_col[i] = MASK_SEP.join(str((masks_dir / m).resolve()) for m in rec["masks"])
        for c, values in fields.items():
            values[i] = rec[c]

    pending = []
    for i, (cid, img) in enumerate(zip(ids, cases[IMAGE_PATH])):
        key = {**base_key, "case_id": cid, **_image_key(img)}
        rec = _reusable(rec_dir / f"{stems[i]}.json", key, masks_dir)
        if rec is not None:
            fill(i, rec)
        else:
            pending.append((i, key))
    if len(pending) < n:
        log.info("lesion masks: %d of %d case(s) reused from '%s'", n - len(pending), n, out_dir)

    from tqdm import tqdm

    bar = tqdm(total=len(pending), desc="segmenting", unit="img", disable=not progress or not pending,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for start in range(0, len(pending), max(1, batch_size)):
            chunk, grays = [], []
            for i, key in pending[start:start + max(1, batch_size)]:
                img = cases[IMAGE_PATH].iloc[i]
                try:
                    if img is None or (isinstance(img, float) and np.isnan(img)) or str(img).strip() == "":
                        raise DataError("no image path")
                    gray, _ = read_case_arrays(img, "")
                except DataError as exc:
                    errors[i] = str(exc)
                    log.warning("lesion masks: skipped case '%s' (row %d): %s", ids.iloc[i], i + 2, exc)
                    continue
                chunk.append((i, key))
                grays.append(gray)
            if grays:
                for (i, key), res in zip(chunk, seg.segment_many(grays, batch_size=batch_size,
                                                                  require_lesion=require_lesion)):
                    paths = write_masks(res, masks_dir, stems[i])
                    rec = {**key, "masks": [str(p.relative_to(masks_dir)) for p in paths], **res.record(),
                           "shape": list(res.labels.shape)}
                    write_json(rec, rec_dir / f"{stems[i]}.json")
                    fill(i, rec)
            bar.update(len(pending[start:start + max(1, batch_size)]))
    finally:
        bar.close()
    if pending:
        log.info("lesion masks: %d case(s) segmented in %.1f s (%.3f s per image) into '%s'", len(pending),
                 time.perf_counter() - t0, (time.perf_counter() - t0) / len(pending), masks_dir)
    out = cases.copy()
    out[MASK_PATH] = pd.Series(mask_col, index=out.index, dtype=object)
    out["lesion_prob"] = pd.Series(fields["lesion_prob"], index=out.index, dtype=float)
    for c in ("mask_area_px", "n_components"):  # whole numbers, missing for a case that could not be read
        out[c] = pd.array([None if isinstance(v, float) and np.isnan(v) else int(v) for v in fields[c]], dtype="Int64")
    out["fallback_used"] = pd.array([None if isinstance(v, float) and np.isnan(v) else bool(v)
                                     for v in fields["fallback_used"]], dtype="boolean")
    out["segmentation_error"] = pd.Series(errors, index=out.index, dtype=object)
    failed = sum(e is not None for e in errors)
    if failed:
        log.warning("lesion masks: %d of %d case(s) could not be segmented (reason in column segmentation_error)",
                    failed, n)
    return out
