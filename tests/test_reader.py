"""The radiologist as a baseline (evaluation/reader.py): reader AUC and operating points, paired AUC differences
with a patient-level bootstrap, the model at the reader's specificity, and the cross-fitted model + reader.

Synthetic cohorts made here (labelled as such); the real-data test reads BrEaST-Lesions-USG when present."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from breastfusion.errors import ConfigError, DataError
from breastfusion.evaluation.reader import (
    check_reader_column,
    compare_with_reader,
    reader_levels,
    reader_section,
)

LEVELS = ["2", "3", "4a", "4b", "4c", "5"]


def _table(y: np.ndarray, p_mal: np.ndarray, *, folds: int = 5, model: str = "m", seed: int = 0) -> pd.DataFrame:
    """A synthetic out-of-fold prediction table (benign / malignant)."""
    n = len(y)
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"case_id": [f"c{i}" for i in range(n)], "fold": rng.permutation(np.arange(n) % folds),
                         "label": np.where(y, "malignant", "benign"),
                         "prob_benign": 1 - p_mal, "prob_malignant": p_mal, "model": model})


def _cases(reader: list, n: int | None = None, patients: list | None = None) -> pd.DataFrame:
    n = len(reader) if n is None else n
    return pd.DataFrame({"case_id": [f"c{i}" for i in range(n)],
                         "patient_id": patients if patients is not None else [f"p{i}" for i in range(n)],
                         "BIRADS": reader})


def _cohort(n=300, seed=0):
    """Synthetic: two independent signals a (seen by the model) and b (seen by the reader); the label needs both."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(size=n)
    y = (a + b + 0.3 * rng.normal(size=n)) > 0
    return rng, a, b, y


def _to_birads(x: np.ndarray) -> list[str]:
    cuts = np.quantile(x, np.linspace(0, 1, len(LEVELS) + 1)[1:-1])
    return [LEVELS[i] for i in np.searchsorted(cuts, x)]


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


# ---------------------------------------------------------------------------------------------- ordinal order

def test_default_order_is_numeric_then_text():
    levels, source = reader_levels(pd.Series(["5", "4b", 3, "4c", "4A", 2.0, "10"]))
    assert levels == ["2", "3", "4a", "4b", "4c", "5", "10"]  # 10 after 5: numbers, not text, order the levels
    assert source == "default"


def test_declared_order_is_used_and_an_unknown_value_names_its_row():
    levels, source = reader_levels(pd.Series(["a", "c", "b"]), ["c", "b", "a"])
    assert (levels, source) == (["c", "b", "a"], "declared")
    cases = _cases(["2", "3", "4d"])
    with pytest.raises(DataError, match=r"row 4 \(case 'c2'\).*'4d'.*2, 3, 4a"):
        check_reader_column(cases, "BIRADS", ["2", "3", "4a"])


def test_text_without_a_number_needs_a_declared_order():
    with pytest.raises(ConfigError, match="reader_score_order"):
        reader_levels(pd.Series(["low", "high"]))


def test_missing_reader_column_is_a_config_error():
    with pytest.raises(ConfigError, match="'BIRADS'.*not a column"):
        check_reader_column(pd.DataFrame({"case_id": ["a"]}), "BIRADS")


# --------------------------------------------------------------------------------- hand-checked tiny example

