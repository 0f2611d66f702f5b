"""Tests of breastfusion.features.nuclei.learned, breastfusion.training.nuclei and the annotated-folder reader
(features.nuclei.annotations.load_annotated_dir) on small SYNTHETIC tiles (dark ellipses on a pink background):
training for a few steps, the safetensors model file and its validation, resume after an interruption, sliding-
window inference on any image size, annotated-folder layouts, the CLI; and one real-data check that reads a
MoNuSeg-layout folder (skipped when ../shared/data is absent)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from conftest import require_shared, write_png
from skimage.draw import ellipse

from breastfusion.cli import main as cli_main
from breastfusion.data.stain import StainAugment
from breastfusion.errors import BundleError, ConfigError, DataError
from breastfusion.features.nuclei import dice, write_instance_mask
from breastfusion.features.nuclei.annotations import load_annotated_dir
from breastfusion.features.nuclei.learned import (
    FORMAT,
    NucleiUNet,
    load_nuclei_model,
    nuclei_from_maps,
    predict_nuclei_maps,
    segment_nuclei_learned,
)
from breastfusion.training.nuclei import (
    _hed_augment,
    instance_targets,
    train_nuclei_model,
)

torch.set_num_threads(1)

# Small and fast: the synthetic tiles are at 0.5 µm/px and the network works at the same resolution.
FAST = {"mpp": 0.5, "work_mpp": 0.5, "channels": (8, 16, 32), "crop": 48, "batch_size": 4, "lr": 1e-2,
        "progress": False}


def synthetic_tile(seed: int, shape=(96, 96), n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """SYNTHETIC H&E-like tile: dark purple ellipses (some touching) on pink; returns (uint8 RGB, int32 labels)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    labels = np.zeros(shape, dtype=np.int32)
    k = 0
    for _ in range(n):
        r, c = rng.uniform(4, h - 4), rng.uniform(4, w - 4)
        rr, cc = ellipse(r, c, rng.uniform(3.5, 6.5), rng.uniform(3.5, 6.5), shape=shape, rotation=rng.uniform(0, np.pi))
        if (labels[rr, cc] > 0).mean() > 0.3:  # keep nuclei mostly separate; touching is fine
            continue
        k += 1
        labels[rr, cc] = k
    pink = np.array([235.0, 190.0, 215.0])
    purple = np.array([85.0, 45.0, 125.0])
    img = np.where(labels[..., None] > 0, purple, pink) + rng.normal(0, 8, (*shape, 3))
    return np.clip(img, 0, 255).astype(np.uint8), labels


@pytest.fixture(scope="module")
def tiles():
    return [synthetic_tile(s) for s in range(4)]


