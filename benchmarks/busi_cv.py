"""BUSI benchmark: classical baselines, image-only and fusion (image + lesion radiomics) models,
stratified 5-fold CV grouped by near-duplicate group. Records macro-F1 / macro-AUC with 95% CIs,
wall time and peak memory into <out>/benchmark.json and prints a Markdown table for docs/RESULTS.md.

    python benchmarks/busi_cv.py --out runs/busi [--resume] [--set train.stage2_epochs=4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

from _machine import machine_description, peak_rss_mb

from breastfusion.config import load_config
from breastfusion.experiment import run_experiment

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/busi")
    ap.add_argument("--config", default=str(ROOT / "configs" / "busi.yaml"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "busi" / "Dataset_BUSI_with_GT"))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    if not Path(args.data).is_dir():
        print(f"BUSI not found at '{args.data}' (needs ../shared/data); nothing measured.", file=sys.stderr)
        return 1
    cfg = load_config(args.config, [f"data.source={args.data}"] + args.overrides)
    t0 = time.perf_counter()
    result = run_experiment(cfg, args.out, resume=args.resume, progress=True)
    wall = time.perf_counter() - t0
    peak_mb = peak_rss_mb()
    rows = []
    for name, m in result.metrics.items():
        p, ci = m["pooled"], m["ci"]
        rows.append({"model": name, "macro_f1": p["macro_f1"], "macro_f1_ci": ci.get("macro_f1"),
                     "macro_auc": p["macro_auc"], "macro_auc_ci": ci.get("macro_auc"),
                     "weighted_f1": p["weighted_f1"], "balanced_accuracy": p["balanced_accuracy"]})
    timings = json.loads((Path(args.out) / "metrics.json").read_text())["timings"]
    out = {"date": date.today().isoformat(), "machine": machine_description(), "command": " ".join(sys.argv), "wall_s": wall,
           "peak_rss_mb": peak_mb, "timings": timings, "models": rows}
    (Path(args.out) / "benchmark.json").write_text(json.dumps(out, indent=2))
    print("\n| model | macro-F1 (95% CI) | macro-AUC (95% CI) | weighted-F1 | balanced acc. |\n|---|---|---|---|---|")
    for r in rows:
        f = lambda v, ci: f"{v:.3f} ({ci[0]:.3f}–{ci[1]:.3f})" if ci else f"{v:.3f}"
        print(f"| {r['model']} | {f(r['macro_f1'], r['macro_f1_ci'])} | {f(r['macro_auc'], r['macro_auc_ci'])} | "
              f"{r['weighted_f1']:.3f} | {r['balanced_accuracy']:.3f} |")
    print(f"\nwall time {wall / 60:.1f} min, peak RSS {peak_mb:.0f} MB; stage timings: "
          + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
