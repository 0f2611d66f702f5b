"""Concentric multi-magnification tiles of a slide: planning on tissue, reading stacks, resumable tiling.

Slides are opened with :func:`breastfusion.data.slides.open_slide` (readers, magnification, coordinates).

Concentric stacks
-----------------
All positions are level-0 pixel coordinates, pixel ``(i, j)`` covering ``[i, i+1) x [j, j+1)``. A tile at
magnification ``m`` centred on the point ``(cx, cy)`` covers the square of side
``tile_size * base / m`` level-0 pixels centred on that point, read from the coarsest pyramid level that
is at least as fine as needed and resized to ``tile_size`` with area averaging (PIL ``BOX`` with a
sub-pixel source box, so the geometry is exact). A *stack* is the set of such tiles for several
magnifications around one centre: each halving of the magnification doubles the field of view, so the
central ``tile_size/2`` square of the 10x tile shows the whole 20x tile. Parts of a field beyond the
slide are white.

Tiling and resume
-----------------
:func:`tile_slide` plans tile centres on tissue (grid at the highest requested magnification), then
streams: read one stack, write its PNGs, next. Each PNG is written to a temporary file in
``<out>/.tiling/tmp-<slide>/`` and renamed into ``<out>/<mag>x/<slide>_<x>_<y>.png``, so a file under its
final name is always complete. Progress rows are appended (flushed and fsynced per chunk) to
``<out>/.tiling/<slide>.part.csv``; at the end the slide's rows are merged atomically into
``<out>/tiles.csv`` and the done-marker ``<out>/.tiling/<slide>.done.json`` is written. After a kill, the
next call (``resume=True``) re-plans (deterministically), skips every tile whose files all exist and
are sound, and writes only the others. A file is sound when it is a PNG of ``tile_size`` pixels whose chunk
checksums all verify up to its end marker (PIL ``verify``: no pixel decoding); a truncated, corrupt or
wrong-size file (a filesystem that lost a tail after a crash, a disk error, a hand edit) is logged and
rewritten, never reused. The parameters of a run are kept in ``<out>/.tiling/<slide>.params.json``;
resuming with different parameters is refused. One process per output folder.

Tiles tables
------------
:func:`tiles_from_input` turns what a user points at (an image, a folder of images, a tiles table or a
:func:`tile_slide` index) into the long tiles table of :mod:`breastfusion.data.tiles`.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from breastfusion.data.cases import CASE_ID, IMAGE_PATH
from breastfusion.data.slides import Slide, _as_slide, tissue_mask
from breastfusion.data.tiles import MAGNIFICATION, STACK_ID
from breastfusion.errors import ConfigError, DataError
from breastfusion.utils import atomic_path, write_json

log = logging.getLogger(__name__)

INDEX_NAME = "tiles.csv"
STATE_DIR = ".tiling"
_INDEX_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")  # images a tiles table can be built from


# ====================================================================== planning and stacks
def mag_label(m: float) -> str:
    return f"{float(m):g}x"


def _fov0(slide: Slide, mag: float, tile_size: int) -> float:
    return tile_size * slide.base_magnification / float(mag)


def _auto_mask_size(slide: Slide, fov0: float) -> int:
    W, H = slide.dimensions
    return int(np.clip(8 * max(W, H) / max(fov0, 1.0), 512, 4096))


def plan_tiles(
    slide: Slide,
    magnifications: Sequence[float] = (40, 20, 10),
    tile_size: int = 256,
    stride: int | None = None,
    min_tissue: float = 0.5,
    *,
    mask: np.ndarray | None = None,
    allow_upsample: bool = False,
) -> pd.DataFrame:
    """Tile centres on tissue, in level-0 coordinates.

    The grid is laid at the highest magnification in ``magnifications``: tiles of ``tile_size`` pixels at that
    magnification, ``stride`` pixels apart (default ``tile_size``: no overlap), entirely inside the slide. A
    tile is kept when at least ``min_tissue`` of its field (at the highest magnification) is tissue in
    ``mask`` (default :func:`tissue_mask` at a resolution where a tile spans >= 8 mask pixels).
    Columns: ``slide``, ``x``, ``y`` (centre), ``col``, ``row`` (grid indices), ``tissue`` (fraction).
    """
    tile_size = _check_tile_size(tile_size)
    mags = slide.check_magnifications(magnifications, allow_upsample=allow_upsample)
    if not 0.0 <= float(min_tissue) <= 1.0:
        raise ConfigError(f"'min_tissue' must be in [0, 1]. Got {min_tissue!r} instead.")
    stride = tile_size if stride is None else int(stride)
    if stride <= 0:
        raise ConfigError(f"'stride' must be a positive number of pixels. Got {stride!r} instead.")
    m_max = max(mags)
    fov0 = _fov0(slide, m_max, tile_size)
    step0 = stride * slide.base_magnification / m_max
    W, H = slide.dimensions
    nx = int(math.floor((W - fov0) / step0 + 1e-9)) + 1 if W >= fov0 else 0
    ny = int(math.floor((H - fov0) / step0 + 1e-9)) + 1 if H >= fov0 else 0
    cols = ["slide", "x", "y", "col", "row", "tissue"]
    if nx == 0 or ny == 0:
        return pd.DataFrame(columns=cols)
    if mask is None:
        mask = tissue_mask(slide, size=_auto_mask_size(slide, fov0))
    mask = np.asarray(mask, dtype=bool)
    mh, mw = mask.shape
    sx, sy = W / mw, H / mh
    integral = np.zeros((mh + 1, mw + 1), dtype=np.int64)
    integral[1:, 1:] = mask.cumsum(0).cumsum(1)

    ii, jj = np.meshgrid(np.arange(nx), np.arange(ny))
    left = ii.ravel() * step0
    top = jj.ravel() * step0
    mx0 = np.clip(np.floor(left / sx + 0.5).astype(int), 0, mw - 1)
    my0 = np.clip(np.floor(top / sy + 0.5).astype(int), 0, mh - 1)
    mx1 = np.clip(np.floor((left + fov0) / sx + 0.5).astype(int), mx0 + 1, mw)
    my1 = np.clip(np.floor((top + fov0) / sy + 0.5).astype(int), my0 + 1, mh)
    tissue_px = integral[my1, mx1] - integral[my0, mx1] - integral[my1, mx0] + integral[my0, mx0]
    frac = tissue_px / ((mx1 - mx0) * (my1 - my0))
    keep = frac >= float(min_tissue) - 1e-12
    if float(min_tissue) == 0.0:
        keep = np.ones_like(keep)
    df = pd.DataFrame({
        "slide": slide.name,
        "x": np.rint(left + fov0 / 2).astype(np.int64)[keep],
        "y": np.rint(top + fov0 / 2).astype(np.int64)[keep],
        "col": ii.ravel()[keep].astype(np.int64),
        "row": jj.ravel()[keep].astype(np.int64),
        "tissue": np.round(frac[keep], 4),
    })
    df = df.sort_values(["row", "col"]).reset_index(drop=True)
    df.attrs.update(base_magnification=slide.base_magnification, magnifications=mags, tile_size=tile_size)
    return df


def _check_tile_size(tile_size) -> int:
    try:
        t = int(tile_size)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"'tile_size' must be a positive integer. Got {tile_size!r} instead.") from exc
    if t <= 0 or t != tile_size:
        raise ConfigError(f"'tile_size' must be a positive integer. Got {tile_size!r} instead.")
    return t


def read_stack(
    slide: Slide,
    center_xy: tuple[float, float],
    magnifications: Sequence[float] = (40, 20, 10),
    tile_size: int = 256,
    *,
    allow_upsample: bool = False,
) -> dict[float, np.ndarray]:
    """Concentric multi-magnification stack around level-0 point ``center_xy``.

    Returns ``{magnification: uint8 RGB (tile_size, tile_size, 3)}``; the tile at magnification ``m`` covers
    ``tile_size * base / m`` level-0 pixels centred on ``center_xy``. White beyond the slide border.
    """
    tile_size = _check_tile_size(tile_size)
    mags = slide.check_magnifications(magnifications, allow_upsample=allow_upsample)
    cx, cy = float(center_xy[0]), float(center_xy[1])
    out: dict[float, np.ndarray] = {}
    for m, key in zip(mags, magnifications):
        f = _fov0(slide, m, tile_size)
        out[key] = slide.read_fov(cx - f / 2, cy - f / 2, f, f, (tile_size, tile_size))
    return out


def iter_stacks(
    slide: Slide | str | Path,
    magnifications: Sequence[float] = (40, 20, 10),
    tile_size: int = 256,
    stride: int | None = None,
    min_tissue: float = 0.5,
    *,
    plan: pd.DataFrame | None = None,
    mpp: float | None = None,
    objective: float | None = None,
    allow_upsample: bool = False,
) -> Iterator[tuple[dict[str, Any], dict[float, np.ndarray]]]:
    """Yield ``(row, stack)`` for each planned tile, without writing files (e.g. for feature extraction).

    ``row`` is the plan row as a dict (``slide``, ``x``, ``y``, ``col``, ``row``, ``tissue``); ``stack`` as
    :func:`read_stack`. Memory holds one stack at a time.
    """
    with _as_slide(slide, mpp=mpp, objective=objective) as s:
        if plan is None:
            plan = plan_tiles(s, magnifications, tile_size, stride, min_tissue, allow_upsample=allow_upsample)
        for rec in plan.to_dict("records"):
            yield rec, read_stack(s, (rec["x"], rec["y"]), magnifications, tile_size, allow_upsample=allow_upsample)


# ====================================================================== tiling to disk
def _save_png(path: Path, arr: np.ndarray, compress_level: int) -> None:
    """Write one PNG (module-level so tests can count writes)."""
    Image.fromarray(arr).save(path, format="PNG", compress_level=compress_level)


def _tile_problem(path: Path, tile_size: int) -> str | None:
    """Why an existing tile file cannot be reused (None when it can): it must be a PNG of tile_size x tile_size
    whose chunks all pass their CRC up to IEND (checked without decoding pixels)."""
    try:
        with Image.open(path) as im:
            if im.format != "PNG" or im.size != (tile_size, tile_size):
                return f"{im.format} {im.width}x{im.height}, expected a {tile_size}x{tile_size} PNG"
            im.verify()
    except Exception as exc:  # noqa: BLE001 - whatever PIL raises for a damaged file means "rewrite it"
        return f"truncated or corrupt ({type(exc).__name__}: {str(exc)[:100]})"
    return None


def _tile_name(slide_name: str, x: int, y: int) -> str:
    return f"{slide_name}_{int(x)}_{int(y)}.png"


def _params_digest(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def _read_part(path: Path) -> int:
    """Number of complete rows in a progress file (a truncated last line is ignored)."""
    if not path.exists():
        return 0
    with open(path, encoding="utf-8", newline="") as fh:
        return max(0, sum(1 for line in fh if line.endswith("\n")) - 1)


def read_tile_index(out_dir: str | Path, slide: str | None = None) -> pd.DataFrame:
    """Load ``<out_dir>/tiles.csv`` with the ``path_<mag>x`` columns made absolute; optionally one slide's rows."""
    out_dir = Path(out_dir)
    p = out_dir / INDEX_NAME
    if not p.is_file():
        raise DataError(f"Tile index not found: '{p}' (run tile_slide first).")
    try:
        df = pd.read_csv(p, dtype={"slide": str})
    except Exception as exc:
        raise DataError(f"Cannot read tile index '{p}': {exc}") from exc
    if slide is not None:
        df = df[df["slide"] == slide].reset_index(drop=True)
    for c in df.columns:
        if c.startswith("path_"):
            df[c] = [str((out_dir / v).resolve()) if isinstance(v, str) else v for v in df[c]]
    return df


