"""Pathomics over many tiles and slides: parallel on Dask, resumable, crash-safe.

    from breastfusion.data.tiles import read_tiles
    from breastfusion.features.pathomics_extract import extract_tile_pathomics, case_pathomics

    tiles = read_tiles("tiles.csv", check_files=False)
    per_tile = extract_tile_pathomics(tiles, "runs/pathomics", magnification=40, n_workers=2)
    per_case = case_pathomics(per_tile)             # one row per case_id, count-weighted pooling

For every tile (a row of the tiles table, see :mod:`breastfusion.data.tiles`): read the image, segment nuclei
(classical colour deconvolution + watershed, or the learned segmenter), measure them
(:func:`~breastfusion.features.pathomics.nucleus_features`) and summarise them per tile
(:func:`~breastfusion.features.pathomics.aggregate_features`, density over the tissue area).
A tiles table from an image, a folder of images or a ``tile_slide`` index:
:func:`breastfusion.data.tiling.tiles_from_input`.

Execution. ``n_workers <= 1`` and no ``scheduler``: in this process. Otherwise a ``dask.distributed`` client:
``scheduler`` is the address of a running cluster (``tcp://host:8786``; the same code runs on a real cluster,
where workers need ``breastfusion`` installed and the tile paths visible), or else a ``LocalCluster`` of
``n_workers`` single-threaded worker processes, started and closed here. Tiles go to workers in chunks of
``chunk_size`` paths (never images); at most about two chunks per worker thread are in flight, and results are
taken as they complete, so memory stays bounded whatever the number of tiles.

Files under ``out_dir``:

``shards/<hash>.parquet``   one per finished chunk, written atomically by the client as soon as the chunk is
                            back. The name hashes the chunk's tile keys; a tile key hashes (absolute image path,
                            mpp, method, model digest, segmentation parameters, feature version). A rerun reads the
                            keys already in shards and processes only the others, so a killed run resumes where it
                            stopped, and changing the method, model, mpp or parameters recomputes.
``tile_pathomics.parquet``  the merged result for the requested tiles (atomic), identifiers from the current table.
``skipped.csv``             tiles that could not be processed (unreadable, corrupt, failed segmentation, lost
                            worker), with the reason; always rewritten (header only when none). Skipped tiles are
                            not stored in shards, so a rerun tries them again.

One bad tile never fails the batch; it is logged with the file name and reason. If no tile at all succeeds,
:class:`~breastfusion.errors.DataError` is raised.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import numbers
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from breastfusion.data.tiles import MAGNIFICATION, STACK_ID, validate_tiles
from breastfusion.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = [
    "FEATURES_VERSION",
    "MPP_AT_40X",
    "case_pathomics",
    "default_mpp",
    "extract_tile_pathomics",
]

CASE_ID, IMAGE_PATH = "case_id", "image_path"
FEATURES_VERSION = 1  # bump when the per-tile computation changes: old shards are then recomputed
MPP_AT_40X = 0.25  # microns per pixel at 40x; mpp = 0.25 * 40 / magnification
METHODS = ("classical", "learned")
TILE_KEY, MPP_COL = "_tile_key", "_mpp"
SHARDS_DIR, RESULT_NAME, SKIPPED_NAME = "shards", "tile_pathomics.parquet", "skipped.csv"
_MAX_LOGGED_SKIPS = 20

_MODEL_CACHE: dict[str, object] = {}  # per process: a learned model is loaded once per worker


def default_mpp(magnification: float) -> float:
    """Microns per pixel of a tile at ``magnification`` (40x ≈ 0.25 µm/px)."""
    return MPP_AT_40X * 40.0 / float(magnification)


# ============================================================================ worker side
def _learned_model(model_path: str):
    """The learned nuclei model, loaded once per process (again if the file changes)."""
    from breastfusion.features.nuclei.learned import load_nuclei_model

    st = os.stat(model_path)
    cache_key = f"{model_path}|{st.st_size}|{st.st_mtime_ns}"
    model = _MODEL_CACHE.get(cache_key)
    if model is None:
        _MODEL_CACHE.clear()
        model = _MODEL_CACHE[cache_key] = load_nuclei_model(model_path)
    return model


def _segment(rgb8: np.ndarray, mpp: float, method: str, model_path: str | None) -> np.ndarray:
    if method == "classical":
        from breastfusion.features.nuclei.classical import segment_nuclei

        return segment_nuclei(rgb8, mpp=mpp)
    from breastfusion.features.nuclei.learned import segment_nuclei_learned

    return segment_nuclei_learned(rgb8, _learned_model(model_path), mpp=mpp)


def _tile_features(path: str, mpp: float, method: str, model_path: str | None) -> dict[str, float]:
    from breastfusion.data.images import read_image
    from breastfusion.features.pathomics import (
        aggregate_features,
        nucleus_features,
        tissue_area_um2,
    )

    rgb8 = np.round(read_image(path, mode="rgb") * 255.0).astype(np.uint8)
    labels = _segment(rgb8, mpp, method, model_path)
    nuclei = nucleus_features(rgb8, labels, mpp=mpp)
    return aggregate_features(nuclei, area_um2=tissue_area_um2(rgb8, mpp=mpp))


def _process_chunk(records: list[dict], method: str, model_path: str | None) -> dict:
    """Run on a worker (or in process): features of each tile of a chunk, one image in memory at a time.

    ``records``: dicts with ``key``, ``path``, ``mpp``. Returns ``{"rows": [...], "skipped": [(key, reason)],
    "seconds": float}``; a failing tile is reported, never raised."""
    t0 = time.perf_counter()
    rows, skipped = [], []
    for r in records:
        try:
            feats = _tile_features(r["path"], r["mpp"], method, model_path)
        except Exception as exc:  # noqa: BLE001 - one bad tile must not fail the chunk
            from breastfusion.errors import BreastfusionError

            reason = str(exc) if isinstance(exc, BreastfusionError) else f"{type(exc).__name__}: {exc}"
            skipped.append((r["key"], reason))
            continue
        rows.append({TILE_KEY: r["key"], IMAGE_PATH: r["path"], MPP_COL: r["mpp"], **feats})
    return {"rows": rows, "skipped": skipped, "seconds": time.perf_counter() - t0}


# ============================================================================ client side
def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _model_digest(model_path: str) -> str:
    """Content hash of a model file (or of every file of a model folder)."""
    p = Path(model_path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _method_identity(method: str, model_path: str | None) -> dict:
    """What, besides path and mpp, determines a tile's features (goes into the tile keys)."""
    from breastfusion.version import __version__

    ident = {"method": method, "features_version": FEATURES_VERSION, "breastfusion": __version__}
    if method == "classical":
        from breastfusion.features.nuclei.classical import DEFAULT_PARAMS

        ident["params"] = DEFAULT_PARAMS.as_dict()
    else:
        ident["model"] = _model_digest(model_path)
    return ident


