"""Whole-slide reading, tissue detection, concentric stacks, resumable tiling; BreakHis names.

Most tests use a SYNTHETIC pyramidal TIFF written here with tifffile: a white "glass" background with one
rectangular "tissue" block whose colours follow a known pattern, levels made by exact block averaging,
0.25 um/px (so 40x by the mpp rule). Real-data tests read ../shared/data when present.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from conftest import require_shared, write_png
from PIL import Image

from breastfusion.data import tiling
from breastfusion.data.importers.breakhis import (
    group_by_patient_magnification,
    import_breakhis,
    parse_breakhis_name,
)
from breastfusion.data.slides import open_slide, tissue_mask
from breastfusion.data.tiling import (
    iter_stacks,
    plan_tiles,
    read_stack,
    read_tile_index,
    tile_slide,
)
from breastfusion.errors import ConfigError, DataError

W, H = 1024, 768  # level-0 size of the synthetic slide
TISSUE = (256, 192, 832, 640)  # x0, y0, x1, y1 of the synthetic tissue block
TILE = 32  # small tiles keep the tests fast
MAGS = (40, 20, 10)


def synthetic_base() -> np.ndarray:
    """SYNTHETIC slide content: white glass, a saturated patterned block where the 'tissue' is."""
    img = np.full((H, W, 3), 255, dtype=np.uint8)
    x0, y0, x1, y1 = TISSUE
    yy, xx = np.mgrid[y0:y1, x0:x1]
    img[y0:y1, x0:x1, 0] = 150 + (xx * 3) % 100
    img[y0:y1, x0:x1, 1] = 40 + (yy * 5) % 80
    img[y0:y1, x0:x1, 2] = 160 + ((xx + yy) % 40)
    return img


def block_mean(img: np.ndarray, k: int) -> np.ndarray:
    h, w = img.shape[0] // k, img.shape[1] // k
    return img[: h * k, : w * k].reshape(h, k, w, k, 3).astype(np.float64).mean(axis=(1, 3))


def write_pyramid(path, img: np.ndarray, mpp: float | None = 0.25):
    import tifffile

    kw = {}
    if mpp is not None:
        kw = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(128, 128), compression="zlib", photometric="rgb", metadata=None, **kw)
        for k in (2, 4):
            lvl = np.rint(block_mean(img, k)).astype(np.uint8)
            tw.write(lvl, tile=(64, 64), compression="zlib", photometric="rgb", subfiletype=1, metadata=None)
    return path


@pytest.fixture(scope="module")
def base_img() -> np.ndarray:
    return synthetic_base()


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory, base_img):
    return write_pyramid(tmp_path_factory.mktemp("wsi") / "synth_slide.tif", base_img)


@pytest.fixture
def slide(slide_path):
    with open_slide(slide_path) as s:
        yield s


# ---------------------------------------------------------------------- open_slide
def test_open_pyramid_levels_and_magnification(slide):
    assert slide.dimensions == (W, H)
    assert slide.level_count == 3
    np.testing.assert_allclose(slide.level_downsamples, (1, 2, 4))
    assert slide.base_magnification == 40 and slide.mpp == pytest.approx(0.25)
    assert "mpp" in slide.magnification_source
    assert slide.best_level_for_downsample(3.0) == 1 and slide.best_level_for_downsample(8) == 2


def test_magnification_overrides_and_unknown(tmp_path, base_img):
    p = write_png(tmp_path / "plain.png", base_img[:200, :300])
    with pytest.raises(DataError, match=r"plain\.png.*objective="):
        open_slide(p)
    with open_slide(p, objective=20) as s:
        assert s.base_magnification == 20 and s.level_count == 1 and s.dimensions == (300, 200)
    with open_slide(p, mpp=0.5) as s:
        assert s.base_magnification == 20
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (300, 200)), base_img[:200, :300])
    with pytest.raises(ConfigError, match="mpp"):
        open_slide(p, mpp=-1)


def test_missing_and_corrupt_slides_name_the_file(tmp_path, slide_path):
    with pytest.raises(DataError, match="nothere.svs"):
        open_slide(tmp_path / "nothere.svs")
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    with pytest.raises(DataError, match="broken.svs"):
        open_slide(bad)
    trunc = tmp_path / "trunc.png"
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = write_png(tmp_path / "ok.png", noise).read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="trunc.png"):
        open_slide(trunc, objective=40)
    half = tmp_path / "half.tif"
    half.write_bytes(slide_path.read_bytes()[:300])
    with pytest.raises(DataError, match="half.tif"):
        with open_slide(half, objective=40) as s:
            s.read_region((0, 0), 0, (64, 64))


# ---------------------------------------------------------------------- tissue and plan
def test_tissue_mask_finds_the_tissue_block(slide):
    mask = tissue_mask(slide, size=256)
    assert mask.dtype == bool and mask.shape == (192, 256)
    truth = np.zeros_like(mask)
    s = 256 / W
    x0, y0, x1, y1 = (int(v * s) for v in TISSUE)
    truth[y0:y1, x0:x1] = True
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95, iou


def test_tissue_mask_of_blank_slide_is_empty(tmp_path):
    p = write_png(tmp_path / "glass.png", np.full((200, 300, 3), 250, np.uint8))
    with open_slide(p, objective=20) as s:
        assert not tissue_mask(s, size=128).any()
        assert len(plan_tiles(s, (20,), 32)) == 0


def test_plan_tiles_only_on_tissue(slide):
    plan = plan_tiles(slide, MAGS, TILE, min_tissue=0.5)
    assert len(plan) > 50
    assert list(plan.columns[:3]) == ["slide", "x", "y"]
    half = TILE / 2  # 40x is the base: one tile pixel per level-0 pixel
    x0, y0, x1, y1 = TISSUE
    assert ((plan["x"] >= x0 - half / 2) & (plan["x"] <= x1 + half / 2)).all()
    assert ((plan["y"] >= y0 - half / 2) & (plan["y"] <= y1 + half / 2)).all()
    assert (plan["tissue"] >= 0.5).all()
    # Grid of the highest magnification: full coverage of the block's interior.
    inner = ((x1 - x0) // TILE - 1) * ((y1 - y0) // TILE - 1)
    assert len(plan) >= inner
    # The stride is in pixels of the highest magnification; and min_tissue=0 keeps every grid tile.
    assert len(plan_tiles(slide, MAGS, TILE, stride=2 * TILE, min_tissue=0.5)) < len(plan) / 3
    assert len(plan_tiles(slide, MAGS, TILE, min_tissue=0.0)) == (W // TILE) * (H // TILE)
    # With 20x as the top magnification the grid steps 2 level-0 pixels per tile pixel.
    p20 = plan_tiles(slide, (20, 10), TILE)
    assert set(np.diff(np.unique(p20["x"]))) == {2 * TILE}


def test_magnification_above_base_is_refused(slide):
    with pytest.raises(DataError, match="40x"):
        plan_tiles(slide, (80, 40), TILE)
    with pytest.raises(DataError, match="upsampling"):
        read_stack(slide, (500, 400), (80,), TILE)


# ---------------------------------------------------------------------- concentric stacks
def test_read_stack_is_concentric(slide, base_img):
    cx, cy = 512, 416
    stack = read_stack(slide, (cx, cy), MAGS, TILE)
    assert set(stack) == set(MAGS)
    for t in stack.values():
        assert t.shape == (TILE, TILE, 3) and t.dtype == np.uint8
    t40, t20, t10 = stack[40], stack[20], stack[10]
    h = TILE // 2
    # 40x is level 0 itself.
    np.testing.assert_array_equal(t40, base_img[cy - h:cy + h, cx - h:cx + h])
    # The central half of the 20x tile is the 40x tile averaged 2x2; the central quarter of 10x, 4x4.
    q = TILE // 4
    np.testing.assert_allclose(t20[q:TILE - q, q:TILE - q], block_mean(t40, 2), atol=1.0)
    e = 3 * TILE // 8
    np.testing.assert_allclose(t10[e:TILE - e, e:TILE - e], block_mean(t40, 4), atol=1.0)
    # The 10x tile is the 4x-wider field around the same centre (read from pyramid level 2).
    f = 2 * TILE
    np.testing.assert_allclose(t10, block_mean(base_img[cy - f:cy + f, cx - f:cx + f], 4), atol=1.0)


def test_read_stack_non_power_of_two_and_plain_image(tmp_path, base_img):
    # A plain single-level image: every magnification is read from level 0 and area-resized.
    p = write_png(tmp_path / "plain.png", base_img)
    with open_slide(p, objective=40) as s:
        st = read_stack(s, (512, 416), (40, 10), TILE)
        np.testing.assert_allclose(st[10], block_mean(base_img[416 - 64:416 + 64, 512 - 64:512 + 64], 4), atol=1.0)
        # 16x: field of 80 level-0 pixels, resampled to TILE; its mean matches the field's mean.
        t16 = read_stack(s, (512, 416), (16,), TILE)[16]
        ref = base_img[416 - 40:416 + 40, 512 - 40:512 + 40].reshape(-1, 3).mean(0)
        np.testing.assert_allclose(t16.reshape(-1, 3).mean(0), ref, atol=1.5)


def test_read_stack_pads_white_beyond_the_border(slide, base_img):
    cx, cy = 10, 6
    st = read_stack(slide, (cx, cy), (40, 10), TILE)
    t10 = st[10]
    # 10x field spans [cx - 64, cx + 64): 10x pixels left of x = 0 (the first 13) are pure white.
    n_out_x = (64 - cx) // 4
    n_out_y = (64 - cy) // 4
    assert (t10[:, :n_out_x] == 255).all() and (t10[:n_out_y] == 255).all()
    # A stack far outside the slide is all white; one straddling the right edge is white beyond it.
    assert (read_stack(slide, (W + 500, H + 500), (10,), TILE)[10] == 255).all()
    edge = read_stack(slide, (W - 8, 400), (40,), TILE)[40]
    np.testing.assert_array_equal(edge[:, :24], base_img[384:416, W - 24:])
    assert (edge[:, 24:] == 255).all()


def test_iter_stacks_matches_plan(slide_path):
    with open_slide(slide_path) as s:
        plan = plan_tiles(s, (20, 10), TILE, min_tissue=0.9)
    items = list(iter_stacks(slide_path, (20, 10), TILE, min_tissue=0.9))
    assert len(items) == len(plan) > 0
    rec, stack = items[0]
    assert (rec["x"], rec["y"]) == (plan["x"][0], plan["y"][0])
    assert set(stack) == {20, 10}


# ---------------------------------------------------------------------- tiling and resume
_REAL_SAVE_PNG = tiling._save_png


class SimulatedKill(BaseException):
    """Stands for SIGKILL/Ctrl-C in the middle of tiling (a BaseException, like KeyboardInterrupt)."""


def _count_writes(monkeypatch, fail_after: int | None = None):
    calls = []
    real = _REAL_SAVE_PNG

    def counting(path, arr, level):
        if fail_after is not None and len(calls) >= fail_after:
            raise SimulatedKill()
        calls.append(path)
        real(path, arr, level)

    monkeypatch.setattr(tiling, "_save_png", counting)
    return calls


def test_tile_slide_writes_tiles_index_and_marker(tmp_path, slide_path, base_img):
    out = tmp_path / "tiles"
    df = tile_slide(slide_path, out, magnifications=MAGS, tile_size=TILE, progress=False)
    n = len(df)
    assert n > 50 and df.attrs["n_written"] == n and df.attrs["n_files_written"] == 3 * n
    for lab in ("40x", "20x", "10x"):
        assert len(list((out / lab).glob("synth_slide_*.png"))) == n
    idx = read_tile_index(out)
    assert len(idx) == n and set(idx["slide"]) == {"synth_slide"}
    assert {"path_40x", "path_20x", "path_10x"} <= set(idx.columns)
    raw = pd.read_csv(out / "tiles.csv")
    assert not raw["path_40x"].str.startswith("/").any()  # relative in the file
    done = json.loads((out / ".tiling" / "synth_slide.done.json").read_text())
    assert done["n_tiles"] == n
    # A written tile is exactly the stack read directly.
    r = idx.iloc[n // 2]
    with open_slide(slide_path) as s:
        st = read_stack(s, (r["x"], r["y"]), MAGS, TILE)
    for m in MAGS:
        np.testing.assert_array_equal(np.asarray(Image.open(r[f"path_{m}x"])), st[m])
    assert not list((out / ".tiling").glob("tmp-*"))


def test_tile_slide_resume_rewrites_only_missing(tmp_path, slide_path, monkeypatch):
    out = tmp_path / "tiles"
    first = tile_slide(slide_path, out, magnifications=MAGS, tile_size=TILE, progress=False)
    n = len(first)
    victims = [first["path_40x"][3], first["path_20x"][7], first["path_10x"][7], first["path_40x"][n - 1]]
    for v in victims:  # tile 7 loses two files: three tiles, four files are missing
        os.unlink(v)
    (out / ".tiling" / "synth_slide.done.json").unlink()
    calls = _count_writes(monkeypatch)
    second = tile_slide(slide_path, out, magnifications=MAGS, tile_size=TILE, progress=False)
    assert len(calls) == len(victims)
    assert second.attrs["n_written"] == 3 and second.attrs["n_skipped"] == n - 3
    assert len(read_tile_index(out)) == n
    assert (out / ".tiling" / "synth_slide.done.json").exists()
    for v in victims:
        assert Image.open(v).size == (TILE, TILE)
    # A third run writes nothing.
    calls.clear()
    tile_slide(slide_path, out, magnifications=MAGS, tile_size=TILE, progress=False)
    assert calls == []


def test_tile_slide_resumes_after_a_kill(tmp_path, slide_path, monkeypatch):
    out = tmp_path / "tiles"
    calls = _count_writes(monkeypatch, fail_after=40)
    with pytest.raises(SimulatedKill):
        tile_slide(slide_path, out, magnifications=MAGS, tile_size=TILE, progress=False, chunk_size=8)
    assert len(calls) == 40
    assert not (out / "tiles.csv").exists() and not (out / ".tiling" / "synth_slide.done.json").exists()
    # Progress rows were flushed per chunk: the chunks completed before the kill.
    part = pd.read_csv(out / ".tiling" / "synth_slide.part.csv")
    assert 0 < len(part) <= 40 // 3
    calls2 = _count_writes(monkeypatch)
    df = tile_slide(slide_path, out, magnifications=MAGS, tile_size=TILE, progress=False, chunk_size=8)
    n = len(df)
    assert len(calls2) == 3 * n - 40
    assert len(read_tile_index(out)) == n
    for lab in ("40x", "20x", "10x"):
        assert len(list((out / lab).glob("*.png"))) == n


def test_tile_slide_refuses_other_parameters_and_keeps_other_slides(tmp_path, slide_path, base_img):
    out = tmp_path / "tiles"
    tile_slide(slide_path, out, magnifications=(20, 10), tile_size=TILE, progress=False)
    with pytest.raises(DataError, match="other parameters"):
        tile_slide(slide_path, out, magnifications=(20, 10), tile_size=2 * TILE, progress=False)
    redo = tile_slide(slide_path, out, magnifications=(20, 10), tile_size=2 * TILE, progress=False, resume=False)
    assert redo.attrs["n_written"] == len(redo)
    other = write_pyramid(tmp_path / "second.tif", base_img[:, ::-1].copy())
    tile_slide(other, out, magnifications=(20, 10), tile_size=2 * TILE, progress=False, workers=2)
    idx = read_tile_index(out)
    assert set(idx["slide"]) == {"synth_slide", "second"}
    assert len(read_tile_index(out, "second")) == len(redo)


# ---------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_real_svs_reading_and_stack():
    p = require_shared("he_samples", "cmu_small_region.svs")
    pytest.importorskip("openslide")
    with open_slide(p) as s:
        assert s.backend_name == "openslide"
        assert s.dimensions == (2220, 2967)
        assert s.base_magnification == 20 and s.mpp == pytest.approx(0.499)
        mask = tissue_mask(s, size=512)
        assert 0.2 < mask.mean() < 0.6
        plan = plan_tiles(s, (20, 10, 5), 128, min_tissue=0.5)
        assert len(plan) > 50
        st = read_stack(s, (plan["x"][0], plan["y"][0]), (20, 10, 5), 128)
        assert all(t.shape == (128, 128, 3) for t in st.values())
        with pytest.raises(DataError, match="20x"):
            read_stack(s, (1000, 1000), (40,), 128)


# ---------------------------------------------------------------------- BreakHis
def test_parse_breakhis_names():
    d = parse_breakhis_name("/x/y/SOB_B_A-14-22549AB-40-001.png")
    assert d["class"] == "benign" and d["subtype"] == "A" and d["subtype_name"] == "adenosis"
    assert d["patient_id"] == "14-22549AB" and d["patient_number"] == "14-22549"
    assert d["magnification"] == 40 and d["seq"] == 1
    d = parse_breakhis_name("SOB_M_DC-14-11031-400-012.png")
    assert (d["class"], d["subtype_name"], d["magnification"], d["seq"]) == ("malignant", "ductal carcinoma", 400, 12)
    for bad, msg in [("SOB_B_A-14-22549AB-40.png", "not a BreakHis"), ("case_001.png", "not a BreakHis"),
                     ("SOB_B_DC-14-1-40-001.png", "malignant"), ("SOB_M_XX-14-1-40-001.png", "unknown"),
                     ("SOB_B_A-14-1-50-001.png", "magnification")]:
        with pytest.raises(DataError, match=msg) as err:
            parse_breakhis_name(bad)
        assert bad in str(err.value)


def test_import_breakhis_synthetic_nested(tmp_path):
    tiny = np.zeros((4, 4, 3), np.uint8)  # SYNTHETIC placeholder images with BreakHis names
    names = ["benign/SOB/adenosis/SOB_B_A_14-1AB/40X/SOB_B_A-14-1AB-40-001.png",
             "benign/SOB/adenosis/SOB_B_A_14-1AB/100X/SOB_B_A-14-1AB-100-001.png",
             "malignant/SOB/ductal/SOB_M_DC_14-2/40X/SOB_M_DC-14-2-40-001.png",
             "malignant/SOB/ductal/SOB_M_DC_14-2/40X/SOB_M_DC-14-2-40-002.png"]
    for n in names:
        write_png(tmp_path / n, tiny)
    (tmp_path / "malignant" / ".SOB_M_DC-14-2-40-003.png").write_bytes(b"")  # hidden: ignored
    cases = import_breakhis(tmp_path)
    assert len(cases) == 4 and set(cases["center"]) == {"BreakHis"}
    assert cases.set_index("case_id").loc["SOB_M_DC-14-2-40-002", "label"] == "malignant"
    assert not {"subtype", "magnification"} & set(cases.columns)  # kept as bookkeeping, never as features
    g = group_by_patient_magnification(cases)
    assert list(zip(g["patient_id"], g["magnification"], g["n_images"])) == [
        ("14-1AB", 40, 1), ("14-1AB", 100, 1), ("14-2", 40, 2)]
    write_png(tmp_path / "notes.png", tiny)
    with pytest.raises(DataError, match="notes.png"):
        import_breakhis(tmp_path)
    assert len(import_breakhis(tmp_path, strict=False)) == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No BreakHis"):
        import_breakhis(tmp_path / "empty")


@pytest.mark.realdata
def test_import_breakhis_real_files():
    folder = require_shared("breakhis")
    cases = import_breakhis(folder)
    assert len(cases) == 12
    assert cases["patient_id"].nunique() == 9
    assert (cases["label"] == "benign").sum() == 8 and (cases["label"] == "malignant").sum() == 4
    assert set(cases["_subtype"]) == {"A", "F", "PT", "TA", "DC", "LC", "MC", "PC"}
    g = group_by_patient_magnification(cases)
    assert sorted(g.loc[g["patient_id"] == "14-25197", "magnification"]) == [40, 100, 200, 400]
    assert len(g) == 12
