"""Segmentation quality of a predicted lesion mask against the expert's: Dice, IoU and HD95, with bootstrap CIs.

Conventions (they decide figures, so they are written down):

- Both masks empty (a normal image, correctly left blank): Dice = IoU = 1, HD95 = 0.
- One empty, the other not: Dice = IoU = 0; HD95 is undefined (NaN) and the case is counted in
  ``hd95_undefined`` by :func:`summarise_scores`, never averaged as a number.
- HD95 is the 95th percentile of the symmetric boundary-to-boundary distances (both directions pooled, as
  MONAI's ``compute_hausdorff_distance(percentile=95)`` and the MedSAM challenge do), in pixels, or in
  millimetres when ``spacing_mm`` (isotropic pixel size) is given.
- Confidence intervals are percentile bootstrap intervals over cases; with ``groups`` (patient or duplicate
  group) whole groups are resampled, so near-copies of one lesion do not narrow the interval.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from breastfusion.errors import DataError

METRICS = ("dice", "iou", "hd95")


def _as_bool(mask, what: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise DataError(f"{what} mask must be 2-D; got shape {arr.shape}.")
    return arr.astype(bool)


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndi.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing_mm: float | None = None) -> float:
    """95th percentile symmetric Hausdorff distance between two non-empty masks (pixels, or mm with spacing)."""
    bp, bt = _boundary(pred), _boundary(truth)
    if not bp.any() or not bt.any():
        return math.nan
    dt_t = ndi.distance_transform_edt(~bt)
    dt_p = ndi.distance_transform_edt(~bp)
    d = np.concatenate([dt_t[bp], dt_p[bt]])
    value = float(np.percentile(d, 95))
    return value * float(spacing_mm) if spacing_mm else value


def segmentation_scores(pred, truth, spacing_mm: float | None = None) -> dict:
    """Dice, IoU and HD95 of one case. ``pred`` and ``truth`` are same-shape 2-D masks (non-zero = lesion)."""
    p, t = _as_bool(pred, "predicted"), _as_bool(truth, "expert")
    if p.shape != t.shape:
        raise DataError(f"predicted mask {p.shape} and expert mask {t.shape} differ in size.")
    if spacing_mm is not None and not (isinstance(spacing_mm, (int, float)) and spacing_mm > 0):
        raise DataError(f"spacing_mm must be a positive number; got {spacing_mm!r}.")
    np_, nt = int(p.sum()), int(t.sum())
    if np_ == 0 and nt == 0:
        return {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "pred_empty": True, "truth_empty": True}
    inter = int(np.logical_and(p, t).sum())
    union = np_ + nt - inter
    out = {"dice": 2.0 * inter / (np_ + nt), "iou": inter / union,
           "hd95": hd95(p, t, spacing_mm) if np_ and nt else math.nan,
           "pred_empty": np_ == 0, "truth_empty": nt == 0}
    return out


def _bootstrap_ci(values: np.ndarray, groups: np.ndarray | None, n_boot: int, rng: np.random.Generator):
    if len(values) == 0 or n_boot <= 0:
        return (math.nan, math.nan)
    if groups is None:
        idx = rng.integers(0, len(values), size=(n_boot, len(values)))
        stats = values[idx].mean(axis=1)
    else:
        uniq, inv = np.unique(groups, return_inverse=True)
        sums = np.bincount(inv, weights=values, minlength=len(uniq))
        counts = np.bincount(inv, minlength=len(uniq)).astype(float)
        pick = rng.integers(0, len(uniq), size=(n_boot, len(uniq)))
        stats = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return (float(lo), float(hi))


def summarise_scores(scores: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0, groups=None) -> dict:
    """Mean, median and 95 % bootstrap CI of each metric over cases.

    ``scores`` has one row per case with columns ``dice``, ``iou``, ``hd95`` (as from :func:`segmentation_scores`);
    ``groups`` (array-like aligned with the rows, or the name of a column) makes the bootstrap resample groups.
    HD95 is summarised over the cases where it is defined; ``hd95_undefined`` counts the others.
    """
    if isinstance(groups, str):
        if groups not in scores.columns:
            raise DataError(f"summarise_scores: no column '{groups}' for the bootstrap groups.")
        groups = scores[groups].to_numpy()
    elif groups is not None:
        groups = np.asarray(groups)
        if len(groups) != len(scores):
            raise DataError(f"summarise_scores: {len(groups)} groups for {len(scores)} cases.")
    out: dict = {"n_cases": len(scores)}
    for m in METRICS:
        if m not in scores.columns:
            continue
        v = scores[m].to_numpy(dtype=float)
        ok = np.isfinite(v)
        g = groups[ok] if groups is not None else None
        rng = np.random.default_rng(seed)
        out[m] = {"mean": float(v[ok].mean()) if ok.any() else math.nan,
                  "median": float(np.median(v[ok])) if ok.any() else math.nan,
                  "ci95": list(_bootstrap_ci(v[ok], g, n_boot, rng)), "n": int(ok.sum())}
    if "hd95" in scores.columns:
        out["hd95_undefined"] = int((~np.isfinite(scores["hd95"].to_numpy(dtype=float))).sum())
    for flag in ("pred_empty", "truth_empty"):
        if flag in scores.columns:
            out[f"n_{flag}"] = int(scores[flag].astype(bool).sum())
    if groups is not None:
        out["n_groups"] = len(np.unique(groups))
    return out


def format_summary(summary: dict, unit: str = "px") -> str:
    """One line: 'Dice 0.81 (0.78-0.83) · IoU ... · HD95 12.3 px (...)' for logs and reports."""
    parts = []
    for m, label in (("dice", "Dice"), ("iou", "IoU"), ("hd95", "HD95")):
        s = summary.get(m)
        if not s:
            continue
        lo, hi = s["ci95"]
        fmt = "{:.1f}" if m == "hd95" else "{:.3f}"
        suffix = f" {unit}" if m == "hd95" else ""
        parts.append(f"{label} {fmt.format(s['mean'])}{suffix} ({fmt.format(lo)}–{fmt.format(hi)})")
    return " · ".join(parts)
