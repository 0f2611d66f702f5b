"""Parallel, resumable per-tile pathomics (breastfusion.features.pathomics_extract) on small SYNTHETIC H&E-like tiles
(pink background, dark purple elliptical "nuclei"), plus one real-data check on two MoNuSeg tiles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import require_shared, write_png

from breastfusion.data.tiling import (
    tiles_from_images,
    tiles_from_input,
    tiles_from_tile_index,
)
from breastfusion.errors import DataError
from breastfusion.features.pathomics import tile_feature_names
from breastfusion.features.pathomics_extract import (
    case_pathomics,
    default_mpp,
    extract_tile_pathomics,
)

SIZE = 128  # pixels; at 40x (0.25 µm/px) a 32 µm field


def synthetic_he(rng: np.random.Generator, n_nuclei: int, size: int = SIZE) -> np.ndarray:
    """Pink (eosin) background with ``n_nuclei`` dark purple (haematoxylin) ellipses, a little noise."""
    yy, xx = np.mgrid[:size, :size]
    img = np.empty((size, size, 3), np.float64)
    img[:] = (236, 170, 205)
    centres = []
    for _ in range(10_000):
        c = rng.uniform(14, size - 14, 2)
        if all(np.hypot(*(c - o)) > 26 for o in centres):
            centres.append(c)
            if len(centres) == n_nuclei:
                break
    assert len(centres) == n_nuclei, f"{n_nuclei} separate nuclei do not fit in {size} px"
    for cy, cx in centres:
        a, b, th = rng.uniform(8, 11), rng.uniform(5.5, 7.5), rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(th) + dy * np.sin(th)
        v = -dx * np.sin(th) + dy * np.cos(th)
        img[(u / a) ** 2 + (v / b) ** 2 <= 1] = (85, 45, 135)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def tile_table(tmp_path) -> pd.DataFrame:
    """3 cases; case A has 2 stacks; 6 tiles with 2-5 nuclei each."""
    rng = np.random.default_rng(7)
    rows = []
    for i, (case, stack, n) in enumerate([("A", "0", 3), ("A", "1", 5), ("B", "0", 2), ("B", "1", 4),
                                          ("C", "0", 4), ("C", "1", 3)]):
        p = write_png(tmp_path / "tiles" / f"{case}_{stack}.png", synthetic_he(rng, n))
        rows.append({"case_id": case, "stack_id": stack, "magnification": 40.0, "image_path": str(p), "_n": n})
    return pd.DataFrame(rows)


def _features(df: pd.DataFrame) -> pd.DataFrame:
    return df.set_index("image_path")[tile_feature_names()].sort_index()


def test_in_process_counts_synthetic_nuclei(tile_table, tmp_path):
    out = extract_tile_pathomics(tile_table.drop(columns="_n"), tmp_path / "run", progress=False, chunk_size=4)
    assert len(out) == 6 and out.attrs["mode"] == "in-process"
    assert list(out.columns[:5]) == ["case_id", "stack_id", "magnification", "image_path", "_mpp"]
    assert set(tile_feature_names()) <= set(out.columns)
    assert out["image_path"].tolist() == tile_table["image_path"].tolist()  # table order kept
    assert np.allclose(out["_mpp"], 0.25)
    np.testing.assert_array_equal(out["path_count"].to_numpy(), tile_table["_n"].to_numpy())
    # ellipse areas: π·a·b with a in [8, 11] px, b in [5.5, 7.5] px at 0.25 µm/px → about 8.6-16 µm²
    assert out["path_area_um2_mean"].between(7, 18).all()
    assert (out["path_density_per_mm2"] > 0).all()
    assert out.attrs["n_computed"] == 6 and out.attrs["n_shards_written"] == 2 and out.attrs["n_skipped"] == 0
    saved = pd.read_parquet(tmp_path / "run" / "tile_pathomics.parquet")
    pd.testing.assert_frame_equal(saved, out.reset_index(drop=True), check_like=False)
    assert len(list((tmp_path / "run" / "shards").glob("*.parquet"))) == 2
    skipped = pd.read_csv(tmp_path / "run" / "skipped.csv")
    assert len(skipped) == 0 and "reason" in skipped.columns


def test_local_cluster_same_numbers_and_resume(tile_table, tmp_path):
    tiles = tile_table.drop(columns="_n")
    ref = extract_tile_pathomics(tiles, tmp_path / "serial", progress=False, chunk_size=2)
    par = extract_tile_pathomics(tiles, tmp_path / "dask", n_workers=2, progress=False, chunk_size=2)
    assert "LocalCluster" in par.attrs["mode"] and par.attrs["n_computed"] == 6
    pd.testing.assert_frame_equal(_features(ref), _features(par))
    # Resume: a second run on the same folder reads the shards and computes nothing.
    shard_files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "dask" / "shards").glob("*.parquet")}
    assert len(shard_files) == 3
    again = extract_tile_pathomics(tiles, tmp_path / "dask", n_workers=2, progress=False, chunk_size=2)
    assert again.attrs["n_reused"] == 6 and again.attrs["n_computed"] == 0 and again.attrs["n_shards_written"] == 0
    assert again.attrs["mode"] == "in-process"  # no cluster started when nothing is left to do
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "dask" / "shards").glob("*.parquet")} == shard_files
    pd.testing.assert_frame_equal(_features(again), _features(par))


def test_existing_scheduler_address(tile_table, tmp_path):
    """scheduler= connects to a running cluster (here an in-process one, so it starts fast) and leaves it up."""
    from dask.distributed import LocalCluster

    tiles = tile_table.drop(columns="_n")
    ref = extract_tile_pathomics(tiles, tmp_path / "serial", progress=False)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster:
        out = extract_tile_pathomics(tiles, tmp_path / "remote", scheduler=cluster.scheduler_address,
                                     progress=False, chunk_size=1)
        assert cluster.scheduler_address in out.attrs["mode"] and len(cluster.workers) == 1  # still running
    assert out.attrs["n_shards_written"] == 6
    pd.testing.assert_frame_equal(_features(ref), _features(out))


def test_partial_resume_and_changed_settings(tile_table, tmp_path):
    tiles = tile_table.drop(columns="_n")
    first = extract_tile_pathomics(tiles.iloc[:4], tmp_path / "run", progress=False, chunk_size=2)
    assert first.attrs["n_computed"] == 4
    full = extract_tile_pathomics(tiles, tmp_path / "run", progress=False, chunk_size=2)
    assert full.attrs["n_reused"] == 4 and full.attrs["n_computed"] == 2 and len(full) == 6
    # another mpp is another computation (keys include it), and its features differ in µm units
    other = extract_tile_pathomics(tiles, tmp_path / "run", mpp=0.5, progress=False, chunk_size=3)
    assert other.attrs["n_computed"] == 6 and np.allclose(other["_mpp"], 0.5)
    ratio = other["path_tissue_area_um2"].to_numpy() / full["path_tissue_area_um2"].to_numpy()
    assert np.allclose(ratio, 4.0)
    # the per-tile _mpp column wins over mpp=
    per_tile = tiles.assign(_mpp=[0.5, 0.5, None, None, None, None])
    mixed = extract_tile_pathomics(per_tile, tmp_path / "run", progress=False)
    assert mixed.attrs["n_computed"] == 0 and mixed["_mpp"].tolist() == [0.5, 0.5, 0.25, 0.25, 0.25, 0.25]


def test_bad_tiles_are_skipped_and_listed(tile_table, tmp_path, caplog):
    tiles = tile_table.drop(columns="_n")
    corrupt = tmp_path / "tiles" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    extra = pd.DataFrame([{"case_id": "D", "stack_id": "0", "magnification": 40.0, "image_path": str(corrupt)},
                          {"case_id": "E", "stack_id": "0", "magnification": 40.0,
                           "image_path": str(tmp_path / "missing.png")}])
    with caplog.at_level("WARNING", logger="breastfusion.features.pathomics_extract"):
        out = extract_tile_pathomics(pd.concat([tiles, extra], ignore_index=True), tmp_path / "run",
                                     progress=False, chunk_size=3)
    assert len(out) == 6 and out.attrs["n_skipped"] == 2
    assert "corrupt.png" in caplog.text and "missing.png" in caplog.text
    skipped = pd.read_csv(tmp_path / "run" / "skipped.csv")
    assert skipped["case_id"].tolist() == ["D", "E"]
    assert skipped["image_path"].str.endswith("corrupt.png").iloc[0]
    assert "corrupt" in skipped["reason"].iloc[0] or "recognised" in skipped["reason"].iloc[0]
    assert "not found" in skipped["reason"].iloc[1]
    # nothing usable at all is an error naming skipped.csv
    with pytest.raises(DataError, match="skipped.csv"):
        extract_tile_pathomics(extra, tmp_path / "bad", progress=False)


def test_failed_chunk_is_skipped_not_fatal(tile_table, tmp_path, monkeypatch):
    """A task that dies as a whole (lost worker, missing package on a cluster) skips its tiles only."""
    from breastfusion.features import pathomics_extract as features

    real = features._process_chunk

    def flaky(records, method, model_path):
        if any(r["path"].endswith("B_0.png") for r in records):
            raise MemoryError("worker ran out of memory")
        return real(records, method, model_path)

    monkeypatch.setattr(features, "_process_chunk", flaky)
    out = extract_tile_pathomics(tile_table.drop(columns="_n"), tmp_path / "run", progress=False, chunk_size=2)
    assert out["case_id"].tolist() == ["A", "A", "C", "C"]
    skipped = pd.read_csv(tmp_path / "run" / "skipped.csv")
    assert skipped["stack_id"].astype(str).tolist() == ["0", "1"] and (skipped["case_id"] == "B").all()
    assert skipped["reason"].str.contains("MemoryError: worker ran out of memory").all()
    # the rerun retries only the skipped tiles
    monkeypatch.setattr(features, "_process_chunk", real)
    again = extract_tile_pathomics(tile_table.drop(columns="_n"), tmp_path / "run", progress=False, chunk_size=2)
    assert again.attrs["n_reused"] == 4 and again.attrs["n_computed"] == 2 and len(again) == 6


def test_learned_method_loads_model_once_per_process(tile_table, tmp_path, monkeypatch):
    """method='learned' imports features.nuclei.learned lazily (a stand-in module here) and keys shards by the
    model file's content."""
    import sys
    import types

    from breastfusion.features import pathomics_extract as features
    from breastfusion.features.nuclei.classical import segment_nuclei

    loads = []
    fake = types.ModuleType("breastfusion.features.nuclei.learned")
    fake.load_nuclei_model = lambda path: loads.append(path) or {"path": path}
    fake.segment_nuclei_learned = lambda rgb, model, mpp: segment_nuclei(rgb, mpp=mpp)
    monkeypatch.setitem(sys.modules, "breastfusion.features.nuclei.learned", fake)
    monkeypatch.setattr(features, "_MODEL_CACHE", {})
    model = tmp_path / "nuclei.safetensors"
    model.write_bytes(b"weights v1")
    tiles = tile_table.drop(columns="_n")
    out = extract_tile_pathomics(tiles, tmp_path / "run", method="learned", model_path=model, progress=False)
    ref = extract_tile_pathomics(tiles, tmp_path / "classical", progress=False)
    assert len(loads) == 1 and out.attrs["n_computed"] == 6  # loaded once (up front), reused for every tile
    pd.testing.assert_frame_equal(_features(out), _features(ref))
    same = extract_tile_pathomics(tiles, tmp_path / "run", method="learned", model_path=model, progress=False)
    assert same.attrs["n_computed"] == 0
    model.write_bytes(b"weights v2")  # new weights: everything is recomputed
    new = extract_tile_pathomics(tiles, tmp_path / "run", method="learned", model_path=model, progress=False)
    assert new.attrs["n_computed"] == 6 and len(loads) == 2  # and the new weights were loaded
    with pytest.raises(DataError, match="not found"):
        extract_tile_pathomics(tiles, tmp_path / "run", method="learned", model_path=tmp_path / "nope.pt",
                               progress=False)


