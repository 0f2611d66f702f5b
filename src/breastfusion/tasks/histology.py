"""The histology task (``task: histology``), Nottingham grading from H&E stacks: cases + tiles → splits → pathomics → classical ML → multiscale deep models
(and ablations) → per-case pooling → metrics (QWK), per-centre tables, attention figures → report → bundle.

It reuses the ultrasound machinery: the cases table and splits (patient-grouped stratified folds or
leave-one-centre-out), the shared trainer (two stages, early stopping on an inner patient-grouped validation
split, resume, DDP under torchrun), the classical estimators, ``evaluate`` and the report, and the bundle format.

Stack → case pooling is the **mean of the stacks' class probabilities**. Why not attention pooling: a grade is a
property of the whole tumour and the label is the same for every region of the case, so a learned attention
over regions has to be fitted from a few dozen or hundred cases and mostly learns which region happened to
separate the training cases; the mean is permutation-invariant, independent of how many stacks a case has,
needs no parameters and degrades gracefully when stacks are dropped. Which regions drove a prediction is still
visible: the per-stack probabilities and attention weights are saved (``stacks_<model>.csv``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from breastfusion import distributed as dist_utils
from breastfusion.config import Config, config_to_yaml
from breastfusion.data.cases import (
    CASE_ID,
    CENTER,
    LABEL,
    PATIENT_ID,
    read_cases,
    write_cases,
)
from breastfusion.data.predictions import prediction_table
from breastfusion.data.tiles import STACK_ID, read_tiles, stack_table
from breastfusion.errors import ConfigError, DataError
from breastfusion.evaluation.plots import attention_figure
from breastfusion.evaluation.sites import per_center_table
from breastfusion.tasks.base import BundlePlan, Run, stage_splits, write_csv
from breastfusion.training.stacks import (
    StackDataset,
    TileCache,
    _stack_paths,
    build_backbones,
    fit_grader,
    grader_meta,
    make_grader,
    pool_cases,
    score_stacks,
    variant_spec,
)
from breastfusion.utils import (
    atomic_path,
    seed_everything,
    stable_seed,
    write_json,
)

log = logging.getLogger(__name__)

VARIANT_DESCRIPTIONS = {
    "multiscale": "CNN + ViT at every magnification, cross-scale attention, pathomics fused",
    "cnn": "ablation: CNN only (every magnification, cross-scale attention, pathomics)",
    "vit": "ablation: ViT only (every magnification, cross-scale attention, pathomics)",
    "single_scale": "ablation: highest magnification only (CNN + ViT, self-attention, pathomics)",
    "no_pathomics": "ablation: CNN + ViT at every magnification without the pathomics vector",
}


def stage_pathomics(tiles: pd.DataFrame, cfg: Config, run_dir: Path, resume: bool, progress: bool) -> pd.DataFrame | None:
    """Case-level pathomics from the highest-magnification tiles (Dask when histology.workers > 1)."""
    if not cfg.histology.pathomics:
        return None
    from breastfusion.features.pathomics_extract import (
        case_pathomics,
        extract_tile_pathomics,
    )

    path = run_dir / "features" / "case_pathomics.parquet"
    if resume and path.exists():
        return pd.read_parquet(path)
    hc = cfg.histology
    tile_feats = extract_tile_pathomics(tiles, run_dir / "features" / "pathomics", magnification=max(hc.magnifications),
                                       method=hc.pathomics_method, model_path=hc.nuclei_model,
                                       n_workers=hc.workers, scheduler=hc.scheduler, progress=progress)
    feats = case_pathomics(tile_feats)
    feats.index = feats.index.astype(str)
    with atomic_path(path) as tmp:
        feats.to_parquet(tmp)
    return feats


def stage_deep_embeddings(stacks: pd.DataFrame, cfg: Config, run_dir: Path, resume: bool, cache,
                          progress: bool) -> pd.DataFrame:
    """Case-level means of the frozen (ImageNet or random, see the weight sources) backbone embeddings per
    magnification: label-free, so computing them once on all cases leaks nothing; the classical models select
    among them inside each fold."""
    from breastfusion.training.trainer import backbone_features

    path = run_dir / "features" / "deep_embeddings.parquet"
    if resume and path.exists():
        return pd.read_parquet(path)
    backbones, mags, _ = variant_spec("multiscale", cfg)
    seed_everything(stable_seed(cfg.seed, "frozen_embeddings"))  # random weights (no hub) repeat on resume
    modules, norms, _ = build_backbones(backbones, cfg, cache.size)
    model = make_grader([0, 1], backbones, modules, norms, mags, 0, cfg, cache.size)
    ds = StackDataset(_stack_paths(stacks, mags), None, None, cache=cache)
    feats = backbone_features(model, ds, batch_size=cfg.train.batch_size, device=torch.device("cpu"),
                              channels_last=False, progress=progress, desc="frozen embeddings").cpu().numpy()
    n, t = len(stacks), cfg.histology.token_grid ** 2
    feats = feats.reshape(n, len(mags), -1)
    cols, blocks, start = [], [], 0
    for key, mod in modules.items():
        c = mod.num_features
        blk = feats[:, :, start:start + t * c].reshape(n, len(mags), t, c).mean(2)  # mean over tokens
        start += t * c
        for si, m in enumerate(mags):
            blocks.append(blk[:, si])
            cols += [f"deep_{key}_{m:g}x_{i}" for i in range(c)]
    df = pd.DataFrame(np.concatenate(blocks, 1), columns=cols)
    df[CASE_ID] = stacks[CASE_ID].astype(str).to_numpy()
    out = df.groupby(CASE_ID).mean()
    if dist_utils.is_main():
        with atomic_path(path) as tmp:
            out.to_parquet(tmp)
    return out


def stage_classical(cases, table, deep, splits, classes, cfg: Config, run_dir: Path, resume: bool) -> dict:
    from breastfusion.models.classical import fit_predict_oof
    from breastfusion.tabular_inputs import classical_matrix

    out = {}
    if not cfg.experiment.classical_models:
        return out
    sets = {}
    if table is not None and table.shape[1]:
        sets[""] = classical_matrix(table, cfg.data)
    if deep is not None:
        base = sets.get("")
        sets["+deep"] = deep.reindex(cases[CASE_ID]) if base is None else base.join(deep, how="left")
    y = cases.set_index(CASE_ID)[LABEL]
    select = None if cfg.histology.feature_selection == "none" else cfg.histology.feature_selection
    for suffix, X in sets.items():
        for name in cfg.experiment.classical_models:
            key = f"{name}{suffix}"
            path = run_dir / "predictions" / f"{key}.csv"
            if resume and path.exists():
                out[key] = pd.read_csv(path, dtype={CASE_ID: str})
                continue
            t = time.perf_counter()
            preds = fit_predict_oof(X, y.reindex(X.index), splits, name, classes, seed=cfg.seed, select=select)
            preds["model"] = key
            log.info("classical %s: %.1f s", key, time.perf_counter() - t)
            out[key] = preds
            write_csv(preds, path)
    return out


def stage_grader_cv(variant: str, cases, stacks, table, splits, classes, cfg: Config, run_dir: Path, resume: bool,
                    progress: bool, cache) -> pd.DataFrame:
    name = f"deep_{variant}"
    path = run_dir / "predictions" / f"{name}.csv"
    if resume and path.exists():
        return pd.read_csv(path, dtype={CASE_ID: str})
    fold_of = splits.set_index(CASE_ID)["fold"].reindex(cases[CASE_ID]).to_numpy()
    parts, stack_parts = [], []
    for fold in sorted(pd.unique(fold_of)):
        fold_dir = run_dir / "deep" / name / f"fold{int(fold)}"
        fold_path = fold_dir / "predictions.csv"
        stack_path = fold_dir / "stacks.csv"
        if resume and fold_path.exists() and stack_path.exists():
            parts.append(pd.read_csv(fold_path, dtype={CASE_ID: str}))
            stack_parts.append(pd.read_csv(stack_path, dtype={CASE_ID: str, STACK_ID: str}))
            continue
        test = fold_of == fold
        fitted = fit_grader(variant, cases[~test], stacks, table, classes, cfg, fold_dir, resume=resume,
                            progress=progress, cache=cache, desc=f"{name} fold {int(fold) + 1}",
                            seed=stable_seed(cfg.seed, name, int(fold)))
        test_cases = cases[test]
        st = stacks[stacks[CASE_ID].isin(set(test_cases[CASE_ID]))].reset_index(drop=True)
        probs, cross, scale_w = score_stacks(fitted, st, table, cache)
        case_p = pool_cases(st, probs, classes).reindex(test_cases[CASE_ID]).to_numpy()
        preds = prediction_table(test_cases[CASE_ID], case_p, classes, model=name, fold=int(fold),
                                 **{LABEL: test_cases[LABEL].to_numpy()})
        sp = st[[CASE_ID, STACK_ID]].copy()
        for j, c in enumerate(classes):
            sp[f"prob_{c}"] = probs[:, j]
        for si, m in enumerate(fitted.magnifications):
            sp[f"scale_weight_{m:g}x"] = scale_w[:, si]
            for sj, m2 in enumerate(fitted.magnifications):
                sp[f"attn_{m:g}x_to_{m2:g}x"] = cross[:, si, sj]
        write_csv(preds, fold_path)
        write_csv(sp, stack_path)
        if dist_utils.is_main():
            write_json(fitted.result.history, fold_dir / "history.json")
            (fold_dir / "last.pt").unlink(missing_ok=True)
        parts.append(preds)
        stack_parts.append(sp)
    preds = pd.concat(parts, ignore_index=True)
    write_csv(pd.concat(stack_parts, ignore_index=True), run_dir / "predictions" / f"stacks_{name}.csv")
    write_csv(preds, path)
    return preds


def fit_final_grader(cases, stacks, table, classes, cfg: Config, run_dir: Path, *, resume, progress, cache,
                     synthetic: bool, metrics: dict | None, clinical_cols: list[str], pathomics_cols: list[str],
                     calibration: dict | None = None, data_meta: dict | None = None) -> Path:
    from breastfusion.bundles.bundle import save_bundle

    fitted = fit_grader("multiscale", cases, stacks, table, classes, cfg, run_dir / "deep" / "final_multiscale",
                        resume=resume, progress=progress, cache=cache, desc="final multiscale",
                        seed=stable_seed(cfg.seed, "multiscale", "final"))
    hc = cfg.histology
    model_meta = grader_meta(cfg, fitted.backbones, fitted.magnifications,
                             fitted.tabular.n_features_out_ if fitted.tabular is not None else 0,
                             {k: (fitted.model.get_buffer(f"mean_{k}").flatten(),
                                  fitted.model.get_buffer(f"std_{k}").flatten()) for k in fitted.backbones},
                             cache.size)
    normalizer = getattr(cache, "normalizer", None)
    image_meta = {"size": cache.size, "range": "0-1 RGB", "pooling": hc.pooling,
                  "stain_normalization": normalizer.to_dict() if normalizer is not None else None}
    feature_meta = {"clinical_columns": clinical_cols,
                    "pathomics": {"method": hc.pathomics_method, "columns": pathomics_cols} if pathomics_cols else None}
    training = {"n_cases": int(len(cases)), "n_stacks": int(stacks[CASE_ID].isin(set(cases[CASE_ID])).sum()),
                "best_epoch": fitted.result.best_epoch, "inner_val_macro_f1": fitted.result.best_val_macro_f1,
                "seconds": round(fitted.result.seconds, 1), "weights_init": fitted.weight_sources,
                "class_counts": {c: int((cases[LABEL] == c).sum()) for c in classes}}
    path = run_dir / "bundles" / "multiscale"
    if dist_utils.is_main():
        save_bundle(path, fitted.model, classes=classes, model_meta=model_meta, image_meta=image_meta,
                    tabular=fitted.tabular, feature_meta=feature_meta, config_yaml=config_to_yaml(cfg),
                    synthetic=synthetic, training=training,
                    metrics={"cross_validation": metrics} if metrics else {}, calibration=calibration,
                    data_meta=data_meta, name=f"{cfg.name}-multiscale")
        (run_dir / "deep" / "final_multiscale" / "last.pt").unlink(missing_ok=True)
    dist_utils.barrier()
    return path


# -------------------------------------------------------------------------------------------------- run

# Settings that change no reused output of a stage (see breastfusion.run_state): what the report shows, display
# names, and the list of variants (each variant's outputs are checked on their own).
_NOT_DEEP = ("data.no_lesion_labels", "data.column_info", "histology.variants", "histology.feature_selection",
             "histology.deep_features_for_classical", "histology.ordinal_metrics")
_EMBEDDING_KEYS = ("seed", "image", "histology.backbones", "histology.magnifications", "histology.pretrained",
                   "histology.token_grid", "histology.stain_normalization", "histology.stain_target")


def grading_stages(cfg: Config, run_dir: Path) -> list:
    """The stages of a grading run whose outputs ``resume`` reuses, and whether they exist in ``run_dir``."""
    from breastfusion.run_state import Stage

    def any_of(*paths: Path) -> bool:
        return any(p.exists() for p in paths)

    feats = run_dir / "features"
    names = [f"{n}{s}" for n in cfg.experiment.classical_models for s in ("", "+deep")]
    stages = [
        Stage("splits", "splits.csv", ("seed", "cv"), (run_dir / "splits.csv").exists()),
        Stage("pathomics", "features/case_pathomics.parquet",
              ("histology.pathomics", "histology.pathomics_method", "histology.nuclei_model", "histology.magnifications"),
              (feats / "case_pathomics.parquet").exists()),
        Stage("embeddings", "features/deep_embeddings.parquet", _EMBEDDING_KEYS,
              (feats / "deep_embeddings.parquet").exists()),
        Stage("classical", "classical models (predictions/)", ("seed", "cv", "data", "histology", *_EMBEDDING_KEYS),
              any_of(*(run_dir / "predictions" / f"{n}.csv" for n in names)),
              exclude=("data.no_lesion_labels", "data.column_info", "histology.variants", "histology.ordinal_metrics")),
    ]
    deep = ("seed", "cv", "data", "image", "model", "train", "histology")
    for variant in cfg.histology.variants:
        name = f"deep_{variant}"
        stages.append(Stage(f"deep:{name}", f"deep/{name}", deep,
                            any_of(run_dir / "deep" / name, run_dir / "predictions" / f"{name}.csv"), exclude=_NOT_DEEP))
    if cfg.histology.variants and cfg.experiment.final_models:
        stages.append(Stage("bundle:multiscale", "bundles/multiscale",
                            (*deep, "name", "experiment.n_boot", "experiment.conformal_method",
                             "experiment.conformal_alpha", "experiment.conformal_class_conditional", "data.column_info"),
                            any_of(run_dir / "bundles" / "multiscale" / "bundle.json",
                                   run_dir / "deep" / "final_multiscale" / "last.pt"),
                            exclude=("data.no_lesion_labels",) + _NOT_DEEP[2:]))
    return stages



def build_weight_note(variant: str, cfg: Config) -> dict[str, str]:
    from breastfusion.models.pretrained import has_offline_weights, hub_reachable

    backbones, _, _ = variant_spec(variant, cfg)
    out = {}
    for key, name in backbones.items():
        if cfg.histology.pretrained == "none":
            out[name] = "random (pretrained: none)"
        elif has_offline_weights(name):
            out[name] = "ImageNet (offline package or hub)"
        else:
            out[name] = "ImageNet from the hub" if hub_reachable(1.0) else "random: hub unreachable here"
    return out


class HistologyTask:
    """Nottingham grade from concentric multi-magnification H&E stacks, pathomics and clinical columns.

    Stack → case pooling is the mean of the stacks' class probabilities (see the module docstring). Under torchrun
    the main rank decodes, extracts and fits the classical models first; the other ranks then reuse its files."""

    name = "histology"
    description = "H&E stacks at several magnifications + pathomics + clinical columns: Nottingham grade 1 / 2 / 3"
    inputs = ("tiles (stacks of magnifications)", "pathomics (computed)", "clinical columns")
    network_kinds = ("multiscale",)
    serves = False
    group_column = PATIENT_ID

    def check(self, cfg: Config) -> None:
        from breastfusion.training.trainer import check_epochs

        if cfg.histology.variants:
            check_epochs(cfg.train)  # before the pathomics and classical models, not after

    def variants(self, cfg: Config) -> list[str]:
        return list(cfg.histology.variants)

    def stages(self, cfg: Config, run_dir: Path) -> list:
        return grading_stages(cfg, Path(run_dir))

    def load(self, run: Run, cases: pd.DataFrame | None = None, tiles: pd.DataFrame | None = None) -> None:
        cfg, hc = run.cfg, run.cfg.histology
        if cases is None:
            if not cfg.data.source:
                raise DataError("No cases table: set data.source to the histology cases table (CSV/Parquet).")
            cases = read_cases(cfg.data.source, require_images=False)
        if tiles is None:
            if not hc.tiles:
                raise DataError("No tiles table: set histology.tiles (columns case_id, stack_id, magnification, "
                                "image_path).")
            tiles = read_tiles(hc.tiles, cases)
        run.cases, run.state["tiles"] = cases, tiles

    def check_inputs(self, run: Run) -> None:
        tiles = run.state["tiles"]
        run.state["tiles"] = tiles[tiles[CASE_ID].isin(set(run.cases[CASE_ID]))]  # after data.drop_labels
        if run.cfg.data.roles.reader_score:  # said, not silently ignored
            log.warning("data.roles.reader_score is set, but the comparison with a reader and the leakage guard run "
                        "for ultrasound tasks only for now; %s is kept out of the inputs.",
                        run.cfg.data.roles.reader_score)

    def digests(self, run: Run) -> dict[str, str]:
        from breastfusion.run_state import table_digest

        return {"cases": table_digest(run.cases), "tiles": table_digest(run.state["tiles"])}

    def prepare(self, run: Run) -> None:
        cfg, hc = run.cfg, run.cfg.histology
        normalizer = None
        if hc.stain_normalization != "none":
            from breastfusion.data.stain import StainNormalizer

            if not hc.stain_target:
                raise ConfigError("histology.stain_normalization needs histology.stain_target (an H&E image).")
            normalizer = StainNormalizer(hc.stain_normalization, target=hc.stain_target)
        cache = run.state["cache"] = TileCache(cfg.image.size, normalizer)
        stacks = stack_table(run.state["tiles"], hc.magnifications)
        with dist_utils.main_first():
            r = run.resume or not run.main
            t = time.perf_counter()
            ok = cache.usable(_stack_paths(stacks, hc.magnifications))
            if (~ok).any():
                log.warning("%d stack(s) dropped: unreadable tiles (see the warnings above)", int((~ok).sum()))
            stacks = run.state["stacks"] = stacks[ok].reset_index(drop=True)
            no_stack = ~run.cases[CASE_ID].isin(set(stacks[CASE_ID]))
            if no_stack.any():
                log.warning("%d case(s) have no usable stack and are left out: %s", int(no_stack.sum()),
                            ", ".join(run.cases.loc[no_stack, CASE_ID].head(5)))
                run.cases = run.cases[~no_stack].reset_index(drop=True)
            run.timings["decode_s"] = time.perf_counter() - t
            if run.main:
                write_cases(run.cases, run.dir / "cases.csv")
            run.splits = stage_splits(run.cases, None, cfg, run.dir, r)

    def features(self, run: Run) -> None:
        from breastfusion.data.roles import resolve_roles
        from breastfusion.tabular_inputs import tabular_table

        cfg, hc, tiles = run.cfg, run.cfg.histology, run.state["tiles"]
        with dist_utils.main_first():
            r = run.resume or not run.main
            t = time.perf_counter()
            pathomics = stage_pathomics(tiles[tiles[CASE_ID].isin(set(run.cases[CASE_ID]))], cfg, run.dir, r,
                                        run.progress)
            run.timings["pathomics_s"] = time.perf_counter() - t
            deep_emb = None
            if cfg.experiment.classical_models and hc.deep_features_for_classical:
                t = time.perf_counter()
                deep_emb = stage_deep_embeddings(run.state["stacks"], cfg, run.dir, r, run.state["cache"],
                                                 run.progress)
                run.timings["embeddings_s"] = time.perf_counter() - t
        columns = resolve_roles(run.cases, cfg.data).inputs  # excluded / reader columns never become inputs
        table = tabular_table(run.cases, columns, pathomics)
        run.table = None if table.shape[1] == 0 else table
        run.state.update(pathomics=pathomics, deep_embeddings=deep_emb, columns=columns)

    def classical(self, run: Run) -> dict[str, pd.DataFrame]:
        with dist_utils.main_first():
            r = run.resume or not run.main
            return stage_classical(run.cases, run.table, run.state["deep_embeddings"], run.splits, run.classes,
                                   run.cfg, run.dir, r)

    def deep_cv(self, run: Run, variant: str) -> tuple[str, pd.DataFrame | None]:
        return f"deep_{variant}", stage_grader_cv(variant, run.cases, run.state["stacks"], run.table, run.splits,
                                                  run.classes, run.cfg, run.dir, run.resume, run.progress,
                                                  run.state["cache"])

    def ordinal(self, cfg: Config) -> bool:
        return cfg.histology.ordinal_metrics

    def result_notes(self, run: Run, name: str) -> dict:
        if name.startswith("deep_"):
            return {"description": VARIANT_DESCRIPTIONS.get(name.removeprefix("deep_"))}
        return {}

    def bundle_plan(self, run: Run) -> list[BundlePlan]:
        if run.cfg.histology.variants and run.cfg.experiment.final_models:
            return [BundlePlan("multiscale", "deep_multiscale", "multiscale")]
        return []

    def fit_bundle(self, run: Run, plan: BundlePlan, calibration: dict | None) -> Path:
        cfg, hc, pathomics = run.cfg, run.cfg.histology, run.state["pathomics"]
        return fit_final_grader(run.cases, run.state["stacks"], run.table, run.classes, cfg, run.dir,
                                resume=run.resume, progress=run.progress, calibration=calibration,
                                data_meta={"splits": f"{cfg.cv.strategy}, seed {cfg.seed}, patients kept together",
                                           "stacks": int(len(run.state["stacks"])),
                                           "magnifications": [float(m) for m in hc.magnifications]},
                                cache=run.state["cache"], synthetic=run.synthetic,
                                metrics=run.metrics.get(plan.name), clinical_cols=run.state["columns"],
                                pathomics_cols=list(pathomics.columns) if pathomics is not None else [])

    def explain_inputs(self, run: Run) -> dict:
        background = run.table.reset_index() if run.table is not None else None
        return {"source": run.state["tiles"], "cases": run.cases, "background": background, "max_stacks": 1}

    def sections(self, run: Run) -> tuple[list, list]:
        centres = per_center_table(run.results, run.cases, run.classes, run.cfg.histology.ordinal_metrics)
        write_csv(centres, run.dir / "per_centre_metrics.csv")
        run.state["centres"] = centres
        run.extra_metrics["per_centre"] = centres.to_dict(orient="records")
        return [], []

    def notes(self, run: Run) -> list[str]:
        cfg, hc, notes = run.cfg, run.cfg.histology, []
        if run.synthetic:
            notes.append("Every case in this run is SYNTHETIC procedural tissue: the numbers show the software "
                         "works, not how a model grades patients.")
        notes.append(f"Splits: {cfg.cv.strategy}, seed {cfg.seed}; a patient never spans two folds. "
                     + ("Each fold holds out one centre: the per-centre table is external validation. "
                        if cfg.cv.strategy == "leave_one_center_out" else "")
                     + "Deep models stop early on an inner patient-grouped validation split of the training folds. "
                     "Case prediction = mean of its stacks' probabilities. CIs: cluster bootstrap over patients.")
        if hc.feature_selection != "none" and cfg.experiment.classical_models:
            notes.append("Classical models select features (LASSO) inside each training fold; '+deep' models add "
                         "case-mean frozen-backbone embeddings per magnification to pathomics and clinical features.")
        return notes

    def summary(self, run: Run) -> dict:
        cfg, hc, cases = run.cfg, run.cfg.histology, run.cases
        weights = {}
        for v in hc.variants:
            weights.update(build_weight_note(v, cfg))
        return {
            "cases": len(cases), "stacks": len(run.state["stacks"]),
            "magnifications": [f"{m:g}x" for m in hc.magnifications],
            "classes": {c: int((cases[LABEL] == c).sum()) for c in run.classes},
            "patients": int(cases[PATIENT_ID].nunique()), "centres": sorted(cases[CENTER].unique().tolist()),
            "backbone weights": weights, "per-centre metrics": run.state["centres"],
            "timings (s)": {k: round(v, 1) for k, v in run.timings.items()},
        }

    def figures(self, run: Run) -> dict:
        figures = {}
        for variant in run.cfg.histology.variants:
            f = attention_figure(run.dir / "predictions" / f"stacks_deep_{variant}.csv", run.cases,
                                 run.dir / "report" / "figures" / f"attention_{variant}.png",
                                 f"deep_{variant}: out-of-fold test stacks")
            if f is not None:
                figures[f"Cross-scale attention and scale weights: deep_{variant}"] = f
        return figures

    def report_title(self, cfg: Config) -> str:
        return f"breastfusion grading — {cfg.name}"


HISTOLOGY = HistologyTask()
