"""Throughput and peak memory of ``tile_slide`` (concentric multi-magnification PNG tiles, streaming).

    python benchmarks/wsi_tiling.py [SLIDE] [--mags 40,20,10] [--tile-size 256] [--workers 1] [--out DIR]

SLIDE defaults to ../shared/data/he_samples/cmu_small_region.svs. ``--synthetic N`` instead writes a
SYNTHETIC N x N pyramidal tiled TIFF (40x, 0.25 um/px, an elliptical patterned "tissue" on white; written tile
by tile) to a temporary folder and tiles that: a larger slide, to check that memory does not grow with it.

Magnifications above the slide's base magnification would need upsampling, so they are replaced by the base
and its halvings (e.g. a 20x slide asked for 40,20,10 is tiled at 20,10,5); the JSON says so. The output goes
to a temporary folder (deleted afterwards) unless --out is given. Prints one JSON object: a cold run (every
tile written), then a resume run over the finished output (nothing to write: the cost of planning and
checking). ``seconds`` and ``tiles_per_s`` include planning (tissue mask), ``plan_seconds`` is that part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from _machine import cpu_model, peak_rss_mb

from breastfusion.data.slides import open_slide
from breastfusion.data.tiling import plan_tiles, tile_slide

DEFAULT_SLIDE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "he_samples" / "cmu_small_region.svs"


def write_synthetic_slide(path: Path, size: int, tile: int = 256) -> Path:
    """SYNTHETIC pyramidal TIFF (levels 1, 1/4, 1/16), generated tile by tile with bounded memory."""
    import numpy as np
    import tifffile

    def tiles(level_size: int, scale: int):
        for ty in range(0, level_size, tile):
            for tx in range(0, level_size, tile):
                yy, xx = np.mgrid[ty:ty + tile, tx:tx + tile].astype(np.float32) * scale
                r = ((xx - size / 2) / (0.4 * size)) ** 2 + ((yy - size / 2) / (0.3 * size)) ** 2
                tissue = r < 1
                rgb = np.full((tile, tile, 3), 245, np.float32)
                tex = 0.5 + 0.5 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
                rgb[tissue] = np.stack([200 - 40 * tex, 90 + 30 * tex, 170 - 20 * tex], -1)[tissue]
                yield rgb.astype(np.uint8)

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, scale in enumerate((1, 4, 16)):
            n = size // scale
            kw = {"resolution": (4e4, 4e4), "resolutionunit": "CENTIMETER"} if k == 0 else {"subfiletype": 1}
            tw.write(tiles(n, scale), shape=(n, n, 3), dtype=np.uint8, tile=(tile, tile), compression="zlib",
                     photometric="rgb", metadata=None, **kw)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slide", nargs="?", default=str(DEFAULT_SLIDE))
    ap.add_argument("--mags", default="40,20,10", help="requested magnifications, comma-separated")
    ap.add_argument("--tile-size", type=int, default=256)
    ap.add_argument("--min-tissue", type=float, default=0.5)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one, deleted)")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N",
                    help="tile a SYNTHETIC N x N 40x pyramidal TIFF instead of SLIDE (N multiple of 4096)")
    args = ap.parse_args()
    synth_dir = None
    if args.synthetic:
        synth_dir = Path(tempfile.mkdtemp(prefix="wsi_synth_"))
        t0 = time.perf_counter()
        args.slide = str(write_synthetic_slide(synth_dir / f"synthetic_{args.synthetic}.tif", args.synthetic))
        print(f"wrote SYNTHETIC slide {args.slide} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    rss_imports = peak_rss_mb()
    requested = [float(m) for m in args.mags.split(",") if m.strip()]
    slide = open_slide(args.slide)
    base = slide.base_magnification
    note = f"base magnification {base:g}x from {slide.magnification_source}"
    mags = requested
    if max(requested) > base:
        mags = [base / 2**k for k in range(len(requested))]
        note += (f"; requested {','.join(f'{m:g}' for m in requested)}x exceed it (would need upsampling), "
                 f"so tiled at {','.join(f'{m:g}' for m in mags)}x: same ratios, highest = base")
    t0 = time.perf_counter()
    n_plan = len(plan_tiles(slide, mags, args.tile_size, min_tissue=args.min_tissue))
    t_plan = time.perf_counter() - t0
    info = {"slide_size": list(slide.dimensions), "levels": slide.level_count, "mpp": slide.mpp}
    slide.close()

    rss_before = peak_rss_mb()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="wsi_tiling_"))
    try:
        t0 = time.perf_counter()
        df = tile_slide(args.slide, out, magnifications=mags, tile_size=args.tile_size,
                        min_tissue=args.min_tissue, progress=False, workers=args.workers)
        t_cold = time.perf_counter() - t0
        rss_peak = peak_rss_mb()
        t0 = time.perf_counter()
        again = tile_slide(args.slide, out, magnifications=mags, tile_size=args.tile_size,
                           min_tissue=args.min_tissue, progress=False, workers=args.workers)
        t_resume = time.perf_counter() - t0
        disk_mb = sum(f.stat().st_size for f in out.rglob("*.png")) / 2**20
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
        if synth_dir is not None:
            shutil.rmtree(synth_dir, ignore_errors=True)
    assert len(df) == n_plan and again.attrs["n_files_written"] == 0

    n = len(df)
    res = {
        "date": date.today().isoformat(),
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}, "
                   f"Python {platform.python_version()}",
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "slide": Path(args.slide).name + (" (SYNTHETIC)" if args.synthetic else ""),
        **info,
        "note": note,
        "magnifications": mags,
        "tile_size": args.tile_size,
        "workers": args.workers,
        "tiles": n,
        "files": int(df.attrs["n_files_written"]),
        "seconds": round(t_cold, 2),
        "tiles_per_s": round(n / t_cold, 1),
        "files_per_s": round(df.attrs["n_files_written"] / t_cold, 1),
        "plan_seconds": round(t_plan, 2),
        "resume_noop_seconds": round(t_resume, 2),
        "png_MB": round(disk_mb, 1),
        "peak_rss_MB": round(rss_peak, 1),
        "peak_rss_after_imports_MB": round(rss_imports, 1),
        "peak_rss_after_planning_MB": round(rss_before, 1),
    }
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
