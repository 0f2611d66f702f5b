"""`breastfusion serve`: the FastAPI app on a tiny SYNTHETIC bundle (random weights), through FastAPI's
TestClient, and the web page in a real headless Chromium (Playwright driving the system browser)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("fastapi", reason="fastapi is not installed: pip install -e . (a dependency of breastfusion serve)")
from fastapi.testclient import TestClient
from PIL import Image

CLASSES = ["benign", "malignant", "normal"]
SIZE = 48


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_bundle(path: Path, *, calibration: dict | None = None, radiomics: bool = False,
                column_info: dict | None = None) -> Path:
    """A SYNTHETIC fusion bundle with random weights: test_efficientnet at 48 px, three clinical fields (and the
    lesion radiomics columns, fitted on random values, with ``radiomics=True``). ``column_info`` is saved as
    training saves it (``features.column_info``); without it the bundle looks like one saved before it existed."""
    import timm
    import torch

    from breastfusion.features.tabular import TabularPreprocessor
    from breastfusion.bundles.bundle import save_bundle
    from breastfusion.models.fusion import FusionClassifier

    rng = np.random.default_rng(0)
    table = pd.DataFrame({"age": rng.uniform(30, 80, 40).round(),
                          "density": rng.choice(["A", "B", "C", "D"], 40),
                          "family_history": rng.choice(["yes", "no"], 40)})
    rad_meta = None
    if radiomics:
        from breastfusion.features.radiomics import RADIOMICS_VERSION, radiomics_columns

        rad_cols = radiomics_columns()
        table = table.join(pd.DataFrame(rng.normal(size=(40, len(rad_cols))), columns=rad_cols))
        rad_meta = {"version": RADIOMICS_VERSION, "columns": rad_cols}
    pre = TabularPreprocessor().fit(table)
    torch.manual_seed(0)
    backbone = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    dims = dict(image_dim=16, tabular_dim=8, tabular_hidden=16, fusion_hidden=16, dropout=0.1)
    model = FusionClassifier(len(CLASSES), variant="fusion", backbone=backbone, n_tabular=pre.n_features_out_, **dims)
    save_bundle(path, model, classes=CLASSES,
                model_meta={"variant": "fusion", "backbone": "test_efficientnet", "n_tabular": pre.n_features_out_, **dims},
                image_meta={"size": SIZE, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                            "color": "gray_to_rgb"},
                tabular=pre, feature_meta={"clinical_columns": ["age", "density", "family_history"],
                                           "radiomics": rad_meta,
                                           **({"column_info": column_info} if column_info is not None else {})},
                config_yaml="", synthetic=True)
    if calibration is not None:  # added afterwards and re-sealed, as `breastfusion calibrate` does
        from breastfusion.bundles.bundle import write_bundle_meta

        meta = json.loads((path / "bundle.json").read_text())
        meta["calibration"] = calibration
        write_bundle_meta(path, meta)
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("serve") / "bundle")


@pytest.fixture(scope="module")
def client(bundle):
    from breastfusion.serve import create_app

    with TestClient(create_app(bundle, max_upload_mb=1, max_pixels=2_000_000, max_concurrency=2)) as c:
        yield c


@pytest.fixture(scope="module")
def png() -> bytes:
    rng = np.random.default_rng(1)
    return _png(rng.integers(0, 255, (90, 120), dtype=np.uint8))


def _post(client, png, data=None, **kw):
    return client.post("/predict", files={"image": ("x.png", png, "image/png")}, data=data or {}, **kw)


def test_health_fields_page_and_openapi(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["classes"] == CLASSES and h["synthetic"] is True
    assert h["bundle"] == "bundle" and h["version"] and h["calibrated"] is False and h["prediction_sets"] is False
    fields = {f["name"]: f for f in client.get("/schema/fields").json()["fields"]}
    assert set(fields) == {"age", "density", "family_history"}
    assert fields["age"]["type"] == "number" and fields["density"]["categories"] == ["A", "B", "C", "D"]
    assert fields["family_history"]["type"] == "boolean"
    page = client.get("/")
    assert page.status_code == 200 and "predict-form" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200
    spec = client.get("/openapi.json").json()
    body_ref = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    body = spec["components"]["schemas"][body_ref.rsplit("/", 1)[-1]]
    assert body["properties"]["density"]["enum"] == ["A", "B", "C", "D"] and "image" in body["required"]
    assert body["properties"]["image"]["format"] == "binary" and body["additionalProperties"] is False
    assert client.get("/docs").status_code == 200


def test_predict_form_fields_and_json_clinical_agree_with_batch_predictor(client, bundle, png, tmp_path):
    from breastfusion.inference.predictor import Predictor

    r = _post(client, png, {"age": "61", "density": "C", "family_history": "yes"})
    assert r.status_code == 200, r.text
    res = r.json()
    assert set(res["probabilities"]) == set(CLASSES)
    assert abs(sum(res["probabilities"].values()) - 1) < 1e-5
    assert res["predicted"] == max(res["probabilities"], key=res["probabilities"].get)
    assert res["prediction_set"] == [res["predicted"]] and res["prediction_sets"] is False and res["refer"] is None
    assert res["calibrated"] is False
    assert res["synthetic_model"] is True and any("SYNTHETIC" in w for w in res["warnings"])
    assert res["explanation_png_base64"] is None and r.headers["cache-control"] == "no-store"
    r2 = _post(client, png, {"clinical": json.dumps({"age": 61, "density": "C", "family_history": True})})
    assert r2.status_code == 200, r2.text
    assert r2.json()["probabilities"] == pytest.approx(res["probabilities"], abs=1e-6)
    # the same case through the batch Predictor (image from a file, clinical columns in the table)
    (tmp_path / "x.png").write_bytes(png)
    cases = pd.DataFrame({"case_id": ["x"], "image_path": [str(tmp_path / "x.png")], "age": [61],
                          "density": ["C"], "family_history": ["yes"]})
    batch = Predictor.load(bundle).predict(cases)
    for c in CLASSES:
        assert res["probabilities"][c] == pytest.approx(float(batch[f"prob_{c}"].iloc[0]), abs=1e-5)
    # missing fields are allowed (imputed) and said
    r3 = _post(client, png)
    assert r3.status_code == 200 and any("not given" in w for w in r3.json()["warnings"])


def test_explanation_overlay_is_a_png(client, png):
    r = _post(client, png, {"age": "50"}, params={"explain": "true"})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["explanation_method"] in ("input_gradient_saliency", "gradcam")
    img = Image.open(io.BytesIO(base64.b64decode(res["explanation_png_base64"])))
    assert img.format == "PNG" and img.mode == "RGB" and min(img.size) >= SIZE
    r2 = _post(client, png, {"explain": "true"})
    assert r2.status_code == 200 and r2.json()["explanation_png_base64"]


@pytest.mark.parametrize("payload, status, needle", [
    (b"", 422, "empty"),
    (b"this is not an image at all", 415, "not a recognised image"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 415, "not a recognised image"),
])
def test_bad_image_bytes_are_4xx(client, payload, status, needle):
    r = client.post("/predict", files={"image": ("scan.png", payload, "image/png")})
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"] and r.json()["field"] == "image"


def test_truncated_and_bomb_images(client, png):
    r = client.post("/predict", files={"image": ("t.png", png[: len(png) // 2], "image/png")})
    assert r.status_code == 422 and "corrupt or truncated" in r.json()["detail"]
    # a valid PNG header claiming 30000 x 30000 pixels (900 MP): refused on the header, nothing decoded
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")
    r = client.post("/predict", files={"image": ("bomb.png", bomb, "image/png")})
    assert r.status_code == 413 and "pixels" in r.json()["detail"]
    big = _png(np.zeros((1500, 1500), np.uint8))  # 2.25 MP > max_pixels=2 MP, small file
    r = client.post("/predict", files={"image": ("big.png", big, "image/png")})
    assert r.status_code == 413 and "limit is 2000000" in r.json()["detail"]


def test_too_big_upload_is_413_while_reading(client):
    blob = os.urandom(int(1.5 * (1 << 20)))  # 1.5 MiB > max_upload_mb=1 (body still under the body limit)
    r = client.post("/predict", files={"image": ("big.png", blob, "image/png")})
    assert r.status_code == 413 and r.json()["field"] == "image"
    # declared Content-Length over the body limit: refused before the body is read
    r = client.post("/predict", files={"image": ("big.png", os.urandom(4 << 20), "image/png")})
    assert r.status_code == 413 and "larger than the limit" in r.json()["detail"]
    # chunked body without Content-Length: counted while streaming and cut off
    boundary = "bfboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()

    def stream():
        yield head
        for _ in range(8):
            yield b"\0" * (1 << 20)
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/predict", content=stream(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413, r.text


@pytest.mark.parametrize("data, field, needle", [
    ({"tumour_size": "12"}, "tumour_size", "Unknown clinical field 'tumour_size'"),
    ({"age": "old"}, "age", "not a number"),
    ({"age": "inf"}, "age", "not a finite number"),
    ({"density": "Z"}, "density", "unknown category 'Z'"),
    ({"family_history": "maybe"}, "family_history", "not a yes/no value"),
    ({"clinical": "{not json"}, "clinical", "not valid JSON"),
    ({"clinical": "[1, 2]"}, "clinical", "JSON object"),
    ({"clinical": '{"age": ' + "9" * 5000 + "}"}, "clinical", "not valid JSON"),
    ({"clinical": "[" * 50000 + "]" * 50000}, "clinical", "not valid JSON"),
    ({"clinical": json.dumps({"age": {"v": 1}})}, "age", "must be a number"),
    ({"clinical": json.dumps({"age": 50}), "age": "50"}, "age", "both"),
    ({"clinical": json.dumps({"bmi": 22})}, "bmi", "Unknown clinical field 'bmi'"),
])
def test_bad_clinical_values_are_422_naming_the_field(client, png, data, field, needle):
    r = _post(client, png, data)
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"] and r.json()["field"] == field


def test_missing_image_and_wrong_types_are_422(client):
    r = client.post("/predict", data={"age": "50"})
    assert r.status_code == 422 and r.json()["field"] == "image"
    r = client.post("/predict", data={"image": "not a file"})
    assert r.status_code == 422
    r = client.post("/predict", json={"age": 50})
    assert r.status_code == 422


def test_concurrent_requests_all_succeed(client, png):
    def one(i):
        return _post(client, png, {"age": str(40 + i), "density": "ABCD"[i % 4]})

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(one, range(24)))
    assert [r.status_code for r in responses] == [200] * 24
    assert client.get("/health").json()["in_flight"] == 0


def test_timeout_is_504(bundle, png):
    from breastfusion.serve import create_app

    with TestClient(create_app(bundle, timeout_s=1e-4)) as c:
        r = c.post("/predict", files={"image": ("x.png", png, "image/png")}, params={"explain": "true"})
    assert r.status_code == 504 and "longer than" in r.json()["detail"]


def test_calibrated_bundle_returns_conformal_set_and_refer(tmp_path, png):
    from breastfusion.evaluation.calibration import (
        ConformalClassifier,
        TemperatureScaler,
    )
    from breastfusion.serve import create_app

    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], size=200)
    y = rng.integers(0, 3, 200)
    ts = TemperatureScaler().fit(probs, y, classes=None)
    cp = ConformalClassifier(method="aps", alpha=0.1).fit(ts.transform(probs), y)
    path = make_bundle(tmp_path / "cal", calibration={"temperature": ts.to_dict(), "conformal": cp.to_dict()})
    with TestClient(create_app(path)) as c:
        h = c.get("/health").json()
        assert h["prediction_sets"] is True and h["calibration"]["target_coverage"] == pytest.approx(0.9)
        assert h["calibrated"] is h["probabilities_calibrated"]  # one meaning, as predict's 'calibrated' column
        res = c.post("/predict", files={"image": ("x.png", png, "image/png")}).json()
    assert res["prediction_sets"] is True and res["predicted"] in res["prediction_set"]
    assert res["refer"] is (len(res["prediction_set"]) > 1)
    assert res["model_probabilities"] and abs(sum(res["probabilities"].values()) - 1) < 1e-6
    # random labels: the 90% set must hold more than one class, so the case is referred
    assert len(res["prediction_set"]) >= 2 and res["refer"] is True


def _separable_calibration():
    """Bundle calibration fitted on SYNTHETIC out-of-fold predictions that make no error (the demo's case)."""
    from breastfusion.evaluation.calibration import fit_bundle_calibration

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 150)
    P = rng.dirichlet([1, 1, 1], 150) * 0.4
    P[np.arange(150), y] += 0.6
    df = pd.DataFrame({"case_id": [f"c{i}" for i in range(150)], "label": np.asarray(CLASSES)[y],
                       "fold": np.arange(150) % 3, **{f"prob_{c}": P[:, k] for k, c in enumerate(CLASSES)}})
    return fit_bundle_calibration(df, CLASSES, method="lac", alpha=0.1)


