"""Resume that reproduces, and resume that refuses: on a tiny SYNTHETIC cohort (issue #9, items 3, 4, 9, 10).

A killed run resumed in the same folder must give the same out-of-fold predictions as an uninterrupted run
with the same seed, whether it died between folds or inside one; resuming with settings that change reused
results is refused; an unreadable image stops the run before any model trains; a zero-epoch network is not
saved as a model; temporary files left by a killed process are cleaned up.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from breastfusion.config import load_config
from breastfusion.data.synthetic import make_synthetic_cohort
from breastfusion.errors import ConfigError, DataError
from breastfusion.experiment import run_experiment
from breastfusion.tasks import ultrasound as ultrasound_task
from breastfusion.training import trainer as trainer_mod

TINY = ["image.size=32", "model.backbone=test_efficientnet", "model.pretrained=false", "cv.n_splits=3",
        "train.stage1_epochs=1", "train.stage2_epochs=2", "train.batch_size=8", "train.patience=5",
        "experiment.n_boot=0", "experiment.classical_models=[]", "experiment.deep_models=[image]",
        "experiment.final_models=[]", "experiment.explain_cases=0", "data.radiomics=false",
        "train.channels_last=false"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_cohort")
    make_synthetic_cohort(root, n_cases=24, image_size=48, seed=1)
    return root / "cases.csv"


def _cfg(cases_csv, *extra):
    return load_config(None, TINY + [f"data.source={cases_csv}", *extra])


@pytest.fixture(scope="module")
def run_a(cohort, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run_a")
    run_experiment(_cfg(cohort), run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(run_a):
    return pd.read_csv(run_a / "predictions" / "image_only.csv", dtype={"case_id": str})


def _same_predictions(a: pd.DataFrame, b: pd.DataFrame) -> None:
    a, b = a.sort_values("case_id").reset_index(drop=True), b.sort_values("case_id").reset_index(drop=True)
    assert a["case_id"].tolist() == b["case_id"].tolist()
    assert a["fold"].tolist() == b["fold"].tolist()
    probs = [c for c in a.columns if c.startswith("prob_")]
    np.testing.assert_allclose(a[probs].to_numpy(), b[probs].to_numpy(), rtol=0, atol=1e-6)


def test_resume_after_a_kill_between_folds_repeats_the_uninterrupted_run(cohort, uninterrupted, tmp_path,
                                                                          monkeypatch):
    real = ultrasound_task.write_csv

    def die_after_fold0(df, path):
        real(df, path)
        if path.name == "predictions.csv" and path.parent.name == "fold0":
            raise KeyboardInterrupt  # the process dies right after fold 0's predictions are on disk

    monkeypatch.setattr(ultrasound_task, "write_csv", die_after_fold0)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_cfg(cohort), tmp_path, progress=False)
    monkeypatch.setattr(ultrasound_task, "write_csv", real)
    assert not (tmp_path / "deep" / "image_only" / "fold1").exists()
    run_experiment(_cfg(cohort), tmp_path, resume=True, progress=False)
    _same_predictions(uninterrupted, pd.read_csv(tmp_path / "predictions" / "image_only.csv", dtype={"case_id": str}))


def test_resume_after_a_kill_inside_a_fold_repeats_the_uninterrupted_run(cohort, uninterrupted, tmp_path,
                                                                         monkeypatch):
    real = trainer_mod._save_checkpoint
    calls = {"n": 0}

    def die_in_fold1(path, state):
        real(path, state)
        if path.parent.name == "fold1":
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt  # killed after fold 1's second epoch checkpoint (last.pt)

    monkeypatch.setattr(trainer_mod, "_save_checkpoint", die_in_fold1)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_cfg(cohort), tmp_path, progress=False)
    monkeypatch.setattr(trainer_mod, "_save_checkpoint", real)
    assert (tmp_path / "deep" / "image_only" / "fold1" / "last.pt").exists()
    run_experiment(_cfg(cohort), tmp_path, resume=True, progress=False)
    _same_predictions(uninterrupted, pd.read_csv(tmp_path / "predictions" / "image_only.csv", dtype={"case_id": str}))


def test_fold_seeds_are_stable_and_distinct():
    from breastfusion.utils import stable_seed

    assert stable_seed(0, "image_only", 1) == stable_seed(0, "image_only", 1)  # no salted hash(): same every process
    seeds = {stable_seed(s, m, f) for s in (0, 1) for m in ("fusion", "image_only") for f in (0, 1, "final")}
    assert len(seeds) == 12 and all(0 <= s < 2**31 for s in seeds)


# ------------------------------------------------------------------------------ item 4: resume under other settings


@pytest.mark.parametrize(("override", "expected"), [("seed=1", "seed: 0 → 1"), ("cv.n_splits=2", "cv.n_splits: 3 → 2"),
                                                    ("image.size=40", "image.size: 32 → 40")])
def test_resume_with_changed_settings_is_refused_and_says_what_changed(cohort, run_a, override, expected):
    before = (run_a / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="Cannot resume") as err:
        run_experiment(_cfg(cohort, override), run_a, resume=True, progress=False)
    msg = str(err.value)
    assert expected in msg and "deep/image_only" in msg and "--out" in msg
    if override != "image.size=40":
        assert "splits.csv" in msg  # splits depend on the seed and the folds, not on the image size
    assert (run_a / "config.yaml").read_text() == before  # refused before anything was overwritten


def test_resume_with_a_changed_cases_table_is_refused(cohort, run_a, tmp_path):
    cases = pd.read_csv(cohort)
    cases["image_path"] = [str(cohort.parent / p) for p in cases["image_path"]]
    cases["mask_path"] = [";".join(str(cohort.parent / q) for q in str(p).split(";")) if isinstance(p, str) and p else p
                          for p in cases["mask_path"]]
    cases.loc[3, "age"] = 99
    cases.to_csv(tmp_path / "edited.csv", index=False)
    with pytest.raises(ConfigError, match="the cases table changed"):
        run_experiment(_cfg(tmp_path / "edited.csv"), run_a, resume=True, progress=False)


def test_resume_in_a_folder_without_fingerprints_checks_its_saved_config(cohort, run_a, tmp_path):
    import shutil

    old = tmp_path / "old_run"
    shutil.copytree(run_a, old)
    (old / "fingerprints.json").unlink()  # a run folder made before fingerprints existed
    with pytest.raises(ConfigError, match="cv.n_splits: 3 → 2"):
        run_experiment(_cfg(cohort, "cv.n_splits=2"), old, resume=True, progress=False)


def test_resume_with_report_only_changes_reuses_everything_and_removes_stale_temporaries(cohort, run_a, caplog):
    """n_boot and explain_cases only change what every run recomputes (metrics, report): resume is allowed, the
    deep predictions are reused; temporary files of a killed writer are deleted, other files kept."""
    preds = run_a / "predictions" / "image_only.csv"
    stamp = preds.stat().st_mtime_ns
    stale = [run_a / ".splits.csv.k3j_9x0a.tmp", run_a / "deep" / "image_only" / "fold1" / ".last.pt.ab12cd34.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    keep = run_a / "notes.tmp"
    keep.write_text("the user's own file")
    with caplog.at_level(logging.INFO, logger="breastfusion.utils"):
        run_experiment(_cfg(cohort, "experiment.n_boot=20", "train.threads=1"), run_a, resume=True, progress=False)
    assert preds.stat().st_mtime_ns == stamp
    assert not any(p.exists() for p in stale) and keep.exists()
    assert "removed 2 temporary file(s)" in caplog.text


# ------------------------------------------------------------------------ item 9: unreadable image before training


def test_a_truncated_image_stops_the_run_before_any_model_trains(cohort, tmp_path):
    cases = pd.read_csv(cohort)
    cases["image_path"] = [str(cohort.parent / p) for p in cases["image_path"]]
    cases["mask_path"] = [";".join(str(cohort.parent / q) for q in str(p).split(";")) if isinstance(p, str) and p else p
                          for p in cases["mask_path"]]
    good = cohort.parent / cases.at[5, "image_path"]
    bad = tmp_path / "truncated.png"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases.loc[5, "image_path"] = str(bad)
    cases.to_csv(tmp_path / "cases.csv", index=False)
    run = tmp_path / "run"
    with pytest.raises(DataError, match="cannot be read") as err:
        run_experiment(_cfg(tmp_path / "cases.csv", "experiment.classical_models=[logreg]"), run, progress=False)
    msg = str(err.value)
    assert f"row 7, case '{cases.at[5, 'case_id']}'" in msg and "truncated.png" in msg
    assert not (run / "predictions").exists() and not (run / "classical").exists() and not (run / "deep").exists()
    assert (run / "audit" / "audit.md").exists() and not (run / "audit" / "groups.csv").exists()


# ------------------------------------------------------------------------------------ item 10: zero-epoch networks


def test_zero_epoch_training_is_refused_before_the_run_starts(cohort, tmp_path):
    with pytest.raises(ConfigError, match="stage1_epochs and train.stage2_epochs are both 0"):
        run_experiment(_cfg(cohort, "train.stage1_epochs=0", "train.stage2_epochs=0",
                            "experiment.final_models=[image]"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------- histology grading


GRADING = ["task=histology", "image.size=32", "train.batch_size=8", "train.stage1_epochs=2", "train.stage2_epochs=1",
           "experiment.classical_models=[]", "experiment.n_boot=0", "experiment.explain_cases=0",
           "experiment.final_models=[]", "histology.token_grid=2", "histology.attention_dim=32",
           "histology.attention_heads=2", 'data.labels=["1","2","3"]', "cv.n_splits=3", "histology.variants=[cnn]",
           "histology.deep_features_for_classical=false", "histology.backbones={cnn: test_efficientnet}",
           "histology.pretrained=none"]


@pytest.fixture(scope="module")
def grading_cohort(tmp_path_factory):
    from breastfusion.data.synthetic_histology import make_synthetic_grading

    out = tmp_path_factory.mktemp("grading_cohort")
    make_synthetic_grading(out, n_patients=9, stacks_per_case=2, size=32, n_centers=3, seed=1)
    return out


def _grading_cfg(cohort, *extra):
    return load_config(None, GRADING + [f"data.source={cohort / 'cases.csv'}", f"histology.tiles={cohort / 'tiles.csv'}",
                                        *extra])


def test_grading_resume_between_folds_repeats_the_uninterrupted_run_and_refuses_other_settings(grading_cohort, tmp_path,
                                                                                              monkeypatch):
    from breastfusion.tasks import histology as grading

    monkeypatch.setenv("BREASTFUSION_OFFLINE", "1")
    run_experiment(_grading_cfg(grading_cohort), tmp_path / "a", progress=False)
    real = grading.write_csv

    def die_after_fold0(df, path):
        real(df, path)
        if path.name == "stacks.csv" and path.parent.name == "fold0":
            raise KeyboardInterrupt

    monkeypatch.setattr(grading, "write_csv", die_after_fold0)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_grading_cfg(grading_cohort), tmp_path / "b", progress=False)
    monkeypatch.setattr(grading, "write_csv", real)
    with pytest.raises(ConfigError, match="train.stage2_epochs: 1 → 2"):
        run_experiment(_grading_cfg(grading_cohort, "train.stage2_epochs=2"), tmp_path / "b", resume=True,
                            progress=False)
    run_experiment(_grading_cfg(grading_cohort), tmp_path / "b", resume=True, progress=False)
    a, b = (pd.read_csv(tmp_path / r / "predictions" / "deep_cnn.csv", dtype={"case_id": str}) for r in ("a", "b"))
    _same_predictions(a, b)