@pytest.fixture(scope="module")
def trained(tiles, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "nuclei.safetensors"
    imgs, labs = zip(*tiles[:3])
    extra = [(tiles[3][0], tiles[3][1] > 0)]
    path = train_nuclei_model(imgs, labs, out_path=out, steps=60, extra_foreground=extra, seed=0, **FAST)
    return path


# ---------------------------------------------------------------- targets, augmentation, network


def test_instance_targets_normalised_distance():
    lab = np.zeros((12, 20), dtype=np.int32)
    lab[2:9, 2:9] = 1
    lab[2:9, 9:16] = 2  # touching square
    fg, dist = instance_targets(lab)
    assert fg.dtype == np.float32 and fg.sum() == (lab > 0).sum()
    assert dist[lab == 0].max() == 0
    assert dist[lab == 1].max() == pytest.approx(1.0) and dist[lab == 2].max() == pytest.approx(1.0)
    assert dist[5, 8] < dist[5, 5] and dist[5, 9] < dist[5, 12]  # valley where the two nuclei touch


def test_hed_augment_matches_stain_augment():
    rgb, _ = synthetic_tile(1, (16, 16))
    alpha, beta = np.array([1.04, 0.97, 1.01]), np.array([0.03, -0.02, 0.01])
    ref = StainAugment.apply(rgb, alpha, beta)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].double() / 255.0
    out = _hed_augment(x, torch.tensor(alpha)[None], torch.tensor(beta)[None])[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(out - ref).max() <= 1.0


def test_unet_shapes():
    net = NucleiUNet((4, 8, 16)).eval()
    with torch.no_grad():
        y = net(torch.rand(2, 3, 40, 24))
    assert y.shape == (2, 2, 40, 24) and net.multiple == 4


# ---------------------------------------------------------------- train, save, load, segment


def test_train_load_segment(trained, tiles):
    model = load_nuclei_model(trained)
    assert model.meta["format"] == FORMAT and model.meta["architecture"]["channels"] == [8, 16, 32]
    assert model.mpp == 0.5 and model.work_mpp == 0.5 and model.meta["magnification"] == 20.0
    tr = model.meta["training"]
    assert tr["steps"] == 60 and tr["instance_tiles"] == 3 and tr["foreground_only_tiles"] == 1
    assert not trained.with_name(trained.name + ".ckpt").exists()  # checkpoint removed once the model is saved
    img, gt = synthetic_tile(99)  # unseen tile
    labels = segment_nuclei_learned(img, model, mpp=0.5)
    assert labels.dtype == np.int32 and labels.shape == gt.shape and labels.min() == 0
    assert np.array_equal(np.unique(labels), np.arange(labels.max() + 1))  # consecutive ids
    assert dice(labels, gt) > 0.85
    assert 0.5 * gt.max() <= labels.max() <= 2 * gt.max()
    assert dice(segment_nuclei_learned(img, model, mpp=0.5, tta=True), gt) > 0.85  # flip test-time augmentation
    # the path works as well as a loaded model, and post-processing overrides apply
    assert np.array_equal(segment_nuclei_learned(img, trained, mpp=0.5), labels)
    assert segment_nuclei_learned(img, model, mpp=0.5, fg_threshold=0.999).max() <= labels.max()
    with pytest.raises(ValueError, match="Unknown post-processing"):
        segment_nuclei_learned(img, model, mpp=0.5, threshold=0.3)


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (37, 123), (200, 61)])
def test_segment_any_size(trained, shape):
    model = load_nuclei_model(trained)
    rgb = synthetic_tile(7, (max(shape[0], 16), max(shape[1], 16)))[0][: shape[0], : shape[1]]
    labels = segment_nuclei_learned(rgb, model, mpp=0.5)
    assert labels.shape == shape and labels.dtype == np.int32


def test_sliding_windows_agree_with_one_window(trained):
    model = load_nuclei_model(trained)
    rgb = np.concatenate([synthetic_tile(s, (80, 160))[0] for s in (11, 12)], axis=0)  # 160 x 160
    fg1, _ = predict_nuclei_maps(rgb, model, mpp=0.5, window=512)
    fg2, _ = predict_nuclei_maps(rgb, model, mpp=0.5, window=48, overlap=16)  # many overlapping windows
    assert fg1.shape == fg2.shape == rgb.shape[:2]
    assert np.mean(np.abs(fg1 - fg2)) < 0.05 and np.mean((fg1 > 0.5) == (fg2 > 0.5)) > 0.95


def test_other_pixel_size_is_resampled(trained):
    model = load_nuclei_model(trained)
    img, gt = synthetic_tile(5)
    big = np.repeat(np.repeat(img, 2, axis=0), 2, axis=1)  # the same tile at 0.25 µm/px
    labels = segment_nuclei_learned(big, model, mpp=0.25)
    assert labels.shape == big.shape[:2]
    assert dice(labels[::2, ::2], gt) > 0.6


def test_nuclei_from_maps_splits_touching():
    fg = np.zeros((20, 40), dtype=np.float32)
    fg[4:16, 4:36] = 1.0
    lab = np.zeros(fg.shape, dtype=np.int32)
    lab[4:16, 4:20], lab[4:16, 20:36] = 1, 2
    _, dist = instance_targets(lab)
    out = nuclei_from_maps(fg, dist, mpp=0.5, min_area_um2=1.0)
    assert out.max() == 2 and out.dtype == np.int32
    assert nuclei_from_maps(np.zeros_like(fg), dist, mpp=0.5).max() == 0


# ---------------------------------------------------------------- resume