def tile_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    *,
    magnifications: Sequence[float] = (40, 20, 10),
    tile_size: int = 256,
    stride: int | None = None,
    min_tissue: float = 0.5,
    mpp: float | None = None,
    objective: float | None = None,
    resume: bool = True,
    progress: bool = True,
    chunk_size: int = 64,
    compress_level: int = 1,
    workers: int = 1,
    allow_upsample: bool = False,
) -> pd.DataFrame:
    """Tile one slide into concentric multi-magnification PNGs, streaming, resumable.

    Files: ``<out_dir>/<mag>x/<slide>_<x>_<y>.png`` (``x``, ``y``: level-0 centre). Index: ``<out_dir>/tiles.csv``
    (one row per tile: ``slide``, ``x``, ``y``, ``col``, ``row``, ``tissue``, ``path_<mag>x`` relative to
    ``out_dir``; rows of other slides already there are kept). Returns this slide's rows with absolute paths;
    ``df.attrs`` holds ``n_tiles``, ``n_written`` (tiles with at least one file written this call),
    ``n_files_written``, ``n_files_redone`` (files of an earlier run found truncated, corrupt or of the wrong
    size, and rewritten), ``n_skipped`` and ``seconds``. ``workers`` > 1 reads and encodes tiles in threads.
    See the module docstring for the resume mechanism.
    """
    import time

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    tile_size = _check_tile_size(tile_size)
    if int(workers) < 1:
        raise ConfigError(f"'workers' must be >= 1. Got {workers!r} instead.")
    with _as_slide(slide_path, mpp=mpp, objective=objective) as slide:
        mags = slide.check_magnifications(magnifications, allow_upsample=allow_upsample)
        labels = [mag_label(m) for m in mags]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"Duplicate magnifications in {list(magnifications)}.")
        name = slide.name
        state = out_dir / STATE_DIR
        state.mkdir(parents=True, exist_ok=True)
        params = {
            "index_version": _INDEX_VERSION,
            "slide": name,
            "slide_path": str(slide.path.resolve()),
            "slide_size": list(slide.dimensions),
            "base_magnification": slide.base_magnification,
            "magnifications": mags,
            "tile_size": tile_size,
            "stride": tile_size if stride is None else int(stride),
            "min_tissue": float(min_tissue),
        }
        params_path = state / f"{name}.params.json"
        done_path = state / f"{name}.done.json"
        part_path = state / f"{name}.part.csv"
        tmp_dir = state / f"tmp-{name}"
        if params_path.exists() and resume:
            try:
                old = json.loads(params_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                old = None
            if old is not None and {k: old.get(k) for k in params} != params:
                diff = {k: (old.get(k), params[k]) for k in params if old.get(k) != params[k]}
                raise DataError(
                    f"'{out_dir}' already holds tiles of slide '{name}' made with other parameters {diff} "
                    "(old, new). Use another out_dir, or resume=False to redo them."
                )
        if not resume:
            for p in (done_path, part_path):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        write_json(params, params_path)
        shutil.rmtree(tmp_dir, ignore_errors=True)  # temp files of a killed run are never complete
        tmp_dir.mkdir(parents=True, exist_ok=True)
        mag_dirs = [out_dir / lab for lab in labels]
        for d in mag_dirs:
            d.mkdir(parents=True, exist_ok=True)

        plan = plan_tiles(slide, mags, tile_size, stride, min_tissue, allow_upsample=allow_upsample)
        names = [_tile_name(name, x, y) for x, y in zip(plan["x"], plan["y"])]
        existing: list[set[str]] = []
        for d in mag_dirs:
            if resume:
                prefix = name + "_"
                with os.scandir(d) as it:
                    existing.append({e.name for e in it if e.name.startswith(prefix) and e.name.endswith(".png")})
            else:
                existing.append(set())

        n_written = n_files = n_skipped = n_redone = 0
        if not resume or not part_path.exists():
            with open(part_path, "w", encoding="utf-8", newline="") as fh:
                csv.writer(fh).writerow(["slide", "x", "y", "col", "row", "tissue"])
        done_before = _read_part(part_path)

        def work(i: int) -> tuple[int, int]:
            """(files written, of which were present but unsound) for tile i."""
            fname = names[i]
            missing, redo = [], 0
            for k in range(len(mags)):
                if fname not in existing[k]:
                    missing.append(k)
                    continue
                problem = _tile_problem(mag_dirs[k] / fname, tile_size)
                if problem is not None:
                    log.warning("Tile '%s' from an earlier run is %s; rewriting it.", mag_dirs[k] / fname, problem)
                    missing.append(k)
                    redo += 1
            if not missing:
                return 0, 0
            rec = plan.iloc[i]
            f_mags = [mags[k] for k in missing]
            stack = read_stack(slide, (int(rec["x"]), int(rec["y"])), f_mags, tile_size,
                               allow_upsample=allow_upsample)
            for k, m in zip(missing, f_mags):
                final = mag_dirs[k] / fname
                tmp = tmp_dir / f"{labels[k]}-{fname}.{threading.get_ident()}.tmp"
                _save_png(tmp, stack[m], compress_level)
                os.replace(tmp, final)
            return len(missing), redo

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(plan), desc=f"tiling {name}", unit="tile", disable=None)
        pool = None
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(max_workers=int(workers))
        try:
            with open(part_path, "a", encoding="utf-8", newline="") as fh:
                writer = csv.writer(fh)
                for c0 in range(0, len(plan), max(1, int(chunk_size))):
                    idx = range(c0, min(len(plan), c0 + int(chunk_size)))
                    results = list(pool.map(work, idx)) if pool is not None else [work(i) for i in idx]
                    for i, (nf, nr) in zip(idx, results):
                        n_redone += nr
                        if nf:
                            n_written += 1
                            n_files += nf
                            r = plan.iloc[i]
                            writer.writerow([name, int(r["x"]), int(r["y"]), int(r["col"]), int(r["row"]),
                                             float(r["tissue"])])
                        else:
                            n_skipped += 1
                    fh.flush()
                    os.fsync(fh.fileno())
                    if bar is not None:
                        bar.update(len(idx))
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
            if bar is not None:
                bar.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)

        index = plan.copy()
        for lab in labels:
            index[f"path_{lab}"] = [f"{lab}/{n}" for n in names]
        _merge_index(out_dir, name, index)
        write_json({"slide": name, "n_tiles": int(len(index)), "params_digest": _params_digest(params),
                    "progress_rows": done_before + n_written}, done_path)

    result = index.copy()
    for lab in labels:
        result[f"path_{lab}"] = [str((out_dir / p).resolve()) for p in result[f"path_{lab}"]]
    result.attrs.update(n_tiles=int(len(index)), n_written=n_written, n_files_written=n_files,
                        n_files_redone=n_redone, n_skipped=n_skipped, seconds=time.perf_counter() - t_start,
                        base_magnification=slide.base_magnification, magnifications=mags)
    log.info("Tiled '%s': %d tiles (%d written, %d already there) in %.1f s", name, len(index), n_written,
             n_skipped, result.attrs["seconds"])
    return result


