"""Do the image branch's explanation maps point at the lesion? Scored against BUSI's expert masks.

    python benchmarks/explain_localisation_busi.py [--run runs/busi] [--occlusion-cases 60] \\
        [--clean auto|none|fov|fov_marks] [--out runs/explain_localisation/busi.json]

Uses the image-only fold models of a finished BUSI run (``<run>/deep/image_only/fold<k>/best.safetensors``).
Each fold model explains only its *own held-out* cases, so no map comes from a model that saw the case. Only
benign and malignant cases are used, since normal images have no lesion mask. Each case is read as the
Predictor reads it: grey, square-resized to the model size. Its mask gets the same resize, nearest-neighbour.
The maps are for the true class.

Scores per method (Grad-CAM, Grad-CAM++, and occlusion on ``--occlusion-cases`` cases spread evenly over the folds):
- **pointing game** (Zhang et al., 2018): a hit when the map's maximum lies in the lesion mask, dilated by
  ``--tolerance`` px at model resolution. Chance level is the dilated mask's share of the image.
- **energy inside the mask**: the share of the map's total mass that falls on the lesion. Chance level is the
  mask's share of the image.
- **energy on burnt-in marks**: the share of the map's mass on the calipers, dotted lines and text found by
  :mod:`breastfusion.data.cleaning` (grown by 2 px at model resolution), and how often the peak lies on them.
  Chance level is the marks' share of the image. With cleaning the marks are painted over, but their places
  are still scored: a model that no longer looks there has stopped reading them.
Each score comes with a 95 % case-bootstrap CI and is split by class and by whether the fold model was right.

``--clean`` (default ``auto``: the run's ``image.clean``) reads each case as the run's models were trained to read
it: cropped to the field of view (``fov``) and with the marks painted over (``fov_marks``); the lesion and mark
masks get the same crop. Compare a run trained with ``--set image.clean=none`` and one with ``fov_marks``.
Writes JSON and a figure of example maps with mask outlines beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_description, peak_rss_mb

from breastfusion.config import load_config
from breastfusion.data.cases import CASE_ID, IMAGE_PATH, LABEL, MASK_PATH, mask_list
from breastfusion.data.cleaning import clean_image, read_for_cleaning
from breastfusion.data.images import read_mask
from breastfusion.explain.gradcam import cam_maps, occlusion
from breastfusion.explain.modality import grey_in_model_space
from breastfusion.models.fusion import FusionClassifier
from breastfusion.models.pretrained import backbone_data_config, create_backbone
from breastfusion.training.data import load_resized
from breastfusion.training.trainer import load_weights

REPO = Path(__file__).resolve().parents[1]


def fold_model(cfg, classes: list[str], weights: Path):
    backbone, _ = create_backbone(cfg.model.backbone, pretrained=False)
    m = cfg.model
    model = FusionClassifier(len(classes), variant="image", backbone=backbone, n_tabular=0, image_dim=m.image_dim,
                             tabular_dim=m.tabular_dim, tabular_hidden=m.tabular_hidden,
                             fusion_hidden=m.fusion_hidden, dropout=m.dropout)
    load_weights(model, weights)
    return model.eval(), backbone_data_config(backbone)


def _to_model(m: np.ndarray, box, size: int) -> np.ndarray:
    y0, y1, x0, x1 = box
    m = m[y0:y1, x0:x1]
    return np.array(Image.fromarray(m.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)) > 127


def case_geometry(row, size: int, clean: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(model input uint8, lesion mask, burnt-in marks mask), the masks cropped as the image is (``clean``)."""
    found = clean_image(read_for_cleaning(row[IMAGE_PATH], "fov_marks"), "fov_marks")
    shape = found.gray.shape
    box = found.fov_box if clean != "none" else (0, shape[0], 0, shape[1])
    lesion = read_mask(mask_list(row[MASK_PATH]), shape)
    marks = ndimage.binary_dilation(_to_model(found.marks_mask, box, size), iterations=2)
    return load_resized(row[IMAGE_PATH], size, clean), _to_model(lesion, box, size), marks


def mark_scores(heat: np.ndarray, marks: np.ndarray) -> dict[str, float]:
    heat = np.clip(np.nan_to_num(heat.astype(np.float64)), 0, None)
    total = heat.sum()
    if total <= 0 or not marks.any():
        return {"mark_hit": float("nan"), "mark_energy": float("nan"), "chance_mark": float(marks.mean())}
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    return {"mark_hit": float(marks[peak]), "mark_energy": float(heat[marks].sum() / total),
            "chance_mark": float(marks.mean())}


