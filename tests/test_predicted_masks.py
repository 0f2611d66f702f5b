"""Where the lesion outline comes from at prediction (issue #11, item 3): a case without a mask is never read as
"no lesion". A bundle trained with expert masks scores such a case with its radiomics UNKNOWN (mask_source =
none, warned); a bundle trained with ``data.masks: predicted`` carries its segmenter and runs it (mask_source =
predicted); a given mask (or '' = "no lesion") is used as given (mask_source = expert).

Tiny SYNTHETIC bundles with random weights: the tests check the plumbing, not accuracy."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import save_tiny_fusion_bundle

CLASSES = ["benign", "malignant"]


def _disk_image(path: Path, size=64, r=12, seed=0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disk = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r ** 2
    img = (rng.gamma(4.0, 20.0, (size, size)) * np.where(disk, 0.4, 1.0)).clip(0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)
    mask = path.with_name(path.stem + "_mask.png")
    Image.fromarray((disk * 255).astype(np.uint8)).save(mask)
    return path, mask


def _radiomics_bundle(path: Path, *, segmenter: Path | None = None) -> Path:
    from breastfusion.features.radiomics import RADIOMICS_VERSION, extract_case, radiomics_columns

    rows = []
    for i in range(6):
        img, mask = _disk_image(path.parent / f"train{i}.png", r=8 + 2 * i, seed=i)
        rows.append(extract_case(img, str(mask)))
    features = {"clinical_columns": [], "masks": "expert" if segmenter is None else "predicted",
                "radiomics": {"version": RADIOMICS_VERSION, "columns": radiomics_columns(), "units": "px"}}
    return save_tiny_fusion_bundle(path, pd.DataFrame(rows), features, CLASSES, segmenter=segmenter)


@pytest.fixture(scope="module")
def expert_bundle(tmp_path_factory) -> Path:
    return _radiomics_bundle(tmp_path_factory.mktemp("expert") / "bundle")


@pytest.fixture
def cases(tmp_path) -> pd.DataFrame:
    a, ma = _disk_image(tmp_path / "a.png", r=10, seed=10)
    b, _ = _disk_image(tmp_path / "b.png", r=14, seed=11)
    c, _ = _disk_image(tmp_path / "c.png", r=6, seed=12)
    return pd.DataFrame({"case_id": ["given", "nomask", "nolesion"], "image_path": [str(a), str(b), str(c)],
                         "mask_path": [str(ma), np.nan, ""]})


def test_expert_bundle_scores_a_case_without_mask_as_unknown_not_as_no_lesion(expert_bundle, cases, caplog):
    from breastfusion.inference.predictor import Predictor

    p = Predictor.load(expert_bundle)
    table = p._tabular_table(cases, {}, p.bundle.tabular.columns_)
    assert table.loc["given", "rad_lesion_present"] == 1.0
    assert table.loc["nolesion", "rad_lesion_present"] == 0.0  # '' is the user's explicit "no lesion"
    assert table.loc["nomask"].isna().all()  # unknown: not lesion_present = 0, not mask_available = 0
    with caplog.at_level(logging.WARNING):
        out = p.predict_cases(cases)
    assert dict(zip(out["case_id"], out["mask_source"])) == {"given": "expert", "nomask": "none",
                                                              "nolesion": "expert"}
    assert "UNKNOWN, not as 'no lesion'" in caplog.text and "nomask" in caplog.text


# ------------------------------------------------------------------------------------ end to end (data.masks)

FAST = ["image.size=48", "model.backbone=test_efficientnet", "model.pretrained=false", "cv.n_splits=2",
        "train.stage1_epochs=1", "train.stage2_epochs=1", "train.tabular_epochs=3", "train.batch_size=8",
        "experiment.n_boot=20", "experiment.classical_models=[logreg]", "experiment.deep_models=[]",
        "experiment.explain_cases=0", "train.channels_last=false",
        "segmentation.size=64", "segmentation.steps=4", "segmentation.pretrained=false", "segmentation.batch_size=4",
        "segmentation.val_fraction=0"]


@pytest.fixture(scope="module")
def predicted_run(tmp_path_factory):
    from breastfusion.config import load_config
    from breastfusion.data.synthetic import make_synthetic_cohort
    from breastfusion.experiment import run_experiment

    root = tmp_path_factory.mktemp("masks_predicted")
    make_synthetic_cohort(root / "cohort", n_cases=24, image_size=64, seed=3)  # SYNTHETIC phantoms
    cfg = load_config(None, FAST + [f"data.source={root / 'cohort' / 'cases.csv'}", "data.masks=predicted"])
    return root, run_experiment(cfg, root / "run", progress=False)


def test_training_reads_out_of_fold_masks_and_the_bundle_carries_its_segmenter(predicted_run):
    import json

    from breastfusion.bundles.bundle import load_bundle

    root, result = predicted_run
    rd = result.run_dir
    oof = pd.read_csv(rd / "segmentation" / "cv" / "oof_cases.csv")
    splits = pd.read_csv(rd / "splits.csv")
    # one segmenter per fold; each case's mask comes from the fold that held it out
    for k in sorted(splits["fold"].unique()):
        assert (rd / "segmentation" / "cv" / f"fold_{k}" / "segmenter.safetensors").exists()
    assert oof["mask_path"].notna().all() and (oof["mask_path"] != oof["expert_mask_path"]).all()
    meta = load_bundle(result.bundle).meta
    seg = meta["features"]["segmenter"]
    assert meta["features"]["masks"] == "predicted" and (result.bundle / seg["file"]).is_file()
    assert seg["file"] in meta["integrity"]["files"]  # sealed like the weights
    html = (rd / "report" / "report.html").read_text()
    assert "PREDICTED lesion masks" in html
    metrics = json.loads((rd / "metrics.json").read_text())
    assert "logreg" in metrics["models"]


def test_bundle_segments_a_case_that_comes_without_a_mask(predicted_run):
    from breastfusion.inference.predictor import Predictor

    root, result = predicted_run
    cases = pd.read_csv(root / "cohort" / "cases.csv").head(4)
    out = Predictor.load(result.bundle).predict_cases(cases.assign(mask_path=np.nan))
    assert (out["mask_source"] == "predicted").all()
    given = Predictor.load(result.bundle).predict_cases(cases)
    assert (given["mask_source"] == "expert").all()
    # the classical model reads the same segmented radiomics
    lr = Predictor.load(result.bundle, model="logreg").predict_cases(cases.assign(mask_path=np.nan))
    assert (lr["mask_source"] == "predicted").all() and lr.filter(like="prob_").notna().all().all()


def test_validate_says_whether_the_figure_needed_the_expert_outline(predicted_run, tmp_path):
    from breastfusion.evaluation.external import validate_bundle

    root, result = predicted_run
    cohort = root / "cohort" / "cases.csv"
    with_masks = validate_bundle(result.bundle, cohort, tmp_path / "use", n_boot=10, masks="use")
    alone = validate_bundle(result.bundle, cohort, tmp_path / "ignore", n_boot=10, masks="ignore")
    assert "WITH the cohort's expert lesion masks" in with_masks.summary["statement"]
    assert "from the images alone" in alone.summary["statement"]
    assert alone.summary["masks"]["sources"] == {"predicted": alone.n_scored}


def test_report_shows_segmentation_quality_and_overlays(predicted_run):
    root, result = predicted_run
    html = (result.run_dir / "report" / "report.html").read_text()
    assert "Lesion segmentation (out-of-fold, against the expert)" in html
    assert "expert (green) vs predicted (red)" in html


def test_a_run_without_bundles_trains_no_final_segmenter(tmp_path):
    from breastfusion.config import load_config
    from breastfusion.data.synthetic import make_synthetic_cohort
    from breastfusion.experiment import run_experiment

    make_synthetic_cohort(tmp_path / "cohort", n_cases=16, image_size=48, seed=5)  # SYNTHETIC phantoms
    cfg = load_config(None, FAST + [f"data.source={tmp_path / 'cohort' / 'cases.csv'}", "data.masks=predicted",
                                    "experiment.final_models=[]"])
    result = run_experiment(cfg, tmp_path / "run", progress=False)
    assert (result.run_dir / "segmentation" / "cv" / "oof_cases.csv").exists()
    assert not (result.run_dir / "segmentation" / "segmenter.safetensors").exists()
    assert result.bundle is None
