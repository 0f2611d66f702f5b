"""Segmentation metrics: Dice / IoU / HD95 conventions and grouped bootstrap intervals."""

import math

import numpy as np
import pandas as pd
import pytest

from breastfusion.errors import DataError
from breastfusion.segmentation.metrics import format_summary, hd95, segmentation_scores, summarise_scores


def _square(shape, y0, y1, x0, x1):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_dice_iou_of_overlapping_squares():
    a = _square((40, 40), 10, 20, 10, 20)  # 100 px
    b = _square((40, 40), 10, 20, 15, 25)  # 100 px, 50 shared
    s = segmentation_scores(a, b)
    assert s["dice"] == pytest.approx(0.5)
    assert s["iou"] == pytest.approx(50 / 150)
    assert not s["pred_empty"] and not s["truth_empty"]


def test_hd95_of_shifted_square_is_the_shift_and_scales_with_spacing():
    a = _square((60, 60), 10, 30, 10, 30)
    b = _square((60, 60), 10, 30, 14, 34)
    assert hd95(a, b) == pytest.approx(4.0)
    assert segmentation_scores(a, b, spacing_mm=0.1)["hd95"] == pytest.approx(0.4)


def test_empty_conventions():
    e = np.zeros((20, 20), bool)
    s = segmentation_scores(e, e)
    assert (s["dice"], s["iou"], s["hd95"]) == (1.0, 1.0, 0.0)
    one = segmentation_scores(_square((20, 20), 5, 10, 5, 10), e)
    assert one["dice"] == 0.0 and math.isnan(one["hd95"]) and one["truth_empty"]


def test_shape_mismatch_and_bad_spacing_are_errors():
    with pytest.raises(DataError, match="differ in size"):
        segmentation_scores(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(DataError, match="spacing_mm"):
        segmentation_scores(np.zeros((4, 4)), np.zeros((4, 4)), spacing_mm=-1)


def test_summary_counts_undefined_hd95_and_grouped_ci_is_wider():
    rng = np.random.default_rng(0)
    # 10 groups of 5 near-copies each: the grouped interval must be wider than the per-case one.
    group_means = rng.uniform(0.5, 0.95, 10)
    dice = np.repeat(group_means, 5) + rng.normal(0, 0.005, 50)
    df = pd.DataFrame({"dice": dice, "iou": dice / (2 - dice), "hd95": np.r_[np.full(49, 5.0), np.nan],
                       "group": np.repeat(np.arange(10), 5)})
    flat = summarise_scores(df, n_boot=500, seed=1)
    grouped = summarise_scores(df, n_boot=500, seed=1, groups="group")
    assert flat["hd95_undefined"] == 1 and flat["hd95"]["n"] == 49
    w_flat = np.diff(flat["dice"]["ci95"])[0]
    w_grp = np.diff(grouped["dice"]["ci95"])[0]
    assert w_grp > 1.5 * w_flat
    assert grouped["n_groups"] == 10
    assert "Dice" in format_summary(grouped) and "HD95" in format_summary(grouped)
