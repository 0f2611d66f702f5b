"""The leakage guard (issue #10, item 2): an input column that alone predicts the label stops the run."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest

from breastfusion.config import Config, DataConfig
from breastfusion.data.leakage import fold_auc, leakage_scores, read_column
from breastfusion.data.splits import make_splits
from breastfusion.errors import DataError

CLASSES = ["benign", "malignant"]


def _table(n: int = 120, seed: int = 0, two_per_patient: bool = False) -> pd.DataFrame:
    """A SYNTHETIC cases table: a weakly informative age, noise, and columns tests add."""
    rng = np.random.default_rng(seed)
    label = np.array(CLASSES)[rng.integers(0, 2, n)]
    patient = [f"p{i // 2}" for i in range(n)] if two_per_patient else [f"p{i}" for i in range(n)]
    if two_per_patient:  # a patient's two images share the label
        label = np.repeat(label[::2], 2)[:n]
    age = rng.normal(50, 10, n) + 4 * (label == "malignant")
    return pd.DataFrame({"case_id": [f"c{i:03d}" for i in range(n)], "patient_id": patient, "label": label,
                         "age": age.round(1), "noise": rng.choice(["a", "b", "c"], n)})


def _scores(cases: pd.DataFrame, columns: list[str], data: DataConfig | None = None, n_splits: int = 5):
    splits = make_splits(cases, n_splits=n_splits, seed=0)
    return leakage_scores(cases, columns, splits, CLASSES, data or DataConfig(), seed=0)


def test_a_copy_of_the_label_is_flagged_and_honest_columns_are_not():
    cases = _table()
    cases["verification"] = np.where(cases["label"] == "malignant", "confirmed by biopsy", "follow-up")
    cases["score"] = (cases["label"] == "malignant") * 10.0 + np.random.default_rng(1).normal(0, 0.1, len(cases))
    res = _scores(cases, ["age", "noise", "verification", "score"])
    assert {c.name for c in res.flagged} == {"verification", "score"}
    assert res.columns["verification"].auc > 0.99 and res.columns["score"].auc > 0.99
    assert 0.55 < res.columns["age"].auc < 0.9 and res.columns["noise"].auc < 0.75
    assert len(res.columns["age"].fold_auc) == 5


def test_an_inverted_number_counts_too():
    """'low value = malignant' is as leaky as 'high value = malignant': the AUC is symmetric."""
    cases = _table()
    cases["inv"] = np.where(cases["label"] == "malignant", 1.0, 5.0)
    assert _scores(cases, ["inv"]).columns["inv"].auc == pytest.approx(1.0)


def test_an_id_unique_to_each_case_or_patient_is_not_flagged():
    """Memorising an identifier must not look like prediction: values seen only in one half score the prior."""
    cases = _table(two_per_patient=True)
    cases["record_no"] = [f"R{x:06d}" for x in np.random.default_rng(2).permutation(len(cases))]
    cases["patient_name"] = [f"name-{p}" for p in cases["patient_id"]]  # two cases per patient, same label
    res = _scores(cases, ["record_no", "patient_name"])
    assert not res.flagged
    assert res.columns["record_no"].auc < 0.7 and res.columns["patient_name"].auc < 0.7


def test_missingness_that_carries_the_label_is_flagged():
    """'not applicable' only for benign cases (no histology after follow-up): the models see a missing indicator,
    so the guard counts missingness as information."""
    cases = _table()
    rng = np.random.default_rng(3)
    cases["size_mm"] = np.where(cases["label"] == "malignant", rng.normal(20, 5, len(cases)).round(1).astype(str),
                                "not applicable")
    cases["diagnosis"] = np.where(cases["label"] == "malignant", rng.choice(["NST", "ILC"], len(cases)),
                                  "not applicable")
    res = _scores(cases, ["size_mm", "diagnosis"])
    assert res.columns["size_mm"].kind == "numeric"
    assert {c.name for c in res.flagged} == {"size_mm", "diagnosis"}


def test_multi_valued_and_ordinal_columns_are_read_as_the_models_read_them():
    cases = _table()
    mal = cases["label"] == "malignant"
    rng = np.random.default_rng(4)
    other = rng.choice(["Fibroadenoma", "Dysplasia", "Cyst"], len(cases))
    cases["interpretation"] = np.where(mal, "Suspicion of malignancy&" + other, other)
    cases["birads"] = np.where(mal, rng.choice(["4c", "5"], len(cases)), rng.choice(["2", "3", "4a"], len(cases)))
    d = DataConfig(column_types={"interpretation": "multi", "birads": "ordinal"},
                   ordinal_levels={"birads": ["2", "3", "4a", "4b", "4c", "5"]})
    r = read_column(cases["interpretation"], "interpretation", d)
    assert r.kind == "multi" and r.indicators.shape[1] == 4  # three values + 'Suspicion of malignancy'
    res = _scores(cases, ["interpretation", "birads"], d)
    assert res.columns["birads"].kind == "ordinal"
    assert {c.name for c in res.flagged} == {"interpretation", "birads"}
    # a level outside the declared ones is an error naming the case and the column, not a silent rank
    cases.loc[7, "birads"] = "6"
    with pytest.raises(DataError, match=r"case 'c007', column 'birads': '6' is not one of its levels"):
        _scores(cases, ["birads"], d)


def test_three_classes_use_the_macro_one_vs_rest_auc():
    cases = _table()
    rng = np.random.default_rng(5)
    cases["label"] = rng.choice(["benign", "malignant", "normal"], len(cases))
    cases["copy"] = cases["label"].map({"benign": 1.0, "malignant": 2.0, "normal": 3.0})
    splits = make_splits(cases, n_splits=3, seed=0)
    res = leakage_scores(cases, ["copy", "noise"], splits, ["benign", "malignant", "normal"], DataConfig())
    # as a number, 'malignant' sits between the other two: one-vs-rest it is not separable, so macro < 1
    assert 0.8 < res.columns["copy"].auc < 1.0
    assert res.columns["noise"].auc < 0.75


def test_only_training_fold_labels_are_read():
    """A column equal to the label on the test fold only (constant elsewhere) is useless on the training cases;
    a guard that read the test fold's labels would score it 1.0. Changing test-fold labels changes nothing."""
    cases = _table()
    splits = make_splits(cases, n_splits=5, seed=0)
    fold = splits.set_index("case_id")["fold"].reindex(cases["case_id"]).to_numpy()
    test = fold == 0
    y = (cases["label"] == "malignant").to_numpy().astype(int)
    for col, d in [("num", DataConfig()), ("cat", DataConfig())]:
        vals = np.where(test, y, 0.5) if col == "num" else np.where(test, np.where(y == 1, "m", "b"), "x")
        r = read_column(pd.Series(vals), col, d)
        a = fold_auc(r, y, ~test, 2, seed=0)
        assert a == pytest.approx(0.5), col
        y_other = y.copy()
        y_other[test] = 1 - y_other[test]
        assert fold_auc(r, y_other, ~test, 2, seed=0) == a
    # whole guard: the same column's fold-0 AUC stays at chance
    cases["num"] = np.where(test, y, 0.5)
    assert _scores(cases, ["num"]).columns["num"].fold_auc[0] == pytest.approx(0.5)