def test_uncalibrated_bundle_says_so_and_keeps_model_probabilities(tmp_path, png):
    from breastfusion.inference.predictor import Predictor
    from breastfusion.serve import create_app

    path = make_bundle(tmp_path / "nocal", calibration=_separable_calibration())
    with TestClient(create_app(path)) as c:
        h = c.get("/health").json()
        res = c.post("/predict", files={"image": ("x.png", png, "image/png")}).json()
    assert h["probabilities_calibrated"] is False and h["calibration"]["status"] == "uncalibrated"
    assert "no error" in h["calibration"]["reason"]
    assert res["probabilities_calibrated"] is False and res["calibration"]["status"] == "uncalibrated"
    assert res["probabilities"] == pytest.approx(res["model_probabilities"], abs=1e-7)  # T stayed 1
    assert max(res["probabilities"].values()) < 0.999  # not the collapsed "100.0 %"
    assert any("not calibrated" in w for w in res["warnings"])
    assert any("cannot be estimated" in w for w in res["warnings"])
    # batch prediction must not claim calibration either
    (tmp_path / "x.png").write_bytes(png)
    batch = Predictor.load(path).predict(pd.DataFrame({"case_id": ["x"], "image_path": [str(tmp_path / "x.png")]}))
    assert bool(batch["calibrated"].iloc[0]) is False


