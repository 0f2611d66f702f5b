"""Does a real hospital export's ``not available`` turn a number into a category? (issue 9, item 1)

BrEaST-Lesions-USG's clinical sheet writes missing values as the text ``not available`` (Age is missing for
42 of 256 patients). This benchmark trains the classical models through the normal experiment runner on the
clinical history alone (Age, Tissue_composition, Signs, Symptoms; benign vs malignant, the 4 normal cases
dropped), with 5-fold patient-grouped cross-validation, and records how the Age column was encoded (one
numeric feature, or one one-hot column per distinct age) and the cross-validated figures.

Run it once on the current code and once on an older checkout (``PYTHONPATH=OLD/src``) to compare:

    python benchmarks/clinical_missing_tokens.py --out runs/clinical_tokens

Figures are same-site cross-validation on one Polish hospital's cohort, no images, no masks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import pandas as pd
from _machine import machine_description

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "breast_lesions_usg"
CLINICAL = ["Age", "Tissue_composition", "Signs", "Symptoms"]


def cases_table(data: Path) -> pd.DataFrame:
    sheet = pd.read_csv(data / "clinical_data.csv", dtype=str, keep_default_na=False)
    sheet = sheet[sheet["Classification"].isin(["benign", "malignant"])]
    images = data / "BrEaST-Lesions_USG-images_and_masks"
    cases = pd.DataFrame({
        "case_id": "case" + sheet["CaseID"].str.zfill(3),
        "image_path": [str(images / f) for f in sheet["Image_filename"]],
        "label": sheet["Classification"].to_numpy(),
    })
    for c in CLINICAL:
        cases[c] = sheet[c].to_numpy()
    return cases.reset_index(drop=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "clinical_tokens")
    args = ap.parse_args()
    if not (args.data / "clinical_data.csv").is_file():
        print(f"skipped: BrEaST-Lesions-USG not found at {args.data} (see ../shared/data/README.md)")
        return 0
    import breastfusion
    from breastfusion.config import Config
    from breastfusion.experiment import run_experiment

    args.out.mkdir(parents=True, exist_ok=True)
    cases = cases_table(args.data)
    table = args.out / "cases.csv"
    cases.to_csv(table, index=False)
    cfg = Config()
    cfg.name = "BrEaST-Lesions-USG clinical history only"
    cfg.data.source = str(table)
    cfg.data.radiomics = False
    cfg.data.tabular_columns = CLINICAL
    cfg.experiment.deep_models = []
    cfg.experiment.final_models = []
    cfg.experiment.classical_models = ["logreg", "lgbm"]
    cfg.experiment.explain_cases = 0
    t0 = time.perf_counter()
    result = run_experiment(cfg, args.out / "run", progress=False)
    wall = time.perf_counter() - t0
    oof = pd.read_csv(args.out / "run" / "predictions" / "logreg.csv")
    from breastfusion.tabular_inputs import numeric_for_classical, tabular_table

    encoded = numeric_for_classical(tabular_table(cases, CLINICAL))
    age_cols = [c for c in encoded.columns if c == "Age" or c.startswith("Age=")]
    rows = {name: {k: [round(m["pooled"][k], 3), *[round(x, 3) for x in m.get("ci", {}).get(k, [])]]
                   for k in ("macro_f1", "macro_auc", "balanced_accuracy")} for name, m in result.metrics.items()}
    summary = {"date": str(date.today()), "machine": machine_description(), "breastfusion": breastfusion.__file__,
               "cases": len(cases), "age_features": len(age_cols), "features": encoded.shape[1],
               "n_oof": len(oof), "wall_s": round(wall, 1), "models": rows}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
