"""image.clean reaches every place an image becomes the network's input: the training cache, the bundle record,
batch prediction and the web service give the same input for the same file. SYNTHETIC images, random weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

CLASSES = ["benign", "malignant"]


def _screen(path: Path) -> Path:
    """A SYNTHETIC ultrasound screen: speckled sector on black, white text, a caliper cross, a coloured line."""
    rng = np.random.default_rng(0)
    img = np.zeros((160, 200, 3), np.uint8)
    tissue = rng.gamma(4.0, 18.0, (120, 150)).clip(0, 220).astype(np.uint8)
    img[25:145, 25:175] = tissue[..., None]
    img[30:33, 100:115] = 255  # caliper cross
    img[25:40, 106:109] = 255
    img[5:12, 5:60] = 255  # text in the margin
    img[80, 40:90] = [255, 200, 0]  # coloured measurement line
    Image.fromarray(img).save(path)
    return path


def _bundle(path: Path, clean: str) -> Path:
    import timm
    import torch

    from breastfusion.data.cleaning import cleaning_meta
    from breastfusion.bundles.bundle import save_bundle
    from breastfusion.models.fusion import FusionClassifier

    torch.manual_seed(0)
    backbone = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    dims = dict(image_dim=16, tabular_dim=8, tabular_hidden=16, fusion_hidden=16, dropout=0.1)
    model = FusionClassifier(len(CLASSES), variant="image", backbone=backbone, n_tabular=0, **dims)
    return save_bundle(
        path, model, classes=CLASSES, model_meta={"variant": "image", "backbone": "test_efficientnet",
                                                  "n_tabular": 0, **dims},
        image_meta={"size": 48, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                    "color": "gray_to_rgb", "clean": cleaning_meta(clean)},
        tabular=None, feature_meta={"clinical_columns": [], "radiomics": None}, config_yaml="", synthetic=True)


@pytest.mark.parametrize("clean", ["none", "fov_marks"])
def test_batch_and_service_read_the_image_as_training_did(tmp_path, clean):
    from breastfusion.data.cleaning import load_cleaned
    from breastfusion.inference.predictor import Predictor
    from breastfusion.serve.engine import ServeModel
    from breastfusion.training.data import load_resized

    img = _screen(tmp_path / "screen.png")
    bundle = _bundle(tmp_path / f"b_{clean}", clean)
    p = Predictor.load(bundle)
    assert p.clean == clean
    x = p._load_image(str(img))
    np.testing.assert_array_equal(x, load_resized(str(img), 48, clean))
    if clean != "none":
        np.testing.assert_array_equal(x, load_cleaned(str(img), 48, clean))
        assert not np.array_equal(x, load_resized(str(img), 48, "none"))  # the cleaning changed the input
    batch = p.predict_cases(pd.DataFrame({"case_id": ["a"], "image_path": [str(img)]}))
    served = ServeModel(bundle).predict(img.read_bytes(), {})
    for c in CLASSES:
        assert served["model_probabilities" if "model_probabilities" in served else "probabilities"][c] == \
            pytest.approx(float(batch[f"prob_{c}"].iloc[0]), abs=1e-5)
