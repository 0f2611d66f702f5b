"""PyTorch CPU vs ONNX Runtime CPU throughput of a bundle's network, in the same run, on the same inputs,
with the same number of threads: ``Predictor._forward`` (normalisation + forward + softmax) with
``backend="torch"`` and ``backend="onnx"``, at batch 1 and 32.

    python benchmarks/onnx_vs_torch.py [--bundle runs/busi/bundles/fusion] [--threads N] [--out runs/onnx/bench.json]

The bundle (default ``runs/busi/bundles/fusion`` when it exists, else a freshly built random-weight
EfficientNet-Lite0 fusion model at 224 px) is copied to a temporary folder and exported there, so the
bundle itself is not changed. The two backends are timed in alternating rounds, so a change in machine
load affects both; the load average before and after is recorded, since the figure is a speed ratio.
Writes JSON (``--out``) and prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from _machine import machine_description, peak_rss_mb

from breastfusion.bundles.bundle import META, WEIGHTS, load_bundle
from breastfusion.inference.onnx_export import _tabular_rows, export_onnx
from breastfusion.models.registry import phantom_grey
from breastfusion.inference.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "runs" / "busi" / "bundles" / "fusion"
GOAL = 1.5


def fresh_bundle(path: Path, size: int = 224) -> Path:
    """A random-weight tf_efficientnet_lite0 fusion bundle (the project's default architecture)."""
    import pandas as pd
    import timm

    from breastfusion.features.tabular import TabularPreprocessor
    from breastfusion.bundles.bundle import save_bundle
    from breastfusion.models.fusion import FusionClassifier

    rng = np.random.default_rng(0)
    table = pd.DataFrame({f"x{i}": rng.normal(size=64) for i in range(8)})
    table["palpable"] = rng.choice(["yes", "no"], 64)
    pre = TabularPreprocessor().fit(table)
    torch.manual_seed(0)
    model = FusionClassifier(3, variant="fusion", n_tabular=pre.n_features_out_,
                             backbone=timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0))
    meta = {"variant": "fusion", "backbone": "tf_efficientnet_lite0", "n_tabular": pre.n_features_out_,
            "image_dim": 256, "tabular_dim": 64, "tabular_hidden": 128, "fusion_hidden": 128, "dropout": 0.3}
    return save_bundle(path, model, classes=["benign", "malignant", "normal"], model_meta=meta,
                       image_meta={"size": size, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                                   "color": "gray_to_rgb"},
                       tabular=pre, feature_meta={"clinical_columns": list(table.columns), "radiomics": None},
                       config_yaml="", synthetic=True)


