"""The one experiment runner: ``run_experiment(cfg, run_dir)``, the same stages for every task.

    inputs → drop labels → classes → check → audit/prepare + splits → features → classical → deep CV
    → evaluate → bundles (+ calibration) → explain → report

The runner owns the sequence, the timings, evaluation, ``metrics.json``, the bundles' calibration, the
explanations and the report; the task (:mod:`breastfusion.tasks`) is asked only for what differs: how its inputs
are read and prepared, its features, its models, its bundles and its own report sections (see
:class:`~breastfusion.tasks.base.Task`).

Each stage writes files into the run folder; a stage whose output exists is reused on ``resume``, so a killed
run picks up where it stopped (deep models also resume inside a fold from their last epoch). Each fold's network
is seeded from (seed, model, fold), so a resumed run repeats an uninterrupted one; ``fingerprints.json`` records
the settings every stage was made under, and resuming with other settings is refused (:mod:`breastfusion.run_state`).
Under ``torchrun`` every rank runs the sequence; only the main rank writes shared files and the report.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from breastfusion import distributed as dist_utils
from breastfusion import tasks
from breastfusion.config import Config, config_to_yaml, save_config
from breastfusion.data.cases import CASE_ID, PATIENT_ID
from breastfusion.errors import DataError
from breastfusion.tasks.base import Run, RunResult, drop_label_cases, resolve_classes
from breastfusion.utils import remove_stale_temporaries, seed_everything, write_json

log = logging.getLogger(__name__)


def run_experiment(cfg: Config, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
                   **inputs) -> RunResult:
    """Run the experiment ``cfg`` describes into ``run_dir``. ``inputs``: tables given instead of reading
    ``data.source`` (``cases=``; histology also ``tiles=``)."""
    from breastfusion.data.synthetic import is_synthetic
    from breastfusion.run_state import check_and_record

    task = tasks.get(cfg.task)
    t_start = time.perf_counter()
    task.check(cfg)  # before hours of audit and classical models
    dist_utils.init_distributed()
    run = Run(cfg=cfg, dir=Path(run_dir), resume=resume, progress=progress)
    run.dir.mkdir(parents=True, exist_ok=True)
    if run.main:
        remove_stale_temporaries(run.dir)  # left by a killed process; no writer of ours runs here yet
    seed_everything(cfg.seed)

    task.load(run, **inputs)
    run.cases, run.dropped = drop_label_cases(run.cases, cfg.data.drop_labels)
    run.classes = resolve_classes(run.cases, cfg)
    task.check_inputs(run)  # column roles, the reader's score: wrong names fail before any training
    if run.main:  # (torchrun stops the other ranks when this one refuses)
        check_and_record(run.dir, cfg, task.stages(cfg, run.dir), task.digests(run), resume=resume)
        save_config(cfg, run.dir / "config.yaml")
    run.synthetic = is_synthetic(run.cases)

    task.prepare(run)  # audit or decode, the cases table, splits (and the leakage guard)
    task.features(run)  # the tabular inputs every model reads
    t = time.perf_counter()
    run.predictions.update(task.classical(run))
    run.timings["classical_s"] = time.perf_counter() - t
    for variant in task.variants(cfg):
        t = time.perf_counter()
        name, preds = task.deep_cv(run, variant)
        if preds is not None:
            run.predictions[name] = preds
            run.timings[f"{name}_s"] = time.perf_counter() - t

    _evaluate(run, task)
    if run.main:
        write_json(_metrics_json(run), run.dir / "metrics.json")
    _fit_bundles(run, task)
    bundle = next(iter(run.bundles.values()), None)  # the first planned bundle is the run's
    run.timings["total_s"] = time.perf_counter() - t_start
    if not run.main:
        return RunResult(run_dir=run.dir, metrics=run.metrics, report=None, bundle=bundle)

    t = time.perf_counter()
    sections = _bundle_sections(run, task)
    first, last = task.sections(run)
    sections = [*first, *sections, *last]
    run.timings["report_sections_s"] = time.perf_counter() - t
    run.timings["total_s"] = time.perf_counter() - t_start
    from breastfusion.evaluation.report import write_report

    report = write_report(run.dir / "report", title=task.report_title(cfg), model_results=run.results,
                          dataset_summary=task.summary(run), config_text=config_to_yaml(cfg), notes=task.notes(run),
                          synthetic=run.synthetic, sections=sections, extra_figures=task.figures(run) or None)
    write_json(_metrics_json(run), run.dir / "metrics.json")
    return RunResult(run_dir=run.dir, metrics=run.metrics, report=report, bundle=bundle)


def _evaluate(run: Run, task) -> None:
    """Metrics with cluster-bootstrap CIs for every model's out-of-fold predictions (correlated copies, a
    patient's cases or a near-duplicate group, are resampled together)."""
    from breastfusion.evaluation.metrics import evaluate, to_jsonable

    group_col = task.group_column
    keep = list(dict.fromkeys([CASE_ID, PATIENT_ID, group_col]))
    for name, preds in run.predictions.items():
        preds = preds.merge(run.cases[keep], on=CASE_ID, how="left")
        run.results[name] = {"predictions": preds,
                             "metrics": evaluate(preds, run.classes, n_boot=run.cfg.experiment.n_boot,
                                                 seed=run.cfg.seed, group_col=group_col,
                                                 ordinal=task.ordinal(run.cfg)),
                             **task.result_notes(run, name)}
    run.metrics = {name: to_jsonable(r["metrics"]) for name, r in run.results.items()}


