"""Tests of breastfusion.data.cleaning (field of view, burnt-in marks, painting over), its use in training and
scoring, the audit's marks section and the scanner augmentations.

Images are SYNTHETIC unless marked realdata: a textured sector (a curvilinear probe's fan) on a black screen, with
a dark lesion holding two bright calcification-like blobs, white text, caliper crosses joined by a dotted line, a
ruler on the black margin and (RGB) a coloured line, each drawn where the test knows it is.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw
from scipy import ndimage as ndi

from breastfusion.data import cleaning as C
from breastfusion.errors import BundleError, ConfigError
from conftest import require_shared, write_png

H, W = 320, 420
SECTOR_BOX = None  # filled by _synthetic


def _speckle(rng, h, w, level=0.42):
    tex = ndi.gaussian_filter(rng.gamma(2.0, 0.5, size=(h, w)), 1.2)
    tex = tex / tex.mean() * level
    layers = 0.08 * np.sin(np.linspace(0, 9 * np.pi, h))[:, None]  # horizontal tissue layers
    return np.clip(tex + layers, 0.05, 0.75).astype(np.float32)


def _synthetic(rng, colour=False):
    """(image float (H, W) or (H, W, 3), truth dict). Synthetic: sector on black with drawn marks."""
    yy, xx = np.mgrid[:H, :W]
    apex = (-120.0, W / 2)
    r = np.hypot(yy - apex[0], xx - apex[1])
    ang = np.degrees(np.arctan2(xx - apex[1], yy - apex[0]))
    sector = (r >= 140) & (r <= 420) & (np.abs(ang) <= 34)
    img = np.where(sector, _speckle(rng, H, W), 0.0).astype(np.float32)
    ys, xs = np.nonzero(sector)
    truth = {"sector": sector, "box": (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)}
    # lesion: a dark disk with two bright calcification-like blobs (small, round, soft-edged)
    cy, cx, rad = 170, 205, 38
    lesion = np.hypot(yy - cy, xx - cx) <= rad
    img[lesion] = np.clip(img[lesion] * 0.25, 0.02, 1)
    calc = np.zeros((H, W), np.float32)
    for (by, bx) in ((160, 195), (182, 220)):
        calc[by, bx] = 1.0
    calc = ndi.gaussian_filter(calc, 1.3)
    calc = calc / calc.max() * 0.75
    img = np.maximum(img, calc)
    truth["lesion"], truth["calc"] = lesion, calc > 0.3
    # marks in near-white ink (0.9): caliper crosses on the lesion border, a dotted line between them, text
    ink = Image.new("L", (W, H), 0)
    d = ImageDraw.Draw(ink)
    crosses = [(cy, cx - rad), (cy, cx + rad)]
    for (py, px) in crosses:
        d.rectangle([px - 7, py - 1, px + 7, py + 1], fill=255)
        d.rectangle([px - 1, py - 7, px + 1, py + 7], fill=255)
    for x in range(cx - rad + 12, cx + rad - 10, 5):
        d.rectangle([x, cy, x + 1, cy + 1], fill=255)
    d.text((150, 262), "LEFT BREAST 2", fill=255)  # text on the scan
    d.text((8, 12), "GAIN 45 DR 60", fill=255)  # scanner text on the black margin (outside the fov)
    for y in range(40, 180, 20):  # a depth ruler on the black margin
        d.rectangle([W - 14, y, W - 6, y + 1], fill=255)
    drawn = np.asarray(ink) > 0
    img[drawn] = 0.9
    truth["ink"] = drawn
    truth["ink_on_scan"] = drawn & ndi.binary_erosion(sector, iterations=3)
    truth["dots"] = np.zeros((H, W), bool)
    truth["dots"][cy:cy + 2, cx - rad + 12:cx + rad - 8] = drawn[cy:cy + 2, cx - rad + 12:cx + rad - 8]
    if not colour:
        return img, truth
    rgb = np.repeat(img[..., None], 3, axis=2)
    line = np.zeros((H, W), bool)
    line[90:92, 130:300] = True  # a yellow region-of-interest edge
    line[90:230, 298:300] = True
    line &= sector
    rgb[line] = (0.85, 0.85, 0.15)
    truth["colour"] = line
    return rgb, truth


@pytest.fixture
def synth(rng):
    return _synthetic(rng)


@pytest.fixture
def synth_rgb(rng):
    return _synthetic(rng, colour=True)


# --------------------------------------------------------------------------------------------------
# Field of view
# --------------------------------------------------------------------------------------------------

def test_field_of_view_finds_the_sector_on_a_black_screen(synth):
    img, truth = synth
    box, flags = C.field_of_view(img)
    assert flags == ["fov_cropped"]
    for got, want in zip(box, truth["box"]):
        assert abs(int(got) - int(want)) <= 4, (box, truth["box"])


def test_already_cropped_image_gives_the_whole_image(synth):
    img, truth = synth
    y0, y1, x0, x1 = truth["box"]
    inner = img[y0 + 60:y1 - 20, x0 + 110:x1 - 110]  # tissue only
    box, flags = C.field_of_view(inner)
    assert box == (0, inner.shape[0], 0, inner.shape[1]) and flags == []
    res = C.clean_image(inner, "fov")
    assert res.fov_cropped_fraction == 0.0 and np.array_equal(res.cropped, inner)


def test_implausibly_small_field_of_view_is_refused(rng):
    img = np.zeros((300, 300), np.float32)
    img[100:180, 100:200] = _speckle(rng, 80, 100)  # 9 % of the image
    box, flags = C.field_of_view(img)
    assert box == (0, 300, 0, 300) and flags == ["fov_refused"]


# --------------------------------------------------------------------------------------------------
# Marks
# --------------------------------------------------------------------------------------------------

def test_grey_marks_found_and_lesion_not_wiped(synth):
    img, truth = synth
    marks, counts = C.burnt_in_marks(img)
    on_scan = truth["ink_on_scan"]
    assert marks[on_scan].mean() >= 0.95  # crosses, dotted line, text on the scan
    assert marks[truth["dots"]].mean() >= 0.9  # the dotted line, dot by dot
    assert marks[truth["ink"]].mean() >= 0.9  # margin text and ruler too
    assert counts["grey"] > 0 and counts["colour"] == 0 and counts["inner"] > 0
    # the calcification-like blobs inside the lesion are not marks; nothing of the lesion is, away from the ink
    assert not (marks & truth["calc"]).any()
    near_ink = ndi.binary_dilation(truth["ink"], np.ones((3, 3), bool), iterations=C._GROW + 2)
    assert not (marks & truth["lesion"] & ~near_ink).any()
    # and almost nothing of the tissue is: false marks stay under 0.5 % of the scan
    assert (marks & truth["sector"] & ~near_ink).sum() < 0.005 * truth["sector"].sum()


def test_colour_marks_found_on_rgb_and_tinted_grey_is_not_a_mark(synth_rgb):
    rgb, truth = synth_rgb
    marks, counts = C.burnt_in_marks(rgb)
    assert counts["colour"] >= 0.9 * truth["colour"].sum() and marks[truth["colour"]].mean() >= 0.95
    # a scanner's blue tint (chroma growing with brightness) is the image's own colour, not an overlay
    g = rgb @ C._LUMA
    tinted = np.stack([g * 0.85, g * 0.95, np.clip(g * 1.25, 0, 1)], axis=2).astype(np.float32)
    assert not C.colour_marks(tinted).any()


def test_clean_image_paints_inside_marks_only(synth_rgb):
    rgb, truth = synth_rgb
    res = C.clean_image(rgb, "fov_marks")
    gray = (rgb @ C._LUMA).astype(np.float32)
    assert res.gray.shape == gray.shape and res.gray.dtype == np.float32  # geometry kept
    m = res.marks_mask
    assert m.sum() == res.n_mark_pixels > 0
    np.testing.assert_array_equal(res.gray[~m], gray[~m])  # outside the marks: unchanged, bit for bit
    on = truth["ink_on_scan"]
    assert np.abs(res.gray[on] - gray[on]).mean() > 0.3  # the ink is gone ...
    assert res.gray[on].mean() < 0.6  # ... painted with tissue-like values
    assert {"fov_cropped", "colour_marks", "grey_marks", "inner_marks"} <= set(res.flags)
    assert res.cropped.shape == (res.fov_box[1] - res.fov_box[0], res.fov_box[3] - res.fov_box[2])


def test_modes_and_bad_mode(synth):
    img, _ = synth
    none = C.clean_image(img, "none")
    assert none.fov_box == (0, H, 0, W) and not none.marks_mask.any() and np.array_equal(none.gray, img)
    fov = C.clean_image(img, "fov")
    assert np.array_equal(fov.gray, img) and fov.fov_box != (0, H, 0, W) and not fov.marks_mask.any()
    with pytest.raises(ValueError, match="fov_marks"):
        C.clean_image(img, "crop")


def test_cleaning_meta_round_trip_and_refusals(synth_rgb):
    rgb, _ = synth_rgb
    meta = C.cleaning_meta("fov_marks")
    assert meta == {"mode": "fov_marks", "version": C.CLEANING_VERSION}
    assert C.meta_mode(meta) == "fov_marks" and C.meta_mode(None) == "none" and C.meta_mode({}) == "none"
    np.testing.assert_array_equal(C.apply_cleaning(rgb, 64, meta), C.model_input(rgb, 64, "fov_marks"))
    with pytest.raises(BundleError, match="unknown"):
        C.meta_mode({"mode": "magic", "version": 1})
    with pytest.raises(BundleError, match="version"):
        C.meta_mode({"mode": "fov", "version": C.CLEANING_VERSION + 1})


# --------------------------------------------------------------------------------------------------
# Training and scoring read the same pixels
# --------------------------------------------------------------------------------------------------

def _save(tmp_path, arr, name):
    u8 = np.clip(arr * 255 + 0.5, 0, 255).astype(np.uint8)
    return write_png(tmp_path / name, u8)


def test_training_and_scoring_paths_agree_for_every_mode(tmp_path, synth_rgb):
    from breastfusion.data.cleaning import load_for_scoring
    from breastfusion.training.data import load_resized

    rgb, _ = synth_rgb
    path = _save(tmp_path, rgb, "colour.png")
    outs = {}
    for mode in C.CLEAN_MODES:
        a = load_resized(str(path), 96, mode)
        b = load_for_scoring(path, 96, clean=mode)
        assert a.shape == (96, 96) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b, err_msg=mode)
        outs[mode] = a
    assert not np.array_equal(outs["none"], outs["fov"])  # the crop changes what the model sees
    assert not np.array_equal(outs["fov"], outs["fov_marks"])  # so does painting the marks over
    np.testing.assert_array_equal(load_for_scoring(path, 96), outs["none"])  # default: unchanged behaviour


def test_image_cache_is_keyed_by_mode(tmp_path, synth):
    from breastfusion.training.data import CasesDataset, ImageCache

    path = str(_save(tmp_path, synth[0], "g.png"))
    plain, clean = ImageCache(64), ImageCache(64, "fov_marks")
    assert plain.clean == "none" and clean.clean == "fov_marks"
    assert not np.array_equal(plain.get(path), clean.get(path))
    assert list(clean._store) == [(path, "fov_marks", 64)]
    ds = CasesDataset([path], None, None, size=48, mean=[0.5] * 3, std=[0.5] * 3, clean="fov")
    assert ds.cache.clean == "fov"
    with pytest.raises(ValueError, match="fov_marks"):
        CasesDataset([path], None, None, size=48, mean=[0.5] * 3, std=[0.5] * 3, cache=clean, clean="fov")
    with pytest.raises(ValueError):
        ImageCache(64, "everything")


def test_config_fields_and_helpers():
    from breastfusion.config import load_config
    from breastfusion.training.data import augment_for, image_cache_for

    cfg = load_config(None)
    assert cfg.image.clean == "none" and cfg.train.scanner_augment is True
    cfg = load_config(None, ["image.clean=fov_marks", "train.scanner_augment=false", "image.size=64"])
    assert cfg.image.clean == "fov_marks" and cfg.train.scanner_augment is False
    with pytest.raises(ConfigError, match="image.clean"):
        load_config(None, ["image.clean=crop"])
    assert image_cache_for(cfg).clean == "fov_marks"
    aug = augment_for(cfg, seed=3)
    assert aug is not None and aug.scanner is False and aug.size == 64
    assert augment_for(load_config(None, ["train.augment=false"]), seed=3) is None
    assert augment_for(cfg, seed=3, uses_image=False) is None


# --------------------------------------------------------------------------------------------------
# Scanner augmentations
# --------------------------------------------------------------------------------------------------

def test_augmentations_deterministic_per_seed_and_keep_shape(rng):
    from breastfusion.training.data import UltrasoundAugment

    imgs = [torch.from_numpy(rng.random((1, h, w)).astype(np.float32)) for h, w in ((80, 100), (96, 70), (64, 64))]
    for scanner in (True, False):
        a, b, c = (UltrasoundAugment(48, seed, scanner=scanner) for seed in (5, 5, 6))
        outs_a, outs_b, outs_c = ([aug(x) for x in imgs * 3] for aug in (a, b, c))
        for x, y in zip(outs_a, outs_b):
            assert x.shape == (1, 48, 48)
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        assert any(not torch.equal(x, y) for x, y in zip(outs_a, outs_c))
        assert all(float(x.min()) >= 0 and float(x.max()) <= 1 for x in outs_a)


def test_scanner_steps_change_the_image():
    from breastfusion.training.data import UltrasoundAugment

    # a vertical stripe pattern: resolution loss blurs it, depth loss stretches rows, the TGC ramp tilts rows
    base = torch.zeros(1, 64, 64)
    base[:, :, ::2] = 0.6
    base[:, :, 1::2] = 0.3
    aug = UltrasoundAugment(64, 0, scanner=True)
    blurred = tilted = 0
    for _ in range(30):
        out = aug._scanner(base.clone())
        assert out.shape == base.shape
        blurred += float((out[:, :, ::2] - out[:, :, 1::2]).abs().mean()) < 0.25
        tilted += float(out.mean(dim=2).std()) > 0.01
    assert blurred > 0 and tilted > 0
    # without the scanner steps, the first draws of a seed are those of the plain augmentation
    x = torch.rand(1, 70, 90, generator=torch.Generator().manual_seed(0))
    plain, scan = UltrasoundAugment(48, 9, scanner=False), UltrasoundAugment(48, 9, scanner=True)
    assert not all(torch.equal(plain(x), scan(x)) for _ in range(5))


# --------------------------------------------------------------------------------------------------
# Audit
# --------------------------------------------------------------------------------------------------

def test_audit_counts_marks_with_examples(tmp_path, synth_rgb, rng):
    from breastfusion.data.audit import audit_cases, write_audit

    rgb, _ = synth_rgb
    clean = _speckle(rng, 200, 260)
    p1 = tmp_path / "marked.png"
    Image.fromarray(np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)).save(p1)
    p2 = _save(tmp_path, clean, "clean.png")
    cases = pd.DataFrame({"case_id": ["m1", "c1"], "image_path": [str(p1), str(p2)],
                          "label": ["malignant", "benign"]})
    res = audit_cases(cases, check_duplicates=False, progress=False)
    m = res.marks
    assert m["n_checked"] == 2 and m["seconds_per_image"] > 0
    assert m["colour_marks"]["examples"] == ["m1"] and m["grey_marks"]["examples"] == ["m1"]
    assert m["fov_cropped"]["n"] == 1 and m["inner_marks"]["n"] == 1 and m["with_marks"]["n"] == 1
    assert m["by_class"]["malignant"]["with_marks"] == 1.0 and m["by_class"]["benign"]["with_marks"] == 0.0
    assert res.summary["images_with_marks"] == 1
    md, js = write_audit(res, tmp_path / "audit")
    assert "## Screen and burnt-in marks" in md.read_text() and "m1" in md.read_text()
    assert json.loads(js.read_text())["marks"]["with_marks"]["n"] == 1
    off = audit_cases(cases, check_duplicates=False, progress=False, check_marks=False)
    assert off.marks == {} and "images_with_marks" not in off.summary


# --------------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------------

@pytest.mark.realdata
def test_busi_calipers_and_colour_box_found_lesion_mostly_kept():
    from breastfusion.data.images import read_mask

    root = require_shared("busi", "Dataset_BUSI_with_GT")
    # calipers with dotted lines across a malignant lesion, and "1"/"2" labels
    path = root / "malignant" / "malignant (114).png"
    res = C.clean_image(C.read_for_cleaning(path, "fov_marks"), "fov_marks")
    lesion = read_mask(root / "malignant" / "malignant (114)_mask.png", res.gray.shape)
    assert res.n_inner_pixels > 500 and "inner_marks" in res.flags
    painted = res.marks_mask & lesion
    assert painted.sum() < 0.15 * lesion.sum()  # the dotted lines cross the lesion, painted over 5 px wide ...
    dark = float(np.median(res.gray[lesion & ~res.marks_mask]))
    assert abs(float(np.median(res.gray[painted])) - dark) < 0.08  # ... with the lesion's own darkness
    # a yellow region-of-interest box on an RGB export
    path = root / "benign" / "benign (102).png"
    res = C.clean_image(C.read_for_cleaning(path, "fov_marks"), "fov_marks")
    assert res.n_colour_pixels > 500
    # a black bottom margin is cropped away
    res = C.clean_image(C.read_for_cleaning(root / "benign" / "benign (385).png", "fov"), "fov")
    assert "fov_cropped" in res.flags and 0.25 < res.fov_cropped_fraction < 0.45


@pytest.mark.realdata
def test_breast_lesions_usg_bright_tissue_layers_are_not_marks():
    root = require_shared("breast_lesions_usg", "BrEaST-Lesions_USG-images_and_masks")
    # these scanners draw thin, bright, sharp tissue layers that an early version took for caliper lines
    for name in ("case084.png", "case192.png"):
        res = C.clean_image(C.read_for_cleaning(root / name, "fov_marks"), "fov_marks")
        assert res.n_inner_pixels == 0 and res.n_colour_pixels == 0, name
