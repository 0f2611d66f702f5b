"""Evaluation: metrics (checked by hand and against scikit-learn), bootstrap CIs, plots and the HTML report."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    balanced_accuracy_score,
    cohen_kappa_score,
    f1_score,
    roc_auc_score,
)

from breastfusion.errors import DataError
from breastfusion.evaluation.metrics import (
    _core,
    _prepare,
    bootstrap_ci,
    classes_from,
    comparison_table,
    compute_metrics,
    evaluate,
    to_jsonable,
)

CLASSES = ["benign", "malignant", "normal"]


def make_table(y, P, classes=CLASSES, folds=None, model="m", predicted=None):
    y = np.asarray(y)
    P = np.asarray(P, dtype=float)
    df = pd.DataFrame({"case_id": [f"c{i:04d}" for i in range(len(y))],
                       "fold": folds if folds is not None else -1,
                       "label": [classes[k] for k in y]})
    for k, c in enumerate(classes):
        df[f"prob_{c}"] = P[:, k]
    pred = P.argmax(axis=1) if predicted is None else np.asarray(predicted)
    df["predicted"] = [classes[k] for k in pred]
    df["model"] = model
    return df


def random_table(n, seed=0, signal=1.2, folds=5, round_to=1):
    rng = np.random.default_rng(seed)
    y = rng.choice(3, n, p=[0.55, 0.3, 0.15])
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += signal
    logits = np.round(logits, round_to)  # creates tied scores
    P = np.exp(logits)
    P /= P.sum(axis=1, keepdims=True)
    return make_table(y, P, folds=np.arange(n) % folds if folds else None), y, P


def peaked(pred, K=3, hi=0.6):
    P = np.full((len(pred), K), (1 - hi) / (K - 1))
    P[np.arange(len(pred)), pred] = hi
    return P


# --------------------------------------------------------------------------------------------- metrics


def test_classes_from_follows_prob_column_order():
    df = make_table([0, 1, 2], np.eye(3), classes=["z", "a", "m"])
    assert classes_from(df) == ["z", "a", "m"]


def test_perfect_predictions_score_one():
    y = np.array([0, 1, 2, 0, 1, 2, 0])
    m = compute_metrics(make_table(y, peaked(y)))
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "macro_auc"):
        assert m[key] == pytest.approx(1.0), key
    for c in CLASSES:
        for key in ("sensitivity", "specificity", "ppv", "npv", "f1", "auc"):
            assert m["per_class"][c][key] == pytest.approx(1.0), (c, key)
    assert m["confusion_matrix"] == [[3, 0, 0], [0, 2, 0], [0, 0, 2]]


def test_known_confusion_matrix_by_hand():
    # rows = true, cols = predicted: [[3,1,0],[0,2,1],[1,0,2]], n = 10
    y = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    pred = [0, 0, 0, 1, 1, 1, 2, 0, 2, 2]
    m = compute_metrics(make_table(y, peaked(pred)))
    assert m["confusion_matrix"] == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(0.7)
    a, b = m["per_class"]["benign"], m["per_class"]["malignant"]
    # benign: tp 3, fn 1, fp 1, tn 5
    assert (a["sensitivity"], a["specificity"], a["ppv"], a["npv"], a["f1"]) == pytest.approx(
        (3 / 4, 5 / 6, 3 / 4, 5 / 6, 6 / 8))
    # malignant: tp 2, fn 1, fp 1, tn 6
    assert (b["sensitivity"], b["specificity"], b["ppv"], b["npv"], b["f1"]) == pytest.approx(
        (2 / 3, 6 / 7, 2 / 3, 6 / 7, 4 / 6))
    assert a["support"] == 4 and b["support"] == 3
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    assert m["macro_f1"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    assert m["weighted_f1"] == pytest.approx((4 * 3 / 4 + 3 * 2 / 3 + 3 * 2 / 3) / 10)


def test_predicted_column_is_used_not_argmax():
    y = [0, 1, 1, 0]
    P = peaked([0, 1, 1, 0])
    df = make_table(y, P, predicted=[1, 1, 1, 1])  # e.g. a tuned decision threshold
    assert compute_metrics(df)["accuracy"] == pytest.approx(0.5)


def test_metrics_match_sklearn_with_ties():
    df, y, P = random_table(400, seed=3)
    m = compute_metrics(df, ordinal=True)
    yp = P.argmax(axis=1)
    for k, c in enumerate(CLASSES):
        assert m["per_class"][c]["auc"] == pytest.approx(roc_auc_score(y == k, P[:, k]), abs=1e-12)
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y, P, multi_class="ovr", average="macro"), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(f1_score(y, yp, average="macro"))
    assert m["weighted_f1"] == pytest.approx(f1_score(y, yp, average="weighted"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, yp))
    assert m["quadratic_weighted_kappa"] == pytest.approx(cohen_kappa_score(y, yp, weights="quadratic"))


def test_binary_auc_matches_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.25, 200), 0, 1)
    df = make_table(y, np.column_stack([1 - p1, p1]), classes=["benign", "malignant"])
    m = compute_metrics(df)
    assert m["per_class"]["malignant"]["auc"] == pytest.approx(roc_auc_score(y, p1))
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y, p1))


def test_weighted_core_equals_metrics_on_an_explicit_resample():
    """The bootstrap's weight-based metrics equal the metrics of the resampled table itself."""
    df, _, _ = random_table(150, seed=5)
    idx = np.random.default_rng(9).integers(0, 150, 150)
    W = np.bincount(idx, minlength=150)[None, :].astype(float)
    r = _core(W, _prepare(df), ordinal=True)
    res = df.iloc[idx].reset_index(drop=True)
    res["case_id"] = [f"r{i}" for i in range(len(res))]
    m = compute_metrics(res, ordinal=True)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "macro_auc", "brier",
                "quadratic_weighted_kappa"):
        assert r[key][0] == pytest.approx(m[key], abs=1e-12), key
    for k, c in enumerate(CLASSES):
        assert r["auc"][0, k] == pytest.approx(m["per_class"][c]["auc"], abs=1e-12)


