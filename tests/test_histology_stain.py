"""Stain normalisation and HED augmentation.

Synthetic H&E images here are made with the Beer-Lambert law from chosen stain vectors (labelled synthetic);
the real-data test uses the tiatoolbox H&E target and a BreakHis image from ../shared/data when present.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from conftest import require_shared

from breastfusion.data.stain import (
    StainAugment,
    StainNormalizer,
    hed_to_rgb,
    rgb_to_hed,
)
from breastfusion.errors import ConfigError, DataError

# Typical H&E optical-density stain vectors (columns: haematoxylin, eosin), and a "shifted" scanner/lab.
HE_TARGET = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])
HE_SOURCE = np.array([[0.45, 0.20], [0.80, 0.90], [0.40, 0.38]])


def synthetic_he(stains: np.ndarray, seed: int, size: int = 96, background: float = 0.3,
                 scale=(1.0, 1.0)) -> np.ndarray:
    """SYNTHETIC H&E-like tile: random nuclei (H) and stroma (E) concentrations, some white background."""
    rng = np.random.default_rng(seed)
    stains = stains / np.linalg.norm(stains, axis=0, keepdims=True)
    yy, xx = np.mgrid[:size, :size]
    h = np.zeros((size, size))
    for _ in range(size // 6):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(2, 5)
        h += 1.2 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    e = 0.5 + 0.3 * np.sin(xx / 7.0 + rng.uniform(0, 6)) * np.cos(yy / 9.0)
    conc = np.stack([h * scale[0], e * scale[1]], axis=-1)
    bg = np.zeros((size, size), dtype=bool)
    bg[: int(background * size), :] = True  # top band is glass
    conc[bg] = 0
    od = conc @ stains.T + rng.normal(0, 0.01, size=(size, size, 3))
    rgb = 240.0 * np.exp(-np.clip(od, 0, None))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _stain_matrix(img: np.ndarray) -> np.ndarray:
    return np.asarray(StainNormalizer("macenko", img).params_["stain_matrix"])


def _lab_means(img: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(img).reshape(-1, 3).mean(0)


def test_macenko_moves_stain_vectors_toward_target():
    target = synthetic_he(HE_TARGET, seed=1)
    source = synthetic_he(HE_SOURCE, seed=2, scale=(1.6, 0.6))
    norm = StainNormalizer("macenko", target)
    out = norm.transform(source)
    assert out.shape == source.shape and out.dtype == np.uint8
    t, s, o = _stain_matrix(target), _stain_matrix(source), _stain_matrix(out)
    d_before, d_after = np.abs(s - t).max(), np.abs(o - t).max()
    assert d_before > 0.1  # the synthetic source really is stained differently
    assert d_after < 0.35 * d_before, (d_before, d_after)
    # Colour statistics move toward the target's too.
    lab_t = _lab_means(target)
    assert np.abs(_lab_means(out) - lab_t).sum() < 0.5 * np.abs(_lab_means(source) - lab_t).sum()


def test_reinhard_matches_lab_statistics():
    target = synthetic_he(HE_TARGET, seed=3)
    source = synthetic_he(HE_SOURCE, seed=4, scale=(1.4, 0.7))
    out = StainNormalizer("reinhard", target).transform(source)
    before = np.abs(_lab_means(source) - _lab_means(target))
    after = np.abs(_lab_means(out) - _lab_means(target))
    assert after.sum() < 0.3 * before.sum(), (before, after)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_to_dict_round_trip_is_json_and_identical(method):
    target = synthetic_he(HE_TARGET, seed=5)
    tile = synthetic_he(HE_SOURCE, seed=6)
    a = StainNormalizer(method, target)
    d = json.loads(json.dumps(a.to_dict()))
    b = StainNormalizer.from_dict(d)
    assert b.method == method and b.to_dict() == a.to_dict()
    np.testing.assert_array_equal(a.transform(tile), b.transform(tile))


def test_from_dict_rejects_bad_parameters():
    d = StainNormalizer("macenko", synthetic_he(HE_TARGET, seed=5)).to_dict()
    d["params"]["stain_matrix"] = [[1.0, 2.0]]
    with pytest.raises(DataError, match="stain_matrix"):
        StainNormalizer.from_dict(d)
    with pytest.raises(DataError, match="not fitted"):
        StainNormalizer("macenko").transform(synthetic_he(HE_SOURCE, seed=1))
    with pytest.raises(ConfigError, match="method"):
        StainNormalizer("vahadane")


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_background_tile_passthrough_with_warning_or_raise(method, caplog):
    target = synthetic_he(HE_TARGET, seed=7)
    rng = np.random.default_rng(0)
    white = np.clip(rng.normal(245, 3, size=(64, 64, 3)), 0, 255).astype(np.uint8)
    norm = StainNormalizer(method, target)
    with caplog.at_level(logging.WARNING, logger="breastfusion.data.stain"):
        out = norm.transform(white)
    np.testing.assert_array_equal(out, white)
    assert norm.n_passthrough == 1
    assert any("background" in r.message for r in caplog.records)
    strict = StainNormalizer(method, target, on_background="raise")
    with pytest.raises(DataError, match="background"):
        strict.transform(white)
    with pytest.raises(DataError, match="tissue"):
        StainNormalizer(method, white)


def test_augment_shape_dtype_seed_and_identity():
    img = synthetic_he(HE_TARGET, seed=8)
    a1, a2 = StainAugment(0.1, 0.05, seed=42), StainAugment(0.1, 0.05, seed=42)
    o1, o2 = a1(img), a2(img)
    assert o1.shape == img.shape and o1.dtype == np.uint8
    np.testing.assert_array_equal(o1, o2)  # same seed, same draw
    assert not np.array_equal(a1(img), o1)  # each call draws anew
    # alpha = 1, beta = 0 is the identity up to rounding.
    assert np.abs(StainAugment.apply(img, 1.0, 0.0).astype(int) - img).max() <= 1
    np.testing.assert_array_equal(StainAugment(0.0, 0.0, seed=1)(img), StainAugment.apply(img, 1.0, 0.0))


def test_augment_changes_colour_within_bounds():
    img = synthetic_he(HE_TARGET, seed=9, background=0.0)
    sa, sb = 0.2, 0.05
    aug = StainAugment(sa, sb, seed=3)
    changed = 0
    for _ in range(5):
        out = aug(img)
        alpha, beta = aug.last_params
        assert np.all(np.abs(alpha - 1) <= sa) and np.all(np.abs(beta) <= sb)
        diff = np.abs(out.astype(int) - img.astype(int))
        changed += diff.mean() > 0.5
        # In HED space the change is alpha * hed + beta (checked on pixels far from clipping).
        ok = np.all((img > 10) & (img < 250), axis=-1) & np.all((out > 10) & (out < 250), axis=-1)
        assert ok.mean() > 0.3
        h_in, h_out = rgb_to_hed(img)[ok], rgb_to_hed(out)[ok]
        np.testing.assert_allclose((h_out - (alpha * h_in + beta)).mean(0), 0, atol=0.01)
        # ... and so within the sampling bounds, pixel by pixel (tolerance: uint8 rounding).
        lim = sa * np.abs(h_in) + sb + 0.05
        assert np.all(np.abs(h_out - h_in) <= lim)
    assert changed >= 4


def test_hed_round_trip():
    img = synthetic_he(HE_SOURCE, seed=10)
    assert np.abs(hed_to_rgb(rgb_to_hed(img)).astype(int) - img).max() <= 1


@pytest.mark.realdata
def test_real_target_and_breakhis_tile():
    from PIL import Image

    target_path = require_shared("he_samples", "tiatoolbox_target_image.png")
    tile_path = require_shared("breakhis", "SOB_M_DC-14-2523-40-010.png")
    norm = StainNormalizer("macenko", target_path)  # from a path
    target = np.asarray(Image.open(target_path).convert("RGB"))[:256, :256]
    tile = np.asarray(Image.open(tile_path).convert("RGB"))[:256, :256]
    out = norm.transform(tile)
    t = np.asarray(norm.params_["stain_matrix"])
    d_before = np.abs(_stain_matrix(tile) - t).max()
    d_after = np.abs(_stain_matrix(out) - t).max()
    assert d_after < d_before
    before = np.abs(_lab_means(tile) - _lab_means(target)).sum()
    after = np.abs(_lab_means(out) - _lab_means(target)).sum()
    assert after < before
