"""The end-to-end experiment: cases → audit → splits → features → models → evaluation → report → bundle.

Each stage writes files into the run folder; a stage whose output exists is reused on ``resume``, so a killed
run picks up where it stopped (deep models also resume inside a fold from their last epoch).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from breastfusion.config import Config, config_to_yaml, save_config
from breastfusion.data.cases import CASE_ID, LABEL, MASK_PATH, PATIENT_ID, mask_list, write_cases
from breastfusion.data.importers import import_cases
from breastfusion.errors import DataError
from breastfusion.utils import atomic_path, seed_everything, write_json

log = logging.getLogger(__name__)

DEEP_NAMES = {"fusion": "fusion", "image": "image_only", "tabular": "tabular_only"}


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict
    report: Path | None
    bundle: Path | None


def _write_csv(df: pd.DataFrame, path: Path) -> Path:
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


def has_masks(cases: pd.DataFrame) -> bool:
    return MASK_PATH in cases.columns and any(mask_list(v) for v in cases[MASK_PATH])


# ------------------------------------------------------------------------------------------------ stages


def stage_audit(cases: pd.DataFrame, cfg: Config, run_dir: Path, resume: bool, progress: bool) -> tuple[pd.Series, dict]:
    """Audit the data; return the duplicate group of every case and a short summary for the report."""
    from breastfusion.data.audit import audit_cases, write_audit

    out = run_dir / "audit"
    groups_path = out / "groups.csv"
    if resume and groups_path.exists() and (out / "audit.json").exists():
        g = pd.read_csv(groups_path, dtype=str).set_index(CASE_ID)["dup_group"]
        summary = json.loads((out / "audit.json").read_text()).get("summary", {})
        return g.reindex(cases[CASE_ID]), summary
    result = audit_cases(cases, no_lesion_classes=tuple(cfg.data.no_lesion_labels), progress=progress)
    write_audit(result, out)
    g = pd.Series(result.dup_group).reindex(cases[CASE_ID].tolist())
    _write_csv(pd.DataFrame({CASE_ID: g.index, "dup_group": g.to_numpy()}), groups_path)
    return g, result.summary


def stage_splits(cases: pd.DataFrame, groups: pd.Series | None, cfg: Config, run_dir: Path, resume: bool) -> pd.DataFrame:
    from breastfusion.data.splits import make_splits

    path = run_dir / "splits.csv"
    if resume and path.exists():
        return pd.read_csv(path, dtype={CASE_ID: str})
    splits = make_splits(cases, n_splits=cfg.cv.n_splits, seed=cfg.seed,
                         groups=groups if cfg.cv.group_duplicates else None, strategy=cfg.cv.strategy)
    _write_csv(splits, path)
    return splits


def stage_radiomics(cases: pd.DataFrame, cfg: Config, run_dir: Path, progress: bool) -> pd.DataFrame | None:
    if not cfg.data.radiomics or not has_masks(cases):
        return None
    from breastfusion.features.radiomics import extract_radiomics

    feats = extract_radiomics(cases, cache_dir=run_dir / "features" / "radiomics_cache", progress=progress)
    with atomic_path(run_dir / "features" / "radiomics.parquet") as tmp:
        feats.to_parquet(tmp)
    return feats


def stage_classical(table: pd.DataFrame, cases: pd.DataFrame, splits: pd.DataFrame, classes: list[str], cfg: Config,
                    run_dir: Path, resume: bool) -> tuple[dict[str, pd.DataFrame], dict[str, Path], list[str]]:
    """Out-of-fold predictions of each classical model, then the same model fitted on every case (saved with
    skops for the bundle). Returns (predictions, model files, feature names)."""
    from breastfusion.models.classical import adapt_to_size, fit_predict_oof, make_classical, save_classical
    from breastfusion.tabular_inputs import numeric_for_classical

    if table is None or table.shape[1] == 0 or not cfg.experiment.classical_models:
        return {}, {}, []
    X = numeric_for_classical(table)
    y = cases.set_index(CASE_ID)[LABEL].reindex(X.index)
    out, files = {}, {}
    for name in cfg.experiment.classical_models:
        path = run_dir / "predictions" / f"{name}.csv"
        model_path = run_dir / "classical" / f"{name}.skops"
        if resume and path.exists():
            out[name] = pd.read_csv(path, dtype={CASE_ID: str})
        else:
            t0 = time.perf_counter()
            out[name] = fit_predict_oof(X, y, splits, name, classes, seed=cfg.seed)
            log.info("classical %s: %.1f s", name, time.perf_counter() - t0)
            _write_csv(out[name], path)
        if not (resume and model_path.exists()):
            save_classical(adapt_to_size(make_classical(name, seed=cfg.seed), len(X)).fit(X, y), model_path)
        files[name] = model_path
    return out, files, list(X.columns)


def stage_deep(variant: str, cases: pd.DataFrame, table: pd.DataFrame | None, splits: pd.DataFrame,
               classes: list[str], cfg: Config, run_dir: Path, resume: bool, progress: bool, cache) -> pd.DataFrame:
    from breastfusion.training.fit import fit_deep_model, score_cases

    name = DEEP_NAMES[variant]
    path = run_dir / "predictions" / f"{name}.csv"
    if resume and path.exists():
        return pd.read_csv(path, dtype={CASE_ID: str})
    fold_of = splits.set_index(CASE_ID)["fold"].reindex(cases[CASE_ID]).to_numpy()
    group_of = splits.set_index(CASE_ID)["group"].reindex(cases[CASE_ID]).to_numpy() if "group" in splits else None
    parts = []
    for fold in sorted(pd.unique(fold_of)):
        fold_dir = run_dir / "deep" / name / f"fold{int(fold)}"
        fold_path = fold_dir / "predictions.csv"
        if resume and fold_path.exists():
            parts.append(pd.read_csv(fold_path, dtype={CASE_ID: str}))
            continue
        test = fold_of == fold
        fitted = fit_deep_model(variant, cases[~test].reset_index(drop=True), table, classes, cfg, fold_dir,
                                groups=None if group_of is None else group_of[~test], resume=resume,
                                progress=progress, cache=cache, desc=f"{name} fold {int(fold) + 1}")
        probs = score_cases(fitted, cases[test].reset_index(drop=True), table, cfg, cache=cache)
        preds = prediction_table(cases[test], probs, classes, fold=int(fold), model=name)
        _write_csv(preds, fold_path)
        write_json(fitted.result.history, fold_dir / "history.json")
        (fold_dir / "last.pt").unlink(missing_ok=True)  # resume state is no longer needed; best weights stay
        parts.append(preds)
    preds = pd.concat(parts, ignore_index=True)
    _write_csv(preds, path)
    return preds


def prediction_table(cases: pd.DataFrame, probs: np.ndarray, classes: list[str], *, fold, model: str) -> pd.DataFrame:
    df = pd.DataFrame({CASE_ID: cases[CASE_ID].to_numpy(), "fold": fold,
                       LABEL: cases[LABEL].to_numpy() if LABEL in cases else None})
    for j, c in enumerate(classes):
        df[f"prob_{c}"] = probs[:, j]
    df["predicted"] = np.asarray(classes, dtype=object)[probs.argmax(1)]
    df["model"] = model
    return df


# -------------------------------------------------------------------------------------------------- run


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


def run_experiment(cfg: Config, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
                   cases: pd.DataFrame | None = None) -> RunResult:
    """Run the whole experiment described by ``cfg`` into ``run_dir``."""
    from breastfusion.data.synthetic import is_synthetic
    from breastfusion.evaluation.metrics import evaluate, to_jsonable
    from breastfusion.evaluation.report import write_report
    from breastfusion.features.radiomics import EXPERT_MASK_NOTE
    from breastfusion.tabular_inputs import clinical_columns, tabular_table
    from breastfusion.training.data import ImageCache

    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    if cases is None:
        if not cfg.data.source:
            raise DataError("No data source: set data.source (a cases table or a BUSI-style folder).")
        cases = import_cases(cfg.data.source)
    classes = resolve_classes(cases, cfg)
    save_config(cfg, run_dir / "config.yaml")
    synthetic = is_synthetic(cases)
    timings = {}

    t = time.perf_counter()
    groups, audit_summary = stage_audit(cases, cfg, run_dir, resume, progress)
    timings["audit_s"] = time.perf_counter() - t
    cases = cases.assign(dup_group=groups.to_numpy())
    write_cases(cases, run_dir / "cases.csv")
    splits = stage_splits(cases, cases.set_index(CASE_ID)["dup_group"], cfg, run_dir, resume)

    t = time.perf_counter()
    radiomics = stage_radiomics(cases, cfg, run_dir, progress)
    timings["radiomics_s"] = time.perf_counter() - t
    columns = clinical_columns(cases, cfg.data.tabular_columns)
    table = tabular_table(cases, columns, radiomics)
    if table.shape[1] == 0:
        table = None

    predictions: dict[str, pd.DataFrame] = {}
    t = time.perf_counter()
    classical_preds, classical_files, classical_features = stage_classical(table, cases, splits, classes, cfg,
                                                                           run_dir, resume)
    predictions.update(classical_preds)
    timings["classical_s"] = time.perf_counter() - t
    cache = ImageCache(cfg.image.cache_size or int(round(cfg.image.size * 1.15)))
    for variant in cfg.experiment.deep_models:
        if variant in ("fusion", "tabular") and table is None:
            log.warning("skipping the %s model: the cases have no tabular data (no clinical columns, no masks)", variant)
            continue
        t = time.perf_counter()
        predictions[DEEP_NAMES[variant]] = stage_deep(variant, cases, table, splits, classes, cfg, run_dir, resume,
                                                      progress, cache)
        timings[f"{DEEP_NAMES[variant]}_s"] = time.perf_counter() - t

    group_col = "dup_group"
    results = {}
    for name, preds in predictions.items():
        preds = preds.merge(cases[[CASE_ID, PATIENT_ID, "dup_group"]], on=CASE_ID, how="left")
        # Cluster bootstrap over near-duplicate groups: correlated copies are resampled together.
        results[name] = {"predictions": preds,
                         "metrics": evaluate(preds, classes, n_boot=cfg.experiment.n_boot, seed=cfg.seed,
                                             group_col=group_col)}
    metrics = {name: to_jsonable(r["metrics"]) for name, r in results.items()}
    write_json({"classes": classes, "synthetic_data": synthetic, "timings": timings, "models": metrics},
               run_dir / "metrics.json")

    bundles: dict[str, Path] = {}
    for variant in dict.fromkeys(v if table is not None else "image" for v in cfg.experiment.final_models):
        from breastfusion.training.fit import fit_final_bundle

        name = DEEP_NAMES[variant]
        if resume and (run_dir / "bundles" / name / "bundle.json").exists():  # bundles are written atomically
            log.info("resume: reusing the finished bundle %s", run_dir / "bundles" / name)
            bundles[name] = run_dir / "bundles" / name
            continue
        t = time.perf_counter()
        calibration = None
        if name in results:
            from breastfusion.evaluation.calibration import fit_bundle_calibration

            try:
                calibration = fit_bundle_calibration(results[name]["predictions"], classes,
                                                     method=cfg.experiment.conformal_method,
                                                     alpha=cfg.experiment.conformal_alpha,
                                                     class_conditional=cfg.experiment.conformal_class_conditional)
            except DataError as exc:  # e.g. too few cases for the requested coverage
                log.warning("bundle %s left uncalibrated: %s", name, exc)
        bundles[name] = fit_final_bundle(variant, cases, table, classes, cfg, run_dir, resume=resume,
                                         progress=progress, cache=cache, synthetic=synthetic,
                                         metrics=metrics.get(name), radiomics_used=radiomics is not None,
                                         clinical_cols=columns,
                                         classical={"files": classical_files, "features": classical_features,
                                                    "metrics": {k: metrics[k] for k in classical_files}},
                                         calibration=calibration,
                                         data_meta={"audit": audit_summary,
                                                    "splits": f"{cfg.cv.strategy}, {cfg.cv.n_splits} folds, seed {cfg.seed}, "
                                                              "patients and near-duplicate groups kept together"})
        timings[f"final_{name}_s"] = time.perf_counter() - t
    bundle = next(iter(bundles.values()), None)
    t = time.perf_counter()
    sections = bundle_sections(results, bundles, classes, cfg, run_dir, source=cases,
                               background=table.reset_index() if table is not None else None)
    timings["report_sections_s"] = time.perf_counter() - t

    timings["total_s"] = time.perf_counter() - t_start
    notes = []
    if synthetic:
        notes.append("Every case in this run comes from the built-in SYNTHETIC phantom cohort: the numbers show the "
                     "software works, not how a model performs on patients.")
    if radiomics is not None:
        notes.append(EXPERT_MASK_NOTE)
    notes.append(f"Splits: {cfg.cv.strategy}, {cfg.cv.n_splits} folds, seed {cfg.seed}; a patient and a "
                 "near-duplicate group always stay on one side. Confidence intervals: percentile bootstrap "
                 f"({cfg.experiment.n_boot} resamples) over near-duplicate groups. Deep models stop early on an inner "
                 "validation split of the training folds, never on the test fold.")
    summary = {
        "cases": len(cases), "classes": {c: int((cases[LABEL] == c).sum()) for c in classes},
        "patients": int(cases[PATIENT_ID].nunique()), "centres": sorted(cases["center"].unique().tolist()),
        "tabular columns": (0 if table is None else table.shape[1]), "clinical columns": len(columns),
        "radiomics": "from lesion masks" if radiomics is not None else "not used",
        "audit": audit_summary, "timings (s)": {k: round(v, 1) for k, v in timings.items()},
    }
    report = write_report(run_dir / "report", title=f"breastfusion — {cfg.name}", model_results=results,
                          dataset_summary=summary, config_text=config_to_yaml(cfg), notes=notes, synthetic=synthetic,
                          sections=sections)
    write_json({"classes": classes, "synthetic_data": synthetic, "timings": timings, "models": metrics},
               run_dir / "metrics.json")
    return RunResult(run_dir=run_dir, metrics=metrics, report=report, bundle=bundle)
