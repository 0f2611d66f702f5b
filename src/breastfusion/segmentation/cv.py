"""Cross-validated lesion segmentation: out-of-fold predicted masks and their quality against the expert's.

    from breastfusion.segmentation import cross_validate_segmenter
    oof, scores = cross_validate_segmenter(cases, splits, cfg.segmentation, "run/segmentation/cv", seed=0)

``splits`` is :func:`breastfusion.data.splits.make_splits` output (``case_id``, ``fold``, ``group``): the
classifier's own folds, patients and near-duplicate groups kept together. For each fold k one segmenter is
trained on the cases of the other folds (those with an expert mask; see :mod:`~breastfusion.segmentation.train`)
and written to ``out_dir/fold_k/segmenter.safetensors``; it predicts fold k's cases into ``out_dir/fold_k/masks/``
(:func:`~breastfusion.segmentation.predict.segment_cases`). No case is ever predicted by a segmenter that saw it.
Both steps resume: a fold's finished segmenter is reused when its data and settings are unchanged, and its
predicted cases are not redone.

Files in ``out_dir``:

``oof_cases.csv``  the cases table with ``mask_path`` = the out-of-fold predicted masks, ``expert_mask_path`` =
                   the original masks, ``fold``, and the per-case segmentation columns (paths relative to the file).
``scores.csv``     one row per case with an expert mask (including '' = "no lesion"): Dice, IoU, HD95 (pixels, or
                   mm with a pixel-size column), empty flags, areas, ``lesion_prob``, ``fallback_used``, fold, group.
``summary.json``   :func:`breastfusion.segmentation.metrics.summarise_scores` over all scored cases (bootstrap over
                   split groups), the same over the cases whose expert mask holds a lesion (``lesion_cases``), per
                   fold, per label, the training summary of each fold and the inference time per image.
``overlays/``      PNGs of up to ``n_overlays`` cases (the worst Dice first, then median and best ones): expert outline
                   in green, predicted in red.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from breastfusion.data.cases import (
    CASE_ID,
    IMAGE_PATH,
    LABEL,
    MASK_PATH,
    mask_list,
    write_table,
)
from breastfusion.errors import DataError
from breastfusion.segmentation.predict import mask_file_stem, segment_cases
from breastfusion.utils import atomic_path, stable_seed, write_json

__all__ = ["EXPERT_MASK", "cross_validate_segmenter", "load_summary", "score_against_expert", "summarise",
           "write_overlays"]

log = logging.getLogger(__name__)

EXPERT_MASK = "expert_mask_path"


def _spacing(value, unit: str) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(v) or v <= 0:
        return None
    return v * {"mm": 1.0, "cm": 10.0, "um": 1e-3}[unit]


def score_against_expert(oof: pd.DataFrame, pixel_size_column: str | None = None,
                         pixel_size_unit: str = "mm") -> pd.DataFrame:
    """Per-case Dice / IoU / HD95 of predicted masks (``mask_path``, as :func:`segment_cases` returns them) against
    ``expert_mask_path``; rows without an expert mask (NaN) or without a prediction are not scored. Optional
    columns ``fold`` and ``group`` (bootstrap groups) are carried over."""
    from breastfusion.data.images import image_size, read_mask
    from breastfusion.segmentation.metrics import segmentation_scores

    rows = []
    for _, r in oof.iterrows():
        expert, predicted = r[EXPERT_MASK], r[MASK_PATH]
        if not isinstance(expert, str) or not isinstance(predicted, str) or isinstance(r["segmentation_error"], str):
            continue  # no expert mask (NaN: unknown, not "no lesion"), or the image could not be segmented
        try:
            shape = image_size(r[IMAGE_PATH])
            paths = mask_list(expert)
            truth = read_mask(paths, shape=shape) if paths else np.zeros(shape, dtype=bool)
            pred = read_mask(mask_list(predicted), shape=shape)
        except DataError as exc:
            log.warning("segmentation scores: case '%s' not scored: %s", r[CASE_ID], exc)
            continue
        spacing = _spacing(r[pixel_size_column], pixel_size_unit) if pixel_size_column else None
        s = segmentation_scores(pred, truth, spacing)
        rows.append({CASE_ID: r[CASE_ID], "fold": int(r.get("fold", 0)), "group": r.get("group", r[CASE_ID]),
                     LABEL: r.get(LABEL), **s, "pred_area_px": int(pred.sum()), "truth_area_px": int(truth.sum()),
                     "lesion_prob": r["lesion_prob"], "n_components": r["n_components"],
                     "fallback_used": r["fallback_used"], "hd95_unit": "mm" if spacing else "px"})
    return pd.DataFrame(rows, columns=[CASE_ID, "fold", "group", LABEL, "dice", "iou", "hd95", "pred_empty",
                                       "truth_empty", "pred_area_px", "truth_area_px", "lesion_prob",
                                       "n_components", "fallback_used", "hd95_unit"])


def summarise(scores: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict:
    """:func:`~breastfusion.segmentation.metrics.summarise_scores` with the bootstrap over the ``group`` column."""
    from breastfusion.segmentation.metrics import summarise_scores

    if scores.empty:
        return {"n_cases": 0}
    return summarise_scores(scores, n_boot=n_boot, seed=seed, groups=scores["group"].astype(str).to_numpy())


def cross_validate_segmenter(cases: pd.DataFrame, splits: pd.DataFrame, cfg=None, out_dir: str | Path = "seg_cv", *,
                             seed: int = 0, progress: bool = True, require_lesion: bool = False, n_boot: int = 1000,
                             pixel_size_column: str | None = None, pixel_size_unit: str = "mm",
                             n_overlays: int = 12) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Out-of-fold lesion masks for every case and their scores against the expert masks (module docstring).

    Returns ``(oof_cases, scores)``. ``require_lesion`` is passed to prediction (cohorts whose every class has
    a lesion). ``pixel_size_column`` (unit ``pixel_size_unit``: mm, cm or um) gives HD95 in millimetres."""
    from breastfusion.segmentation.train import _config, train_lesion_segmenter
    from breastfusion.segmentation.unet import load_lesion_segmenter, read_meta

    cfg = _config(cfg)
    for col in (CASE_ID, "fold"):
        if col not in splits.columns:
            raise DataError(f"The splits table has no '{col}' column (make it with breastfusion.data.splits).")
    if pixel_size_column and pixel_size_column not in cases.columns:
        raise DataError(f"Pixel-size column '{pixel_size_column}' is not in the cases table.")
    if pixel_size_unit not in ("mm", "cm", "um"):
        raise DataError(f"pixel_size_unit must be mm, cm or um; got {pixel_size_unit!r}.")
    cases = cases.reset_index(drop=True)
    ids = cases[CASE_ID].astype(str)
    sp = splits.assign(**{CASE_ID: splits[CASE_ID].astype(str)}).drop_duplicates(CASE_ID).set_index(CASE_ID)
    missing = ids[~ids.isin(sp.index)]
    if len(missing):
        raise DataError(f"{len(missing)} case(s) have no fold in the splits table (e.g. '{missing.iloc[0]}'); "
                        "make the splits from this cases table.")
    fold = sp["fold"].reindex(ids).astype(int).to_numpy()
    group = sp["group"].reindex(ids).astype(str).to_numpy() if "group" in sp.columns else ids.to_numpy()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts, folds_info = [], {}
    predict_s, n_predicted = 0.0, 0
    for k in sorted(np.unique(fold)):
        test = fold == k
        fdir = out_dir / f"fold_{k}"
        model = fdir / "segmenter.safetensors"
        train_cases = cases[~test]
        if train_cases[MASK_PATH].notna().sum() == 0:
            raise DataError(f"Fold {k}: no training case (other folds) has an expert mask; the segmenter cannot "
                            "be trained.")
        log.info("segmentation CV fold %d: training on %d case(s), predicting %d", k, int((~test).sum()),
                 int(test.sum()))
        train_lesion_segmenter(train_cases, cfg, model, seed=stable_seed(seed, "segmenter", int(k)),
                               progress=progress)
        seg = load_lesion_segmenter(model, device=cfg.device)
        t0 = time.perf_counter()
        pred = segment_cases(cases[test], seg, fdir, require_lesion=require_lesion, progress=progress)
        predict_s += time.perf_counter() - t0
        n_predicted += int(test.sum())
        pred[EXPERT_MASK] = cases.loc[test, MASK_PATH].to_numpy()
        pred["fold"] = int(k)
        parts.append(pred)
        tr = read_meta(model)["training"]
        folds_info[str(k)] = {key: tr.get(key) for key in ("n_train", "n_val", "n_without_mask", "n_skipped",
                                                           "steps", "epochs", "best_step", "best_val_dice", "seconds")}
    oof = pd.concat(parts).set_index(CASE_ID, drop=False).reindex(ids).reset_index(drop=True)
    oof["group"] = group
    scores = score_against_expert(oof, pixel_size_column, pixel_size_unit)

    summary = summarise(scores, n_boot, seed)
    lesion = scores[~scores["truth_empty"].astype(bool)] if not scores.empty else scores
    summary["lesion_cases"] = summarise(lesion, n_boot, seed)
    summary["hd95_unit"] = "mm" if pixel_size_column else "px"
    summary["per_fold"] = {str(k): {"n": len(g), "dice": float(g["dice"].mean())}
                           for k, g in scores.groupby("fold")} if not scores.empty else {}
    if LABEL in scores.columns and scores[LABEL].notna().any():
        summary["per_label"] = {str(lab): {"n": len(g), "dice": float(g["dice"].mean()),
                                           "pred_empty": int(g["pred_empty"].astype(bool).sum())}
                                for lab, g in scores.groupby(LABEL)}
    summary["n_cases_total"] = len(cases)
    summary["n_without_expert_mask"] = int(cases[MASK_PATH].isna().sum())
    summary["n_segmentation_errors"] = int(oof["segmentation_error"].notna().sum())
    summary["n_fallback_used"] = int(oof["fallback_used"].fillna(False).astype(bool).sum())
    summary["require_lesion"] = bool(require_lesion)
    summary["folds"] = folds_info
    summary["settings"] = cfg.model_dump(mode="json")
    summary["predict_seconds_per_image"] = round(predict_s / max(1, n_predicted), 4)

    write_table(oof, out_dir / "oof_cases.csv", (IMAGE_PATH, MASK_PATH, EXPERT_MASK))
    with atomic_path(out_dir / "scores.csv") as tmp:
        scores.to_csv(tmp, index=False)
    write_json(summary, out_dir / "summary.json")
    if n_overlays and not scores.empty:
        write_overlays(oof, scores, out_dir / "overlays", n=n_overlays)
    log.info("segmentation CV: %d case(s) scored; Dice %.3f (lesion cases %.3f)", len(scores),
             summary.get("dice", {}).get("mean", float("nan")),
             summary["lesion_cases"].get("dice", {}).get("mean", float("nan")))
    return oof, scores