def _merge_index(out_dir: Path, slide_name: str, rows: pd.DataFrame) -> None:
    """Replace ``slide_name``'s rows in ``<out_dir>/tiles.csv`` (atomic rewrite)."""
    path = out_dir / INDEX_NAME
    frames = []
    if path.exists():
        try:
            old = pd.read_csv(path, dtype={"slide": str})
        except Exception as exc:
            raise DataError(f"Cannot read the existing tile index '{path}': {exc}. Delete it to rebuild.") from exc
        frames.append(old[old["slide"] != slide_name])
    frames.append(rows)
    merged = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else rows
    with atomic_path(path) as tmp:
        merged.to_csv(tmp, index=False)


# ====================================================================== tiles tables
def tiles_from_images(paths: Sequence[str | Path] | str | Path, *, magnification: float = 40.0) -> pd.DataFrame:
    """A tiles table with one case per image (``case_id`` = file stem, one stack) from a folder or a list."""
    if isinstance(paths, (str, Path)):
        src = Path(paths)
        if not src.exists():
            raise DataError(f"Input not found: '{src}'.")
        files = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"No images ({', '.join(IMAGE_SUFFIXES)}) found in '{src}'.")
    else:
        files = [Path(p) for p in paths]
    df = pd.DataFrame({CASE_ID: [f.stem for f in files], STACK_ID: "0", MAGNIFICATION: float(magnification),
                       IMAGE_PATH: [str(f.resolve()) for f in files]})
    dup = df[CASE_ID].duplicated(keep=False)
    if dup.any():
        raise DataError(f"Several images share the case id (file stem) {sorted(set(df.loc[dup, CASE_ID]))[:3]}.")
    return df


