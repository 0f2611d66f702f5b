"""Column roles (issue #10, item 2): which sheet columns are inputs, and config errors that name the column."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from breastfusion.config import Config, DataConfig
from breastfusion.data.roles import (
    EXCLUDED,
    INPUT,
    PIXEL_SIZE,
    READER_BLOCK,
    READER_INPUT,
    READER_SCORE,
    UNUSED,
    resolve_roles,
)
from breastfusion.errors import ConfigError, DataError


def _sheet(n: int = 12) -> pd.DataFrame:
    """A small SYNTHETIC clinical sheet with every kind of column a real export has."""
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "case_id": [f"c{i}" for i in range(n)], "label": ["benign", "malignant"] * (n // 2),
        "image_path": "x.png", "Age": rng.integers(30, 80, n).astype(str),
        "Signs": rng.choice(["no", "palpable"], n), "Shape": rng.choice(["oval", "irregular"], n),
        "Margin": rng.choice(["circumscribed", "angular"], n), "BIRADS": rng.choice(["3", "4a", "5"], n),
        "Diagnosis": rng.choice(["fibroadenoma", "carcinoma"], n), "Pixel_size": "0.007",
    })


def _data(**roles) -> DataConfig:
    d = DataConfig()
    for k, v in roles.items():
        setattr(d.roles, k, v)
    return d


def test_default_inputs_leave_out_every_declared_role():
    d = _data(reader_block=["Shape", "Margin"], reader_score="BIRADS", exclude=["Diagnosis"])
    d.pixel_size_column = "Pixel_size"
    m = resolve_roles(_sheet(), d)
    assert m.inputs == ["Age", "Signs"]
    assert m.roles == {"Age": INPUT, "Signs": INPUT, "Shape": READER_BLOCK, "Margin": READER_BLOCK,
                       "BIRADS": READER_SCORE, "Diagnosis": EXCLUDED, "Pixel_size": PIXEL_SIZE}


def test_without_roles_every_feature_column_is_an_input():
    m = resolve_roles(_sheet(), DataConfig())
    assert m.inputs == ["Age", "Signs", "Shape", "Margin", "BIRADS", "Diagnosis", "Pixel_size"]


def test_tabular_columns_win_and_the_rest_is_unused():
    d = _data(reader_block=["Shape"], exclude=["Diagnosis"])
    d.tabular_columns = ["Age", "Shape"]
    m = resolve_roles(_sheet(), d)
    assert m.inputs == ["Age", "Shape"]
    assert m.roles["Shape"] == READER_INPUT and m.reader_inputs == ["Shape"]
    assert m.roles["Signs"] == UNUSED and m.roles["Diagnosis"] == EXCLUDED


@pytest.mark.parametrize("role,value,col,word", [("exclude", ["Diagnosis"], "Diagnosis", "exclude"),
                                                 ("reader_score", "BIRADS", "BIRADS", "reader score")])
def test_a_never_input_column_in_tabular_columns_is_refused(role, value, col, word):
    d = _data(**{role: value})
    d.tabular_columns = ["Age", col]
    with pytest.raises(ConfigError, match=rf"'{col}'.*{word}"):
        resolve_roles(_sheet(), d)


@pytest.mark.parametrize("role,value,bad,close", [("exclude", ["Diagnoss"], "Diagnoss", "Diagnosis"),
                                                  ("reader_block", ["shape"], "shape", "Shape"),
                                                  ("reader_score", "BI-RADS", "BI-RADS", "BIRADS"),
                                                  ("intended", ["age"], "age", "Age")])
def test_a_role_naming_an_absent_column_suggests_the_close_one(role, value, bad, close):
    with pytest.raises(ConfigError, match=rf"data.roles.{role}.*'{bad}' \(did you mean '{close}'\?\)"):
        resolve_roles(_sheet(), _data(**{role: value}))


def test_a_column_with_two_contradicting_roles_is_refused():
    with pytest.raises(ConfigError, match=r"'BIRADS'.*reader_block.*exclude|'BIRADS'.*exclude"):
        resolve_roles(_sheet(), _data(reader_block=["BIRADS"], exclude=["BIRADS"]))
    with pytest.raises(ConfigError, match="intended"):
        resolve_roles(_sheet(), _data(exclude=["Diagnosis"], intended=["Diagnosis"]))


def test_tabular_columns_naming_an_absent_column_stays_a_data_error():
    d = DataConfig()
    d.tabular_columns = ["age"]
    with pytest.raises(DataError, match=r"'age' \(did you mean 'Age'\?\)"):
        resolve_roles(_sheet(), d)


def test_run_excludes_the_column_and_reports_every_role(tmp_path):
    """An excluded column never reaches a model; the report's 'Column roles' section lists each column's role."""
    from breastfusion.data.synthetic import make_synthetic_cohort
    from breastfusion.experiment import run_experiment

    cases = make_synthetic_cohort(tmp_path / "data", n_cases=24, image_size=32, seed=1)
    cases["verification"] = np.where(cases["label"] == "malignant", "biopsy", "follow-up")  # carries the answer
    cfg = Config()
    cfg.data.radiomics = False
    cfg.data.roles.exclude = ["verification"]
    cfg.data.roles.reader_block = ["breast_density"]
    cfg.experiment.deep_models, cfg.experiment.final_models = [], []
    cfg.experiment.classical_models = ["logreg"]
    cfg.experiment.n_boot, cfg.experiment.explain_cases, cfg.cv.n_splits = 0, 0, 2
    res = run_experiment(cfg, tmp_path / "run", cases=cases, progress=False)
    guard = json.loads((tmp_path / "run" / "leakage.json").read_text())
    assert "verification" not in guard["columns"] and "breast_density" not in guard["columns"]
    assert "age" in guard["columns"] and not any(c["flagged"] for c in guard["columns"].values())
    html = res.report.read_text()
    assert "Column roles" in html and EXCLUDED in html and "radiologist&#x27;s reading (not an input)" in html
