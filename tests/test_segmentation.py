"""Lesion segmentation (breastfusion.segmentation): letterbox geometry, post-processing, training on SYNTHETIC
ultrasound-like images (bright / dark ellipses on speckle), the model file and its validation, resume after an
interruption, masks written in the cases-table layout, cross-validation and the CLI. The network trains from
random weights here (speed); one test checks that the offline ImageNet weights fill the encoder."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_png

from breastfusion.config import SegmentationConfig
from breastfusion.data.cases import mask_list
from breastfusion.data.images import read_mask
from breastfusion.errors import BundleError, DataError
from breastfusion.segmentation import (
    LesionSegmenter,
    cross_validate_segmenter,
    load_lesion_segmenter,
    segment_cases,
    train_lesion_segmenter,
)
from breastfusion.segmentation.metrics import segmentation_scores
from breastfusion.segmentation.unet import (
    build_unet,
    letterbox,
    letterbox_geometry,
    load_encoder_weights,
    masks_from_probability,
    unletterbox,
)

FAST = {"size": 64, "batch_size": 8, "pretrained": False, "lr": 3e-3, "device": "cpu"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny tensors train several times faster on one thread when the CPU is shared (test runs in parallel)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- synthetic data (labelled SYNTHETIC)
def synthetic_case(rng, h=64, w=80, n_lesions=1):
    """SYNTHETIC: speckle background (gamma noise, brighter with depth) with dark or bright elliptic lesions."""
    yy, xx = np.mgrid[:h, :w]
    img = rng.gamma(4.0, 0.125, size=(h, w)) * (0.6 + 0.4 * yy / h)
    mask = np.zeros((h, w), bool)
    for k in range(n_lesions):
        cx = rng.uniform(0.25, 0.75) * w if n_lesions == 1 else (0.25 + 0.5 * k) * w
        cy = rng.uniform(0.3, 0.7) * h
        ry, rx = rng.uniform(0.12, 0.22) * h, rng.uniform(0.1, 0.16 if n_lesions > 1 else 0.22) * w
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        mask |= m
        img[m] *= 0.25 if rng.random() < 0.7 else 2.0
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), mask


def synthetic_cohort(root, n=24, seed=0, n_normal=4, n_nan=2):
    """A cases table of SYNTHETIC images: the first n_normal have no lesion (mask ''), the next n_nan have a lesion
    whose mask is not available (NaN), the rest a mask file."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        normal = i < n_normal
        img, m = synthetic_case(rng, n_lesions=0 if normal else 1)
        ip = write_png(root / f"c{i:03d}.png", img)
        mp = "" if normal else str(write_png(root / f"c{i:03d}_mask.png", m.astype(np.uint8) * 255))
        if n_normal <= i < n_normal + n_nan:
            mp = np.nan
        rows.append({"case_id": f"c{i:03d}", "label": "normal" if normal else ("benign" if i % 2 else "malignant"),
                     "image_path": str(ip), "mask_path": mp, "_synthetic": True})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return synthetic_cohort(tmp_path_factory.mktemp("seg_data"), n=40)


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    path = tmp_path_factory.mktemp("seg_model") / "segmenter.safetensors"
    cfg = SegmentationConfig(**FAST, steps=40, checkpoint_every=100)
    return train_lesion_segmenter(cohort, cfg, path, seed=0, progress=False)


# ---------------------------------------------------------------- geometry and post-processing
@pytest.mark.parametrize("shape", [(50, 120), (120, 50), (64, 64), (300, 7)])
def test_letterbox_round_trip_geometry(shape):
    h, w = shape
    size = 64
    box = letterbox_geometry(h, w, size)
    assert max(box.inner_h, box.inner_w) == size  # the longer side fills the square, the aspect ratio is kept
    scale = size / max(h, w)
    assert abs(box.inner_h - h * scale) <= 0.5 and abs(box.inner_w - w * scale) <= 0.5
    assert box.top == (size - box.inner_h) // 2 and box.left == (size - box.inner_w) // 2  # centred
    img = np.zeros((h, w), np.uint8)
    y0, y1, x0, x1 = h // 4, max(h // 4 + 2, 3 * h // 4), w // 4, max(w // 4 + 2, 3 * w // 4)
    img[y0:y1, x0:x1] = 200
    lb, box2 = letterbox(img, size)
    assert lb.shape == (size, size) and box2 == box
    outside = np.ones((size, size), bool)
    outside[box.window] = False
    assert not lb[outside].any()  # padding is black
    back = unletterbox(lb.astype(np.float32) / 255.0, box)
    assert back.shape == (h, w)
    pred, truth = back > 0.4, img > 0
    if min(h, w) >= 20:
        assert segmentation_scores(pred, truth)["iou"] > 0.8


