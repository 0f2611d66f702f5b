"""ONNX export of bundles (parity with PyTorch) and the Predictor's ONNX Runtime backend."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_png
from PIL import Image

from breastfusion.errors import BundleError, DataError
from breastfusion.features.tabular import TabularPreprocessor
from breastfusion.bundles.bundle import META, save_bundle, write_bundle_meta
from breastfusion.inference.onnx_export import ONNX_FILE, export_onnx, sha256_file
from breastfusion.inference.predictor import Predictor
from breastfusion.models.fusion import FusionClassifier

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SIZE = 64
CLASSES = ["benign", "malignant", "normal"]


def _clinical(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = rng.normal(55, 12, n).round(1)
    age[::5] = np.nan
    return pd.DataFrame({"age": age, "palpable": rng.choice(["yes", "no"], n),
                         "birads": rng.choice(["3", "4a", "4b", "5"], n)})


def _make_bundle(path, variant: str = "fusion", seed: int = 0):
    import timm

    torch.manual_seed(seed)
    pre = TabularPreprocessor().fit(_clinical(30))
    n_tab = pre.n_features_out_ if variant != "image" else 0
    backbone = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0) if variant != "tabular" else None
    m = FusionClassifier(len(CLASSES), variant=variant, backbone=backbone, n_tabular=n_tab, image_dim=32,
                         tabular_dim=8, tabular_hidden=16, fusion_hidden=16)
    with torch.no_grad():  # spread the logits so the probabilities are not all ~1/3
        m.head[-1].weight.mul_(40.0)
    model_meta = {"variant": variant, "backbone": "tf_efficientnet_lite0" if variant != "tabular" else None,
                  "n_tabular": n_tab, "image_dim": 32, "tabular_dim": 8, "tabular_hidden": 16, "fusion_hidden": 16,
                  "dropout": 0.3}
    image_meta = {"size": SIZE, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                  "color": "gray_to_rgb"}
    return save_bundle(path, m, classes=CLASSES, model_meta=model_meta, image_meta=image_meta,
                       tabular=pre if variant != "image" else None,
                       feature_meta={"clinical_columns": ["age", "palpable", "birads"], "radiomics": None},
                       config_yaml="seed: 0\n", synthetic=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random-weight lite0 fusion bundle with model.onnx exported (shared; copy it before changing it)."""
    bundle = _make_bundle(tmp_path_factory.mktemp("onnx") / "fusion")
    export_onnx(bundle)
    return bundle


@pytest.fixture(scope="module")
def cases_csv(tmp_path_factory):
    root = tmp_path_factory.mktemp("cases")
    rng = np.random.default_rng(1)
    table = _clinical(7, seed=3)
    paths = []
    for i in range(len(table)):
        yy = np.linspace(0, 1, 80)[:, None]
        img = np.clip(200 * (1 - 0.5 * yy) + rng.normal(0, 40, (80, 96)), 0, 255).astype(np.uint8)
        paths.append(str(write_png(root / f"img{i}.png", img)))
    table.insert(0, "image_path", paths)
    table.insert(0, "case_id", [f"c{i}" for i in range(len(table))])
    table.to_csv(root / "cases.csv", index=False)
    return root / "cases.csv"


def _copy(bundle, tmp_path):
    return shutil.copytree(bundle, tmp_path / bundle.name)


def test_export_writes_model_and_records_it(exported):
    import onnx

    path = exported / ONNX_FILE
    assert path.is_file()
    entry = json.loads((exported / META).read_text())["onnx"]
    assert entry["file"] == ONNX_FILE and entry["opset"] == 17
    assert entry["sha256"] == sha256_file(path)
    assert entry["weights_sha256"] == sha256_file(exported / "model.safetensors")
    assert [i["name"] for i in entry["inputs"]] == ["image", "tabular"]
    assert entry["inputs"][0]["shape"] == ["batch", 3, SIZE, SIZE]
    assert entry["parity"]["passed"] and entry["parity"]["max_abs_prob_diff"] < 1e-4
    graph = onnx.load(str(path)).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["image"] == ["batch", 3, SIZE, SIZE]
    assert dims["tabular"][0] == "batch"
    assert not list(exported.glob(".*.tmp"))  # no temporary files left


