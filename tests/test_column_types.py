"""Clinical column types: text missing-markers keep a number a number; ambiguous columns are reported (issue 9,
item 1). Tables here are small SYNTHETIC frames written in the test."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from breastfusion.config import Config, DataConfig
from breastfusion.errors import ConfigError, DataError
from breastfusion.features.tabular import DEFAULT_MISSING_VALUES, TabularPreprocessor, infer_column_type, is_missing
from breastfusion.tabular_inputs import numeric_for_classical, numeric_like

AGES = ["57", "43", "not available", "66", "48", "Not Available ", "76", "47", "63", "52", "39", "N/A"]


def _table(ages=AGES) -> pd.DataFrame:
    """SYNTHETIC: as a hospital export read with dtype=str, missing ages written as text."""
    n = len(ages)
    return pd.DataFrame({"age": ages, "density": ["a", "b"] * (n // 2)},
                        index=pd.Index([f"c{i}" for i in range(n)], name="case_id"))


def test_missing_tokens_are_values_not_codes():
    for v in ("not available", " N/A", "NaN", "", "unknown", None, float("nan"), pd.NA):
        assert is_missing(v, DEFAULT_MISSING_VALUES), v
    # Values that carry information must never be read as missing.
    for v in ("0", "no", "none", "-", "negative", 0, 0.0, False):
        assert not is_missing(v, DEFAULT_MISSING_VALUES), v
    assert "not available" in DataConfig().missing_values


def test_not_available_keeps_age_numeric_and_unseen_age_predicts():
    pre = TabularPreprocessor().fit(_table())
    assert pre.kinds_["age"] == "numeric"
    names = pre.feature_names_
    assert [n for n in names if n.startswith("age")] == ["age", "age__missing"]  # one number, not 10 levels
    X = pre.transform(_table(), row_ids=list(_table().index))
    miss = X[:, names.index("age__missing")]
    np.testing.assert_array_equal(np.flatnonzero(miss), [2, 5, 11])
    again = TabularPreprocessor.from_dict(pre.to_dict())
    new = pd.DataFrame({"age": ["88", "not available"], "density": ["a", "b"]}, index=["new1", "new2"])
    Y = again.transform(new, row_ids=["new1", "new2"])
    z = (88.0 - pre.means_["age"]) / pre.scales_["age"]
    assert Y[0, names.index("age")] == pytest.approx(z, rel=1e-5) and Y[0, names.index("age__missing")] == 0
    assert Y[1, names.index("age__missing")] == 1 and Y[1, names.index("age")] == pytest.approx(
        (pre.medians_["age"] - pre.means_["age"]) / pre.scales_["age"], rel=1e-5)


def test_classical_path_keeps_age_numeric():
    X = numeric_for_classical(_table())
    assert "age" in X.columns and not any(c.startswith("age=") for c in X.columns)
    assert X["age"].isna().sum() == 3 and X.loc["c3", "age"] == 66.0
    new = pd.DataFrame({"age": ["88", "not available"], "density": ["a", "b"]}, index=["new1", "new2"])
    Y = numeric_like(new, list(X.columns))
    assert Y.loc["new1", "age"] == 88.0 and np.isnan(Y.loc["new2", "age"])


def test_empty_columns_keep_their_kind():
    t = pd.DataFrame({"rad_area": [np.nan] * 4, "note": [None, "", "n/a", None]})
    assert TabularPreprocessor().fit(t).kinds_ == {"rad_area": "numeric", "note": "categorical"}


def test_bool_with_missing_marker_is_bool():
    t = pd.DataFrame({"halo": ["no", "yes", "not applicable", "no", "yes"]})
    pre = TabularPreprocessor().fit(t)
    assert pre.kinds_["halo"] == "bool" and pre.n_features_out_ == 2


def test_declared_types_are_honoured():
    t = pd.DataFrame({"grade": [1, 2, 3, 1, 2, 3], "flag": ["0", "1", "1", "0", "1", "0"],
                      "size": [10.0, 12.5, np.nan, 30.0, 8.0, 9.0]})
    types = {"grade": "categorical", "flag": "numeric", "size": "numeric"}
    pre = TabularPreprocessor(column_types=types).fit(t)
    assert pre.kinds_ == {"grade": "categorical", "flag": "numeric", "size": "numeric"}
    assert pre.categories_["grade"] == ["1", "2", "3"]  # integer codes, not '1.0'
    again = TabularPreprocessor.from_dict(pre.to_dict())
    row = again.transform(pd.DataFrame({"grade": ["2"], "flag": ["1"], "size": ["11"]}))
    assert row[0, again.feature_names_.index("grade=2")] == 1
    X = numeric_for_classical(t, column_types=types)
    assert {"grade=1", "grade=2", "grade=3", "flag", "size"} <= set(X.columns)


def test_declared_numeric_with_text_names_case_and_column():
    t = _table(["57", "43", "66 yrs", "70"])
    with pytest.raises(DataError, match=r"case 'c2', column 'age': '66 yrs' is not a number"):
        TabularPreprocessor(column_types={"age": "numeric"}).fit(t)
    with pytest.raises(DataError, match=r"case 'c2', column 'age': '66 yrs' is not a number"):
        numeric_for_classical(t, column_types={"age": "numeric"})
    with pytest.raises(DataError, match=r"column 'density'.*not a yes/no value"):
        TabularPreprocessor(column_types={"density": "bool"}).fit(t)


def test_ambiguous_text_in_numbers_is_decided_and_logged(caplog):
    ages = [str(a) for a in range(40, 58)] + [">90", "approx 50"]
    t = _table(ages)
    with caplog.at_level(logging.WARNING, logger="breastfusion"):
        pre = TabularPreprocessor().fit(t)
    assert pre.kinds_["age"] == "numeric"
    msg = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "'age'" in msg and "numeric" in msg and "'>90'" in msg and "'c18'" in msg and "column_types" in msg
    X = pre.transform(t)
    assert X[18, pre.feature_names_.index("age__missing")] == 1  # seen in training: read as missing
    with pytest.raises(DataError, match=r"column 'age': 'about 70' is not a number"):
        pre.transform(_table(["about 70", "50"]), row_ids=["x1", "x2"])
    ct = infer_column_type(t["age"], "age", DEFAULT_MISSING_VALUES)
    assert ct.kind == "numeric" and "text_in_numbers" in ct.flags and ct.ambiguous


def test_mixed_column_is_categorical_and_flagged(caplog):
    t = pd.DataFrame({"birads": ["4a", "4b", "5", "3", "4c", "2", "4a", "5"]})
    with caplog.at_level(logging.WARNING, logger="breastfusion"):
        pre = TabularPreprocessor().fit(t)
    assert pre.kinds_["birads"] == "categorical"
    assert any("'birads'" in r.getMessage() and "categorical" in r.getMessage() for r in caplog.records)


def test_few_integer_levels_flagged_not_silent(caplog):
    codes = pd.Series([1, 2, 3, 2, 1, 3, 2, 2, 1, 3, 1, 2], name="tumour_grade")
    ct = infer_column_type(codes, "tumour_grade", DEFAULT_MISSING_VALUES)
    assert ct.kind == "numeric" and "few_integer_levels" in ct.flags
    with caplog.at_level(logging.INFO, logger="breastfusion"):
        numeric_for_classical(pd.DataFrame({"tumour_grade": codes}))
    # Training logs it at INFO (it also sees computed counts); the audit, on clinical columns only, warns.
    assert any("'tumour_grade'" in r.getMessage() and "may be codes" in r.getMessage() for r in caplog.records)
    declared = infer_column_type(codes, "tumour_grade", DEFAULT_MISSING_VALUES, declared="numeric")
    assert not declared.ambiguous  # the user decided


def test_custom_missing_values_replace_default():
    t = pd.DataFrame({"age": ["50", "nd", "60", "70", "65"]})
    pre = TabularPreprocessor(missing_values=["", "nd"]).fit(t)
    assert pre.kinds_["age"] == "numeric" and pre.to_dict()["missing_values"] == ["", "nd"]
    again = TabularPreprocessor.from_dict(pre.to_dict())
    assert again.transform(pd.DataFrame({"age": ["nd"]}))[0, 1] == 1


def test_bundle_without_missing_values_keeps_old_reading():
    # A bundle written before missing tokens existed: blank was the only text marker, 'unknown' a category.
    old = {"unknown_category": "error", "columns": ["brca"], "kinds": {"brca": "categorical"}, "medians": {},
           "means": {}, "scales": {}, "categories": {"brca": ["negative", "unknown"]}}
    pre = TabularPreprocessor.from_dict(old)
    X = pre.transform(pd.DataFrame({"brca": ["unknown", ""]}))
    np.testing.assert_array_equal(X, [[0, 1, 0], [0, 0, 1]])


def test_config_fields_validate():
    cfg = Config()
    cfg.data.column_types = {"age": "numeric"}
    with pytest.raises((ConfigError, ValueError)):
        DataConfig(column_types={"age": "number"})
    with pytest.raises((ConfigError, ValueError)):
        DataConfig(column_types={"": "numeric"})


def test_numeric_missing_code_declared():
    # A sentinel such as -999 is missing only when the user says so; then also as a number.
    t = pd.DataFrame({"ldh": [180, -999, 220, 250, 199]})
    assert TabularPreprocessor().fit(t).medians_["ldh"] == 199.0
    pre = TabularPreprocessor(missing_values=["", "-999"]).fit(t)
    assert pre.medians_["ldh"] == pytest.approx(209.5)
    assert pre.transform(pd.DataFrame({"ldh": ["-999"]}))[0, 1] == 1
