"""Run an experiment: ``run_experiment(cfg, run_dir)`` runs the task ``cfg.task`` names.

Each stage writes files into the run folder; a stage whose output exists is reused on ``resume``, so a killed
run picks up where it stopped (deep models also resume inside a fold from their last epoch). Each fold's network
is seeded from (seed, model, fold), so a resumed run repeats an uninterrupted one; ``fingerprints.json`` records
the settings every stage was made under, and resuming with other settings is refused (:mod:`breastfusion.run_state`).
"""

from __future__ import annotations

from pathlib import Path

from breastfusion import tasks
from breastfusion.config import Config
from breastfusion.tasks.base import RunResult


def run_experiment(cfg: Config, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
                   **inputs) -> RunResult:
    """Run the experiment ``cfg`` describes into ``run_dir``. ``inputs``: tables given instead of reading
    ``data.source`` (``cases=``; histology also ``tiles=``)."""
    return tasks.get(cfg.task).run(cfg, run_dir, resume=resume, progress=progress, **inputs)