def test_calibrated_bundle_says_calibrated(tmp_path, png):
    from breastfusion.evaluation.calibration import fit_bundle_calibration
    from breastfusion.serve import create_app

    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 3)) * 1.5
    y = np.array([rng.choice(3, p=np.exp(r) / np.exp(r).sum()) for r in z])
    P = np.exp(3 * z) / np.exp(3 * z).sum(1, keepdims=True)  # over-confident, with errors
    df = pd.DataFrame({"case_id": [f"c{i}" for i in range(300)], "label": np.asarray(CLASSES)[y],
                       "fold": np.arange(300) % 3, **{f"prob_{c}": P[:, k] for k, c in enumerate(CLASSES)}})
    path = make_bundle(tmp_path / "cal2", calibration=fit_bundle_calibration(df, CLASSES))
    with TestClient(create_app(path)) as c:
        res = c.post("/predict", files={"image": ("x.png", png, "image/png")}).json()
    assert res["probabilities_calibrated"] is True and res["calibration"]["status"] == "calibrated"
    assert res["calibration"]["reason"] is None and not any("not calibrated" in w for w in res["warnings"])


def test_schema_fields_carry_labels_and_units(tmp_path, client):
    from breastfusion.serve import create_app

    info = {"age": {"label": "Age at diagnosis", "unit": "years", "description": "at the ultrasound"},
            "density": {"label": "Breast density", "unit": None, "description": "BI-RADS density category"}}
    path = make_bundle(tmp_path / "labels", column_info=info)
    with TestClient(create_app(path)) as c:
        fields = {f["name"]: f for f in c.get("/schema/fields").json()["fields"]}
        spec = c.get("/openapi.json").json()
    assert fields["age"]["label"] == "Age at diagnosis" and fields["age"]["unit"] == "years"
    assert fields["age"]["about"] == "at the ultrasound"
    assert fields["density"]["label"] == "Breast density" and fields["density"]["unit"] is None
    # a column the trainer did not describe: humanised, and no unit is guessed
    assert fields["family_history"]["label"] == "Family history" and fields["family_history"]["unit"] is None
    ref = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    assert spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]["properties"]["age"]["title"] == \
        "Age at diagnosis (years)"
    # a bundle saved before column_info existed still serves, with humanised labels
    old = {f["name"]: f for f in client.get("/schema/fields").json()["fields"]}
    assert old["family_history"]["label"] == "Family history" and old["age"]["label"] == "Age"


