"""The synthetic cohort generator: files, table, determinism, missingness, signal, argument checks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from breastfusion.data.cases import feature_columns, mask_list, read_cases
from breastfusion.data.synthetic import (
    BIOMARKER_COLUMNS,
    CLINICAL_COLUMNS,
    FEATURE_INFO,
    SYNTHETIC_TAG,
    is_synthetic,
    make_synthetic_cohort,
)
from breastfusion.errors import ConfigError

N, SIZE = 150, 32


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn1")
    return out, make_synthetic_cohort(out, n_cases=N, image_size=SIZE, signal=1.0, missing_rate=0.1, seed=3)


@pytest.fixture(scope="module")
def null_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn0")
    return out, make_synthetic_cohort(out, n_cases=N, image_size=SIZE, signal=0.0, missing_rate=0.1, seed=3)


def _macro_f1_clinical(df: pd.DataFrame) -> float:
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cols = [c for c in CLINICAL_COLUMNS + BIOMARKER_COLUMNS if FEATURE_INFO[c]["kind"] != "categorical"]
    X = df[cols].astype("float64").to_numpy()
    y = df["label"].to_numpy()
    clf = make_pipeline(SimpleImputer(), StandardScaler(), LogisticRegression(max_iter=2000))
    pred = cross_val_predict(clf, X, y, groups=df["patient_id"], cv=StratifiedGroupKFold(5, shuffle=True, random_state=0))
    return f1_score(y, pred, average="macro")


def _lesion_contrast(df: pd.DataFrame) -> float:
    """Median over lesion cases of mean(grey inside mask) / mean(grey in a ring around it)."""
    from scipy import ndimage as ndi

    ratios = []
    for _, row in df[df["label"] != "normal"].iterrows():
        img = np.asarray(Image.open(row["image_path"]).convert("L"), dtype=float)
        m = np.asarray(Image.open(mask_list(row["mask_path"])[0])) > 0
        ring = ndi.binary_dilation(m, iterations=3) & ~m & (img > 0)
        if m.sum() >= 4 and ring.sum() >= 4:
            ratios.append(img[m].mean() / img[ring].mean())
    return float(np.median(ratios))


def _median_width_over_height(df: pd.DataFrame, label: str) -> float:
    out = []
    for mp in df.loc[df["label"] == label, "mask_path"]:
        ys, xs = np.nonzero(np.asarray(Image.open(mask_list(mp)[0])) > 0)
        out.append((np.ptp(xs) + 1) / (np.ptp(ys) + 1))
    return float(np.median(out))


def test_files_and_table_layout(cohort):
    out, df = cohort
    assert len(df) == N
    assert (out / "cases.csv").is_file() and (out / "SYNTHETIC.md").is_file()
    assert SYNTHETIC_TAG in (out / "SYNTHETIC.md").read_text()
    assert list(df.columns[:6]) == ["case_id", "patient_id", "center", "label", "image_path", "mask_path"]
    assert feature_columns(df) == CLINICAL_COLUMNS + BIOMARKER_COLUMNS
    assert df["case_id"].is_unique
    # exact class allocation: 0.5 / 0.3 / 0.2 of 150
    assert df["label"].value_counts().to_dict() == {"benign": 75, "malignant": 45, "normal": 30}
    assert set(df["center"]) == {"synthetic_center_0", "synthetic_center_1"}
    for p in df["image_path"]:
        assert p.startswith(str(out.resolve() / "images"))


def test_feature_columns_names_and_types(cohort):
    _, df = cohort
    assert len(CLINICAL_COLUMNS) == 25 and len(BIOMARKER_COLUMNS) == 10
    assert len(set(CLINICAL_COLUMNS + BIOMARKER_COLUMNS)) == 35
    for must in ("age", "bmi", "menopausal_status", "family_history_breast_cancer", "brca_mutation", "palpable_lump",
                 "breast_density", "ca15_3", "cea", "ca27_29", "her2_serum", "crp", "hemoglobin", "vitamin_d"):
        assert must in FEATURE_INFO
    for col in CLINICAL_COLUMNS + BIOMARKER_COLUMNS:
        info = FEATURE_INFO[col]
        assert info["group"] == ("clinical" if col in CLINICAL_COLUMNS else "biomarker")
        assert info["description"]
        s = df[col].dropna()
        assert len(s) > 0, col
        if info["kind"] in ("numeric", "integer"):
            assert pd.api.types.is_numeric_dtype(df[col]) and not pd.api.types.is_bool_dtype(df[col]), col
            assert np.isfinite(s.astype(float)).all() and (s.astype(float) >= 0).all(), col
            if info["kind"] == "integer":
                assert (s.astype(float) % 1 == 0).all(), col
        elif info["kind"] == "boolean":
            assert set(s.astype(bool).unique()) <= {True, False} and s.map(type).isin([bool, np.bool_]).all(), col
        else:
            assert info["kind"] == "categorical"
            assert set(s) <= set(info["categories"]), (col, set(s))
    assert df["age"].dropna().between(25, 85).all()
    assert df["bmi"].dropna().between(16, 50).all()
    assert FEATURE_INFO["ca15_3"]["unit"] == "U/mL"
    # nulliparous patients have no age at first birth
    nullip = df["parity"] == 0
    assert df.loc[nullip.fillna(False).astype(bool), "age_first_birth"].isna().all()


def test_masks_and_images(cohort):
    _, df = cohort
    n_rgb = n_two = 0
    for _, row in df.iterrows():
        img = Image.open(row["image_path"])
        assert img.mode in ("L", "RGB")
        arr = np.asarray(img)
        if img.mode == "RGB":
            n_rgb += 1
            assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
        masks = mask_list(row["mask_path"])
        assert masks and masks[0].endswith(f"{row['case_id']}_mask.png")
        if len(masks) > 1:
            n_two += 1
            assert masks[1].endswith(f"{row['case_id']}_mask_1.png")
        for mp in masks:
            m = np.asarray(Image.open(mp))
            assert m.shape == (SIZE, SIZE) == arr.shape[:2]
            assert set(np.unique(m)) <= {0, 255}
            if row["label"] == "normal":
                assert not m.any()
            else:
                assert m.any(), mp
        if row["label"] == "normal":
            assert len(masks) == 1
    assert n_rgb > 0 and n_rgb < len(df)
    assert n_two > 0


def test_patients_with_two_images_share_everything(cohort):
    _, df = cohort
    counts = df["patient_id"].value_counts()
    assert counts.max() == 2 and (counts == 2).sum() >= 5
    feats = CLINICAL_COLUMNS + BIOMARKER_COLUMNS
    for pid in counts[counts == 2].index:
        rows = df[df["patient_id"] == pid]
        assert rows["label"].nunique() == 1 and rows["center"].nunique() == 1
        a, b = rows[feats].iloc[0], rows[feats].iloc[1]
        assert all((pd.isna(x) and pd.isna(y)) or x == y for x, y in zip(a, b))


def test_synthetic_flag(cohort, tmp_path):
    out, df = cohort
    assert (df["_synthetic"] == True).all()  # noqa: E712
    assert is_synthetic(df)
    assert not is_synthetic(df.drop(columns="_synthetic"))
    assert not is_synthetic(df.assign(_synthetic=False))
    assert is_synthetic(df.assign(_synthetic=["True"] + [np.nan] * (len(df) - 1)))
    assert not is_synthetic("not a table")


def test_round_trip_read_cases(cohort):
    out, df = cohort
    back = read_cases(out / "cases.csv")
    assert list(back.columns) == list(df.columns)
    assert back["case_id"].tolist() == df["case_id"].tolist()
    assert back["label"].tolist() == df["label"].tolist()
    assert back["image_path"].tolist() == df["image_path"].tolist()
    assert back["mask_path"].tolist() == df["mask_path"].tolist()
    assert is_synthetic(back)
    for col in CLINICAL_COLUMNS + BIOMARKER_COLUMNS:
        assert back[col].isna().tolist() == df[col].isna().tolist(), col
        if FEATURE_INFO[col]["kind"] in ("numeric", "integer"):
            np.testing.assert_allclose(back[col].astype(float), df[col].astype(float), err_msg=col)
        else:
            ok = df[col].notna()
            assert back.loc[ok, col].astype(str).tolist() == df.loc[ok, col].astype(str).tolist(), col


def test_deterministic_for_a_seed(tmp_path):
    kw = dict(n_cases=8, image_size=40, seed=11)
    a = make_synthetic_cohort(tmp_path / "a", **kw)
    b = make_synthetic_cohort(tmp_path / "b", **kw)
    c = make_synthetic_cohort(tmp_path / "c", **{**kw, "seed": 12})
    assert (tmp_path / "a" / "cases.csv").read_bytes() == (tmp_path / "b" / "cases.csv").read_bytes()
    for pa, pb in zip(a["image_path"], b["image_path"]):
        assert np.array_equal(np.asarray(Image.open(pa)), np.asarray(Image.open(pb)))
    feats = CLINICAL_COLUMNS + BIOMARKER_COLUMNS
    assert not a[feats].astype(str).equals(c[feats].astype(str))
    assert not np.array_equal(np.asarray(Image.open(a["image_path"][0]).convert("L")),
                              np.asarray(Image.open(c["image_path"][0]).convert("L")))
    # regenerating into the same folder replaces the earlier cohort's files
    make_synthetic_cohort(tmp_path / "a", n_cases=4, image_size=40, seed=11)
    assert len(list((tmp_path / "a" / "images").glob("syn_*.png"))) == 4


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_missing_rate_honoured(tmp_path, rate):
    df = make_synthetic_cohort(tmp_path, n_cases=60, image_size=32, missing_rate=rate, patients_with_two_images=0.0, seed=5)
    cols = [c for c in CLINICAL_COLUMNS + BIOMARKER_COLUMNS if c != "age_first_birth"]  # structurally empty too
    frac = float(df[cols].isna().to_numpy().mean())
    assert abs(frac - rate) < 0.04, frac
    if rate == 0.0:
        assert not df["age_first_birth"][df["parity"] > 0].isna().any()


def test_signal_controls_separability(cohort, null_cohort):
    f1_signal = _macro_f1_clinical(cohort[1])
    f1_null = _macro_f1_clinical(null_cohort[1])
    assert f1_signal > 0.55, f1_signal
    assert f1_null < 0.48, f1_null
    # images: lesions are clearly darker than their surroundings with signal, invisible without
    c_signal, c_null = _lesion_contrast(cohort[1]), _lesion_contrast(null_cohort[1])
    assert c_signal < 0.75, c_signal
    assert 0.85 < c_null < 1.15, c_null
    # lesion shape: benign wider-than-tall, malignant taller-than-wide, only when there is signal
    wb, wm = _median_width_over_height(cohort[1], "benign"), _median_width_over_height(cohort[1], "malignant")
    assert wb > 1.2 and wm < 0.9, (wb, wm)
    wb0, wm0 = _median_width_over_height(null_cohort[1], "benign"), _median_width_over_height(null_cohort[1], "malignant")
    assert 0.8 < wb0 / wm0 < 1.25, (wb0, wm0)


def test_binary_subset_and_sequence_proportions(tmp_path):
    df = make_synthetic_cohort(tmp_path / "b", n_cases=10, image_size=32, class_proportions={"benign": 0.6, "malignant": 0.4})
    assert df["label"].value_counts().to_dict() == {"benign": 6, "malignant": 4}
    df = make_synthetic_cohort(tmp_path / "s", n_cases=3, image_size=32, class_proportions=(0.9, 0.05, 0.05), n_centers=3)
    assert sorted(df["label"]) == ["benign", "malignant", "normal"]  # every class gets at least one case
    assert df["center"].nunique() == 3


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"n_cases": 2}, "n_cases"),
        ({"n_cases": 1, "class_proportions": {"benign": 0.5, "malignant": 0.5}}, "n_cases"),
        ({"class_proportions": (0.5, 0.3, 0.3)}, "class_proportions"),
        ({"class_proportions": {"benign": 0.5, "cancer": 0.5}}, "class_proportions"),
        ({"class_proportions": {"benign": 1.2, "malignant": -0.2}}, "class_proportions"),
        ({"missing_rate": -0.1}, "missing_rate"),
        ({"missing_rate": 1.0}, "missing_rate"),
        ({"signal": -0.5}, "signal"),
        ({"signal": float("nan")}, "signal"),
        ({"n_centers": 0}, "n_centers"),
        ({"patients_with_two_images": 1.5}, "patients_with_two_images"),
        ({"image_size": 8}, "image_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_arguments_name_the_parameter(tmp_path, kwargs, param):
    with pytest.raises(ConfigError, match=param):
        make_synthetic_cohort(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()  # nothing written
