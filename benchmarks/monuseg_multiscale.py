"""The multiscale grader on a REAL task built from MoNuSeg: breast versus other organs from concentric
40x / 20x / 10x stacks (30 tiles = 30 patients, tile-grouped 5-fold CV), against its ablations (CNN only,
ViT only, one scale, no pathomics) and classical models on pathomics (+ frozen deep embeddings).

    python benchmarks/monuseg_multiscale.py [--out runs/monuseg_ms] [--set train.stage2_epochs=3] [--resume]

Writes <out>/benchmark.json (metrics with 95% cluster-bootstrap CIs, per-fold spread, timings, peak memory,
machine, date) and prints a Markdown table for docs/RESULTS.md. It is a proxy task (organ, not grade): MoNuSeg
has no grades. See breastfusion.data.importers.monuseg for the stack geometry and its caveats.
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
from breastfusion.data.importers.monuseg import import_monuseg_stacks

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/monuseg_ms")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "monuseg"))
    ap.add_argument("--stacks-data", help="an existing folder from import_monuseg_stacks (skips building it)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "monuseg_multiscale.yaml"))
    ap.add_argument("--tile", type=int, default=192, help="tile side at 40x in pixels (10x field = 4x this)")
    ap.add_argument("--stacks", type=int, default=5, help="stacks per MoNuSeg tile")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    out = Path(args.out)
    data = Path(args.stacks_data) if args.stacks_data else out / "data"
    t0 = time.perf_counter()
    if not (data / "cases.csv").exists():
        if not Path(args.data).is_dir():
            print(f"MoNuSeg not found at '{args.data}' (needs ../shared/data); nothing measured.", file=sys.stderr)
            return 1
        import_monuseg_stacks(args.data, data, task="breast", magnifications=(40, 20, 10), tile=args.tile,
                              stacks_per_image=args.stacks)
    build_s = time.perf_counter() - t0
    cfg = load_config(args.config, [f"data.source={data / 'cases.csv'}", f"histology.tiles={data / 'tiles.csv'}"]
                      + args.overrides)
    t1 = time.perf_counter()
    result = run_experiment(cfg, out / "run", resume=args.resume, progress=True)
    wall = time.perf_counter() - t1
    rows = []
    for name, m in result.metrics.items():
        p, ci, fs = m["pooled"], m["ci"], m.get("fold_summary", {})
        rows.append({"model": name, "macro_f1": p["macro_f1"], "macro_f1_ci": ci.get("macro_f1"),
                     "macro_auc": p["macro_auc"], "macro_auc_ci": ci.get("macro_auc"),
                     "balanced_accuracy": p["balanced_accuracy"],
                     "fold_macro_f1_mean_sd": [fs.get("macro_f1", {}).get("mean"), fs.get("macro_f1", {}).get("sd")]})
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    bench = {"date": date.today().isoformat(), "machine": machine_description(),
             "command": "python benchmarks/monuseg_multiscale.py " + " ".join(sys.argv[1:]),
             "task": "MoNuSeg breast (6) vs other (24), 30 tiles/patients, 5 stacks each, 40x/20x/10x, 5-fold CV grouped by tile",
             "build_stacks_s": round(build_s, 1), "wall_s": round(wall, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
             "timings": metrics["timings"], "rows": rows}
    (out / "benchmark.json").write_text(json.dumps(bench, indent=2, default=float))
    print("\n| model | macro-F1 (95% CI) | macro-AUC (95% CI) | balanced acc. |\n|---|---|---|---|")
    for r in rows:
        f = lambda v, c: f"{v:.3f}" + (f" ({c[0]:.3f}–{c[1]:.3f})" if c else "")  # noqa: E731
        print(f"| {r['model']} | {f(r['macro_f1'], r['macro_f1_ci'])} | {f(r['macro_auc'], r['macro_auc_ci'])} | "
              f"{r['balanced_accuracy']:.3f} |")
    print(f"\nwall {wall:.0f} s (+{build_s:.0f} s building stacks), peak RSS {peak_rss_mb():.0f} MB — {bench['machine']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
