"""BrEaST-Lesions-USG importer, physical pixel size for radiomics, data.drop_labels (issue 10, item 1).

The fake folder built here is SYNTHETIC: tiny RGBA images with a dark disk, laid out and named like the public
release (clinical_data.csv + BrEaST-Lesions_USG-images_and_masks/). The real-data test reads ../shared/data and
skips when it is absent."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import require_shared, write_png

from breastfusion.data.importers.breast_lesions_usg import IMAGES_DIR, SHEET
from breastfusion.data.importers import import_cases
from breastfusion.errors import DataError
from breastfusion.features import radiomics as rad

COLUMNS = ["CaseID", "Image_filename", "Mask_tumor_filename", "Mask_other_filename", "Pixel_size", "Age",
           "Tissue_composition", "Signs", "Symptoms", "Shape", "Margin", "Echogenicity", "Posterior_features", "Halo",
           "Calcifications", "Skin_thickening", "Interpretation", "BIRADS", "Verification", "Diagnosis",
           "Classification"]
SIGNS = ["no", "palpable", "skin retraction&palpable", "not available", "palpable&breast scar", "no"]
BIRADS_OF = {"benign": ["2", "3", "4a", "4b"], "malignant": ["4a", "4b", "4c", "5"]}  # overlapping, as a reader


def _disk(n: int, r: int, c=None) -> np.ndarray:
    c = (n // 2, n // 2) if c is None else c
    yy, xx = np.mgrid[:n, :n]
    return (yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= r * r


def make_fake_breast(root, n_lesions: int = 12, n_normal: int = 2, size: int = 64, seed: int = 0):
    """SYNTHETIC BrEaST-Lesions-USG-like folder: n_lesions benign/malignant cases with a `_tumor` mask, normal
    cases without one, and an `_other` mask on case 1 (a big square that must never be read as the lesion)."""
    rng = np.random.default_rng(seed)
    img_dir = root / IMAGES_DIR
    rows = []
    for i in range(1, n_lesions + n_normal + 1):
        label = "normal" if i > n_lesions else ("malignant" if i % 2 else "benign")
        name = f"case{i:03d}"
        r = 8 + (i % 5) * 2 if label != "normal" else 0
        grey = np.full((size, size), 170.0) + rng.normal(0, 8, (size, size))
        if r:
            grey[_disk(size, r)] = 60 + rng.integers(0, 30)  # no class signal: nothing leaks
        rgba = np.dstack([np.clip(grey, 0, 255).astype(np.uint8)] * 3 + [np.full((size, size), 255, np.uint8)])
        write_png(img_dir / f"{name}.png", rgba, mode="RGBA")
        tumor = other = ""
        if r:
            tumor = f"{name}_tumor.png"
            m = (_disk(size, r) * 255).astype(np.uint8)
            write_png(img_dir / tumor, np.dstack([m, m, m, np.full_like(m, 255)]), mode="RGBA")
        if i == 1:
            other = f"{name}_other1.png"
            sq = np.zeros((size, size), np.uint8)
            sq[2:40, 2:40] = 255
            write_png(img_dir / other, sq)
        na = label == "normal"
        rows.append({
            "CaseID": str(i), "Image_filename": f"{name}.png", "Mask_tumor_filename": tumor,
            "Mask_other_filename": other, "Pixel_size": "0.0078125" if i % 3 else "0.006944444",
            "Age": "not available" if i % 4 == 0 else str(40 + i), "Tissue_composition": "homogeneous: fat",
            "Signs": SIGNS[i % len(SIGNS)], "Symptoms": "no" if i % 2 else "not available",
            "Shape": "not applicable" if na else ("irregular" if label == "malignant" else "oval"),
            "Margin": "not applicable" if na else "circumscribed", "Echogenicity": "not applicable" if na else "hypoechoic",
            "Posterior_features": "not applicable" if na else "no", "Halo": "not applicable" if na else "no",
            "Calcifications": "not applicable" if na else "no", "Skin_thickening": "no",
            "Interpretation": "not applicable" if na else "Fibroadenoma",
            "BIRADS": "1" if na else BIRADS_OF[label][(i // 2) % 4],
            "Verification": "not applicable" if na else "confirmed by biopsy", "Diagnosis": "not applicable",
            "Classification": label,
        })
    pd.DataFrame(rows, columns=COLUMNS).to_csv(root / SHEET, index=False)
    return root


@pytest.fixture
def fake_root(tmp_path):
    return make_fake_breast(tmp_path / "breast")


def test_importer_reads_the_release_layout(fake_root):
    cases = import_cases(fake_root)
    assert len(cases) == 14 and cases["case_id"].tolist()[:2] == ["case001", "case002"]
    assert (cases["patient_id"] == cases["case_id"]).all() and set(cases["center"]) == {"BrEaST-Lesions-USG"}
    one = cases.iloc[0]
    assert one["mask_path"].endswith("case001_tumor.png") and "_other" not in one["mask_path"]
    normal = cases[cases["label"] == "normal"]
    assert len(normal) == 2 and (normal["mask_path"] == "").all()  # 'no lesion', not 'mask unknown'
    assert "Classification" not in cases.columns  # the label is not kept a second time as an input
    assert cases.loc[3, "Age"] == "not available"  # read as text: the typing sees the marker
    assert {"Pixel_size", "Signs", "BIRADS", "Mask_other_filename"} <= set(cases.columns)
    # the sheet itself is accepted too, and a broken sheet names its file and row
    assert len(import_cases(fake_root / SHEET)) == 14
    sheet = pd.read_csv(fake_root / SHEET, dtype=str, keep_default_na=False)
    sheet.loc[2, "CaseID"] = "three"
    sheet.to_csv(fake_root / SHEET, index=False)
    with pytest.raises(DataError, match=r"clinical_data.csv', row 4, column 'CaseID': 'three'"):
        import_cases(fake_root)


def test_rgba_ultrasound_reads_as_grey(fake_root):
    from breastfusion.data.images import read_image, read_mask

    img = read_image(fake_root / IMAGES_DIR / "case002.png")
    m = read_mask(fake_root / IMAGES_DIR / "case002_tumor.png", img.shape)
    assert img.shape == (64, 64) and 0.1 < m.mean() < 0.2  # the opaque alpha channel is not read as mask


def test_real_breast_lesions_usg():
    root = require_shared("breast_lesions_usg")
    cases = import_cases(root)
    counts = cases["label"].value_counts().to_dict()
    assert len(cases) == 256 and counts == {"benign": 154, "malignant": 98, "normal": 4}
    assert not cases["mask_path"].str.contains("_other").any()
    from breastfusion.config import load_config
    from breastfusion.features.tabular import TabularPreprocessor
    from breastfusion.tasks.base import drop_label_cases
    from breastfusion.tabular_inputs import tabular_table

    cfg = load_config(_repo_config(), [])
    kept, dropped = drop_label_cases(cases, cfg.data.drop_labels)
    assert len(kept) == 252 and dropped == {"normal": 4}
    table = tabular_table(kept, list(cfg.data.tabular_columns))
    pre = TabularPreprocessor(missing_values=cfg.data.missing_values, column_types=cfg.data.column_types,
                              multi_separator=cfg.data.multi_value_separator,
                              ordinal_levels=cfg.data.ordinal_levels).fit(table)
    assert pre.kinds_["Age"] == "numeric"
    X = pre.transform(table)
    names = pre.feature_names_
    assert X[:, names.index("Age__missing")].sum() == (kept["Age"] == "not available").sum() > 0
    assert "Signs=palpable" in names and "Signs=skin retraction" in names
    assert not any("&" in n for n in names)
    sizes = rad.pixel_spacings_mm(kept, cfg.data.pixel_size_column, cfg.data.pixel_size_unit)
    assert 0.03 < min(sizes) and max(sizes) < 0.2  # mm per pixel: a ~500 px image is a few cm across


def _repo_config():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "configs" / "breast_lesions_usg.yaml"


def test_recipe_config_loads_and_declares_the_traps():
    from breastfusion.config import load_config

    cfg = load_config(_repo_config(), [])
    d = cfg.data
    assert d.drop_labels == ["normal"] and d.labels == ["benign", "malignant"]
    assert {"not available", "not applicable", ""} <= set(d.missing_values)
    assert d.column_types["Signs"] == "multi" and d.column_types["BIRADS"] == "ordinal"
    assert d.ordinal_levels["BIRADS"].index("4a") < d.ordinal_levels["BIRADS"].index("4b")
    assert d.pixel_size_column == "Pixel_size" and d.pixel_size_unit == "cm"
    assert d.tabular_columns == ["Age", "Tissue_composition", "Signs", "Symptoms"]
    assert {"Interpretation", "Verification", "Diagnosis"} <= set(d.roles.exclude) and d.roles.reader_score == "BIRADS"


# ---------------------------------------------------------------------------------------------- pixel size


@pytest.fixture
def disk_files(tmp_path):
    """SYNTHETIC: a dark disk of radius 20 px on a noisy background, and its mask."""
    rng = np.random.default_rng(0)
    mask = _disk(96, 20)
    img = np.where(mask, 60, 170) + rng.integers(-8, 9, size=mask.shape)
    return (write_png(tmp_path / "disk.png", img.astype(np.uint8)),
            write_png(tmp_path / "disk_mask.png", (mask * 255).astype(np.uint8)))


def test_shape_features_in_mm_with_a_pixel_size(disk_files, tmp_path):
    image, mask = disk_files
    s = 0.078125  # mm per pixel (0.0078125 cm, as in the sheet)
    px = rad.extract_case(image, str(mask))
    mm = rad.extract_case(image, str(mask), spacing_mm=s)
    assert mm["rad_original_shape2D_PixelSurface"] == pytest.approx(math.pi * 20**2 * s**2, rel=0.02)
    assert mm["rad_original_shape2D_MeshSurface"] == pytest.approx(px["rad_original_shape2D_MeshSurface"] * s**2, rel=1e-6)
    assert mm["rad_original_shape2D_Perimeter"] == pytest.approx(px["rad_original_shape2D_Perimeter"] * s, rel=1e-6)
    assert mm["rad_original_shape2D_MaximumDiameter"] == pytest.approx(40 * s, rel=0.05)
    # texture does not depend on the spacing
    assert mm["rad_original_firstorder_Mean"] == pytest.approx(px["rad_original_firstorder_Mean"])
    # batch: the unit column is read and converted; the cache key holds the spacing
    cases = pd.DataFrame({"case_id": ["a", "b"], "image_path": [str(image)] * 2, "mask_path": [str(mask)] * 2,
                          "Pixel_size": ["0.0078125", "0.015625"]})
    table = rad.extract_radiomics(cases, cache_dir=tmp_path / "cache", progress=False, pixel_size_column="Pixel_size",
                                  pixel_size_unit="cm")
    assert table.attrs["units"] == "mm"
    ratio = table.loc["b", "rad_original_shape2D_MeshSurface"] / table.loc["a", "rad_original_shape2D_MeshSurface"]
    assert ratio == pytest.approx(4.0, rel=1e-6)
    assert len(list((tmp_path / "cache" / "radiomics").glob("*.json"))) == 2  # same files, two spacings, two keys
    assert rad.case_key(image, [str(mask)]) != rad.case_key(image, [str(mask)], 0.078125)


def test_missing_pixel_size_is_refused_not_mixed(disk_files, tmp_path, caplog):
    image, mask = disk_files
    cases = pd.DataFrame({"case_id": ["a", "b", "c"], "image_path": [str(image)] * 3, "mask_path": [str(mask)] * 3,
                          "Pixel_size": ["0.0078125", "not available", ""]})
    with pytest.raises(DataError, match=r"missing for 2 of 3 case\(s\): b, c"):
        rad.extract_radiomics(cases, progress=False, pixel_size_column="Pixel_size", pixel_size_unit="cm")
    cases["Pixel_size"] = ["0.0078125", "-1", "x"]
    with pytest.raises(DataError, match=r"b \('-1'\), c \('x'\)"):
        rad.extract_radiomics(cases, progress=False, pixel_size_column="Pixel_size", pixel_size_unit="cm")
    # the column entirely absent: pixels, said in the log and in the result
    table = rad.extract_radiomics(cases.drop(columns="Pixel_size"), progress=False, pixel_size_column="Pixel_size")
    assert table.attrs["units"] == "pixel" and "not in the cases table" in caplog.text


# -------------------------------------------------------------------------------------------- end to end

FAST = ["image.size=48", "model.backbone=test_efficientnet", "model.pretrained=false", "cv.n_splits=2",
        "train.stage1_epochs=1", "train.stage2_epochs=1", "train.tabular_epochs=2", "train.batch_size=8",
        "experiment.n_boot=20", "experiment.classical_models=[logreg]", "experiment.deep_models=[]",
        "experiment.final_models=[tabular]", "experiment.explain_cases=0", "train.channels_last=false"]


def test_recipe_end_to_end_on_a_fake_folder(tmp_path):
    """train → bundle → predict on the SYNTHETIC fake folder with the recipe's data keys: the normal cases are
    set aside and counted, multi/ordinal columns are read, radiomics are in mm at training and at prediction."""
    from breastfusion.config import load_config
    from breastfusion.bundles.bundle import load_bundle
    from breastfusion.inference.predictor import Predictor
    from breastfusion.experiment import run_experiment

    root = make_fake_breast(tmp_path / "breast", n_lesions=16, n_normal=2)
    cfg = load_config(_repo_config(), FAST + [f"data.source={root}", "data.tabular_columns=[Age, Signs, BIRADS]",
                                              "data.roles.reader_score=null", "data.roles.reader_block=[]"])
    result = run_experiment(cfg, tmp_path / "run", progress=False)
    cases = pd.read_csv(result.run_dir / "cases.csv", dtype=str, keep_default_na=False)
    assert len(cases) == 16 and "normal" not in set(cases["label"])
    assert "set aside (data.drop_labels)" in (result.run_dir / "report" / "report.html").read_text()
    meta = load_bundle(result.bundle).meta
    assert meta["features"]["radiomics"]["units"] == "mm"
    assert meta["features"]["radiomics"]["pixel_size_column"] == "Pixel_size"
    assert meta["features"]["classical"]["reading"]["multi"] == ["Signs"]
    pre = load_bundle(result.bundle).tabular
    assert pre.kinds_["Signs"] == "multi" and pre.kinds_["BIRADS"] == "ordinal"
    rad_area = pd.read_parquet(result.run_dir / "features" / "radiomics.parquet")["rad_original_shape2D_MeshSurface"]
    assert rad_area.max() < 10  # mm² of a <=16 px radius disk at ~0.07 mm/px, not hundreds of pixels
    # prediction recomputes radiomics in mm: a case without its pixel size is skipped, naming why
    inp = import_cases(root)
    inp = inp[inp["label"] != "normal"].head(4).copy()
    inp.loc[inp.index[1], "Pixel_size"] = "not available"
    inp.drop(columns=["label"]).to_csv(tmp_path / "four.csv", index=False)
    for model in (None, "logreg"):
        predictor = Predictor.load(result.bundle, model=model)
        out = predictor.predict(tmp_path / "four.csv")
        assert len(out) == 3, model  # the scored ones
        assert inp["case_id"].iloc[1] not in set(out["case_id"])
        reason = predictor.last_skipped.set_index("case_id").loc[inp["case_id"].iloc[1], "reason"]
        assert "pixel size" in reason and "mm" in reason, reason


def test_audit_lists_multi_and_ordinal_and_flags_joined_values(fake_root, tmp_path):
    from breastfusion.data.audit import audit_cases
    from breastfusion.data.audit_report import render_markdown

    cases = import_cases(fake_root)
    plain = audit_cases(cases, progress=False)
    assert "looks_multi_valued" in plain.column_types["Signs"]["flags"]  # reported, not split
    declared = audit_cases(cases, progress=False, column_types={"Signs": "multi", "BIRADS": "ordinal"},
                           ordinal_levels={"BIRADS": ["1", "2", "3", "4a", "4b", "4c", "5"]})
    md = render_markdown(declared)
    assert "multi (declared) split at '&'" in md and "levels 1 < 2 < 3 < 4a < 4b < 4c < 5" in md
    assert not declared.column_types["Signs"]["flags"]
