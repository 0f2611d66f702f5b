"""Tests of breastfusion.features.nuclei: ImageScope XML, instance masks, metrics (by hand), classical segmentation
on SYNTHETIC disks, and one real-data check on a MoNuSeg crop (skipped when ../shared/data is absent)."""

from __future__ import annotations

import gzip
import time

import numpy as np
import pytest
from conftest import require_shared, write_png
from scipy import ndimage as ndi

from breastfusion.errors import DataError
from breastfusion.features.nuclei import (
    aggregated_jaccard_index,
    detection_f1,
    dice,
    instance_scores,
    panoptic_quality,
    polygons_to_instances,
    read_imagescope_xml,
    read_instance_mask,
    segment_nuclei,
    write_instance_mask,
)

# ---------------------------------------------------------------- ImageScope XML

XML = """<?xml version="1.0" encoding="UTF-8"?>
<Annotations MicronsPerPixel="0.25">
  <Annotation Id="1" Type="4">
    <Regions>
      <RegionAttributeHeaders><AttributeHeader Id="9999" Name="Region"/></RegionAttributeHeaders>
      <Region Id="1" Type="0">
        <Vertices><Vertex X="2" Y="3"/><Vertex X="6" Y="3"/><Vertex X="6" Y="7"/><Vertex X="2" Y="7"/></Vertices>
      </Region>
      <Region Id="2" Type="0">
        <Vertices><Vertex X="10.5" Y="10" Z="0"/><Vertex X="14" Y="10"/><Vertex X="14" Y="13.5"/></Vertices>
      </Region>
      <Region Id="3" Type="0"><Vertices><Vertex X="1" Y="1"/></Vertices></Region>
    </Regions>
  </Annotation>
</Annotations>
"""


def test_read_imagescope_xml_plain_and_gzip(tmp_path):
    plain = tmp_path / "a.xml"
    plain.write_text(XML)
    gz = tmp_path / "b.xml"  # gzip content under a plain name: detected by magic bytes
    gz.write_bytes(gzip.compress(XML.encode()))
    for p in (plain, gz):
        polys = read_imagescope_xml(p)
        assert len(polys) == 2  # the one-vertex region is skipped
        np.testing.assert_array_equal(polys[0], [[2, 3], [6, 3], [6, 7], [2, 7]])
        np.testing.assert_allclose(polys[1], [[10.5, 10], [14, 10], [14, 13.5]])
        assert polys[0].dtype == np.float64 and polys[0].shape == (4, 2)


