"""Histology dataset builders: the SYNTHETIC Nottingham-grade cohort and MoNuSeg concentric stacks."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from breastfusion.data.importers.monuseg import (
    BREAST_TILES,
    ORGANS,
    import_monuseg_stacks,
)
from breastfusion.data.synthetic_histology import (
    GRADES,
    SYNTHETIC_TAG,
    _case_params,
    concentric_stack,
    make_synthetic_grading,
)
from breastfusion.data.tiles import read_tiles, stack_table, validate_tiles
from breastfusion.errors import ConfigError, DataError

KW = {"n_patients": 12, "stacks_per_case": 2, "size": 64, "n_centers": 3, "seed": 5}


def _load(p) -> np.ndarray:
    return np.asarray(Image.open(p))


def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
    h, w = a.shape[:2]
    return a.reshape(h // k, k, w // k, k, -1).astype(float).mean(axis=(1, 3))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    out = tmp_path_factory.mktemp("hist_syn1")
    cases, tiles = make_synthetic_grading(out, signal=1.0, **KW)
    return out, cases, tiles


@pytest.fixture(scope="module")
def syn0(tmp_path_factory):
    out = tmp_path_factory.mktemp("hist_syn0")
    cases, tiles = make_synthetic_grading(out, signal=0.0, **KW)
    return out, cases, tiles


# ------------------------------------------------------------------------------------------ synthetic
def test_synthetic_tables_and_files(syn):
    out, cases, tiles = syn
    assert len(cases) == 12 and len(tiles) == 12 * 2 * 3
    assert "image_path" not in cases.columns
    assert cases["case_id"].is_unique and cases["patient_id"].is_unique
    assert sorted(cases["label"].unique()) == list(GRADES)
    assert cases["label"].value_counts().to_dict() == {"1": 4, "2": 4, "3": 4}
    assert cases["center"].nunique() == 3
    assert (pd.crosstab(cases["center"], cases["label"]) > 0).all().all()  # every centre has every grade
    for col in ("age", "tumour_size_mm"):
        assert col in cases.columns
    assert cases["_synthetic"].all() and tiles["_synthetic"].all()
    assert (out / "README.txt").read_text().startswith(SYNTHETIC_TAG)
    assert all(SYNTHETIC_TAG in p for p in tiles["image_path"])
    assert sorted(tiles["magnification"].unique()) == [10, 20, 40]
    assert np.allclose(tiles["_mpp"], 0.25 * 40 / tiles["magnification"])
    validate_tiles(tiles, cases)
    back = read_tiles(out / "tiles.csv", cases)
    assert list(back["image_path"]) == list(tiles["image_path"])
    on_disk = pd.read_csv(out / "cases.csv", dtype={"label": str})
    assert list(on_disk["label"]) == list(cases["label"]) and on_disk["_synthetic"].all()
    assert len(stack_table(back, [40, 20, 10])) == 24
    for p in tiles["image_path"].iloc[:6]:
        a = _load(p)
        assert a.shape == (64, 64, 3) and a.dtype == np.uint8


def test_synthetic_deterministic(syn, tmp_path):
    _, cases, tiles = syn
    cases2, tiles2 = make_synthetic_grading(tmp_path, signal=1.0, **KW)
    pd.testing.assert_frame_equal(cases, cases2)
    pd.testing.assert_frame_equal(tiles.drop(columns="image_path"), tiles2.drop(columns="image_path"))
    for p1, p2 in zip(tiles["image_path"].iloc[::7], tiles2["image_path"].iloc[::7]):
        assert np.array_equal(_load(p1), _load(p2))
    _, tiles3 = make_synthetic_grading(tmp_path / "other", signal=1.0, **{**KW, "seed": 6})
    assert not np.array_equal(_load(tiles["image_path"].iloc[0]), _load(tiles3["image_path"].iloc[0]))


def test_synthetic_patients_with_several_cases(tmp_path):
    cases, tiles = make_synthetic_grading(tmp_path, n_patients=3, cases_per_patient=2, stacks_per_case=1,
                                          size=32, magnifications=(40, 10), n_centers=2, seed=1)
    assert len(cases) == 6 and cases["patient_id"].nunique() == 3
    per_patient = cases.groupby("patient_id")
    assert (per_patient["label"].nunique() == 1).all() and (per_patient["center"].nunique() == 1).all()
    assert (per_patient["age"].nunique(dropna=False) == 1).all()
    assert sorted(tiles["magnification"].unique()) == [10, 40]
    validate_tiles(tiles, cases)


def test_synthetic_stacks_are_concentric(syn):
    _, _, tiles = syn
    for (_, _), g in list(tiles.groupby(["case_id", "stack_id"]))[:4]:
        t = {int(m): _load(p) for m, p in zip(g["magnification"], g["image_path"])}
        # the 40x tile, area-averaged by 2, is the central half of the 20x tile (and so on)
        assert _corr(_block_mean(t[40], 2), t[20][16:48, 16:48]) > 0.97
        assert _corr(_block_mean(t[20], 2), t[10][16:48, 16:48]) > 0.97
        assert _corr(_block_mean(t[40], 4), t[10][24:40, 24:40]) > 0.97
        assert np.abs(_block_mean(t[40], 2) - t[20][16:48, 16:48]).max() <= 2.0


def _grade_stats(cases, tiles) -> pd.DataFrame:
    rows = []
    for cid, lab in zip(cases["case_id"], cases["label"]):
        t = tiles[tiles["case_id"] == cid]
        a40 = np.stack([_load(p) for p in t.loc[t["magnification"] == 40, "image_path"]]).astype(float)
        a10 = np.stack([_load(p) for p in t.loc[t["magnification"] == 10, "image_path"]]).astype(float)
        rows.append({"grade": int(lab),
                     "dark40": float((a40[..., 0] < 140).mean()),  # haematoxylin-dark pixels: nuclei
                     "white10": float((a10.min(axis=-1) > 225).mean())})  # gland lumens at low magnification
    return pd.DataFrame(rows)


def test_synthetic_signal_moves_images_by_grade(syn, syn0):
    s1 = _grade_stats(*syn[1:])
    s0 = _grade_stats(*syn0[1:])
    m1 = s1.groupby("grade").mean()
    m0 = s0.groupby("grade").mean()
    # signal=1: bigger, darker, denser nuclei with grade; fewer gland lumens
    assert m1.loc[3, "dark40"] > m1.loc[2, "dark40"] > m1.loc[1, "dark40"]
    assert m1.loc[3, "dark40"] > 3 * m1.loc[1, "dark40"]
    assert m1.loc[1, "white10"] > 3 * m1.loc[3, "white10"]
    assert s1[["grade", "dark40"]].corr(method="spearman").iloc[0, 1] > 0.8
    # signal=0: the grade differences shrink to chance level
    spread1 = m1["dark40"].max() - m1["dark40"].min()
    spread0 = m0["dark40"].max() - m0["dark40"].min()
    assert spread0 < 0.5 * spread1


def test_synthetic_signal_zero_parameters_ignore_grade():
    params = [_case_params(np.random.default_rng(0), g, 0.0) for g in range(3)]
    assert params[0] == params[1] == params[2]
    p1 = [_case_params(np.random.default_rng(0), g, 1.0) for g in range(3)]
    assert p1[0]["nuc_radius"] < p1[2]["nuc_radius"] and p1[0]["gland_density"] > p1[2]["gland_density"]


@pytest.mark.parametrize("kwargs", [
    {"signal": -1}, {"signal": float("nan")}, {"n_patients": 2}, {"size": 8}, {"magnifications": ()},
    {"magnifications": (40, 40)}, {"magnifications": (40, 0)}, {"n_centers": 0}, {"seed": -1},
])
def test_synthetic_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        make_synthetic_grading(tmp_path, **{"n_patients": 3, "size": 32, "stacks_per_case": 1, **kwargs})


def test_concentric_stack_geometry():
    img = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) % 251).astype(np.uint8)
    st = concentric_stack(img, (32, 32), 16, (40, 20, 10))
    assert np.array_equal(st[40], img[24:40, 24:40])
    assert np.allclose(st[20], np.rint(img[16:48, 16:48].reshape(16, 2, 16, 2).astype(float).mean(axis=(1, 3))))
    assert st[10].shape == (16, 16)
    odd = concentric_stack(np.dstack([img] * 3), (32.5, 31.5), 16, (40, 25), base_magnification=40)
    assert odd[25].shape == (16, 16, 3)
    with pytest.raises(DataError):
        concentric_stack(img, (10, 10), 16, (40, 10))


# ------------------------------------------------------------------------------------------ MoNuSeg
def test_monuseg_organ_table():
    assert len(ORGANS) == 30 and len(BREAST_TILES) == 6
    counts = pd.Series(ORGANS).value_counts().to_dict()
    assert counts == {"breast": 6, "kidney": 6, "liver": 6, "prostate": 6, "bladder": 2, "colon": 2, "stomach": 2}
    assert {p.split("-")[1] for p in BREAST_TILES} == {"A7", "AR", "E2"}


@pytest.fixture(scope="module")
def monuseg(tmp_path_factory):
    from conftest import require_shared

    root = require_shared("monuseg")
    out = tmp_path_factory.mktemp("monuseg_stacks")
    cases, tiles = import_monuseg_stacks(root, out, task="breast", tile=96, stacks_per_image=2)
    return root, out, cases, tiles


def test_monuseg_real_stacks(monuseg):
    root, out, cases, tiles = monuseg
    files = sorted(p.stem for p in (root / "images").glob("TCGA-*.tif"))
    assert {f[:12] for f in files} == set(ORGANS)  # the organ table covers the files present
    assert len(cases) == 30 and len(tiles) == 30 * 2 * 3
    assert cases["label"].value_counts().to_dict() == {"other": 24, "breast": 6}
    assert set(cases.loc[cases["label"] == "breast", "patient_id"]) == set(BREAST_TILES)
    assert cases["patient_id"].is_unique
    assert (cases["center"] == cases["patient_id"].str.split("-").str[1]).all()
    assert cases["center"].nunique() == 18
    assert set(cases["_organ"]) == {"breast", "kidney", "liver", "prostate", "bladder", "colon", "stomach"}
    validate_tiles(tiles, cases)
    back = read_tiles(out / "tiles.csv", cases)
    assert len(stack_table(back, [40, 20, 10])) == 60
    assert np.allclose(tiles["_mpp"], 0.25 * 40 / tiles["magnification"])
    assert tiles["_source"].str.endswith(".tif").all()
    field = 96 * 4
    assert tiles["_x"].between(field / 2, 1000 - field / 2).all() and tiles["_y"].between(field / 2, 1000 - field / 2).all()
    assert (tiles.groupby("case_id")["_x"].nunique() == 2).all()
    for p in tiles["image_path"].iloc[:6]:
        a = _load(p)
        assert a.shape == (96, 96, 3) and a.dtype == np.uint8
    g = tiles[(tiles["case_id"] == cases["case_id"].iloc[0]) & (tiles["stack_id"] == "0")]
    t = {int(m): _load(p) for m, p in zip(g["magnification"], g["image_path"])}
    assert _corr(_block_mean(t[40], 2), t[20][24:72, 24:72]) > 0.97
    assert _corr(_block_mean(t[20], 2), t[10][24:72, 24:72]) > 0.97
    assert "PROXY" in (out / "README.txt").read_text()


def test_monuseg_organ_task_and_unreadable_image(tmp_path, caplog):
    from conftest import require_shared

    src = require_shared("monuseg", "images")
    img_dir = tmp_path / "mini" / "images"
    img_dir.mkdir(parents=True)
    for name in ("TCGA-B0-5698-01Z-00-DX1.tif", "TCGA-AR-A1AK-01Z-00-DX1.tif"):
        shutil.copy(src / name, img_dir / name)
    (img_dir / "TCGA-RD-A8N9-01A-01-TS1.tif").write_bytes(b"not a tiff")
    with caplog.at_level(logging.WARNING, logger="breastfusion.data.importers.monuseg"):
        cases, tiles = import_monuseg_stacks(tmp_path / "mini", tmp_path / "out", task="organ",
                                             magnifications=(40, 10), tile=64, stacks_per_image=1)
    assert "TCGA-RD-A8N9-01A-01-TS1.tif" in caplog.text
    assert dict(zip(cases["patient_id"], cases["label"])) == {"TCGA-B0-5698": "kidney", "TCGA-AR-A1AK": "breast"}
    assert len(tiles) == 2 * 2 and set(tiles["_x"]) == {500.0}


def test_monuseg_errors(tmp_path):
    with pytest.raises(DataError, match="not found.*nowhere"):
        import_monuseg_stacks(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="empty"):
        import_monuseg_stacks(tmp_path / "empty", tmp_path / "out")
    bad = tmp_path / "bad" / "images"
    bad.mkdir(parents=True)
    (bad / "TCGA-A7-A13E-01Z-00-DX1.tif").write_bytes(b"broken")
    with pytest.raises(DataError, match="No usable MoNuSeg image.*TCGA-A7-A13E"):
        import_monuseg_stacks(tmp_path / "bad", tmp_path / "out")
    with pytest.raises(ConfigError):
        import_monuseg_stacks(tmp_path / "bad", tmp_path / "out", task="grade")
    with pytest.raises(ConfigError):
        import_monuseg_stacks(tmp_path / "bad", tmp_path / "out", magnifications=(80, 40))
