import numpy as np
import pandas as pd
import pytest

from breastfusion.errors import DataError
from breastfusion.features.tabular import TabularPreprocessor


def _df():
    return pd.DataFrame({"age": [30, 50, np.nan, 70], "smoker": ["yes", "no", None, "no"],
                         "density": ["a", "b", "c", None], "ca15_3": ["12.5", "20", "", "31"]})


def test_encoding_and_json_round_trip():
    pre = TabularPreprocessor().fit(_df())
    X = pre.transform(_df())
    assert X.shape == (4, pre.n_features_out_) and np.isfinite(X).all()
    names = pre.feature_names_
    assert "density=b" in names and "age__missing" in names
    assert pre.kinds_ == {"age": "numeric", "smoker": "bool", "density": "categorical", "ca15_3": "numeric"}
    assert X[2, names.index("age__missing")] == 1 and X[0, names.index("age__missing")] == 0
    again = TabularPreprocessor.from_dict(pre.to_dict())
    np.testing.assert_array_equal(again.transform(_df()), X)


def test_missing_columns_mean_missing_values():
    pre = TabularPreprocessor().fit(_df())
    row = pre.transform(pd.DataFrame(index=[0]))
    assert row[0, pre.feature_names_.index("smoker__missing")] == 1


def test_unknown_category_and_bad_values_name_the_row():
    pre = TabularPreprocessor().fit(_df())
    bad = _df().assign(density=["a", "z", "b", "c"])
    with pytest.raises(DataError, match=r"case 'p2', column 'density': unknown category 'z'"):
        pre.transform(bad, row_ids=["p1", "p2", "p3", "p4"])
    lenient = TabularPreprocessor(unknown_category="missing").fit(_df())
    assert np.isfinite(lenient.transform(bad)).all()
    with pytest.raises(DataError, match="column 'age': 'old' is not a number"):
        pre.transform(_df().assign(age=[1, "old", 2, 3]))
    with pytest.raises(DataError, match="infinite"):
        pre.transform(_df().assign(age=[1, np.inf, 2, 3]))