def test_predictor_onnx_matches_torch(exported, cases_csv):
    ref = Predictor.load(exported, batch_size=3, threads=1).predict(cases_csv)
    onx = Predictor.load(exported, batch_size=3, threads=1, backend="onnx")
    assert onx.onnx is not None
    got = onx.predict(cases_csv)
    assert len(got) == len(ref) == 7  # 3 + 3 + 1: the dynamic batch axis at several sizes
    cols = [f"prob_{c}" for c in CLASSES]
    diff = np.abs(got[cols].to_numpy() - ref[cols].to_numpy()).max()
    assert diff < 1e-4
    assert ref[cols].to_numpy().max() > 0.5  # not a trivially uniform model
    p = np.sort(ref[cols].to_numpy(), axis=1)
    clear = (p[:, -1] - p[:, -2]) > 1e-3
    assert (got["predicted"][clear] == ref["predicted"][clear]).all()


@pytest.mark.parametrize("variant", ["image", "tabular"])
def test_single_modality_variants_export_their_input_only(tmp_path, variant, cases_csv):
    bundle = _make_bundle(tmp_path / variant, variant=variant)
    export_onnx(bundle)
    entry = json.loads((bundle / META).read_text())["onnx"]
    assert [i["name"] for i in entry["inputs"]] == ["image" if variant == "image" else "tabular"]
    assert entry["parity"]["max_abs_prob_diff"] < 1e-4
    cols = [f"prob_{c}" for c in CLASSES]
    ref = Predictor.load(bundle, threads=1).predict(cases_csv)
    got = Predictor.load(bundle, threads=1, backend="onnx").predict(cases_csv)
    assert np.abs(got[cols].to_numpy() - ref[cols].to_numpy()).max() < 1e-4


def test_missing_onnx_names_bundle_and_export_command(tmp_path):
    bundle = _make_bundle(tmp_path / "plain", variant="tabular")
    with pytest.raises(BundleError, match="breastfusion export") as info:
        Predictor.load(bundle, backend="onnx")
    assert str(bundle) in str(info.value)


def test_tampered_or_stale_onnx_is_refused(exported, tmp_path):
    bundle = _copy(exported, tmp_path)
    with open(bundle / ONNX_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="sha256") as info:
        Predictor.load(bundle, backend="onnx")
    assert str(bundle) in str(info.value)
    # a model.onnx that bundle.json does not know about
    meta = json.loads((bundle / META).read_text())
    meta.pop("onnx")
    write_bundle_meta(bundle, meta)  # re-sealed: only the ONNX check is under test here
    with pytest.raises(BundleError, match="not recorded"):
        Predictor.load(bundle, backend="onnx")


def test_parity_failure_raises_with_difference_and_writes_nothing(tmp_path, monkeypatch):
    from breastfusion.inference import onnx_export

    bundle = _make_bundle(tmp_path / "tab", variant="tabular")
    real = onnx_export._ort_outputs
    monkeypatch.setattr(onnx_export, "_ort_outputs", lambda s, f: [o + 2e-3 for o in real(s, f)])
    with pytest.raises(BundleError, match=r"parity check.*2\.00e-03"):
        export_onnx(bundle)
    assert not (bundle / ONNX_FILE).exists()
    assert "onnx" not in json.loads((bundle / META).read_text())
    assert not list(bundle.glob(".*.tmp"))


