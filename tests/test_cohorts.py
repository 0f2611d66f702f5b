"""Several sources read as one multi-centre cohort (data.source as a mapping centre -> data)."""

import logging

import pandas as pd
import pytest

from breastfusion.config import load_config
from breastfusion.data.cohorts import import_sources
from breastfusion.data.synthetic import make_synthetic_cohort
from breastfusion.errors import DataError


def _table(tmp_path, name, n=6, extra=None):
    d = tmp_path / name
    make_synthetic_cohort(d, n_cases=n, n_centers=1, image_size=48, seed=len(name))  # SYNTHETIC phantoms
    df = pd.read_csv(d / "cases.csv")
    if extra is not None:
        df = extra(df)
    df.to_csv(d / "cases.csv", index=False)
    return d / "cases.csv"


def test_mapping_sets_centres_and_prefixes_clashing_ids(tmp_path, caplog):
    a = _table(tmp_path, "siteA")
    b = _table(tmp_path, "siteB")  # the synthetic generator names cases the same way: ids clash
    with caplog.at_level(logging.WARNING):
        cases = import_sources({"A": str(a), "B": str(b)})
    assert sorted(cases["center"].unique()) == ["A", "B"]
    assert cases["case_id"].is_unique
    assert cases["case_id"].str.match(r"^(A|B)/").all()
    assert "prefixed" in caplog.text


def test_column_missing_at_one_centre_is_warned(tmp_path, caplog):
    a = _table(tmp_path, "siteA", extra=lambda df: df.assign(ki67=1.0))
    b = _table(tmp_path, "siteB")
    with caplog.at_level(logging.WARNING):
        cases = import_sources({"A": str(a), "B": str(b)})
    assert cases.loc[cases["center"] == "B", "ki67"].isna().all()
    assert "centre 'B' has no column(s) ki67" in caplog.text


def test_bad_mapping_names_the_centre(tmp_path):
    with pytest.raises(DataError, match="centre 'X'"):
        import_sources({"X": str(tmp_path / "nowhere")})
    with pytest.raises(DataError, match="empty mapping"):
        import_sources({})


def test_config_accepts_a_mapping(tmp_path):
    cfg = load_config(None, [f"data.source={{A: {tmp_path}, B: {tmp_path}}}"])
    assert cfg.data.source == {"A": str(tmp_path), "B": str(tmp_path)}
