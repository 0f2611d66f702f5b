"""Learned nuclei segmentation (breastfusion.features.nuclei.learned) on MoNuSeg: tile-grouped cross-validation on
the 13 tiles with ImageScope XML, against the classical method on the same tiles.

    OMP_NUM_THREADS=1 python benchmarks/nuclei_learned.py [--data ../shared/data/monuseg] [--folds 4]
        [--steps N | --epochs E] [--batch-size 8] [--crop 128] [--device auto|cpu|cuda] [--threads 1]
        [--no-extra] [--out runs/nuclei/learned.json] [--models runs/nuclei/learned_models]

Each of the 13 annotated tiles is tested exactly once: the sorted tile list is dealt round-robin into ``--folds``
folds, and the model of a fold is trained on the annotated tiles of the other folds only. Unless ``--no-extra``,
the 17 MoNuSeg training tiles that have only a binary mask (different tiles, from other patients) are added to
every fold's training set as foreground-only supervision: they never appear in any test fold. Reports per fold
and mean Dice, AJI, detection F1 (IoU > 0.5) and PQ, training time, seconds per 1000x1000 tile for inference
(network + watershed, image already decoded), peak RSS, the machine and the date, plus the classical method's
numbers on the same tiles. Training resumes from the per-fold checkpoints in ``--models`` when re-run after a kill.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
from _machine import machine_description, peak_rss_mb

REPO = Path(__file__).resolve().parents[1]
METRICS = ("dice", "aji", "f1", "pq")
GOALS = {"aji": 0.60, "dice": 0.80}


def _mean(rows, key):
    return round(float(np.mean([r[key] for r in rows])), 4) if rows else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "monuseg"))
    ap.add_argument("--folds", type=int, default=4)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="optimiser steps per fold (default 300)")
    g.add_argument("--epochs", type=float, default=None, help="passes over the training pixels instead of --steps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128, help="training crop, pixels at the working resolution")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--work-mpp", type=float, default=0.5)
    ap.add_argument("--channels", default="16,32,64,128", help="U-Net widths per level")
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--no-extra", action="store_true", help="do not add the 17 foreground-only tiles")
    ap.add_argument("--extra-weight", type=float, default=0.3, help="share of crops from foreground-only tiles")
    ap.add_argument("--tta", action="store_true", help="flip test-time augmentation at inference (4x network time)")
    ap.add_argument("--limit-folds", type=int, default=None, help="run only the first K folds (smoke runs)")
    ap.add_argument("--models", default=str(REPO / "runs" / "nuclei" / "learned_models"),
                    help="folder for the per-fold model files and checkpoints")
    ap.add_argument("--out", default=None, help="also write the JSON here (e.g. runs/nuclei/learned.json)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from breastfusion.features.nuclei import instance_scores, segment_nuclei
    from breastfusion.features.nuclei.annotations import load_annotated_dir
    from breastfusion.features.nuclei.learned import (
        load_nuclei_model,
        nuclei_from_maps,
        predict_nuclei_maps,
    )
    from breastfusion.training.nuclei import train_nuclei_model

    t_all = time.perf_counter()
    root = Path(args.data)
    if not (root / "annotations").is_dir():
        print(f"no MoNuSeg annotations under '{root}'", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    data = load_annotated_dir(root)
    load_s = time.perf_counter() - t0
    tiles = sorted(data.tiles, key=lambda t: t.name)
    extra = [] if args.no_extra else [(t.image, t.mask) for t in data.foreground_only]
    k = max(2, min(args.folds, len(tiles)))
    folds = [[t for i, t in enumerate(tiles) if i % k == f] for f in range(k)]
    if args.limit_folds:
        folds = folds[: args.limit_folds]
    steps = args.steps if args.steps is not None or args.epochs is not None else 300
    channels = tuple(int(c) for c in args.channels.split(","))
    models = Path(args.models)
    print(f"{len(tiles)} annotated tiles in {k} folds, {len(extra)} foreground-only tiles, loaded in {load_s:.1f} s",
          file=sys.stderr, flush=True)

    fold_rows, tile_rows, classical_rows = [], [], []
    device_used = None
    for f, test in enumerate(folds):
        test_names = {t.name for t in test}
        train = [t for t in tiles if t.name not in test_names]
        path = models / f"fold{f}.safetensors"
        t0 = time.perf_counter()
        train_nuclei_model([t.image for t in train], [t.labels for t in train], out_path=path,
                           steps=None if args.epochs is not None else steps, epochs=args.epochs, crop=args.crop,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed + f,
                           mpp=args.mpp, work_mpp=args.work_mpp, channels=channels, extra_foreground=extra or None,
                           extra_weight=args.extra_weight,
                           device=args.device, progress=False, resume=True)
        wall = time.perf_counter() - t0
        model = load_nuclei_model(path, device=args.device)
        device_used = str(model.device)
        tr = model.meta["training"]
        rows = []
        for t in test:
            t1 = time.perf_counter()
            fg, dist = predict_nuclei_maps(t.image, model, mpp=args.mpp, tta=args.tta)
            t2 = time.perf_counter()
            pred = nuclei_from_maps(fg, dist, mpp=args.mpp, **model.postprocess)
            t3 = time.perf_counter()
            s = instance_scores(pred, t.labels)
            row = {"fold": f, "tile": t.name, **{m: round(float(s[m]), 4) for m in METRICS}, "n_gt": s["n_gt"],
                   "n_pred": s["n_pred"], "seg_s": round(t3 - t1, 3), "network_s": round(t2 - t1, 3),
                   "watershed_s": round(t3 - t2, 3)}
            rows.append(row)
            t1 = time.perf_counter()
            cpred = segment_nuclei(t.image, mpp=args.mpp)
            cs = instance_scores(cpred, t.labels)
            classical_rows.append({"fold": f, "tile": t.name, **{m: round(float(cs[m]), 4) for m in METRICS},
                                   "n_pred": cs["n_pred"], "seg_s": round(time.perf_counter() - t1, 3)})
            print(json.dumps({"learned": row, "classical": classical_rows[-1]}), file=sys.stderr, flush=True)
        tile_rows += rows
        fold_rows.append({"fold": f, "test_tiles": [t.name for t in test], "n_train_tiles": len(train),
                          "n_foreground_only_tiles": len(extra), "steps": tr["steps"],
                          "train_seconds": tr["seconds"], "train_wall_s_this_run": round(wall, 1),
                          "final_loss": tr["final_loss"], **{m: _mean(rows, m) for m in METRICS},
                          "seg_s": _mean(rows, "seg_s")})
        print(json.dumps(fold_rows[-1]), file=sys.stderr, flush=True)

    learned_fold_mean = {m: _mean(fold_rows, m) for m in METRICS}
    learned_tile_mean = {m: _mean(tile_rows, m) for m in (*METRICS, "seg_s", "network_s", "watershed_s")}
    classical_mean = {m: _mean(classical_rows, m) for m in (*METRICS, "seg_s")}
    best = "learned" if learned_tile_mean["aji"] >= classical_mean["aji"] else "classical"
    best_scores = learned_tile_mean if best == "learned" else classical_mean
    res = {
        "date": date.today().isoformat(),
        "machine": machine_description(),
        "device": device_used,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "data": str(root),
        "n_annotated_tiles": len(tiles),
        "n_folds": k,
        "folds_run": len(folds),
        "foreground_only_training_tiles": len(extra),
        "settings": {"steps": steps if args.epochs is None else None, "epochs": args.epochs,
                     "batch_size": args.batch_size, "crop": args.crop, "lr": args.lr, "work_mpp": args.work_mpp,
                     "channels": list(channels), "mpp": args.mpp, "seed": args.seed,
                     "extra_weight": args.extra_weight if extra else None, "tta": args.tta},
        "learned": {
            "postprocess": model.postprocess if fold_rows else None,
            "mean_over_folds": learned_fold_mean,
            "mean_over_tiles": learned_tile_mean,
            "seconds_per_1000x1000_tile": learned_tile_mean["seg_s"],
            "train_seconds_total": round(sum(r["train_seconds"] for r in fold_rows), 1),
            "train_seconds_per_fold": _mean(fold_rows, "train_seconds"),
            "folds": fold_rows,
            "tiles": tile_rows,
        },
        "classical": {"mean_over_tiles": classical_mean, "seconds_per_1000x1000_tile": classical_mean["seg_s"],
                      "tiles": classical_rows},
        "goals": {"target": GOALS, "best_method": best,
                  "met": {m: bool(best_scores[m] >= v) for m, v in GOALS.items()}},
        "load_seconds": round(load_s, 1),
        "total_seconds": round(time.perf_counter() - t_all, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "notes": (
            "Tile-grouped CV: every annotated tile is tested once, by a model that never saw it. "
            + ("The 17 MoNuSeg tiles with only binary masks (other tiles, other patients) were added to every fold's "
               "training set as foreground-only supervision. " if extra else "No foreground-only tiles were used. ")
            + "Post-processing thresholds are the library defaults, chosen on a development split of these same "
            "13 tiles, so they are not fully held out. OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "unset")
            + "."
        ),
    }
    print(json.dumps(res, indent=2))
    if args.out:
        from breastfusion.utils import write_json

        write_json(res, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