def test_column_labels_humanise_and_config():
    from breastfusion.config import Config
    from breastfusion.features.column_labels import humanise, resolve_column_info

    assert humanise("family_history") == "Family history" and humanise("bmi") == "BMI"
    assert humanise("tumorSize_mm") == "Tumor size mm" and humanise("her2_status") == "HER2 status"
    cfg = Config.model_validate({"data": {"column_info": {"age": {"label": "Age", "unit": "years"}}}})
    out = resolve_column_info(["age", "density"], cfg.data.column_info)
    assert out == {"age": {"label": "Age", "unit": "years", "description": None},
                   "density": {"label": "Density", "unit": None, "description": None}}
    with pytest.raises(Exception, match="lable"):
        Config.model_validate({"data": {"column_info": {"age": {"lable": "Age"}}}})


def test_final_bundle_metadata_carries_column_info(tmp_path, monkeypatch):
    """fit_final_bundle saves data.column_info (resolved for every clinical column) in the bundle's metadata."""
    from types import SimpleNamespace

    import breastfusion.bundles.bundle as bundle_mod
    import breastfusion.training.fit as fit_mod
    from breastfusion.config import Config

    fake = SimpleNamespace(model=None, tabular=None, data_cfg={"mean": [0.5] * 3, "std": [0.5] * 3},
                           result=SimpleNamespace(best_epoch=1, best_val_macro_f1=0.5, seconds=0.0),
                           weight_source="random")
    monkeypatch.setattr(fit_mod, "fit_deep_model", lambda *a, **k: fake)
    saved = {}
    monkeypatch.setattr(bundle_mod, "save_bundle", lambda path, model, **kw: saved.update(kw) or path)
    cfg = Config.model_validate({"data": {"column_info": {"age": {"label": "Age", "unit": "years"}}}})
    cases = pd.DataFrame({"case_id": ["a", "b"], "label": ["benign", "malignant"], "image_path": ["x", "y"]})
    fit_mod.fit_final_bundle("fusion", cases, None, ["benign", "malignant"], cfg, tmp_path, resume=False,
                             progress=False, cache=None, synthetic=True, metrics=None, radiomics_used=False,
                             clinical_cols=["age", "family_history"])
    assert saved["feature_meta"]["column_info"] == {
        "age": {"label": "Age", "unit": "years", "description": None},
        "family_history": {"label": "Family history", "unit": None, "description": None}}


