"""Images that must not be scored (too small, blank, too many pixels) are skipped with a reason in batch
prediction and refused with 422/413 by the service; EXIF orientation is applied to images and masks alike; the
scoring decode is bit-identical to training's and holds no full-size float copies. Images here are SYNTHETIC."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import write_png
from PIL import Image

from breastfusion.data import images
from breastfusion.data.cleaning import load_for_scoring
from breastfusion.data.images import image_size, read_image, read_mask
from breastfusion.errors import DataError

SIZE = 48
CLASSES = ["benign", "malignant"]


@pytest.fixture(scope="module")
def image_bundle(tmp_path_factory):
    """A SYNTHETIC image-only bundle with random weights (test_efficientnet at 48 px)."""
    import timm

    from breastfusion.bundles.bundle import save_bundle
    from breastfusion.models.fusion import FusionClassifier

    torch.manual_seed(0)
    backbone = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    dims = {"image_dim": 16, "tabular_dim": 8, "tabular_hidden": 16, "fusion_hidden": 16, "dropout": 0.1}
    model = FusionClassifier(len(CLASSES), variant="image", backbone=backbone, n_tabular=0, **dims)
    return save_bundle(tmp_path_factory.mktemp("guards") / "bundle", model, classes=CLASSES,
                       model_meta={"variant": "image", "backbone": "test_efficientnet", "n_tabular": 0, **dims},
                       image_meta={"size": SIZE, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                                   "color": "gray_to_rgb"},
                       tabular=None, feature_meta={"clinical_columns": [], "radiomics": None}, config_yaml="",
                       synthetic=True)


def _png_bytes(arr: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **save)
    return buf.getvalue()


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def test_predictor_skips_tiny_and_blank_images_with_a_reason(image_bundle, tmp_path):
    from breastfusion.inference.predictor import Predictor

    folder = tmp_path / "in"
    write_png(folder / "ok.png", _noise(64, 80))
    write_png(folder / "one_pixel.png", np.array([[200]], dtype=np.uint8))
    write_png(folder / "narrow.png", _noise(20, 300))
    write_png(folder / "flat.png", np.full((64, 64), 128, np.uint8))
    write_png(folder / "black.png", np.zeros((90, 70, 3), np.uint8))
    p = Predictor.load(image_bundle, threads=1)
    out = p.predict(folder)
    assert list(out["case_id"]) == ["ok"]
    reasons = dict(zip(p.last_skipped["case_id"], p.last_skipped["reason"]))
    assert set(reasons) == {"one_pixel", "narrow", "flat", "black"}
    assert "1x1" in reasons["one_pixel"] and f"{images.MIN_IMAGE_SIDE} px" in reasons["one_pixel"]
    assert "300x20" in reasons["narrow"]
    assert "blank" in reasons["flat"] and "blank" in reasons["black"]
    assert "one_pixel.png" in reasons["one_pixel"]  # the file is named


def test_service_refuses_tiny_and_blank_images_with_422(image_bundle):
    from breastfusion.serve.engine import InputError, ServeModel

    engine = ServeModel(image_bundle, threads=1)
    assert engine.predict(_png_bytes(_noise(64, 64)), {})["predicted"] in CLASSES
    for arr, text in ((np.array([[200]], np.uint8), "1x1"), (_noise(10, 500), "500x10"),
                      (np.full((64, 64), 7, np.uint8), "blank")):
        with pytest.raises(InputError, match=text) as info:
            engine.predict(_png_bytes(arr), {})
        assert info.value.status == 422 and info.value.field == "image"


def test_pixel_cap_is_shared_and_applied_in_batch_prediction(image_bundle, tmp_path, monkeypatch):
    import inspect

    from breastfusion.inference.predictor import Predictor
    from breastfusion.serve.engine import ServeModel

    assert inspect.signature(ServeModel).parameters["max_pixels"].default == images.MAX_SCORED_PIXELS
    write_png(tmp_path / "in" / "big.png", _noise(64, 64))
    p = Predictor.load(image_bundle, threads=1)
    p.max_pixels = 64 * 64 - 1
    out = p.predict(tmp_path / "in")
    assert len(out) == 0
    reason = p.last_skipped["reason"].iloc[0]
    assert "64x64 = 4096 pixels" in reason and "limit is 4095" in reason
    with pytest.raises(DataError, match="limit"):
        load_for_scoring(tmp_path / "in" / "big.png", SIZE, max_pixels=100)


def _reference_gray(path) -> np.ndarray:
    """read_image(mode='gray') as it was before strip-wise decoding: the whole image in float32 at once."""
    with Image.open(path) as img:
        img.load()
        arr = images._to_array(img)
    if arr.ndim == 3:
        arr = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return arr.astype(np.float32, copy=False)


def _mode_files(tmp_path) -> list:
    rng = np.random.default_rng(3)
    g = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    a = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    files = {
        "l.png": Image.fromarray(g), "rgb.png": Image.fromarray(rgb),
        "rgba.png": Image.fromarray(np.dstack([rgb, a])), "la.png": Image.fromarray(np.dstack([g, a]), "LA"),
        "p.png": Image.fromarray(rgb).convert("P"), "16.png": Image.fromarray(g.astype(np.uint16) * 257),
        "1.png": Image.fromarray(g > 128), "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "f.tif": Image.fromarray(rng.normal(size=(37, 53)).astype(np.float32)),
    }
    for name, im in files.items():
        im.save(tmp_path / name)
    return [tmp_path / n for n in files]


def test_strip_decoding_is_bit_identical_to_whole_image_decoding(tmp_path, monkeypatch):
    from breastfusion.training.data import load_resized

    monkeypatch.setattr(images, "STRIP_PIXELS", 53 * 4)  # 4-row strips: many strip boundaries
    for f in _mode_files(tmp_path):
        ref = _reference_gray(f)
        np.testing.assert_array_equal(read_image(f), ref, err_msg=f.name)
        expected = load_resized(str(f), SIZE)  # the training path
        np.testing.assert_array_equal(load_for_scoring(f, SIZE, check_content=False), expected,
                                      err_msg=f.name)


def test_scoring_decode_holds_no_full_size_float_copies(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    h, w = 1500, 2000
    path = tmp_path / "big.png"
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, compress_level=1)
    monkeypatch.setattr(images, "STRIP_PIXELS", 1 << 16)
    tracemalloc.start()  # counts numpy's buffers (not PIL's decoded image, which every path holds)
    try:
        out = load_for_scoring(path, SIZE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (SIZE, SIZE) and out.dtype == np.uint8
    # one uint8 grey copy (1 byte a pixel) plus one strip of floats; converting the whole image at once held
    # float32 RGB twice (24 bytes a pixel: 72 MB here)
    assert peak < 2 * h * w, peak


def _with_orientation(arr: np.ndarray, path, orientation: int) -> None:
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, exif=exif.tobytes())


def test_exif_orientation_is_applied_to_images_and_masks(tmp_path):
    from breastfusion.serve.engine import decode_image

    img = _noise(40, 60)
    mask = np.zeros((40, 60), np.uint8)
    mask[5:15, 40:55] = 255
    _with_orientation(img, tmp_path / "img.png", 6)  # 6: display rotated 90 degrees clockwise
    _with_orientation(mask, tmp_path / "img_mask.png", 6)
    upright = np.rot90(img, k=-1)
    got = read_image(tmp_path / "img.png")
    assert got.shape == (60, 40)
    np.testing.assert_array_equal(np.round(got * 255).astype(np.uint8), upright)
    assert image_size(tmp_path / "img.png") == (60, 40)
    m = read_mask(tmp_path / "img_mask.png", shape=got.shape)
    np.testing.assert_array_equal(m, np.rot90(mask, k=-1) > 0)
    dec = decode_image((tmp_path / "img.png").read_bytes(), max_pixels=10**6)
    assert (dec.height, dec.width) == (60, 40)
    np.testing.assert_array_equal(np.round(dec.gray * 255).astype(np.uint8), upright)
