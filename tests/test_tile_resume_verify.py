"""Resumed tiling checks the tiles already on disk: a truncated, corrupt or wrong-size tile (a killed run on a
filesystem that lost its tail, a disk error, a hand edit) is rewritten, never reused. SYNTHETIC slide."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_histology_wsi import MAGS, TILE, synthetic_base, write_pyramid

from breastfusion.data import tiling
from breastfusion.data.slides import open_slide
from breastfusion.data.tiling import read_stack, tile_slide


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    return write_pyramid(tmp_path_factory.mktemp("wsi_verify") / "synth_slide.tif", synthetic_base())


def test_resume_rewrites_truncated_corrupt_and_wrong_size_tiles(tmp_path, slide_path, monkeypatch, caplog):
    out = tmp_path / "tiles"
    first = tile_slide(slide_path, out, magnifications=MAGS, tile_size=TILE, progress=False)
    n = len(first)
    truncated, corrupt, small = first["path_40x"][2], first["path_20x"][5], first["path_10x"][9]
    data = Path(truncated).read_bytes()
    Path(truncated).write_bytes(data[: len(data) // 2])  # what a kill on a filesystem without ordering can leave
    bad = bytearray(Path(corrupt).read_bytes())
    bad[len(bad) // 2] ^= 0xFF  # one flipped byte inside the pixel data
    Path(corrupt).write_bytes(bytes(bad))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(small)  # a valid PNG, but not a tile of this run
    (out / ".tiling" / "synth_slide.done.json").unlink()
    writes = []
    real = tiling._save_png
    monkeypatch.setattr(tiling, "_save_png", lambda p, a, c: (writes.append(p), real(p, a, c)))
    with caplog.at_level(logging.WARNING, logger="breastfusion.data.tiling"):
        second = tile_slide(slide_path, out, magnifications=MAGS, tile_size=TILE, progress=False)
    assert len(writes) == 3
    assert second.attrs["n_written"] == 3 and second.attrs["n_skipped"] == n - 3
    assert second.attrs["n_files_redone"] == 3
    logged = caplog.text
    for p in (truncated, corrupt, small):
        assert Path(p).name in logged
    with open_slide(slide_path) as s:
        for i, p, m in ((2, truncated, 40), (5, corrupt, 20), (9, small, 10)):
            r = first.iloc[i]
            np.testing.assert_array_equal(np.asarray(Image.open(p)), read_stack(s, (r["x"], r["y"]), [m], TILE)[m])
    writes.clear()
    third = tile_slide(slide_path, out, magnifications=MAGS, tile_size=TILE, progress=False)
    assert writes == [] and third.attrs["n_files_redone"] == 0