def test_lesion_mask_feeds_radiomics(tmp_path):
    from breastfusion.serve import create_app

    path = make_bundle(tmp_path / "rad", radiomics=True)
    rng = np.random.default_rng(2)
    img = rng.integers(0, 255, (80, 100), dtype=np.uint8)
    mask = np.zeros((80, 100), np.uint8)
    mask[20:50, 30:70] = 255
    with TestClient(create_app(path)) as c:
        fields = c.get("/schema/fields").json()
        assert fields["accepts_mask"] is True and [f["name"] for f in fields["fields"]] == ["age", "density",
                                                                                            "family_history"]
        files = {"image": ("x.png", _png(img), "image/png"), "mask": ("m.png", _png(mask), "image/png")}
        with_mask = c.post("/predict", files=files)
        without = c.post("/predict", files={"image": ("x.png", _png(img), "image/png")})
        wrong = c.post("/predict", files={"image": ("x.png", _png(img), "image/png"),
                                          "mask": ("m.png", _png(mask[:40]), "image/png")})
        rad_field = c.post("/predict", files={"image": ("x.png", _png(img), "image/png")},
                           data={"rad_mask_available": "1"})
    assert with_mask.status_code == 200 and without.status_code == 200
    assert not any("mask" in w for w in with_mask.json()["warnings"])
    assert any("No lesion outline" in w for w in without.json()["warnings"])
    assert with_mask.json()["probabilities"] != without.json()["probabilities"]
    assert wrong.status_code == 422 and wrong.json()["field"] == "mask"
    assert rad_field.status_code == 422 and "Unknown clinical field 'rad_mask_available'" in rad_field.json()["detail"]