def scores(heat: np.ndarray, mask: np.ndarray, tol: int) -> dict[str, float]:
    heat = np.clip(np.nan_to_num(heat.astype(np.float64)), 0, None)
    dil = ndimage.binary_dilation(mask, iterations=tol) if tol > 0 else mask
    total = heat.sum()
    if total <= 0:  # a flat map points nowhere
        return {"hit": 0.0, "energy": float("nan"), "chance_hit": float(dil.mean()), "chance_energy": float(mask.mean())}
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    return {"hit": float(dil[peak]), "energy": float(heat[mask].sum() / total), "chance_hit": float(dil.mean()),
            "chance_energy": float(mask.mean())}


def boot_ci(x: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    r = np.random.default_rng(seed)
    means = x[r.integers(0, len(x), (n_boot, len(x)))].mean(axis=1)
    return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def overlay_figure(examples: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(examples)
    fig, axes = plt.subplots(2, n, figsize=(2.3 * n, 4.9), squeeze=False)
    for j, ex in enumerate(examples):
        for i, key in enumerate(("gradcam", "gradcam++")):
            ax = axes[i, j]
            ax.imshow(ex["image"], cmap="gray")
            h = ex[key]
            ax.imshow(h / (h.max() + 1e-12), cmap="jet", alpha=0.4)
            ax.contour(ex["mask"], levels=[0.5], colors="white", linewidths=1.2)
            pk = np.unravel_index(np.argmax(h), h.shape)
            ax.plot(pk[1], pk[0], marker="x", color="white", ms=9, mew=2)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{ex['case']}\n{ex['label']}, p={ex['p_true']:.2f}", fontsize=8)
        axes[0, 0].set_ylabel("Grad-CAM")
        axes[1, 0].set_ylabel("Grad-CAM++")
    fig.suptitle("BUSI image-only fold models on held-out cases: map, expert lesion outline (white), peak (x)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=str(REPO / "runs" / "busi"), help="a finished BUSI run folder")
    ap.add_argument("--model", default="image_only", help="fold models under <run>/deep/<model> (image-only)")
    ap.add_argument("--tolerance", type=int, default=15, help="pointing-game tolerance in px at model size")
    ap.add_argument("--occlusion-cases", type=int, default=60, help="cases also explained by occlusion (slow)")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clean", default="auto", choices=["auto", "none", "fov", "fov_marks"],
                    help="how cases are read (auto: the run's image.clean, as its models were trained)")
    ap.add_argument("--out", default="runs/explain_localisation/busi.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    run = Path(args.run)
    if not (run / "splits.csv").is_file() or not (run / "deep" / args.model).is_dir():
        print(f"'{run}' is not a finished BUSI run with {args.model} fold models: run benchmarks/busi_cv.py first; "
              "nothing measured.", file=sys.stderr)
        return 1
    cfg = load_config(run / "config.yaml")
    cases = pd.read_csv(run / "cases.csv", dtype={CASE_ID: str})
    splits = pd.read_csv(run / "splits.csv", dtype={CASE_ID: str})
    classes = sorted(cases[LABEL].unique()) if cfg.data.labels is None else list(cfg.data.labels)
    cases = cases.merge(splits[[CASE_ID, "fold"]], on=CASE_ID)
    lesion = cases[cases[MASK_PATH].map(lambda v: bool(mask_list(v))) & ~cases[LABEL].isin(cfg.data.no_lesion_labels)]
    size = cfg.image.size
    clean = cfg.image.clean if args.clean == "auto" else args.clean
    if clean != cfg.image.clean:
        print(f"note: the run's models were trained with image.clean={cfg.image.clean}; reading with {clean}",
              file=sys.stderr)
    rows, examples = [], []
    t0 = time.perf_counter()
    n_occ, seen = 0, 0
    stride = max(1, len(lesion) // max(1, args.occlusion_cases))  # spread over folds and classes
    for fold in sorted(lesion["fold"].unique()):
        model, dc = fold_model(cfg, classes, run / "deep" / args.model / f"fold{fold}" / "best.safetensors")
        mean = torch.tensor(dc["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(dc["std"], dtype=torch.float32).view(1, 3, 1, 1)
        grey = grey_in_model_space(dc["mean"], dc["std"])
        test = lesion[lesion["fold"] == fold].reset_index(drop=True)
        for i, row in test.iterrows():
            img, mask, marks = case_geometry(row, size, clean)
            if not mask.any():
                continue
            x = (torch.from_numpy(img).float().div(255.0)[None, None].expand(1, 3, -1, -1) - mean) / std
            target = classes.index(row[LABEL])
            res = cam_maps(model, x, None, target_class=target, methods=["gradcam", "gradcam++"])
            maps = {m: res.maps[("image", m)][0] for m in ("gradcam", "gradcam++")}
            if n_occ < args.occlusion_cases and seen % stride == 0:
                maps["occlusion"] = occlusion(model, x, None, target_class=target, fill=grey)
                n_occ += 1
            seen += 1
            p = res.probs[0]
            rec = {CASE_ID: row[CASE_ID], LABEL: row[LABEL], "fold": int(fold), "p_true": float(p[target]),
                   "correct": bool(int(np.argmax(p)) == target), "mask_fraction": float(mask.mean()),
                   "marks_fraction": float(marks.mean())}
            for m, h in maps.items():
                for k, v in {**scores(h, mask, args.tolerance), **mark_scores(h, marks)}.items():
                    rec[f"{m}_{k}"] = v
            rows.append(rec)
            if len(examples) < 8 and i % 17 == 0 and rec["correct"] == (len(examples) % 2 == 0):
                examples.append({"case": row[CASE_ID].split("/")[-1], "label": row[LABEL], "p_true": rec["p_true"],
                                 "image": img, "mask": mask, **{m: maps[m] for m in ("gradcam", "gradcam++")}})
        print(f"fold {fold}: {len(test)} lesion cases, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    wall = time.perf_counter() - t0
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out.with_suffix(".cases.csv"), index=False)

    summary = []
    for method in ("gradcam", "gradcam++", "occlusion"):
        if f"{method}_hit" not in df:
            continue
        d = df[df[f"{method}_hit"].notna()]
        for group, sub in [("all", d)] + [(f"class {c}", d[d[LABEL] == c]) for c in sorted(d[LABEL].unique())] + \
                          [("fold model right", d[d["correct"]]), ("fold model wrong", d[~d["correct"]])]:
            if len(sub) == 0:
                continue
            hit = boot_ci(sub[f"{method}_hit"].to_numpy(), args.n_boot, 0)
            en = boot_ci(sub[f"{method}_energy"].to_numpy(), args.n_boot, 1)
            marked = sub[sub[f"{method}_mark_energy"].notna()]
            summary.append({"method": method, "group": group, "n": len(sub), "pointing_game": hit,
                            "pointing_chance": float(sub[f"{method}_chance_hit"].mean()), "energy_in_mask": en,
                            "energy_chance": float(sub[f"{method}_chance_energy"].mean()),
                            "n_with_marks": len(marked),
                            "peak_on_marks": boot_ci(marked[f"{method}_mark_hit"].to_numpy(), args.n_boot, 2),
                            "energy_on_marks": boot_ci(marked[f"{method}_mark_energy"].to_numpy(), args.n_boot, 3),
                            "marks_chance": float(marked[f"{method}_chance_mark"].mean()) if len(marked) else None})
    fig = overlay_figure(examples, out.with_suffix(".png")) if examples else None
    res = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine_description(),
           "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]), "run": str(run),
           "fold_models": args.model, "clean": clean, "trained_clean": cfg.image.clean,
           "tolerance_px": args.tolerance, "image_size": size, "n_cases": len(df),
           "occlusion_cases": n_occ, "wall_s": round(wall, 1), "peak_rss_mb": peak_rss_mb(),
           "summary": summary, "figure": str(fig) if fig else None}
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\n{len(df)} held-out lesion cases, {wall:.0f} s, {machine_description()}\n")
    print(f"image.clean: trained {cfg.image.clean}, read {clean}\n")
    print("| method | cases | n | pointing game (95% CI) | chance | energy in mask (95% CI) | chance "
          "| peak on marks (95% CI) | energy on marks (95% CI) | chance (n marked) |")
    print("|---|---|---:|---|---:|---|---:|---|---|---|")
    for s in summary:
        h, e, mh, me = s["pointing_game"], s["energy_in_mask"], s["peak_on_marks"], s["energy_on_marks"]
        mc = f"{s['marks_chance']:.3f} ({s['n_with_marks']})" if s["marks_chance"] is not None else "—"
        print(f"| {s['method']} | {s['group']} | {s['n']} | {h[0]:.3f} ({h[1]:.3f}–{h[2]:.3f}) | {s['pointing_chance']:.3f} "
              f"| {e[0]:.3f} ({e[1]:.3f}–{e[2]:.3f}) | {s['energy_chance']:.3f} "
              f"| {mh[0]:.3f} ({mh[1]:.3f}–{mh[2]:.3f}) | {me[0]:.3f} ({me[1]:.3f}–{me[2]:.3f}) | {mc} |")
    print(f"\n→ {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