def _check_method(method: str, model_path) -> str | None:
    if method not in METHODS:
        raise ConfigError(f"method must be one of {list(METHODS)}; got {method!r}.")
    if method == "classical":
        if model_path is not None:
            log.warning("model_path %s is ignored with method='classical'", model_path)
        return None
    if model_path is None:
        raise ConfigError("method='learned' needs model_path (the nuclei segmentation model file).")
    if not Path(model_path).exists():
        raise DataError(f"Nuclei model not found: '{model_path}'.")
    try:
        from breastfusion.features.nuclei import learned  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"method='learned' is not available in this installation ({exc}).") from exc
    model_path = str(Path(model_path).resolve())
    _learned_model(model_path)  # a bad model file fails here, once, naming the file (not once per tile)
    return model_path


def _tile_mpps(df: pd.DataFrame, mpp: float | None) -> np.ndarray:
    """mpp per tile: the ``_mpp`` column where present and valid, else ``mpp``, else from the magnification."""
    if mpp is not None and not (isinstance(mpp, numbers.Real) and math.isfinite(mpp) and mpp > 0):
        raise ConfigError(f"mpp must be a positive number of microns per pixel; got {mpp!r}.")
    fallback = (np.full(len(df), float(mpp)) if mpp is not None
                else MPP_AT_40X * 40.0 / df[MAGNIFICATION].to_numpy(dtype=float))
    if MPP_COL not in df.columns:
        return fallback
    col = pd.to_numeric(df[MPP_COL], errors="coerce").to_numpy(dtype=float)
    ok = np.isfinite(col) & (col > 0)
    bad = df[MPP_COL].notna().to_numpy() & ~ok
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"tiles table, row {i + 2}: _mpp {df[MPP_COL].iat[i]!r} is not a positive number.")
    return np.where(ok, col, fallback)