def test_resume_after_interruption_matches_uninterrupted(tiles, tmp_path):
    imgs, labs = zip(*tiles[:2])
    kw = dict(FAST, steps=6, checkpoint_every=2, seed=3)
    full = train_nuclei_model(imgs, labs, out_path=tmp_path / "full.safetensors", **kw)

    class Killed(Exception):
        pass

    def kill_at_5(step, info):
        assert np.isfinite(info["loss"]) and info["lr"] > 0
        if step == 5:
            raise Killed

    part = tmp_path / "part.safetensors"
    with pytest.raises(Killed):
        train_nuclei_model(imgs, labs, out_path=part, callback=kill_at_5, **kw)
    ckpt = part.with_name(part.name + ".ckpt")
    assert ckpt.exists() and not part.exists()
    with pytest.raises(BundleError, match="training checkpoint"):
        load_nuclei_model(ckpt)
    seen = []
    train_nuclei_model(imgs, labs, out_path=part, callback=lambda s, i: seen.append(s), **kw)
    assert seen == [5, 6]  # resumed after the checkpoint of step 4
    a, b = load_nuclei_model(full).net.state_dict(), load_nuclei_model(part).net.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # other settings: the checkpoint is not reused
    with pytest.raises(Killed):
        train_nuclei_model(imgs, labs, out_path=part, callback=kill_at_5, **kw)
    seen.clear()
    train_nuclei_model(imgs, labs, out_path=part, callback=lambda s, i: seen.append(s), **{**kw, "seed": 4})
    assert seen == [1, 2, 3, 4, 5, 6]


def test_train_input_errors(tiles, tmp_path):
    img, lab = tiles[0]
    out = tmp_path / "m.safetensors"
    with pytest.raises(DataError, match="shape"):
        train_nuclei_model([img], [lab[:50]], out_path=out, steps=1, **FAST)
    with pytest.raises(DataError, match="pair up"):
        train_nuclei_model([img, img], [lab], out_path=out, steps=1, **FAST)
    with pytest.raises(DataError, match="at least one"):
        train_nuclei_model([], [], out_path=out, steps=1, **FAST)
    with pytest.raises(ConfigError, match="crop"):
        train_nuclei_model([img], [lab], out_path=out, steps=1, **{**FAST, "crop": 50})
    with pytest.raises(ConfigError, match="not both"):
        train_nuclei_model([img], [lab], out_path=out, steps=1, epochs=1.0, **FAST)
    assert not out.exists()


# ---------------------------------------------------------------- bad model files


def _rewrite_meta(src, dst, **changes):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["breastfusion.nuclei"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    meta.update(changes)
    save_file(tensors, str(dst), metadata={"breastfusion.nuclei": json.dumps(meta)})
    return dst


def test_bad_model_files_raise_bundle_error_naming_the_file(trained, tmp_path):
    from safetensors.torch import save_file

    cases = {}
    cases["missing"] = (tmp_path / "absent.safetensors", "not found")
    p = tmp_path / "garbage.safetensors"
    p.write_bytes(b"\x00\x01 this is not a model" * 10)
    cases["garbage"] = (p, "not a valid safetensors")
    p = tmp_path / "truncated.safetensors"
    p.write_bytes(trained.read_bytes()[:-100])
    cases["truncated"] = (p, "not a valid safetensors")
    p = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(p), metadata={"other": "tool"})
    cases["foreign"] = (p, "not a breastfusion nuclei model")
    cases["format"] = (_rewrite_meta(trained, tmp_path / "fmt.safetensors", format="something.else"), "not a breastfusion")
    cases["newer"] = (_rewrite_meta(trained, tmp_path / "new.safetensors", format_version=99), "newer")
    cases["arch"] = (_rewrite_meta(trained, tmp_path / "arch.safetensors",
                                   architecture={"name": "unet", "channels": [8, 16, 64]}), "do not match")
    cases["mpp"] = (_rewrite_meta(trained, tmp_path / "mpp.safetensors", mpp=-1), "mpp")
    cases["thr"] = (_rewrite_meta(trained, tmp_path / "thr.safetensors", postprocess={"fg_threshold": 2}), "fg_threshold")
    p = tmp_path / "badjson.safetensors"
    save_file({"w": torch.zeros(3)}, str(p), metadata={"breastfusion.nuclei": "{not json"})
    cases["json"] = (p, "unreadable metadata")
    for name, (path, needle) in cases.items():
        with pytest.raises(BundleError, match=needle) as ei:
            load_nuclei_model(path)
        assert str(path) in str(ei.value), name
    with pytest.raises(BundleError, match="not found"):
        segment_nuclei_learned(np.zeros((8, 8, 3), np.uint8), tmp_path / "absent.safetensors")