def test_cli_export_and_predict_with_onnx_backend(exported, cases_csv, tmp_path, capsys, monkeypatch):
    from breastfusion.cli import main

    # the CLI would use every core; keep this test on one thread (the machine is shared)
    monkeypatch.setattr("breastfusion.devices.configure_threads", lambda threads: torch.set_num_threads(1))
    bundle = _copy(exported, tmp_path)
    (bundle / ONNX_FILE).unlink()
    assert main(["predict", str(bundle), str(cases_csv), "--out", str(tmp_path / "x.csv"), "--backend", "onnx",
                 "--quiet"]) == 2
    assert "breastfusion export" in capsys.readouterr().err
    assert main(["export", str(bundle), "--opset", "17"]) == 0
    assert "parity" in capsys.readouterr().out
    assert (bundle / ONNX_FILE).is_file()
    out = tmp_path / "preds.csv"
    assert main(["predict", str(bundle), str(cases_csv), "--out", str(out), "--backend", "onnx", "--quiet"]) == 0
    assert len(pd.read_csv(out)) == 7
    other = tmp_path / "elsewhere" / "fusion.onnx"
    assert main(["export", str(bundle), "--out", str(other)]) == 0
    assert other.is_file()
    assert json.loads((bundle / META).read_text())["onnx"]["file"] == str(other.resolve())


def _multiscale_bundle(path, grid: int):
    import timm

    from breastfusion.models.multiscale import MultiScaleGrader

    torch.manual_seed(0)
    m = MultiScaleGrader(3, backbones={"cnn": timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)},
                         n_scales=2, dim=16, heads=2, grid=grid, objective="ordinal")
    meta = {"kind": "multiscale", "backbones": {"cnn": "tf_efficientnet_lite0"}, "backbone_kwargs": {"cnn": {}},
            "magnifications": [20.0, 10.0], "token_grid": grid, "attention_dim": 16, "attention_heads": 2,
            "objective": "ordinal", "n_tabular": 0, "tabular_dim": 64, "tabular_hidden": 128, "fusion_hidden": 128,
            "dropout": 0.2, "norms": {"cnn": [[0.5] * 3, [0.5] * 3]}}
    return save_bundle(path, m, classes=["1", "2", "3"], model_meta=meta, image_meta={"size": 32, "range": "0-1 RGB"},
                       tabular=None, feature_meta={}, config_yaml="", synthetic=True)


def test_multiscale_export_grid1(tmp_path):
    bundle = _multiscale_bundle(tmp_path / "ms1", grid=1)
    export_onnx(bundle)
    entry = json.loads((bundle / META).read_text())["onnx"]
    assert entry["inputs"] == [{"name": "image", "shape": ["batch", 2, 3, 32, 32], "dtype": "float32"}]
    assert [o["name"] for o in entry["outputs"]] == ["probabilities", "logits", "cross_scale", "scale_weights"]
    assert entry["parity"]["max_abs_prob_diff"] < 1e-4


def test_multiscale_grid4_exports_and_grading_predictor_runs_onnx(tmp_path):
    """Token grid 4 on a 1x1 feature map (32 px through EfficientNet): the pooling matrices must export."""
    from breastfusion.inference.grading import GradingPredictor

    bundle = _multiscale_bundle(tmp_path / "ms4", grid=4)
    export_onnx(bundle)
    assert json.loads((bundle / META).read_text())["onnx"]["parity"]["max_abs_prob_diff"] < 1e-4
    rng = np.random.default_rng(0)
    rows = []
    for case in ("a", "b"):
        for stack in range(2):
            for mag in (20, 10):
                p = tmp_path / "tiles" / f"{case}_{stack}_{mag}.png"
                p.parent.mkdir(exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(p)
                rows.append({"case_id": case, "stack_id": str(stack), "magnification": mag, "image_path": str(p)})
    tiles = pd.DataFrame(rows)
    torch_p = Predictor.load(bundle).predict(tiles)
    gp = Predictor.load(bundle, backend="onnx")
    assert isinstance(gp, GradingPredictor) and gp.onnx is not None
    onnx_p = gp.predict(tiles)
    cols = [c for c in torch_p.columns if c.startswith("prob_")]
    np.testing.assert_allclose(onnx_p[cols].to_numpy(), torch_p[cols].to_numpy(), atol=1e-5)
    assert {"scale_weight_20x", "attn_20x_to_10x"} <= set(gp.last_stacks.columns)