def _read_done_keys(shard_dir: Path) -> dict[str, Path]:
    """tile key → shard file, for every readable shard (a foreign or broken file is logged and ignored)."""
    import pyarrow.parquet as pq

    done: dict[str, Path] = {}
    if not shard_dir.is_dir():
        return done
    for f in sorted(shard_dir.glob("*.parquet")):
        try:
            keys = pq.read_table(f, columns=[TILE_KEY]).column(TILE_KEY).to_pylist()
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
            log.warning("ignoring unreadable shard '%s': %s", f, exc)
            continue
        for k in keys:
            done.setdefault(k, f)
    return done


def _write_shard(rows: list[dict], path: Path) -> None:
    from breastfusion.utils import atomic_path

    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_parquet(tmp, index=False)


def _chunks(records: list[dict], size: int) -> Iterator[tuple[str, list[dict]]]:
    for i in range(0, len(records), size):
        chunk = records[i: i + size]
        yield _digest(sorted(r["key"] for r in chunk))[:24], chunk


def _run_in_process(chunks, method, model_path):
    for shard_id, chunk in chunks:
        try:
            yield shard_id, chunk, _process_chunk(chunk, method, model_path), None
        except Exception as exc:  # noqa: BLE001 - reported as a failed chunk, the batch goes on
            yield shard_id, chunk, None, exc


def _run_on_dask(chunks, method, model_path, *, n_workers: int, scheduler: str | None, info: dict):
    """Submit chunks with a bounded number in flight; yield each as it completes."""
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ConfigError(f"Parallel pathomics needs dask[distributed] ({exc}); pip install 'dask[distributed]'.") from exc

    cluster = None
    try:
        if scheduler:
            try:
                client = Client(scheduler, timeout="30s", set_as_default=False)
            except (OSError, TimeoutError, ValueError) as exc:  # unreachable, or not an address
                raise ConfigError(f"Cannot connect to the Dask scheduler at '{scheduler}': {exc}") from exc
            info["mode"] = f"dask scheduler {scheduler}"
        else:
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                   dashboard_address=":0", silence_logs=logging.WARNING)
            client = Client(cluster, set_as_default=False)
            info["mode"] = f"dask LocalCluster, {n_workers} worker processes"
        try:
            threads = max(1, sum(client.nthreads().values()))
            info["worker_threads"] = threads
            log.info("pathomics on %s (%d worker thread(s))", info["mode"], threads)
            max_in_flight = 2 * threads
            it = iter(chunks)
            pending: dict = {}
            ac = as_completed(loop=client.loop)

            def submit_next() -> bool:
                nxt = next(it, None)
                if nxt is None:
                    return False
                shard_id, chunk = nxt
                fut = client.submit(_process_chunk, chunk, method, model_path, pure=False,
                                    key=f"pathomics-{shard_id}-{time.time_ns()}")
                pending[fut.key] = (shard_id, chunk)
                ac.add(fut)
                return True

            for _ in range(max_in_flight):
                if not submit_next():
                    break
            for fut in ac:
                shard_id, chunk = pending.pop(fut.key)
                try:
                    result, err = fut.result(), None
                except Exception as exc:  # noqa: BLE001 - a lost worker (KilledWorker), no package on the cluster
                    result, err = None, exc
                fut.release()
                del fut
                submit_next()
                yield shard_id, chunk, result, err
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