def test_bad_calibration_entry_fails_at_startup(tmp_path):
    from breastfusion.errors import BundleError
    from breastfusion.serve import create_app

    path = make_bundle(tmp_path / "badcal", calibration={"something": 1})
    with pytest.raises(BundleError, match="calibration"):
        create_app(path)


def test_cli_serve_parses_and_rejects_a_missing_bundle(tmp_path, capsys):
    from breastfusion.cli import build_parser, main

    args = build_parser().parse_args(["serve", "b", "--port", "9000", "--workers", "2"])
    assert (args.bundle, args.host, args.port, args.workers) == ("b", "127.0.0.1", 9000, 2)
    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ real browser


def _chromium() -> str | None:
    for name in (os.environ.get("BREASTFUSION_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@contextlib.contextmanager
def _serving(bundle_path):
    """The app for ``bundle_path`` on a free local port, in a thread; yields its base URL."""
    import uvicorn

    from breastfusion.serve import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(bundle_path), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def live_server(bundle):
    with _serving(bundle) as url:
        yield url


def test_web_page_in_headless_chromium(live_server, png, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium, or set BREASTFUSION_CHROMIUM)")
    (tmp_path / "scan.png").write_bytes(png)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(live_server + "/")
            page.wait_for_selector("body[data-ready=true]", timeout=15_000)
            assert page.is_visible("#synthetic-banner") and "SYNTHETIC" in page.inner_text("#synthetic-banner")
            page.set_input_files("#image", str(tmp_path / "scan.png"))
            page.fill("[name=age]", "57")
            page.select_option("[name=density]", "B")
            page.check("#explain")
            page.click("#submit")
            page.wait_for_selector("#probabilities .row", timeout=30_000)
            rows = page.locator("#probabilities .row")
            assert rows.count() == len(CLASSES)
            pcts = [float(t.strip("%")) for t in page.locator("#probabilities .pct").all_inner_texts()]
            assert sum(pcts) == pytest.approx(100, abs=0.5)
            assert page.inner_text("#predicted") in CLASSES
            assert "Prediction set" in page.inner_text("#set-line")
            page.wait_for_selector("#overlay-figure:not([hidden])", timeout=10_000)
            assert page.get_attribute("#overlay", "src").startswith("data:image/png;base64,")
            # a bad value shows the server's message, naming the field
            page.fill("[name=age]", "")
            page.evaluate("document.querySelector('[name=age]').type = 'text'")
            page.fill("[name=age]", "old")
            page.click("#submit")
            page.wait_for_selector("#error:not([hidden])", timeout=15_000)
            assert "age" in page.inner_text("#error") and "422" in page.inner_text("#error")
            assert not errors, errors
        finally:
            browser.close()


def _browser(p, exe):
    return p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])


