"""Lesion segmentation benchmark: the U-Net lesion segmenter (breastfusion.segmentation) on BUSI or
BrEaST-Lesions-USG, k-fold cross-validation grouped by patient and near-duplicate group (the classifier's splits),
or trained on all of one cohort and scored on the other (--external). Dice, IoU and HD95 with 95 % bootstrap CIs
(over split groups), over all scored cases and over the cases whose expert mask holds a lesion; inference seconds
per image on this machine's CPU. BrEaST's 4 normal cases are set aside, as configs/breast_lesions_usg.yaml does,
so on BrEaST every image holds a lesion and prediction runs with require_lesion (as data.masks: predicted does).

    python benchmarks/lesion_segmentation.py --cohort busi --folds 5              # BUSI 5-fold grouped CV
    python benchmarks/lesion_segmentation.py --cohort breast_usg --folds 5        # BrEaST-Lesions-USG
    python benchmarks/lesion_segmentation.py --cohort busi --external             # train BUSI → score BrEaST
    python benchmarks/lesion_segmentation.py --cohort busi --folds 2 --steps 3 --size 64 --max-cases 40  # smoke

Writes benchmarks/results/lesion_segmentation_<cohort>.json (external: ..._<A>_to_<B>.json; --max-cases runs:
..._smoke.json) and prints Markdown rows for docs/RESULTS.md. HD95 is in mm for BrEaST (its Pixel_size column,
cm per pixel) and in pixels for BUSI (no pixel size). Work files go to --out (resumable per fold and per case).
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
from _machine import cpu_model, machine_description, peak_rss_mb

from breastfusion.config import SegmentationConfig
from breastfusion.data.cases import CASE_ID, LABEL, MASK_PATH
from breastfusion.utils import stable_seed, write_json

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
COHORTS = {
    "busi": {"path": DATA / "busi" / "Dataset_BUSI_with_GT", "pixel_size": None, "name": "BUSI", "drop": ()},
    # its 4 normal cases are set aside, as configs/breast_lesions_usg.yaml does (a class too small for 5 folds)
    "breast_usg": {"path": DATA / "breast_lesions_usg", "pixel_size": ("Pixel_size", "cm"),
                   "name": "BrEaST-Lesions-USG", "drop": ("normal",)},
}
NO_LESION = ("normal",)


def load_cohort(name: str, max_cases: int | None, seed: int):
    from breastfusion.data.audit import duplicate_groups
    from breastfusion.data.importers.breast_lesions_usg import import_breast_lesions_usg
    from breastfusion.data.importers import import_busi

    info = COHORTS[name]
    if not info["path"].exists():
        raise SystemExit(f"{info['name']} not found at '{info['path']}' (needs ../shared/data); nothing measured.")
    from breastfusion.tasks.base import drop_label_cases

    cases = import_busi(info["path"]) if name == "busi" else import_breast_lesions_usg(info["path"])
    cases, _ = drop_label_cases(cases, list(info["drop"]))
    if max_cases and max_cases < len(cases):  # smoke runs: a label-stratified random subset
        rng = np.random.default_rng(seed)
        keep = []
        for _, idx in sorted(cases.groupby(LABEL).groups.items()):
            k = min(len(idx), max(2, round(len(idx) * max_cases / len(cases))))
            keep.extend(rng.choice(np.asarray(idx), size=k, replace=False).tolist())
        cases = cases.loc[sorted(keep)].reset_index(drop=True)
    groups = duplicate_groups(cases, progress=True)
    return cases.assign(dup_group=groups.to_numpy())


def inference_seconds(seg, cases, n: int = 24) -> float:
    """Median seconds per image of the segmenter alone (letterbox, network, resize back, post-processing) on
    decoded images, batch 8, over 3 repeats."""
    from breastfusion.segmentation.train import read_case_arrays

    grays = [read_case_arrays(p, "")[0] for p in cases["image_path"].head(n)]
    seg.segment_many(grays[:2])  # warm-up
    times = []
    for _ in range(3):
        t = time.perf_counter()
        seg.segment_many(grays, batch_size=8)
        times.append((time.perf_counter() - t) / len(grays))
    return float(np.median(times))


def fmt(summary: dict, metric: str, digits: int = 3) -> str:
    s = summary.get(metric)
    if not s or s.get("n", 0) == 0:
        return "—"
    lo, hi = s["ci95"]
    return f"{s['mean']:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", choices=sorted(COHORTS), default="busi")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--external", action="store_true", help="train on all of --cohort, score the other cohort")
    ap.add_argument("--steps", type=int, help="optimiser steps per segmenter (default: --epochs)")
    ap.add_argument("--epochs", type=float, help="epochs-equivalent per segmenter (default: the config's, 12)")
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--no-pretrained", action="store_true", help="random encoder (ablation)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--max-cases", type=int, help="smoke runs: a random label-stratified subset of this size")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", default=str(ROOT / "runs" / "lesion_segmentation"))
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from breastfusion.data.splits import make_splits
    from breastfusion.segmentation import (
        load_lesion_segmenter,
        segment_cases,
        train_lesion_segmenter,
    )
    from breastfusion.segmentation.cv import (
        EXPERT_MASK,
        cross_validate_segmenter,
        score_against_expert,
        summarise,
    )

    settings = {"size": args.size, "pretrained": not args.no_pretrained}
    for key in ("steps", "epochs", "batch_size", "lr"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    cfg = SegmentationConfig(**settings)
    a = args.cohort
    b = next(c for c in COHORTS if c != a) if args.external else None
    tag = f"{a}_to_{b}" if b else a
    out = Path(args.out) / (tag + ("_smoke" if args.max_cases else ""))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cases = load_cohort(a, args.max_cases, args.seed)
    src_a = COHORTS[a]["pixel_size"]
    if b is None:
        splits = make_splits(cases, n_splits=args.folds, seed=args.seed, groups=cases.set_index(CASE_ID)["dup_group"])
        require_lesion = not (set(cases[LABEL]) & set(NO_LESION))
        _, scores = cross_validate_segmenter(
            cases, splits, cfg, out, seed=args.seed, progress=True, require_lesion=require_lesion, n_boot=args.n_boot,
            pixel_size_column=src_a[0] if src_a else None, pixel_size_unit=src_a[1] if src_a else "mm")
        summary = json.loads((out / "summary.json").read_text())
        model = out / "fold_0" / "segmenter.safetensors"
        evaluation = f"{args.folds}-fold CV, grouped by duplicate group"
        scored = cases
        train_s = sum((f.get("seconds") or 0) for f in summary["folds"].values())
    else:
        model = out / "segmenter.safetensors"
        t = time.perf_counter()
        train_lesion_segmenter(cases, cfg, model, seed=stable_seed(args.seed, "segmenter", "external"), progress=True)
        train_s = time.perf_counter() - t
        target = load_cohort(b, args.max_cases, args.seed)
        require_lesion = not (set(target[LABEL]) & set(NO_LESION))
        pred = segment_cases(target, load_lesion_segmenter(model), out / f"on_{b}", require_lesion=require_lesion)
        pred[EXPERT_MASK] = target[MASK_PATH].to_numpy()
        pred["group"] = target["dup_group"].fillna(target[CASE_ID]).astype(str).to_numpy()
        src_b = COHORTS[b]["pixel_size"]
        scores = score_against_expert(pred, src_b[0] if src_b else None, src_b[1] if src_b else "mm")
        summary = summarise(scores, args.n_boot, args.seed)
        summary["lesion_cases"] = summarise(scores[~scores["truth_empty"].astype(bool)], args.n_boot, args.seed)
        summary["hd95_unit"] = "mm" if src_b else "px"
        scores.to_csv(out / "scores.csv", index=False)
        evaluation = f"trained on all of {COHORTS[a]['name']}, scored on {COHORTS[b]['name']}"
        scored = target
    seg = load_lesion_segmenter(model)
    s_per_img = inference_seconds(seg, scored)
    wall = time.perf_counter() - t0
    unit = summary.get("hd95_unit", "px")
    result = {
        "date": date.today().isoformat(), "machine": machine_description(), "torch_threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "cohort": COHORTS[a]["name"],
        "target": COHORTS[b]["name"] if b else None, "evaluation": evaluation, "smoke": bool(args.max_cases),
        "n_cases": len(scored), "settings": cfg.model_dump(mode="json"),
        "weights_init": seg.meta["weights_init"], "training_seconds": round(train_s, 1),
        "inference_seconds_per_image": round(s_per_img, 4), "wall_s": round(wall, 1), "peak_rss_mb": round(peak_rss_mb()),
        "summary": summary,
    }
    res_dir = ROOT / "benchmarks" / "results"
    name = f"lesion_segmentation_{tag}{'_smoke' if args.max_cases else ''}.json"
    write_json(result, res_dir / name)
    print(f"\nresults: {res_dir / name}\n")
    print(f"| cohort | evaluation | cases scored | Dice (95% CI) | IoU (95% CI) | HD95 {unit} (95% CI) | s/image (CPU) "
          "| machine |")
    print("|---|---|---|---|---|---|---|---|")
    for label, s in (("all scored cases", summary), ("cases with a lesion", summary.get("lesion_cases", {}))):
        print(f"| {result['cohort']}{' → ' + result['target'] if b else ''} | {evaluation}; {label} | "
              f"{s.get('n_cases', 0)} | {fmt(s, 'dice')} | {fmt(s, 'iou')} | {fmt(s, 'hd95', 1)} | {s_per_img:.3f} | "
              f"{cpu_model()}, {os.cpu_count()} CPUs |")
    print(f"\nsegmenter: {cfg.size} px, {'steps ' + str(cfg.steps) if cfg.steps else f'{cfg.epochs:g} epochs'}, "
          f"batch {cfg.batch_size}, encoder {cfg.encoder} ({seg.meta['weights_init']['kind']} weights); training "
          f"{train_s / 60:.1f} min in all; wall {wall / 60:.1f} min; machine: {result['machine']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
