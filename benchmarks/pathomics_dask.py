"""Per-tile pathomics throughput on the 30 MoNuSeg tiles (40x, 1000x1000): in process vs. a Dask LocalCluster.

    OMP_NUM_THREADS=1 python benchmarks/pathomics_dask.py [--data ../shared/data/monuseg] [--workers 2]
                                                         [--chunk-size 4] [--limit N] [--out runs/features/dask.json]

Runs :func:`breastfusion.features.pathomics_extract.extract_tile_pathomics` (classical segmentation + nucleus features +
tile aggregate) on every tile twice, each time into a fresh folder: with 1 worker (in this process) and with a
``--workers``-process LocalCluster (started and closed by the function, so its start-up is in the wall time; the
start-up alone is also timed). Then a rerun on the cluster's folder measures resume (every tile found in shards).
Reports wall time, tiles/s, nuclei/s, peak memory sampled every 50 ms over this process and all its children
(worker processes included) and the largest difference between the two modes' features (should be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per worker, and the same for the in-process run

import numpy as np
import psutil
from _machine import machine_description, peak_rss_mb

from breastfusion.data.tiling import tiles_from_images
from breastfusion.features.pathomics import tile_feature_names
from breastfusion.features.pathomics_extract import extract_tile_pathomics
from breastfusion.utils import write_json

REPO = Path(__file__).resolve().parents[1]


class MemorySampler:
    """Peak RSS of this process plus all its descendants, and of the largest single descendant, in MB."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_total = self.peak_child = 0.0
        self.max_children = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        total = me.memory_info().rss
        kids = []
        for c in me.children(recursive=True):
            try:
                kids.append(c.memory_info().rss)
            except psutil.Error:  # exited between listing and reading
                pass
        total += sum(kids)
        self.peak_total = max(self.peak_total, total / 2**20)
        self.peak_child = max(self.peak_child, max(kids, default=0) / 2**20)
        self.max_children = max(self.max_children, len(kids))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def run_mode(tiles, work: Path, **kwargs) -> tuple[dict, object]:
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        out = extract_tile_pathomics(tiles, work, progress=False, **kwargs)
        wall = time.perf_counter() - t0
    nuclei = float(out["path_count"].sum())
    return {
        "mode": out.attrs["mode"],
        "wall_s": round(wall, 2),
        "tiles": len(out),
        "tiles_computed": out.attrs["n_computed"],
        "tiles_reused": out.attrs["n_reused"],
        "tiles_skipped": out.attrs["n_skipped"],
        "shards_written": out.attrs["n_shards_written"],
        "nuclei": int(nuclei),
        "tiles_per_s": round(out.attrs["n_computed"] / wall, 3),
        "nuclei_per_s": round(out.attrs["n_nuclei_computed"] / wall, 1),
        "peak_rss_total_mb": round(mem.peak_total, 1),
        "peak_rss_largest_child_mb": round(mem.peak_child, 1),
        "child_processes": mem.max_children,
    }, out


def cluster_start_stop_s(n_workers: int) -> float:
    from dask.distributed import Client, LocalCluster

    t0 = time.perf_counter()
    with (LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0") as c,
          Client(c, set_as_default=False) as client):
        client.submit(sum, [1, 2], pure=False).result()
    return round(time.perf_counter() - t0, 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "monuseg"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=4)
    ap.add_argument("--limit", type=int, default=None, help="only the first N tiles (smoke runs)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()

    import logging

    import distributed  # noqa: F401  (importing it sets its loggers to INFO)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)

    images = sorted((Path(args.data) / "images").glob("*.tif"))
    if not images:
        print(f"no .tif tiles under {Path(args.data) / 'images'}", file=sys.stderr)
        return 2
    if args.limit:
        images = images[: args.limit]
    tiles = tiles_from_images(images, magnification=40)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="pathomics_dask_") as tmp:
        serial, serial_df = run_mode(tiles, Path(tmp) / "serial", n_workers=1, chunk_size=args.chunk_size)
        serial["peak_rss_main_process_mb"] = round(peak_rss_mb(), 1)
        print(json.dumps(serial), flush=True)
        start_s = cluster_start_stop_s(args.workers)
        par, par_df = run_mode(tiles, Path(tmp) / "dask", n_workers=args.workers, chunk_size=args.chunk_size)
        print(json.dumps(par), flush=True)
        resume, _ = run_mode(tiles, Path(tmp) / "dask", n_workers=args.workers, chunk_size=args.chunk_size)
        print(json.dumps(resume), flush=True)

    names = tile_feature_names()
    a = serial_df.set_index("image_path")[names].sort_index().to_numpy(dtype=float)
    b = par_df.set_index("image_path")[names].sort_index().to_numpy(dtype=float)
    same_nan = bool((np.isnan(a) == np.isnan(b)).all())
    max_diff = float(np.nanmax(np.abs(a - b))) if a.shape == b.shape else float("nan")

    result = {
        "date": date.today().isoformat(),
        "machine": machine_description(),
        "command": " ".join(["python", *sys.argv]),
        "data": str(Path(args.data)),
        "n_tiles": len(tiles),
        "tile_size_px": "1000x1000",
        "magnification": 40,
        "mpp": 0.25,
        "method": "classical",
        "chunk_size": args.chunk_size,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_at_start": [round(x, 2) for x in load0],
        "in_process": serial,
        f"local_cluster_{args.workers}_workers": par,
        "cluster_start_stop_s": start_s,
        "speedup_wall": round(serial["wall_s"] / par["wall_s"], 2),
        "resume_rerun": resume,
        "max_abs_feature_difference": max_diff,
        "same_nan_pattern": same_nan,
        "peak_rss_main_process_mb": round(peak_rss_mb(), 1),
        "notes": ("wall times include the LocalCluster start and stop; peak_rss_total_mb sums this process and "
                  "every child process (Dask nannies' worker processes) sampled every 50 ms. The machine is shared "
                  "(see load_average_at_start), so the 2-worker speed-up is bounded by the free cores."),
    }
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))
    if args.out:
        print(f"→ {write_json(result, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