def test_web_page_shows_uncalibrated_referral_labels_and_overlay_scale(tmp_path, png):
    """Issue 9 item 12: the page says 'uncalibrated' (no collapsed 100 %), shows the referral verdict, labels
    fields for people (label, unit) with placeholders that are no values, and draws the overlay beside the
    uploaded image with a colour scale. A second bundle with random-label calibration must show REFER."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium, or set BREASTFUSION_CHROMIUM)")
    from breastfusion.evaluation.calibration import ConformalClassifier, TemperatureScaler

    (tmp_path / "scan.png").write_bytes(png)
    info = {"age": {"label": "Age at diagnosis", "unit": "years"}}
    uncal = make_bundle(tmp_path / "uncal", calibration=_separable_calibration(), column_info=info)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 3))  # SYNTHETIC: informative but noisy, over-confident scores
    y = np.array([rng.choice(3, p=np.exp(r) / np.exp(r).sum()) for r in z])
    probs = np.exp(3 * z) / np.exp(3 * z).sum(1, keepdims=True)
    ts = TemperatureScaler().fit(probs, y)
    cp = ConformalClassifier(method="aps", alpha=0.1).fit(ts.transform(probs), y)
    assert ts.calibrated
    refer = make_bundle(tmp_path / "refer", calibration={"temperature": ts.to_dict(), "conformal": cp.to_dict()})
    shots = Path(os.environ.get("BREASTFUSION_SCREENSHOTS", tmp_path))
    with sync_api.sync_playwright() as p:
        browser = _browser(p, exe)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            with _serving(uncal) as url:
                page.goto(url + "/")
                page.wait_for_selector("body[data-ready=true]", timeout=15_000)
                assert "NOT calibrated" in page.inner_text("#bundle-calibration")
                age = page.locator("label[for=field-0]").inner_text()
                assert "Age at diagnosis" in age and "(years)" in age
                assert "Family history" in page.inner_text("#fields")
                placeholder = page.get_attribute("[name=age]", "placeholder") or ""
                assert not any(ch.isdigit() for ch in placeholder)  # was "median 54.00": looked like a value
                assert page.input_value("[name=age]") == ""
                assert "training median" in page.inner_text("#fields")
                page.set_input_files("#image", str(tmp_path / "scan.png"))
                page.check("#explain")
                page.click("#submit")
                page.wait_for_selector("#overlay-figure:not([hidden])", timeout=30_000)
                assert page.inner_text("#calibration-chip") == "uncalibrated"
                assert "uncalibrated" in page.inner_text("#probabilities-title")
                assert "Not calibrated" in page.inner_text("#probabilities-note")
                assert "No referral flag" in page.inner_text("#refer-box")
                assert "Caution" in page.inner_text("#refer-box")  # sets trivially single-class: said
                assert page.get_attribute("#original", "src").startswith("data:image/png;base64,")
                assert page.get_attribute("#overlay", "src").startswith("data:image/png;base64,")
                box_o, box_x = page.locator("#original").bounding_box(), page.locator("#overlay").bounding_box()
                assert box_x["width"] >= 300 and abs(box_o["y"] - box_x["y"]) < 2 and box_x["x"] > box_o["x"]
                assert page.is_visible("#scale-bar") and "high" in page.inner_text(".scale")
                assert "low" in page.inner_text(".scale")
                page.screenshot(path=str(shots / "serve_uncalibrated.png"), full_page=True)
            with _serving(refer) as url:
                page.goto(url + "/")
                page.wait_for_selector("body[data-ready=true]", timeout=15_000)
                page.set_input_files("#image", str(tmp_path / "scan.png"))
                page.click("#submit")
                page.wait_for_selector("#result:not([hidden])", timeout=30_000)
                assert page.inner_text("#refer-box").startswith("REFER")
                assert page.is_visible("#refer-box") and "refer" in page.get_attribute("#refer-box", "class")
                assert page.inner_text("#calibration-chip") == "calibrated"
                page.screenshot(path=str(shots / "serve_refer.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()


def test_malloc_arena_cap_respects_the_environment(monkeypatch):
    import sys

    from breastfusion.serve.app import limit_malloc_arenas

    assert limit_malloc_arenas(None) is False
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas(2) is False  # the user's explicit setting wins
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    if sys.platform.startswith("linux"):
        import platform

        if platform.libc_ver()[0] == "glibc":
            assert limit_malloc_arenas(2) is True
