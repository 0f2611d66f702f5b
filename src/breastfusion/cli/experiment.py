"""Experiment commands: demo, train, config, synthetic."""

from __future__ import annotations

from pathlib import Path

from breastfusion.cli._common import _common_config_args


def cmd_demo(args) -> int:
    from breastfusion.demo import run_demo

    out = run_demo(args.out, n_cases=args.n_cases, overrides=args.overrides, progress=not args.quiet)
    print(f"SYNTHETIC demo finished.\n  report:      {out['report']}\n  bundle:      {out['bundle']}\n"
          f"  predictions: {out['predictions']}")
    for name, m in out["metrics"].items():
        pooled = m["pooled"]
        print(f"  {name:14s} macro-F1 {pooled['macro_f1']:.3f}  macro-AUC {pooled['macro_auc']:.3f}  (synthetic data)")
    return 0


def cmd_train(args) -> int:
    from breastfusion.config import load_config
    from breastfusion.experiment import run_experiment

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.source={args.data}")
    cfg = load_config(args.config, overrides)
    result = run_experiment(cfg, args.out, resume=args.resume, progress=not args.quiet)
    from breastfusion import distributed

    if not distributed.is_main():  # under torchrun, one rank reports
        return 0
    print(f"run folder: {result.run_dir}\nreport: {result.report}\nbundle: {result.bundle}")
    for name, m in result.metrics.items():
        p = m["pooled"]
        qwk = f"  QWK {p['quadratic_weighted_kappa']:.3f}" if "quadratic_weighted_kappa" in p else ""
        print(f"  {name:18s} macro-F1 {p['macro_f1']:.3f}  macro-AUC {p['macro_auc']:.3f}{qwk}")
    return 0


def cmd_synthetic(args) -> int:
    from breastfusion.data.synthetic import make_synthetic_cohort

    if args.kind == "histology":
        from breastfusion.data.synthetic_histology import make_synthetic_grading

        cases, tiles = make_synthetic_grading(args.out, n_patients=args.n_patients, stacks_per_case=args.stacks,
                                              size=args.tile_size, signal=args.signal, seed=args.seed)
        print(f"SYNTHETIC grading cohort: {len(cases)} cases, {len(tiles)} tiles → "
              f"{Path(args.out) / 'cases.csv'} and {Path(args.out) / 'tiles.csv'}")
        return 0

    cases = make_synthetic_cohort(args.out, n_cases=args.n_cases, image_size=args.image_size, signal=args.signal,
                                  missing_rate=args.missing_rate, seed=args.seed)
    print(f"SYNTHETIC cohort: {len(cases)} cases → {Path(args.out) / 'cases.csv'}")
    return 0


def cmd_config(args) -> int:
    from breastfusion.config import config_to_yaml, load_config

    print(config_to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="synthetic cohort → audit → train → report → predict (a few minutes on CPU)")
    p.add_argument("--out", default="demo_run", help="output folder (default: demo_run)")
    p.add_argument("--n-cases", type=int, default=120)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="cross-validated comparison of classical and deep models + bundle "
                                     "(ultrasound fusion, or histology grading with task: histology)")
    _common_config_args(p)
    p.add_argument("--data", help="cases table or BUSI-style folder (sets data.source)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue a killed run in the same folder")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="print the resolved configuration (defaults, a YAML file, overrides)")
    _common_config_args(p)
    p.set_defaults(func=cmd_config)


def _add_synthetic(sub) -> None:
    p = sub.add_parser("synthetic", help="write a SYNTHETIC cohort: ultrasound + clinical, or H&E grading stacks")
    p.add_argument("out")
    p.add_argument("--kind", choices=["ultrasound", "histology"], default="ultrasound")
    p.add_argument("--n-cases", type=int, default=120, help="ultrasound: number of cases")
    p.add_argument("--image-size", type=int, default=128, help="ultrasound: image side")
    p.add_argument("--n-patients", type=int, default=24, help="histology: patients (one case each)")
    p.add_argument("--stacks", type=int, default=4, help="histology: concentric stacks per case")
    p.add_argument("--tile-size", type=int, default=128, help="histology: tile side")
    p.add_argument("--signal", type=float, default=1.0)
    p.add_argument("--missing-rate", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synthetic)


_PARSERS = {
    "demo": _add_demo,
    "train": _add_train,
    "config": _add_config,
    "synthetic": _add_synthetic,
}


def add_parsers(sub, names=None) -> None:
    """Add this group's subcommands to ``sub`` (the top parser's subparsers): all of them, or only ``names``, in
    the order given."""
    for name in _PARSERS if names is None else names:
        _PARSERS[name](sub)
