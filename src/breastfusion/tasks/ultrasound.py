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

from breastfusion.config import Config
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
from breastfusion.run_state import table_digest
from breastfusion.tasks.base import BundlePlan, Run, stage_splits, write_csv
from breastfusion.utils import (
    atomic_path,
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




class UltrasoundTask:
    """Breast ultrasound image + clinical columns + lesion radiomics (mask expert, predicted or none)."""

    name = "ultrasound"
    description = "breast ultrasound + clinical history + biomarkers (+ lesion radiomics): benign / malignant / normal"
    inputs = ("image", "mask or bbox", "clinical columns")
    network_kinds = ("fusion",)
    serves = True
    group_column = "dup_group"  # near-duplicate groups (patients within them) are resampled together

    def check(self, cfg: Config) -> None:
        from breastfusion.training.trainer import check_epochs

        for variant in dict.fromkeys([*cfg.experiment.deep_models, *cfg.experiment.final_models]):
            check_epochs(cfg.train, uses_image=variant != "tabular")

    def variants(self, cfg: Config) -> list[str]:
        return list(cfg.experiment.deep_models)

    def stages(self, cfg: Config, run_dir: Path) -> list:
        return run_stages(cfg, Path(run_dir))

    def load(self, run: Run, cases: pd.DataFrame | None = None) -> None:
        cfg = run.cfg
        run.state["table_rows"] = cases is not None or (isinstance(cfg.data.source, str)
                                                        and not Path(cfg.data.source).is_dir())
        if cases is None:
            if not cfg.data.source:
                raise DataError("No data source: set data.source (a cases table or a BUSI-style folder).")
            cases = import_sources(cfg.data.source, importer=cfg.data.importer)
        run.cases = cases

    def check_inputs(self, run: Run) -> None:
        from breastfusion.data.roles import resolve_roles

        cfg = run.cfg
        run.state["roles"] = resolve_roles(run.cases, cfg.data)  # a role naming a wrong column fails here
        if cfg.data.roles.reader_score:  # a reader score its order cannot place fails before any training
            from breastfusion.evaluation.reader import check_reader_column

            check_reader_column(run.cases, cfg.data.roles.reader_score, cfg.data.roles.reader_score_order,
                                missing_values=cfg.data.missing_values, positive=cfg.data.roles.reader_positive,
                                classes=run.classes)

    def digests(self, run: Run) -> dict[str, str]:
        return {"cases": table_digest(run.cases)}

    def prepare(self, run: Run) -> None:
        from breastfusion.data.leakage import run_leakage_guard

        cfg, roles = run.cfg, run.state["roles"]
        t = time.perf_counter()
        groups, run.state["audit"] = stage_audit(run.cases, cfg, run.dir, run.resume, run.progress,
                                                 table_rows=run.state["table_rows"], input_columns=roles.inputs)
        run.timings["audit_s"] = time.perf_counter() - t
        run.cases = run.cases.assign(dup_group=groups.to_numpy())
        write_cases(run.cases, run.dir / "cases.csv")
        run.splits = stage_splits(run.cases, run.cases.set_index(CASE_ID)["dup_group"], cfg, run.dir, run.resume)
        # before any model trains: an input column that alone predicts the label stops the run (data/leakage.py)
        run.state["leakage"] = run_leakage_guard(run.cases, roles.inputs, run.splits, run.classes, cfg.data,
                                                 run.dir, seed=cfg.seed)

    def features(self, run: Run) -> None:
        from breastfusion.tabular_inputs import tabular_table

        cfg = run.cfg
        segmenter, seg_summary, mask_cases = None, None, run.cases
        if cfg.data.masks == "predicted" and cfg.data.radiomics:
            t = time.perf_counter()
            mask_cases, segmenter, seg_summary = stage_segmentation(run.cases, run.splits, run.classes, cfg, run.dir,
                                                                    run.resume, run.progress)
            run.timings["segmentation_s"] = time.perf_counter() - t
        t = time.perf_counter()
        radiomics = None if cfg.data.masks == "none" else stage_radiomics(mask_cases, cfg, run.dir, run.progress)
        run.timings["radiomics_s"] = time.perf_counter() - t
        run.state.update(segmenter=segmenter, segmentation=seg_summary, radiomics=radiomics,
                         expert_mask=radiomics is not None and cfg.data.masks == "expert")
        table = tabular_table(run.cases, run.state["roles"].inputs, radiomics)
        run.table = None if table.shape[1] == 0 else table

    def classical(self, run: Run) -> dict[str, pd.DataFrame]:
        preds, files, feats, reading = stage_classical(run.table, run.cases, run.splits, run.classes, run.cfg,
                                                       run.dir, run.resume)
        run.state["classical"] = {"files": files, "features": feats, "reading": reading}
        return preds

    def deep_cv(self, run: Run, variant: str) -> tuple[str, pd.DataFrame | None]:
        from breastfusion.training.data import image_cache_for

        name = DEEP_NAMES[variant]
        if variant in ("fusion", "tabular") and run.table is None:
            log.warning("skipping the %s model: the cases have no tabular data (no clinical columns, no masks)",
                        variant)
            return name, None
        if "cache" not in run.state:  # resized (and, with image.clean, cleaned) images, shared by every model
            run.state["cache"] = image_cache_for(run.cfg)
        return name, stage_deep(variant, run.cases, run.table, run.splits, run.classes, run.cfg, run.dir,
                                run.resume, run.progress, run.state["cache"])

    def ordinal(self, cfg: Config) -> bool:
        return False

    def result_notes(self, run: Run, name: str) -> dict:
        # every model but the image-only network reads the tabular table, radiomics included
        return {"expert_mask": run.state["expert_mask"] and name != DEEP_NAMES["image"]}

    def bundle_plan(self, run: Run) -> list[BundlePlan]:
        # a fusion or tabular bundle falls back to image-only when the cases have no tabular data
        variants = dict.fromkeys(v if run.table is not None else "image" for v in run.cfg.experiment.final_models)
        return [BundlePlan(v, DEEP_NAMES[v], DEEP_NAMES[v]) for v in variants]

    def fit_bundle(self, run: Run, plan: BundlePlan, calibration: dict | None) -> Path:
        from breastfusion.training.data import image_cache_for
        from breastfusion.training.fit import fit_final_bundle

        cfg, classical = run.cfg, run.state["classical"]
        if "cache" not in run.state:
            run.state["cache"] = image_cache_for(cfg)
        return fit_final_bundle(plan.variant, run.cases, run.table, run.classes, cfg, run.dir, resume=run.resume,
                                progress=run.progress, cache=run.state["cache"], synthetic=run.synthetic,
                                metrics=run.metrics.get(plan.name), radiomics_used=run.state["radiomics"] is not None,
                                clinical_cols=run.state["roles"].inputs,
                                classical={**classical,
                                           "metrics": {k: run.metrics[k] for k in classical["files"]}},
                                calibration=calibration, segmenter=run.state["segmenter"],
                                segmentation_summary=run.state["segmentation"],
                                data_meta={"audit": run.state["audit"],
                                           "splits": f"{cfg.cv.strategy}, {cfg.cv.n_splits} folds, seed {cfg.seed}, "
                                                     "patients and near-duplicate groups kept together"})

    def explain_inputs(self, run: Run) -> dict:
        background = run.table.reset_index() if run.table is not None else None
        return {"source": run.cases, "cases": None, "background": background, "max_stacks": 1}

    def sections(self, run: Run) -> tuple[list, list]:
        from breastfusion.evaluation.roles import roles_section
        from breastfusion.evaluation.insight import failed_section

        cfg, first, last = run.cfg, [], []
        if run.cases["center"].nunique() > 1:  # several centres: the figures per centre open the report
            from breastfusion.evaluation.sites import cross_site_section

            try:
                sec = cross_site_section(run.results, run.cases, run.classes, strategy=cfg.cv.strategy,
                                         n_boot=min(cfg.experiment.n_boot, 500), seed=cfg.seed,
                                         expert_mask={n: r["expert_mask"] for n, r in run.results.items()})
                if sec is not None:
                    write_json(sec.data, run.dir / "cross_site.json")
                    first.append(sec)
            except Exception as exc:  # noqa: BLE001 - a report section never loses the run
                first.append(failed_section("across-sites", "Across sites", exc))
        if run.state["segmentation"] is not None:
            try:
                first.append(segmentation_section(run.state["segmentation"], run.dir / "segmentation" / "cv"))
            except Exception as exc:  # noqa: BLE001 - a report section never loses the run
                first.append(failed_section("segmentation", "Lesion segmentation", exc))
        try:
            first.append(roles_section(run.cases, run.state["roles"], cfg.data, run.state["leakage"]))
        except Exception as exc:  # noqa: BLE001 - a report section never loses the run
            first.append(failed_section("column-roles", "Column roles", exc))
        if cfg.data.roles.reader_score:  # every model vs the radiologist on the same out-of-fold cases
            from breastfusion.evaluation.reader import run_reader_comparison

            last.append(run_reader_comparison(run.results, run.cases, cfg, run.dir))
        return first, last

    def notes(self, run: Run) -> list[str]:
        from breastfusion.features.radiomics import EXPERT_MASK_NOTE

        cfg, notes = run.cfg, []
        if run.synthetic:
            notes.append("Every case in this run comes from the built-in SYNTHETIC phantom cohort: the numbers show "
                         "the software works, not how a model performs on patients.")
        if run.state["expert_mask"]:
            notes.append(EXPERT_MASK_NOTE)
        elif run.state["radiomics"] is not None and run.state["segmentation"] is not None:
            from breastfusion.segmentation.metrics import format_summary

            notes.append("Radiomics come from PREDICTED lesion masks: out-of-fold masks of a segmenter trained on "
                         "the expert outlines of the other folds, so no figure here needs the radiologist's outline "
                         "at prediction; the bundle carries the segmenter. Out-of-fold segmentation quality against "
                         f"the expert: {format_summary(run.state['segmentation']) or 'not available'}.")
        reader_path = run.dir / "reader_comparison.json"
        if cfg.data.roles.reader_score and reader_path.exists():  # the radiologist belongs in the summary too
            from breastfusion.evaluation.reader import summary_note

            notes.append(summary_note(json.loads(reader_path.read_text())))
        notes.append(f"Splits: {cfg.cv.strategy}, {cfg.cv.n_splits} folds, seed {cfg.seed}; a patient and a "
                     "near-duplicate group always stay on one side. Confidence intervals: percentile bootstrap "
                     f"({cfg.experiment.n_boot} resamples) over near-duplicate groups. Deep models stop early on an "
                     "inner validation split of the training folds, never on the test fold.")
        return notes

    def summary(self, run: Run) -> dict:
        cases, radiomics = run.cases, run.state["radiomics"]
        return {
            "cases": len(cases), "classes": {c: int((cases[LABEL] == c).sum()) for c in run.classes},
            "patients": int(cases[PATIENT_ID].nunique()), "centres": sorted(cases["center"].unique().tolist()),
            "tabular columns": (0 if run.table is None else run.table.shape[1]),
            "clinical columns": len(run.state["roles"].inputs),
            "radiomics": ("not used" if radiomics is None else "from the expert's lesion masks"
                          if run.state["expert_mask"] else "from predicted lesion masks (out-of-fold segmenter)"),
            "set aside (data.drop_labels)": run.dropped, "audit": run.state["audit"],
            "timings (s)": {k: round(v, 1) for k, v in run.timings.items()},
        }

    def figures(self, run: Run) -> dict:
        return {}

    def report_title(self, cfg: Config) -> str:
        return f"breastfusion — {cfg.name}"


ULTRASOUND = UltrasoundTask()