def time_calls(fn, seconds: float, min_calls: int) -> list[float]:
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", help=f"bundle folder (default: {DEFAULT_BUNDLE.relative_to(REPO)} when it exists, "
                                     "else a random-weight lite0 fusion model at 224 px)")
    ap.add_argument("--threads", type=int, default=cores, help=f"threads for both backends (default: {cores}, the usable cores)")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--seconds", type=float, default=6.0, help="timed seconds per backend and batch size")
    ap.add_argument("--rounds", type=int, default=3, help="alternating torch / onnx rounds per batch size")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--out", default="runs/onnx/bench.json")
    args = ap.parse_args()

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="onnx_bench_"))
    try:
        if args.bundle:
            source = Path(args.bundle)
        elif DEFAULT_BUNDLE.is_dir():
            source = DEFAULT_BUNDLE
        else:
            source = None
        bundle_path = work / "bundle"
        if source is not None:  # the model files only; the original bundle is left as it is
            bundle_path.mkdir()
            for name in (WEIGHTS, META, "config.yaml"):
                if (source / name).is_file():
                    shutil.copy2(source / name, bundle_path / name)
            meta = json.loads((bundle_path / META).read_text())
            meta.pop("onnx", None)
            (bundle_path / META).write_text(json.dumps(meta, indent=2))
            label = str(source)
        else:
            fresh_bundle(bundle_path)
            label = "fresh random-weight tf_efficientnet_lite0 fusion model, 224 px"

        export_onnx(bundle_path, opset=args.opset)
        entry = json.loads((bundle_path / META).read_text())["onnx"]
        bundle = load_bundle(bundle_path)
        meta = bundle.meta
        preds = {"torch": Predictor(bundle, threads=args.threads, backend="torch"),
                 "onnx": Predictor(load_bundle(bundle_path), threads=args.threads, backend="onnx")}
        torch.set_num_threads(args.threads)
        uses_image = preds["torch"].model.uses_image
        uses_tab = preds["torch"].model.uses_tabular
        size = int(meta["image"]["size"])
        n_tab = int(meta["model"].get("n_tabular") or 0)
        rng = np.random.default_rng(0)

        rows, parity = [], 0.0
        for b in [int(x) for x in args.batch_sizes.split(",") if x.strip()]:
            images = list((phantom_grey(b, size, rng) * 255 + 0.5).astype(np.uint8)) if uses_image else None
            tab = _tabular_rows(bundle, b, rng, n_tab) if uses_tab else None
            out = {k: p._forward(images, tab) for k, p in preds.items()}  # warm-up + parity on these inputs
            parity = max(parity, float(np.abs(out["torch"].astype(np.float64) - out["onnx"]).max()))
            for p in preds.values():
                p._forward(images, tab)
            times = {k: [] for k in preds}
            for _ in range(args.rounds):
                for k, p in preds.items():
                    times[k] += time_calls(lambda p=p, i=images, t=tab: p._forward(i, t), args.seconds / args.rounds, 2)
            ips = {k: b / statistics.median(v) for k, v in times.items()}
            rows.append({"batch_size": b, "torch_images_per_s": round(ips["torch"], 2),
                         "onnx_images_per_s": round(ips["onnx"], 2), "ratio_onnx_over_torch": round(ips["onnx"] / ips["torch"], 3),
                         "torch_ms_per_batch": round(1000 * statistics.median(times["torch"]), 2),
                         "onnx_ms_per_batch": round(1000 * statistics.median(times["onnx"]), 2),
                         "timed_calls": {k: len(v) for k, v in times.items()}})
        import onnxruntime

        res = {
            "date": date.today().isoformat(), "command": " ".join([Path(sys.executable).name] + sys.argv),
            "machine": machine_description(), "threads": args.threads, "torch_threads": torch.get_num_threads(),
            "onnxruntime_intra_op_threads": args.threads,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "bundle": label, "variant": meta["model"].get("variant"), "backbone": meta["model"].get("backbone"),
            "image_size": size, "n_tabular": n_tab, "classes": meta["classes"],
            "exporter": entry["exporter"], "opset": entry["opset"], "export_seconds": entry["export_seconds"],
            "onnx_sha256": entry["sha256"],
            "parity_export_max_abs_prob_diff": entry["parity"]["max_abs_prob_diff"],
            "parity_predictor_max_abs_prob_diff": parity,
            "results": rows, "goal_ratio": GOAL,
            "goal_met": {str(r["batch_size"]): r["ratio_onnx_over_torch"] >= GOAL for r in rows},
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                         "onnx": entry["versions"]["onnx"]},
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(out)

    print(f"## ONNX Runtime vs PyTorch on CPU ({res['date']})\n")
    print(f"- bundle: {res['bundle']} ({res['variant']}, {res['backbone']}, {size} px, {n_tab} tabular features)")
    print(f"- machine: {res['machine']}; {args.threads} thread(s) for both backends; peak RSS {res['peak_rss_mb']} MB")
    print(f"- load average (1/5/15 min) before {res['load_average_before']}, after {res['load_average_after']}")
    print(f"- export: {res['exporter']}, opset {res['opset']}, {res['export_seconds']} s; parity max |Δp|: "
          f"export check {res['parity_export_max_abs_prob_diff']:.2e}, Predictor inputs "
          f"{res['parity_predictor_max_abs_prob_diff']:.2e}\n")
    print("| batch | PyTorch img/s | ONNX Runtime img/s | ratio | goal ≥ 1.5x |")
    print("|---:|---:|---:|---:|:---:|")
    for r in rows:
        print(f"| {r['batch_size']} | {r['torch_images_per_s']:.1f} | {r['onnx_images_per_s']:.1f} | "
              f"{r['ratio_onnx_over_torch']:.2f}x | {'yes' if r['ratio_onnx_over_torch'] >= GOAL else 'no'} |")
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