def test_learned_method_with_a_real_model(tile_table, tmp_path):
    """End to end with breastfusion.features.nuclei.learned: a tiny U-Net trained for one step (its nuclei are
    meaningless; this checks the plumbing), and a corrupt model file failing once, up front."""
    nuclei_training = pytest.importorskip("breastfusion.training.nuclei")
    from breastfusion.errors import BreastfusionError
    from breastfusion.features.nuclei.classical import segment_nuclei

    rng = np.random.default_rng(1)
    imgs = [synthetic_he(rng, 2, size=64) for _ in range(2)]
    model = nuclei_training.train_nuclei_model(imgs, [segment_nuclei(i, mpp=0.25) for i in imgs],
                                               out_path=tmp_path / "tiny.safetensors", steps=1, crop=32,
                                               batch_size=2, channels=(2, 4), progress=False)
    tiles = tile_table.drop(columns="_n")
    out = extract_tile_pathomics(tiles, tmp_path / "run", method="learned", model_path=model, progress=False)
    assert len(out) == 6 and out.attrs["n_computed"] == 6 and (out["path_count"] >= 0).all()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    with pytest.raises(BreastfusionError, match="bad.safetensors"):
        extract_tile_pathomics(tiles, tmp_path / "run", method="learned", model_path=bad, progress=False)