def test_masks_from_probability_components_min_area_and_fallback():
    p = np.zeros((100, 100), np.float32)
    p[10:30, 10:30] = 0.9  # 400 px
    p[60:90, 50:90] = 0.8  # 1200 px: the largest comes first
    p[95:97, 0:2] = 0.99  # 4 px: under min_area_fraction 0.001 * 10000 = 10 px
    r = masks_from_probability(p, threshold=0.5, min_area_fraction=0.001)
    assert r.n_components == 2 and r.mask_area_px == 1600 and not r.fallback_used
    assert r.components()[0][70, 70] and r.components()[1][20, 20]
    assert r.lesion_prob == pytest.approx(0.99)
    weak = np.full((50, 50), 0.05, np.float32)
    weak[10:20, 10:20] = 0.3
    weak[30:32, 30:32] = 0.2
    assert masks_from_probability(weak).n_components == 0
    fb = masks_from_probability(weak, require_lesion=True)
    assert fb.fallback_used and fb.n_components == 1 and fb.mask_area_px == 100  # largest part of p > 0.5 * max


# ---------------------------------------------------------------- training, model file
def test_train_load_predict_learns_ellipses(trained, cohort, tmp_path):
    seg = load_lesion_segmenter(trained)
    meta = seg.meta
    tr = meta["training"]
    assert meta["weights_init"]["kind"] == "random" and meta["preprocessing"]["size"] == 64
    assert tr["n_without_mask"] == 2 and tr["n_train"] + tr["n_val"] == len(cohort) - 2 and tr["n_val"] > 0
    assert tr["n_empty"] == 4 and tr["best_val_dice"] is not None and 1 <= tr["best_step"] <= 40
    assert len(seg.digest) == 16
    rng = np.random.default_rng(123)
    dice = []
    for _ in range(8):
        img, m = synthetic_case(rng, h=70, w=96)  # another size than training: geometry goes back to it
        r = seg.segment(img)
        assert r.mask.shape == img.shape
        dice.append(segmentation_scores(r.mask, m)["dice"])
    assert np.mean(dice) > 0.7, dice
    prob = seg.probability(np.stack([img] * 3, -1))  # RGB input is read as grey
    assert prob.shape == img.shape and prob.dtype == np.float32 and 0 <= prob.min() <= prob.max() <= 1
    many = seg.segment_many([img, img[:, :40]], batch_size=2)
    assert [r.mask.shape for r in many] == [img.shape, (70, 40)]
    np.testing.assert_array_equal(many[0].labels, r.labels)


def test_nan_mask_is_excluded_never_empty(cohort, tmp_path):
    """A case whose mask is NaN is not even read (its image may be missing); '' is an empty target."""
    cases = cohort.head(12).copy()
    cases.loc[cases.index[5], "image_path"] = str(tmp_path / "does_not_exist.png")  # NaN mask: never opened
    out = train_lesion_segmenter(cases, SegmentationConfig(**FAST, steps=2), tmp_path / "m.safetensors",
                                 progress=False)
    tr = load_lesion_segmenter(out).meta["training"]
    assert tr["n_without_mask"] == 2 and tr["n_skipped"] == 0 and tr["n_empty"] == 4
    assert tr["n_train"] + tr["n_val"] == 10
    only_nan = cases.assign(mask_path=np.nan)
    with pytest.raises(DataError, match="No case"):
        train_lesion_segmenter(only_nan, SegmentationConfig(**FAST, steps=1), tmp_path / "n.safetensors",
                               progress=False)