def extract_tile_pathomics(
    tiles: pd.DataFrame,
    out_dir: str | Path,
    *,
    magnification: float | None = None,
    method: str = "classical",
    model_path: str | Path | None = None,
    mpp: float | None = None,
    n_workers: int = 1,
    scheduler: str | None = None,
    chunk_size: int = 16,
    progress: bool = True,
) -> pd.DataFrame:
    """Per-tile pathomics of a tiles table, in parallel and resumable (see the module docstring).

    ``magnification`` keeps only the tiles at that magnification. ``mpp`` per tile: the table's ``_mpp``
    column where present, else ``mpp``, else 0.25·40/magnification. Returns one row per successfully processed
    tile, in table order: ``case_id``, ``stack_id``, ``magnification``, ``image_path``, ``_mpp`` and the
    :func:`~breastfusion.features.pathomics.tile_feature_names` columns. ``df.attrs``: ``n_tiles``,
    ``n_reused`` (found in shards), ``n_computed``, ``n_skipped``, ``n_shards_written``, ``n_nuclei_computed``,
    ``seconds``, ``mode``, ``result``, ``skipped_csv``.
    """
    from tqdm.auto import tqdm

    from breastfusion.features.pathomics import tile_feature_names
    from breastfusion.utils import atomic_path

    t_start = time.perf_counter()
    model_path = _check_method(method, model_path)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer; got {chunk_size!r}.")
    if not isinstance(n_workers, int) or n_workers < 0:
        raise ConfigError(f"n_workers must be a non-negative integer; got {n_workers!r}.")
    df = validate_tiles(tiles, check_files=False)  # a missing file is a skipped tile, not a failed batch
    if magnification is not None:
        keep = np.isclose(df[MAGNIFICATION].to_numpy(dtype=float), float(magnification))
        if not keep.any():
            have = ", ".join(f"{m:g}x" for m in sorted(df[MAGNIFICATION].unique()))
            raise DataError(f"No tile at {float(magnification):g}x in the tiles table (it has {have}).")
        df = df[keep].reset_index(drop=True)
    df[IMAGE_PATH] = [os.path.abspath(str(p)) for p in df[IMAGE_PATH]]
    df[MPP_COL] = _tile_mpps(df, mpp)

    ident = _method_identity(method, model_path)
    df[TILE_KEY] = [_digest([p, round(float(m), 9), ident])[:32] for p, m in zip(df[IMAGE_PATH], df[MPP_COL])]

    out_dir = Path(out_dir)
    shard_dir = out_dir / SHARDS_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    done = _read_done_keys(shard_dir)
    todo = df[~df[TILE_KEY].isin(done.keys())].drop_duplicates(TILE_KEY)
    n_unique = df[TILE_KEY].nunique()
    n_reused = n_unique - len(todo)
    records = [{"key": k, "path": p, "mpp": float(m)}
               for k, p, m in zip(todo[TILE_KEY], todo[IMAGE_PATH], todo[MPP_COL])]
    info: dict = {"mode": "in-process"}
    if n_reused:
        log.info("resuming: %d of %d tile(s) already done in %s", n_reused, n_unique, shard_dir)

    skipped: dict[str, str] = {}
    n_computed = n_shards = n_nuclei = 0
    if records:
        chunks = _chunks(records, chunk_size)
        use_dask = scheduler is not None or n_workers > 1
        runner = (_run_on_dask(chunks, method, model_path, n_workers=max(n_workers, 1), scheduler=scheduler,
                               info=info) if use_dask else _run_in_process(chunks, method, model_path))
        bar = tqdm(total=n_unique, initial=n_reused, unit="tile", desc="pathomics", disable=not progress)
        path_of = dict(zip(todo[TILE_KEY], todo[IMAGE_PATH]))
        try:  # closing(): an error or Ctrl-C here still shuts the local cluster down at once
            with contextlib.closing(runner):
                for shard_id, chunk, result, err in runner:
                    if err is not None:
                        reason = f"chunk failed on the worker: {type(err).__name__}: {err}"
                        chunk_skips = [(r["key"], reason) for r in chunk]
                    else:
                        chunk_skips = list(result["skipped"])
                        if result["rows"]:
                            _write_shard(result["rows"], shard_dir / f"{shard_id}.parquet")
                            n_shards += 1
                            n_computed += len(result["rows"])
                            n_nuclei += int(sum(r["path_count"] for r in result["rows"]))
                    for key, reason in chunk_skips:
                        if len(skipped) < _MAX_LOGGED_SKIPS:
                            log.warning("skipped tile '%s': %s", path_of[key], reason)
                        elif len(skipped) == _MAX_LOGGED_SKIPS:
                            log.warning("more tiles skipped; every reason is in %s", out_dir / SKIPPED_NAME)
                        skipped[key] = reason
                    bar.update(len(chunk))
        finally:
            bar.close()

    # Skipped tiles (all rows of a skipped key), then the merge of the shards holding the requested keys.
    skip_df = df[df[TILE_KEY].isin(skipped.keys())]
    skip_df = skip_df.assign(reason=[skipped[k] for k in skip_df[TILE_KEY]])
    with atomic_path(out_dir / SKIPPED_NAME) as tmp:
        skip_df[[CASE_ID, STACK_ID, MAGNIFICATION, IMAGE_PATH, "reason"]].to_csv(tmp, index=False)

    wanted = set(df[TILE_KEY])
    done = _read_done_keys(shard_dir)
    files = sorted({done[k] for k in wanted if k in done})
    feature_cols = tile_feature_names()
    if not files:
        raise DataError(f"No tile could be processed ({len(skip_df)} skipped); reasons in '{out_dir / SKIPPED_NAME}'.")
    parts = []
    for f in files:
        part = pd.read_parquet(f, columns=[TILE_KEY, *feature_cols])
        parts.append(part[part[TILE_KEY].isin(wanted)])
    feats = pd.concat(parts, ignore_index=True).drop_duplicates(TILE_KEY)
    result = df[[CASE_ID, STACK_ID, MAGNIFICATION, IMAGE_PATH, MPP_COL, TILE_KEY]].merge(
        feats, on=TILE_KEY, how="inner", validate="many_to_one").drop(columns=TILE_KEY)
    result_path = out_dir / RESULT_NAME
    with atomic_path(result_path) as tmp:
        result.to_parquet(tmp, index=False)
    seconds = time.perf_counter() - t_start
    result.attrs.update(n_tiles=len(df), n_reused=int(n_reused), n_computed=int(n_computed),
                        n_skipped=len(skip_df), n_shards_written=int(n_shards), n_nuclei_computed=int(n_nuclei),
                        seconds=float(seconds), mode=info["mode"], result=str(result_path),
                        skipped_csv=str(out_dir / SKIPPED_NAME))
    log.info("pathomics: %d tile(s) (%d reused, %d computed, %d skipped) in %.1f s → %s", len(result), n_reused,
             n_computed, len(skip_df), seconds, result_path)
    return result