# ---------------------------------------------------------------- annotated folders

XML_HEAD = '<?xml version="1.0"?>\n<Annotations><Annotation Id="1"><Regions>'
XML_TAIL = "</Regions></Annotation></Annotations>"


def _xml_for(labels: np.ndarray) -> str:
    """ImageScope XML with one rectangle Region per label (its bounding box): good enough for loading tests."""
    regions = []
    for k in range(1, labels.max() + 1):
        rr, cc = np.nonzero(labels == k)
        if rr.size == 0:
            continue
        y0, y1, x0, x1 = rr.min(), rr.max() + 1, cc.min(), cc.max() + 1
        v = "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1)))
        regions.append(f'<Region Id="{k}"><Vertices>{v}</Vertices></Region>')
    return XML_HEAD + "".join(regions) + XML_TAIL


def _make_dir(root, tiles, *, kinds=("xml", "mask", "binary")):
    (root / "images").mkdir(parents=True)
    for i, ((img, lab), kind) in enumerate(zip(tiles, kinds)):
        write_png(root / "images" / f"t{i}.png", img)
        if kind == "xml":
            (root / "annotations").mkdir(exist_ok=True)
            (root / "annotations" / f"t{i}.xml.gz").write_bytes(gzip.compress(_xml_for(lab).encode()))
        elif kind == "mask":
            write_instance_mask(lab, root / "masks" / f"t{i}_nuclei.png")
        elif kind == "binary":
            write_png(root / "binary_masks" / f"t{i}.png", (lab > 0).astype(np.uint8))
    return root


def test_load_annotated_dir_layouts(tiles, tmp_path):
    root = _make_dir(tmp_path / "ds", tiles[:3])
    data = load_annotated_dir(root)
    assert [t.name for t in data.tiles] == ["t0", "t1"] and [t.name for t in data.foreground_only] == ["t2"]
    assert data.tiles[0].labels.max() == tiles[0][1].max()  # one label per XML region
    np.testing.assert_array_equal(data.tiles[1].labels, tiles[1][1])  # instance mask read back exactly
    assert data.tiles[0].image.dtype == np.uint8 and data.foreground_only[0].labels is None
    np.testing.assert_array_equal(data.foreground_only[0].mask, tiles[2][1] > 0)
    assert len(data) == 3 and data.skipped == []

    # images directly in the folder, <stem>.png instance masks in masks/
    flat = tmp_path / "flat"
    write_png(flat / "a.png", tiles[0][0])
    write_instance_mask(tiles[0][1], flat / "masks" / "a.png")
    assert [t.name for t in load_annotated_dir(flat).tiles] == ["a"]


def test_load_annotated_dir_errors(tiles, tmp_path):
    root = _make_dir(tmp_path / "ds", tiles[:2], kinds=("xml", "mask"))
    write_png(root / "images" / "orphan.png", tiles[2][0])  # no annotation
    with pytest.raises(DataError, match="no annotation") as ei:
        load_annotated_dir(root)
    assert "orphan.png" in str(ei.value)
    data = load_annotated_dir(root, strict=False)
    assert len(data.tiles) == 2 and any("orphan.png" in s for s, _ in data.skipped)
    (root / "images" / "orphan.png").unlink()

    write_instance_mask(tiles[1][1][:50], root / "masks" / "t1_nuclei.png")  # wrong size
    with pytest.raises(DataError, match="differs") as ei:
        load_annotated_dir(root)
    assert "t1_nuclei.png" in str(ei.value) and "t1.png" in str(ei.value)
    assert len(load_annotated_dir(root, strict=False).tiles) == 1

    (root / "annotations" / "t0.xml.gz").write_bytes(b"\x1f\x8b broken gzip")  # unreadable: skipped and logged
    with pytest.raises(DataError, match="No usable image"):
        load_annotated_dir(root, strict=False)
    write_instance_mask(tiles[1][1], root / "masks" / "t1_nuclei.png")
    data = load_annotated_dir(root)
    assert [t.name for t in data.tiles] == ["t1"] and "t0.xml.gz" in data.skipped[0][0]

    (root / "images" / "t1.png").write_bytes(b"not a png")  # unreadable image
    with pytest.raises(DataError, match="No usable"):
        load_annotated_dir(root)
    with pytest.raises(DataError, match="not found"):
        load_annotated_dir(tmp_path / "nope")