def test_unreadable_training_image_is_skipped(cohort, tmp_path, caplog):
    cases = cohort.head(12).copy()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    cases.loc[cases.index[8], "image_path"] = str(bad)
    with caplog.at_level(logging.WARNING):
        out = train_lesion_segmenter(cases, SegmentationConfig(**FAST, steps=1), tmp_path / "m.safetensors",
                                     progress=False)
    tr = load_lesion_segmenter(out).meta["training"]
    assert tr["n_skipped"] == 1 and tr["skipped"][0]["case_id"] == "c008" and "bad.png" in caplog.text


def test_resume_after_interruption_equals_uninterrupted(cohort, tmp_path):
    cases = cohort.head(16)
    cfg = SegmentationConfig(**{**FAST, "batch_size": 4}, steps=6, checkpoint_every=2)
    full = train_lesion_segmenter(cases, cfg, tmp_path / "full.safetensors", seed=3, progress=False)

    class Killed(Exception):
        pass

    def kill_at_5(step, info):
        assert np.isfinite(info["loss"]) and info["lr"] > 0
        if step == 5:
            raise Killed

    part = tmp_path / "part.safetensors"
    with pytest.raises(Killed):
        train_lesion_segmenter(cases, cfg, part, seed=3, progress=False, callback=kill_at_5)
    ckpt = part.with_name(part.name + ".ckpt")
    assert ckpt.exists() and not part.exists()
    with pytest.raises(BundleError, match="training checkpoint"):
        load_lesion_segmenter(ckpt)
    seen = []
    train_lesion_segmenter(cases, cfg, part, seed=3, progress=False, callback=lambda s, i: seen.append(s))
    assert seen == [5, 6] and not ckpt.exists()  # resumed after the checkpoint of step 4
    a, b = load_lesion_segmenter(full), load_lesion_segmenter(part)
    for k, v in a.net.state_dict().items():
        assert torch.equal(v, b.net.state_dict()[k]), k
    assert a.meta["training"]["best_step"] == b.meta["training"]["best_step"]
    assert a.meta["training"]["val_history"] == b.meta["training"]["val_history"]
    # the finished model is reused as it is; other settings train again from step 1
    seen.clear()
    train_lesion_segmenter(cases, cfg, part, seed=3, progress=False, callback=lambda s, i: seen.append(s))
    assert seen == []
    with pytest.raises(Killed):
        train_lesion_segmenter(cases, cfg, part, seed=4, progress=False, callback=kill_at_5)
    train_lesion_segmenter(cases, cfg, part, seed=5, progress=False, callback=lambda s, i: seen.append(s))
    assert seen == [1, 2, 3, 4, 5, 6]


def _rewrite_meta(src, dst, **changes):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["breastfusion.lesion_segmenter"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    meta.update(changes)
    save_file(tensors, str(dst), metadata={"breastfusion.lesion_segmenter": json.dumps(meta)})
    return dst


def test_bad_model_files_raise_bundle_error_naming_the_file(trained, tmp_path):
    from safetensors.torch import save_file

    meta = load_lesion_segmenter(trained).meta
    cases = {"missing": (tmp_path / "absent.safetensors", "not found")}
    p = tmp_path / "garbage.safetensors"
    p.write_bytes(b"\x00\x01 this is not a model" * 10)
    cases["garbage"] = (p, "not a valid safetensors")
    p = tmp_path / "truncated.safetensors"
    p.write_bytes(trained.read_bytes()[:-100])
    cases["truncated"] = (p, "not a valid safetensors")
    p = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(p), metadata={"other": "tool"})
    cases["foreign"] = (p, "not a breastfusion lesion segmenter")
    cases["format"] = (_rewrite_meta(trained, tmp_path / "fmt.safetensors", format="breastfusion.nuclei.unet"),
                       "not a breastfusion lesion segmenter")
    cases["newer"] = (_rewrite_meta(trained, tmp_path / "new.safetensors", format_version=99), "newer")
    arch = {**meta["architecture"], "decoder_channels": [32, 32, 32, 24, 16]}
    cases["arch"] = (_rewrite_meta(trained, tmp_path / "arch.safetensors", architecture=arch), "do not match")
    cases["thr"] = (_rewrite_meta(trained, tmp_path / "thr.safetensors",
                                  postprocessing={"threshold": 1.5, "min_area_fraction": 0.0}), "threshold")
    cases["size"] = (_rewrite_meta(trained, tmp_path / "size.safetensors",
                                   preprocessing={**meta["preprocessing"], "size": 70}), "size")
    p = tmp_path / "badjson.safetensors"
    save_file({"w": torch.zeros(3)}, str(p), metadata={"breastfusion.lesion_segmenter": "{not json"})
    cases["json"] = (p, "unreadable metadata")
    tensors = {k: v.contiguous().clone() for k, v in load_lesion_segmenter(trained).net.state_dict().items()}
    tensors["segmentation_head.0.weight"][:] = float("nan")
    p = tmp_path / "nan.safetensors"
    save_file(tensors, str(p), metadata={"breastfusion.lesion_segmenter": json.dumps(meta)})
    cases["nan"] = (p, "non-finite")
    for name, (path, needle) in cases.items():
        with pytest.raises(BundleError, match=needle) as ei:
            load_lesion_segmenter(path)
        assert str(path) in str(ei.value), name


