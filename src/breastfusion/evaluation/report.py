"""Self-contained HTML evaluation report.

``write_report`` writes ``<out_dir>/report.html`` that opens offline: CSS inline, images embedded as base64
data URIs, no scripts, no external fonts or stylesheets. The PNG figures are also kept in
``<out_dir>/figures/``. Every user-supplied string (titles, model and class names, notes, configuration,
summary keys and values) is HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from breastfusion.evaluation.metrics import (
    HEADLINE,
    PER_CLASS,
    comparison_table,
    evaluate,
    format_ci,
    format_mean_sd,
)
from breastfusion.evaluation.plots import (
    plot_confusion_matrix,
    plot_model_comparison,
    plot_reliability_diagram,
    plot_roc_curves,
)
from breastfusion.utils import atomic_path

SYNTHETIC_BANNER = "SYNTHETIC DATA \u2014 not a clinical result"

_LABELS = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "macro_f1": "Macro-F1",
    "weighted_f1": "Weighted-F1",
    "macro_auc": "Macro ROC-AUC (one-vs-rest)",
    "brier": "Brier score (lower is better)",
    "quadratic_weighted_kappa": "Quadratic weighted kappa",
    "log_loss": "Log loss (lower is better)",
    "ece": "Expected calibration error (top-label, lower is better)",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "f1": "F1",
    "auc": "ROC-AUC",
}

_CSS = """
:root { --ink:#1d2330; --muted:#5b6475; --line:#d9dee7; --soft:#f4f6fa; --accent:#1f5fa8; }
* { box-sizing: border-box; }
body { margin:0; padding:0 0 48px; color:var(--ink); background:#fff;
  font:15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width:1100px; margin:0 auto; padding:0 24px; }
header { padding:28px 0 8px; border-bottom:2px solid var(--accent); margin-bottom:18px; }
h1 { font-size:26px; margin:0 0 4px; }
h2 { font-size:20px; margin:34px 0 10px; padding-bottom:4px; border-bottom:1px solid var(--line); }
h3 { font-size:16px; margin:22px 0 8px; color:var(--accent); }
.meta { color:var(--muted); font-size:13px; }
.banner { background:#c62828; color:#fff; font-weight:700; font-size:20px; letter-spacing:.5px;
  text-align:center; padding:14px 16px; margin:16px 0; border-radius:6px; border:3px solid #8e0000; }
.banner small { display:block; font-weight:400; font-size:13px; letter-spacing:0; margin-top:4px; }
nav { background:var(--soft); border:1px solid var(--line); border-radius:6px; padding:8px 14px; font-size:14px; }
nav a { color:var(--accent); text-decoration:none; margin-right:14px; white-space:nowrap; }
table { border-collapse:collapse; margin:8px 0 14px; font-size:13.5px; }
th, td { border:1px solid var(--line); padding:5px 9px; text-align:left; vertical-align:top; }
th { background:var(--soft); font-weight:600; }
tbody tr:nth-child(even) td { background:#fafbfd; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
tr.summary td { font-weight:600; border-top:2px solid var(--muted); }
.notes { background:#fff8e1; border-left:5px solid #f9a825; padding:8px 14px 8px 10px; margin:10px 0; }
.notes ul { margin:4px 0; padding-left:22px; }
.evalnotes { color:var(--muted); font-size:13px; }
pre { background:var(--soft); border:1px solid var(--line); border-radius:4px; padding:10px 12px;
  font:12.5px/1.45 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; overflow-x:auto;
  white-space:pre-wrap; }
.figs { display:flex; flex-wrap:wrap; gap:16px; align-items:flex-start; }
figure { margin:0; border:1px solid var(--line); border-radius:4px; padding:6px; background:#fff; }
figure img { display:block; max-width:100%; height:auto; }
figure.small img { width:500px; }
figcaption { font-size:12.5px; color:var(--muted); text-align:center; margin-top:4px; }
.wide { overflow-x:auto; }
footer { margin-top:40px; color:var(--muted); font-size:12.5px; border-top:1px solid var(--line); padding-top:8px; }
@media print { .banner { -webkit-print-color-adjust:exact; print-color-adjust:exact; } nav { display:none; } }
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _slug(name: str, i: int) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._-")[:40]
    return f"{i:02d}_{s or 'model'}"


def _img(path: Path, alt: str, caption: str, small: bool = True) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    cls = ' class="small"' if small else ""
    return (f'<figure{cls}><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _fmt_scalar(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "n/a"
        return f"{v:,.0f}" if float(v).is_integer() and abs(v) < 1e15 else f"{v:.4g}"
    return str(v)


def _render_value(v: Any, depth: int = 0) -> str:
    """Any summary value as escaped HTML: dicts as nested tables, lists as bullet lists, frames as tables."""
    if isinstance(v, pd.Series):
        v = v.to_dict()
    if isinstance(v, pd.DataFrame):
        return '<div class="wide">' + _table(list(map(str, v.columns)),
                                              [[_e(_fmt_scalar(x)) for x in row] for row in v.itertuples(index=False)]) \
            + "</div>"
    if isinstance(v, dict):
        if depth > 3:
            return _e(v)
        rows = [[_e(k), _render_value(x, depth + 1)] for k, x in v.items()]
        return _table(None, rows)
    if isinstance(v, (list, tuple, set)):
        items = list(v)
        if not items:
            return "<em>none</em>"
        if all(not isinstance(x, (dict, list, tuple, pd.DataFrame)) and len(str(x)) < 40 for x in items) \
                and len(items) <= 12:
            return _e(", ".join(_fmt_scalar(x) for x in items))
        return "<ul>" + "".join(f"<li>{_render_value(x, depth + 1)}</li>" for x in items) + "</ul>"
    return _e(_fmt_scalar(v))


def _table(header: list[str] | None, rows: list[list[str]], num_from: int = 1, summary_last: bool = False) -> str:
    """Rows hold already-escaped HTML cells; header strings are escaped here. Cells from column
    ``num_from`` on are right-aligned when they look numeric."""
    out = ["<table>"]
    if header:
        out.append("<thead><tr>" + "".join(
            f'<th class="num">{_e(h)}</th>' if i >= num_from else f"<th>{_e(h)}</th>" for i, h in enumerate(header)
        ) + "</tr></thead>")
    out.append("<tbody>")
    for r_i, row in enumerate(rows):
        cls = ' class="summary"' if summary_last and r_i == len(rows) - 1 else ""
        cells = []
        for i, c in enumerate(row):
            numeric = i >= num_from and re.match(r"^[\s\d.,\u2212\u2013()\u00b1%+-]+$|^n/a$", re.sub("<[^>]+>", "", c))
            cells.append(f'<td class="num">{c}</td>' if numeric else f"<td>{c}</td>")
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _df_table(df: pd.DataFrame) -> str:
    return '<div class="wide">' + _table(list(map(str, df.columns)),
                                          [[_e(_fmt_scalar(x)) for x in row] for row in df.itertuples(index=False)]) \
        + "</div>"


def _model_section(name: str, slug: str, res: dict, preds: pd.DataFrame | None, fig_dir: Path,
                   description: str | None) -> str:
    pooled, ci = res["pooled"], res.get("ci", {})
    fs = res.get("fold_summary", {})
    cm = res.get("ci_method", {})
    level = f"{100 * cm.get('level', 0.95):.0f}%"
    parts = [f'<section id="{_e(slug)}"><h2>Model: {_e(name)}</h2>']
    if description:
        parts.append(f"<p>{_e(description)}</p>")
    parts.append(f'<p class="meta">{_e(res["n"])} cases; classes: {_e(", ".join(res["classes"]))}</p>')

    # headline metrics
    names = list(HEADLINE) + (["quadratic_weighted_kappa"] if "quadratic_weighted_kappa" in pooled else [])
    rows = []
    for m in names:
        rows.append([_e(_LABELS.get(m, m)), _e(format_ci(pooled.get(m), ci.get(m))),
                     _e(format_mean_sd(fs.get(m)) if fs else "\u2014")])
    for m in ("log_loss", "ece"):
        if m in pooled:
            rows.append([_e(_LABELS[m]), _e(format_ci(pooled[m])), _e("\u2014")])
    parts.append("<h3>Metrics</h3>")
    parts.append(_table(["Metric", f"Pooled ({level} CI)", "Across folds (mean \u00b1 sd)"], rows))

    # per class
    rows = []
    for c in res["classes"]:
        pc = pooled["per_class"][c]
        rows.append([_e(c), _e(_fmt_scalar(pc["support"]))]
                    + [_e(format_ci(pc[m], ci.get(f"{m}[{c}]"))) for m in PER_CLASS])
    parts.append(f"<h3>Per class (one-vs-rest, {level} CI)</h3>")
    parts.append('<div class="wide">' + _table(["Class", "Support"] + [_LABELS[m] for m in PER_CLASS], rows) + "</div>")

    # confusion matrix as numbers
    cmx = pooled["confusion_matrix"]
    rows = [[_e(c)] + [_e(_fmt_scalar(v)) for v in cmx[i]] for i, c in enumerate(res["classes"])]
    parts.append("<h3>Confusion matrix (rows: true, columns: predicted)</h3>")
    parts.append(_table(["true \\ predicted"] + list(res["classes"]), rows))

    # per fold
    per_fold = res.get("per_fold") or []
    if per_fold:
        keys = [k for k in per_fold[0] if k not in ("fold", "n")]
        header = ["Fold", "n"] + [_LABELS.get(k, k) if "[" not in k else
                                  "Sens. " + k[k.index("[") + 1:-1] for k in keys]
        rows = [[_e(r["fold"]), _e(r["n"])] + [_e(format_ci(r[k])) for k in keys] for r in per_fold]
        rows.append([_e("mean \u00b1 sd"), _e(sum(r["n"] for r in per_fold))]
                    + [_e(format_mean_sd(fs.get(k))) for k in keys])
        parts.append("<h3>Per fold</h3>")
        parts.append('<div class="wide">' + _table(header, rows, summary_last=True) + "</div>")
    else:
        parts.append('<p class="meta">Single hold-out evaluation: no per-fold results.</p>')

    # figures
    if preds is not None:
        classes = res["classes"]
        figs = [
            (plot_confusion_matrix(preds, classes, fig_dir / f"{slug}_confusion.png", title=f"{name}"),
             "confusion matrix", "Confusion matrix: count and row % (diagonal = sensitivity)"),
            (plot_roc_curves(preds, classes, fig_dir / f"{slug}_roc.png", title=f"{name}"),
             "ROC curves", "One-vs-rest ROC curves with AUC"),
            (plot_reliability_diagram(preds, classes, fig_dir / f"{slug}_reliability.png", title=f"{name}"),
             "reliability diagram", "Calibration (reliability diagram)"),
        ]
        parts.append("<h3>Figures</h3><div class=\"figs\">"
                     + "".join(_img(p, f"{name}: {alt}", cap) for p, alt, cap in figs) + "</div>")
    else:
        parts.append('<p class="meta">No prediction table given: figures omitted.</p>')

    if res.get("notes"):
        parts.append('<div class="evalnotes"><strong>Evaluation notes:</strong><ul>'
                     + "".join(f"<li>{_e(n)}</li>" for n in res["notes"]) + "</ul></div>")
    parts.append("</section>")
    return "\n".join(parts)


def write_report(
    out_dir: str | Path,
    *,
    title: str,
    model_results: dict[str, dict | pd.DataFrame],
    dataset_summary: dict | None = None,
    config_text: str | None = None,
    notes: list[str] | None = None,
    synthetic: bool = False,
    evaluate_kwargs: dict | None = None,
    extra_figures: dict[str, str | Path] | None = None,
    sections: list | None = None,
) -> Path:
    """Write ``<out_dir>/report.html`` (self-contained) and its PNG figures in ``<out_dir>/figures/``.

    ``model_results`` maps a model name to ``{"predictions": DataFrame, "metrics": evaluate(...) output}``.
    Either key may be left out: without ``metrics`` the report calls :func:`evaluate` on the predictions
    (with ``evaluate_kwargs``, e.g. ``{"n_boot": 1000, "group_col": "patient_id", "ordinal": True}``);
    without ``predictions`` the model's figures are left out. A bare DataFrame stands for
    ``{"predictions": df}``. An optional ``"description"`` string is shown under the model heading.

    ``dataset_summary`` maps a heading to any value (number, string, list, dict, DataFrame), e.g. counts
    per class or audit findings. ``config_text`` is shown verbatim (YAML/JSON). ``notes`` are caveats shown
    near the top. ``synthetic=True`` adds a red "SYNTHETIC DATA — not a clinical result" banner.
    ``extra_figures`` maps a caption to a PNG file to embed. ``sections`` are extra
    :class:`~breastfusion.evaluation.insight.ReportSection` objects (paragraphs, a table, figures) shown after
    the models, e.g. calibration and explanations of the final bundle. Returns the path of ``report.html``.
    """
    from breastfusion import __version__

    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    if not model_results:
        raise ValueError("write_report needs at least one model in model_results.")

    results: dict[str, dict] = {}
    preds: dict[str, pd.DataFrame | None] = {}
    descs: dict[str, str | None] = {}
    for name, entry in model_results.items():
        if isinstance(entry, pd.DataFrame):
            entry = {"predictions": entry}
        p = entry.get("predictions")
        m = entry.get("metrics")
        if m is None:
            if p is None:
                raise ValueError(f"Model '{name}': give 'predictions' or 'metrics' (or both).")
            m = evaluate(p, **(evaluate_kwargs or {}))
        results[str(name)] = m
        preds[str(name)] = p
        descs[str(name)] = entry.get("description")

    slugs = {name: _slug(name, i) for i, name in enumerate(results)}
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body: list[str] = []
    body.append(f"<header><h1>{_e(title)}</h1>"
                f'<div class="meta">Generated {_e(now)} by breastfusion {_e(__version__)}</div></header>')
    if synthetic:
        body.append(f'<div class="banner" role="alert">{_e(SYNTHETIC_BANNER)}'
                    "<small>Every number and figure below comes from generated data. It demonstrates the "
                    "software only and says nothing about clinical performance.</small></div>")

    toc = [("notes", "Notes"), ("dataset", "Dataset"), ("comparison", "Model comparison")]
    toc += [(slugs[n], f"Model: {n}") for n in results]
    toc += [(f"x-{sec.id}", sec.title) for sec in sections or []]
    toc += [("config", "Configuration"), ("methods", "Methods")]
    have = {"notes": bool(notes), "dataset": bool(dataset_summary), "config": bool(config_text)}
    body.append("<nav>" + "".join(f'<a href="#{_e(a)}">{_e(t)}</a>' for a, t in toc if have.get(a, True))
                + "</nav>")

    if notes:
        body.append('<section id="notes"><h2>Notes and caveats</h2><div class="notes"><ul>'
                    + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul></div></section>")

    if dataset_summary:
        rows = [[_e(k), _render_value(v)] for k, v in dataset_summary.items()]
        body.append('<section id="dataset"><h2>Dataset</h2>' + _table(None, rows, num_from=99) + "</section>")

    # comparison
    table = comparison_table(results)
    comp = ['<section id="comparison"><h2>Model comparison</h2>', _df_table(table)]
    if len(results) > 1:
        p = plot_model_comparison(results, fig_dir / "comparison_macro_f1.png")
        comp.append('<div class="figs">' + _img(p, "macro-F1 per model", "Macro-F1 per model with bootstrap CI",
                                                  small=False) + "</div>")
    comp.append("</section>")
    body.append("\n".join(comp))

    for name, res in results.items():
        body.append(_model_section(name, slugs[name], res, preds[name], fig_dir, descs[name]))

    for sec in sections or []:
        part = [f'<section id="x-{_e(sec.id)}"><h2>{_e(sec.title)}</h2>']
        part += [f"<p>{_e(p)}</p>" for p in sec.paragraphs]
        if sec.table is not None and len(sec.table):
            part.append(_df_table(sec.table))
        if sec.figures:
            part.append('<div class="figs">' + "".join(_img(Path(p), cap, cap, small=False) for p, cap in sec.figures
                                                       if Path(p).exists()) + "</div>")
        part.append("</section>")
        body.append("\n".join(part))

    if extra_figures:
        body.append('<section id="extra"><h2>Additional figures</h2><div class="figs">'
                    + "".join(_img(Path(p), cap, cap, small=False) for cap, p in extra_figures.items())
                    + "</div></section>")

    if config_text:
        body.append(f'<section id="config"><h2>Configuration</h2><pre>{_e(config_text)}</pre></section>')

    methods = []
    for name, res in results.items():
        cm = res.get("ci_method", {})
        if cm.get("n_boot"):
            unit = "cases" if cm.get("unit") == "case" else f"groups of '{cm.get('unit')}' (cluster bootstrap)"
            methods.append(f"{name}: {100 * cm.get('level', 0.95):.0f}% {cm.get('method', 'bootstrap')} "
                           f"interval, {cm['n_boot']} resamples of {cm.get('n_units')} {unit}, seed {cm.get('seed')}.")
        else:
            methods.append(f"{name}: no confidence intervals computed.")
    methods.append("Pooled metrics use all out-of-fold predictions together. Macro-F1 averages per-class F1 "
                   "over all classes; balanced accuracy is the mean per-class sensitivity; ROC-AUC is "
                   "one-vs-rest, macro-AUC its unweighted mean over classes.")
    body.append('<section id="methods"><h2>Methods</h2><ul>'
                + "".join(f"<li>{_e(m)}</li>" for m in methods) + "</ul></section>")
    if synthetic:
        body.append(f'<div class="banner">{_e(SYNTHETIC_BANNER)}</div>')
    body.append(f"<footer>{_e(title)} \u00b7 breastfusion {_e(__version__)} \u00b7 {_e(now)}</footer>")

    page_title = (f"[SYNTHETIC] {title}" if synthetic else title)
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           '<meta name="viewport" content="width=device-width, initial-scale=1">'
           f"<title>{_e(page_title)}</title><style>{_CSS}</style></head>\n<body><main>\n"
           + "\n".join(body) + "\n</main></body></html>\n")
    path = out_dir / "report.html"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(doc, encoding="utf-8")
    return path
