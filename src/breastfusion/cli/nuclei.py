"""H&E nuclei commands: nuclei segment | train."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from breastfusion.cli._common import _set_threads


def cmd_nuclei_segment(args) -> int:
    """Instance labels (0 = background, 1..n nuclei) and a per-nucleus feature table for each input image.
    A bad image is skipped with its reason logged; the others are processed."""
    import pandas as pd

    from breastfusion.data.images import read_image
    from breastfusion.errors import ConfigError, DataError
    from breastfusion.features.nuclei.annotations import write_instance_mask
    from breastfusion.features.pathomics import nucleus_features
    from breastfusion.utils import atomic_path

    if args.method == "learned":
        if not args.model:
            raise ConfigError("--method learned needs --model PATH (a model file from 'breastfusion nuclei train').")
        from breastfusion.features.nuclei.learned import (
            load_nuclei_model,
            segment_nuclei_learned,
        )

        _set_threads(args.threads)
        model = load_nuclei_model(args.model, device=args.device)

        def segment(rgb):
            return segment_nuclei_learned(rgb, model, mpp=args.mpp)
    else:
        if args.model:
            raise ConfigError("--model is only used with --method learned.")
        from breastfusion.features.nuclei.classical import segment_nuclei

        def segment(rgb):
            return segment_nuclei(rgb, mpp=args.mpp)

    src = Path(args.input)
    if not src.exists():
        raise DataError(f"Input not found: '{src}'.")
    suffixes = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
    files = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.suffix.lower() in suffixes)
    if not files:
        raise DataError(f"No images found in '{src}'.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tables, failed = [], []
    for f in files:
        try:
            rgb = (read_image(f, mode="rgb") * 255 + 0.5).astype("uint8")
            labels = segment(rgb)
            write_instance_mask(labels, out / f"{f.stem}_nuclei.png")
            feats = nucleus_features(rgb, labels, mpp=args.mpp)
            feats.insert(0, "image", f.name)
            tables.append(feats)
            print(f"{f.name}: {int(labels.max())} nuclei")
        except DataError as exc:
            failed.append(f.name)
            logging.getLogger("breastfusion.nuclei").warning("skipped '%s': %s", f, exc)
    if tables:
        with atomic_path(out / "nuclei_features.csv") as tmp:
            pd.concat(tables, ignore_index=True).to_csv(tmp, index=False)
    if failed:
        print(f"skipped {len(failed)} image(s): {', '.join(failed)}", file=sys.stderr)
    return 0 if tables else 2


def cmd_nuclei_train(args) -> int:
    """Train the learned nuclei segmenter on an annotated folder (resumable) and write one safetensors model file."""
    from breastfusion.features.nuclei.annotations import load_annotated_dir
    from breastfusion.training.nuclei import train_nuclei_model

    _set_threads(args.threads)
    data = load_annotated_dir(args.annotated_dir, strict=not args.skip_unannotated)
    extra = [(t.image, t.mask) for t in data.foreground_only] if not args.no_foreground_only else None
    n_nuclei = sum(t.n_nuclei for t in data.tiles)
    print(f"{len(data.tiles)} tile(s) with {n_nuclei} annotated nuclei"
          + (f", {len(extra)} foreground-only tile(s)" if extra else "")
          + (f"; skipped {len(data.skipped)} item(s)" if data.skipped else ""))
    kw = {}
    for key in ("crop", "batch_size", "lr", "seed", "work_mpp"):
        if getattr(args, key) is not None:
            kw[key] = getattr(args, key)
    path = train_nuclei_model([t.image for t in data.tiles], [t.labels for t in data.tiles], out_path=args.out,
                              steps=args.steps, epochs=args.epochs, mpp=args.mpp, extra_foreground=extra,
                              device=args.device, progress=not args.quiet, resume=not args.restart, **kw)
    print(f"nuclei model: {path}")
    return 0


def _add_nuclei(sub) -> None:
    p = sub.add_parser("nuclei", help="H&E nuclei instance segmentation")
    nsub = p.add_subparsers(dest="nuclei_command", required=True)
    q = nsub.add_parser("segment", help="instance-label image + per-nucleus features for an image or a folder")
    q.add_argument("input")
    q.add_argument("--out", required=True)
    q.add_argument("--method", choices=["classical", "learned"], default="classical",
                   help="classical: colour deconvolution + watershed, needs no weights; "
                        "learned: a model from 'breastfusion nuclei train' (needs --model)")
    q.add_argument("--model", help="model file for --method learned")
    q.add_argument("--mpp", type=float, default=0.25, help="microns per pixel (0.25 ≈ 40x)")
    q.add_argument("--device", default="auto", help="learned: cpu, cuda or auto (default auto)")
    q.add_argument("--threads", type=int, help="learned: torch CPU threads")
    q.set_defaults(func=cmd_nuclei_segment)
    q = nsub.add_parser("train", help="train the learned segmenter on annotated tiles (resumable; one model file)")
    q.add_argument("annotated_dir", help="images/ + annotations/<stem>.xml(.gz) (ImageScope) or masks/<stem>_nuclei.png "
                                         "(instance labels), optionally binary_masks/<stem>.png (foreground only)")
    q.add_argument("--out", required=True, help="model file to write (e.g. nuclei.safetensors)")
    g = q.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="optimiser steps (default 1500; one step of 8 crops of 256 px takes "
                                             "about 4 s on one CPU core, so on a CPU try --crop 128 --steps 600)")
    g.add_argument("--epochs", type=float, help="passes over the training pixels instead of --steps")
    q.add_argument("--mpp", type=float, default=0.25, help="microns per pixel of the training images (0.25 ≈ 40x)")
    q.add_argument("--work-mpp", type=float, help="working resolution of the network in µm/px (default 0.5)")
    q.add_argument("--crop", type=int, help="training crop size in pixels at the working resolution (default 256)")
    q.add_argument("--batch-size", type=int, help="crops per step (default 8)")
    q.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    q.add_argument("--seed", type=int, help="random seed (default 0)")
    q.add_argument("--device", default="auto", help="cpu, cuda or auto (default auto)")
    q.add_argument("--threads", type=int, help="torch CPU threads")
    q.add_argument("--no-foreground-only", action="store_true", help="do not use binary_masks/ tiles")
    q.add_argument("--skip-unannotated", action="store_true",
                   help="skip (and log) images without annotation or with a mismatched one instead of failing")
    q.add_argument("--restart", action="store_true", help="ignore a checkpoint of an earlier, interrupted run")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_nuclei_train)


_PARSERS = {
    "nuclei": _add_nuclei,
}


def add_parsers(sub, names=None) -> None:
    """Add this group's subcommands to ``sub`` (the top parser's subparsers): all of them, or only ``names``, in
    the order given."""
    for name in _PARSERS if names is None else names:
        _PARSERS[name](sub)