def test_class_absent_from_truth_gives_nan_and_note():
    y = [0, 1, 0, 1, 0, 1]
    P = np.array([[0.7, 0.2, 0.1], [0.2, 0.6, 0.2], [0.5, 0.2, 0.3],
                  [0.3, 0.3, 0.4], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    m = compute_metrics(make_table(y, P))
    assert np.isnan(m["per_class"]["normal"]["auc"])
    assert np.isnan(m["per_class"]["normal"]["sensitivity"])
    assert m["per_class"]["normal"]["support"] == 0
    assert np.isfinite(m["macro_auc"])
    assert m["macro_auc"] == pytest.approx(np.mean([m["per_class"][c]["auc"] for c in CLASSES[:2]]))
    assert any("normal" in n for n in m["notes"])
    r = evaluate(make_table(y, P), n_boot=50)  # and the bootstrap does not crash either
    assert np.isnan(r["ci"]["auc[normal]"][0])


def test_integer_grade_labels_with_ordinal_kappa():
    y = np.array([1, 2, 3, 3, 2, 1, 2])
    pred = np.array([1, 2, 2, 3, 3, 1, 2])
    P = peaked(pred - 1)
    df = pd.DataFrame({"case_id": range(7), "label": y.astype(float), "predicted": pred,
                       "prob_1": P[:, 0], "prob_2": P[:, 1], "prob_3": P[:, 2]})
    m = compute_metrics(df, ordinal=True)
    assert m["classes"] == ["1", "2", "3"]
    assert m["quadratic_weighted_kappa"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))


def test_explicit_class_order():
    df, y, P = random_table(60, seed=2)
    m = compute_metrics(df, classes=["normal", "benign", "malignant"])
    assert m["classes"] == ["normal", "benign", "malignant"]
    assert m["per_class"]["normal"]["support"] == int((y == 2).sum())
    assert m["confusion_matrix"][0][0] == int(((y == 2) & (P.argmax(1) == 2)).sum())


# --------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_estimate_and_narrows_with_more_data():
    small, _, _ = random_table(100, seed=0)
    large, _, _ = random_table(1600, seed=0)
    widths = []
    for df in (small, large):
        m = compute_metrics(df)
        ci = bootstrap_ci(df, n_boot=300, seed=0)
        for key in ("macro_f1", "macro_auc", "accuracy", "sensitivity[malignant]"):
            lo, hi = ci[key]
            point = m["per_class"]["malignant"]["sensitivity"] if "[" in key else m[key]
            assert lo <= point <= hi, key
        widths.append(ci["macro_f1"][1] - ci["macro_f1"][0])
    assert widths[1] < widths[0] / 2  # 16x data -> about 4x narrower


def test_bootstrap_is_seeded():
    df, _, _ = random_table(120, seed=1)
    a = bootstrap_ci(df, n_boot=200, seed=7)
    b = bootstrap_ci(df, n_boot=200, seed=7)
    c = bootstrap_ci(df, n_boot=200, seed=8)
    assert a == b
    assert a["macro_f1"] != c["macro_f1"]


def test_cluster_bootstrap_is_wider_for_duplicated_cases():
    base, _, _ = random_table(100, seed=4, folds=0)
    dup = pd.concat([base.assign(case_id=base["case_id"] + f"_{r}", patient_id=base["case_id"])
                     for r in range(5)], ignore_index=True)
    case_ci = bootstrap_ci(dup, n_boot=300, seed=0)
    group_ci = bootstrap_ci(dup, n_boot=300, seed=0, group_col="patient_id")
    w_case = case_ci["macro_f1"][1] - case_ci["macro_f1"][0]
    w_group = group_ci["macro_f1"][1] - group_ci["macro_f1"][0]
    assert w_group > 1.5 * w_case  # ~sqrt(5) wider: 5 copies carry the information of one case
    r = evaluate(dup, n_boot=100, group_col="patient_id")
    assert r["ci_method"]["unit"] == "patient_id" and r["ci_method"]["n_units"] == 100


def test_bootstrap_1000_resamples_of_600_cases_is_fast():
    df, _, _ = random_table(600, seed=0)
    t = time.perf_counter()
    bootstrap_ci(df, n_boot=1000, seed=0, ordinal=True)
    assert time.perf_counter() - t < 15  # about 0.4 s on one free core


# --------------------------------------------------------------------------------------------- evaluate


def test_evaluate_per_fold_and_json():
    df, _, _ = random_table(200, seed=6, folds=4)
    r = evaluate(df, n_boot=100)
    assert [f["fold"] for f in r["per_fold"]] == [0, 1, 2, 3]
    assert sum(f["n"] for f in r["per_fold"]) == 200
    f1s = [f["macro_f1"] for f in r["per_fold"]]
    assert r["fold_summary"]["macro_f1"]["mean"] == pytest.approx(np.mean(f1s))
    assert r["fold_summary"]["macro_f1"]["sd"] == pytest.approx(np.std(f1s, ddof=1))
    assert r["model"] == "m" and r["n"] == 200
    json.dumps(to_jsonable(r), allow_nan=False)


def test_single_holdout_has_no_folds():
    df, _, _ = random_table(50, seed=6, folds=0)
    r = evaluate(df, n_boot=0)
    assert r["per_fold"] == [] and r["fold_summary"] == {} and r["ci"] == {}


def test_comparison_table_formats():
    a, _, _ = random_table(200, seed=1)
    b, _, _ = random_table(200, seed=2, signal=0.3)
    t = comparison_table({"fusion": evaluate(a, n_boot=100), "image": evaluate(b, n_boot=100)})
    assert list(t["model"]) == ["fusion", "image"]
    assert re.fullmatch(r"0\.\d{3} \(0\.\d{3}\u20130\.\d{3}\)", t.loc[0, "macro-F1 (95% CI)"])
    assert "sensitivity malignant" in t.columns and "macro-AUC (95% CI)" in t.columns
    num = comparison_table({"fusion": evaluate(a, n_boot=100)}, numeric=True)
    assert num.loc[0, "macro_f1_low"] <= num.loc[0, "macro_f1"] <= num.loc[0, "macro_f1_high"]


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.drop(columns="label"), r"'label'"),
    (lambda d: d.drop(columns="case_id"), r"'case_id'"),
    (lambda d: d.drop(columns=[c for c in d.columns if c.startswith("prob_")]), r"prob_"),
    (lambda d: d.assign(prob_benign=d["prob_benign"].where(d.index != 2)), r"row 4 \(case 'c0002'\).*'prob_benign'"),
    (lambda d: d.assign(prob_benign=d["prob_benign"].where(d.index != 3, d["prob_benign"] + 0.2)),
     r"row 5 \(case 'c0003'\).*sum to"),
    (lambda d: d.assign(label=d["label"].where(d.index != 1, "lymphoma")), r"row 3 \(case 'c0001'\).*'label'.*lymphoma"),
    (lambda d: d.assign(predicted=d["predicted"].where(d.index != 0, None)), r"row 2 .*'predicted'.*empty"),
    (lambda d: d.assign(case_id=["x"] * len(d)), r"case_id 'x' appears more than once"),
    (lambda d: d.assign(model=["a", "b"] * (len(d) // 2)), r"mixes 2 models"),
])
def test_bad_input_names_the_problem(mutate, expected):
    df, _, _ = random_table(10, seed=0)
    with pytest.raises(DataError, match=expected):
        compute_metrics(mutate(df))


def test_bad_class_list_and_group_col():
    df, _, _ = random_table(10, seed=0)
    with pytest.raises(DataError, match="prob_lymphoma"):
        compute_metrics(df, classes=["benign", "malignant", "lymphoma"])
    with pytest.raises(DataError, match="prob_normal"):
        compute_metrics(df, classes=["benign", "malignant"])
    with pytest.raises(DataError, match="'patient_id'"):
        bootstrap_ci(df, n_boot=10, group_col="patient_id")


# --------------------------------------------------------------------------------------------- plots, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plots_write_png(tmp_path):
    from breastfusion.evaluation.plots import (
        plot_confusion_matrix,
        plot_model_comparison,
        plot_reliability_diagram,
        plot_roc_curves,
    )

    df, _, _ = random_table(120, seed=0)
    res = {"fusion": evaluate(df, n_boot=50), "cost $5 <b>": evaluate(df, n_boot=50)}
    paths = [
        plot_confusion_matrix(df, None, tmp_path / "cm.png", title="a $ title"),
        plot_roc_curves(df, CLASSES, tmp_path / "roc.png"),
        plot_model_comparison(res, tmp_path / "cmp.png"),
        plot_reliability_diagram(df, None, tmp_path / "rel.png"),
    ]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC, p
        assert len(data) > 5000, p
    assert sorted(x.name for x in tmp_path.iterdir()) == ["cm.png", "cmp.png", "rel.png", "roc.png"]  # no temp left


def _no_external(html_text):
    assert "http://" not in html_text and "https://" not in html_text
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:image/png;base64,|#)""", html_text)
    assert "url(" not in html_text and "@import" not in html_text
    assert "<script" not in html_text.lower() and "<link" not in html_text.lower()


def test_report_synthetic_is_self_contained_and_escaped(tmp_path):
    from breastfusion.evaluation.report import SYNTHETIC_BANNER, write_report

    a, _, _ = random_table(90, seed=1, folds=3)
    evil = "img <script>alert(1)</script>"
    path = write_report(
        tmp_path / "out",
        title="Demo <i>report</i>",
        model_results={"fusion": {"predictions": a, "metrics": evaluate(a, n_boot=50)},
                       evil: {"predictions": a.assign(model=evil)}},
        dataset_summary={"cases": 90, "per class": {"benign": 50, "malignant": 27, "normal": 13},
                         "audit": ["3 near-duplicate groups"]},
        config_text="model:\n  backbone: efficientnet_lite0  # <b>",
        notes=["Expert masks were used at test time: results are optimistic."],
        synthetic=True,
        evaluate_kwargs={"n_boot": 50},
    )
    assert path == tmp_path / "out" / "report.html"
    text = path.read_text(encoding="utf-8")
    assert SYNTHETIC_BANNER in text and 'class="banner"' in text
    _no_external(text)
    assert "img &lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "Demo &lt;i&gt;report&lt;/i&gt;" in text
    assert "Expert masks were used" in text and "efficientnet_lite0" in text
    assert text.count("data:image/png;base64,") == 7  # 3 per model + comparison
    assert "0." in text and "\u2013" in text  # CIs rendered
    figs = sorted(p.name for p in (tmp_path / "out" / "figures").iterdir())
    assert len(figs) == 7 and all(f.endswith(".png") for f in figs)


def test_report_without_synthetic_has_no_banner(tmp_path):
    from breastfusion.evaluation.report import SYNTHETIC_BANNER, write_report

    a, _, _ = random_table(60, seed=2, folds=0)
    path = write_report(tmp_path, title="Real run", model_results={"m": {"metrics": evaluate(a, n_boot=20)}})
    text = path.read_text(encoding="utf-8")
    assert SYNTHETIC_BANNER not in text and 'class="banner"' not in text
    assert "Real run" in text and "figures omitted" in text
    _no_external(text)
