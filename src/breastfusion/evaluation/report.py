"""Self-contained HTML evaluation report.

``write_report`` writes ``<out_dir>/report.html`` that opens offline: CSS inline, images embedded as base64
data URIs, no scripts, no external fonts or stylesheets. The PNG figures are also kept in
``<out_dir>/figures/``. Every user-supplied string (titles, model and class names, notes, configuration,
summary keys and values) is HTML-escaped.

Layout: a summary a reader takes in at a glance comes first (the models side by side with confidence intervals,
the best model marked, what kind of figures these are, the best model's ROC curves and confusion matrix, the
caveats), then the dataset, then one folded ``<details>`` block per model, the bundle's sections, the folded
configuration and the methods. Identifiers are shown with human labels (:mod:`breastfusion.evaluation.labels`)
and the page fits a 1280 px screen: a max-width container, images that scale down, wide tables that scroll
inside their own box.
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

from breastfusion.evaluation.labels import (
    format_duration,
    humanize,
    is_timing_key,
    metric_label,
    model_label,
)
from breastfusion.evaluation.metrics import (
    HEADLINE,
    PER_CLASS,
    comparison_table,
    evaluate,
    format_ci,
    format_mean_sd,
    metric_value,
)
from breastfusion.evaluation.plots import (
    plot_confusion_matrix,
    plot_model_comparison,
    plot_reliability_diagram,
    plot_roc_curves,
)
from breastfusion.utils import atomic_path

SYNTHETIC_BANNER = "SYNTHETIC DATA \u2014 not a clinical result"

# The three figures a reader compares models by, in the summary table.
SUMMARY_METRICS = ("macro_f1", "macro_auc", "balanced_accuracy")
# Below these a cohort is called small in the caveats: intervals are wide and a few cases move the figures.
SMALL_COHORT_CASES = 200
SMALL_CLASS_CASES = 30

_CSS = """
:root { --ink:#1d2330; --muted:#5b6475; --line:#d9dee7; --soft:#f4f6fa; --accent:#1f5fa8; --best:#e7f0fb; }
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
nav { display:flex; flex-wrap:wrap; gap:4px 16px; background:var(--soft); border:1px solid var(--line);
  border-radius:6px; padding:8px 14px; font-size:14px; }
nav a { color:var(--accent); text-decoration:none; }
table { border-collapse:collapse; margin:8px 0 14px; font-size:13.5px; }
th, td { border:1px solid var(--line); padding:5px 9px; text-align:left; vertical-align:top; }
th { background:var(--soft); font-weight:600; }
tbody tr:nth-child(even) td { background:#fafbfd; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
tr.summary td { font-weight:600; border-top:2px solid var(--muted); }
tr.best td { background:var(--best); font-weight:600; }
.badge { display:inline-block; background:var(--accent); color:#fff; font-size:11px; font-weight:700;
  border-radius:3px; padding:0 5px; margin-left:6px; vertical-align:1px; }
.lede { font-size:14px; margin:6px 0 10px; }
.notes { background:#fff8e1; border-left:5px solid #f9a825; padding:8px 14px 8px 10px; margin:10px 0; }
.notes ul { margin:4px 0; padding-left:22px; }
.evalnotes { color:var(--muted); font-size:13px; }
pre { background:var(--soft); border:1px solid var(--line); border-radius:4px; padding:10px 12px;
  font:12.5px/1.45 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; overflow-x:auto;
  white-space:pre-wrap; }
img { max-width:100%; height:auto; }
.figs { display:grid; grid-template-columns:repeat(auto-fit, minmax(320px, 1fr)); gap:16px; align-items:start; }
.figs.large { grid-template-columns:minmax(0, 1fr); }
.figs.pair img { max-height:460px; width:auto; }
figure { margin:0; border:1px solid var(--line); border-radius:4px; padding:6px; background:#fff; min-width:0; }
figure img { display:block; max-width:100%; height:auto; margin:0 auto; }
figcaption { font-size:12.5px; color:var(--muted); text-align:center; margin-top:4px; }
.wide { overflow-x:auto; max-width:100%; }
details { border:1px solid var(--line); border-radius:6px; margin:8px 0; padding:0 14px; background:#fff; }
details[open] { padding-bottom:10px; }
details > summary { cursor:pointer; padding:9px 0; font-weight:600; }
details > summary .meta { font-weight:400; margin-left:8px; }
details details { border-style:dashed; }
footer { margin-top:40px; color:var(--muted); font-size:12.5px; border-top:1px solid var(--line); padding-top:8px; }
@media print { .banner { -webkit-print-color-adjust:exact; print-color-adjust:exact; } nav { display:none; }
  details > *:not(summary) { display:block; } }
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _slug(name: str, i: int) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._-")[:40]
    return f"{i:02d}_{s or 'model'}"


def _img(path: Path, alt: str, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
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


def _is_timings(v: Any) -> bool:
    return (isinstance(v, dict) and bool(v) and all(is_timing_key(k) for k in v)
            and all(isinstance(x, (int, float, np.integer, np.floating)) for x in v.values()))


def _render_value(v: Any, depth: int = 0, *, label_keys: bool = True) -> str:
    """Any summary value as escaped HTML: dicts as nested tables (keys given human labels unless ``label_keys`` is
    false, e.g. for class names), timings in s/min/h, lists as bullet lists, frames as tables."""
    if isinstance(v, pd.Series):
        v = v.to_dict()
    if isinstance(v, pd.DataFrame):
        return _df_table(v)
    if _is_timings(v):
        return _table(None, [[_e(humanize(k)), _e(format_duration(x))] for k, x in v.items()])
    if isinstance(v, dict):
        if depth > 3:
            return _e(v)
        rows = [[_e(humanize(k) if label_keys else k), _render_value(x, depth + 1)] for k, x in v.items()]
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


def _table(header: list[str] | None, rows: list[list[str]], num_from: int = 1, summary_last: bool = False,
           row_classes: list[str] | None = None) -> str:
    """Rows hold already-escaped HTML cells; header strings are escaped here. Cells from column
    ``num_from`` on are right-aligned when they look numeric."""
    out = ["<table>"]
    if header:
        out.append("<thead><tr>" + "".join(
            f'<th class="num">{_e(h)}</th>' if i >= num_from else f"<th>{_e(h)}</th>" for i, h in enumerate(header)
        ) + "</tr></thead>")
    out.append("<tbody>")
    for r_i, row in enumerate(rows):
        cls = "summary" if summary_last and r_i == len(rows) - 1 else (row_classes[r_i] if row_classes else "")
        cells = []
        for i, c in enumerate(row):
            numeric = i >= num_from and re.match(r"^[\s\d.,\u2212\u2013()\u00b1%+-]+$|^n/a$", re.sub("<[^>]+>", "", c))
            cells.append(f'<td class="num">{c}</td>' if numeric else f"<td>{c}</td>")
        out.append((f'<tr class="{cls}">' if cls else "<tr>") + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _df_table(df: pd.DataFrame) -> str:
    return '<div class="wide">' + _table(list(map(str, df.columns)),
                                          [[_e(_fmt_scalar(x)) for x in row] for row in df.itertuples(index=False)]) \
        + "</div>"


def _level(res: dict) -> str:
    return f"{100 * res.get('ci_method', {}).get('level', 0.95):.0f}%"


def _best_model(results: dict[str, dict]) -> str | None:
    """The model with the highest pooled macro-F1 (the first one on a tie); None when no model has one."""
    scores = {n: metric_value(r, "macro_f1") for n, r in results.items()}
    scores = {n: v for n, v in scores.items() if v is not None and math.isfinite(v)}
    return max(scores, key=scores.get) if scores else None


def _ci_overlap(a: dict, b: dict, key: str = "macro_f1") -> bool:
    ca, cb = a.get("ci", {}).get(key), b.get("ci", {}).get(key)
    if not ca or not cb or not all(math.isfinite(x) for x in (*ca, *cb)):
        return False
    return ca[0] <= cb[1] and cb[0] <= ca[1]


def _kind_of_figures(results: dict[str, dict]) -> str:
    """One sentence on what the figures are: cross-validated out-of-fold or hold-out, how many cases and folds, the CI."""
    first = next(iter(results.values()))
    folds = sorted({len(r.get("per_fold") or []) for r in results.values()})
    n = sorted({r["n"] for r in results.values()})
    n_txt = f"{n[0]:,} cases" if len(n) == 1 else f"{n[0]:,}\u2013{n[-1]:,} cases"
    if folds and folds[-1] > 0:
        k = "/".join(str(f) for f in folds if f)
        kind = (f"Cross-validated: pooled out-of-fold predictions over {k} folds ({n_txt}); every case is scored by "
                "a model that did not train on it.")
    else:
        kind = f"Single hold-out evaluation ({n_txt}): no cross-validation folds."
    cm = first.get("ci_method", {})
    if cm.get("n_boot"):
        unit = "cases" if cm.get("unit") == "case" else "groups (cluster bootstrap)"
        kind += (f" Intervals: {_level(first)} {cm.get('method', 'bootstrap')} over {cm['n_boot']:,} resamples of "
                 f"{unit}.")
    else:
        kind += " No confidence intervals were computed."
    return kind


def _summary_table(results: dict[str, dict], best: str | None, expert_mask: dict[str, bool | None]) -> str:
    level = _level(next(iter(results.values())))
    show_mask = any(v is not None for v in expert_mask.values())
    header = ["Model", "Cases"] + [f"{metric_label(m).split(' (')[0]} ({level} CI)" for m in SUMMARY_METRICS]
    header += ["Expert mask in features"] if show_mask else []
    rows, classes = [], []
    for name, r in results.items():
        label = _e(model_label(name)) + ('<span class="badge">best</span>' if name == best and len(results) > 1
                                          else "")
        row = [label, _e(f"{r['n']:,}")]
        row += [_e(format_ci(metric_value(r, m), r.get("ci", {}).get(m))) for m in SUMMARY_METRICS]
        if show_mask:
            v = expert_mask.get(name)
            row.append(_e("unknown" if v is None else ("yes" if v else "no")))
        rows.append(row)
        classes.append("best" if name == best and len(results) > 1 else "")
    return '<div class="wide">' + _table(header, rows, row_classes=classes) + "</div>"


def _caveats(results: dict[str, dict], best: str | None, notes: list[str], synthetic: bool,
             sections: list) -> list[str]:
    """The caveats shown in the summary: synthetic data, the given notes (expert mask, splits), a small cohort,
    and the calibration status of the bundle (from the calibration section, when there is one)."""
    out = []
    if synthetic and not any("synthetic" in n.lower() for n in notes):
        out.append("Synthetic data: every number and figure comes from generated data; it says nothing about "
                   "clinical performance.")
    out += list(notes)
    ref = results[best] if best else next(iter(results.values()))
    support = [int(ref["pooled"]["per_class"][c]["support"]) for c in ref["classes"]
               if c in ref["pooled"].get("per_class", {})]
    smallest = min(support) if support else 0
    if ref["n"] < SMALL_COHORT_CASES or (support and smallest < SMALL_CLASS_CASES):
        out.append(f"Small cohort: {ref['n']:,} cases (smallest class: {smallest:,}); the confidence intervals are "
                   "wide and a few cases can move every figure.")
    cal = [s for s in sections if getattr(s, "id", None) == "calibration"]
    if cal:
        sec = cal[0]
        lines = [p for p in sec.paragraphs
                 if re.search(r"not calibrated|partly calibrated|uncalibrated|could not be built", p, re.I)]
        if lines:
            out += [f"Calibration \u2014 {p}" for p in lines]
        else:
            out.append("Calibration: the bundle's probabilities are temperature-scaled and its prediction sets refer "
                       "uncertain cases; coverage and referral rates are in the section \u2018"
                       f"{sec.title}\u2019. The metrics above use the uncalibrated out-of-fold probabilities.")
    else:
        out.append("Calibration: not assessed in this report; the probabilities are the models' uncalibrated "
                   "outputs.")
    return out


def _summary_section(results: dict[str, dict], preds: dict, fig_dir: Path, slugs: dict[str, str],
                     notes: list[str], synthetic: bool, sections: list, expert_mask: dict[str, bool | None]) -> str:
    best = _best_model(results)
    parts = ['<section id="summary"><h2>Summary</h2>', f'<p class="lede">{_e(_kind_of_figures(results))}</p>']
    parts.append(_summary_table(results, best, expert_mask))
    if best is not None and len(results) > 1:
        others = [n for n in results if n != best and _ci_overlap(results[best], results[n])]
        txt = (f"Best by pooled macro-F1: {model_label(best)}.")
        if others:
            txt += (f" Its {_level(results[best])} interval overlaps that of "
                    + ", ".join(model_label(n) for n in others)
                    + ": these data do not separate them.")
        parts.append(f'<p class="lede">{_e(txt)}</p>')
    if best is not None and preds.get(best) is not None:
        classes = results[best]["classes"]
        label = model_label(best)
        roc = plot_roc_curves(preds[best], classes, fig_dir / f"{slugs[best]}_roc.png", title=label)
        cmx = plot_confusion_matrix(preds[best], classes, fig_dir / f"{slugs[best]}_confusion.png", title=label)
        parts.append('<div class="figs pair">'
                     + _img(roc, f"{label}: ROC curves", f"{label}: one-vs-rest ROC curves with AUC")
                     + _img(cmx, f"{label}: confusion matrix",
                            f"{label}: confusion matrix, count and row % (diagonal = sensitivity)")
                     + "</div>")
    caveats = _caveats(results, best, notes, synthetic, sections)
    parts.append('<h3>Caveats</h3><div class="notes"><ul>' + "".join(f"<li>{_e(c)}</li>" for c in caveats)
                 + "</ul></div>")
    parts.append("</section>")
    return "\n".join(parts)


def _model_details(name: str, slug: str, res: dict, preds: pd.DataFrame | None, fig_dir: Path,
                   description: str | None, *, best: bool, n_models: int) -> str:
    """One model's metrics, per class, confusion matrix, per fold and figures, folded in a ``<details>`` block.
    The best model's ROC curves and confusion matrix are already in the summary, so only its reliability
    diagram is drawn here."""
    pooled, ci = res["pooled"], res.get("ci", {})
    fs = res.get("fold_summary", {})
    level = _level(res)
    label = model_label(name)
    head = (f"{_e(label)}" + ('<span class="badge">best</span>' if best and n_models > 1 else "")
            + f'<span class="meta">Macro-F1 {_e(format_ci(metric_value(res, "macro_f1"), ci.get("macro_f1")))} '
              f'\u00b7 {_e(res["n"])} cases</span>')
    parts = [f'<details class="model" id="{_e(slug)}"><summary>{head}</summary>']
    if description:
        parts.append(f"<p>{_e(description)}</p>")
    parts.append(f'<p class="meta">{_e(res["n"])} cases; classes: {_e(", ".join(res["classes"]))}</p>')

    names = list(HEADLINE) + (["quadratic_weighted_kappa"] if "quadratic_weighted_kappa" in pooled else [])
    rows = [[_e(metric_label(m)), _e(format_ci(pooled.get(m), ci.get(m))),
             _e(format_mean_sd(fs.get(m)) if fs else "\u2014")] for m in names]
    for m in ("log_loss", "ece"):
        if m in pooled:
            rows.append([_e(metric_label(m)), _e(format_ci(pooled[m])), _e("\u2014")])
    parts.append("<h3>Metrics</h3>")
    parts.append(_table(["Metric", f"Pooled ({level} CI)", "Across folds (mean \u00b1 sd)"], rows))

    rows = []
    for c in res["classes"]:
        pc = pooled["per_class"][c]
        rows.append([_e(c), _e(_fmt_scalar(pc["support"]))]
                    + [_e(format_ci(pc[m], ci.get(f"{m}[{c}]"))) for m in PER_CLASS])
    parts.append(f"<h3>Per class (one-vs-rest, {level} CI)</h3>")
    parts.append('<div class="wide">' + _table(["Class", "Cases"] + [metric_label(m) for m in PER_CLASS], rows)
                 + "</div>")

    cmx = pooled["confusion_matrix"]
    rows = [[_e(c)] + [_e(_fmt_scalar(v)) for v in cmx[i]] for i, c in enumerate(res["classes"])]
    parts.append("<h3>Confusion matrix (rows: true, columns: predicted)</h3>")
    parts.append('<div class="wide">' + _table(["true \\ predicted"] + list(res["classes"]), rows) + "</div>")

    per_fold = res.get("per_fold") or []
    if per_fold:
        keys = [k for k in per_fold[0] if k not in ("fold", "n")]
        header = ["Fold", "Cases"] + [metric_label(k) if "[" not in k else
                                      "Sens. " + k[k.index("[") + 1:-1] for k in keys]
        rows = [[_e(r["fold"]), _e(r["n"])] + [_e(format_ci(r[k])) for k in keys] for r in per_fold]
        rows.append([_e("mean \u00b1 sd"), _e(sum(r["n"] for r in per_fold))]
                    + [_e(format_mean_sd(fs.get(k))) for k in keys])
        parts.append("<h3>Per fold</h3>")
        parts.append('<div class="wide">' + _table(header, rows, summary_last=True) + "</div>")
    else:
        parts.append('<p class="meta">Single hold-out evaluation: no per-fold results.</p>')

    if preds is not None:
        classes = res["classes"]
        figs = []
        if not best:
            figs += [
                (plot_confusion_matrix(preds, classes, fig_dir / f"{slug}_confusion.png", title=label),
                 "confusion matrix", "Confusion matrix: count and row % (diagonal = sensitivity)"),
                (plot_roc_curves(preds, classes, fig_dir / f"{slug}_roc.png", title=label),
                 "ROC curves", "One-vs-rest ROC curves with AUC"),
            ]
        figs.append((plot_reliability_diagram(preds, classes, fig_dir / f"{slug}_reliability.png", title=label),
                     "reliability diagram", "Calibration of the out-of-fold probabilities (reliability diagram)"))
        parts.append("<h3>Figures</h3>"
                     + ('<p class="meta">ROC curves and confusion matrix: in the summary above.</p>' if best else "")
                     + '<div class="figs">' + "".join(_img(p, f"{label}: {alt}", cap) for p, alt, cap in figs)
                     + "</div>")
    else:
        parts.append('<p class="meta">No prediction table given: figures omitted.</p>')

    if res.get("notes"):
        parts.append('<div class="evalnotes"><strong>Evaluation notes:</strong><ul>'
                     + "".join(f"<li>{_e(n)}</li>" for n in res["notes"]) + "</ul></div>")
    parts.append("</details>")
    return "\n".join(parts)


def _comparison_details(results: dict[str, dict], fig_dir: Path) -> str:
    """Every model's full comparison row (weighted-F1, per-class sensitivity, fold spread) and the macro-F1 chart."""
    table = comparison_table(results)
    table["model"] = [model_label(n) for n in table["model"]]
    table = table.rename(columns={c: c[0].upper() + c[1:] for c in table.columns}).rename(
        columns={"Model": "Model", "N": "Cases"})
    parts = ['<details class="comparison" id="comparison"><summary>All metrics side by side</summary>',
             _df_table(table)]
    if len(results) > 1:
        p = plot_model_comparison({model_label(n): r for n, r in results.items()}, fig_dir / "comparison_macro_f1.png")
        parts.append('<div class="figs">' + _img(p, "macro-F1 per model", "Macro-F1 per model with bootstrap CI")
                     + "</div>")
    parts.append("</details>")
    return "\n".join(parts)


def _dataset_section(dataset_summary: dict) -> str:
    rows = []
    for k, v in dataset_summary.items():
        cell = _render_value(v, label_keys=str(k) != "classes")  # class names are data, shown as given
        if isinstance(v, dict) and len(v) > 6:  # long breakdowns (audit, timings) folded under a one-line label
            cell = f"<details><summary>{len(v)} entries</summary>{cell}</details>"
        rows.append([_e(humanize(k)), cell])
    return '<section id="dataset"><h2>Dataset</h2>' + _table(None, rows, num_from=99) + "</section>"


def _extra_section(sec) -> str:
    """A bundle section (calibration, explanations): its text and table shown, its figures folded."""
    part = [f'<section id="x-{_e(sec.id)}"><h2>{_e(sec.title)}</h2>']
    part += [f"<p>{_e(p)}</p>" for p in sec.paragraphs]
    if sec.table is not None and len(sec.table):
        part.append(_df_table(sec.table))
    figs = [(Path(p), cap) for p, cap in sec.figures if Path(p).exists()]
    if figs:
        part.append(f"<details><summary>Figures ({len(figs)})</summary><div class=\"figs large\">"
                    + "".join(_img(p, cap, cap) for p, cap in figs) + "</div></details>")
    part.append("</section>")
    return "\n".join(part)


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
    ``{"predictions": df}``. An optional ``"description"`` string is shown under the model heading, and an
    optional ``"expert_mask"`` flag (its features were computed in the expert's lesion mask) is shown in the
    summary table.

    ``dataset_summary`` maps a heading to any value (number, string, list, dict, DataFrame), e.g. counts
    per class or audit findings; a dict of ``<stage>_s`` seconds is shown as durations. ``config_text`` is
    shown verbatim (YAML/JSON), folded. ``notes`` are caveats, listed in the summary. ``synthetic=True`` adds a
    red "SYNTHETIC DATA — not a clinical result" banner. ``extra_figures`` maps a caption to a PNG file to
    embed. ``sections`` are extra :class:`~breastfusion.evaluation.insight.ReportSection` objects shown after
    the models, e.g. calibration and explanations of the final bundle (a section with id ``calibration`` also
    feeds the calibration caveat of the summary). Returns the path of ``report.html``.
    """
    from breastfusion.version import __version__

    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    if not model_results:
        raise ValueError("write_report needs at least one model in model_results.")
    sections = list(sections or [])
    notes = [str(n) for n in notes or []]

    results: dict[str, dict] = {}
    preds: dict[str, pd.DataFrame | None] = {}
    descs: dict[str, str | None] = {}
    expert_mask: dict[str, bool | None] = {}
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
        expert_mask[str(name)] = entry.get("expert_mask")

    slugs = {name: _slug(name, i) for i, name in enumerate(results)}
    best = _best_model(results)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body: list[str] = []
    body.append(f"<header><h1>{_e(title)}</h1>"
                f'<div class="meta">Generated {_e(now)} by breastfusion {_e(__version__)}</div></header>')
    if synthetic:
        body.append(f'<div class="banner" role="alert">{_e(SYNTHETIC_BANNER)}'
                    "<small>Every number and figure below comes from generated data. It demonstrates the "
                    "software only and says nothing about clinical performance.</small></div>")

    toc = [(f"x-{sec.id}", sec.title) for sec in sections if getattr(sec, "first", False)]
    toc += [("summary", "Summary"), ("dataset", "Dataset"), ("models", "Models in detail")]
    toc += [(f"x-{sec.id}", sec.title) for sec in sections if not getattr(sec, "first", False)]
    toc += [("extra", "Additional figures"), ("config", "Configuration"), ("methods", "Methods")]
    have = {"dataset": bool(dataset_summary), "config": bool(config_text), "extra": bool(extra_figures)}
    body.append("<nav>" + "".join(f'<a href="#{_e(a)}">{_e(t)}</a>' for a, t in toc if have.get(a, True))
                + "</nav>")

    # a section marked ``first`` (the cross-site figures of a multi-centre cohort) opens the report
    first = [sec for sec in sections if getattr(sec, "first", False)]
    body += [_extra_section(sec) for sec in first]
    sections = [sec for sec in sections if sec not in first]
    body.append(_summary_section(results, preds, fig_dir, slugs, notes, synthetic, sections, expert_mask))
    if dataset_summary:
        body.append(_dataset_section(dataset_summary))

    models = ['<section id="models"><h2>Models in detail</h2>',
              '<p class="meta">Click a model to open its metrics per class and per fold, confusion matrix and '
              "figures.</p>", _comparison_details(results, fig_dir)]
    models += [_model_details(name, slugs[name], res, preds[name], fig_dir, descs[name], best=name == best,
                              n_models=len(results))
               for name, res in results.items()]
    models.append("</section>")
    body.append("\n".join(models))

    body += [_extra_section(sec) for sec in sections]

    if extra_figures:
        body.append('<section id="extra"><h2>Additional figures</h2><div class="figs large">'
                    + "".join(_img(Path(p), cap, cap) for cap, p in extra_figures.items())
                    + "</div></section>")

    if config_text:
        body.append('<section id="config"><h2>Configuration</h2><details><summary>The run\'s configuration '
                    f"(YAML)</summary><pre>{_e(config_text)}</pre></details></section>")

    methods = []
    for name, res in results.items():
        cm = res.get("ci_method", {})
        if cm.get("n_boot"):
            unit = "cases" if cm.get("unit") == "case" else f"groups of '{cm.get('unit')}' (cluster bootstrap)"
            methods.append(f"{model_label(name)}: {_level(res)} {cm.get('method', 'bootstrap')} "
                           f"interval, {cm['n_boot']} resamples of {cm.get('n_units')} {unit}, seed {cm.get('seed')}.")
        else:
            methods.append(f"{model_label(name)}: no confidence intervals computed.")
    methods.append("Pooled metrics use all out-of-fold predictions together. Macro-F1 averages per-class F1 "
                   "over all classes; balanced accuracy is the mean per-class sensitivity; ROC-AUC is "
                   "one-vs-rest, macro-AUC its unweighted mean over classes. The best model is the one with the "
                   "highest pooled macro-F1.")
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
