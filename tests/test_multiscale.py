"""The multiscale grader, the tiles table and the LASSO selector (small SYNTHETIC inputs, random weights)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from breastfusion.data.tiles import read_tiles, stack_table, validate_tiles, write_tiles
from breastfusion.errors import DataError
from breastfusion.models.multiscale import MultiScaleGrader, OrdinalLoss, ordinal_probabilities


def _grader(n_scales=3, sources=("cnn", "vit"), objective="ce", n_tab=0, size=32):
    mods = {}
    if "cnn" in sources:
        mods["cnn"] = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    if "vit" in sources:
        mods["vit"] = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=size)
    torch.manual_seed(0)
    return MultiScaleGrader(3, backbones=mods, n_scales=n_scales, n_tabular=n_tab, dim=32, heads=2, grid=2,
                            objective=objective)


def test_cross_scale_attention_never_attends_to_its_own_scale():
    m = _grader().eval()
    x = torch.rand(2, 3, 3, 32, 32)
    out, att = m(x, return_attention=True)
    assert out.shape == (2, 3)
    cross = att["cross_scale"]
    assert cross.shape == (2, 3, 3)
    assert torch.allclose(torch.diagonal(cross, dim1=1, dim2=2), torch.zeros(2, 3), atol=1e-6)
    assert torch.allclose(cross.sum(-1), torch.ones(2, 3), atol=1e-5)  # each scale's attention is a distribution
    w = att["scale_weights"]
    assert w.shape == (2, 3) and torch.allclose(w.sum(1), torch.ones(2), atol=1e-5)


def test_single_scale_and_single_backbone_variants_run():
    m = _grader(n_scales=1, sources=("cnn",)).eval()
    out, att = m(torch.rand(2, 1, 3, 32, 32), return_attention=True)
    assert out.shape == (2, 3) and att["cross_scale"].shape == (2, 1, 1)
    with pytest.raises(ValueError, match="magnification"):
        m(torch.rand(2, 2, 3, 32, 32))


def test_cached_features_give_the_same_output_as_the_full_forward():
    m = _grader(n_tab=4).eval()
    x, tab = torch.rand(2, 3, 3, 32, 32), torch.randn(2, 4)
    with torch.no_grad():
        a = m(x, tab)
        b = m.forward_from_backbone(m.backbone_forward(x), tab)
    assert torch.allclose(a, b, atol=1e-5)


def test_ordinal_head_gives_valid_ordered_probabilities():
    m = _grader(objective="ordinal").eval()
    with torch.no_grad():
        out = m(torch.rand(4, 3, 3, 32, 32))
    assert out.shape == (4, 2)  # K-1 cumulative logits
    p = m.probabilities(out)
    assert torch.all(p >= 0) and torch.allclose(p.sum(1), torch.ones(4, dtype=p.dtype), atol=1e-5)
    b = m.head[-1].biases()
    assert torch.all(b[1:] < b[:-1])  # thresholds ordered by construction
    # extreme cumulative logits map to the end classes
    probs = ordinal_probabilities(torch.tensor([[-20.0, -20.0], [20.0, 20.0]]))
    assert probs[0].argmax() == 0 and probs[1].argmax() == 2


def test_ordinal_loss_penalises_far_errors_more_than_near_ones():
    loss = OrdinalLoss(3)
    target = torch.tensor([0])
    near = loss(torch.tensor([[3.0, -3.0]]), target)   # predicts grade 2 (index 1)
    far = loss(torch.tensor([[3.0, 3.0]]), target)     # predicts grade 3 (index 2)
    right = loss(torch.tensor([[-3.0, -3.0]]), target)
    assert right < near < far


def test_backbones_can_train_only_their_top():
    m = _grader()
    m.set_backbone_trainable(True, 0.25)
    for b in m.backbones.values():
        flags = [p.requires_grad for p in b.parameters()]
        assert not flags[0] and flags[-1]
    m.set_backbone_trainable(False)
    assert not any(p.requires_grad for p in m.backbone_parameters())
    assert all(p.requires_grad for p in m.head_parameters())


# ------------------------------------------------------------------------------------------- tiles table


def _tiles(tmp_path, n_cases=2, mags=(40, 20)):
    from PIL import Image

    rows = []
    for c in range(n_cases):
        for s in range(2):
            for m in mags:
                p = tmp_path / f"c{c}_s{s}_{m}.png"
                Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(p)
                rows.append({"case_id": f"c{c}", "stack_id": str(s), "magnification": m, "image_path": str(p)})
    return pd.DataFrame(rows)


def test_tiles_table_round_trip_and_stacks(tmp_path):
    tiles = _tiles(tmp_path)
    cases = pd.DataFrame({"case_id": ["c0", "c1"]})
    path = write_tiles(tiles, tmp_path / "t" / "tiles.csv")
    back = read_tiles(path, cases)
    assert len(back) == len(tiles)
    st = stack_table(back, [40, 20])
    assert list(st.columns) == ["case_id", "stack_id", "mag_40", "mag_20"] and len(st) == 4


def test_tiles_table_errors_name_the_row(tmp_path):
    tiles = _tiles(tmp_path)
    bad = tiles.astype({"magnification": object})
    bad.loc[3, "magnification"] = "forty"
    with pytest.raises(DataError, match="row 5"):
        validate_tiles(bad)
    with pytest.raises(DataError, match="not in the cases table"):
        validate_tiles(tiles, pd.DataFrame({"case_id": ["c0"]}))
    missing = tiles.copy()
    missing.loc[0, "image_path"] = str(tmp_path / "nope.png")
    with pytest.raises(DataError, match="nope.png"):
        validate_tiles(missing)
    with pytest.raises(DataError, match="twice"):
        validate_tiles(pd.concat([tiles, tiles.iloc[:1]]))


def test_incomplete_stacks_are_dropped_not_fatal(tmp_path, caplog):
    tiles = _tiles(tmp_path)
    tiles = tiles.drop(index=1).reset_index(drop=True)  # c0/s0 loses its 20x tile
    st = stack_table(validate_tiles(tiles), [40, 20])
    assert len(st) == 3 and "dropping 1 stack" in caplog.text
    with pytest.raises(DataError, match="No stack"):
        stack_table(validate_tiles(tiles), [40, 10])


# ------------------------------------------------------------------------------------------- selection


def test_lasso_selection_is_fitted_inside_each_fold():
    from breastfusion.models.classical import fit_predict_oof, make_classical

    rng = np.random.default_rng(0)
    n = 60
    y = pd.Series(np.where(np.arange(n) % 2 == 0, "a", "b"), index=[f"c{i}" for i in range(n)])
    X = pd.DataFrame(rng.normal(size=(n, 40)), index=y.index, columns=[f"f{i}" for i in range(40)])
    X["signal"] = (y == "b").astype(float) * 2 + rng.normal(scale=0.3, size=n)
    pipe = make_classical("logreg", select="lasso").fit(X, y)
    kept = pipe.named_steps["select"].get_feature_names_out(pipe[:-2].get_feature_names_out())
    assert "signal" in kept and len(kept) < 41
    splits = pd.DataFrame({"case_id": y.index, "fold": np.arange(n) % 3})
    preds = fit_predict_oof(X, y, splits, "lgbm", ["a", "b"], select="lasso")
    assert (preds["predicted"] == preds["label"]).mean() > 0.8
    with pytest.raises(ValueError, match="select"):
        make_classical("logreg", select="mrmr2")
