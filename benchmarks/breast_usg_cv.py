"""What does the real clinical record add? BrEaST-Lesions-USG, benign vs malignant, every input set, several seeds,
and every model against the radiologist's BI-RADS (issue 10).

Each row is one ``run_experiment`` with the recipe ``configs/breast_lesions_usg.yaml`` (252 cases: the 4 normal
cases set aside; 5-fold CV grouped by patient; 95 % bootstrap CIs over patients) and overrides for its inputs:

    clinical    the clinical history only (Age, Tissue_composition, Signs, Symptoms): tabular MLP + logreg + LightGBM
    image       the image only: the deep image model
    fusion      image + clinical history: the fusion model
    fusion_rad  image + clinical + lesion radiomics from the EXPERT mask: fusion + logreg + LightGBM
    lexicon     the radiologist's BI-RADS lexicon descriptors only: logreg + LightGBM

The reader (BI-RADS alone) and every "<model> + reader" come from each run's reader comparison.
Figures are same-site cross-validation (one Polish hospital); a row with "_rad" used the expert's outline.

    python benchmarks/breast_usg_cv.py --out runs/breast_cv --rows clinical,lexicon --seeds 0,1,2,3,4
    python benchmarks/breast_usg_cv.py --out runs/breast_cv --rows image,fusion,fusion_rad --seeds 0,1,2
    python benchmarks/breast_usg_cv.py --out runs/breast_cv --summarise      # the table over all finished runs

Finished runs are reused (``resume``), so the rows can be run in pieces.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
from _machine import machine_description, peak_rss_mb

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "breast_lesions_usg"
CLINICAL = ["Age", "Tissue_composition", "Signs", "Symptoms"]
LEXICON = ["Shape", "Margin", "Echogenicity", "Posterior_features", "Halo", "Calcifications", "Skin_thickening"]
ROWS = {
    "clinical": [f"data.tabular_columns=[{','.join(CLINICAL)}]", "data.radiomics=false",
                 "experiment.deep_models=[tabular]", "experiment.classical_models=[logreg,lgbm]"],
    "image": ["data.tabular_columns=[]", "data.radiomics=false", "experiment.deep_models=[image]",
              "experiment.classical_models=[]"],
    "fusion": [f"data.tabular_columns=[{','.join(CLINICAL)}]", "data.radiomics=false",
               "experiment.deep_models=[fusion]", "experiment.classical_models=[]"],
    "fusion_rad": [f"data.tabular_columns=[{','.join(CLINICAL)}]", "data.radiomics=true",
                   "experiment.deep_models=[fusion]", "experiment.classical_models=[logreg,lgbm]"],
    "lexicon": [f"data.tabular_columns=[{','.join(LEXICON)}]", "data.radiomics=false",
                "experiment.deep_models=[]", "experiment.classical_models=[logreg,lgbm]"],
}
POSITIVE = "malignant"


def sens_at_spec(y: np.ndarray, score: np.ndarray, spec: float = 0.9) -> float:
    """Sensitivity at the most sensitive threshold whose specificity is at least ``spec``."""
    neg = np.sort(score[y == 0])
    if not len(neg) or not (y == 1).any():
        return float("nan")
    k = int(np.ceil(spec * len(neg))) - 1  # threshold above the k-th lowest negative score
    thr = neg[k]
    return float((score[y == 1] > thr).mean())


def run_row(row: str, seed: int, out: Path, data: Path, final: bool) -> Path:
    from breastfusion.config import load_config
    from breastfusion.experiment import run_experiment

    run_dir = out / f"{row}_seed{seed}"
    overrides = ROWS[row] + [f"seed={seed}", f"data.source={data}", "experiment.explain_cases=0",
                             f"name=breast-usg-{row}-seed{seed}",
                             f"experiment.final_models={'[fusion]' if final else '[]'}"]
    cfg = load_config(ROOT / "configs" / "breast_lesions_usg.yaml", overrides)
    t0 = time.perf_counter()
    run_experiment(cfg, run_dir, resume=True, progress=False)
    print(f"{row} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def summarise(out: Path) -> dict:
    rows = []
    for run_dir in sorted(out.glob("*_seed*")):
        metrics_path = run_dir / "metrics.json"
        if not metrics_path.exists():
            continue
        row, seed = run_dir.name.rsplit("_seed", 1)
        metrics = json.loads(metrics_path.read_text())["models"]
        for model, m in metrics.items():
            preds = pd.read_csv(run_dir / "predictions" / f"{model}.csv")
            y = (preds["label"] == POSITIVE).to_numpy().astype(int)
            rows.append({"row": row, "seed": int(seed), "model": model, "n": len(preds),
                         "macro_f1": m["pooled"]["macro_f1"], "auc": m["pooled"]["macro_auc"],
                         "auc_ci": m.get("ci", {}).get("macro_auc"),
                         "sens_at_90_spec": sens_at_spec(y, preds[f"prob_{POSITIVE}"].to_numpy())})
        reader_path = run_dir / "reader_comparison.json"
        if reader_path.exists():
            rc = json.loads(reader_path.read_text())
            rows.append({"row": row, "seed": int(seed), "model": "_reader", "reader": rc})
    table = pd.DataFrame([r for r in rows if r["model"] != "_reader"])
    agg = {}
    if len(table):
        for (row, model), g in table.groupby(["row", "model"]):
            agg[f"{row}/{model}"] = {
                "seeds": sorted(g["seed"].tolist()),
                "macro_f1_mean": float(g["macro_f1"].mean()), "macro_f1_sd": float(g["macro_f1"].std(ddof=0)),
                "auc_mean": float(g["auc"].mean()), "auc_sd": float(g["auc"].std(ddof=0)),
                "sens_at_90_spec_mean": float(g["sens_at_90_spec"].mean()),
                "seed0_auc_ci": (g.loc[g["seed"] == g["seed"].min(), "auc_ci"].iloc[0]),
            }
    readers = [r for r in rows if r["model"] == "_reader"]
    return {"runs": table.to_dict("records"), "by_row_model": agg,
            "reader": {f"{r['row']}_seed{r['seed']}": r["reader"] for r in readers}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "breast_cv")
    ap.add_argument("--rows", default="clinical,image,fusion,fusion_rad,lexicon")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--final", action="store_true", help="also train the final fusion bundle (fusion rows)")
    ap.add_argument("--summarise", action="store_true", help="only summarise finished runs")
    args = ap.parse_args()
    if not (args.data / "clinical_data.csv").is_file():
        print(f"skipped: BrEaST-Lesions-USG not found at {args.data} (see ../shared/data/README.md)")
        return 0
    t0 = time.perf_counter()
    if not args.summarise:
        for row in args.rows.split(","):
            if row not in ROWS:
                raise SystemExit(f"unknown row '{row}'; known: {', '.join(ROWS)}")
            for seed in (int(s) for s in args.seeds.split(",")):
                run_row(row, seed, args.out, args.data, final=args.final and row.startswith("fusion"))
    summary = summarise(args.out)
    summary.update({"date": str(date.today()), "machine": machine_description(),
                    "wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb())})
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    for key, v in summary["by_row_model"].items():
        print(f"{key:32s} seeds {v['seeds']}  macro-F1 {v['macro_f1_mean']:.3f}±{v['macro_f1_sd']:.3f}  "
              f"AUC {v['auc_mean']:.3f}±{v['auc_sd']:.3f}  sens@90%spec {v['sens_at_90_spec_mean']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