def test_magnification_filter_and_mpp_default(tile_table, tmp_path):
    tiles = tile_table.drop(columns="_n")
    tiles.loc[3:, "magnification"] = 20.0
    out = extract_tile_pathomics(tiles, tmp_path / "run", magnification=20, progress=False)
    assert out["case_id"].tolist() == ["B", "C", "C"] and np.allclose(out["_mpp"], default_mpp(20)) and default_mpp(20) == 0.5
    with pytest.raises(DataError, match="10x"):
        extract_tile_pathomics(tiles, tmp_path / "run", magnification=10, progress=False)
    with pytest.raises(ValueError, match="method"):
        extract_tile_pathomics(tiles, tmp_path / "run", method="magic", progress=False)
    with pytest.raises(ValueError, match="model_path"):
        extract_tile_pathomics(tiles, tmp_path / "run", method="learned", progress=False)
    with pytest.raises(ValueError, match="Dask scheduler at 'nonsense::addr'"):
        extract_tile_pathomics(tiles, tmp_path / "other", scheduler="nonsense::addr", progress=False)


def test_case_pathomics_pools_tiles(tile_table, tmp_path):
    out = extract_tile_pathomics(tile_table.drop(columns="_n"), tmp_path / "run", progress=False)
    cases = case_pathomics(out)
    assert cases.index.name == "case_id" and cases.index.tolist() == ["A", "B", "C"]
    assert cases.columns.tolist() == tile_feature_names() + ["path_n_tiles"]
    a = out[out["case_id"] == "A"]
    assert cases.at["A", "path_n_tiles"] == 2 and cases.at["A", "path_count"] == 8
    assert cases.at["A", "path_tissue_area_um2"] == pytest.approx(a["path_tissue_area_um2"].sum())
    assert cases.at["A", "path_density_per_mm2"] == pytest.approx(8 / (a["path_tissue_area_um2"].sum() / 1e6))
    w = a["path_count"].to_numpy()
    assert cases.at["A", "path_area_um2_mean"] == pytest.approx(np.average(a["path_area_um2_mean"], weights=w))
    mixed = out.assign(magnification=[40.0, 20.0, 40.0, 40.0, 40.0, 40.0])
    with pytest.raises(DataError, match="magnification"):
        case_pathomics(mixed)
    assert case_pathomics(mixed, magnification=20).index.tolist() == ["A"]


