"""Data commands: audit, tile, features."""

from __future__ import annotations

import logging
from pathlib import Path

from breastfusion.cli._common import _common_config_args
from breastfusion.errors import DataError


def cmd_audit(args) -> int:
    from breastfusion.data.audit import audit_cases, audit_for_config, write_audit
    from breastfusion.data.importers import import_cases

    cfg = None
    if args.config or args.overrides:  # read the columns as training will (missing tokens, declared types, ...)
        from breastfusion.config import load_config
        from breastfusion.tasks.base import drop_label_cases

        cfg = load_config(args.config, args.overrides)
    source = args.source or (cfg.data.source if cfg is not None else None)
    if not source:
        raise DataError("audit: give the data (a cases table or a dataset folder), or a --config with data.source.")
    importer = args.importer or (cfg.data.importer if cfg is not None else "auto")
    if isinstance(source, dict):  # a multi-centre mapping from the config
        from breastfusion.data.cohorts import import_sources

        cases = import_sources(source, importer=importer)
    elif Path(source).is_file() and importer in ("auto", "cases"):
        cases = import_cases(source, importer=importer, require_labels=False)
    else:
        cases = import_cases(source, importer=importer)
    if cfg is None:
        result = audit_cases(cases)
    else:
        from breastfusion.data.roles import resolve_roles

        cases, _ = drop_label_cases(cases, cfg.data.drop_labels)
        result = audit_for_config(cases, cfg.data, input_columns=resolve_roles(cases, cfg.data).inputs)
    md, js = write_audit(result, args.out)
    print(f"audit report: {md}\nmachine-readable: {js}")
    for k, v in result.summary.items():
        if not isinstance(v, (dict, list)):
            print(f"  {k}: {v}")
    return 0


def cmd_tile(args) -> int:
    from breastfusion.data.tiling import tile_slide

    mags = [float(m) for m in args.magnifications.split(",") if m.strip()]
    index = tile_slide(args.slide, args.out, magnifications=mags, tile_size=args.tile_size,
                       min_tissue=args.min_tissue, mpp=args.mpp, objective=args.objective,
                       resume=not args.restart, progress=not args.quiet, workers=args.workers)
    print(f"{len(index)} tile stack(s) at {', '.join(f'{m:g}x' for m in mags)} → {args.out}/tiles.csv")
    return 0


def cmd_features(args) -> int:
    """Per-tile and per-case pathomics of a tiles table or a folder of images (parallel on Dask, resumable)."""
    from breastfusion.data.tiling import tiles_from_input
    from breastfusion.features.pathomics_extract import (
        case_pathomics,
        extract_tile_pathomics,
    )
    from breastfusion.utils import atomic_path

    if not args.verbose and (args.workers > 1 or args.scheduler):
        import distributed  # noqa: F401  (importing it sets its loggers to INFO: scheduler, nanny start/stop)

        logging.getLogger("distributed").setLevel(logging.WARNING)
    tiles = tiles_from_input(args.input, magnification=args.magnification)
    per_tile = extract_tile_pathomics(tiles, args.out, magnification=args.magnification, method=args.method,
                                      model_path=args.model, mpp=args.mpp, n_workers=args.workers,
                                      scheduler=args.scheduler, chunk_size=args.chunk_size,
                                      progress=not args.quiet)
    a = per_tile.attrs
    mags = sorted(per_tile["magnification"].unique())
    case_paths = []  # tiles of different magnifications are pooled separately
    for m in mags:
        name = "case_pathomics.parquet" if len(mags) == 1 else f"case_pathomics_{m:g}x.parquet"
        case_paths.append(Path(args.out) / name)
        with atomic_path(case_paths[-1]) as tmp:
            case_pathomics(per_tile, magnification=m).to_parquet(tmp)
    print(f"{len(per_tile)} tile(s) of {per_tile['case_id'].nunique()} case(s): {a['n_computed']} computed, "
          f"{a['n_reused']} reused from shards, {a['n_skipped']} skipped ({a['mode']}, {a['seconds']:.1f} s)\n"
          f"  per tile: {a['result']}\n  per case: {', '.join(map(str, case_paths))}\n"
          f"  skipped:  {a['skipped_csv']}")
    return 0


def _add_audit(sub) -> None:
    p = sub.add_parser("audit", help="audit a dataset: bad files, masks, duplicates and near-duplicates, balance")
    p.add_argument("source", nargs="?", help="cases table (CSV/Parquet) or dataset folder (BUSI, BrEaST-Lesions-USG); "
                                             "default: the config's data.source")
    p.add_argument("--out", required=True, help="folder for audit.md and audit.json")
    p.add_argument("--importer", default=None,
                   help="how to read the data: auto (default: a table, a BrEaST-Lesions-USG folder, else BUSI) or "
                        "one of busi, breast_lesions_usg, breakhis, cases (as data.importer)")
    _common_config_args(p)
    p.set_defaults(func=cmd_audit)


def _add_tile(sub) -> None:
    p = sub.add_parser("tile", help="tile a whole slide into concentric multi-magnification stacks (resumable)")
    p.add_argument("slide")
    p.add_argument("--magnifications", default="40,20,10", help="comma-separated, e.g. 40,20,10")
    p.add_argument("--out", required=True)
    p.add_argument("--tile-size", type=int, default=256)
    p.add_argument("--min-tissue", type=float, default=0.5)
    p.add_argument("--mpp", type=float, help="microns per pixel when the file does not say")
    p.add_argument("--objective", type=float, help="base magnification when the file does not say")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--restart", action="store_true", help="ignore tiles already written")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_tile)


def _add_features(sub) -> None:
    p = sub.add_parser("features", help="per-tile and per-case pathomics of many tiles (parallel on Dask, resumable)")
    p.add_argument("input", help="tiles table (CSV/Parquet, or a tile_slide tiles.csv) or a folder of images "
                                 "(one case per image, case_id = file name stem)")
    p.add_argument("--out", required=True, help="output folder (tile_pathomics.parquet, case_pathomics.parquet, "
                                                "skipped.csv, shards/); rerun with the same folder to resume")
    p.add_argument("--magnification", type=float, help="only tiles at this magnification; for a folder of images, "
                                                        "their magnification (default 40)")
    p.add_argument("--workers", type=int, default=1, help="worker processes of a local Dask cluster (1: in process)")
    p.add_argument("--scheduler", help="address of a running Dask scheduler, e.g. tcp://host:8786 (overrides --workers)")
    p.add_argument("--method", choices=["classical", "learned"], default="classical",
                   help="nuclei segmentation: classical (no weights) or learned (needs --model)")
    p.add_argument("--model", help="nuclei segmentation model for --method learned")
    p.add_argument("--mpp", type=float, help="microns per pixel (default: 0.25 * 40 / magnification)")
    p.add_argument("--chunk-size", type=int, default=16, help="tiles per task and per shard (default 16)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_features)


_PARSERS = {
    "audit": _add_audit,
    "tile": _add_tile,
    "features": _add_features,
}


def add_parsers(sub, names=None) -> None:
    """Add this group's subcommands to ``sub`` (the top parser's subparsers): all of them, or only ``names``, in
    the order given."""
    for name in _PARSERS if names is None else names:
        _PARSERS[name](sub)
