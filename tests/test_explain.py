"""Explanations: Grad-CAM / Grad-CAM++, occlusion, tabular Shapley values, modality deltas, the CLI.

Everything runs on tiny random-weight models (no downloads) and toy models whose answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_png
from torch import nn

from breastfusion.explain import (
    explain_tabular,
    feature_groups,
    find_target_layer,
    gradcam,
    modality_contributions,
    multiscale_gradcam,
    occlusion,
    overlay,
    plot_image_explanation,
    plot_stack_explanation,
    shapley_values,
    tabular_function,
)
from breastfusion.explain.tabular import decode_values, missing_row, shap_available
from breastfusion.features.tabular import TabularPreprocessor
from breastfusion.models.fusion import FusionClassifier

CLASSES = ["benign", "malignant", "normal"]
CLINICAL = pd.DataFrame({"age": [40.0, 55.0, 63.0, np.nan, 48.0, 71.0],
                         "birads": ["3", "4a", "5", "4a", None, "3"],
                         "palpable": ["yes", "no", "yes", "no", "yes", None]})


def _pre() -> TabularPreprocessor:
    return TabularPreprocessor().fit(CLINICAL)


def _fusion(variant="fusion", n_tabular=None, seed=0) -> FusionClassifier:
    import timm

    torch.manual_seed(seed)
    backbone = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0) if variant != "tabular" else None
    n_tab = (n_tabular or _pre().n_features_out_) if variant != "image" else 0
    return FusionClassifier(3, variant=variant, backbone=backbone, n_tabular=n_tab, image_dim=32, tabular_dim=16,
                            tabular_hidden=32, fusion_hidden=32, dropout=0.1).eval()


def _disc_image(size=64, centre=(20, 40), radius=10) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    img = 40 + 20 * np.sin(xx / 5.0) * np.cos(yy / 7.0)
    img[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius ** 2] = 220
    return np.clip(img, 0, 255).astype(np.uint8)


def _normalised(img: np.ndarray) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return (torch.from_numpy(img).float().div(255)[None].expand(3, -1, -1) - mean) / std


# ------------------------------------------------------------------------------------------------- Grad-CAM

def test_gradcam_on_tiny_efficientnet_has_input_shape_and_range():
    model = _fusion()
    x = _normalised(_disc_image())
    tab = torch.from_numpy(_pre().transform(CLINICAL.iloc[[1]])[0])
    layer = find_target_layer(model.image_encoder.backbone, x[None])
    assert layer.kind == "conv" and layer.name == "bn2"  # last conv stage before global pooling
    for method in ("gradcam", "gradcam++"):
        h = gradcam(model, x, tab, method=method)
        assert h.shape == (64, 64) and h.dtype == np.float32
        assert h.min() >= 0 and h.max() <= 1 + 1e-6 and np.isclose(h.max(), 1.0)
        assert h.std() > 0.01, f"{method} map is constant"
    batch = gradcam(model, torch.stack([x, x.flip(-1)]), tab, target_class=0)
    assert batch.shape == (2, 64, 64)
    with pytest.raises(ValueError, match="Grad-CAM method"):
        gradcam(model, x, tab, method="cam")


def test_gradcam_on_vit_uses_the_token_grid():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, depth=2)
    model = FusionClassifier(2, variant="image", backbone=vit, image_dim=16, fusion_hidden=16).eval()
    layer = find_target_layer(vit)
    assert layer.kind == "tokens" and layer.name.endswith("norm1") and layer.prefix == 1
    h = gradcam(model, torch.randn(3, 64, 64), method="gradcam++")
    assert h.shape == (64, 64) and 0 <= h.min() and h.max() <= 1 and h.std() > 0


class _QuadrantBackbone(nn.Module):
    """Local brightness (a fixed 3x3 mean filter + ReLU); pooled over the top-left quadrant only."""

    num_features = 1

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 1, 3, padding=1, bias=False), nn.ReLU())
        nn.init.constant_(self.features[0].weight, 1.0 / 27)

    def forward(self, x):
        f = self.features(x)
        h, w = f.shape[-2:]
        return f[:, :, : h // 2, : w // 2].mean((2, 3))


class _QuadrantModel(nn.Module):
    """Two classes; 'bright top-left quadrant' is class 1. Nothing else of the image matters."""

    uses_image, uses_tabular = True, False

    def __init__(self):
        super().__init__()
        self.image_encoder = nn.Module()
        self.image_encoder.backbone = _QuadrantBackbone()

    def forward(self, image, tabular=None):
        z = 12.0 * (self.image_encoder.backbone(image)[:, 0] - 0.15)
        return torch.stack([-z / 2, z / 2], 1)


def _two_squares(size=32, top_left=True, bottom_right=True) -> torch.Tensor:
    x = torch.full((3, size, size), 0.05)
    if top_left:
        x[:, 4:12, 4:12] = 1.0
    if bottom_right:
        x[:, 20:28, 20:28] = 1.0
    return x


def test_occlusion_of_the_region_the_model_uses_lowers_the_probability():
    model = _QuadrantModel().eval()
    x = _two_squares()
    p = torch.softmax(model(x[None]), 1)[0, 1].item()
    assert p > 0.5
    drop = occlusion(model, x, target_class=1, patch=8, stride=4, fill=0.0)
    assert drop.shape == (32, 32)
    assert drop[4:12, 4:12].mean() > 0.2  # hiding the top-left square removes the evidence
    # the model never looks at the bottom-right square (pixels >= 24 are only covered by patches that stay
    # clear of the top-left quadrant and of the 3x3 filter's reach into it)
    assert np.abs(drop[24:, 24:]).max() < 1e-6
    grey = x.clone()
    grey[:, 4:12, 4:12] = 0.0
    assert torch.softmax(model(grey[None]), 1)[0, 1].item() < p - 0.2
    norm = occlusion(model, x, target_class=1, patch=8, stride=4, fill=0.0, normalize=True)
    assert norm.min() >= 0 and np.isclose(norm.max(), 1.0)


def test_gradcam_peaks_where_the_evidence_is():
    model = _QuadrantModel().eval()
    for method in ("gradcam", "gradcam++"):
        h = gradcam(model, _two_squares(bottom_right=False), target_class=1, method=method)
        assert h[4:12, 4:12].mean() > 0.8 and h[20:28, 20:28].mean() < 0.2


def test_overlay_and_figure(tmp_path):
    img = _disc_image()
    heat = np.zeros((16, 16), np.float32)
    heat[4:8, 8:12] = 1
    rgb = overlay(img, heat)  # heatmap resized to the image
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    hot, cold = rgb[24, 40].astype(int), rgb[60, 2].astype(int)
    assert hot[0] > hot[2] + 50 and cold[2] >= cold[0]  # jet: red where the map is 1, blue where it is 0
    assert overlay(np.stack([img] * 3, -1), heat).shape == (64, 64, 3)
    top = [{"feature": "age", "value": "54", "shap": 0.1}, {"feature": "birads", "value": "4a", "shap": -0.05}]
    out = plot_image_explanation(img, {"gradcam": heat, "gradcam++": heat, "occlusion": heat * 0.2}, tmp_path / "f.png",
                                 title="case: predicted malignant (p = 0.9)", shap_top=top)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------- SHAP

def test_one_hot_columns_are_grouped_back_to_their_source_column():
    pre = _pre()
    groups = feature_groups(pre)
    assert [g[0] for g in groups] == ["age", "birads", "palpable"]
    names = pre.feature_names_
    by_col = {c: [names[i] for i in idx] for c, idx in groups}
    assert by_col["birads"] == ["birads=3", "birads=4a", "birads=5", "birads__missing"]
    assert by_col["age"] == ["age", "age__missing"]
    assert sorted(i for _, idx in groups for i in idx) == list(range(pre.n_features_out_))
    rows = pre.transform(CLINICAL)
    assert decode_values(pre, rows[1]) == {"age": "55", "birads": "4a", "palpable": "no"}
    assert decode_values(pre, rows[3])["age"] == "missing" and decode_values(pre, rows[4])["birads"] == "missing"
    zero = TabularPreprocessor().fit(pd.DataFrame({"weeks": [0.0, 3.0, 10.0, 0.0]}))
    enc = zero.transform(pd.DataFrame({"weeks": [0.0]})).astype(np.float32)  # float32 as the model sees it
    assert decode_values(zero, enc[0]) == {"weeks": "0"}  # not 2.4e-07
    # a function of one one-hot column only: the whole credit goes to that column's group
    j = names.index("birads=5")

    def f(x):
        return 2.0 * np.asarray(x)[:, j]

    res = shapley_values(f, rows[2], missing_row(pre)[None], groups=groups, method="exact")
    assert np.isclose(res.values[1], 2.0) and np.allclose(res.values[[0, 2]], 0)


def test_shapley_values_are_efficient_and_match_the_fusion_model():
    pre = _pre()
    model = _fusion()
    x = _normalised(_disc_image())
    rows = pre.transform(CLINICAL)
    t = rows[2]
    with torch.no_grad():
        p = torch.softmax(model(x[None], torch.from_numpy(t)[None]), 1)[0].numpy()
        p_missing = torch.softmax(model(x[None], torch.from_numpy(missing_row(pre))[None]), 1)[0].numpy()
    target = int(p.argmax())
    res = explain_tabular(model, x, t, pre=pre, target_class=target)
    assert res.method == "exact" and res.names == ["age", "birads", "palpable"]
    assert np.isclose(res.fx, p[target], atol=1e-5)  # f(tab) keeps the case's own image embedding
    assert np.isclose(res.base_value, p_missing[target], atol=1e-5)  # background = the missing row
    assert np.isclose(res.values.sum(), res.fx - res.base_value, atol=1e-6)  # efficiency
    # several background rows: efficiency against their mean, sampling agrees with the exact values
    f = tabular_function(model, x, t, target_class=target)
    bg = rows[[0, 1, 5]]
    exact = shapley_values(f, t, bg, groups=feature_groups(pre), method="exact")
    assert np.isclose(exact.values.sum(), f(t[None])[0] - f(bg).mean(), atol=1e-6)
    perm = shapley_values(f, t, bg, groups=feature_groups(pre), method="permutation", n_permutations=200, seed=1)
    assert np.isclose(perm.values.sum(), exact.values.sum(), atol=1e-6)  # exact for every permutation
    assert np.allclose(perm.values, exact.values, atol=max(4 * float(perm.std_err.max()), 1e-4))


def test_permutation_shapley_on_many_groups():
    rng = np.random.default_rng(0)
    w = rng.normal(size=24)

    def f(x):
        x = np.asarray(x)
        return x @ w + x[:, 0] * x[:, 1]  # additive part + one interaction

    x, bg = rng.normal(size=24), rng.normal(size=(4, 24))
    res = shapley_values(f, x, bg, method="auto", n_permutations=32)
    assert res.method.startswith("permutation") and len(res.values) == 24
    assert np.isclose(res.values.sum(), f(x[None])[0] - f(bg).mean(), atol=1e-8)
    lin = w * (x - bg.mean(0))  # exact Shapley values of the additive features
    assert np.allclose(res.values[2:], lin[2:], atol=1e-8)
    if shap_available():  # the optional shap package gives the same game's values
        via = shapley_values(f, x, bg, method="shap", n_permutations=32)
        assert np.isclose(via.values.sum(), res.values.sum(), atol=1e-6)
        assert np.allclose(via.values[2:], lin[2:], atol=1e-6)


# ------------------------------------------------------------------------------------------------ modality

def test_modality_deltas():
    pre = _pre()
    model = _fusion()
    x = _normalised(_disc_image())
    t, miss = pre.transform(CLINICAL)[0], missing_row(pre)
    d = modality_contributions(model, x, t, missing_row=miss)
    with torch.no_grad():
        p = torch.softmax(model(x[None], torch.from_numpy(t)[None]), 1)[0].numpy()
        p_grey = torch.softmax(model(torch.zeros(1, 3, 64, 64), torch.from_numpy(t)[None]), 1)[0].numpy()
        p_miss = torch.softmax(model(x[None], torch.from_numpy(miss)[None]), 1)[0].numpy()
    k = d["target"]
    assert k == int(p.argmax()) and np.isclose(d["p_both"], p[k], atol=1e-6)
    assert np.isclose(d["p_without_image"], p_grey[k], atol=1e-6)
    assert np.isclose(d["p_without_tabular"], p_miss[k], atol=1e-6)
    assert np.isclose(d["delta_image"], p[k] - p_grey[k], atol=1e-6)
    assert np.isclose(d["delta_tabular"], p[k] - p_miss[k], atol=1e-6)
    # a head blind to the tabular embedding: the tabular part moves nothing, and SHAP agrees
    with torch.no_grad():
        model.head[1].weight[:, model.image_encoder.out_dim:] = 0
    d0 = modality_contributions(model, x, t, missing_row=miss)
    assert abs(d0["delta_tabular"]) < 1e-6 and abs(d0["delta_image"]) > 0
    assert np.allclose(explain_tabular(model, x, t, pre=pre, target_class=d0["target"]).values, 0, atol=1e-6)
    # single-modality models: the other delta is undefined
    img_only = modality_contributions(_fusion("image"), x, None)
    assert np.isnan(img_only["delta_tabular"]) and np.isfinite(img_only["delta_image"])
    tab_only = modality_contributions(_fusion("tabular"), None, t, missing_row=miss)
    assert np.isnan(tab_only["delta_image"]) and np.isfinite(tab_only["delta_tabular"])


# ---------------------------------------------------------------------------------------------- multiscale

def _grader(n_tabular=0):
    import timm

    from breastfusion.models.multiscale import MultiScaleGrader

    torch.manual_seed(0)
    backbones = {"cnn": timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0),
                 "vit": timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=2)}
    return MultiScaleGrader(3, backbones=backbones, n_scales=3, n_tabular=n_tabular, dim=32, heads=2, grid=2,
                            objective="ordinal", tabular_hidden=16, tabular_dim=8, fusion_hidden=16).eval()


def test_multiscale_maps_per_magnification(tmp_path):
    model = _grader()
    torch.manual_seed(1)
    stack = torch.rand(3, 3, 32, 32)
    res = multiscale_gradcam(model, stack)
    assert set(res.heatmaps) == {"cnn", "vit"}
    for src, per in res.heatmaps.items():
        for m, h in per.items():
            assert h.shape == (3, 32, 32) and h.min() >= 0 and h.max() <= 1
            assert all(h[s].std() > 0 for s in range(3)), f"{src} {m}: a constant map"
    assert res.cross_scale.shape == (3, 3) and np.allclose(np.diag(res.cross_scale), 0, atol=1e-5)
    assert np.allclose(res.cross_scale.sum(1), 1, atol=1e-4)
    assert res.scale_weights.shape == (3,) and np.isclose(res.scale_weights.sum(), 1, atol=1e-5)
    assert np.isclose(res.probs.sum(), 1, atol=1e-5) and res.target == int(res.probs.argmax())
    assert gradcam(model, stack, source="vit").shape == (3, 32, 32)
    occ = occlusion(model, stack, target_class=res.target, patch=16, stride=16)
    assert occ.shape == (3, 32, 32) and np.abs(occ).max() > 0
    hidden = stack.clone()
    hidden[1, :, 16:, :16] = 0.5  # the same occlusion, computed with a whole forward pass
    with torch.no_grad():
        p0, p1 = (model.probabilities(model(s[None]))[0, res.target].item() for s in (stack, hidden))
    assert np.isclose(occ[1, 20, 5], p0 - p1, atol=1e-5)
    tiles = [(s.permute(1, 2, 0).numpy() * 255).astype(np.uint8) for s in stack]
    out = plot_stack_explanation(tiles, [40.0, 20.0, 10.0], {"Grad-CAM (cnn)": res.heatmaps["cnn"]["gradcam"],
                                                             "occlusion": occ}, tmp_path / "s.png", title="stack",
                                 cross_scale=res.cross_scale, scale_weights=res.scale_weights)
    assert out.is_file()


# ------------------------------------------------------------------------------------------------------ CLI

def _ultrasound_bundle(tmp_path):
    from breastfusion.bundles.bundle import save_bundle

    pre = _pre()
    model = _fusion()
    meta = {"variant": "fusion", "backbone": "tf_efficientnet_lite0", "n_tabular": pre.n_features_out_, "image_dim": 32,
            "tabular_dim": 16, "tabular_hidden": 32, "fusion_hidden": 32, "dropout": 0.1}
    image = {"size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    return save_bundle(tmp_path / "bundle", model, classes=CLASSES, model_meta=meta, image_meta=image, tabular=pre,
                       feature_meta={"clinical_columns": list(CLINICAL.columns), "radiomics": None}, config_yaml="",
                       synthetic=True)


def test_cli_explain_ultrasound_bundle_writes_files(tmp_path, capsys):
    from breastfusion.cli import main

    bundle = _ultrasound_bundle(tmp_path)
    rows = []
    for i in range(3):
        p = write_png(tmp_path / "images" / f"case{i}.png", _disc_image(80, centre=(20 + 15 * i, 40)))
        rows.append({"case_id": f"c{i}", "image_path": str(p), **CLINICAL.iloc[i].to_dict()})
    rows.append({"case_id": "broken", "image_path": str(tmp_path / "images" / "nope.png"), **CLINICAL.iloc[3].to_dict()})
    pd.DataFrame(rows).to_csv(tmp_path / "cases.csv", index=False)
    out = tmp_path / "explain"
    rc = main(["explain", str(bundle), str(tmp_path / "cases.csv"), "--out", str(out), "--top-k", "2", "--threads", "1",
               "--quiet"])
    assert rc == 0
    table = pd.read_csv(out / "explanations.csv")
    assert list(table["case_id"]) == ["c0", "c1", "c2"]
    for col in ("predicted", "probability", "delta_image", "delta_tabular", "p_without_image", "p_without_tabular",
                "top1_feature", "top1_value", "top1_shap", "top2_shap", "shap_base", "figure"):
        assert col in table.columns, col
    assert "top3_feature" not in table.columns
    assert np.isfinite(table[["delta_image", "delta_tabular", "top1_shap"]].to_numpy()).all()
    assert set(table["top1_feature"]) <= {"age", "birads", "palpable"}
    assert np.allclose(table["probability"], table["p_without_tabular"] + table["delta_tabular"])
    for fig in table["figure"]:
        assert (out / fig).read_bytes()[:4] == b"\x89PNG"
    assert (out / "shap_summary.png").is_file()
    sv = pd.read_csv(out / "shap_values.csv")
    assert list(sv.columns) == ["case_id", "age", "birads", "palpable"] and len(sv) == 3
    assert list(pd.read_csv(out / "skipped.csv")["case_id"]) == ["broken"]
    assert "explained 3 case(s)" in capsys.readouterr().out
    # one image, one method
    rc = main(["explain", str(bundle), str(tmp_path / "images" / "case0.png"), "--out", str(tmp_path / "one"),
               "--method", "gradcam", "--threads", "1", "--quiet"])
    assert rc == 0 and len(pd.read_csv(tmp_path / "one" / "explanations.csv")) == 1
    assert not (tmp_path / "one" / "skipped.csv").exists()


def test_cli_explain_histology_bundle(tmp_path):
    from breastfusion.cli import main
    from breastfusion.bundles.bundle import save_bundle

    pre = TabularPreprocessor().fit(CLINICAL[["age", "birads"]])
    model = _grader(n_tabular=pre.n_features_out_)
    meta = {"kind": "multiscale", "backbones": {"cnn": "tf_efficientnet_lite0", "vit": "vit_tiny_patch16_224"},
            "backbone_kwargs": {"cnn": {}, "vit": {"img_size": 32, "depth": 2}}, "magnifications": [40.0, 20.0, 10.0],
            "token_grid": 2, "attention_dim": 32, "attention_heads": 2, "objective": "ordinal",
            "n_tabular": pre.n_features_out_, "tabular_dim": 8, "tabular_hidden": 16, "fusion_hidden": 16, "dropout": 0.2,
            "norms": {k: [[0.5] * 3, [0.5] * 3] for k in ("cnn", "vit")}}
    bundle = save_bundle(tmp_path / "hbundle", model, classes=["1", "2", "3"], model_meta=meta,
                         image_meta={"size": 32, "range": "0-1 RGB", "stain_normalization": None}, tabular=pre,
                         feature_meta={"clinical_columns": ["age", "birads"], "pathomics": None}, config_yaml="",
                         synthetic=True)
    rng = np.random.default_rng(0)
    tiles = []
    for case in ("p1", "p2"):
        for stack in ("s0", "s1"):
            for mag in (40, 20, 10):
                p = write_png(tmp_path / "tiles" / f"{case}_{stack}_{mag}.png", rng.integers(0, 255, (32, 32, 3), np.uint8))
                tiles.append({"case_id": case, "stack_id": stack, "magnification": mag, "image_path": str(p)})
    pd.DataFrame(tiles).to_csv(tmp_path / "tiles.csv", index=False)
    CLINICAL[["age", "birads"]].iloc[:2].assign(case_id=["p1", "p2"]).to_csv(tmp_path / "cases.csv", index=False)
    out = tmp_path / "hexplain"
    rc = main(["explain", str(bundle), str(tmp_path / "tiles.csv"), "--cases", str(tmp_path / "cases.csv"), "--out",
               str(out), "--method", "gradcam,gradcam++", "--max-stacks", "1", "--threads", "1", "--quiet"])
    assert rc == 0
    table = pd.read_csv(out / "explanations.csv", dtype={"case_id": str})
    assert list(table["case_id"]) == ["p1", "p2"] and (table["n_stacks"] == 1).all()
    assert {"scale_weight_40x", "attn_40x_to_10x", "delta_image", "delta_tabular", "top1_feature"} <= set(table.columns)
    assert np.allclose(table[["scale_weight_40x", "scale_weight_20x", "scale_weight_10x"]].sum(axis=1), 1, atol=1e-4)
    assert sorted(p.name for p in (out / "stacks").iterdir()) == ["p1__s0.png", "p2__s0.png"]
    assert (out / "shap_summary.png").is_file()
