"""Tests of breastfusion.features.pathomics on SYNTHETIC nuclei (disks and ellipses of known size)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from breastfusion.errors import DataError
from breastfusion.features.pathomics import (
    NUCLEUS_FEATURES,
    aggregate_features,
    case_features,
    nucleus_features,
    tile_feature_names,
    tissue_area_um2,
)

BG = np.array([236, 186, 212], float)
NU = np.array([95, 70, 150], float)


def _tile(centres, radii, shape=(200, 300), seed=0, texture=None):
    """SYNTHETIC H&E tile: purple disks on pink; optional per-nucleus checkerboard chromatin."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    lab = np.zeros(shape, np.int32)
    for k, ((cy, cx), r) in enumerate(zip(centres, radii)):
        lab[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (lab == 0)] = k + 1
    img = np.where(lab[..., None] > 0, NU, BG) + rng.normal(0, 2, (*shape, 3))
    if texture is not None:
        checker = ((yy // 2 + xx // 2) % 2).astype(bool)
        dark = np.isin(lab, texture) & checker
        img[dark] -= 45
    return np.clip(img, 0, 255).astype(np.uint8), lab


def test_disk_area_circularity_and_units():
    mpp = 0.5
    img, lab = _tile([(60, 60), (60, 160), (140, 100)], [20, 12, 16])
    df = nucleus_features(img, lab, mpp=mpp)
    assert list(df["label"]) == [1, 2, 3]
    assert all(c.startswith("path_") for c in df.columns if c not in ("label", "centroid_y_px", "centroid_x_px"))
    assert set(NUCLEUS_FEATURES) <= set(df.columns)
    for r, (_, row) in zip([20, 12, 16], df.iterrows()):
        assert row["path_area_um2"] == pytest.approx(math.pi * r * r * mpp**2, rel=0.03)
        assert row["path_equiv_diameter_um"] == pytest.approx(2 * r * mpp, rel=0.02)
        assert row["path_circularity"] == pytest.approx(1.0, abs=0.08)
        assert row["path_perimeter_um"] == pytest.approx(2 * math.pi * r * mpp, rel=0.05)
        assert row["path_eccentricity"] < 0.2 and row["path_solidity"] > 0.93
        assert row["path_extent"] == pytest.approx(math.pi * r * r / (2 * r + 1) ** 2, abs=0.02)  # bbox is 2r+1 px wide
    assert df.loc[0, "centroid_y_px"] == pytest.approx(60, abs=0.1)
    assert df.loc[0, "centroid_x_px"] == pytest.approx(60, abs=0.1)
    # same objects at twice the pixel size: areas x4, lengths x2
    df2 = nucleus_features(img, lab, mpp=2 * mpp)
    np.testing.assert_allclose(df2["path_area_um2"], 4 * df["path_area_um2"])
    np.testing.assert_allclose(df2["path_major_axis_um"], 2 * df["path_major_axis_um"])


def test_ellipse_shape_features():
    yy, xx = np.mgrid[:120, :120]
    lab = (((yy - 60) / 12.0) ** 2 + ((xx - 60) / 36.0) ** 2 <= 1).astype(np.int32)
    img = np.where(lab[..., None] > 0, NU, BG).astype(np.uint8)
    row = nucleus_features(img, lab, mpp=0.25).iloc[0]
    assert row["path_major_axis_um"] == pytest.approx(2 * 36 * 0.25, rel=0.03)
    assert row["path_minor_axis_um"] == pytest.approx(2 * 12 * 0.25, rel=0.05)
    assert row["path_eccentricity"] == pytest.approx(math.sqrt(1 - (12 / 36) ** 2), abs=0.02)
    assert row["path_circularity"] < 0.85


def test_intensity_texture_and_neighbours():
    # nucleus 2 has checkerboard chromatin, nucleus 1 is uniform
    img, lab = _tile([(50, 50), (50, 150), (150, 250)], [15, 15, 15], texture=[2])
    df = nucleus_features(img, lab, mpp=0.25).set_index("label")
    assert df.loc[2, "path_glcm_contrast"] > 3 * df.loc[1, "path_glcm_contrast"]
    assert df.loc[2, "path_glcm_homogeneity"] < df.loc[1, "path_glcm_homogeneity"]
    assert df.loc[2, "path_glcm_entropy"] > df.loc[1, "path_glcm_entropy"]
    assert df.loc[2, "path_h_std"] > df.loc[1, "path_h_std"]
    assert (df["path_h_mean"] > 0.05).all()
    # centres 100 px = 25 µm apart (1-2), 2-3 are 141 px = 35 µm, 1-3 are 223 px = 56 µm (> 50 µm)
    assert df["path_neighbours_50um"].tolist() == [1.0, 2.0, 1.0]


def test_saturated_and_tiny_nuclei():
    # a black nucleus (haematoxylin OD far beyond the GLCM range) and a 1-pixel nucleus must not break anything
    img, lab = _tile([(50, 50), (50, 150)], [10, 10])
    img[lab == 1] = 0
    lab[120, 200] = 3
    df = nucleus_features(img, lab, mpp=0.25).set_index("label")
    assert df.loc[1, "path_h_mean"] > df.loc[2, "path_h_mean"]
    assert df.loc[1, "path_glcm_contrast"] == pytest.approx(0.0)  # all pixels in the top grey level
    assert np.isfinite(df.loc[3, "path_area_um2"]) and math.isnan(df.loc[3, "path_glcm_contrast"])


def test_empty_labels_give_empty_table_and_nan_aggregate():
    img = np.full((40, 40, 3), 230, np.uint8)
    df = nucleus_features(img, np.zeros((40, 40), np.int32))
    assert len(df) == 0 and set(NUCLEUS_FEATURES) <= set(df.columns)
    agg = aggregate_features(df, area_um2=100.0)
    assert list(agg) == tile_feature_names()
    assert agg["path_count"] == 0 and agg["path_density_per_mm2"] == 0.0
    assert math.isnan(agg["path_area_um2_mean"]) and math.isnan(agg["path_area_um2_cv"])


def test_bad_input_raises():
    img, lab = _tile([(50, 50)], [10])
    with pytest.raises(DataError, match="shape"):
        nucleus_features(img, lab[:-1])
    with pytest.raises(DataError, match="integer"):
        nucleus_features(img, lab.astype(float))
    with pytest.raises(DataError, match="mpp"):
        nucleus_features(img, lab, mpp=-1)
    with pytest.raises(DataError, match="RGB"):
        nucleus_features(img[..., 0], lab)
    with pytest.raises(DataError, match="lacks"):
        aggregate_features(pd.DataFrame({"x": [1]}), area_um2=1.0)


def test_aggregate_stats_and_density():
    img, lab = _tile([(50, 50), (50, 150), (150, 250), (150, 60)], [10, 14, 18, 22])
    df = nucleus_features(img, lab, mpp=0.25)
    agg = aggregate_features(df, area_um2=2_000.0)
    a = df["path_area_um2"].to_numpy()
    assert agg["path_count"] == 4
    assert agg["path_density_per_mm2"] == pytest.approx(4 / 2_000.0 * 1e6)
    assert agg["path_area_um2_mean"] == pytest.approx(a.mean())
    assert agg["path_area_um2_std"] == pytest.approx(a.std(ddof=1))
    assert agg["path_area_um2_cv"] == pytest.approx(a.std(ddof=1) / a.mean())
    assert agg["path_area_um2_q50"] == pytest.approx(np.median(a))
    assert agg["path_area_um2_q10"] < agg["path_area_um2_q50"] < agg["path_area_um2_q90"]
    assert all(k.startswith("path_") for k in agg)
    assert math.isnan(aggregate_features(df, area_um2=None)["path_density_per_mm2"])


def test_pleomorphism_signal_orders_tiles():
    uniform = _tile([(50, 50), (50, 150), (150, 250), (150, 60)], [15, 15, 15, 15])
    pleo = _tile([(50, 50), (50, 150), (150, 250), (150, 60)], [8, 14, 20, 26])
    cv_u = aggregate_features(nucleus_features(*uniform), area_um2=1e4)["path_area_um2_cv"]
    cv_p = aggregate_features(nucleus_features(*pleo), area_um2=1e4)["path_area_um2_cv"]
    assert cv_u < 0.05
    assert cv_p > 0.5


def test_case_features_pools_tables_and_weights_dicts():
    t1 = nucleus_features(*_tile([(50, 50), (50, 150)], [10, 14]))
    t2 = nucleus_features(*_tile([(150, 250), (150, 60), (50, 250)], [18, 22, 12]))
    pooled = case_features([t1, t2], area_um2=[1000.0, 3000.0])
    direct = aggregate_features(pd.concat([t1, t2]), area_um2=4000.0)
    for k, v in direct.items():
        assert pooled[k] == pytest.approx(v, nan_ok=True), k
    assert pooled["path_n_tiles"] == 2 and pooled["path_count"] == 5
    assert pooled["path_density_per_mm2"] == pytest.approx(5 / 4000.0 * 1e6)

    d1, d2 = aggregate_features(t1, area_um2=1000.0), aggregate_features(t2, area_um2=3000.0)
    from_dicts = case_features([d1, d2])
    assert from_dicts["path_count"] == 5 and from_dicts["path_density_per_mm2"] == pytest.approx(1250.0)
    # the mean of the means weighted by counts equals the pooled mean exactly
    assert from_dicts["path_area_um2_mean"] == pytest.approx(direct["path_area_um2_mean"])
    empty = nucleus_features(np.full((20, 20, 3), 230, np.uint8), np.zeros((20, 20), np.int32))
    assert case_features([t1, empty], area_um2=2000.0)["path_count"] == 2
    with pytest.raises(DataError, match="mix"):
        case_features([t1, d1])
    with pytest.raises(DataError, match="areas"):
        case_features([t1, t2], area_um2=[1.0])
    with pytest.raises(DataError):
        case_features([])


def test_tissue_area():
    img = np.full((100, 100, 3), 245, np.uint8)
    img[:50] = [200, 120, 170]
    assert tissue_area_um2(img, mpp=0.5) == pytest.approx(50 * 100 * 0.25)
    assert tissue_area_um2(img.astype(np.float32) / 255, mpp=0.5) == pytest.approx(1250.0)


def test_features_on_segmented_synthetic_tile():
    from breastfusion.features.nuclei import segment_nuclei

    img, _ = _tile([(50, 50), (50, 150), (150, 250), (150, 60)], [14, 14, 14, 14], seed=2)
    img = np.clip(ndi.gaussian_filter(img.astype(float), (1, 1, 0)), 0, 255).astype(np.uint8)
    pred = segment_nuclei(img, mpp=0.25)
    df = nucleus_features(img, pred, mpp=0.25)
    assert len(df) == 4
    np.testing.assert_allclose(df["path_area_um2"], math.pi * 14**2 * 0.0625, rtol=0.1)


def test_glcm_matches_skimage_graycomatrix():
    from skimage.feature import graycomatrix

    from breastfusion.features.pathomics import GLCM_H_RANGE, GLCM_LEVELS

    rng = np.random.default_rng(5)
    img, lab = _tile([(50, 50), (60, 150)], [12, 17], seed=3)
    img = np.clip(img.astype(int) + rng.integers(-60, 60, img.shape), 0, 255).astype(np.uint8)
    df = nucleus_features(img, lab, mpp=0.25).set_index("label")
    from breastfusion.features.nuclei import haematoxylin_od

    h = haematoxylin_od(img)
    lo, hi = GLCM_H_RANGE
    q = np.clip(np.floor((h - lo) / (hi - lo) * GLCM_LEVELS), 0, GLCM_LEVELS - 1).astype(np.uint8) + 1
    for k in (1, 2):
        patch = np.where(lab == k, q, 0).astype(np.uint8)  # 0 = outside, dropped below
        m = graycomatrix(patch, [1], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=GLCM_LEVELS + 1, symmetric=True)
        P = m[1:, 1:, 0, :].sum(axis=2).astype(float)
        P /= P.sum()
        i, j = np.indices(P.shape)
        assert df.loc[k, "path_glcm_contrast"] == pytest.approx((P * (i - j) ** 2).sum())
        assert df.loc[k, "path_glcm_homogeneity"] == pytest.approx((P / (1 + (i - j) ** 2)).sum())
        nz = P[P > 0]
        assert df.loc[k, "path_glcm_entropy"] == pytest.approx(-(nz * np.log2(nz)).sum())


def test_shape_features_equal_regionprops():
    from skimage.measure import regionprops_table

    rng = np.random.default_rng(7)
    lab = np.zeros((120, 160), np.int32)
    yy, xx = np.mgrid[:120, :160]
    for k in range(12):  # overlapping ellipses, later ones overwrite: irregular shapes, non-contiguous ids
        cy, cx, a, b, t = rng.uniform(10, 110), rng.uniform(10, 150), rng.uniform(3, 15), rng.uniform(2, 8), rng.uniform(0, np.pi)
        u = (yy - cy) * np.cos(t) + (xx - cx) * np.sin(t)
        v = -(yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)
        lab[(u / a) ** 2 + (v / b) ** 2 <= 1] = 3 * k + 5
    img = np.where(lab[..., None] > 0, NU, BG).astype(np.uint8)
    df = nucleus_features(img, lab, mpp=1.0)
    ref = pd.DataFrame(regionprops_table(lab, properties=(
        "label", "area", "centroid", "axis_major_length", "axis_minor_length", "eccentricity", "extent",
        "equivalent_diameter_area")))
    np.testing.assert_array_equal(df["label"], ref["label"])
    for ours, theirs in [("path_area_um2", "area"), ("centroid_y_px", "centroid-0"), ("centroid_x_px", "centroid-1"),
                         ("path_major_axis_um", "axis_major_length"), ("path_minor_axis_um", "axis_minor_length"),
                         ("path_eccentricity", "eccentricity"), ("path_extent", "extent"),
                         ("path_equiv_diameter_um", "equivalent_diameter_area")]:
        np.testing.assert_allclose(df[ours], ref[theirs], rtol=1e-6, atol=1e-6, err_msg=ours)
