"""``breastfusion demo``: the whole pipeline on the built-in SYNTHETIC cohort, in a few minutes on 2 CPU cores."""

from __future__ import annotations

import logging
from pathlib import Path

from breastfusion.config import load_config

log = logging.getLogger(__name__)

DEMO_OVERRIDES = [
    "name=synthetic-demo",
    "image.size=96",
    "cv.n_splits=3",
    "train.stage2_epochs=3",
    "train.patience=3",
    "train.tabular_epochs=40",
    "experiment.n_boot=300",
]


def run_demo(out_dir: str | Path = "demo_run", *, n_cases: int = 120, n_new: int = 24, overrides: list[str] | None = None,
             progress: bool = True) -> dict:
    """Synthetic cohort → audit → cross-validated models → report → bundle → prediction of new synthetic cases
    (a second cohort drawn with another seed, so the bundle scores cases it never saw)."""
    from breastfusion.data.synthetic import column_info, column_types, make_synthetic_cohort
    from breastfusion.inference.predictor import Predictor, write_predictions
    from breastfusion.experiment import run_experiment

    out_dir = Path(out_dir)
    data_dir = out_dir / "synthetic_cohort"
    if not (data_dir / "cases.csv").exists():
        log.info("making a SYNTHETIC cohort of %d cases in %s", n_cases, data_dir)
        make_synthetic_cohort(data_dir, n_cases=n_cases, image_size=128, seed=0)
    new_dir = out_dir / "synthetic_new_cases"
    if not (new_dir / "cases.csv").exists():
        make_synthetic_cohort(new_dir, n_cases=n_new, image_size=128, seed=1)
    cfg = load_config(None, DEMO_OVERRIDES + [f"data.source={data_dir / 'cases.csv'}"] + list(overrides or []))
    # The generator knows each column's type and unit: declared, so nothing is guessed and the form shows units.
    cfg.data.column_types = {**column_types(), **cfg.data.column_types}
    cfg.data.column_info = {**column_info(), **cfg.data.column_info}
    result = run_experiment(cfg, out_dir / "run", resume=True, progress=progress)
    predictor = Predictor.load(result.bundle)
    preds = predictor.predict(new_dir / "cases.csv", progress=progress)
    pred_path, skipped = write_predictions(preds, predictor.last_skipped, out_dir / "predictions.csv")
    return {"report": result.report, "bundle": result.bundle, "predictions": pred_path, "skipped": skipped,
            "metrics": result.metrics}