def test_thresholds_and_auc_by_hand():
    # synthetic: 4 benign (2, 3, 4a, 4b) and 4 malignant (4a, 4b, 4c, 5)
    reader = ["2", "3", "4a", "4b", "4a", "4b", "4c", "5"]
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1], bool)
    p = np.array([0.1, 0.45, 0.5, 0.6, 0.4, 0.7, 0.8, 0.9])
    res = compare_with_reader({"m": _table(y, p, folds=2)}, _cases(reader), "BIRADS", n_boot=50, seed=0)
    r = res["reader"]
    # AUC by pairs: reader ranks benign 0,1,2,3 vs malignant 2,3,4,5 -> 13 wins + 2 ties of 16 = 14/16
    assert r["auc"] == pytest.approx(14 / 16)
    th = {t["level"]: t for t in r["thresholds"]}
    assert list(th) == ["3", "4a", "4b", "4c", "5"]
    assert th["4a"]["sensitivity"] == pytest.approx(1.0) and th["4a"]["specificity"] == pytest.approx(0.5)
    assert th["4b"]["sensitivity"] == pytest.approx(0.75) and th["4b"]["specificity"] == pytest.approx(0.75)
    assert th["5"]["sensitivity"] == pytest.approx(0.25) and th["5"]["specificity"] == pytest.approx(1.0)
    assert res["cutoff"] == "4a"
    m = res["models"]["m"]
    assert m["auc"] == pytest.approx(13 / 16)  # malignant 0.4 beats only benign 0.1
    assert m["auc_diff"] == pytest.approx(-1 / 16)
    # the reader's specificity at >= 4a is 0.5; the model first reaches it at 0.5 (benign 0.1 and 0.45 below):
    # 0.45 would leave only one benign below; at 0.5, three of the four malignant are at or above
    assert m["matched"]["threshold"] == pytest.approx(0.5)
    assert m["matched"]["specificity"] == pytest.approx(0.5)
    assert m["matched"]["sensitivity"] == pytest.approx(0.75)
    assert m["matched"]["sensitivity_diff"] == pytest.approx(-0.25)


def test_a_declared_level_no_case_reaches_is_no_operating_point():
    """The BrEaST recipe declares BI-RADS 1 (the normal cases, set aside): '>= 2' would call every case positive."""
    rng, a, b, y = _cohort(80)
    res = compare_with_reader({"m": _table(y, _sigmoid(a))}, _cases(_to_birads(b)), "BIRADS",
                              order=["1", *LEVELS], n_boot=10)
    assert [t["level"] for t in res["reader"]["thresholds"]] == ["3", "4a", "4b", "4c", "5"]
    assert res["cutoff"] == "4a"
    with pytest.raises(ConfigError, match="cut-off '2'"):
        compare_with_reader({"m": _table(y, _sigmoid(a))}, _cases(_to_birads(b)), "BIRADS", order=["1", *LEVELS],
                            n_boot=10, cutoff="2")


def test_the_run_stops_before_training_on_a_reader_value_outside_the_order(tmp_path):
    from breastfusion.config import Config
    from breastfusion.experiment import run_experiment

    cases = _cases(["2", "3", "4d"] * 4).assign(label=["benign", "malignant"] * 6, image_path="none.png")
    cfg = Config()
    cfg.data.roles.reader_score = "BIRADS"
    cfg.data.roles.reader_score_order = LEVELS
    with pytest.raises(DataError, match=r"row 4 \(case 'c2'\), column 'BIRADS': '4d'"):
        run_experiment(cfg, tmp_path / "run", cases=cases, progress=False)
    assert not (tmp_path / "run" / "predictions").exists()
    cfg.data.roles.reader_score_order = None
    cfg.data.roles.reader_positive = "cancer"
    with pytest.raises(ConfigError, match="reader_positive: 'cancer' is not a class"):
        run_experiment(cfg, tmp_path / "run2", cases=cases, progress=False)


def test_missing_reader_scores_are_excluded_and_counted():
    rng, a, b, y = _cohort(60)
    reader = _to_birads(b)
    reader[3], reader[10], reader[11] = "not available", "", None
    res = compare_with_reader({"m": _table(y, _sigmoid(a))}, _cases(reader), "BIRADS", n_boot=20)
    assert res["n_cases"] == 57
    assert res["excluded"]["no_reader_score"] == 3
    assert set(res["excluded"]["no_reader_score_examples"]) == {"c3", "c10", "c11"}


# --------------------------------------------------------------------------------- perfect / random / mixed

def test_perfect_reader_beats_a_random_model_with_a_ci_below_zero():
    rng, a, b, y = _cohort(300)
    reader = np.where(y, "5", "2").tolist()
    res = compare_with_reader({"random": _table(y, rng.uniform(size=300))}, _cases(reader), "BIRADS", n_boot=300)
    assert res["reader"]["auc"] == pytest.approx(1.0)
    m = res["models"]["random"]
    assert 0.4 < m["auc"] < 0.6
    assert m["auc_diff_ci"][1] < 0
    assert "lower than the reader" in m["verdict"]


