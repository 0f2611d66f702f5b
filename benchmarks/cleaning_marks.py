"""How much of each image is screen rather than tissue? Field of view and burnt-in marks on BUSI and BrEaST-Lesions-USG.

    python benchmarks/cleaning_marks.py [--datasets busi,breast] [--limit N] \\
        [--out benchmarks/results/cleaning_marks.json] [--overlays DIR --n-overlays 12]

Every image of each dataset goes through :func:`breastfusion.data.cleaning.clean_image` in mode ``fov_marks``
(read as the training path reads it: RGB when the file has colour, so coloured overlays can be seen). Per dataset,
and per class:

- share of images with marks: coloured overlays (Doppler / region boxes, coloured calipers), grey marks (calipers,
  dotted measurement lines, text, body-marker icons, frame lines), any, and marks on the scan itself (away from the
  image's edge: calipers, lines, text; not the corner icons and frame lines most BUSI exports carry);
- share of images whose field of view was cropped, and the mean share of the image area cropped away;
- mark pixels per marked image (median);
- **mark pixels inside the expert lesion mask**: of all detected mark pixels, the share that lies inside the
  expert's lesion outline (calipers sit on the border and the dotted lines cross the lesion, so this is not zero;
  it is the upper bound of lesion tissue painted over) and, of the lesion's area, the share painted over;
- seconds per image (detection and painting, decoding excluded), median and 95th percentile.

A class that carries marks far more often than another is a shortcut a network can learn instead of the tissue.
Writes JSON (per-dataset summary plus per-image rows) and prints markdown rows with the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_description, peak_rss_mb

from breastfusion.data.cases import CASE_ID, IMAGE_PATH, LABEL, MASK_PATH, mask_list
from breastfusion.data.cleaning import CLEANING_VERSION, clean_image, read_for_cleaning
from breastfusion.data.images import read_mask
from breastfusion.data.importers import import_cases
from breastfusion.utils import write_json

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DATASETS = {"busi": DATA / "busi", "breast": DATA / "breast_lesions_usg"}


def measure(cases: pd.DataFrame, limit: int | None) -> list[dict]:
    rows = []
    for _, row in cases.head(limit).iterrows() if limit else cases.iterrows():
        path = row[IMAGE_PATH]
        try:
            arr = read_for_cleaning(path, "fov_marks")
        except Exception as exc:  # noqa: BLE001 - a bad file is logged and skipped, the batch goes on
            print(f"skip {row[CASE_ID]}: {exc}", file=sys.stderr)
            continue
        t = time.perf_counter()
        res = clean_image(arr, "fov_marks")
        dt = time.perf_counter() - t
        rec = {"case_id": row[CASE_ID], "label": row.get(LABEL), "colour": arr.ndim == 3,
               "colour_px": res.n_colour_pixels, "grey_px": res.n_grey_pixels, "inner_px": res.n_inner_pixels,
               "mark_px": res.n_mark_pixels,
               "fov_cropped": "fov_cropped" in res.flags, "fov_refused": "fov_refused" in res.flags,
               "cropped_fraction": round(res.fov_cropped_fraction, 4), "seconds": round(dt, 4),
               "lesion_px": None, "mark_in_lesion_px": None}
        masks = mask_list(row.get(MASK_PATH))
        if masks:
            try:
                lesion = read_mask(masks, res.gray.shape)
                rec["lesion_px"] = int(lesion.sum())
                rec["mark_in_lesion_px"] = int((lesion & res.marks_mask).sum())
            except Exception as exc:  # noqa: BLE001
                print(f"mask skipped for {row[CASE_ID]}: {exc}", file=sys.stderr)
        rows.append(rec)
    return rows


def summarise(rows: list[dict]) -> dict:
    df = pd.DataFrame(rows)
    if df.empty:
        return {"n": 0}
    marked = df["mark_px"] > 0
    les = df[df["lesion_px"].fillna(0) > 0]
    out = {
        "n": int(len(df)),
        "colour_files": int(df["colour"].sum()),
        "with_colour_marks": round(float((df["colour_px"] > 0).mean()), 4),
        "with_grey_marks": round(float((df["grey_px"] > 0).mean()), 4),
        "with_marks": round(float(marked.mean()), 4),
        "with_inner_marks": round(float((df["inner_px"] > 0).mean()), 4),
        "fov_cropped": round(float(df["fov_cropped"].mean()), 4),
        "fov_refused": int(df["fov_refused"].sum()),
        "cropped_fraction_mean": round(float(df["cropped_fraction"].mean()), 4),
        "cropped_fraction_mean_of_cropped": round(float(df.loc[df["fov_cropped"], "cropped_fraction"].mean()), 4)
        if df["fov_cropped"].any() else 0.0,
        "mark_px_median_of_marked": float(df.loc[marked, "mark_px"].median()) if marked.any() else 0.0,
        "seconds_median": round(float(df["seconds"].median()), 4),
        "seconds_p95": round(float(df["seconds"].quantile(0.95)), 4),
    }
    if len(les):
        mk = les[les["mark_px"] > 0]
        out["mark_px_inside_lesion_share"] = round(float(les["mark_in_lesion_px"].sum() / max(les["mark_px"].sum(), 1)), 4)
        out["lesion_area_painted_share"] = round(float(les["mark_in_lesion_px"].sum() / les["lesion_px"].sum()), 5)
        out["lesion_area_painted_max"] = round(float((les["mark_in_lesion_px"] / les["lesion_px"]).max()), 4)
        out["marked_lesion_images_median_inside_share"] = round(float(
            (mk["mark_in_lesion_px"] / mk["mark_px"]).median()), 4) if len(mk) else 0.0
    if "label" in df:
        out["by_class"] = {str(k): {"n": int(len(g)), "with_marks": round(float((g["mark_px"] > 0).mean()), 4),
                                    "with_inner_marks": round(float((g["inner_px"] > 0).mean()), 4),
                                    "with_grey_marks": round(float((g["grey_px"] > 0).mean()), 4),
                                    "with_colour_marks": round(float((g["colour_px"] > 0).mean()), 4)}
                           for k, g in df.groupby("label")}
    return out


def write_overlays(rows: list[dict], cases: pd.DataFrame, out: Path, n: int) -> None:
    """Before/after pictures of the ``n`` images with the most mark pixels (original with marks in red and the
    field-of-view box in green | cleaned and cropped)."""
    from PIL import Image, ImageDraw

    out.mkdir(parents=True, exist_ok=True)
    by_id = cases.set_index(CASE_ID)
    for rec in sorted(rows, key=lambda r: -r["mark_px"])[:n]:
        arr = read_for_cleaning(by_id.loc[rec["case_id"], IMAGE_PATH], "fov_marks")
        res = clean_image(arr, "fov_marks")
        rgb = np.clip(arr * 255 + 0.5, 0, 255).astype(np.uint8)
        rgb = np.repeat(rgb[..., None], 3, axis=2) if rgb.ndim == 2 else rgb
        rgb[res.marks_mask] = (255, 0, 0)
        left = Image.fromarray(rgb)
        y0, y1, x0, x1 = res.fov_box
        ImageDraw.Draw(left).rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 255, 0), width=2)
        right = Image.fromarray(np.clip(res.cropped * 255 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
        canvas = Image.new("RGB", (left.width + right.width + 8, max(left.height, right.height)), (30, 30, 30))
        canvas.paste(left, (0, 0))
        canvas.paste(right, (left.width + 8, 0))
        canvas.save(out / (str(rec["case_id"]).replace("/", "_").replace(" ", "_") + ".png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="busi,breast")
    ap.add_argument("--limit", type=int, default=None, help="first N images of each dataset (a quick look)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cleaning_marks.json"))
    ap.add_argument("--overlays", default=None, help="folder for before/after pictures of the most-marked images")
    ap.add_argument("--n-overlays", type=int, default=12)
    args = ap.parse_args()

    clean_image(np.zeros((64, 64), np.float32), "fov_marks")  # imports (OpenCV, SciPy) outside the timings
    result = {"benchmark": "cleaning_marks", "cleaning_version": CLEANING_VERSION, "machine": machine_description(),
              "date": datetime.now(UTC).strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "datasets": {}}
    table = []
    for name in args.datasets.split(","):
        root = DATASETS[name]
        if not root.exists():
            print(f"{name}: {root} absent, skipped", file=sys.stderr)
            continue
        cases = import_cases(root)
        t = time.perf_counter()
        rows = measure(cases, args.limit)
        summ = summarise(rows)
        summ["wall_s"] = round(time.perf_counter() - t, 1)
        result["datasets"][name] = {"summary": summ, "images": rows}
        table.append((name, summ))
        if args.overlays:
            write_overlays(rows, cases, Path(args.overlays) / name, args.n_overlays)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    write_json(result, args.out)
    print(f"\nMachine: {result['machine']}; {result['date']}; cleaning version {CLEANING_VERSION}\n")
    print("| dataset | images | marks on the scan | any mark | grey marks | colour marks | FOV cropped (area cut) | "
          "mark px inside lesion | lesion area painted | s/image median (p95) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, s in table:
        print(f"| {name} | {s['n']} | {s['with_inner_marks']:.1%} | {s['with_marks']:.1%} | {s['with_grey_marks']:.1%} | "
              f"{s['with_colour_marks']:.1%} | {s['fov_cropped']:.1%} ({s['cropped_fraction_mean_of_cropped']:.1%}) | "
              f"{s.get('mark_px_inside_lesion_share', float('nan')):.1%} | "
              f"{s.get('lesion_area_painted_share', float('nan')):.2%} | "
              f"{s['seconds_median']:.3f} ({s['seconds_p95']:.3f}) |")
    for name, s in table:
        print(f"\n{name} by class, marks on the scan (any mark): " + "; ".join(
            f"{k} {v['with_inner_marks']:.0%} ({v['with_marks']:.0%}) of {v['n']}" for k, v in s.get("by_class", {}).items()))


if __name__ == "__main__":
    main()
