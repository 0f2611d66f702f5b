"""Evaluation commands: calibrate, validate."""

from __future__ import annotations

import sys
from pathlib import Path

from breastfusion.errors import DataError


def cmd_calibrate(args) -> int:
    """Fit temperature scaling + split-conformal sets for an existing bundle from out-of-fold predictions."""
    from breastfusion.bundles.bundle import read_bundle_meta, refresh_bundle
    from breastfusion.evaluation.calibration import (
        calibration_status,
        fit_bundle_calibration,
    )

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


def _add_calibrate(sub) -> None:
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


def _add_validate(sub) -> None:
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


_PARSERS = {
    "calibrate": _add_calibrate,
    "validate": _add_validate,
}


def add_parsers(sub, names=None) -> None:
    """Add this group's subcommands to ``sub`` (the top parser's subparsers): all of them, or only ``names``, in
    the order given."""
    for name in _PARSERS if names is None else names:
        _PARSERS[name](sub)