def case_pathomics(tile_feats: pd.DataFrame, *, magnification: float | None = None) -> pd.DataFrame:
    """Case-level pathomics: one row per ``case_id`` (the index) with the tile feature names plus
    ``path_n_tiles``, pooling the case's tiles with :func:`~breastfusion.features.pathomics.case_features`
    (counts and areas summed, density = total count / total area, other statistics count-weighted).

    Tiles of several magnifications are not pooled together: pass ``magnification`` to choose one."""
    from breastfusion.features.pathomics import case_features, tile_feature_names

    names = tile_feature_names()
    if not isinstance(tile_feats, pd.DataFrame):
        raise DataError(f"case_pathomics needs a DataFrame of tile features; got {type(tile_feats).__name__}.")
    missing = [c for c in (CASE_ID, *names) if c not in tile_feats.columns]
    if missing:
        raise DataError(f"Tile features lack column(s) {missing[:5]}; build them with extract_tile_pathomics().")
    df = tile_feats
    if MAGNIFICATION in df.columns:
        mags = pd.to_numeric(df[MAGNIFICATION], errors="coerce")
        if magnification is not None:
            df = df[np.isclose(mags.to_numpy(dtype=float), float(magnification))]
            if df.empty:
                raise DataError(f"No tile features at {float(magnification):g}x.")
        elif mags.nunique() > 1:
            have = ", ".join(f"{m:g}x" for m in sorted(mags.unique()))
            raise DataError(f"Tile features mix magnifications ({have}); pass magnification= to pool one of them.")
    if df.empty:
        raise DataError("case_pathomics got no tile features.")
    rows, index = [], []
    for case, g in df.groupby(df[CASE_ID].astype(str), sort=False):
        rows.append(case_features(g[names].to_dict("records")))
        index.append(case)
    out = pd.DataFrame(rows, index=pd.Index(index, name=CASE_ID))
    return out[[*names, "path_n_tiles"]]
