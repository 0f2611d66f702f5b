"""Conformal prediction sets and temperature scaling on an existing BUSI run's out-of-fold predictions.

For each model's out-of-fold prediction table (default: ``runs/busi/predictions/fusion.csv`` plus
``image_only.csv`` and ``lgbm.csv`` when present), each target coverage (0.90, 0.95) and each method
(aps, raps, lac; APS/RAPS also in their randomised form unless ``--no-randomized``), every fold is
calibrated on the other folds' predictions (temperature, then conformal threshold) and the sets are
evaluated on the fold itself. Records empirical coverage (goal: within +-3 points of the target), mean set
size, refer rate (sets of more than one class), top-1 accuracy (a floor for coverage, since every set
holds the top class) and top-label ECE before / after temperature scaling; writes JSON to ``--out``, one
reliability PNG per model beside it, and prints a Markdown table. Nothing is retrained.

    python benchmarks/conformal_busi.py [--predictions runs/busi/predictions/fusion.csv ...]
                                        [--out runs/calibration/busi.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import pandas as pd
from _machine import machine_description

from breastfusion.evaluation.calibration import METHODS
from breastfusion.evaluation.coverage import (
    calibrate_predictions,
    coverage_report,
    plot_reliability_before_after,
)
from breastfusion.evaluation.metrics import to_jsonable
from breastfusion.utils import write_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "runs" / "busi" / "predictions"
TOLERANCE_PTS = 3.0


def default_predictions() -> list[Path]:
    paths = [DEFAULT_DIR / "fusion.csv"]
    paths += [p for p in (DEFAULT_DIR / "image_only.csv", DEFAULT_DIR / "lgbm.csv") if p.is_file()]
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--predictions", nargs="+", type=Path, default=None,
                    help="out-of-fold prediction CSVs (default: fusion, plus image_only and lgbm if present)")
    ap.add_argument("--out", type=Path, default=Path("runs/calibration/busi.json"))
    ap.add_argument("--coverages", nargs="+", type=float, default=[0.90, 0.95])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--no-randomized", action="store_true", help="skip the randomised APS/RAPS rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--class-conditional", choices=["no", "yes", "both"], default="no",
                    help="one threshold per class (Mondrian) instead of one overall, or both side by side")
    args = ap.parse_args()
    modes = {"no": [False], "yes": [True], "both": [False, True]}[args.class_conditional]

    paths = args.predictions or default_predictions()
    missing = [p for p in paths if not p.is_file()]
    if missing:
        print(f"Prediction table '{missing[0]}' not found: run benchmarks/busi_cv.py first; nothing measured.",
              file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    rows, models = [], []
    for path in paths:
        preds = pd.read_csv(path)
        model = str(preds["model"].iloc[0]) if "model" in preds.columns and len(preds) else path.stem
        for cov in args.coverages:
            alpha = round(1.0 - cov, 10)
            for method in args.methods:
                for randomized, by_class in [(rz, bc) for rz in ([False] if method == "lac" or args.no_randomized
                                                                 else [False, True]) for bc in modes]:
                    cal = calibrate_predictions(preds, method=method, alpha=alpha, by_fold=True, seed=args.seed,
                                                randomized=randomized, class_conditional=by_class)
                    r = coverage_report(cal)
                    gap = 100 * (r["coverage"] - cov)
                    rows.append({
                        "model": model, "source": str(path), "n": r["n"], "target_coverage": cov, "alpha": alpha,
                        "method": method, "randomized": randomized, "class_conditional": by_class,
                        "coverage": r["coverage"],
                        "coverage_gap_pts": gap, "within_3pts": abs(gap) <= TOLERANCE_PTS,
                        "accuracy": r["accuracy"], "mean_set_size": r["mean_set_size"],
                        "refer_rate": r["refer_rate"], "singleton_accuracy": r["singleton_accuracy"],
                        "ece_before": r["ece_before"], "ece_after": r["ece_after"],
                        "nll_before": r["nll_before"], "nll_after": r["nll_after"],
                        "per_class_coverage": {c: v["coverage"] for c, v in r["per_class"].items()},
                        "per_fold": r.get("per_fold", []),
                        "calibrators": r.get("calibrators", []),
                    })
        # reliability before / after (the temperature does not depend on the conformal method)
        cal = calibrate_predictions(preds, method="lac", alpha=0.1, by_fold=True, seed=args.seed)
        png = plot_reliability_before_after(cal, None, args.out.with_name(f"{args.out.stem}_{model}_reliability.png"),
                                            title=f"BUSI {model}: reliability before / after temperature scaling")
        models.append({"model": model, "source": str(path), "n": len(preds), "reliability_png": str(png),
                       "temperatures": [f["temperature"] for f in cal.attrs["calibration"]["folds"]]})
    wall = time.perf_counter() - t0
    out = {
        "date": date.today().isoformat(), "machine": machine_description(), "command": " ".join(sys.argv),
        "wall_s": wall,
        "protocol": ("cross-fold: each fold's temperature and conformal threshold fitted on the other folds' "
                     "out-of-fold predictions, applied to the fold; coverage pooled over all folds"),
        "tolerance_pts": TOLERANCE_PTS, "models": models, "results": rows,
    }
    write_json(to_jsonable(out), args.out)

    classes = list(rows[0]["per_class_coverage"]) if rows else []
    print("\n| model | target | method | coverage (gap, pts) | within ±3 | top-1 acc. | mean set size | refer rate "
          "| ECE before → after | " + " | ".join(f"coverage {c}" for c in classes) + " |\n|"
          + "---|" * (9 + len(classes)))
    for r in rows:
        name = r["method"] + (" (randomised)" if r["randomized"] else "") + (", per class" if r["class_conditional"] else "")
        print(f"| {r['model']} | {r['target_coverage']:.2f} | {name} | {r['coverage']:.3f} ({r['coverage_gap_pts']:+.1f}) "
              f"| {'yes' if r['within_3pts'] else 'no'} | {r['accuracy']:.3f} | {r['mean_set_size']:.2f} | "
              f"{r['refer_rate']:.3f} | {r['ece_before']:.3f} → {r['ece_after']:.3f} | "
              + " | ".join(f"{r['per_class_coverage'][c]:.3f}" for c in classes) + " |")
    for m in models:
        print(f"\n{m['model']}: per-fold temperature " + ", ".join(f"{t:.3f}" for t in m["temperatures"])
              + f"; reliability plot {m['reliability_png']}")
    print(f"\nwall time {wall:.1f} s; {machine_description()}; results in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
