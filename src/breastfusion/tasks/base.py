"""What every task shares: the :class:`Task` seam, the run's result, and the stages both runners use.

A *task* is one kind of classification problem the toolkit solves end to end: what one case holds (an ultrasound
image with its mask and clinical columns; stacks of H&E tiles with pathomics), which features and network variants
it offers, how its datasets are built and its stack or image scores pooled to a case, what its bundles record and
which report sections it adds. ``breastfusion.tasks.get(cfg.task)`` returns the task a configuration names;
:func:`breastfusion.experiment.run_experiment` runs it. A new task is one module in this package that defines an
object with the :class:`Task` surface, listed in ``breastfusion/tasks/__init__.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from breastfusion.config import Config
from breastfusion.data.cases import CASE_ID, LABEL
from breastfusion.errors import DataError
from breastfusion.utils import atomic_path

if TYPE_CHECKING:
    from breastfusion.run_state import Stage

log = logging.getLogger(__name__)


@runtime_checkable
class Task(Protocol):
    """The seam between the runner and one kind of problem."""

    name: str
    """The configuration's ``task:`` value."""
    description: str
    """One line: what is classified, from what."""
    inputs: tuple[str, ...]
    """What one case can hold (the inputs a predictor reads)."""
    network_kinds: tuple[str, ...]
    """The bundle networks (:mod:`breastfusion.models.registry`) this task trains and scores."""
    serves: bool
    """Whether ``breastfusion serve`` can score its bundles one request at a time."""

    def variants(self, cfg: Config) -> list[str]:
        """The deep model variants ``cfg`` cross-validates."""
        ...

    def stages(self, cfg: Config, run_dir: Path) -> list[Stage]:
        """The stages whose outputs ``resume`` reuses, with the settings each depends on."""
        ...

    def run(self, cfg: Config, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
            **inputs) -> RunResult:
        """Audit → split → features → classical → deep CV → evaluate → bundle → explain → report."""
        ...


@dataclass
class RunResult:
    """What a finished experiment leaves: its folder, metrics per model, the report and the first bundle."""

    run_dir: Path
    metrics: dict
    report: Path | None
    bundle: Path | None


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    """Write a table atomically (no half-written file after a kill)."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def resolve_classes(cases: pd.DataFrame, cfg: Config) -> list[str]:
    found = sorted(cases[LABEL].dropna().unique().tolist())
    if cfg.data.labels is None:
        if len(found) < 2:
            raise DataError(f"The cases table holds only class(es) {found}; at least two are needed.")
        return found
    unknown = sorted(set(found) - set(cfg.data.labels))
    if unknown:
        row = int(np.flatnonzero(cases[LABEL].isin(unknown).to_numpy())[0])
        raise DataError(f"cases table, row {row + 2} (case '{cases.at[row, CASE_ID]}'): unknown label "
                        f"'{cases.at[row, LABEL]}'; config data.labels allows {cfg.data.labels}.")
    return list(cfg.data.labels)


def drop_label_cases(cases: pd.DataFrame, drop: list[str]) -> tuple[pd.DataFrame, dict[str, int]]:
    """Set aside the cases whose label is in ``data.drop_labels`` (before the audit, splits and every model);
    return the rest and the count per dropped label (logged, and shown in the report's dataset summary)."""
    if not drop or LABEL not in cases.columns:
        return cases, {}
    lab = cases[LABEL].astype(str).str.strip()
    gone = lab.isin([str(d).strip() for d in drop])
    counts = {str(k): int(v) for k, v in lab[gone].value_counts().sort_index().items()}
    absent = [d for d in drop if d not in counts]
    if absent:
        log.warning("data.drop_labels names label(s) no case has: %s", absent)
    if gone.all():
        raise DataError(f"data.drop_labels {list(drop)} sets aside every case ({len(cases)}); nothing is left.")
    if gone.any():
        log.info("data.drop_labels: set aside %d case(s) before anything else: %s", int(gone.sum()),
                 ", ".join(f"{k} {v}" for k, v in counts.items()))
    return cases[~gone].reset_index(drop=True), counts


def stage_splits(cases: pd.DataFrame, groups: pd.Series | None, cfg: Config, run_dir: Path, resume: bool) -> pd.DataFrame:
    from breastfusion.data.splits import make_splits

    path = run_dir / "splits.csv"
    if resume and path.exists():
        return pd.read_csv(path, dtype={CASE_ID: str})
    splits = make_splits(cases, n_splits=cfg.cv.n_splits, seed=cfg.seed,
                         groups=groups if cfg.cv.group_duplicates else None, strategy=cfg.cv.strategy)
    write_csv(splits, path)
    return splits


def bundle_sections(results: dict, bundles: dict[str, Path], classes: list[str], cfg: Config, run_dir: Path, *,
                    source: pd.DataFrame, cases: pd.DataFrame | None = None, background: pd.DataFrame | None = None,
                    max_stacks: int = 1) -> list:
    """The report's sections about the deployable bundle(s): cross-fold calibration and deferral of the bundled
    recipes, then explanations of ``cfg.experiment.explain_cases`` chosen cases with the first bundle. A section
    that fails is replaced by a short note; the run goes on."""
    from breastfusion.evaluation.insight import (
        calibration_section,
        explanation_section,
        failed_section,
        select_explain_cases,
    )

    sections = []
    bundled = {name: results[name]["predictions"] for name in bundles if name in results}
    if bundled:
        try:
            sections.append(calibration_section(bundled, classes, run_dir / "calibration",
                                                method=cfg.experiment.conformal_method,
                                                alpha=cfg.experiment.conformal_alpha, seed=cfg.seed,
                                                class_conditional=cfg.experiment.conformal_class_conditional))
        except Exception as exc:  # noqa: BLE001 - a report section never loses the run
            sections.append(failed_section("calibration", "Calibration and deferral", exc))
    name, path = next(iter(bundles.items()), (None, None))
    if cfg.experiment.explain_cases and path is not None and name in results:
        try:
            sel = select_explain_cases(results[name]["predictions"], classes, cfg.experiment.explain_cases)
            sec = explanation_section(path, source, sel, run_dir / "explanations", cases=cases,
                                      background=background, max_stacks=max_stacks, seed=cfg.seed)
            sec.title = f"Explanations (final bundle: {name})"
            sections.append(sec)
        except Exception as exc:  # noqa: BLE001
            sections.append(failed_section("explanations", "Explanations (final bundle)", exc))
    return sections
