"""Fit one deep model on a set of cases, score cases with it, and build the final bundle (with the record of its
training data that `validate` compares a new site with)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from breastfusion.config import Config, config_to_yaml
from breastfusion.data.cases import CASE_ID, IMAGE_PATH, LABEL
from breastfusion.data.fingerprint import (
    FINGERPRINT_VERSION,
    file_hash,
    fit_embedding_reference,
    image_statistics,
    intensity,
    tabular_profile,
)
from breastfusion.data.images import image_size, resize_u8
from breastfusion.features.tabular import TabularPreprocessor
from breastfusion.models.fusion import FusionClassifier
from breastfusion.models.registry import build_network
from breastfusion.training.data import (
    CasesDataset,
    ImageCache,
    augment_for,
    load_resized,
)
from breastfusion.training.trainer import TrainResult, predict_proba, train_model
from breastfusion.utils import seed_everything, stable_seed

log = logging.getLogger(__name__)


@dataclass
class FittedModel:
    variant: str
    model: FusionClassifier
    tabular: TabularPreprocessor | None
    data_cfg: dict
    result: TrainResult
    weight_source: str


def inner_validation_split(labels: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: stratified, group-aware where groups are given."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    n_splits = max(2, int(round(1.0 / fraction)))
    counts = np.bincount(labels)
    n_splits = int(min(n_splits, max(2, counts[counts > 0].min())))
    idx = np.arange(len(labels))
    if groups is not None:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        _, val = next(splitter.split(idx, labels, groups))
    else:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        _, val = next(splitter.split(idx, labels))
    mask = np.zeros(len(labels), dtype=bool)
    mask[val] = True
    return mask


def _tab_matrix(pre: TabularPreprocessor | None, table: pd.DataFrame | None, cases: pd.DataFrame) -> np.ndarray | None:
    if pre is None:
        return None
    rows = table.reindex(cases[CASE_ID].astype(str).tolist())
    return pre.transform(rows, row_ids=rows.index.tolist(), source="tabular data")


def _missing_row(pre: TabularPreprocessor) -> np.ndarray:
    return pre.transform(pd.DataFrame(index=[0]))[0]


def model_meta(variant: str, cfg: Config, n_tabular: int) -> dict:
    m = cfg.model
    return {"variant": variant, "backbone": m.backbone if variant != "tabular" else None, "n_tabular": n_tabular,
            "image_dim": m.image_dim, "tabular_dim": m.tabular_dim, "tabular_hidden": m.tabular_hidden,
            "fusion_hidden": m.fusion_hidden, "dropout": m.dropout}


def fit_deep_model(variant: str, cases: pd.DataFrame, table: pd.DataFrame | None, classes: list[str], cfg: Config,
                   out_dir: Path, *, groups: np.ndarray | None = None, resume: bool = False, progress: bool = True,
                   cache: ImageCache | None = None, desc: str = "train", seed: int | None = None) -> FittedModel:
    """Fit one network. ``seed`` (default ``cfg.seed``) drives everything random here: the initial weights, the
    inner validation split, augmentation and batch order. Callers pass ``stable_seed(cfg.seed, model, fold)`` so
    that a fold's result never depends on which folds ran before it in this process (resume between folds)."""
    from breastfusion.models.pretrained import backbone_data_config, create_backbone
    from breastfusion.training.trainer import check_epochs

    seed = cfg.seed if seed is None else int(seed)
    check_epochs(cfg.train, uses_image=variant != "tabular")
    seed_everything(seed)  # the network's initial weights come from the global generators
    y = cases[LABEL].map({c: i for i, c in enumerate(classes)}).to_numpy()
    if np.isnan(y.astype(float)).any():
        raise ValueError("training cases carry labels outside the class list")
    y = y.astype(int)
    val = inner_validation_split(y, groups, cfg.train.val_fraction, seed)
    tr_cases, va_cases = cases[~val].reset_index(drop=True), cases[val].reset_index(drop=True)

    pre = None
    if variant in ("fusion", "tabular"):
        cols = list(table.columns)
        pre = TabularPreprocessor.for_config(cfg.data)
        pre.fit(table.reindex(tr_cases[CASE_ID].astype(str).tolist()), cols, vocabulary=table)
    backbone, source = None, "none"
    data_cfg = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}
    if variant in ("fusion", "image"):
        backbone, ws = create_backbone(cfg.model.backbone, pretrained=cfg.model.pretrained,
                                       weights_path=cfg.model.weights_path)
        source = f"{ws.kind}: {ws.detail}"
        data_cfg = backbone_data_config(backbone)
    n_tab = pre.n_features_out_ if pre is not None else 0
    model = build_network({"classes": list(classes), "model": model_meta(variant, cfg, n_tab)}, modules=backbone)
    uses_image = variant != "tabular"
    common = dict(size=cfg.image.size, mean=data_cfg["mean"], std=data_cfg["std"], cache=cache, clean=cfg.image.clean)
    train_ds = CasesDataset(tr_cases[IMAGE_PATH].tolist() if uses_image else None, _tab_matrix(pre, table, tr_cases),
                            y[~val], augment=augment_for(cfg, seed, uses_image),
                            tabular_dropout=cfg.model.tabular_dropout if variant == "fusion" else 0.0,
                            tabular_missing_row=_missing_row(pre) if pre is not None else None, seed=seed, **common)
    val_ds = CasesDataset(va_cases[IMAGE_PATH].tolist() if uses_image else None, _tab_matrix(pre, table, va_cases),
                          y[val], **common)
    result = train_model(model, train_ds, val_ds, cfg.train, n_classes=len(classes), train_labels=y[~val],
                         ckpt_dir=out_dir, resume=resume, seed=seed, desc=desc, progress=progress)
    return FittedModel(variant=variant, model=model, tabular=pre, data_cfg=data_cfg, result=result, weight_source=source)


