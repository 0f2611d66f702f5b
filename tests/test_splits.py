"""Tests of cross-validation splits (synthetic cases tables only: no image is read)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from breastfusion.data.splits import check_no_leakage, load_splits, make_splits, save_splits, split_groups
from breastfusion.errors import DataError


def _cases(n=120, seed=0, centers=("A",)):
    """Synthetic table: 3 classes (60/40/20 %), some patients with 2-3 images, two centres optional."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(["benign", "malignant", "normal"], size=n, p=[0.6, 0.3, 0.1])
    patient = [f"p{i}" for i in range(n)]
    for i in range(0, n - 2, 7):  # every 7th patient owns the next image too (same label, realistic)
        patient[i + 1] = patient[i]
        labels[i + 1] = labels[i]
    return pd.DataFrame({
        "case_id": [f"c{i:03d}" for i in range(n)],
        "patient_id": patient,
        "center": [centers[i % len(centers)] for i in range(n)],
        "label": labels,
        "image_path": [f"/x/{i}.png" for i in range(n)],
    })


def _dups(cases, pairs):
    g = pd.Series([f"solo:{c}" for c in cases.case_id], index=cases.case_id)
    for k, members in enumerate(pairs):
        g[list(members)] = f"dup{k}"
    return g


def test_groups_kept_together_patients_and_duplicates():
    cases = _cases()
    # Duplicate groups that chain across patients: c003~c050, c050's patient is alone, c010~c011~c090.
    groups = _dups(cases, [("c003", "c050"), ("c010", "c090"), ("c011", "c091")])
    for seed in range(4):
        sp = make_splits(cases, n_splits=5, seed=seed, groups=groups)
        assert list(sp.columns[:3]) == ["case_id", "fold", "group"]
        assert sp["fold"].dtype.kind == "i" and set(sp["fold"]) == set(range(5))
        f = sp.set_index("case_id")["fold"]
        assert f["c003"] == f["c050"]
        assert f["c010"] == f["c090"] and f["c011"] == f["c091"]
        for pid, part in cases.groupby("patient_id"):
            assert f[part.case_id].nunique() == 1, pid
        check_no_leakage(sp, cases, groups)


def test_union_of_patient_and_duplicate_links():
    cases = pd.DataFrame({
        "case_id": ["a", "b", "c", "d", "e"],
        "patient_id": ["P1", "P1", "P2", "P3", "P4"],
        "label": ["x"] * 5,
        "image_path": ["/x"] * 5,
    })
    g = pd.Series({"a": "s1", "b": "s2", "c": "D", "d": "s4", "e": "D"})
    sg = split_groups(cases, g)
    assert sg["a"] == sg["b"]            # same patient
    assert sg["c"] == sg["e"]            # same duplicate group
    assert sg["a"] != sg["c"] and sg["d"] != sg["c"]
    assert sg.nunique() == 3


def test_stratification_roughly_holds():
    cases = _cases(n=300, seed=1)
    sp = make_splits(cases, n_splits=5, seed=0)
    overall = cases["label"].value_counts(normalize=True)
    merged = sp.merge(cases[["case_id", "label"]], on="case_id")
    for k, part in merged.groupby("fold"):
        frac = part["label"].value_counts(normalize=True)
        for cls in overall.index:
            assert abs(frac.get(cls, 0) - overall[cls]) < 0.08, (k, cls)
        assert 0.15 < len(part) / len(cases) < 0.25


def test_seeded_reproducibility():
    cases = _cases()
    a = make_splits(cases, n_splits=4, seed=7)
    b = make_splits(cases, n_splits=4, seed=7)
    c = make_splits(cases, n_splits=4, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not a["fold"].equals(c["fold"])


def test_n_splits_errors():
    cases = _cases()
    with pytest.raises(ValueError, match=r"The 'n_splits' parameter of make_splits must be an int in the range "
                                         r"\[2, inf\)\. Got 1 instead\."):
        make_splits(cases, n_splits=1)
    with pytest.raises(ValueError, match="n_splits"):
        make_splits(cases, n_splits=2.5)
    with pytest.raises(ValueError, match="strategy"):
        make_splits(cases, strategy="random")


def test_too_few_groups_in_a_class():
    cases = _cases(n=60)
    cases.loc[:, "label"] = "benign"
    cases.loc[[0, 20, 40], "label"] = "normal"  # 3 normal cases, 3 different patients
    with pytest.raises(DataError, match=r"Class 'normal' has only 3 .*n_splits=5.*n_splits <= 3"):
        make_splits(cases, n_splits=5)
    # Duplicate links merge two of them: now only 2 groups.
    g = _dups(cases, [("c000", "c020")])
    with pytest.raises(DataError, match=r"'normal' has only 2"):
        make_splits(cases, n_splits=3, groups=g)
    sp = make_splits(cases, n_splits=3)
    assert sp.merge(cases, on="case_id").query("label == 'normal'")["fold"].nunique() == 3


def test_leave_one_center_out():
    cases = _cases(n=90, centers=("B", "A", "C"))
    # keep each patient inside one centre: give each case its own patient id
    cases["patient_id"] = cases["case_id"]
    sp = make_splits(cases, strategy="leave_one_center_out")
    assert dict(zip(sp["center"], sp["fold"])) == {"A": 0, "B": 1, "C": 2}
    with pytest.raises(DataError, match="at least 2 centres"):
        make_splits(cases.assign(center="A"), strategy="leave_one_center_out")
    g = _dups(cases, [("c000", "c001")])  # c000 in B, c001 in A
    with pytest.raises(DataError, match="spans centres"):
        make_splits(cases, strategy="leave_one_center_out", groups=g)


def test_check_no_leakage_detects(tmp_path):
    cases = _cases()
    g = _dups(cases, [("c003", "c050")])
    sp = make_splits(cases, n_splits=5, groups=g)
    bad = sp.copy()
    f50 = int(bad.loc[bad.case_id == "c050", "fold"].iloc[0])
    bad.loc[bad.case_id == "c003", "fold"] = (f50 + 1) % 5
    with pytest.raises(DataError, match="Leakage"):
        check_no_leakage(bad, cases, g)
    # Without the duplicate groups the same table passes: c003 is its patient's only case.
    check_no_leakage(bad, cases)


def test_groups_must_cover_cases():
    cases = _cases(n=30)
    g = pd.Series({"c000": "x"})
    with pytest.raises(DataError, match="no entry for 29 case"):
        make_splits(cases, n_splits=2, groups=g)


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_save_load_roundtrip(tmp_path, suffix):
    cases = _cases()
    sp = make_splits(cases, n_splits=3, seed=2)
    p = save_splits(sp, tmp_path / f"splits{suffix}")
    back = load_splits(p)
    pd.testing.assert_frame_equal(back[["case_id", "fold", "group"]], sp[["case_id", "fold", "group"]],
                                  check_dtype=False)
    assert back["fold"].dtype.kind == "i"
    (tmp_path / "bad.csv").write_text("case_id,fold\na,1\nb,x\n")
    with pytest.raises(DataError, match="invalid fold"):
        load_splits(tmp_path / "bad.csv")
    with pytest.raises(DataError, match="not found"):
        load_splits(tmp_path / "missing.csv")