# ------------------------------------------------------------------------------------------------ overlays
def _pick(scores: pd.DataFrame, n: int) -> list[tuple[str, str]]:
    """(case_id, tag) of up to n cases: half the worst Dice, then a quarter around the median, then the best."""
    s = scores.sort_values(["dice", CASE_ID], kind="stable").reset_index(drop=True)
    n_worst = max(1, (n + 1) // 2)
    n_mid = max(0, (n - n_worst) // 2)
    picks: list[tuple[str, str]] = []
    seen = set()

    def add(idx, tag):
        for i in idx:
            cid = str(s.at[int(i), CASE_ID])
            if cid not in seen and len(picks) < n:
                seen.add(cid)
                picks.append((cid, tag))

    add(range(min(n_worst, len(s))), "worst")
    mid = len(s) // 2
    add(range(max(0, mid - n_mid // 2), min(len(s), mid - n_mid // 2 + n_mid)), "median")
    add(range(len(s) - 1, -1, -1), "best")
    return picks


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    from scipy import ndimage as ndi

    edge = mask & ~ndi.binary_erosion(mask, border_value=0)
    return ndi.binary_dilation(edge, iterations=max(0, width - 1)) if width > 1 else edge


def write_overlays(oof: pd.DataFrame, scores: pd.DataFrame, out: str | Path, *, n: int = 12,
                   max_side: int = 512) -> list[Path]:
    """PNG overlays (expert outline green, predicted red, overlap yellow) of up to ``n`` cases; returns the files."""
    from PIL import Image, ImageDraw

    from breastfusion.data.images import float_to_u8, read_image, read_mask

    out = Path(out)
    rows = oof.set_index(oof[CASE_ID].astype(str))
    sc = scores.set_index(scores[CASE_ID].astype(str))
    written = []
    for rank, (cid, tag) in enumerate(_pick(scores, n), start=1):
        r = rows.loc[cid]
        try:
            gray = float_to_u8(read_image(r[IMAGE_PATH], "gray"))
            exp_paths = mask_list(r[EXPERT_MASK])
            truth = read_mask(exp_paths, shape=gray.shape) if exp_paths else np.zeros(gray.shape, bool)
            pred = read_mask(mask_list(r[MASK_PATH]), shape=gray.shape)
        except DataError as exc:
            log.warning("overlay of case '%s' skipped: %s", cid, exc)
            continue
        scale = min(1.0, max_side / max(gray.shape))
        size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
        img = Image.fromarray(gray).resize(size, Image.Resampling.BILINEAR).convert("RGB")
        small = [np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
                 for m in (truth, pred)]
        rgb = np.asarray(img).copy()
        width = max(1, round(max(size) / 256))
        et, ep = _outline(small[0], width), _outline(small[1], width)
        rgb[et] = (0, 220, 0)
        rgb[ep] = (230, 30, 30)
        rgb[et & ep] = (240, 220, 0)
        canvas = Image.fromarray(rgb)
        d = sc.loc[cid]
        text = f"{cid}  Dice {d['dice']:.3f}  ({tag})  green: expert  red: predicted"
        draw = ImageDraw.Draw(canvas)
        draw.rectangle((0, 0, min(size[0], 7 * len(text)), 12), fill=(0, 0, 0))
        draw.text((2, 1), text, fill=(255, 255, 255))
        name = f"{rank:02d}_{tag}_{mask_file_stem(cid).replace('/', '__')}.png"
        with atomic_path(out / name) as tmp:
            canvas.save(tmp, format="PNG")
        written.append(out / name)
    return written


def load_summary(out_dir: str | Path) -> dict:
    """The ``summary.json`` of a finished cross-validation folder."""
    return json.loads((Path(out_dir) / "summary.json").read_text(encoding="utf-8"))