@pytest.mark.parametrize(
    "text, needle",
    [
        (XML[: len(XML) // 2], "Malformed"),  # truncated
        ("<Foo><Region/></Foo>", "not an Aperio"),
        (XML.replace('X="6" Y="3"', 'X="six" Y="3"'), "Region Id=1"),
        (XML.replace('<Vertex X="14" Y="10"/>', '<Vertex Y="10"/>'), "Region Id=2"),
    ],
)
def test_read_imagescope_xml_bad_files_name_the_file(tmp_path, text, needle):
    p = tmp_path / "bad_annotation.xml"
    p.write_text(text)
    with pytest.raises(DataError, match=needle) as ei:
        read_imagescope_xml(p)
    assert "bad_annotation.xml" in str(ei.value)


def test_read_imagescope_xml_corrupt_gzip_and_missing(tmp_path):
    p = tmp_path / "c.xml.gz"
    p.write_bytes(gzip.compress(XML.encode())[:40])
    with pytest.raises(DataError, match="c.xml.gz"):
        read_imagescope_xml(p)
    with pytest.raises(DataError, match="not found"):
        read_imagescope_xml(tmp_path / "nope.xml")


def test_polygons_to_instances_rasterises_and_orders_overlaps():
    square = np.array([[2, 3], [6, 3], [6, 7], [2, 7]], float)  # x 2..6, y 3..7, border included
    lab = polygons_to_instances([square], (10, 12))
    assert lab.dtype == np.int32 and lab.shape == (10, 12)
    expected = np.zeros((10, 12), np.int32)
    expected[3:8, 2:7] = 1
    np.testing.assert_array_equal(lab, expected)

    other = square + [3, 0]  # x 5..9 overlaps columns 5-6
    later = polygons_to_instances([square, other], (10, 12))
    first = polygons_to_instances([square, other], (10, 12), overlap="first")
    assert (later[3:8, 5:7] == 2).all() and (first[3:8, 5:7] == 1).all()
    assert (later == 1).sum() == 15 and (first == 2).sum() == 15
    # clipped at the border, and a polygon outside the image leaves its label unused
    clipped = polygons_to_instances([square - [4, 0], square + [100, 100]], (10, 12))
    assert set(np.unique(clipped)) == {0, 1} and (clipped == 1).sum() == 5 * 3


def test_xml_to_instances_end_to_end(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(XML)
    lab = polygons_to_instances(read_imagescope_xml(p), (20, 20))
    assert set(np.unique(lab)) == {0, 1, 2}
    assert (lab == 1).sum() == 25


def test_instance_mask_roundtrip_16_and_32_bit(tmp_path):
    lab = np.zeros((20, 30), np.int32)
    lab[2:6, 3:9] = 300  # > 255: needs 16 bits
    lab[10:15, 10:20] = 7
    out = write_instance_mask(lab, tmp_path / "m.png")
    assert out == tmp_path / "m.png"
    back = read_instance_mask(out)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, lab)

    big = lab.copy()
    big[0, 0] = 70_000
    out32 = write_instance_mask(big, tmp_path / "big.png")
    assert out32.suffix == ".tif" and out32.exists() and not (tmp_path / "big.png").exists()
    np.testing.assert_array_equal(read_instance_mask(out32), big)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no temporaries left


def test_read_instance_mask_8bit_and_bad(tmp_path):
    arr = np.zeros((8, 8), np.uint8)
    arr[2:4, 2:4] = 5
    np.testing.assert_array_equal(read_instance_mask(write_png(tmp_path / "m8.png", arr)), arr)
    rgb = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(DataError, match="rgb.png"):
        read_instance_mask(write_png(tmp_path / "rgb.png", rgb))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="junk.png"):
        read_instance_mask(tmp_path / "junk.png")
    with pytest.raises(DataError, match="negative"):
        write_instance_mask(np.full((3, 3), -1), tmp_path / "neg.png")


# ---------------------------------------------------------------- metrics, computed by hand


def _sq(shape, r0, c0, h=4, w=4, val=1, out=None):
    out = np.zeros(shape, np.int32) if out is None else out
    out[r0 : r0 + h, c0 : c0 + w] = val
    return out


def test_metrics_perfect_match_with_other_ids():
    gt = _sq((20, 20), 1, 1, val=1)
    _sq((20, 20), 10, 10, val=2, out=gt)
    pred = np.where(gt == 1, 70_000, np.where(gt == 2, 5, 0))  # large, non-contiguous ids
    assert dice(pred, gt) == 1.0
    assert aggregated_jaccard_index(pred, gt) == 1.0
    assert detection_f1(pred, gt) == 1.0
    assert panoptic_quality(pred, gt)["pq"] == 1.0


def test_metrics_missed_nucleus():
    gt = _sq((20, 20), 1, 1, val=1)
    _sq((20, 20), 10, 10, val=2, out=gt)
    pred = _sq((20, 20), 1, 1, val=1)
    assert aggregated_jaccard_index(pred, gt) == pytest.approx(16 / 32)  # missed gt adds its 16 px to U
    assert dice(pred, gt) == pytest.approx(2 * 16 / (16 + 32))
    assert detection_f1(pred, gt) == pytest.approx(2 * 1 / (2 + 1))
    pq = panoptic_quality(pred, gt)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (1, 0, 1) and pq["pq"] == pytest.approx(1 / 1.5)


def test_metrics_split_nucleus():
    gt = _sq((20, 20), 2, 2, h=4, w=8, val=1)  # 32 px
    pred = _sq((20, 20), 2, 2, val=1)
    _sq((20, 20), 2, 6, val=2, out=pred)  # two halves of 16 px, IoU 0.5 each
    # best match (tie → lower id) gives C=16, U=32; the unused half adds 16 → 16/48
    assert aggregated_jaccard_index(pred, gt) == pytest.approx(16 / 48)
    assert dice(pred, gt) == 1.0
    assert detection_f1(pred, gt) == 0.0  # IoU 0.5 is not > 0.5


def test_metrics_merged_nuclei():
    gt = _sq((20, 20), 2, 2, val=1)
    _sq((20, 20), 2, 6, val=2, out=gt)
    pred = _sq((20, 20), 2, 2, h=4, w=8, val=3)
    # both gt nuclei choose the merged prediction: C = 16+16, U = 32+32 (its area counts in both unions)
    assert aggregated_jaccard_index(pred, gt) == pytest.approx(0.5)
    assert detection_f1(pred, gt) == 0.0


def test_metrics_shifted_and_false_positive():
    gt = _sq((20, 20), 2, 2, val=1)
    pred = _sq((20, 20), 2, 3, val=1)  # inter 12, union 20
    assert aggregated_jaccard_index(pred, gt) == pytest.approx(12 / 20)
    assert dice(pred, gt) == pytest.approx(24 / 32)
    assert detection_f1(pred, gt) == 1.0
    assert panoptic_quality(pred, gt)["pq"] == pytest.approx(0.6)

    pred2 = _sq((20, 20), 2, 2, val=1)
    _sq((20, 20), 12, 12, h=3, w=3, val=2, out=pred2)  # false positive of 9 px
    assert aggregated_jaccard_index(pred2, gt) == pytest.approx(16 / 25)
    assert detection_f1(pred2, gt) == pytest.approx(2 / 3)
    pq = panoptic_quality(pred2, gt)
    assert pq["dq"] == pytest.approx(1 / 1.5) and pq["sq"] == 1.0


def test_metrics_empty_cases_and_errors():
    z = np.zeros((5, 5), np.int32)
    one = _sq((5, 5), 0, 0, 2, 2)
    assert aggregated_jaccard_index(z, z) == 1.0 and dice(z, z) == 1.0 and detection_f1(z, z) == 1.0
    assert aggregated_jaccard_index(one, z) == 0.0 and aggregated_jaccard_index(z, one) == 0.0
    assert detection_f1(one, z) == 0.0
    with pytest.raises(DataError, match="shape"):
        aggregated_jaccard_index(z, np.zeros((5, 6), np.int32))
    with pytest.raises(DataError, match="integer"):
        aggregated_jaccard_index(z.astype(float), z)
    with pytest.raises(ValueError):
        detection_f1(one, one, iou=0.3)


def _aji_reference(pred, gt):
    """Slow loop implementation of the AJI definition, for cross-checking."""
    C = U = 0
    used = set()
    pids = [p for p in np.unique(pred) if p]
    for g in [g for g in np.unique(gt) if g]:
        G = gt == g
        best, best_iou = None, 0.0
        for p in pids:
            S = pred == p
            inter = np.logical_and(G, S).sum()
            iou = inter / np.logical_or(G, S).sum()
            if iou > best_iou:
                best, best_iou = p, iou
        if best is None:
            U += G.sum()
        else:
            S = pred == best
            C += np.logical_and(G, S).sum()
            U += np.logical_or(G, S).sum()
            used.add(best)
    U += sum((pred == p).sum() for p in pids if p not in used)
    return C / U if U else 1.0


def _random_blobs(rng, shape=(48, 48), n=8):
    lab = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for k in range(n):
        cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(2, 8)
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k + 1  # later overwrite → odd shapes
    return lab


def test_aji_matches_loop_reference_on_random_labels():
    rng = np.random.default_rng(3)
    for _ in range(15):
        gt, pred = _random_blobs(rng), _random_blobs(rng)
        assert aggregated_jaccard_index(pred, gt) == pytest.approx(_aji_reference(pred, gt))


def test_metrics_are_fast_on_a_full_tile():
    gt = np.zeros((1000, 1000), np.int32)
    k = 0
    for y in range(10, 990, 37):
        for x in range(10, 990, 37):
            k += 1
            gt[y : y + 25, x : x + 25] = k
    pred = ndi.shift(gt, (3, 2), order=0)  # shifted copy: every object still overlaps its gt
    pred[pred > 0] += 1000
    assert k > 700
    t0 = time.perf_counter()
    s = instance_scores(pred, gt)
    dt = time.perf_counter() - t0
    assert dt < 1.0, f"instance_scores took {dt:.2f}s on a 1000x1000 tile with {k} nuclei"
    assert s["n_gt"] == s["n_pred"] == k and s["f1"] == 1.0
    inter = 22 * 23
    assert s["aji"] == pytest.approx(inter / (2 * 625 - inter))


# ---------------------------------------------------------------- classical segmentation on SYNTHETIC H&E


def synthetic_he(centres, r, shape=(256, 256), seed=0):
    """SYNTHETIC H&E: dark purple disks (nuclei) on a pink background with noise; returns (rgb uint8, labels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    lab = np.zeros(shape, np.int32)
    for k, (cy, cx) in enumerate(centres):
        d = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        lab[d & (lab == 0)] = k + 1
    bg = np.array([236, 186, 212], float)
    nu = np.array([95, 70, 150], float)
    img = np.where(lab[..., None] > 0, nu, bg)
    img = ndi.gaussian_filter(img, (1, 1, 0)) + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), lab


def _grid_centres(seed=1):
    rng = np.random.default_rng(seed)
    return [(y + rng.integers(-6, 7), x + rng.integers(-6, 7)) for y in range(30, 256, 50) for x in range(30, 256, 50)]


def test_segment_synthetic_disks_count_and_aji():
    centres = _grid_centres()
    img, gt = synthetic_he(centres, r=14)  # r = 3.5 µm at 0.25 µm/px
    pred = segment_nuclei(img, mpp=0.25)
    assert pred.dtype == np.int32 and pred.shape == gt.shape
    n = int(pred.max())
    assert len(np.unique(pred)) - 1 == n  # consecutive labels
    assert abs(n - len(centres)) <= 0.1 * len(centres)
    assert aggregated_jaccard_index(pred, gt) > 0.7
    # float input in [0, 1] gives the same result
    np.testing.assert_array_equal(segment_nuclei(img / 255.0), pred)


def test_segment_splits_touching_disks():
    img, gt = synthetic_he([(64, 60), (64, 83), (30, 130), (52, 142)], r=14, shape=(128, 180))  # two touching pairs
    pred = segment_nuclei(img)
    assert pred.max() == 4
    assert detection_f1(pred, gt) == 1.0
    assert aggregated_jaccard_index(pred, gt) > 0.8


def test_segment_scales_with_mpp():
    # the same nuclei imaged at 20x (0.5 µm/px) are half as wide in pixels
    img, gt = synthetic_he(_grid_centres(), r=14)
    small = img[::2, ::2]
    pred = segment_nuclei(small, mpp=0.5)
    assert abs(int(pred.max()) - int(gt.max())) <= 2
    assert aggregated_jaccard_index(pred, gt[::2, ::2]) > 0.6


def test_segment_blank_and_bad_input():
    blank = np.full((64, 64, 3), 230, np.uint8)
    assert segment_nuclei(blank).max() == 0
    with pytest.raises(DataError, match="RGB"):
        segment_nuclei(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="mpp"):
        segment_nuclei(blank, mpp=0)
    with pytest.raises(ValueError, match="Unknown"):
        segment_nuclei(blank, no_such_param=1)


# ---------------------------------------------------------------- real data


@pytest.mark.realdata
def test_monuseg_crop_aji_floor():
    root = require_shared("monuseg")
    name = "TCGA-A7-A13E-01Z-00-DX1"  # breast tile
    from breastfusion.data.images import read_image

    img = (read_image(root / "images" / f"{name}.tif", "rgb") * 255).round().astype(np.uint8)
    gt = polygons_to_instances(read_imagescope_xml(root / "annotations" / f"{name}.xml.gz"), img.shape[:2])
    assert img.shape == (1000, 1000, 3) and gt.max() > 250
    crop = (slice(0, 256), slice(0, 256))
    pred = segment_nuclei(img[crop], mpp=0.25)
    s = instance_scores(pred, gt[crop])
    # measured with the default parameters: AJI 0.563, Dice 0.743, F1 0.79 (22 gt nuclei); floors leave a margin
    assert s["aji"] > 0.45, s
    assert s["dice"] > 0.65, s
    assert s["f1"] > 0.6, s
