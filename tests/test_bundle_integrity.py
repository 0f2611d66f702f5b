"""Bundle integrity: a bundle edited after it was written (class names swapped, weights replaced) is refused;
calibration whose classes differ from the model's is refused; calibrate and export re-seal what they rewrite;
an unknown ``format_version`` is a clear BundleError. Bundles here are SYNTHETIC (random weights)."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from breastfusion.errors import BundleError
from breastfusion.features.tabular import TabularPreprocessor
from breastfusion.bundles.bundle import (
    META,
    WEIGHTS,
    load_bundle,
    read_bundle_meta,
    save_bundle,
)
from breastfusion.models.fusion import FusionClassifier

CLASSES = ["benign", "malignant"]
INTEGRITY = "integrity"  # the bundle.json entry holding the checksums


def _tabular_bundle(path, *, calibration: dict | None = None, classical: bool = False, seed: int = 0):
    """A SYNTHETIC tabular-only bundle (no backbone: fast), optionally with a (dummy) classical model file."""
    rng = np.random.default_rng(seed)
    table = pd.DataFrame({"age": rng.uniform(30, 80, 30).round(), "palpable": rng.choice(["yes", "no"], 30)})
    pre = TabularPreprocessor().fit(table)
    torch.manual_seed(seed)
    dims = {"image_dim": 8, "tabular_dim": 8, "tabular_hidden": 16, "fusion_hidden": 16, "dropout": 0.1}
    model = FusionClassifier(len(CLASSES), variant="tabular", backbone=None, n_tabular=pre.n_features_out_, **dims)
    feats = {"clinical_columns": ["age", "palpable"], "radiomics": None}
    extra = {}
    if classical:
        src = path.parent / f"{path.name}_lr.skops"
        src.write_bytes(b"stand-in for a skops file: only its checksum matters here")
        extra = {"classical/lr.skops": src}
        feats["classical"] = {"models": ["lr"], "features": ["age"], "format": "skops"}
    return save_bundle(path, model, classes=CLASSES,
                       model_meta={"variant": "tabular", "backbone": None, "n_tabular": pre.n_features_out_, **dims},
                       image_meta={"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}, tabular=pre,
                       feature_meta=feats, config_yaml="seed: 0\n", synthetic=True, extra_files=extra,
                       calibration=calibration)


def _calibration(classes) -> dict:
    """A bundle calibration entry fitted (on random SYNTHETIC out-of-fold scores, errors included) for ``classes``."""
    from breastfusion.evaluation.calibration import fit_bundle_calibration

    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.95, 60)
    preds = pd.DataFrame({f"prob_{classes[0]}": p, f"prob_{classes[1]}": 1 - p, "label": rng.choice(classes, 60)})
    return fit_bundle_calibration(preds, list(classes), alpha=0.2)


def _edit_meta(path, fn) -> None:
    """Edit bundle.json the way a hand (or a hostile tool) would: without re-sealing."""
    meta = json.loads((path / META).read_text())
    fn(meta)
    (path / META).write_text(json.dumps(meta, indent=2))


@pytest.fixture(scope="module")
def sealed(tmp_path_factory):
    return _tabular_bundle(tmp_path_factory.mktemp("integrity") / "bundle", classical=True)


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_saved_bundle_records_checksums_and_loads(sealed):
    meta = json.loads((sealed / META).read_text())
    entry = meta[INTEGRITY]
    assert entry["algorithm"] == "sha256"
    assert set(entry["files"]) == {WEIGHTS, "classical/lr.skops"}
    assert load_bundle(sealed).classes == CLASSES


def test_swapped_class_names_are_refused(sealed, tmp_path):
    b = _copy(sealed, tmp_path)
    _edit_meta(b, lambda m: m.__setitem__("classes", m["classes"][::-1]))
    with pytest.raises(BundleError, match=r"modified after it was written.*'classes'") as info:
        load_bundle(b)
    assert str(b) in str(info.value)
    from breastfusion.inference.predictor import Predictor

    with pytest.raises(BundleError, match="modified after it was written"):
        Predictor.load(b)


def test_replaced_or_missing_weight_files_are_refused(sealed, tmp_path):
    b = _copy(sealed, tmp_path)
    # other weights of the same shapes: without the checksum they would load without complaint
    other = _tabular_bundle(tmp_path / "other", seed=1)
    shutil.copy2(other / WEIGHTS, b / WEIGHTS)
    with pytest.raises(BundleError, match=rf"modified after it was written.*'{WEIGHTS}'.*sha256"):
        load_bundle(b)
    shutil.copy2(sealed / WEIGHTS, b / WEIGHTS)
    load_bundle(b)  # restored: accepted again
    (b / "classical" / "lr.skops").write_bytes(b"something else")
    with pytest.raises(BundleError, match=r"'classical/lr.skops'"):
        load_bundle(b)
    (b / "classical" / "lr.skops").unlink()
    with pytest.raises(BundleError, match=r"'classical/lr.skops'.*missing"):
        load_bundle(b)


def test_metadata_edits_without_the_checksum_are_refused(sealed, tmp_path):
    b2 = _copy(sealed, tmp_path)
    # a listed classical model whose file the checksum does not cover
    _edit_meta(b2, lambda m: m[INTEGRITY]["files"].pop("classical/lr.skops"))
    with pytest.raises(BundleError, match="modified after it was written"):
        load_bundle(b2)


def test_calibration_classes_must_match_the_model(tmp_path):
    b = _tabular_bundle(tmp_path / "cal", calibration=_calibration(CLASSES[::-1]))
    with pytest.raises(BundleError, match=r"calibration.*\['malignant', 'benign'\].*\['benign', 'malignant'\]"):
        load_bundle(b)
    cal = _calibration(CLASSES)
    ok = _tabular_bundle(tmp_path / "cal_ok", calibration=cal)
    assert load_bundle(ok).meta["calibration"] == cal


def test_old_bundle_without_checksum_loads_with_a_warning_but_class_swap_is_still_caught(tmp_path, caplog):
    b = _tabular_bundle(tmp_path / "old", calibration=_calibration(CLASSES))
    _edit_meta(b, lambda m: m.pop(INTEGRITY, None))
    with caplog.at_level(logging.WARNING, logger="breastfusion.bundles.bundle"):
        load_bundle(b)
    assert any("no integrity checksum" in r.getMessage() for r in caplog.records)
    # an old bundle cannot be checked, but its calibration still names the classes in their true order
    _edit_meta(b, lambda m: m.__setitem__("classes", m["classes"][::-1]))
    with pytest.raises(BundleError, match="calibration"):
        load_bundle(b)


def test_calibrate_reseals_and_does_not_launder_a_tampered_bundle(sealed, tmp_path):
    from breastfusion.bundles.bundle import refresh_bundle

    b = _copy(sealed, tmp_path)
    cal = _calibration(CLASSES)
    refresh_bundle(b, calibration=cal)
    assert load_bundle(b).meta["calibration"] == cal
    _edit_meta(b, lambda m: m.__setitem__("classes", m["classes"][::-1]))
    with pytest.raises(BundleError, match="modified after it was written"):
        refresh_bundle(b, calibration=_calibration(CLASSES[::-1]))


def test_export_reseals_and_covers_the_onnx_file(sealed, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from breastfusion.inference.onnx_export import ONNX_FILE, export_onnx

    b = _copy(sealed, tmp_path)
    export_onnx(b)
    assert ONNX_FILE in json.loads((b / META).read_text())[INTEGRITY]["files"]
    load_bundle(b)
    with open(b / ONNX_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=rf"modified after it was written.*'{ONNX_FILE}'"):
        load_bundle(b)
    (b / ONNX_FILE).unlink()  # deleting the export is legitimate: the torch backend needs none
    load_bundle(b)


@pytest.mark.parametrize("value, expected", [
    ("abc", "format_version 'abc'"), (None, "format_version None"), (1.5, "format_version 1.5"),
    (True, "format_version True"), (0, "format_version 0"), (99, "format version 99"),
])
def test_bad_format_version_is_a_clear_error(sealed, tmp_path, value, expected):
    b = _copy(sealed, tmp_path)
    _edit_meta(b, lambda m: m.__setitem__("format_version", value))
    with pytest.raises(BundleError, match=expected) as info:
        read_bundle_meta(b)
    assert str(b) in str(info.value)


def test_missing_format_version_is_a_clear_error(sealed, tmp_path):
    b = _copy(sealed, tmp_path)
    _edit_meta(b, lambda m: m.pop("format_version"))
    with pytest.raises(BundleError, match="format_version"):
        read_bundle_meta(b)