def _metrics_json(run: Run) -> dict:
    return {"classes": run.classes, "synthetic_data": run.synthetic, "timings": run.timings, "models": run.metrics,
            **run.extra_metrics}


def _fit_bundles(run: Run, task) -> None:
    """The deployable bundles the task plans, each calibrated on its recipe's out-of-fold predictions; a bundle
    already finished (written atomically) is reused on resume."""
    from breastfusion.evaluation.calibration import fit_bundle_calibration

    cfg = run.cfg
    for plan in task.bundle_plan(run):
        finished = run.dir / "bundles" / plan.folder
        if run.resume and (finished / "bundle.json").exists():
            log.info("resume: reusing the finished bundle %s", finished)
            run.bundles[plan.name] = finished
            continue
        t = time.perf_counter()
        calibration = None
        if plan.name in run.results:
            try:
                calibration = fit_bundle_calibration(run.results[plan.name]["predictions"], run.classes,
                                                     method=cfg.experiment.conformal_method,
                                                     alpha=cfg.experiment.conformal_alpha,
                                                     class_conditional=cfg.experiment.conformal_class_conditional)
            except DataError as exc:  # e.g. too few cases for the requested coverage
                log.warning("bundle %s left uncalibrated: %s", plan.folder, exc)
        run.bundles[plan.name] = task.fit_bundle(run, plan, calibration)
        run.timings[f"final_{plan.folder}_s"] = time.perf_counter() - t


def _bundle_sections(run: Run, task) -> list:
    """The report's sections about the deployable bundle(s): cross-fold calibration and deferral of the bundled
    recipes, then explanations of ``experiment.explain_cases`` chosen cases with the first bundle, computed here
    and handed to the report. A section that fails is replaced by a short note; the run goes on."""
    from breastfusion.evaluation.insight import (
        calibration_section,
        explanation_section,
        failed_section,
        select_explain_cases,
    )

    cfg, sections = run.cfg, []
    bundled = {name: run.results[name]["predictions"] for name in run.bundles if name in run.results}
    if bundled:
        try:
            sections.append(calibration_section(bundled, run.classes, run.dir / "calibration",
                                                method=cfg.experiment.conformal_method,
                                                alpha=cfg.experiment.conformal_alpha, seed=cfg.seed,
                                                class_conditional=cfg.experiment.conformal_class_conditional))
        except Exception as exc:  # noqa: BLE001 - a report section never loses the run
            sections.append(failed_section("calibration", "Calibration and deferral", exc))
    name, path = next(iter(run.bundles.items()), (None, None))
    if cfg.experiment.explain_cases and path is not None and name in run.results:
        try:
            selection = select_explain_cases(run.results[name]["predictions"], run.classes,
                                             cfg.experiment.explain_cases)
            explained = _explain(run, task, path, selection)
            sec = explanation_section(explained, selection, cases=task.explain_inputs(run)["cases"])
            sec.title = f"Explanations (final bundle: {name})"
            sections.append(sec)
        except Exception as exc:  # noqa: BLE001
            sections.append(failed_section("explanations", "Explanations (final bundle)", exc))
    return sections


def _explain(run: Run, task, bundle_path: Path, selection):
    """Explain the selected cases with the final bundle; the report only renders what this returns."""
    from breastfusion.explain.runner import explain_selection

    x = task.explain_inputs(run)
    return explain_selection(bundle_path, x["source"], selection, run.dir / "explanations", cases=x["cases"],
                             background=x["background"], max_stacks=x["max_stacks"], seed=run.cfg.seed)
