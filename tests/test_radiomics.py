"""Tests of breastfusion.features.radiomics on small synthetic images (and 5 BUSI cases when ../shared is there)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest
from conftest import write_png

from breastfusion.errors import DataError
from breastfusion.features import radiomics as rad

R = 20  # radius of the synthetic lesion, pixels


def _disk(shape=(96, 96), center=(48, 48), r=R) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= r * r


@pytest.fixture
def disk_case(tmp_path):
    """SYNTHETIC: a dark disk (grey 60) on a brighter noisy background (grey ~170), and its mask."""
    rng = np.random.default_rng(0)
    mask = _disk()
    img = np.where(mask, 60, 170) + rng.integers(-8, 9, size=mask.shape)
    image_path = write_png(tmp_path / "disk.png", img.astype(np.uint8))
    mask_path = write_png(tmp_path / "disk_mask.png", (mask * 255).astype(np.uint8))
    return image_path, mask_path


def _cases(rows):
    return pd.DataFrame(rows, columns=["case_id", "image_path", "mask_path"])


def test_feature_names_fixed_and_prefixed():
    names = rad.feature_names()
    assert names == rad.feature_names()  # stable
    assert len(names) == len(set(names)) and len(names) >= 90
    assert all(n.startswith("rad_original_") for n in names)
    for cls in ("shape2D", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm"):
        assert any(n.startswith(f"rad_original_{cls}_") for n in names), cls
    assert rad.radiomics_columns()[:3] == ["rad_mask_available", "rad_lesion_present", "rad_n_lesions"]
    assert "rad_original_shape2D_PixelSurface" in names


def test_disk_shape_and_intensity(disk_case):
    image_path, mask_path = disk_case
    row = rad.extract_case(image_path, str(mask_path))
    assert list(row) == rad.radiomics_columns()
    assert row["rad_mask_available"] == 1 and row["rad_lesion_present"] == 1 and row["rad_n_lesions"] == 1
    assert row["rad_original_shape2D_PixelSurface"] == pytest.approx(math.pi * R**2, rel=0.02)
    assert row["rad_original_shape2D_Elongation"] == pytest.approx(1.0, abs=0.02)
    # Marching squares on a pixelated circle overestimates the perimeter by ~7 %.
    assert row["rad_original_shape2D_Perimeter"] == pytest.approx(2 * math.pi * R, rel=0.1)
    assert row["rad_original_shape2D_MaximumDiameter"] == pytest.approx(2 * R, rel=0.05)
    # The image is read on the [0, 255] scale: the lesion's grey level (60 +- 8) comes back as is.
    assert row["rad_original_firstorder_Mean"] == pytest.approx(60, abs=1.0)
    assert row["rad_original_firstorder_Range"] <= 16
    lesion = [v for k, v in row.items() if k.startswith("rad_original_")]
    assert np.isfinite(lesion).sum() >= len(lesion) - 2


def test_elongated_ellipse_is_not_round(tmp_path):
    """SYNTHETIC: an ellipse with semi-axes 30 and 10 pixels."""
    yy, xx = np.mgrid[:96, :96]
    mask = ((yy - 48) / 10.0) ** 2 + ((xx - 48) / 30.0) ** 2 <= 1
    img = np.where(mask, 50, 150).astype(np.uint8)
    row = rad.extract_case(write_png(tmp_path / "e.png", img), [write_png(tmp_path / "e_m.png", mask)])
    assert row["rad_original_shape2D_Elongation"] == pytest.approx(10 / 30, abs=0.03)
    assert row["rad_original_shape2D_PixelSurface"] == pytest.approx(math.pi * 30 * 10, rel=0.03)


def test_empty_and_tiny_masks_mean_no_lesion(disk_case, tmp_path, caplog):
    image_path, _ = disk_case
    empty = write_png(tmp_path / "empty.png", np.zeros((96, 96), np.uint8))
    one_pixel = np.zeros((96, 96), np.uint8)
    one_pixel[10, 10] = 255
    tiny = write_png(tmp_path / "tiny.png", one_pixel)
    for masks in ([empty], "", []):
        row = rad.extract_case(image_path, masks)
        assert row["rad_mask_available"] == 1 and row["rad_lesion_present"] == 0 and row["rad_n_lesions"] == 0
        assert all(math.isnan(row[n]) for n in rad.feature_names())
    with caplog.at_level(logging.WARNING, logger="breastfusion.features.radiomics"):
        row = rad.extract_case(image_path, [tiny])
    assert row["rad_lesion_present"] == 0 and math.isnan(row["rad_original_shape2D_PixelSurface"])
    assert "treated as no lesion" in caplog.text


def test_unknown_mask_is_all_nan(disk_case):
    image_path, _ = disk_case
    for value in (None, float("nan")):
        row = rad.extract_case(image_path, value)
        assert row["rad_mask_available"] == 0
        assert all(math.isnan(v) for k, v in row.items() if k != "rad_mask_available")


def test_several_masks_union_and_count(tmp_path):
    """SYNTHETIC: two disjoint disks in two mask files (BUSI's _mask and _mask_1)."""
    a, b = _disk(center=(30, 30), r=10), _disk(center=(66, 66), r=12)
    img = np.where(a | b, 40, 160).astype(np.uint8)
    image_path = write_png(tmp_path / "two.png", img)
    ma = write_png(tmp_path / "two_mask.png", a)
    mb = write_png(tmp_path / "two_mask_1.png", b)
    row = rad.extract_case(image_path, f"{ma};{mb}")
    assert row["rad_n_lesions"] == 2
    assert row["rad_original_shape2D_PixelSurface"] == (a | b).sum()


def test_mask_size_mismatch_names_the_mask(disk_case, tmp_path):
    image_path, _ = disk_case
    wrong = write_png(tmp_path / "wrong_size_mask.png", _disk(shape=(80, 96), center=(40, 48)))
    with pytest.raises(DataError, match="wrong_size_mask.png"):
        rad.extract_case(image_path, [wrong])


def test_cache_hit_skips_extraction(disk_case, tmp_path, monkeypatch):
    image_path, mask_path = disk_case
    cases = _cases([("c1", str(image_path), str(mask_path)), ("c2", str(image_path), "")])
    calls = []
    real = rad.extract_case
    monkeypatch.setattr(rad, "extract_case", lambda *a: calls.append(a) or real(*a))
    first = rad.extract_radiomics(cases, cache_dir=tmp_path / "cache", progress=False)
    assert len(calls) == 2
    second = rad.extract_radiomics(cases, cache_dir=tmp_path / "cache", progress=False)
    assert len(calls) == 2  # every case came from the cache
    pd.testing.assert_frame_equal(first, second)
    assert list(first.columns) == rad.radiomics_columns() and first.index.name == "case_id"
    # Changing the extractor version invalidates the cache.
    monkeypatch.setattr(rad, "RADIOMICS_VERSION", rad.RADIOMICS_VERSION + "-test")
    rad.extract_radiomics(cases, cache_dir=tmp_path / "cache", progress=False)
    assert len(calls) == 4


def test_corrupt_image_is_skipped_in_batch(disk_case, tmp_path, caplog):
    image_path, mask_path = disk_case
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(image_path.read_bytes()[:200])  # truncated PNG
    cases = _cases([
        ("good", str(image_path), str(mask_path)),
        ("bad", str(corrupt), str(mask_path)),
        ("no_mask", str(image_path), np.nan),
    ])
    with caplog.at_level(logging.WARNING, logger="breastfusion.features.radiomics"):
        table = rad.extract_radiomics(cases, cache_dir=tmp_path / "cache", progress=False)
    assert list(table.index) == ["good", "bad", "no_mask"]
    assert table.loc["bad"].isna().all()
    assert "bad" in table.attrs["radiomics_errors"] and "corrupt.png" in table.attrs["radiomics_errors"]["bad"]
    assert "skipped case 'bad'" in caplog.text
    assert table.loc["good", "rad_lesion_present"] == 1
    assert table.loc["good", "rad_original_shape2D_PixelSurface"] == pytest.approx(math.pi * R**2, rel=0.02)
    assert table.loc["no_mask", "rad_mask_available"] == 0
    with pytest.raises(DataError, match="corrupt"):
        rad.extract_case(corrupt, [mask_path])


def test_every_case_failing_raises(tmp_path):
    cases = _cases([("x", str(tmp_path / "missing.png"), "")])
    with pytest.raises(DataError, match="missing.png"):
        rad.extract_radiomics(cases, progress=False)


def test_parallel_matches_serial(disk_case, tmp_path):
    image_path, mask_path = disk_case
    cases = _cases([("a", str(image_path), str(mask_path)), ("b", str(image_path), ""), ("c", str(image_path), str(mask_path))])
    serial = rad.extract_radiomics(cases, progress=False)
    parallel = rad.extract_radiomics(cases, n_jobs=2, cache_dir=tmp_path / "cache", progress=False)
    pd.testing.assert_frame_equal(serial, parallel)


@pytest.mark.realdata
def test_busi_five_cases(busi_root, tmp_path):
    from breastfusion.data.importers import import_busi

    cases = import_busi(busi_root)
    multi = cases[cases["mask_path"].str.count(";") >= 1].head(1)
    pick = pd.concat([
        cases[cases["label"] == "benign"].head(2), cases[cases["label"] == "malignant"].head(1),
        cases[cases["label"] == "normal"].head(1), multi,
    ])
    table = rad.extract_radiomics(pick, cache_dir=tmp_path, progress=False)
    assert table.shape == (len(pick), len(rad.radiomics_columns()))
    assert not table.attrs["radiomics_errors"]
    lesion = pick["label"].ne("normal").to_numpy()
    assert (table["rad_lesion_present"].to_numpy() == lesion).all()
    assert table.loc[lesion, rad.feature_names()].notna().all().all()
    assert table.loc[~lesion, rad.feature_names()].isna().all().all()
    if len(multi):
        assert table.loc[multi["case_id"].iloc[0], "rad_n_lesions"] >= 2