# ---------------------------------------------------------------- CLI


def test_cli_train_and_segment(tiles, tmp_path, capsys):
    root = _make_dir(tmp_path / "ds", tiles[:3], kinds=("mask", "mask", "binary"))
    model = tmp_path / "m.safetensors"
    rc = cli_main(["nuclei", "train", str(root), "--out", str(model), "--steps", "3", "--mpp", "0.5",
                   "--work-mpp", "0.5", "--crop", "48", "--batch-size", "2", "--device", "cpu", "--threads", "1",
                   "--quiet"])
    assert rc == 0 and model.exists()
    assert "2 tile(s)" in capsys.readouterr().out
    assert load_nuclei_model(model).meta["training"]["foreground_only_tiles"] == 1

    out = tmp_path / "seg"
    rc = cli_main(["nuclei", "segment", str(root / "images"), "--out", str(out), "--method", "learned",
                   "--model", str(model), "--mpp", "0.5", "--device", "cpu"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["nuclei_features.csv", "t0_nuclei.png", "t1_nuclei.png",
                                                     "t2_nuclei.png"]
    rc = cli_main(["nuclei", "segment", str(root / "images"), "--out", str(out), "--method", "learned"])
    assert rc == 2 and "--model" in capsys.readouterr().err
    rc = cli_main(["nuclei", "segment", str(root / "images"), "--out", str(out), "--method", "learned",
                   "--model", str(tmp_path / "absent.safetensors")])
    assert rc == 2 and "absent.safetensors" in capsys.readouterr().err
    # the classical method keeps its naming
    out2 = tmp_path / "seg2"
    assert cli_main(["nuclei", "segment", str(root / "images" / "t0.png"), "--out", str(out2)]) == 0
    assert sorted(p.name for p in out2.iterdir()) == ["nuclei_features.csv", "t0_nuclei.png"]


# ---------------------------------------------------------------- real data


def test_monuseg_layout_real_data(tmp_path):
    """Two real MoNuSeg tiles (one with ImageScope XML, one with only a binary mask) in the MoNuSeg layout."""
    root = require_shared("monuseg")
    xml = min((root / "annotations").glob("*.xml.gz"))
    stem = xml.name.split(".")[0]
    other = next(p for p in sorted((root / "binary_masks").glob("*.png"))
                 if not (root / "annotations" / f"{p.stem}.xml.gz").exists())
    sub = tmp_path / "monuseg"
    for d in ("images", "annotations", "binary_masks"):
        (sub / d).mkdir(parents=True)
    (sub / "images" / f"{stem}.tif").symlink_to(root / "images" / f"{stem}.tif")
    (sub / "annotations" / xml.name).symlink_to(xml)
    (sub / "images" / f"{other.stem}.tif").symlink_to(root / "images" / f"{other.stem}.tif")
    (sub / "binary_masks" / other.name).symlink_to(other)
    data = load_annotated_dir(sub)
    assert [t.name for t in data.tiles] == [stem] and [t.name for t in data.foreground_only] == [other.stem]
    t = data.tiles[0]
    assert t.image.shape == (1000, 1000, 3) and t.labels.shape == (1000, 1000)
    assert t.n_nuclei > 100
    # the rasterised outlines agree with the challenge's own binary mask (MANIFEST: IoU 0.88-0.93)
    from breastfusion.data.images import read_mask

    assert dice(t.labels, read_mask(root / "binary_masks" / f"{stem}.png")) > 0.9