def test_offline_pretrained_weights_fill_the_encoder(monkeypatch):
    """The ImageNet weights that create_backbone finds (offline here: the efficientnet-lite0 package) fill every
    encoder tensor of the U-Net."""
    monkeypatch.setenv("BREASTFUSION_OFFLINE", "1")
    from breastfusion.models.pretrained import create_backbone

    torch.manual_seed(0)
    net = build_unet("tf_efficientnet_lite0")
    before = {k: v.clone() for k, v in net.encoder.model.state_dict().items()}
    ws = load_encoder_weights(net, "tf_efficientnet_lite0", pretrained=True)
    assert ws["kind"] == "package" and "efficientnet" in ws["detail"].lower()
    ref, _ = create_backbone("tf_efficientnet_lite0", pretrained=True, quiet=True)
    ref_sd = ref.state_dict()
    enc = net.encoder.model.state_dict()
    assert len(enc) > 200
    for k, v in enc.items():
        assert torch.equal(v, ref_sd[k]), k
    assert not torch.equal(before["conv_stem.weight"], enc["conv_stem.weight"])
    assert load_encoder_weights(build_unet(), "tf_efficientnet_lite0", pretrained=False)["kind"] == "random"


# ---------------------------------------------------------------- masks in the cases-table layout
class FixedSegmenter(LesionSegmenter):
    """A segmenter whose probability map is given: tests the file layout without a network."""

    def __init__(self, prob_fn, digest="fixed0000"):
        super().__init__(net=torch.nn.Identity(), meta={"preprocessing": {"size": 64},
                                                        "postprocessing": {"threshold": 0.5,
                                                                           "min_area_fraction": 0.001}},
                         digest=digest)
        self.prob_fn, self.calls = prob_fn, 0

    def probability_many(self, images, *, batch_size=8):
        self.calls += len(images)
        return [self.prob_fn(np.asarray(im)) for im in images]


def _two_blobs(img):
    p = np.zeros(img.shape[:2], np.float32)
    if img.mean() > 10:  # the black image gets no lesion
        p[5:25, 5:30] = 0.9
        p[35:60, 45:75] = 0.8
    return p


