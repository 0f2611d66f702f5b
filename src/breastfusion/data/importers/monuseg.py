"""MoNuSeg 2018 training tiles as a small REAL multiscale task: concentric 40x / 20x / 10x stacks per tile.

MoNuSeg (Kumar et al., IEEE TMI 2017 and 2020; CC BY-NC-SA 4.0) has 30 H&E tiles of 1000 x 1000 pixels at
40x (about 0.25 um/px) cut from TCGA slides of 30 different patients, seven organs. :func:`import_monuseg_stacks`
turns each tile into one *case* with a few concentric stacks and writes the cases / tiles tables
(:mod:`breastfusion.data.cases`, :mod:`breastfusion.data.tiles`):

* ``case_id`` = the file's TCGA barcode (``TCGA-A7-A13E-01Z-00-DX1``); ``patient_id`` = the TCGA participant
  (``TCGA-A7-A13E``); ``center`` = the TCGA tissue source site, the two characters after ``TCGA-`` (``A7``),
  so leave-one-site-out validation is possible. Beware: every site here contributes a single organ, so
  site and organ are confounded (leaving out a site leaves out some of one organ; a breast-vs-other model
  can partly learn the site's stain).
* ``label`` = ``"breast"`` / ``"other"`` (``task="breast"``, 6 breast vs 24 other) or the organ
  (``task="organ"``: breast, kidney, liver, prostate 6 each; bladder, colon, stomach 2 each).
  ``_organ`` keeps the organ in both cases; ``_source`` the original file name.
* Stacks: ``stacks_per_image`` centres spread over the region where the lowest magnification's field
  (``tile * 40 / mag`` pixels at 40x: 768 px for tile 192 at 10x) fits inside the image: the centre of the
  region first, then its four corners, then the four edge midpoints (for 1000 px images and a 768 px field
  the centres lie in [384, 616]); more than nine stacks add centres drawn uniformly in the region with
  ``seed``. The 40x tile is the central ``tile`` crop, the 20x tile the ``2 * tile`` crop and the 10x tile the
  ``4 * tile`` crop, area-averaged to ``tile`` pixels (:func:`breastfusion.data.synthetic_histology.concentric_stack`).
  ``_mpp`` per tile = 0.25 * 40 / mag (nominal; MoNuSeg gives 40x, not a measured pixel size).

This is a PROXY task: it asks "which organ does this tissue come from", not the Nottingham grade (MoNuSeg
has no grade), on 30 cases. It exists to exercise the multiscale pipeline on real H&E with real stain and
site variation. The stacks of one tile overlap strongly (at 10x the fields of a 1000 px tile overlap by
more than half), so cross-validation must group by case (here one case = one tile = one patient) and
never split the stacks of a tile. The nuclei outlines and masks of MoNuSeg are not used.

Organ labels (:data:`ORGANS`) follow the MoNuSeg 2018 training-set tables (checked against the 30 file names
present). The six tiles MoNuSeg calls "liver" (TCGA-18, -21, -38, -49, -50) carry tissue-source-site codes of
TCGA's lung projects (LUSC / LUAD), so they are probably lung tissue mislabelled in the challenge's
description; we keep MoNuSeg's label and note it here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from breastfusion.data.cases import write_cases
from breastfusion.data.synthetic_histology import concentric_stack
from breastfusion.data.tiles import write_tiles
from breastfusion.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = ["ORGANS", "BREAST_TILES", "TASKS", "SOURCE_MAGNIFICATION", "SOURCE_MPP", "import_monuseg_stacks"]

SOURCE_MAGNIFICATION = 40.0
SOURCE_MPP = 0.25
TASKS = ("breast", "organ")
TILES_DIR = "tiles"
IMAGE_SUFFIXES = (".tif", ".tiff", ".png")

# TCGA participant id -> organ, as in the MoNuSeg 2018 training set tables.
ORGANS: dict[str, str] = {
    # breast (TCGA BRCA sites A7, AR, E2)
    "TCGA-A7-A13E": "breast", "TCGA-A7-A13F": "breast", "TCGA-AR-A1AK": "breast",
    "TCGA-AR-A1AS": "breast", "TCGA-E2-A14V": "breast", "TCGA-E2-A1B5": "breast",
    # kidney (B0, HE)
    "TCGA-B0-5698": "kidney", "TCGA-B0-5710": "kidney", "TCGA-B0-5711": "kidney",
    "TCGA-HE-7128": "kidney", "TCGA-HE-7129": "kidney", "TCGA-HE-7130": "kidney",
    # "liver" as MoNuSeg labels them; the site codes 18, 21 (LUSC) and 38, 49, 50 (LUAD) are TCGA lung sites
    "TCGA-18-5592": "liver", "TCGA-21-5784": "liver", "TCGA-21-5786": "liver",
    "TCGA-38-6178": "liver", "TCGA-49-4488": "liver", "TCGA-50-5931": "liver",
    # prostate (G9, CH)
    "TCGA-G9-6336": "prostate", "TCGA-G9-6348": "prostate", "TCGA-G9-6356": "prostate",
    "TCGA-G9-6362": "prostate", "TCGA-G9-6363": "prostate", "TCGA-CH-5767": "prostate",
    # bladder (DK, G2)
    "TCGA-DK-A2I6": "bladder", "TCGA-G2-A2EK": "bladder",
    # colon (AY, NH)
    "TCGA-AY-A8YK": "colon", "TCGA-NH-A8F7": "colon",
    # stomach (KB, RD)
    "TCGA-KB-A93J": "stomach", "TCGA-RD-A8N9": "stomach",
}
BREAST_TILES = tuple(p for p, o in ORGANS.items() if o == "breast")


def _participant(stem: str) -> str | None:
    parts = stem.split("-")
    if len(parts) < 3 or parts[0].upper() != "TCGA":
        return None
    return "-".join(p.upper() for p in parts[:3])


def _image_dir(root: Path) -> Path:
    if not root.exists():
        raise DataError(f"MoNuSeg folder not found: '{root}'. Expected the MoNuSeg 2018 training set "
                        "(a folder with images/TCGA-*.tif).")
    if not root.is_dir():
        raise DataError(f"MoNuSeg root '{root}' is not a folder.")
    for cand in (root / "images", root / "Tissue Images", root / "Tissue_Images", root):
        if cand.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES and p.name.upper().startswith("TCGA-")
                                 for p in cand.iterdir()):
            return cand
    raise DataError(f"No MoNuSeg images (TCGA-*.tif) in '{root}' or '{root / 'images'}'.")


def _centres(W: int, H: int, field: float, n: int, seed: int) -> list[tuple[float, float]]:
    """Stack centres (x, y): region centre, corners, edge midpoints, then random ones (``seed``)."""
    span_x, span_y = W - field, H - field
    # left / top of the field on whole pixels where possible, so crops need no resampling
    xs = [field / 2 + v for v in (math.floor(span_x / 2), 0, span_x)]
    ys = [field / 2 + v for v in (math.floor(span_y / 2), 0, span_y)]
    c, lo, hi = 0, 1, 2
    order = [(c, c), (lo, lo), (hi, lo), (lo, hi), (hi, hi), (c, lo), (c, hi), (lo, c), (hi, c)]
    pts: list[tuple[float, float]] = []
    for ix, iy in order:
        p = (float(xs[ix]), float(ys[iy]))
        if p not in pts:
            pts.append(p)
        if len(pts) == n:
            return pts
    rng = np.random.default_rng([int(seed), 0x3055])
    tries = 0
    while len(pts) < n and tries < 50 * n:
        tries += 1
        p = (float(field / 2 + math.floor(rng.uniform(0, span_x + 1e-9))) if span_x >= 1 else float(xs[0]),
             float(field / 2 + math.floor(rng.uniform(0, span_y + 1e-9))) if span_y >= 1 else float(ys[0]))
        if p not in pts:
            pts.append(p)
    return pts


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if arr.ndim != 3 or min(arr.shape[:2]) == 0:
        raise ValueError(f"unexpected image shape {arr.shape}")
    return arr


def import_monuseg_stacks(
    root: str | Path,
    out_dir: str | Path,
    *,
    task: str = "breast",
    magnifications: Sequence[float] = (40, 20, 10),
    tile: int = 192,
    stacks_per_image: int = 5,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cut concentric stacks from the MoNuSeg training tiles; write PNGs, ``cases.csv``, ``tiles.csv``.

    ``root``: the MoNuSeg folder (with ``images/``) or the images folder itself. Returns ``(cases, tiles)``
    with absolute paths (the CSVs hold them relative to ``out_dir``). A single unreadable image, an image
    smaller than the lowest magnification's field, or a TCGA tile not in :data:`ORGANS` is skipped with a
    logged warning naming it; no usable image at all raises :class:`DataError`. See the module docstring for
    the geometry and the caveats (proxy task, overlapping stacks, site = organ confounding).
    """
    if task not in TASKS:
        raise ConfigError(f"task must be one of {list(TASKS)}; got {task!r}.")
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or not 8 <= tile <= 1000:
        raise ConfigError(f"tile must be an integer number of pixels between 8 and 1000; got {tile!r}.")
    if isinstance(stacks_per_image, bool) or not isinstance(stacks_per_image, (int, np.integer)) \
            or stacks_per_image < 1:
        raise ConfigError(f"stacks_per_image must be an integer >= 1; got {stacks_per_image!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer; got {seed!r}.")
    if isinstance(magnifications, (str, bytes)) or not isinstance(magnifications, Sequence) or not magnifications:
        raise ConfigError(f"magnifications must be a non-empty sequence such as (40, 20, 10); got {magnifications!r}.")
    mags = []
    for m in magnifications:
        if isinstance(m, bool) or not isinstance(m, (int, float, np.integer, np.floating)) \
                or not math.isfinite(m) or m <= 0:
            raise ConfigError(f"magnifications must be positive numbers; got {m!r}.")
        if m > SOURCE_MAGNIFICATION:
            raise ConfigError(f"MoNuSeg tiles are {SOURCE_MAGNIFICATION:g}x; {m:g}x would need upsampling.")
        mags.append(float(m))
    if len(set(mags)) != len(mags):
        raise ConfigError(f"magnifications must be distinct; got {magnifications!r}.")
    mags = sorted(mags, reverse=True)
    tile = int(tile)
    field = tile * SOURCE_MAGNIFICATION / min(mags)

    img_dir = _image_dir(Path(root))
    files = sorted(p for p in img_dir.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.name.upper().startswith("TCGA-"))
    found = {_participant(p.stem) for p in files}
    absent = sorted(set(ORGANS) - found)
    if absent:
        log.warning("MoNuSeg folder '%s' lacks %d of the 30 training tiles: %s", img_dir, len(absent),
                    ", ".join(absent))

    out_dir = Path(out_dir)
    tiles_root = out_dir / TILES_DIR
    case_rows, tile_rows, skipped = [], [], []
    seen: set[str] = set()
    for path in files:
        pid = _participant(path.stem)
        if pid not in ORGANS:
            log.warning("skipping '%s': not one of the MoNuSeg 2018 training tiles (organ unknown)", path)
            skipped.append(path.name)
            continue
        if pid in seen:
            log.warning("skipping '%s': a second image of participant %s", path, pid)
            skipped.append(path.name)
            continue
        try:
            img = _read_rgb(path)
        except Exception as exc:  # PIL raises many types for broken files
            log.warning("skipping unreadable MoNuSeg image '%s': %s", path, exc)
            skipped.append(path.name)
            continue
        H, W = img.shape[:2]
        if min(H, W) < field:
            log.warning("skipping '%s': %dx%d px is smaller than the %g px field of %gx tiles of %d px",
                        path, W, H, field, min(mags), tile)
            skipped.append(path.name)
            continue
        seen.add(pid)
        case_id = path.stem
        organ = ORGANS[pid]
        centres = _centres(W, H, field, int(stacks_per_image), int(seed))
        if len(centres) < stacks_per_image:
            log.warning("'%s': only %d distinct stack centres fit (asked for %d)", path, len(centres),
                        stacks_per_image)
        case_dir = tiles_root / case_id
        case_dir.mkdir(parents=True, exist_ok=True)
        for old in case_dir.glob(f"{case_id}_s*_*x.png"):
            old.unlink()
        for j, (cx, cy) in enumerate(centres):
            stack = concentric_stack(img, (cx, cy), tile, mags, base_magnification=SOURCE_MAGNIFICATION)
            for m in mags:
                out = case_dir / f"{case_id}_s{j}_{m:g}x.png"
                _save_png(out, stack[m])
                tile_rows.append({
                    "case_id": case_id, "stack_id": str(j), "magnification": int(m) if m.is_integer() else m,
                    "image_path": str(out.resolve()), "_mpp": SOURCE_MPP * SOURCE_MAGNIFICATION / m,
                    "_x": cx, "_y": cy, "_source": path.name,
                })
        case_rows.append({
            "case_id": case_id, "patient_id": pid, "center": pid.split("-")[1],
            "label": organ if task == "organ" else ("breast" if organ == "breast" else "other"),
            "_organ": organ, "_source": path.name,
        })
    if not case_rows:
        raise DataError(f"No usable MoNuSeg image in '{img_dir}'"
                        + (f" (skipped: {', '.join(skipped)})." if skipped else "."))
    cases = pd.DataFrame(case_rows)
    tiles = pd.DataFrame(tile_rows)
    write_cases(cases, out_dir / "cases.csv")
    write_tiles(tiles, out_dir / "tiles.csv")
    _write_notice(out_dir / "README.txt", cases, tiles, img_dir, dict(
        task=task, magnifications=tuple(mags), tile=tile, stacks_per_image=int(stacks_per_image), seed=int(seed)))
    log.info("MoNuSeg stacks: %d cases, %d tiles in %s (%d skipped)", len(cases), len(tiles), out_dir, len(skipped))
    return cases, tiles


def _save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path, optimize=False, compress_level=1)


def _write_notice(path: Path, cases: pd.DataFrame, tiles: pd.DataFrame, src: Path, params: dict) -> None:
    from breastfusion.utils import write_text

    counts = cases["label"].value_counts().sort_index().to_dict()
    lines = [
        "MoNuSeg 2018 training tiles as concentric multi-magnification stacks (REAL data, PROXY task).",
        "",
        "Source: Kumar et al., IEEE TMI 2017 / 2020 (MoNuSeg challenge), TCGA H&E tiles at 40x; licence",
        "CC BY-NC-SA 4.0 (these derived tiles inherit it: non-commercial, share alike, attribute).",
        f"Read from: {src}",
        "",
        "The label is the organ (or breast vs other), not a grade. Stacks of one case overlap strongly at low",
        "magnification: split by case. Each tissue source site ('center') holds a single organ.",
        "",
        "Parameters:",
        *[f"  {k}: {v}" for k, v in params.items()],
        "",
        f"Contents: {len(cases)} cases, {len(tiles)} tiles in {TILES_DIR}/; labels: "
        + ", ".join(f"{k} {v}" for k, v in counts.items()),
        "",
    ]
    write_text("\n".join(lines), path)