def score_cases(fitted: FittedModel, cases: pd.DataFrame, table: pd.DataFrame | None, cfg: Config,
                cache: ImageCache | None = None) -> np.ndarray:
    uses_image = fitted.variant != "tabular"
    ds = CasesDataset(cases[IMAGE_PATH].tolist() if uses_image else None, _tab_matrix(fitted.tabular, table, cases),
                      None, size=cfg.image.size, mean=fitted.data_cfg["mean"], std=fitted.data_cfg["std"], cache=cache,
                      clean=cfg.image.clean)
    return predict_proba(fitted.model, ds, batch_size=cfg.train.batch_size * 2,
                         channels_last=cfg.train.channels_last and uses_image, amp=cfg.train.amp)


# -- the training-data record (breastfusion.data.fingerprint) ---------------------------------------------------

def _image_embeddings(fitted: FittedModel, cases: pd.DataFrame, table, cfg: Config, cache) -> np.ndarray:
    """The final network's image embedding (image encoder output) of every case, in case order."""
    import torch

    chunks: list[np.ndarray] = []
    hook = fitted.model.image_encoder.register_forward_hook(
        lambda _m, _i, out: chunks.append(out.detach().float().cpu().numpy()))
    try:
        score_cases(fitted, cases, table, cfg, cache=cache)
    finally:
        hook.remove()
    E = np.concatenate(chunks) if chunks else np.zeros((0, 0))
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise RuntimeError("embeddings are sharded across processes here")
    if len(E) != len(cases):
        raise RuntimeError(f"{len(E)} embeddings for {len(cases)} cases")
    return E


def training_fingerprint(fitted: FittedModel, cases: pd.DataFrame, table: pd.DataFrame | None, cfg: Config, *,
                         cache: ImageCache | None = None, clinical_cols: list[str] | None = None) -> dict[str, Any]:
    """The record :mod:`breastfusion.evaluation.external` compares a new site with (see
    :mod:`breastfusion.data.fingerprint`, which holds the statistics and the comparison).
    Each part that cannot be computed is left out with its reason in ``notes``; nothing here stops training."""
    rec: dict[str, Any] = {"version": FINGERPRINT_VERSION, "n_cases": len(cases), "notes": []}
    uses_image = fitted.variant != "tabular"
    if uses_image:
        W, H, M, S, hashes = [], [], [], [], []
        for p in cases[IMAGE_PATH].astype(str):
            w, h = image_size(p)
            W.append(w)
            H.append(h)
            # the cached, resized grey image when there is one (the model's input up to a final resize)
            u8 = (resize_u8(cache.get(p), cfg.image.size) if cache is not None
                  else load_resized(p, cfg.image.size, cfg.image.clean))
            m, s = intensity(u8)
            M.append(m)
            S.append(s)
            hashes.append(file_hash(p))
        rec["images"] = image_statistics(W, H, M, S)
        rec["image_hashes"] = sorted(set(hashes))
        try:
            rec["embedding"] = fit_embedding_reference(_image_embeddings(fitted, cases, table, cfg, cache))
        except Exception as exc:  # noqa: BLE001 - the record is optional; its absence is reported on validate
            log.warning("training data fingerprint: no image-embedding reference (%s)", exc)
            rec["notes"].append(f"no image-embedding reference: {exc}")
    pre = fitted.tabular
    cols = [c for c in (clinical_cols or []) if table is not None and c in table.columns]
    if cols:
        rows = table.reindex(cases["case_id"].astype(str).tolist())
        rec["tabular"] = tabular_profile(rows, cols, kinds=pre.kinds_ if pre is not None else None,
                                         missing_values=pre.missing_values if pre is not None else None,
                                         separator=getattr(pre, "multi_separator", None))
    return rec