def test_random_reader_and_a_good_model_ci_above_zero():
    rng, a, b, y = _cohort(300)
    reader = rng.choice(LEVELS, size=300).tolist()
    res = compare_with_reader({"good": _table(y, _sigmoid(3 * (a + b)))}, _cases(reader), "BIRADS", n_boot=300)
    assert 0.4 < res["reader"]["auc"] < 0.6
    assert res["models"]["good"]["auc_diff_ci"][0] > 0
    assert "higher than the reader" in res["models"]["good"]["verdict"]


def test_equal_signals_give_a_ci_that_includes_zero():
    # synthetic: model and reader read the same signal with equal noise, both on the six-level scale
    rng, a, b, y = _cohort(300)
    model = np.array([LEVELS.index(v) for v in _to_birads(b + 0.5 * rng.normal(size=300))]) / 5
    reader = _to_birads(b + 0.5 * rng.normal(size=300))
    res = compare_with_reader({"same": _table(y, model)}, _cases(reader), "BIRADS", n_boot=300)
    lo, hi = res["models"]["same"]["auc_diff_ci"]
    assert lo < 0 < hi
    assert "no difference shown" in res["models"]["same"]["verdict"]


def test_combination_beats_either_when_complementary(tmp_path):
    rng, a, b, y = _cohort(400, seed=3)
    preds = _table(y, _sigmoid(2 * a))
    res = compare_with_reader({"fusion": preds}, _cases(_to_birads(b)), "BIRADS", n_boot=300)
    combo = res["combined"]["fusion + reader"]
    assert combo["auc"] > res["models"]["fusion"]["auc"] + 0.05
    assert combo["auc"] > res["reader"]["auc"] + 0.05
    assert combo["auc_diff_ci"][0] > 0 and combo["verdict"].startswith("adds to the reader")
    sec = reader_section(res, tmp_path)
    assert sec.title == "Models vs the radiologist"
    assert "fusion + reader" in sec.table["model"].tolist()
    assert sec.figures and sec.figures[0][0].exists()


def test_combination_is_cross_fitted_not_fitted_on_the_rows_it_scores(monkeypatch):
    """A model whose score is noise gains nothing from the reader in-sample tricks: the cross-fitted combination
    must not beat the reader by more than noise."""
    rng, a, b, y = _cohort(300, seed=5)
    res = compare_with_reader({"noise": _table(y, rng.uniform(size=300))}, _cases(_to_birads(b)), "BIRADS",
                              n_boot=200)
    combo = res["combined"]["noise + reader"]
    assert combo["auc_diff_ci"][0] < 0 < combo["auc_diff_ci"][1]
    assert combo["folds"] == 5


def test_patient_clusters_are_resampled_together():
    """Synthetic: every patient has 4 identical copies; a case-level bootstrap would give a CI half as wide."""
    rng, a, b, y = _cohort(60, seed=1)
    k = 4
    y4, a4, b4 = np.repeat(y, k), np.repeat(a, k), np.repeat(b, k)
    patients = [f"p{i}" for i in np.repeat(np.arange(60), k)]
    preds = _table(y4, _sigmoid(a4))
    cases = _cases(_to_birads(b4), patients=patients)
    grouped = compare_with_reader({"m": preds}, cases, "BIRADS", n_boot=400, seed=0)
    loose = compare_with_reader({"m": preds}, cases.drop(columns="patient_id"), "BIRADS", n_boot=400, seed=0)
    assert grouped["bootstrap"]["n_units"] == 60 and loose["bootstrap"]["n_units"] == 240
    w_g = np.diff(grouped["models"]["m"]["auc_diff_ci"])[0]
    w_l = np.diff(loose["models"]["m"]["auc_diff_ci"])[0]
    assert w_g > 1.5 * w_l


def test_duplicate_groups_join_patients():
    rng, a, b, y = _cohort(40, seed=2)
    cases = _cases(_to_birads(b)).assign(dup_group=[f"g{i // 2}" for i in range(40)])
    res = compare_with_reader({"m": _table(y, _sigmoid(a))}, cases, "BIRADS", n_boot=10)
    assert res["bootstrap"]["n_units"] == 20


