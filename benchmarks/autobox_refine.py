"""Does LiteMedSAM, prompted with the box of the U-Net's own prediction, sharpen a cross-site outline?

Reads a finished segmentation CV folder (``segment cv`` or a run's ``segmentation/cv``), takes each case's
out-of-fold U-Net mask, prompts LiteMedSAM with the bounding box of each predicted lesion (no expert input at
all: an automatic figure), and scores both against the expert mask.

    python benchmarks/autobox_refine.py runs/multicentre/segmentation/cv --fold 1 [--limit N] [--threads 1]
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
import torch

from _machine import machine_description

from breastfusion.data.cases import mask_list
from breastfusion.data.images import float_to_u8, read_image, read_mask
from breastfusion.segmentation.medsam import BoxPromptSegmenter, from_mask_boxes
from breastfusion.segmentation.metrics import format_summary, segmentation_scores, summarise_scores


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("cv_dir")
    ap.add_argument("--fold", type=int, default=None, help="only this fold's held-out cases")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--margin", type=float, default=0.0, help="pixels added around each predicted box")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cv = Path(args.cv_dir)
    oof = pd.read_csv(cv / "oof_cases.csv")
    if args.fold is not None:
        oof = oof[oof["fold"] == args.fold]
    oof = oof.head(args.limit) if args.limit else oof
    seg = BoxPromptSegmenter()

    def paths(v):
        return [str(p if Path(p).is_absolute() else cv / p) for p in mask_list(v)]

    rows, t_med = [], []
    for _, r in oof.iterrows():
        expert = paths(r["expert_mask_path"])
        if not expert or not isinstance(r["mask_path"], str):
            continue
        img_path = r["image_path"] if Path(r["image_path"]).is_absolute() else str(cv / r["image_path"])
        gray = float_to_u8(read_image(img_path, "gray"))
        truth = read_mask(expert, gray.shape)
        unet = read_mask(paths(r["mask_path"]), gray.shape) if paths(r["mask_path"]) else np.zeros_like(truth)
        boxes = from_mask_boxes(unet, margin_px=args.margin) if unet.any() else []
        t0 = time.perf_counter()
        refined = np.zeros_like(truth)
        if boxes:
            out = seg.segment(gray, boxes)
            refined = np.asarray(out, bool).reshape(-1, *gray.shape).any(axis=0)
        t_med.append(time.perf_counter() - t0)
        a, b = segmentation_scores(unet, truth), segmentation_scores(refined, truth)
        rows.append({"case_id": r["case_id"], "fold": r["fold"], "group": r.get("dup_group", r["case_id"]),
                     "unet_dice": a["dice"], "unet_hd95": a["hd95"], "dice": b["dice"], "iou": b["iou"],
                     "hd95": b["hd95"], "n_boxes": len(boxes)})
    df = pd.DataFrame(rows)
    unet = summarise_scores(df.rename(columns={"dice": "_d", "unet_dice": "dice", "hd95": "_h", "unet_hd95": "hd95"})
                            [["dice", "hd95", "group"]], groups="group")
    refined = summarise_scores(df[["dice", "iou", "hd95", "group"]], groups="group")
    res = {"date": date.today().isoformat(), "machine": machine_description(), "command": " ".join(sys.argv),
           "n_cases": len(df), "unet": unet, "unet_box_then_litemedsam": refined,
           "litemedsam_seconds_median": float(np.median(t_med)) if t_med else None}
    print(f"U-Net out-of-fold:        {format_summary(unet)}")
    print(f"+ LiteMedSAM on its box:  {format_summary(refined)}  ({len(df)} cases)")
    out = Path(args.out or "benchmarks/results/autobox_refine.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
