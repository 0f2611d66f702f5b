"""Prediction throughput of ``Predictor`` (decode + resize + tabular + forward, the whole batch path) next to
a bare forward pass of the same backbone on ready-made tensors, measured in the same run.

    python benchmarks/predict_throughput.py BUNDLE IMAGE_FOLDER_OR_TABLE [--repeats 3] [--ignore-masks]

``--ignore-masks`` drops the input's lesion masks: a bundle with a segmenter (data.masks: predicted) then outlines
every lesion itself, so the figure includes segmentation (and radiomics), as a site without outlines gets it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date

import torch

from _machine import machine_description

from breastfusion.inference.predictor import Predictor, cases_from_input


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("input")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=256, help="number of inputs to score per repeat")
    ap.add_argument("--ignore-masks", action="store_true", help="score from the images alone (see the docstring)")
    args = ap.parse_args()
    predictor = Predictor.load(args.bundle, batch_size=args.batch_size)
    cases = cases_from_input(args.input).head(args.limit)
    if args.ignore_masks:
        cases = cases.assign(mask_path=float("nan"))
    n = len(cases)
    predictor.predict_cases(cases.head(args.batch_size))  # warm-up
    t_pred = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = predictor.predict_cases(cases)
        t_pred.append(time.perf_counter() - t0)
    assert len(out) + len(predictor.last_skipped) == n

    model = predictor.model
    size = predictor.size
    x = torch.randn(args.batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
    backbone = model.image_encoder.backbone if model.uses_image else None
    t_fwd = []
    with torch.no_grad():
        backbone(x)
        for _ in range(args.repeats):
            n_batches = (n + args.batch_size - 1) // args.batch_size
            t0 = time.perf_counter()
            for _ in range(n_batches):
                backbone(x)
            t_fwd.append((time.perf_counter() - t0) * n / (n_batches * args.batch_size))
    pred_ips = n / statistics.median(t_pred)
    fwd_ips = n / statistics.median(t_fwd)
    res = {"date": date.today().isoformat(), "machine": f"{machine_description()}, {torch.get_num_threads()} torch threads",
           "command": " ".join(sys.argv), "n_images": n, "predict_images_per_s": round(pred_ips, 1),
           "bare_forward_images_per_s": round(fwd_ips, 1), "ratio": round(pred_ips / fwd_ips, 3),
           "bundle_variant": predictor.bundle.meta["model"]["variant"],
           "backbone": predictor.bundle.meta["model"]["backbone"], "image_size": size,
           "radiomics_in_bundle": bool(predictor.radiomics),
           "segmenter_in_bundle": bool(predictor.segmenter_info), "masks_ignored": bool(args.ignore_masks),
           "mask_sources": out["mask_source"].value_counts().to_dict() if "mask_source" in out else {}}
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