def test_segment_cases_layout_several_lesions_and_no_lesion(tmp_path):
    write_png(tmp_path / "in" / "a.png", np.full((64, 80), 120, np.uint8))
    write_png(tmp_path / "in" / "b.png", np.zeros((64, 80), np.uint8))
    cases = pd.DataFrame({"case_id": ["benign/a b(1)", "x:b"], "image_path": [str(tmp_path / "in" / "a.png"),
                                                                                 str(tmp_path / "in" / "b.png")],
                          "mask_path": [np.nan, np.nan], "age": [50, 60]})
    seg = FixedSegmenter(_two_blobs)
    out = segment_cases(cases, seg, tmp_path / "out", progress=False)
    assert list(out["age"]) == [50, 60] and out["segmentation_error"].isna().all()
    a = mask_list(out.at[0, "mask_path"])
    assert [os.path.basename(p) for p in a] == ["a b(1)_mask.png", "a b(1)_mask_1.png"]
    assert all(os.path.isabs(p) and os.path.dirname(p).endswith(os.path.join("masks", "benign")) for p in a)
    first, second = (read_mask(p) for p in a)
    assert first.sum() == 25 * 30 and second.sum() == 20 * 25  # one file per lesion, the largest first
    assert out.at[0, "n_components"] == 2 and out.at[0, "mask_area_px"] == 1250 and not out.at[0, "fallback_used"]
    b = mask_list(out.at[1, "mask_path"])  # "no lesion" is an explicit empty mask file
    assert len(b) == 1 and b[0].endswith("_mask.png") and "x_b_" in b[0] and not read_mask(b[0]).any()
    assert out.at[1, "n_components"] == 0
    # resumable: nothing is redone with the same model; another model redoes, and stale extra files go
    assert seg.calls == 2
    segment_cases(cases, seg, tmp_path / "out", progress=False)
    assert seg.calls == 2
    one = FixedSegmenter(lambda im: np.pad(np.full((10, 10), 0.9, np.float32), ((0, im.shape[0] - 10),
                                                                                 (0, im.shape[1] - 10))), "other")
    out2 = segment_cases(cases, one, tmp_path / "out", progress=False)
    assert one.calls == 2 and len(mask_list(out2.at[0, "mask_path"])) == 1
    assert not os.path.exists(a[1])
    # require_lesion keeps the most likely region and flags it
    weak = FixedSegmenter(lambda im: np.where(np.arange(im.shape[1]) < 20, 0.3, 0.05).astype(np.float32)
                          * np.ones(im.shape[:2], np.float32), "weak")
    out3 = segment_cases(cases, weak, tmp_path / "out3", require_lesion=True, progress=False)
    assert out3["fallback_used"].all() and (out3["n_components"] == 1).all()


def test_segment_cases_bad_image_is_a_logged_skip(trained, cohort, tmp_path, caplog):
    cases = cohort.head(4).copy()
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG broken")
    cases.loc[cases.index[1], "image_path"] = str(bad)
    cases.loc[cases.index[2], "image_path"] = str(tmp_path / "missing.png")
    with caplog.at_level(logging.WARNING):
        out = segment_cases(cases, trained, tmp_path / "out", progress=False)
    assert out["segmentation_error"].notna().tolist() == [False, True, True, False]
    assert out["mask_path"].isna().tolist() == [False, True, True, False]  # NaN: no mask, never "no lesion"
    assert "broken.png" in out.at[1, "segmentation_error"] and "broken.png" in caplog.text
    assert pd.isna(out.at[1, "n_components"]) and out.at[3, "n_components"] >= 0


# ---------------------------------------------------------------- cross-validation
def test_cross_validation_out_of_fold(cohort, tmp_path):
    from breastfusion.data.splits import make_splits

    cases = cohort.head(20).reset_index(drop=True)
    splits = make_splits(cases, n_splits=2, seed=0)
    cfg = SegmentationConfig(**FAST, steps=3)
    oof, scores = cross_validate_segmenter(cases, splits, cfg, tmp_path / "cv", seed=0, progress=False, n_boot=50,
                                           n_overlays=4)
    assert list(oof["case_id"]) == list(cases["case_id"]) and oof["mask_path"].notna().all()
    fold = dict(zip(splits["case_id"], splits["fold"]))
    assert (oof["fold"] == oof["case_id"].map(fold)).all()
    for k in (0, 1):  # each fold's segmenter trained on the other fold only
        tr = load_lesion_segmenter(tmp_path / "cv" / f"fold_{k}" / "segmenter.safetensors").meta["training"]
        assert tr["n_cases"] == int((splits["fold"] != k).sum())
        for p in oof.loc[oof["fold"] == k, "mask_path"]:
            assert os.path.join("cv", f"fold_{k}", "masks") in p
    assert oof["expert_mask_path"].tolist() == cases["mask_path"].tolist()
    assert len(scores) == 18 and set(scores["case_id"]).isdisjoint({"c004", "c005"})  # NaN masks are not scored
    summary = json.loads((tmp_path / "cv" / "summary.json").read_text())
    assert summary["n_cases"] == 18 and summary["lesion_cases"]["n_cases"] == 14 and "ci95" in summary["dice"]
    assert len(list((tmp_path / "cv" / "overlays").glob("*.png"))) == 4
    table = pd.read_csv(tmp_path / "cv" / "oof_cases.csv")
    assert not table["mask_path"].str.startswith("/").any()  # relative to the table
    # resumable: a second run reuses every fold's model and masks
    mtime = (tmp_path / "cv" / "fold_0" / "segmenter.safetensors").stat().st_mtime_ns
    oof2, _ = cross_validate_segmenter(cases, splits, cfg, tmp_path / "cv", seed=0, progress=False, n_boot=50,
                                       n_overlays=0)
    assert (tmp_path / "cv" / "fold_0" / "segmenter.safetensors").stat().st_mtime_ns == mtime
    assert oof2["mask_path"].tolist() == oof["mask_path"].tolist()