def test_tables_from_images_and_tile_index(tile_table, tmp_path):
    imgs = tiles_from_images(tmp_path / "tiles", magnification=20)
    assert imgs["case_id"].tolist() == sorted(tile_table["case_id"] + "_" + tile_table["stack_id"])
    assert (imgs["magnification"] == 20).all()
    index = pd.DataFrame({"slide": ["s1", "s1"], "x": [10, 30], "y": [5, 5], "path_40x": ["a.png", "b.png"],
                          "path_2.5x": ["c.png", None]})
    long = tiles_from_tile_index(index)
    assert long["magnification"].tolist() == [40.0, 40.0, 2.5] and long["stack_id"].tolist() == ["10_5", "30_5", "10_5"]
    index.to_csv(tmp_path / "tiles.csv", index=False)
    resolved = tiles_from_input(tmp_path / "tiles.csv")
    assert resolved["image_path"].iloc[0] == str((tmp_path / "a.png").resolve())


def test_cli_features(tile_table, tmp_path, capsys):
    from breastfusion.cli import main

    tiles = tile_table.drop(columns="_n")
    tiles.to_csv(tmp_path / "tiles_table.csv", index=False)
    rc = main(["features", str(tmp_path / "tiles_table.csv"), "--out", str(tmp_path / "cli"), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tile_pathomics.parquet" in printed and "case_pathomics.parquet" in printed
    tile_df = pd.read_parquet(tmp_path / "cli" / "tile_pathomics.parquet")
    case_df = pd.read_parquet(tmp_path / "cli" / "case_pathomics.parquet")
    assert len(tile_df) == 6 and case_df.index.tolist() == ["A", "B", "C"]
    # a folder of images: one case per image, magnification from --magnification
    rc = main(["features", str(tmp_path / "tiles"), "--out", str(tmp_path / "cli_dir"), "--magnification", "20",
               "--quiet"])
    assert rc == 0
    by_dir = pd.read_parquet(tmp_path / "cli_dir" / "tile_pathomics.parquet")
    assert len(by_dir) == 6 and np.allclose(by_dir["_mpp"], 0.5) and (by_dir["magnification"] == 20).all()
    # nothing readable: exit code 2 with a message
    (tmp_path / "empty").mkdir()
    assert main(["features", str(tmp_path / "empty"), "--out", str(tmp_path / "cli_bad"), "--quiet"]) == 2


@pytest.mark.realdata
def test_monuseg_two_tiles(tmp_path):
    root = require_shared("monuseg", "images")
    files = sorted(root.glob("TCGA-A7-*.tif"))[:2] or sorted(root.glob("*.tif"))[:2]
    tiles = tiles_from_images(files, magnification=40)
    out = extract_tile_pathomics(tiles, tmp_path / "run", progress=False)
    assert len(out) == 2 and out.attrs["n_skipped"] == 0
    # MoNuSeg 1000x1000 tiles at 40x hold hundreds of nuclei; areas of real nuclei are tens of µm²
    assert (out["path_count"] > 100).all()
    assert out["path_area_um2_q50"].between(10, 100).all()
    assert (out["path_density_per_mm2"] > 1000).all()
    cases = case_pathomics(out)
    assert len(cases) == 2 and (cases["path_n_tiles"] == 1).all()
