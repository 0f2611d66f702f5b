import io

import numpy as np
import pytest
from PIL import Image

from breastfusion.data.images import read_image, read_mask
from breastfusion.errors import DataError
from conftest import write_png


def test_modes_are_normalised(tmp_path, rng):
    g = (rng.random((20, 30)) * 255).astype(np.uint8)
    write_png(tmp_path / "l.png", g)
    Image.fromarray(np.stack([g] * 3, -1)).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([g, g, g, np.full_like(g, 255)])).save(tmp_path / "rgba.png")
    Image.fromarray(g).convert("P").save(tmp_path / "p.png")
    Image.fromarray((g.astype(np.uint16) * 257)).save(tmp_path / "16.png")
    ref = read_image(tmp_path / "l.png")
    for name in ("rgb.png", "rgba.png", "16.png"):
        arr = read_image(tmp_path / name)
        assert arr.shape == (20, 30) and arr.dtype == np.float32
        np.testing.assert_allclose(arr, ref, atol=2 / 255, err_msg=name)
    p = read_image(tmp_path / "p.png")
    assert p.shape == (20, 30) and 0 <= p.min() and p.max() <= 1
    assert read_image(tmp_path / "l.png", mode="rgb").shape == (20, 30, 3)


def test_truncated_and_missing_files_name_the_file(tmp_path, rng):
    write_png(tmp_path / "ok.png", (rng.random((64, 64)) * 255).astype(np.uint8))
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    for name in ("trunc.png", "junk.png", "absent.png"):
        with pytest.raises(DataError, match=name):
            read_image(tmp_path / name)


def test_mask_union_and_size_mismatch(tmp_path):
    a = np.zeros((10, 12), np.uint8)
    a[1:3, 1:3] = 255
    b = np.zeros((10, 12), np.uint8)
    b[6:8, 6:9] = 1  # 0/1 masks occur too
    write_png(tmp_path / "m0.png", a)
    write_png(tmp_path / "m1.png", b)
    m = read_mask([tmp_path / "m0.png", tmp_path / "m1.png"], shape=(10, 12))
    assert m.sum() == 4 + 6
    with pytest.raises(DataError, match="m0.png.*12x10.*20x10"):
        read_mask(tmp_path / "m0.png", shape=(10, 20))