# ---------------------------------------------------------------- CLI
def test_cli_segment_train_and_predict(cohort, tmp_path, capsys):
    from breastfusion.cli import main
    from breastfusion.data.cases import write_cases

    table = write_cases(cohort.head(14), tmp_path / "cases.csv")
    rc = main(["segment", "train", "--data", str(table), "--out", str(tmp_path / "run"), "--quiet",
               "--set", "segmentation.size=64", "--set", "segmentation.steps=2", "--set",
               "segmentation.batch_size=4", "--set", "segmentation.pretrained=false", "--set",
               "segmentation.device=cpu"])
    assert rc == 0
    model = tmp_path / "run" / "segmenter.safetensors"
    assert model.exists() and "lesion segmenter" in capsys.readouterr().out
    folder = tmp_path / "images"
    for i in range(3):
        write_png(folder / f"img{i}.png", synthetic_case(np.random.default_rng(i))[0])
    (folder / "broken.png").write_bytes(b"nope")
    rc = main(["segment", "predict", str(model), str(folder), "--out", str(tmp_path / "pred"), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0 and "3 case(s) segmented" in captured.out and "broken" in captured.err
    out = pd.read_csv(tmp_path / "pred" / "cases.csv")
    assert len(out) == 4 and out["mask_path"].notna().sum() == 3
    assert (tmp_path / "pred" / "masks" / "img0_mask.png").exists()
    rc = main(["segment", "predict", str(model), str(tmp_path / "nothing_here"), "--out", str(tmp_path / "p2")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "nothing_here" in err and err.count("\n") == 1
    rc = main(["segment", "predict", str(table), str(folder), "--out", str(tmp_path / "p3")])
    assert rc == 2 and "not a valid safetensors" in capsys.readouterr().err


def test_cli_segment_cv(cohort, tmp_path, capsys):
    from breastfusion.cli import main
    from breastfusion.data.cases import write_cases

    cases = cohort.head(14).copy()
    normal = cases["mask_path"].eq("")  # in a CSV '' and NaN look alike: normal images get empty mask files
    cases.loc[normal, "mask_path"] = [str(write_png(tmp_path / f"empty{i}_mask.png", np.zeros((64, 80), np.uint8)))
                                      for i in range(int(normal.sum()))]
    table = write_cases(cases, tmp_path / "cases.csv")
    args = ["segment", "cv", "--data", str(table), "--out", str(tmp_path / "cv"), "--quiet", "--set",
            "segmentation.size=64", "--set", "segmentation.steps=2", "--set", "segmentation.pretrained=false",
            "--set", "segmentation.device=cpu", "--set", "cv.n_splits=2", "--set", "experiment.n_boot=20"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 folds" in out and "12 case(s) scored" in out and "Dice" in out  # 2 of 14 have no mask (NaN)
    for name in ("splits.csv", "audit/groups.csv", "oof_cases.csv", "scores.csv", "summary.json",
                 "fold_0/segmenter.safetensors", "fold_1/segmenter.safetensors"):
        assert (tmp_path / "cv" / name).exists(), name
    assert not json.loads((tmp_path / "cv" / "summary.json").read_text())["require_lesion"]  # 'normal' is a class