def fit_final_bundle(variant: str, cases: pd.DataFrame, table: pd.DataFrame | None, classes: list[str], cfg: Config,
                     run_dir: Path, *, resume: bool, progress: bool, cache: ImageCache | None, synthetic: bool,
                     metrics: dict | None, radiomics_used: bool, clinical_cols: list[str],
                     classical: dict | None = None, calibration: dict | None = None,
                     data_meta: dict | None = None, segmenter: Path | None = None,
                     segmentation_summary: dict | None = None) -> Path:
    """Train the deployable model on every case (inner validation for early stopping) and save a bundle.

    ``segmenter`` (``data.masks: predicted``): the lesion segmenter file, copied into the bundle, which runs it
    for every case that comes without a mask."""
    from breastfusion.bundles.bundle import save_bundle

    groups = cases["dup_group"].to_numpy() if "dup_group" in cases else None
    name = {"fusion": "fusion", "image": "image_only", "tabular": "tabular_only"}[variant]
    fitted = fit_deep_model(variant, cases.reset_index(drop=True), table, classes, cfg, run_dir / "deep" / f"final_{name}",
                            groups=groups, resume=resume, progress=progress, cache=cache, desc=f"final {name}",
                            seed=stable_seed(cfg.seed, name, "final"))
    from breastfusion.features.column_labels import resolve_column_info

    # display names and units of the clinical inputs, for the web form and the model card
    feature_meta = {"clinical_columns": clinical_cols, "radiomics": None,
                    "column_info": resolve_column_info(list(clinical_cols or []), cfg.data.column_info)}
    if radiomics_used:
        from breastfusion.features.radiomics import (
            RADIOMICS_VERSION,
            radiomics_columns,
            units_meta,
        )

        # the unit of shape features, and where prediction reads each case's pixel size (mm bundles)
        feature_meta["radiomics"] = {"version": RADIOMICS_VERSION, "columns": radiomics_columns(),
                                     **units_meta(cases, cfg.data.pixel_size_column, cfg.data.pixel_size_unit)}
    extra_files = {}
    if radiomics_used:
        feature_meta["masks"] = cfg.data.masks  # where the outline behind the radiomics came from at training
    if segmenter is not None and radiomics_used:
        from breastfusion.bundles.integrity import SEGMENTER_FILE

        extra_files[SEGMENTER_FILE] = Path(segmenter)
        quality = {k: v for k, v in (segmentation_summary or {}).items() if k in ("dice", "iou", "hd95", "n_cases")}
        feature_meta["segmenter"] = {"file": SEGMENTER_FILE, "require_lesion": bool((segmentation_summary or {})
                                                                                    .get("require_lesion", False)),
                                     "out_of_fold_quality": quality}
    if classical and classical.get("files"):
        extra_files.update({f"classical/{n}.skops": p for n, p in classical["files"].items()})
        feature_meta["classical"] = {"models": sorted(classical["files"]), "features": classical["features"],
                                     "format": "skops", "metrics": classical.get("metrics", {}),
                                     "reading": classical.get("reading") or {}}  # multi/ordinal cells at prediction
    from breastfusion.data.cleaning import cleaning_meta

    image_meta = {"size": cfg.image.size, "mean": fitted.data_cfg["mean"], "std": fitted.data_cfg["std"],
                  "interpolation": fitted.data_cfg.get("interpolation", "bicubic"), "color": "gray_to_rgb",
                  "clean": cleaning_meta(cfg.image.clean)}
    n_tab = fitted.tabular.n_features_out_ if fitted.tabular is not None else 0
    training = {"n_cases": int(len(cases)), "best_epoch": fitted.result.best_epoch,
                "inner_val_macro_f1": fitted.result.best_val_macro_f1, "seconds": round(fitted.result.seconds, 1),
                "weights_init": fitted.weight_source,
                "class_counts": {c: int((cases[LABEL] == c).sum()) for c in classes}}
    try:  # what `validate` compares a new site with; a bundle without it is still usable
        training["data_fingerprint"] = training_fingerprint(fitted, cases.reset_index(drop=True), table, cfg,
                                                            cache=cache, clinical_cols=clinical_cols)
    except Exception as exc:  # noqa: BLE001 - reported here and, as "unavailable", by validate
        log.warning("bundle %s: no training-data fingerprint (%s: %s)", name, type(exc).__name__, exc)
    path = save_bundle(run_dir / "bundles" / name, fitted.model, classes=classes, model_meta=model_meta(variant, cfg, n_tab),
                       image_meta=image_meta, tabular=fitted.tabular, feature_meta=feature_meta,
                       config_yaml=config_to_yaml(cfg), synthetic=synthetic, training=training,
                       metrics={"cross_validation": metrics} if metrics else {}, extra_files=extra_files,
                       calibration=calibration, data_meta=data_meta, name=f"{cfg.name}-{name}")
    (run_dir / "deep" / f"final_{name}" / "last.pt").unlink(missing_ok=True)
    return path