def tiles_from_tile_index(index: pd.DataFrame) -> pd.DataFrame:
    """Long tiles table from a :func:`tile_slide` index (``slide``, ``x``, ``y``,
    ``path_<mag>x``; see :func:`read_tile_index`): ``case_id`` = slide,
    ``stack_id`` = ``<x>_<y>``."""
    path_cols = [c for c in index.columns if c.startswith("path_") and c.endswith("x")]
    if "slide" not in index.columns or not path_cols:
        raise DataError("Not a tile_slide index: it needs a 'slide' column and path_<mag>x columns.")
    stack = (index["x"].astype(str) + "_" + index["y"].astype(str)) if {"x", "y"} <= set(index.columns) \
        else index.index.astype(str)
    parts = []
    for c in path_cols:
        try:
            mag = float(c[len("path_"):-1])
        except ValueError:
            continue
        part = pd.DataFrame({CASE_ID: index["slide"].astype(str).to_numpy(), STACK_ID: np.asarray(stack),
                             MAGNIFICATION: mag, IMAGE_PATH: index[c].to_numpy()})
        parts.append(part[part[IMAGE_PATH].notna()])
    if not parts:
        raise DataError("The tile index has no path_<mag>x column with a magnification.")
    return pd.concat(parts, ignore_index=True)


