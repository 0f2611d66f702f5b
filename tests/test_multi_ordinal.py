"""Multi-valued and ordinal clinical columns (issue 10, item 1): 'skin retraction&palpable' is two findings, not
one category; BI-RADS '4a' < '4b' is an order, not a name. Tables here are small SYNTHETIC frames written in the
test, shaped like the BrEaST-Lesions-USG sheet (read as text)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from breastfusion.data.column_types import infer_column_type, natural_levels
from breastfusion.errors import DataError
from breastfusion.features.tabular import TabularPreprocessor
from breastfusion.tabular_inputs import numeric_for_classical, numeric_like

SIGNS = ["no", "palpable", "skin retraction&palpable", "not available", "palpable&breast scar", "no",
         "redness&warmth&palpable", "palpable"]
BIRADS = ["2", "3", "4a", "4b", "4c", "5", "not available", "4a"]
TYPES = {"Signs": "multi", "BIRADS": "ordinal"}
LEVELS = {"BIRADS": ["2", "3", "4a", "4b", "4c", "5"]}


def _table(signs=SIGNS, birads=BIRADS) -> pd.DataFrame:
    """SYNTHETIC: a clinical sheet read with dtype=str, as the importer reads it."""
    ids = [f"case{i:03d}" for i in range(1, len(signs) + 1)]
    return pd.DataFrame({"Signs": signs, "BIRADS": birads}, index=pd.Index(ids, name="case_id"))


def _pre(**kw) -> TabularPreprocessor:
    return TabularPreprocessor(column_types=TYPES, ordinal_levels=kw.pop("levels", LEVELS), **kw).fit(_table())


def test_multi_is_one_indicator_per_value():
    pre = _pre()
    names = pre.feature_names_
    signs = [n for n in names if n.startswith("Signs")]
    assert signs == ["Signs=breast scar", "Signs=no", "Signs=palpable", "Signs=redness", "Signs=skin retraction",
                     "Signs=warmth", "Signs__missing"]  # values, not combinations
    X = pre.transform(_table())
    col = {n: X[:, j] for j, n in enumerate(names)}
    np.testing.assert_array_equal(col["Signs=palpable"], [0, 1, 1, 0, 1, 0, 1, 1])
    np.testing.assert_array_equal(col["Signs=skin retraction"], [0, 0, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(col["Signs__missing"], [0, 0, 0, 1, 0, 0, 0, 0])


def test_multi_unseen_value_at_prediction_is_handled_like_an_unknown_category(caplog):
    pre = TabularPreprocessor.from_dict(_pre().to_dict())
    new = pd.DataFrame({"Signs": ["palpable&nipple discharge"], "BIRADS": ["4b"]}, index=["new1"])
    with pytest.raises(DataError, match=r"new1.*Signs.*nipple discharge"):
        pre.transform(new, row_ids=["new1"], source="input")
    lenient = TabularPreprocessor.from_dict({**_pre().to_dict(), "unknown_category": "missing"})
    with caplog.at_level(logging.WARNING):
        x = lenient.transform(new, row_ids=["new1"], source="input")[0]
    names = lenient.feature_names_
    assert x[names.index("Signs=palpable")] == 1 and x[names.index("Signs__missing")] == 0  # the known value kept
    assert "nipple discharge" in caplog.text
    only_unknown = pd.DataFrame({"Signs": ["nipple discharge"], "BIRADS": ["4b"]}, index=["new2"])
    assert lenient.transform(only_unknown)[0][names.index("Signs__missing")] == 1


def test_ordinal_rank_orders_subcategories():
    pre = _pre()
    j = pre.feature_names_.index("BIRADS")
    X = pre.transform(_table())
    ranks = X[:, j] * pre.scales_["BIRADS"] + pre.means_["BIRADS"]
    observed = [r for r, b in zip(ranks, BIRADS) if b != "not available"]
    np.testing.assert_allclose(observed, [0, 1, 2, 3, 4, 5, 2], atol=1e-5)  # '4a' < '4b' < '4c' < '5'
    assert X[6, pre.feature_names_.index("BIRADS__missing")] == 1
    with pytest.raises(DataError, match=r"new1.*BIRADS.*'4d'"):
        pre.transform(pd.DataFrame({"Signs": ["no"], "BIRADS": ["4d"]}, index=["new1"]), row_ids=["new1"])


def test_ordinal_levels_inferred_in_natural_order_are_reported(caplog):
    assert natural_levels(["5", "4b", "10", "2", "4a", "4c", "3", "4"]) == ["2", "3", "4", "4a", "4b", "4c", "5", "10"]
    with caplog.at_level(logging.WARNING):
        pre = _pre(levels={})
    assert pre.levels_["BIRADS"] == ["2", "3", "4a", "4b", "4c", "5"]
    assert "ordinal_levels_inferred" in pre.types_["BIRADS"].flags
    assert "natural order" in caplog.text and "BIRADS" in caplog.text


def test_declared_levels_refuse_a_value_outside_them():
    with pytest.raises(DataError, match=r"case003.*BIRADS.*'4a'"):
        TabularPreprocessor(column_types=TYPES, ordinal_levels={"BIRADS": ["2", "3", "5"]}).fit(_table())


def test_undeclared_joined_values_are_reported_not_split():
    ct = infer_column_type(_table()["Signs"], "Signs")
    assert ct.kind == "categorical" and "looks_multi_valued" in ct.flags
    assert "multi" in ct.message() and "skin retraction&palpable" in ct.message()
    pre = TabularPreprocessor().fit(_table()[["Signs"]])
    assert "Signs=skin retraction&palpable" in pre.feature_names_  # not silently split


def test_round_trip_and_old_bundle_dicts():
    pre = _pre()
    again = TabularPreprocessor.from_dict(pre.to_dict())
    assert again.feature_names_ == pre.feature_names_ and again.levels_ == pre.levels_
    np.testing.assert_array_equal(again.transform(_table()), pre.transform(_table()))
    old = {k: v for k, v in TabularPreprocessor().fit(_table()).to_dict().items()
           if k not in ("multi_separator", "ordinal_levels", "levels")}  # a bundle from before these kinds
    assert TabularPreprocessor.from_dict(old).transform(_table()).shape[0] == len(SIGNS)


def test_classical_path_reads_multi_and_ordinal_the_same_way():
    X = numeric_for_classical(_table(), column_types=TYPES, ordinal_levels=LEVELS)
    assert "Signs=skin retraction" in X.columns and not any("&" in c for c in X.columns)
    assert X["BIRADS"].tolist()[:6] == [0, 1, 2, 3, 4, 5] and np.isnan(X.loc["case007", "BIRADS"])
    assert np.isnan(X.loc["case004", "Signs=palpable"])
    reading = X.attrs["reading"]
    new = pd.DataFrame({"Signs": ["palpable&skin retraction", "not available"], "BIRADS": ["4c", "2"]},
                       index=["new1", "new2"])
    Y = numeric_like(new, list(X.columns), **reading)
    assert Y.loc["new1", "Signs=palpable"] == 1 and Y.loc["new1", "Signs=skin retraction"] == 1
    assert Y.loc["new1", "Signs=no"] == 0 and Y.loc["new1", "BIRADS"] == 4 and np.isnan(Y.loc["new2", "Signs=no"])
    with pytest.raises(DataError, match=r"new3.*Signs.*nipple discharge"):
        numeric_like(pd.DataFrame({"Signs": ["nipple discharge"], "BIRADS": ["2"]}, index=["new3"]),
                     list(X.columns), **reading)
    with pytest.raises(DataError, match=r"new4.*BIRADS.*'6'"):
        numeric_like(pd.DataFrame({"Signs": ["no"], "BIRADS": ["6"]}, index=["new4"]), list(X.columns), **reading)


# ------------------------------------------------------------------------------------------------ the service


def _serve_bundle(path, *, mm: bool):
    """A SYNTHETIC fusion bundle (random weights, 48 px) reading Signs (multi), BIRADS (ordinal) and, when
    ``mm``, lesion radiomics in mm from a Pixel_size column in cm."""
    import timm
    import torch

    from breastfusion.features.radiomics import RADIOMICS_VERSION, radiomics_columns
    from breastfusion.bundles.bundle import save_bundle
    from breastfusion.models.fusion import FusionClassifier

    rng = np.random.default_rng(0)
    rad_cols = radiomics_columns()
    table = _table().reset_index(drop=True).join(pd.DataFrame(rng.normal(size=(len(SIGNS), len(rad_cols))),
                                                               columns=rad_cols))
    pre = TabularPreprocessor(column_types=TYPES, ordinal_levels=LEVELS).fit(table)
    torch.manual_seed(0)
    backbone = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    dims = dict(image_dim=16, tabular_dim=8, tabular_hidden=16, fusion_hidden=16, dropout=0.1)
    model = FusionClassifier(2, variant="fusion", backbone=backbone, n_tabular=pre.n_features_out_, **dims)
    rad_meta = {"version": RADIOMICS_VERSION, "columns": rad_cols,
                **({"units": "mm", "pixel_size_column": "Pixel_size", "pixel_size_unit": "cm"} if mm else {})}
    return save_bundle(path, model, classes=["benign", "malignant"],
                       model_meta={"variant": "fusion", "backbone": "test_efficientnet",
                                   "n_tabular": pre.n_features_out_, **dims},
                       image_meta={"size": 48, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                                   "color": "gray_to_rgb"},
                       tabular=pre, feature_meta={"clinical_columns": ["Signs", "BIRADS"], "radiomics": rad_meta},
                       config_yaml="", synthetic=True)


def _png(arr) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_service_accepts_multi_and_ordinal_fields_and_needs_the_pixel_size(tmp_path):
    pytest.importorskip("fastapi", reason="fastapi is not installed (a dependency of breastfusion serve)")
    from fastapi.testclient import TestClient

    from breastfusion.serve import create_app

    rng = np.random.default_rng(2)
    img = rng.integers(0, 255, (80, 100), dtype=np.uint8)
    mask = np.zeros((80, 100), np.uint8)
    mask[20:50, 30:70] = 255
    files = {"image": ("x.png", _png(img), "image/png"), "mask": ("m.png", _png(mask), "image/png")}
    with TestClient(create_app(_serve_bundle(tmp_path / "mm", mm=True))) as c:
        fields = {f["name"]: f for f in c.get("/schema/fields").json()["fields"]}
        assert fields["Signs"]["kind"] == "multi" and fields["Signs"]["separator"] == "&"
        assert fields["BIRADS"]["kind"] == "ordinal" and fields["BIRADS"]["categories"][2:4] == ["4a", "4b"]
        assert fields["Pixel_size"]["kind"] == "pixel_size"
        ok = c.post("/predict", files=files, data={"Signs": "palpable&Skin Retraction", "BIRADS": "4B",
                                                   "Pixel_size": "0.0078125"})
        bad_value = c.post("/predict", files=files, data={"Signs": "palpable&itching", "Pixel_size": "0.0078125"})
        bad_level = c.post("/predict", files=files, data={"BIRADS": "6", "Pixel_size": "0.0078125"})
        no_size = c.post("/predict", files=files, data={"Signs": "palpable"})
    assert ok.status_code == 200, ok.text
    assert bad_value.status_code == 422 and "itching" in bad_value.json()["detail"]
    assert bad_level.status_code == 422 and bad_level.json()["field"] == "BIRADS"
    assert no_size.status_code == 422 and "pixel size" in no_size.json()["detail"]


def test_explanations_group_and_decode_multi_and_ordinal_columns():
    from breastfusion.explain.tabular import decode_values, feature_groups

    pre = _pre()
    groups = dict(feature_groups(pre))
    assert len(groups["Signs"]) == 7 and len(groups["BIRADS"]) == 2  # six values + missing; rank + missing
    X = pre.transform(_table())
    assert decode_values(pre, X[2]) == {"Signs": "palpable&skin retraction", "BIRADS": "4a"}
