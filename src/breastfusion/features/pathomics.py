"""Per-nucleus morphometry and chromatin texture ("pathomics") and their per-tile and per-case summaries.

Nuclear pleomorphism (variation of size and shape) and nuclear density are two of the signals a pathologist uses
for the Nottingham grade. They are measured here from an instance label image (e.g. from
:func:`breastfusion.features.nuclei.segment_nuclei`) and the H&E tile it came from:

* :func:`nucleus_features` → one row per nucleus: ``label``, centroid (pixels), and the features in
  :data:`NUCLEUS_FEATURES` (all prefixed ``path_``; lengths in µm, areas in µm², using ``mpp``);
* :func:`aggregate_features` → one dict per tile: ``path_count``, ``path_density_per_mm2``,
  ``path_tissue_area_um2`` and, for every nucleus feature, ``_mean``, ``_std``, ``_cv``, ``_q10``, ``_q50``,
  ``_q90`` (e.g. ``path_area_um2_cv`` is anisonucleosis);
* :func:`case_features` → the same names per case, from several tiles' nucleus tables (exact pooling) or tile
  dicts (count-weighted), plus ``path_n_tiles``.

Conventions: an empty label image gives an empty nucleus table (with all columns) and a tile dict with
``path_count = 0``, density 0 and NaN statistics; statistics of a single nucleus have NaN std/cv. A label
image whose shape differs from the RGB tile, non-integer labels or a bad ``mpp`` raise DataError.

Edge effects: nuclei cut by the tile border are measured as they appear, and ``path_neighbours_50um`` counts
only neighbours inside the tile, so it is lower near the border.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.measure import regionprops_table

from breastfusion.errors import DataError
from breastfusion.features.nuclei.classical import haematoxylin_od

__all__ = [
    "NUCLEUS_FEATURES",
    "STATS",
    "aggregate_features",
    "case_features",
    "nucleus_features",
    "tile_feature_names",
    "tissue_area_um2",
]

NUCLEUS_FEATURES: tuple[str, ...] = (
    "path_area_um2",
    "path_perimeter_um",
    "path_equiv_diameter_um",
    "path_major_axis_um",
    "path_minor_axis_um",
    "path_eccentricity",
    "path_solidity",
    "path_extent",
    "path_circularity",
    "path_h_mean",
    "path_h_std",
    "path_glcm_contrast",
    "path_glcm_homogeneity",
    "path_glcm_entropy",
    "path_neighbours_50um",
)
ID_COLUMNS: tuple[str, ...] = ("label", "centroid_y_px", "centroid_x_px")
STATS: tuple[str, ...] = ("mean", "std", "cv", "q10", "q50", "q90")

NEIGHBOUR_RADIUS_UM = 50.0
GLCM_LEVELS = 16
# Haematoxylin OD (rgb2hed units) mapped onto the GLCM grey levels; nuclei on MoNuSeg lie in about 0.03-0.25.
GLCM_H_RANGE = (0.0, 0.25)


def tile_feature_names() -> list[str]:
    """Names, in order, of the keys of an :func:`aggregate_features` dict."""
    names = ["path_count", "path_density_per_mm2", "path_tissue_area_um2"]
    for f in NUCLEUS_FEATURES:
        names += [f"{f}_{s}" for s in STATS]
    return names


def _check_mpp(mpp) -> float:
    if not (isinstance(mpp, (int, float, np.floating)) and math.isfinite(mpp) and mpp > 0):
        raise DataError(f"mpp must be a positive number of microns per pixel; got {mpp!r}.")
    return float(mpp)


def _check_labels(labels: np.ndarray, shape: tuple[int, int] | None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise DataError(f"Nucleus labels must be a 2-D label image; got shape {labels.shape}.")
    if shape is not None and labels.shape != tuple(shape):
        raise DataError(
            f"Nucleus labels have shape {labels.shape} but the H&E tile is {tuple(shape)}; they must match."
        )
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"Nucleus labels must be an integer label image (0 = background); got dtype {labels.dtype}.")
    if labels.size and labels.min() < 0:
        raise DataError("Nucleus labels must be >= 0.")
    return labels.astype(np.int32, copy=False)


def tissue_area_um2(rgb: np.ndarray, *, mpp: float = 0.25, white: float = 0.85) -> float:
    """Area (µm²) of the pixels that are tissue, i.e. not near-white background (mean RGB < ``white``·255)."""
    mpp = _check_mpp(mpp)
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise DataError(f"tissue_area_um2 needs an (H, W, 3) RGB image; got shape {rgb.shape}.")
    scale = 255.0 if rgb.dtype == np.uint8 else 1.0
    grey = rgb[..., :3].astype(np.float32).mean(axis=2) / scale
    return float(np.count_nonzero(grey < white)) * mpp * mpp


def _empty_table() -> pd.DataFrame:
    cols = {c: pd.Series(dtype="int32" if c == "label" else "float64") for c in ID_COLUMNS}
    cols.update({f: pd.Series(dtype="float64") for f in NUCLEUS_FEATURES})
    return pd.DataFrame(cols)


def _glcm_features(h: np.ndarray, labels: np.ndarray, ids: np.ndarray, levels: int, h_range: tuple[float, float]):
    """GLCM contrast, homogeneity and entropy of the haematoxylin inside each nucleus.

    Same co-occurrence matrix as ``skimage.feature.graycomatrix(..., distances=[1], angles=[0, π/4, π/2, 3π/4],
    symmetric=True)`` summed over the 4 angles, but counting only pairs whose two pixels both lie in the same
    nucleus, and computed for every nucleus at once with one ``bincount`` per direction.
    Nuclei without any such pair (a single pixel) get NaN.
    """
    lo, hi = h_range
    q = np.floor((h.astype(np.float64) - lo) / (hi - lo) * levels)
    q = np.clip(q, 0, levels - 1).astype(np.int64)
    n = len(ids)
    lut = np.zeros(int(labels.max()) + 1, dtype=np.int64)
    lut[ids] = np.arange(n)
    L2 = levels * levels
    counts = np.zeros(n * L2, dtype=np.float64)
    H, W = labels.shape
    # (dy, dx) for angles 0, π/4, π/2, 3π/4; with symmetric counting the sign of the offset does not matter
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
        a_sl = (slice(0, H - dy), slice(max(0, -dx), W - max(0, dx)))
        b_sl = (slice(dy, H), slice(max(0, dx), W - max(0, -dx)))
        la, lb = labels[a_sl], labels[b_sl]
        same = (la == lb) & (la > 0)
        k = lut[la[same]] * L2
        qa, qb = q[a_sl][same], q[b_sl][same]
        counts += np.bincount(k + qa * levels + qb, minlength=n * L2)
        counts += np.bincount(k + qb * levels + qa, minlength=n * L2)
    P = counts.reshape(n, levels, levels)
    tot = P.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        P = P / tot[:, None, None]
        ii, jj = np.meshgrid(np.arange(levels), np.arange(levels), indexing="ij")
        contrast = (P * (ii - jj) ** 2).sum(axis=(1, 2))
        homog = (P * (1.0 / (1.0 + (ii - jj) ** 2))).sum(axis=(1, 2))
        logp = np.where(P > 0, np.log2(np.where(P > 0, P, 1.0)), 0.0)
        entropy = -(P * logp).sum(axis=(1, 2))
    empty = tot == 0
    for arr in (contrast, homog, entropy):
        arr[empty] = np.nan
    return contrast, homog, entropy


def _moment_features(labels: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Area, centroid, ellipse axes, eccentricity and extent of every label in ``ids``, with the same definitions
    as ``skimage.measure.regionprops`` (axes = 4·sqrt of the eigenvalues of the pixel-coordinate covariance),
    computed with one bincount per moment instead of a Python loop over objects."""
    nmax = int(ids.max()) + 1
    flat = labels.ravel()
    yy, xx = np.indices(labels.shape, dtype=np.float64)
    y, x = yy.ravel(), xx.ravel()

    def bsum(w=None):
        return np.bincount(flat, weights=w, minlength=nmax)[ids].astype(np.float64)

    n = bsum()
    my, mx = bsum(y) / n, bsum(x) / n
    vyy = np.maximum(bsum(y * y) / n - my * my, 0.0)
    vxx = np.maximum(bsum(x * x) / n - mx * mx, 0.0)
    vxy = bsum(x * y) / n - mx * my
    half_tr = (vyy + vxx) / 2.0
    disc = np.sqrt(np.maximum(((vyy - vxx) / 2.0) ** 2 + vxy**2, 0.0))
    l1, l2 = half_tr + disc, np.maximum(half_tr - disc, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ecc = np.where(l1 > 0, np.sqrt(np.clip(1.0 - l2 / l1, 0.0, 1.0)), 0.0)
    boxes = ndi.find_objects(labels)
    box_area = np.array([(sl[0].stop - sl[0].start) * (sl[1].stop - sl[1].start) for sl in (boxes[i - 1] for i in ids)], dtype=np.float64)
    return {"area": n, "cy": my, "cx": mx, "major": 4.0 * np.sqrt(l1), "minor": 4.0 * np.sqrt(l2),
            "eccentricity": ecc, "extent": n / box_area}


def nucleus_features(
    rgb: np.ndarray,
    labels: np.ndarray,
    *,
    mpp: float = 0.25,
    h: np.ndarray | None = None,
    glcm_levels: int = GLCM_LEVELS,
    glcm_h_range: tuple[float, float] = GLCM_H_RANGE,
    neighbour_radius_um: float = NEIGHBOUR_RADIUS_UM,
) -> pd.DataFrame:
    """One row per nucleus of ``labels`` with ``label``, ``centroid_y_px``, ``centroid_x_px`` and
    :data:`NUCLEUS_FEATURES`.

    ``rgb`` is the H&E tile (uint8, or float in [0, 1]); ``h`` may pass its haematoxylin OD when already
    computed. Morphology: ``regionprops`` definitions; the perimeter is the Crofton estimate (within ~2-4% of 2πr for
    digital disks of radius >= 10 px), so circularity 4πA/P² is about 0.92-0.99 for a disk, lower for tiny ones.
    Intensity: mean and standard deviation of haematoxylin OD in the nucleus. Texture: GLCM inside the nucleus
    on ``glcm_levels`` grey levels over ``glcm_h_range`` OD. Density: number of other nucleus centroids within
    ``neighbour_radius_um`` (default 50 µm).
    """
    mpp = _check_mpp(mpp)
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise DataError(f"nucleus_features needs an (H, W, 3) RGB tile; got shape {rgb.shape}.")
    labels = _check_labels(labels, rgb.shape[:2])
    if not labels.any():
        return _empty_table()
    if h is None:
        h = haematoxylin_od(rgb)
    elif h.shape != labels.shape:
        raise DataError(f"Haematoxylin image has shape {h.shape} but labels are {labels.shape}.")
    # Costly per-object properties from skimage; moments, centroids and boxes vectorised below.
    props = regionprops_table(labels, properties=("label", "perimeter_crofton", "solidity"))
    ids = props["label"]
    shape = _moment_features(labels, ids)
    # Intensity mean / std per label, vectorised.
    flat_l = labels.ravel()
    flat_h = h.ravel().astype(np.float64)
    nmax = int(ids.max()) + 1
    cnt = np.bincount(flat_l, minlength=nmax)[ids].astype(np.float64)
    s1 = np.bincount(flat_l, weights=flat_h, minlength=nmax)[ids]
    s2 = np.bincount(flat_l, weights=flat_h * flat_h, minlength=nmax)[ids]
    h_mean = s1 / cnt
    h_std = np.sqrt(np.maximum(s2 / cnt - h_mean**2, 0.0))
    contrast, homog, entropy = _glcm_features(h, labels, ids, glcm_levels, glcm_h_range)

    area_px = shape["area"]
    perim_px = props["perimeter_crofton"].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        circ = np.where(perim_px > 0, 4.0 * np.pi * area_px / perim_px**2, np.nan)
    cy, cx = shape["cy"], shape["cx"]
    tree = cKDTree(np.c_[cy, cx] * mpp)
    neighbours = tree.query_ball_point(np.c_[cy, cx] * mpp, r=neighbour_radius_um, return_length=True) - 1

    df = pd.DataFrame(
        {
            "label": ids.astype(np.int32),
            "centroid_y_px": cy,
            "centroid_x_px": cx,
            "path_area_um2": area_px * mpp * mpp,
            "path_perimeter_um": perim_px * mpp,
            "path_equiv_diameter_um": np.sqrt(4.0 * area_px / np.pi) * mpp,
            "path_major_axis_um": shape["major"] * mpp,
            "path_minor_axis_um": shape["minor"] * mpp,
            "path_eccentricity": shape["eccentricity"],
            "path_solidity": props["solidity"].astype(np.float64),
            "path_extent": shape["extent"],
            "path_circularity": circ,
            "path_h_mean": h_mean,
            "path_h_std": h_std,
            "path_glcm_contrast": contrast,
            "path_glcm_homogeneity": homog,
            "path_glcm_entropy": entropy,
            "path_neighbours_50um": np.asarray(neighbours, dtype=np.float64),
        }
    )
    return df


def _stats(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {s: math.nan for s in STATS}
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if v.size > 1 else math.nan
    cv = std / abs(mean) if v.size > 1 and mean != 0 else math.nan
    q10, q50, q90 = (float(x) for x in np.quantile(v, [0.1, 0.5, 0.9]))
    return {"mean": mean, "std": std, "cv": cv, "q10": q10, "q50": q50, "q90": q90}


def aggregate_features(nuclei: pd.DataFrame, *, area_um2: float | None) -> dict[str, float]:
    """Summarise one tile's nucleus table into :func:`tile_feature_names` keys.

    ``area_um2`` is the tissue area the nuclei were counted in (e.g. :func:`tissue_area_um2`); the density is
    ``count / area`` per mm². ``None`` gives a NaN density. An empty table gives count 0 and NaN statistics.
    Standard deviations use ddof=1; ``_cv`` is std / |mean|.
    """
    if not isinstance(nuclei, pd.DataFrame):
        raise DataError(f"aggregate_features needs a nucleus DataFrame; got {type(nuclei).__name__}.")
    missing = [f for f in NUCLEUS_FEATURES if f not in nuclei.columns]
    if missing:
        raise DataError(f"Nucleus table lacks column(s) {missing}; build it with nucleus_features().")
    if area_um2 is not None and not (math.isfinite(area_um2) and area_um2 >= 0):
        raise DataError(f"area_um2 must be a non-negative number of µm²; got {area_um2!r}.")
    n = len(nuclei)
    out: dict[str, float] = {"path_count": float(n)}
    if area_um2 is None:
        out["path_density_per_mm2"] = math.nan
        out["path_tissue_area_um2"] = math.nan
    else:
        out["path_density_per_mm2"] = n / (area_um2 / 1e6) if area_um2 > 0 else (0.0 if n == 0 else math.nan)
        out["path_tissue_area_um2"] = float(area_um2)
    for f in NUCLEUS_FEATURES:
        for s, v in _stats(nuclei[f].to_numpy()).items():
            out[f"{f}_{s}"] = v
    return out


def case_features(tiles: Sequence[pd.DataFrame] | Sequence[dict], *, area_um2: Sequence[float] | float | None = None) -> dict[str, float]:
    """Features of one case from its tiles, with the same names as :func:`aggregate_features` plus
    ``path_n_tiles``.

    * Nucleus tables (one DataFrame per tile): pooled exactly — all nuclei are concatenated and summarised;
      ``area_um2`` gives each tile's tissue area (a sequence) or the case total (a number).
    * Tile dicts (from :func:`aggregate_features`): counts and areas are summed, density is total count over
      total area, and every other statistic is the count-weighted mean of the tiles' values (quantiles of
      pooled nuclei cannot be recovered from per-tile quantiles, so this is an approximation; prefer tables).
    """
    tiles = list(tiles)
    if not tiles:
        raise DataError("case_features needs at least one tile (nucleus table or tile dict).")
    if all(isinstance(t, pd.DataFrame) for t in tiles):
        if area_um2 is None:
            total = None
        elif isinstance(area_um2, (int, float, np.floating)):
            total = float(area_um2)
        else:
            areas = list(area_um2)
            if len(areas) != len(tiles):
                raise DataError(f"case_features got {len(tiles)} nucleus tables but {len(areas)} tile areas.")
            total = float(np.sum(areas))
        nonempty = [t for t in tiles if len(t)]
        pooled = pd.concat(nonempty, ignore_index=True) if nonempty else _empty_table()
        out = aggregate_features(pooled, area_um2=total)
        out["path_n_tiles"] = float(len(tiles))
        return out
    if all(isinstance(t, dict) for t in tiles):
        return _combine_tile_dicts(tiles)
    raise DataError("case_features needs either all nucleus DataFrames or all tile dicts, not a mix.")


def _combine_tile_dicts(tiles: Iterable[dict]) -> dict[str, float]:
    tiles = list(tiles)
    names = tile_feature_names()
    for i, t in enumerate(tiles):
        missing = [k for k in names if k not in t]
        if missing:
            raise DataError(f"Tile dict {i} lacks key(s) {missing[:5]}{'...' if len(missing) > 5 else ''}.")
    counts = np.array([t["path_count"] for t in tiles], dtype=np.float64)
    areas = np.array([t["path_tissue_area_um2"] for t in tiles], dtype=np.float64)
    total_n = float(counts.sum())
    out: dict[str, float] = {"path_count": total_n}
    if np.isfinite(areas).all():
        total_a = float(areas.sum())
        out["path_density_per_mm2"] = total_n / (total_a / 1e6) if total_a > 0 else (0.0 if total_n == 0 else math.nan)
        out["path_tissue_area_um2"] = total_a
    else:
        out["path_density_per_mm2"] = math.nan
        out["path_tissue_area_um2"] = math.nan
    for k in names[3:]:
        vals = np.array([t[k] for t in tiles], dtype=np.float64)
        ok = np.isfinite(vals) & (counts > 0)
        w = counts[ok]
        out[k] = float(np.average(vals[ok], weights=w)) if ok.any() and w.sum() > 0 else math.nan
    out["path_n_tiles"] = float(len(tiles))
    return out
