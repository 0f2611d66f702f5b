"""`breastfusion validate` (issue #10, item 4): external validation of a bundle on another site's labelled cohort.

Everything here is SYNTHETIC: a tiny fusion bundle (test_efficientnet at 48 px, one epoch per stage) trained on a
generated cohort, validated on another generated cohort with larger images. The tests check the mechanics (label
mapping, calibration slope, subgroups, the shift record, site adaptation, the CLI), not accuracy."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from breastfusion.errors import ConfigError, DataError

CLASSES = ["benign", "malignant", "normal"]
CLINICAL = ["age", "breast_density", "palpable_lump"]
FAST = ["image.size=48", "model.backbone=test_efficientnet", "model.pretrained=false", "train.stage1_epochs=1",
        "train.stage2_epochs=1", "train.batch_size=8", "train.channels_last=false"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Scoring would use every core; the test machine is shared."""
    import torch

    monkeypatch.setattr("breastfusion.devices.configure_threads", lambda threads: torch.set_num_threads(1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A SYNTHETIC fusion bundle from fit_final_bundle (so it carries the training-data record), calibrated on
    SYNTHETIC out-of-fold-like predictions; its training cohort; and a second-site cohort with 80 px images."""
    import torch

    from breastfusion.config import load_config
    from breastfusion.data.synthetic import make_synthetic_cohort
    from breastfusion.evaluation.calibration import fit_bundle_calibration
    from breastfusion.training.fit import fit_final_bundle

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("validate")
    cases = make_synthetic_cohort(root / "train", n_cases=36, image_size=64, seed=1)
    cfg = load_config(None, FAST)
    table = cases.set_index("case_id")[CLINICAL]
    rng = np.random.default_rng(0)
    y = cases["label"].to_numpy()
    logits = rng.normal(size=(len(y), 3)) + 2.0 * (y[:, None] == np.array(CLASSES)[None, :])
    P = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    oof = pd.DataFrame({"case_id": cases["case_id"], "label": y, **{f"prob_{c}": P[:, k] for k, c in enumerate(CLASSES)}})
    cal = fit_bundle_calibration(oof, CLASSES, alpha=0.2)
    bundle = fit_final_bundle("fusion", cases, table, CLASSES, cfg, root / "run", resume=False, progress=False,
                              cache=None, synthetic=True, metrics=None, radiomics_used=False, clinical_cols=CLINICAL,
                              calibration=cal)
    site = make_synthetic_cohort(root / "site2", n_cases=40, image_size=80, seed=7)
    return {"bundle": bundle, "train": root / "train" / "cases.csv", "site": root / "site2" / "cases.csv",
            "site_cases": site}


# -- maths -----------------------------------------------------------------------------------------------------

def test_restrict_renormalises_to_the_cohort_classes():
    from breastfusion.evaluation.external import restrict_probabilities

    P = np.array([[0.2, 0.6, 0.2], [0.1, 0.1, 0.8], [0.5, 0.0, 0.5]])
    Q = restrict_probabilities(P, CLASSES, ["benign", "malignant"])
    np.testing.assert_allclose(Q[:, 1], [0.6 / 0.8, 0.1 / 0.2, 0.0])  # P(m | lesion) = P(m) / (P(b) + P(m))
    np.testing.assert_allclose(Q.sum(1), 1.0)


def test_map_labels_renames_and_refuses_classes_the_bundle_lacks():
    from breastfusion.evaluation.external import map_labels, parse_mapping

    labels = pd.Series(["Benign", "cancer", "cancer"])
    with pytest.raises(DataError, match=r"'cancer'.*--map"):
        map_labels(labels, CLASSES)
    out, present = map_labels(labels, CLASSES, parse_mapping("cancer=malignant"))
    assert out.tolist() == ["benign", "malignant", "malignant"] and present == ["benign", "malignant"]
    with pytest.raises(ConfigError, match="not a class of the bundle"):
        map_labels(labels, CLASSES, {"cancer": "tumour"})
    with pytest.raises(ConfigError, match="cohort_label=bundle_label"):
        parse_mapping("cancer")


def test_slope_and_intercept_are_one_and_zero_on_calibrated_probabilities():
    from breastfusion.evaluation.external import logistic_recalibration

    rng = np.random.default_rng(3)
    p = rng.uniform(0.03, 0.97, 4000)
    y = (rng.uniform(size=p.size) < p).astype(float)  # outcomes drawn from p: calibrated by construction
    slope, intercept = logistic_recalibration(p, y)
    assert abs(slope[0] - 1) < 0.12 and abs(intercept[0]) < 0.1
    sharp = 1 / (1 + np.exp(-2 * np.log(p / (1 - p))))  # over-confident: logits doubled
    s2, _ = logistic_recalibration(sharp, y)
    assert abs(s2[0] - 0.5) < 0.08
    high = 1 / (1 + np.exp(-(np.log(p / (1 - p)) + 1.0)))  # too high on average by 1 logit
    _, i3 = logistic_recalibration(high, y)
    assert abs(i3[0] + 1.0) < 0.12
    s4, i4 = logistic_recalibration(p, np.ones_like(p))  # one class only: no finite optimum
    assert np.isnan(s4[0]) and np.isnan(i4[0])


def test_subgroup_table_cuts_numeric_columns_into_tertiles():
    from breastfusion.evaluation.external import subgroup_table

    rng = np.random.default_rng(0)
    n = 90
    y = np.array(["benign", "malignant"] * (n // 2))
    p = np.clip(0.5 + 0.3 * (y == "malignant") - 0.15 + rng.normal(0, 0.2, n), 0.01, 0.99)
    preds = pd.DataFrame({"case_id": [f"c{i}" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)],
                          "label": y, "prob_benign": 1 - p, "prob_malignant": p})
    cases = pd.DataFrame({"case_id": preds["case_id"], "center": np.where(np.arange(n) < 30, "A", "B"),
                          "age": rng.uniform(30, 80, n).round(1)})
    cases.loc[0, "age"] = np.nan
    table, how = subgroup_table(preds, cases, ["center", "age"], ["benign", "malignant"], positive="malignant",
                                n_boot=20, seed=0)
    assert set(table.loc[table.column == "center", "group"]) == {"A", "B"}
    ages = table[table.column == "age"]
    assert len(ages) == 4 and "(missing)" in set(ages.group)  # three bands + the missing cell
    assert ages.n.sum() == n and "tertiles" in how["age"] and "categorical" in how["center"]
    assert {"auc", "sensitivity", "specificity", "n_malignant"} <= set(table.columns)
    with pytest.raises(DataError, match="'device'"):
        subgroup_table(preds, cases, ["device"], ["benign", "malignant"], positive="malignant", n_boot=0, seed=0)


def test_embedding_distance_percentiles():
    from breastfusion.data.fingerprint import (
        distance_percentile,
        embedding_distance,
        fit_embedding_reference,
    )

    rng = np.random.default_rng(0)
    E = rng.normal(size=(400, 32)) * np.linspace(3, 0.5, 32)
    ref = fit_embedding_reference(E)
    new = rng.normal(size=(400, 32)) * np.linspace(3, 0.5, 32)  # same distribution: about uniform percentiles
    pct = distance_percentile(ref, embedding_distance(ref, new))
    # in-sample reference percentiles are a little optimistic (see distance_note): loose bounds
    assert 35 < np.median(pct) < 70 and (pct > 95).mean() < 0.2
    far = distance_percentile(ref, embedding_distance(ref, new + 10.0))
    assert (far == 100).all()


# -- the training-data record (training/fit.py) ----------------------------------------------------------------

def test_final_bundle_records_training_fingerprint(trained):
    meta = json.loads((trained["bundle"] / "bundle.json").read_text())
    rec = meta["training"]["data_fingerprint"]
    assert rec["n_cases"] == 36
    assert rec["images"]["width"]["quantiles"]["0.5"] == 64
    assert 0 < rec["images"]["intensity_mean"]["quantiles"]["0.5"] < 1
    assert rec["tabular"]["age"]["kind"] == "numeric" and rec["tabular"]["breast_density"]["kind"] == "categorical"
    emb = rec["embedding"]
    assert emb["dim"] == len(emb["mean"]) > 0 and len(emb["components"]) >= 1 and len(emb["distance_percentiles"]) == 101
    assert len(rec["image_hashes"]) == 36


# -- validate ------------------------------------------------------------------------------------------------

def test_validate_scores_maps_labels_and_compares_with_the_training_record(trained, tmp_path):
    from breastfusion.evaluation.external import validate_bundle

    res = validate_bundle(trained["bundle"], trained["site"], tmp_path / "v", drop_labels=["normal"], n_boot=50,
                          subgroups=["center"])
    s = res.summary
    n_lesions = int((trained["site_cases"]["label"] != "normal").sum())
    assert res.n_scored == n_lesions and s["set_aside"]["normal"] == 40 - n_lesions
    assert s["cohort_classes"] == ["benign", "malignant"] and s["restricted"] and s["positive"] == "malignant"
    preds = pd.read_csv(res.predictions)
    np.testing.assert_allclose(preds["cohort_prob_benign"] + preds["cohort_prob_malignant"], 1.0, atol=1e-9)
    np.testing.assert_allclose(preds["cohort_prob_malignant"],
                               preds["prob_malignant"] / (preds["prob_benign"] + preds["prob_malignant"]), atol=1e-9)
    assert preds["ood_percentile"].between(0, 100).all() and "prediction_set" in preds
    assert s["conformal"]["target_coverage"] == pytest.approx(0.8) and "benign" in s["conformal"]["per_class"]
    assert "slope" in s["calibration"]["per_class"]["malignant"]
    assert any("width" in f and "outside the training" in f for f in res.findings)  # 80 px vs 64 px in training
    html = res.report.read_text()
    assert "none of these images is among the" in html and "Input shift" in html
    assert "data:image/png;base64" in html
    for f in ("roc.png", "confusion_matrix.png", "reliability.png", "ood_distance.png"):
        assert (tmp_path / "v" / "figures" / f).is_file()
    js = json.loads(res.metrics_json.read_text())
    assert js["metrics"]["ci_method"]["unit"] == "patient_id" and js["subgroups"]


def test_validate_without_a_training_record_says_so_and_still_describes_the_cohort(trained, tmp_path):
    from breastfusion.evaluation.external import validate_bundle
    from breastfusion.bundles.bundle import read_bundle_meta, write_bundle_meta

    old = tmp_path / "old_bundle"
    shutil.copytree(trained["bundle"], old)
    meta = read_bundle_meta(old)
    del meta["training"]["data_fingerprint"]  # a bundle from before the record existed
    write_bundle_meta(old, meta)
    res = validate_bundle(old, trained["site"], tmp_path / "v", drop_labels=["normal"], n_boot=0)
    html = res.report.read_text()
    assert "unavailable for this bundle" in html and "Retrain" in html
    assert "cohort median" in html and "not recorded" in html  # the cohort's own image statistics are shown
    assert "ood_percentile" not in pd.read_csv(res.predictions).columns


def test_validate_flags_training_images_in_the_cohort(trained, tmp_path):
    from breastfusion.evaluation.external import validate_bundle

    res = validate_bundle(trained["bundle"], trained["train"], tmp_path / "v", n_boot=0)
    assert res.summary["shift"]["training_image_overlap"] == 36
    assert "byte-identical to training images" in res.findings[0]
    # the headline must not call this an external validation (it did before: "the bundle never saw these cases")
    assert res.summary["statement"].startswith("NOT an external validation")
    assert "NOT an external validation" in res.report.read_text()


def test_adapt_writes_a_sealed_bundle_fitted_on_the_adaptation_part_only(trained, tmp_path):
    from breastfusion.evaluation.external import validate_bundle
    from breastfusion.bundles.bundle import load_bundle

    res = validate_bundle(trained["bundle"], trained["site"], tmp_path / "a", drop_labels=["normal"],
                          adapt_fraction=0.5, n_boot=0, seed=3)
    adapted = load_bundle(res.adapted_bundle)  # verifies the seal
    ad = adapted.meta["adaptation"]
    assert ad["n_fit_cases"] + ad["held_out"]["n"] == res.n_scored
    assert "site adaptation" in adapted.meta["calibration"]["fitted_on"]
    card = (res.adapted_bundle / "MODEL_CARD.md").read_text()
    assert "site-adapted copy" in card and "Held-out part" in card
    # Flip every held-out label: the re-fitted calibration must not move (held-out cases are never used to fit).
    preds = pd.read_csv(res.predictions)
    held = set(preds.loc[preds.adaptation_part == "held_out", "case_id"])
    site = pd.read_csv(trained["site"])
    flip = {"benign": "malignant", "malignant": "benign", "normal": "normal"}
    site.loc[site.case_id.isin(held), "label"] = site.loc[site.case_id.isin(held), "label"].map(flip)
    site.to_csv(trained["site"].with_name("flipped.csv"), index=False)
    res2 = validate_bundle(trained["bundle"], trained["site"].with_name("flipped.csv"), tmp_path / "b",
                           drop_labels=["normal"], adapt_fraction=0.5, n_boot=0, seed=3)
    again = load_bundle(res2.adapted_bundle).meta["calibration"]
    assert again["temperature"] == adapted.meta["calibration"]["temperature"]
    assert again["conformal"]["qhat"] == adapted.meta["calibration"]["conformal"]["qhat"]
    assert res2.summary["adaptation"]["held_out"] != ad["held_out"]  # ... while the held-out figures do


# -- CLI ---------------------------------------------------------------------------------------------------------

def test_cli_validate_end_to_end_and_exit_codes(trained, tmp_path, capsys):
    from PIL import Image

    from breastfusion.cli import main

    rc = main(["validate", str(trained["bundle"]), str(trained["site"]), "--out", str(tmp_path / "v"),
               "--drop-labels", "normal", "--subgroups", "center,age", "--n-boot", "30", "--quiet"])
    out = capsys.readouterr()
    assert rc == 0 and "none of these images is among the bundle's training images" in out.out
    assert "AUC (malignant)" in out.out
    assert "SYNTHETIC" in out.err and (tmp_path / "v" / "report.html").is_file()

    rc = main(["validate", str(trained["bundle"]), str(trained["site"]), "--out", str(tmp_path / "w"), "--quiet"])
    assert rc == 0  # three classes, no restriction

    site = pd.read_csv(trained["site"])
    site["label"] = site["label"].replace({"malignant": "cancer"})
    renamed = trained["site"].with_name("renamed.csv")  # beside the original: image paths are relative
    site.to_csv(renamed, index=False)
    rc = main(["validate", str(trained["bundle"]), str(renamed), "--out", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "'cancer'" in err and "--map" in err
    rc = main(["validate", str(trained["bundle"]), str(renamed), "--out", str(tmp_path / "x"), "--quiet",
               "--map", "cancer=malignant", "--n-boot", "0"])
    assert rc == 0

    blank = site.head(4).copy()  # constant images: every case skipped
    for i, cid in enumerate(blank.case_id):
        p = tmp_path / f"{cid}.png"
        Image.fromarray(np.full((64, 64), 128, dtype=np.uint8)).save(p)
        blank.loc[blank.index[i], "image_path"] = str(p)
    blank["label"] = ["benign", "malignant", "benign", "malignant"]
    blank.to_csv(trained["site"].with_name("blank.csv"), index=False)
    rc = main(["validate", str(trained["bundle"]), str(trained["site"].with_name("blank.csv")), "--out", str(tmp_path / "y"),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "Nothing scored" in err and (tmp_path / "y" / "skipped.csv").is_file()

    rc = main(["validate", str(trained["bundle"]), str(trained["site"]), "--out", str(tmp_path / "z"), "--quiet",
               "--adapt-fraction", "1.5"])
    assert rc == 2 and "between 0 and 1" in capsys.readouterr().err