def test_positive_class_defaults_and_multiclass_models():
    rng, a, b, y = _cohort(90, seed=4)
    p = _sigmoid(2 * a)
    preds = pd.DataFrame({"case_id": [f"c{i}" for i in range(90)], "fold": np.arange(90) % 3,
                          "label": np.where(y, "malignant", "benign"), "prob_benign": (1 - p) * 0.8,
                          "prob_malignant": p, "prob_normal": (1 - p) * 0.2})
    res = compare_with_reader({"three": preds}, _cases(_to_birads(b)), "BIRADS", n_boot=10)
    assert res["positive"] == "malignant"
    with pytest.raises(ConfigError, match="reader_positive.*'cancer'"):
        compare_with_reader({"three": preds}, _cases(_to_birads(b)), "BIRADS", positive="cancer", n_boot=10)


def test_models_are_compared_on_the_same_cases():
    _, a, b, y = _cohort(50)
    full = _table(y, _sigmoid(a), model="full")
    part = _table(y, _sigmoid(a), model="part").iloc[5:]
    res = compare_with_reader({"full": full, "part": part}, _cases(_to_birads(b)), "BIRADS", n_boot=10)
    assert res["n_cases"] == 45
    assert res["excluded"]["not_scored_by_every_model"] == 5


def test_pipeline_writes_the_section_and_json(tmp_path):
    """The run (tiny synthetic cohort, classical model only) writes reader_comparison.json and the report section."""
    from breastfusion.config import Config
    from breastfusion.data.synthetic import make_synthetic_cohort
    from breastfusion.experiment import run_experiment

    cases = make_synthetic_cohort(tmp_path / "data", n_cases=30, image_size=32, seed=0,
                                  class_proportions={"benign": 0.5, "malignant": 0.5})
    rng = np.random.default_rng(0)
    pos = (cases["label"] == "malignant").to_numpy()
    # a perfect synthetic reader: malignant cases >= 4b, benign <= 4a
    cases["BIRADS"] = np.where(pos, rng.choice(["4b", "4c", "5"], len(cases)), rng.choice(["2", "3", "4a"], len(cases)))
    cfg = Config()
    cfg.data.radiomics = False
    cfg.data.roles.reader_score = "BIRADS"
    cfg.data.tabular_columns = ["age"]  # the reader score is never an input
    cfg.experiment.deep_models = []
    cfg.experiment.final_models = []
    cfg.experiment.classical_models = ["logreg"]
    cfg.experiment.n_boot = 20
    cfg.experiment.explain_cases = 0
    cfg.cv.n_splits = 3
    res = run_experiment(cfg, tmp_path / "run", cases=cases, progress=False)
    out = json.loads((tmp_path / "run" / "reader_comparison.json").read_text())
    assert out["reader"]["auc"] == pytest.approx(1.0)
    assert "logreg" in out["models"]
    html = res.report.read_text()
    assert "Models vs the radiologist" in html
    # the reader is in the summary's caveats, before any model detail, not only in its own section
    summary = html.split('<section id="summary">', 1)[1].split("<section", 1)[0]
    assert "The radiologist (" in summary and "on the same" in summary


def test_breast_lesions_usg_birads_auc():
    """Real data: BrEaST-Lesions-USG BIRADS against the histology-verified Classification (benign vs malignant)."""
    from conftest import require_shared

    root = require_shared("breast_lesions_usg", "clinical_data.csv")
    df = pd.read_csv(root, dtype=str, keep_default_na=False)
    df = df[df["Classification"].isin(["benign", "malignant"])].reset_index(drop=True)
    cases = pd.DataFrame({"case_id": df["CaseID"], "patient_id": df["CaseID"], "BIRADS": df["BIRADS"]})
    # the reader compared with a constant model: only the reader's figures matter here
    preds = pd.DataFrame({"case_id": df["CaseID"], "fold": np.arange(len(df)) % 5, "label": df["Classification"],
                          "prob_benign": 0.5, "prob_malignant": 0.5})
    res = compare_with_reader({"constant": preds}, cases, "BIRADS", n_boot=200, seed=0)
    assert res["n_cases"] == 252
    assert res["levels"] == ["2", "3", "4a", "4b", "4c", "5"]
    print("BrEaST-Lesions-USG reader AUC", res["reader"]["auc"], res["reader"]["auc_ci"])
    assert 0.85 < res["reader"]["auc"] < 0.97
