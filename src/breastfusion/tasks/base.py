"""What every task shares: the :class:`Task` seam, the run's result, and the stages both runners use.

A *task* is one kind of classification problem the toolkit solves end to end: what one case holds (an ultrasound
image with its mask and clinical columns; stacks of H&E tiles with pathomics), which features and network variants
it offers, how its datasets are built and its stack or image scores pooled to a case, what its bundles record and
which report sections it adds. ``breastfusion.tasks.get(cfg.task)`` returns the task a configuration names;
:func:`breastfusion.experiment.run_experiment` runs it. A new task is one module in this package that defines an
object with the :class:`Task` surface, listed in ``breastfusion/tasks/__init__.py``; the runner calls its hooks
in the order they are declared on :class:`Task`, with one :class:`Run` that holds the experiment as it goes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
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


@dataclass
class Run:
    """One experiment as it goes: what the runner (:func:`breastfusion.experiment.run_experiment`) and the task's
    hooks read and fill in, in the order of the stages."""

    cfg: Config
    dir: Path
    resume: bool = False
    progress: bool = True
    cases: pd.DataFrame | None = None
    """The cases table (after ``data.drop_labels``; the task may add columns, e.g. ``dup_group``)."""
    dropped: dict[str, int] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    splits: pd.DataFrame | None = None
    table: pd.DataFrame | None = None
    """The tabular inputs (clinical columns + radiomics or pathomics), one row per case; ``None`` when empty."""
    predictions: dict[str, pd.DataFrame] = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)
    bundles: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    synthetic: bool = False
    extra_metrics: dict = field(default_factory=dict)
    """Further entries of ``metrics.json`` (e.g. the per-centre table of a histology run)."""
    state: dict = field(default_factory=dict)
    """The task's own intermediate results (audit summary, segmenter, stacks, tile cache, ...)."""

    @property
    def main(self) -> bool:
        """Whether this process writes the shared files (always, unless several ranks run under torchrun)."""
        from breastfusion import distributed

        return distributed.is_main()


@dataclass(frozen=True)
class BundlePlan:
    """One deployable bundle a task will fit: ``variant`` (its recipe), ``name`` (the out-of-fold results its
    calibration comes from, and its key in ``Run.bundles``) and ``folder`` (under ``bundles/``)."""

    variant: str
    name: str
    folder: str


@runtime_checkable
class Task(Protocol):
    """The seam between the runner and one kind of problem: what the runner asks, in the order it asks."""

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
    group_column: str
    """The column whose groups the bootstrap resamples together (patients, or near-duplicate groups)."""

    def check(self, cfg: Config) -> None:
        """Refuse settings that would fail hours later (before anything is read)."""
        ...

    def variants(self, cfg: Config) -> list[str]:
        """The deep model variants ``cfg`` cross-validates."""
        ...

    def stages(self, cfg: Config, run_dir: Path) -> list[Stage]:
        """The stages whose outputs ``resume`` reuses, with the settings each depends on."""
        ...

    def load(self, run: Run, **inputs) -> None:
        """Set ``run.cases`` (and the task's other tables) from ``inputs`` or ``cfg.data.source``."""
        ...

    def check_inputs(self, run: Run) -> None:
        """Check the inputs against the configuration (column roles, the reader's score) before any training."""
        ...

    def digests(self, run: Run) -> dict[str, str]:
        """Digests of the input tables, recorded so that a resumed run refuses other data."""
        ...

    def prepare(self, run: Run) -> None:
        """Audit or decode the inputs, write ``cases.csv`` and set ``run.splits``."""
        ...

    def features(self, run: Run) -> None:
        """Set ``run.table``: the tabular inputs of every model."""
        ...

    def classical(self, run: Run) -> dict[str, pd.DataFrame]:
        """Out-of-fold prediction tables of the classical models, by name."""
        ...

    def deep_cv(self, run: Run, variant: str) -> tuple[str, pd.DataFrame | None]:
        """The name and out-of-fold prediction table of one deep variant (``None``: skipped, with a warning)."""
        ...

    def ordinal(self, cfg: Config) -> bool:
        """Whether the classes are ordered (ordinal metrics such as quadratic-weighted kappa)."""
        ...

    def result_notes(self, run: Run, name: str) -> dict:
        """Extra entries of one model's result (e.g. whether it read the expert's outline; a description)."""
        ...

    def bundle_plan(self, run: Run) -> list[BundlePlan]:
        """The deployable bundles to fit, in order; the first is the run's bundle."""
        ...

    def fit_bundle(self, run: Run, plan: BundlePlan, calibration: dict | None) -> Path:
        """Fit one bundle on every case and write it (atomically); return its folder."""
        ...

    def explain_inputs(self, run: Run) -> dict:
        """What explaining the first bundle reads: ``source``, ``cases``, ``background``, ``max_stacks``."""
        ...

    def sections(self, run: Run) -> tuple[list, list]:
        """The task's own report sections: those before the bundle sections, and those after."""
        ...

    def notes(self, run: Run) -> list[str]:
        """The report's notes (synthetic data, where outlines came from, how splits and CIs were made)."""
        ...

    def summary(self, run: Run) -> dict:
        """The report's dataset summary."""
        ...

    def figures(self, run: Run) -> dict:
        """Extra report figures, caption → PNG path."""
        ...

    def report_title(self, cfg: Config) -> str:
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