def test_cost_is_small():
    """1000 cases x 50 columns (numbers, categories, identifiers) in seconds, not minutes."""
    rng = np.random.default_rng(6)
    n = 1000
    cases = pd.DataFrame({"case_id": [f"c{i}" for i in range(n)], "label": rng.choice(CLASSES, n)})
    cols = {}
    for j in range(50):
        cols[f"x{j}"] = (rng.normal(size=n) if j % 3 == 0 else rng.choice(list("abcdefgh"), n) if j % 3 == 1
                         else [f"id{k}" for k in rng.permutation(n)])
    cases = pd.concat([cases, pd.DataFrame(cols)], axis=1)
    t = time.perf_counter()
    res = _scores(cases, list(cols))
    assert time.perf_counter() - t < 30  # measured about 1 s on a shared 2-core machine
    assert not res.flagged


# ------------------------------------------------------------------------------------------------ the pipeline

def _cfg(**roles) -> Config:
    cfg = Config()
    cfg.data.radiomics = False
    for k, v in roles.items():
        setattr(cfg.data.roles, k, v)
    cfg.experiment.deep_models, cfg.experiment.final_models = [], []
    cfg.experiment.classical_models = ["logreg"]
    cfg.experiment.n_boot, cfg.experiment.explain_cases, cfg.cv.n_splits = 0, 0, 2
    return cfg