def tiles_from_input(src: str | Path, *, magnification: float | None = None) -> pd.DataFrame:
    """A tiles table from what a user points at: an image or a folder of images (one case per image, at
    ``magnification``, default 40x), a tiles table (CSV/Parquet, see :func:`breastfusion.data.tiles.read_tiles`)
    or a :func:`tile_slide` index (``tiles.csv`` with ``slide`` and ``path_<mag>x``).
    Tile files are not checked here: a missing one is skipped (and listed) by :func:`~breastfusion.features.pathomics_extract.extract_tile_pathomics`."""
    from breastfusion.data.tiles import read_tiles

    src = Path(src)
    if not src.exists():
        raise DataError(f"Input not found: '{src}'.")
    if src.is_dir() or src.suffix.lower() in IMAGE_SUFFIXES:
        return tiles_from_images(src, magnification=40.0 if magnification is None else magnification)
    if src.suffix.lower() == ".csv":
        try:
            cols = list(pd.read_csv(src, nrows=0).columns)
        except Exception as exc:  # pandas raises many types for bad files
            raise DataError(f"Cannot read tiles table '{src}': {exc}") from exc
        if "slide" in cols and MAGNIFICATION not in cols and any(c.startswith("path_") for c in cols):
            index = pd.read_csv(src, dtype={"slide": str})
            for c in index.columns:
                if c.startswith("path_"):
                    index[c] = [str((src.parent / v).resolve()) if isinstance(v, str) else v for v in index[c]]
            return tiles_from_tile_index(index)
    return read_tiles(src, check_files=False)
