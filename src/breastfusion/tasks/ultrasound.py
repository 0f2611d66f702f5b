"""The ultrasound task: breast ultrasound + clinical history + biomarkers (+ lesion radiomics).

Cases → audit → splits → (segmentation) → features → models → evaluation → report → bundle.

Each stage writes files into the run folder; a stage whose output exists is reused on ``resume``, so a killed
run picks up where it stopped (deep models also resume inside a fold from their last epoch). Each fold's network
is seeded from (seed, model, fold), so a resumed run repeats an uninterrupted one; ``fingerprints.json`` records
the settings every stage was made under, and resuming with other settings is refused (:mod:`breastfusion.run_state`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from breastfusion.config import Config, config_to_yaml, save_config
from breastfusion.data.cases import (
    CASE_ID,
    LABEL,
    MASK_PATH,
    PATIENT_ID,
    mask_list,
    write_cases,
)
from breastfusion.data.cohorts import import_sources
from breastfusion.data.predictions import prediction_table
from breastfusion.errors import DataError
from breastfusion.run_state import check_and_record, table_digest
from breastfusion.tasks.base import (
    RunResult,
    bundle_sections,
    drop_label_cases,
    resolve_classes,
    stage_splits,
    write_csv,
)
from breastfusion.utils import (
    atomic_path,
    remove_stale_temporaries,
    seed_everything,
    stable_seed,
    write_json,
)

log = logging.getLogger(__name__)

DEEP_NAMES = {"fusion": "fusion", "image": "image_only", "tabular": "tabular_only"}


def has_masks(cases: pd.DataFrame) -> bool:
    return MASK_PATH in cases.columns and any(mask_list(v) for v in cases[MASK_PATH])


# ------------------------------------------------------------------------------------------------ stages


def stage_audit(cases: pd.DataFrame, cfg: Config, run_dir: Path, resume: bool, progress: bool, *,
                table_rows: bool = True, input_columns: list[str] | None = None) -> tuple[pd.Series, dict]:
    """Audit the data; return the duplicate group of every case and a short summary for the report.
    Every image must be readable before the first model trains: otherwise DataError lists the bad ones (with their
    cases-table row when ``table_rows``) and nothing is trained."""
    from breastfusion.data.audit import audit_for_config, write_audit

    out = run_dir / "audit"
    groups_path = out / "groups.csv"
    stored = json.loads((out / "audit.json").read_text()) if resume and (out / "audit.json").exists() else {}
    # an audit that found unreadable images (made by an older version) is redone: they may have been fixed since
    if resume and groups_path.exists() and stored and not stored.get("unreadable"):
        g = pd.read_csv(groups_path, dtype=str).set_index(CASE_ID)["dup_group"]
        return g.reindex(cases[CASE_ID]), stored.get("summary", {})
    groups_path.unlink(missing_ok=True)  # the audit is redone: its groups must not count as finished meanwhile
    result = audit_for_config(cases, cfg.data, input_columns=input_columns, progress=progress)
    write_audit(result, out)
    # groups.csv marks a finished audit (resume); an audit that found unreadable images is redone next time
    refuse_unreadable(cases, result.unreadable, out / "audit.md", table_rows=table_rows)
    g = pd.Series(result.dup_group).reindex(cases[CASE_ID].tolist())
    write_csv(pd.DataFrame({CASE_ID: g.index, "dup_group": g.to_numpy()}), groups_path)
    return g, result.summary


def refuse_unreadable(cases: pd.DataFrame, unreadable: list[dict], report: Path, *, table_rows: bool = True,
                      show: int = 5) -> None:
    """DataError listing the images the audit could not read (row, case id, file, why), if any: a training
    that meets them later fails after hours, with some models already written."""
    if not unreadable:
        return
    row_of = {str(c): i for i, c in enumerate(cases[CASE_ID].astype(str))}
    lines = []
    for u in unreadable[:show]:
        cid = str(u.get("case_id"))
        where = f"row {row_of[cid] + 2}, " if table_rows and cid in row_of else ""
        lines.append(f"  {where}case '{cid}': {u.get('path') or '(no image path)'}: {u.get('error')}")
    if len(unreadable) > show:
        lines.append(f"  ... and {len(unreadable) - show} more")
    raise DataError(f"{len(unreadable)} image(s) of the cases table cannot be read; every image must be readable "
                    "before training starts (nothing was trained). Fix or remove these rows:\n" + "\n".join(lines)
                    + f"\nThe full list is in '{report}'.")


def stage_radiomics(cases: pd.DataFrame, cfg: Config, run_dir: Path, progress: bool) -> pd.DataFrame | None:
    if not cfg.data.radiomics or not has_masks(cases):
        return None
    from breastfusion.features.radiomics import extract_radiomics

    feats = extract_radiomics(cases, cache_dir=run_dir / "features" / "radiomics_cache", progress=progress,
                              pixel_size_column=cfg.data.pixel_size_column, pixel_size_unit=cfg.data.pixel_size_unit)
    with atomic_path(run_dir / "features" / "radiomics.parquet") as tmp:
        feats.to_parquet(tmp)
    return feats


def stage_segmentation(cases: pd.DataFrame, splits: pd.DataFrame, classes: list[str], cfg: Config, run_dir: Path,
                       resume: bool, progress: bool) -> tuple[pd.DataFrame, Path | None, dict]:
    """``data.masks: predicted``: out-of-fold lesion masks for every case, on the classifier's own folds, and a
    segmenter trained on every expert mask for the bundle.

    Each case's predicted mask comes from the segmenter of its fold, which never saw it: the radiomics the
    classifiers learn from look like those a new case gets at prediction. (The masks of the *training* cases of
    fold k come from segmenters that saw fold k's expert outlines, not its labels; the out-of-fold scheme of
    stacking.) Returns the cases with ``mask_path`` = predicted masks (``expert_mask_path`` keeps the expert's),
    the final segmenter file (None when the run builds no bundle) and the out-of-fold quality summary (Dice / IoU /
    HD95 against the expert)."""
    from breastfusion.segmentation import (
        cross_validate_segmenter,
        train_lesion_segmenter,
    )

    if not has_masks(cases):
        raise DataError("data.masks is 'predicted' but no case has an expert lesion mask (mask_path) to train the "
                        "segmenter on. Add masks, or set data.masks: none (no radiomics).")
    out = run_dir / "segmentation"
    require_lesion = not (set(classes) & set(cfg.data.no_lesion_labels))
    oof, scores = cross_validate_segmenter(cases, splits, cfg.segmentation, out / "cv", seed=cfg.seed,
                                           progress=progress, require_lesion=require_lesion)
    final = out / "segmenter.safetensors"
    if not cfg.experiment.final_models:
        final = None  # no bundle to carry it: the out-of-fold masks are all this run needs
    elif not (resume and final.exists()):
        train_lesion_segmenter(cases, cfg.segmentation, final, seed=stable_seed(cfg.seed, "segmenter", "final"),
                               progress=progress)
    summary_path = out / "cv" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["require_lesion"] = require_lesion
    predicted = oof.set_index(CASE_ID)[MASK_PATH].reindex(cases[CASE_ID])
    expert = cases[MASK_PATH] if MASK_PATH in cases.columns else pd.Series(np.nan, index=cases.index)
    rad_cases = cases.assign(expert_mask_path=expert.to_numpy(), **{MASK_PATH: predicted.to_numpy()})
    missing = rad_cases[MASK_PATH].isna()
    if missing.any():  # a case the segmenter could not read: its radiomics are unknown, never "no lesion"
        log.warning("%d case(s) have no predicted mask (unreadable image?): their radiomics are unknown: %s",
                    int(missing.sum()), ", ".join(rad_cases.loc[missing, CASE_ID].astype(str).head(10)))
    return rad_cases, final, summary


def segmentation_section(summary: dict, cv_dir: Path):
    """The report's section on the predicted masks: out-of-fold quality against the expert (with CIs), per
    fold, and overlays of expert (green) and predicted (red) outlines, worst cases first."""
    from breastfusion.evaluation.insight import ReportSection
    from breastfusion.segmentation.metrics import format_summary

    paras = ["Every case's mask was predicted by the segmenter of its fold, which never saw it; the classifiers "
             "learned from these masks, as they will read a new case's. Quality against the expert outline (mean "
             f"and 95% bootstrap CI over split groups), all cases: "
             f"{format_summary(summary, summary.get('hd95_unit', 'px')) or 'n/a'}."]
    lesion = summary.get("lesion_cases")
    if isinstance(lesion, dict) and lesion.get("dice"):
        paras.append(f"Cases whose expert mask holds a lesion ({lesion.get('n_cases', '?')}): "
                     f"{format_summary(lesion, summary.get('hd95_unit', 'px'))}.")
    if summary.get("require_lesion"):
        paras.append("Every class of this cohort has a lesion: when the segmenter finds none, its most likely "
                     "region is kept (flagged in segmentation/cv/scores.csv as fallback_used).")
    rows = [{"fold": k, "cases scored": f.get("n"), "mean Dice": f"{f['dice']:.3f}"}
            for k, f in sorted((summary.get("per_fold") or {}).items(), key=lambda kv: str(kv[0]))
            if isinstance(f, dict) and isinstance(f.get("dice"), (int, float))]
    figs = [(p, f"expert (green) vs predicted (red): {p.stem}") for p in sorted((cv_dir / "overlays").glob("*.png"))]
    return ReportSection("segmentation", "Lesion segmentation (out-of-fold, against the expert)", paras,
                         pd.DataFrame(rows) if rows else None, figs)


def stage_classical(table: pd.DataFrame, cases: pd.DataFrame, splits: pd.DataFrame, classes: list[str], cfg: Config,
                    run_dir: Path, resume: bool) -> tuple[dict[str, pd.DataFrame], dict[str, Path], list[str], dict]:
    """Out-of-fold predictions of each classical model, then the same model fitted on every case (saved with
    skops for the bundle). Returns (predictions, model files, feature names, how cells were read: for the bundle,
    so prediction reads multi-valued and ordinal cells the same way)."""
    from breastfusion.models.classical import (
        adapt_to_size,
        fit_predict_oof,
        make_classical,
        save_classical,
    )
    from breastfusion.tabular_inputs import classical_matrix

    if table is None or table.shape[1] == 0 or not cfg.experiment.classical_models:
        return {}, {}, [], {}
    X = classical_matrix(table, cfg.data)
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
            write_csv(out[name], path)
        if not (resume and model_path.exists()):
            save_classical(adapt_to_size(make_classical(name, seed=cfg.seed), len(X)).fit(X, y), model_path)
        files[name] = model_path
    return out, files, list(X.columns), X.attrs.get("reading", {})


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
                                progress=progress, cache=cache, desc=f"{name} fold {int(fold) + 1}",
                                seed=stable_seed(cfg.seed, name, int(fold)))
        probs = score_cases(fitted, cases[test].reset_index(drop=True), table, cfg, cache=cache)
        t = cases[test]
        preds = prediction_table(t[CASE_ID], probs, classes, model=name, fold=int(fold),
                                 **{LABEL: t[LABEL].to_numpy() if LABEL in t else None})
        write_csv(preds, fold_path)
        write_json(fitted.result.history, fold_dir / "history.json")
        (fold_dir / "last.pt").unlink(missing_ok=True)  # resume state is no longer needed; best weights stay
        parts.append(preds)
    preds = pd.concat(parts, ignore_index=True)
    write_csv(preds, path)
    return preds


# -------------------------------------------------------------------------------------------------- run

# The config keys each reusable stage depends on (see breastfusion.run_state). data.* covers the tabular
# reading (columns, missing-value tokens, declared types, radiomics) and the class list; data.source never counts.
_TABULAR_DATA = ("data",)
_DATA_EXCLUDE = ("data.no_lesion_labels", "data.column_info")  # audit only / display only
_BUNDLE_EXTRA = ("name", "data.column_info", "experiment.classical_models", "experiment.n_boot",
                 "experiment.conformal_method", "experiment.conformal_alpha", "experiment.conformal_class_conditional")


def _tab_keys(cfg: Config) -> tuple[str, ...]:
    """Keys of the tabular reading; the segmenter's settings count only when it makes the masks."""
    return (*_TABULAR_DATA, *(("segmentation",) if cfg.data.masks == "predicted" else ()))


def _deep_keys(variant: str, cfg: Config) -> tuple[str, ...]:
    data = ("data.labels",) if variant == "image" else _tab_keys(cfg)
    image = () if variant == "tabular" else ("image",)
    return ("seed", "cv", *data, *image, "model", "train")


def run_stages(cfg: Config, run_dir: Path) -> list:
    """The stages of an ultrasound run whose outputs ``resume`` reuses, and whether they exist in ``run_dir``."""
    from breastfusion.run_state import Stage

    def any_of(*paths: Path) -> bool:
        return any(p.exists() for p in paths)

    stages = [Stage("audit", "audit/", ("data.no_lesion_labels", "data.missing_values", "data.column_types",
                                        "data.multi_value_separator", "data.ordinal_levels", "data.drop_labels"),
                    (run_dir / "audit" / "groups.csv").exists()),
              Stage("splits", "splits.csv", ("seed", "cv"), (run_dir / "splits.csv").exists())]
    if cfg.data.masks == "predicted":
        stages.append(Stage("segmentation", "segmentation/", ("seed", "cv", "segmentation", "data.labels",
                                                              "data.drop_labels", "data.no_lesion_labels"),
                            (run_dir / "segmentation").exists()))
    names = cfg.experiment.classical_models
    stages.append(Stage("classical", "classical models (predictions/, classical/)", ("seed", "cv", *_tab_keys(cfg)),
                        any_of(*(run_dir / "predictions" / f"{n}.csv" for n in names),
                               *(run_dir / "classical" / f"{n}.skops" for n in names)), exclude=_DATA_EXCLUDE))
    for variant in cfg.experiment.deep_models:
        name = DEEP_NAMES[variant]
        stages.append(Stage(f"deep:{name}", f"deep/{name}", _deep_keys(variant, cfg),
                            any_of(run_dir / "deep" / name, run_dir / "predictions" / f"{name}.csv"),
                            exclude=_DATA_EXCLUDE))
    # a fusion or tabular bundle falls back to image-only when the cases have no tabular data
    finals = dict.fromkeys([*cfg.experiment.final_models,
                            *(["image"] if set(cfg.experiment.final_models) - {"image"} else [])])
    for variant in finals:
        name = DEEP_NAMES[variant]
        stages.append(Stage(f"bundle:{name}", f"bundles/{name}", (*_deep_keys(variant, cfg), *_BUNDLE_EXTRA),
                            any_of(run_dir / "bundles" / name / "bundle.json",
                                   run_dir / "deep" / f"final_{name}" / "last.pt"),
                            exclude=_DATA_EXCLUDE[:1]))
    return stages




def run_ultrasound(cfg: Config, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
                   cases: pd.DataFrame | None = None) -> RunResult:
    """Run the ultrasound experiment described by ``cfg`` into ``run_dir`` (``cases``: the cases table, instead
    of importing ``data.source``)."""
    from breastfusion.data.leakage import roles_section, run_leakage_guard
    from breastfusion.data.roles import resolve_roles
    from breastfusion.data.synthetic import is_synthetic
    from breastfusion.evaluation.metrics import evaluate, to_jsonable
    from breastfusion.evaluation.report import write_report
    from breastfusion.features.radiomics import EXPERT_MASK_NOTE
    from breastfusion.tabular_inputs import tabular_table
    from breastfusion.training.data import image_cache_for

    t_start = time.perf_counter()
    from breastfusion.training.trainer import check_epochs

    for variant in dict.fromkeys([*cfg.experiment.deep_models, *cfg.experiment.final_models]):
        check_epochs(cfg.train, uses_image=variant != "tabular")  # before hours of audit and classical models
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)  # left by a killed process; no writer of ours runs here yet
    seed_everything(cfg.seed)
    table_rows = cases is not None or isinstance(cfg.data.source, str) and not Path(cfg.data.source).is_dir()
    if cases is None:
        if not cfg.data.source:
            raise DataError("No data source: set data.source (a cases table or a BUSI-style folder).")
        cases = import_sources(cfg.data.source)
    cases, dropped = drop_label_cases(cases, cfg.data.drop_labels)
    classes = resolve_classes(cases, cfg)
    roles = resolve_roles(cases, cfg.data)  # a role naming a wrong column fails before hours of audit
    if cfg.data.roles.reader_score:  # a reader score its order cannot place fails before any training
        from breastfusion.evaluation.reader import check_reader_column

        check_reader_column(cases, cfg.data.roles.reader_score, cfg.data.roles.reader_score_order,
                            missing_values=cfg.data.missing_values, positive=cfg.data.roles.reader_positive,
                            classes=classes)
    check_and_record(run_dir, cfg, run_stages(cfg, run_dir), {"cases": table_digest(cases)}, resume=resume)
    save_config(cfg, run_dir / "config.yaml")
    synthetic = is_synthetic(cases)
    timings = {}

    t = time.perf_counter()
    groups, audit_summary = stage_audit(cases, cfg, run_dir, resume, progress, table_rows=table_rows,
                                        input_columns=roles.inputs)
    timings["audit_s"] = time.perf_counter() - t
    cases = cases.assign(dup_group=groups.to_numpy())
    write_cases(cases, run_dir / "cases.csv")
    splits = stage_splits(cases, cases.set_index(CASE_ID)["dup_group"], cfg, run_dir, resume)
    # before any model trains: an input column that alone predicts the label stops the run (data/leakage.py)
    leakage = run_leakage_guard(cases, roles.inputs, splits, classes, cfg.data, run_dir, seed=cfg.seed)

    segmenter, seg_summary, mask_cases = None, None, cases
    if cfg.data.masks == "predicted" and cfg.data.radiomics:
        t = time.perf_counter()
        mask_cases, segmenter, seg_summary = stage_segmentation(cases, splits, classes, cfg, run_dir, resume, progress)
        timings["segmentation_s"] = time.perf_counter() - t
    t = time.perf_counter()
    radiomics = None if cfg.data.masks == "none" else stage_radiomics(mask_cases, cfg, run_dir, progress)
    timings["radiomics_s"] = time.perf_counter() - t
    expert_mask = radiomics is not None and cfg.data.masks == "expert"
    columns = roles.inputs
    table = tabular_table(cases, columns, radiomics)
    if table.shape[1] == 0:
        table = None

    predictions: dict[str, pd.DataFrame] = {}
    t = time.perf_counter()
    classical_preds, classical_files, classical_features, classical_reading = stage_classical(
        table, cases, splits, classes, cfg, run_dir, resume)
    predictions.update(classical_preds)
    timings["classical_s"] = time.perf_counter() - t
    cache = image_cache_for(cfg)  # resized (and, with image.clean, cleaned) images, shared by every model
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
                                             group_col=group_col),
                         # every model but the image-only network reads the tabular table, radiomics included
                         "expert_mask": expert_mask and name != DEEP_NAMES["image"]}
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
                                                    "reading": classical_reading,
                                                    "metrics": {k: metrics[k] for k in classical_files}},
                                         calibration=calibration, segmenter=segmenter,
                                         segmentation_summary=seg_summary,
                                         data_meta={"audit": audit_summary,
                                                    "splits": f"{cfg.cv.strategy}, {cfg.cv.n_splits} folds, seed {cfg.seed}, "
                                                              "patients and near-duplicate groups kept together"})
        timings[f"final_{name}_s"] = time.perf_counter() - t
    bundle = next(iter(bundles.values()), None)
    t = time.perf_counter()
    sections = bundle_sections(results, bundles, classes, cfg, run_dir, source=cases,
                               background=table.reset_index() if table is not None else None)
    try:
        sections.insert(0, roles_section(cases, roles, cfg.data, leakage))
    except Exception as exc:  # noqa: BLE001 - a report section never loses the run
        from breastfusion.evaluation.insight import failed_section

        sections.insert(0, failed_section("column-roles", "Column roles", exc))
    if seg_summary is not None:
        try:
            sections.insert(0, segmentation_section(seg_summary, run_dir / "segmentation" / "cv"))
        except Exception as exc:  # noqa: BLE001 - a report section never loses the run
            from breastfusion.evaluation.insight import failed_section

            sections.insert(0, failed_section("segmentation", "Lesion segmentation", exc))
    if cases["center"].nunique() > 1:  # several centres: the figures per centre open the report
        from breastfusion.evaluation.sites import cross_site_section

        try:
            sec = cross_site_section(results, cases, classes, strategy=cfg.cv.strategy,
                                     n_boot=min(cfg.experiment.n_boot, 500), seed=cfg.seed,
                                     expert_mask={n: r["expert_mask"] for n, r in results.items()})
            if sec is not None:
                write_json(sec.data, run_dir / "cross_site.json")
                sections.insert(0, sec)
        except Exception as exc:  # noqa: BLE001 - a report section never loses the run
            from breastfusion.evaluation.insight import failed_section

            sections.insert(0, failed_section("across-sites", "Across sites", exc))
    if cfg.data.roles.reader_score:  # every model vs the radiologist on the same out-of-fold cases
        from breastfusion.evaluation.reader import run_reader_comparison

        sections.append(run_reader_comparison(results, cases, cfg, run_dir))
    timings["report_sections_s"] = time.perf_counter() - t

    timings["total_s"] = time.perf_counter() - t_start
    notes = []
    if synthetic:
        notes.append("Every case in this run comes from the built-in SYNTHETIC phantom cohort: the numbers show the "
                     "software works, not how a model performs on patients.")
    if expert_mask:
        notes.append(EXPERT_MASK_NOTE)
    elif radiomics is not None and seg_summary is not None:
        from breastfusion.segmentation.metrics import format_summary

        notes.append("Radiomics come from PREDICTED lesion masks: out-of-fold masks of a segmenter trained on the "
                     "expert outlines of the other folds, so no figure here needs the radiologist's outline at "
                     "prediction; the bundle carries the segmenter. Out-of-fold segmentation quality against the "
                     f"expert: {format_summary(seg_summary) or 'not available'}.")
    reader_path = run_dir / "reader_comparison.json"
    if cfg.data.roles.reader_score and reader_path.exists():  # the radiologist belongs in the summary, not only below
        from breastfusion.evaluation.reader import summary_note

        notes.append(summary_note(json.loads(reader_path.read_text())))
    notes.append(f"Splits: {cfg.cv.strategy}, {cfg.cv.n_splits} folds, seed {cfg.seed}; a patient and a "
                 "near-duplicate group always stay on one side. Confidence intervals: percentile bootstrap "
                 f"({cfg.experiment.n_boot} resamples) over near-duplicate groups. Deep models stop early on an inner "
                 "validation split of the training folds, never on the test fold.")
    summary = {
        "cases": len(cases), "classes": {c: int((cases[LABEL] == c).sum()) for c in classes},
        "patients": int(cases[PATIENT_ID].nunique()), "centres": sorted(cases["center"].unique().tolist()),
        "tabular columns": (0 if table is None else table.shape[1]), "clinical columns": len(columns),
        "radiomics": ("not used" if radiomics is None else "from the expert's lesion masks" if expert_mask
                      else "from predicted lesion masks (out-of-fold segmenter)"),
        "set aside (data.drop_labels)": dropped, "audit": audit_summary,
        "timings (s)": {k: round(v, 1) for k, v in timings.items()},
    }
    report = write_report(run_dir / "report", title=f"breastfusion — {cfg.name}", model_results=results,
                          dataset_summary=summary, config_text=config_to_yaml(cfg), notes=notes, synthetic=synthetic,
                          sections=sections)
    write_json({"classes": classes, "synthetic_data": synthetic, "timings": timings, "models": metrics},
               run_dir / "metrics.json")
    return RunResult(run_dir=run_dir, metrics=metrics, report=report, bundle=bundle)


class UltrasoundTask:
    """Breast ultrasound image + clinical columns + lesion radiomics (mask expert, predicted or none)."""

    name = "ultrasound"
    description = "breast ultrasound + clinical history + biomarkers (+ lesion radiomics): benign / malignant / normal"
    inputs = ("image", "mask or bbox", "clinical columns")
    network_kinds = ("fusion",)
    serves = True

    def variants(self, cfg: Config) -> list[str]:
        return list(cfg.experiment.deep_models)

    def stages(self, cfg: Config, run_dir: Path) -> list:
        return run_stages(cfg, Path(run_dir))

    def run(self, cfg: Config, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
            cases: pd.DataFrame | None = None) -> RunResult:
        return run_ultrasound(cfg, run_dir, resume=resume, progress=progress, cases=cases)


ULTRASOUND = UltrasoundTask()