@pytest.fixture(scope="module")
def leaky_cases(tmp_path_factory):
    from breastfusion.data.synthetic import make_synthetic_cohort

    cases = make_synthetic_cohort(tmp_path_factory.mktemp("leaky") / "data", n_cases=24, image_size=32, seed=1)
    # a SYNTHETIC leak: the histology names the class (normal cases: none taken)
    cases["histology"] = cases["label"].map({"malignant": "carcinoma", "benign": "fibroadenoma", "normal": "none"})
    return cases


def test_run_refuses_a_leaked_column_before_any_model_trains(leaky_cases, tmp_path):
    from breastfusion.experiment import run_experiment

    with pytest.raises(DataError, match=r"(?s)'histology' \(categorical\): AUC 1\.000.*roles\.exclude.*"
                                        r"roles\.intended"):
        run_experiment(_cfg(), tmp_path, cases=leaky_cases, progress=False)
    assert not (tmp_path / "predictions").exists() and not (tmp_path / "classical").exists()
    guard = json.loads((tmp_path / "leakage.json").read_text())
    assert guard["columns"]["histology"]["flagged"] and not guard["columns"]["age"]["flagged"]
    table = pd.read_csv(tmp_path / "leakage.csv")
    assert table.set_index("column").loc["histology", "flagged"]
    # the way out the message names, resuming the refused run: the audit is reused, the column is left out
    run_experiment(_cfg(exclude=["histology"]), tmp_path, cases=leaky_cases, resume=True, progress=False)
    assert "histology" not in json.loads((tmp_path / "leakage.json").read_text())["columns"]
    assert (tmp_path / "predictions" / "logreg.csv").exists()


def test_run_goes_on_when_the_column_is_intended(leaky_cases, tmp_path, caplog):
    from breastfusion.experiment import run_experiment

    res = run_experiment(_cfg(intended=["histology"]), tmp_path, cases=leaky_cases, progress=False)
    assert (tmp_path / "predictions" / "logreg.csv").exists()
    assert "declared in data.roles.intended" in caplog.text
    html = res.report.read_text()
    assert "FLAGGED (intended)" in html and "histology (AUC 1.000)" in html


def test_an_excluded_column_is_not_an_input(leaky_cases, tmp_path):
    from breastfusion.experiment import run_experiment

    run_experiment(_cfg(exclude=["histology"]), tmp_path, cases=leaky_cases, progress=False)
    guard = json.loads((tmp_path / "leakage.json").read_text())
    assert "histology" not in guard["columns"] and "age" in guard["columns"]


# ------------------------------------------------------------------------------------------------ real data

def test_breast_lesions_usg_every_sheet_column_as_input():
    """Real data: BrEaST-Lesions-USG, benign vs malignant, every sheet column but the label and the file names as
    input (no model trained). The histology is flagged; the clinical history is not."""
    from conftest import require_shared

    path = require_shared("breast_lesions_usg", "clinical_data.csv")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = df[df["Classification"].isin(CLASSES)].reset_index(drop=True)
    cases = df.rename(columns={"Classification": "label"}).assign(case_id=df["CaseID"], patient_id=df["CaseID"])
    columns = [c for c in df.columns if c not in ("Classification", "Image_filename", "Mask_tumor_filename",
                                                  "Mask_other_filename")]
    multi = ["Tissue_composition", "Signs", "Symptoms", "Margin", "Interpretation", "Diagnosis"]
    d = DataConfig(column_types={**{c: "multi" for c in multi}, "BIRADS": "ordinal", "Age": "numeric"},
                   ordinal_levels={"BIRADS": ["2", "3", "4a", "4b", "4c", "5"]})
    res = _scores(cases, columns, d)
    print("\n" + res.table().sort_values("auc_median", ascending=False).to_string(index=False))
    # at the default 0.95 only the histology is near-perfect alone (measured 0.998); the reader's score and
    # conclusion are strong (BIRADS 0.93, Interpretation 0.90) but below it: roles.exclude is what keeps them out
    assert {c.name for c in res.flagged} == {"Diagnosis"}
    clinical = {"Age", "Tissue_composition", "Signs", "Symptoms", "CaseID"}
    assert all(res.columns[c].auc < 0.8 for c in clinical)
    d.roles.leakage_auc = 0.85
    flagged = {c.name for c in _scores(cases, columns, d).flagged}
    assert {"Diagnosis", "BIRADS", "Interpretation"} <= flagged and not flagged & clinical
