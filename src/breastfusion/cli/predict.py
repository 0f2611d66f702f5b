"""Bundle commands: predict, export, explain, serve."""

from __future__ import annotations

import sys
from pathlib import Path

from breastfusion.cli._common import EXIT_ERROR
from breastfusion.data.images import MAX_SCORED_PIXELS
from breastfusion.errors import DataError


def cmd_predict(args) -> int:
    from breastfusion.inference.predictor import (
        ABSENT_CLINICAL,
        Predictor,
        check_output_path,
        write_predictions,
    )
    from breastfusion.utils import atomic_path

    check_output_path(args.out)  # before the bundle loads and anything is scored
    if args.max_pixels < 1:
        raise DataError(f"--max-pixels must be a positive number of pixels; got {args.max_pixels}.")
    predictor = Predictor.load(args.bundle, model=args.model, batch_size=args.batch_size, backend=args.backend)
    predictor.max_pixels = args.max_pixels
    preds = predictor.predict(args.input, cases=args.cases, progress=not args.quiet, strict=args.strict)
    absent = predictor.last_absent
    out, skipped = write_predictions(preds, predictor.last_skipped, args.out)
    for name, table in predictor.extra_outputs().items():  # e.g. per-stack attention of a histology bundle
        extra = Path(args.out).with_name(f"{Path(args.out).stem}.{name}.csv")
        with atomic_path(extra) as tmp:
            table.to_csv(tmp, index=False)
        print(f"{name} → {extra}")
    n_skipped = len(predictor.last_skipped)
    synthetic = predictor.bundle.synthetic
    if len(preds) == 0:  # every item skipped: a failure, whatever was written
        print(f"error: nothing scored: all {n_skipped} case(s) were skipped, reasons in {skipped}", file=sys.stderr)
        return EXIT_ERROR
    print(f"scored {len(preds)} case(s) → {out}")
    if skipped:
        print(f"skipped {n_skipped} case(s), reasons in {skipped}", file=sys.stderr)
    if absent:
        print(f"note: scored without clinical column(s) {', '.join(absent)} (absent from the input; "
              f"column '{ABSENT_CLINICAL}' of the output)", file=sys.stderr)
    if synthetic:
        print("note: this bundle was trained on SYNTHETIC data", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    """ONNX export of a bundle's network, checked against PyTorch (ONNX Runtime on CPU)."""
    import json

    from breastfusion.inference.onnx_export import export_onnx

    out = export_onnx(args.bundle, args.out, opset=args.opset, check=not args.no_check)
    entry = json.loads((Path(args.bundle) / "bundle.json").read_text())["onnx"]
    ins = ", ".join(f"{i['name']} {tuple(i['shape'])}" for i in entry["inputs"])
    print(f"ONNX model (opset {entry['opset']}): {out}\n  inputs: {ins}\n  sha256: {entry['sha256']}")
    if entry.get("parity"):
        print(f"  parity: max |p_torch - p_onnx| = {entry['parity']['max_abs_prob_diff']:.2e} "
              f"(< {entry['parity']['atol']:g})")
    else:
        print("  parity: not checked (--no-check)")
    return 0


def cmd_explain(args) -> int:
    """Grad-CAM / Grad-CAM++ / occlusion maps, modality deltas and tabular SHAP for a bundle's predictions."""
    from breastfusion.explain.runner import explain_bundle

    res = explain_bundle(args.bundle, args.input, args.out, methods=args.method, top_k=args.top_k, cases=args.cases,
                         background=args.background, background_size=args.background_size,
                         max_cases=args.max_cases, max_stacks=args.max_stacks, shap_method=args.shap_method,
                         n_permutations=args.permutations, threads=args.threads,
                         occlusion_patch=args.occlusion_patch, progress=not args.quiet)
    print(f"explained {len(res.table)} case(s) → {res.csv}\n  figures: {len(res.figures)} in {Path(args.out)}")
    if res.shap_summary:
        print(f"  SHAP summary: {res.shap_summary}")
    if res.timings:
        print("  seconds per item: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(res.timings.items())))
    if len(res.skipped):
        print(f"skipped {len(res.skipped)} case(s), reasons in {Path(args.out) / 'skipped.csv'}", file=sys.stderr)
    return 0 if len(res.table) else 2


def cmd_serve(args) -> int:
    """The web service (REST API + web page) for one bundle, with uvicorn, until interrupted."""
    from breastfusion.serve.app import serve

    serve(args.bundle, host=args.host, port=args.port, workers=args.workers, log_level=args.log_level,
          max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels, timeout_s=args.timeout,
          max_concurrency=args.max_concurrency, threads=args.threads)
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="score an image, a folder of images or a cases table with a bundle "
                                       "(histology bundles: a tiles table or a `breastfusion tile` output)")
    p.add_argument("bundle")
    p.add_argument("input")
    p.add_argument("--cases", help="histology: cases table with the clinical columns the bundle expects")
    p.add_argument("--out", required=True, help="output file: .csv, .tsv, .parquet/.pq, or .xlsx (needs openpyxl)")
    p.add_argument("--model", help="a classical model stored in the bundle (e.g. lgbm) instead of the deep model")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="deep model forward pass: torch, or onnx (ONNX Runtime on CPU; needs 'breastfusion export')")
    p.add_argument("--max-pixels", type=int, default=MAX_SCORED_PIXELS,
                   help=f"largest image scored, width x height, checked before decoding; larger ones are skipped "
                        f"with the reason (default {MAX_SCORED_PIXELS:,}, as serve)")
    p.add_argument("--strict", action="store_true",
                   help="refuse a cases table (or histology --cases table) that lacks clinical columns the model "
                        "reads (default: warn, score them as unknown and name them in the output column "
                        "absent_clinical_columns); images without a table are the 'no clinical data' case")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_predict)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a bundle's network to ONNX (checked against PyTorch) for --backend onnx")
    p.add_argument("bundle")
    p.add_argument("--out", help="ONNX file to write (default: BUNDLE/model.onnx)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--no-check", action="store_true", help="skip the PyTorch / ONNX Runtime parity check")
    p.set_defaults(func=cmd_export)


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="Grad-CAM, occlusion, modality deltas and tabular SHAP of a bundle's "
                                       "predictions (PNGs, explanations.csv, shap_summary.png)")
    p.add_argument("bundle")
    p.add_argument("input", help="image, folder of images or cases table (ultrasound bundles); tiles table, "
                                 "`breastfusion tile` output or folder of tiles (histology bundles)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--method", default="all", help="gradcam, gradcam++, occlusion, a comma list, or all (default)")
    p.add_argument("--top-k", type=int, default=10, help="tabular features listed per case (default 10)")
    p.add_argument("--cases", help="histology: cases table with the clinical columns the bundle expects")
    p.add_argument("--background", help="SHAP background: a cases table (a sample of training cases); "
                                        "default: the 'no tabular data' row")
    p.add_argument("--background-size", type=int, default=32, help="background rows sampled (default 32)")
    p.add_argument("--shap-method", choices=["auto", "exact", "permutation", "shap"], default="auto",
                   help="auto: exact for <= 10 input columns, else permutation sampling; shap: the shap package")
    p.add_argument("--permutations", type=int, default=64, help="SHAP permutations (default 64)")
    p.add_argument("--max-cases", type=int, help="explain only the first N cases")
    p.add_argument("--max-stacks", type=int, default=4, help="histology: stacks explained per case (default 4)")
    p.add_argument("--occlusion-patch", type=int, help="occlusion patch side in pixels (default: a quarter of the "
                                                       "image side; stride half a patch)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_explain)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="web service for a bundle: REST API (/predict, /health, /docs) and a web page")
    p.add_argument("bundle")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (each loads the bundle)")
    p.add_argument("--max-upload-mb", type=float, default=10, help="largest accepted file (default 10 MiB)")
    p.add_argument("--max-pixels", type=int, default=MAX_SCORED_PIXELS,
                   help=f"largest accepted image, width x height (default {MAX_SCORED_PIXELS:,})")
    p.add_argument("--timeout", type=float, default=30, help="seconds one prediction may take (504 after)")
    p.add_argument("--max-concurrency", type=int, default=4, help="predictions computed at once per worker")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: every core)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


_PARSERS = {
    "predict": _add_predict,
    "export": _add_export,
    "explain": _add_explain,
    "serve": _add_serve,
}


def add_parsers(sub, names=None) -> None:
    """Add this group's subcommands to ``sub`` (the top parser's subparsers): all of them, or only ``names``, in
    the order given."""
    for name in _PARSERS if names is None else names:
        _PARSERS[name](sub)
