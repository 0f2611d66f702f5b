"""Evaluation figures (PNG): confusion matrix, ROC curves, model comparison, reliability diagram.

Figures are drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas, never through
``pyplot``: no global state, no GUI backend, safe in worker threads. Every function writes its file
atomically and returns the path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from breastfusion.data.cases import CASE_ID, LABEL
from breastfusion.evaluation.metrics import (
    _prepare,
    _weighted_auc,
    format_ci,
    metric_value,
)
from breastfusion.utils import atomic_path

DPI = 130
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def _new_figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return path


def _short(s: str, n: int = 28) -> str:
    """Shorten a label and protect '$' from matplotlib's mathtext."""
    s = str(s)
    s = s if len(s) <= n else s[: n - 1] + "\u2026"
    return s.replace("$", r"\$")


def _wrap(s: str, width: int = 16, lines: int = 2) -> str:
    """Wrap a class name onto at most ``lines`` lines for tick labels."""
    import textwrap

    parts = textwrap.wrap(str(s), width=width, break_long_words=True) or [""]
    if len(parts) > lines:
        parts = parts[:lines]
        parts[-1] = parts[-1][: width - 1] + "\u2026"
    return "\n".join(parts).replace("$", r"\$")


def plot_confusion_matrix(
    predictions: pd.DataFrame,
    classes: list[str] | None,
    path: str | Path,
    normalize: bool = True,
    title: str | None = "Confusion matrix",
) -> Path:
    """Confusion matrix (rows = true class, columns = predicted), each cell annotated with its count and row %.

    ``normalize=True`` colours cells by row percentage (sensitivity on the diagonal), otherwise by count.
    A class absent from the true labels gets a row of zeros and '–' instead of percentages.
    """
    prep = _prepare(predictions, classes)
    K = prep.K
    cm = np.zeros((K, K), dtype=int)
    np.add.at(cm, (prep.y, prep.pred), 1)
    rows = cm.sum(axis=1, keepdims=True)
    pct = np.divide(cm, rows, out=np.zeros((K, K)), where=rows > 0) * 100
    value = pct if normalize else cm.astype(float)
    vmax = 100.0 if normalize else max(float(cm.max()), 1.0)

    size = max(3.8, 1.1 * K + 2.2)
    fig = _new_figure(size + 0.8, size)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(value, cmap="Blues", vmin=0, vmax=vmax, interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("% of true class (row)" if normalize else "count")
    for i in range(K):
        for j in range(K):
            dark = value[i, j] > 0.55 * vmax
            txt = f"{cm[i, j]}\n{pct[i, j]:.1f}%" if rows[i, 0] else f"{cm[i, j]}\n\u2013"
            ax.text(j, i, txt, ha="center", va="center",
                    fontsize=10 if K <= 5 else 8, color="white" if dark else "#1a1a1a",
                    fontweight="bold" if i == j else "normal")
    labels = [_wrap(c) for c in prep.classes]
    long = max(len(x) for lab in labels for x in lab.split("\n")) > 9
    ax.set_xticks(range(K), labels=labels, rotation=30 if long else 0, ha="right" if long else "center")
    ax.set_yticks(range(K), labels=[f"{lab}\n(n={rows[i, 0]})" for i, lab in enumerate(labels)])
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_xticks(np.arange(K + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(K + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    ax.tick_params(which="minor", length=0)
    acc = np.trace(cm) / max(cm.sum(), 1)
    if title:
        ax.set_title(f"{_short(title, 60)}\n(n={cm.sum()}, accuracy {acc:.3f})", fontsize=11)
    return _save(fig, path)


def _roc_points(score: np.ndarray, pos: np.ndarray):
    order = np.argsort(-score, kind="mergesort")
    s, p = score[order], pos[order]
    tps = np.cumsum(p)
    fps = np.cumsum(~p)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # end of each tie block
    tpr = np.r_[0.0, tps[last] / max(p.sum(), 1)]
    fpr = np.r_[0.0, fps[last] / max((~p).sum(), 1)]
    return fpr, tpr


def plot_roc_curves(
    predictions: pd.DataFrame,
    classes: list[str] | None,
    path: str | Path,
    title: str | None = "ROC curves (one-vs-rest)",
) -> Path:
    """One-vs-rest ROC curve per class (AUC in the legend) and their macro average."""
    prep = _prepare(predictions, classes)
    fig = _new_figure(5.6, 5.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="#999999", label="chance (AUC 0.500)")
    grid = np.linspace(0, 1, 201)
    tprs, aucs = [], []
    ones = np.ones((1, prep.n))
    for k, c in enumerate(prep.classes):
        pos = prep.y == k
        color = _COLORS[k % len(_COLORS)]
        if pos.all() or not pos.any():
            ax.plot([], [], color=color, label=f"{_short(c, 20)} (AUC n/a: class {'absent' if not pos.any() else 'only'})")
            continue
        fpr, tpr = _roc_points(prep.P[:, k], pos)
        auc = float(_weighted_auc(ones, prep.P[:, k], pos)[0])
        aucs.append(auc)
        tprs.append(np.interp(grid, fpr, tpr))
        ax.plot(fpr, tpr, lw=1.8, color=color, label=f"{_short(c, 20)} (AUC {auc:.3f}, n={int(pos.sum())})")
    if len(tprs) > 1:
        mean = np.mean(tprs, axis=0)
        mean[0] = 0.0
        ax.plot(grid, mean, lw=2.4, color="black", label=f"macro average (AUC {np.mean(aucs):.3f})")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (1 \u2212 specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8.5, framealpha=0.9)
    if title:
        ax.set_title(_short(title, 60), fontsize=11)
    return _save(fig, path)


def plot_model_comparison(
    results: dict[str, dict],
    path: str | Path,
    metric: str = "macro_f1",
    title: str | None = None,
) -> Path:
    """Horizontal bars of one pooled metric per model (default macro-F1) with bootstrap CI error bars.

    ``results`` maps model name -> :func:`breastfusion.evaluation.metrics.evaluate` output.
    """
    if not results:
        raise ValueError("plot_model_comparison needs at least one model result.")
    names = list(results)
    vals = np.array([metric_value(results[m], metric) for m in names])
    lo = np.array([results[m].get("ci", {}).get(metric, (np.nan, np.nan))[0] for m in names], dtype=float)
    hi = np.array([results[m].get("ci", {}).get(metric, (np.nan, np.nan))[1] for m in names], dtype=float)
    has_ci = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(vals)
    err = np.vstack([np.where(has_ci, vals - lo, 0), np.where(has_ci, hi - vals, 0)])
    err = np.clip(np.nan_to_num(err), 0, None)

    fig = _new_figure(7.4, 0.55 * len(names) + 1.6)
    ax = fig.add_subplot(1, 1, 1)
    ypos = np.arange(len(names))[::-1]
    ax.barh(ypos, np.nan_to_num(vals), color=[_COLORS[i % len(_COLORS)] for i in range(len(names))],
            alpha=0.85, height=0.6, xerr=err, error_kw={"ecolor": "#222222", "capsize": 4, "lw": 1.2})
    for y, v, ok, lo_, h in zip(ypos, vals, has_ci, lo, hi):
        if np.isfinite(v):
            x = (h if ok else v) + 0.012
            ax.text(x, y, format_ci(v, (lo_, h) if ok else None), va="center", ha="left", fontsize=8.5)
    ax.set_yticks(ypos, labels=[_short(m, 32) for m in names])
    ax.set_xlim(0, 1.35)
    ax.set_xticks(np.linspace(0, 1, 6))
    label = metric.replace("_", " ").replace("macro f1", "macro-F1").replace("macro auc", "macro-AUC")
    level = next(iter(results.values())).get("ci_method", {}).get("level", 0.95)
    ax.set_xlabel(f"{label} (error bars: {100 * level:.0f}% bootstrap CI)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.spines["bottom"].set_bounds(0, 1)
    ax.set_title(title or f"Model comparison: {label}", fontsize=11)
    return _save(fig, path)


def plot_reliability_diagram(
    predictions: pd.DataFrame,
    classes: list[str] | None,
    path: str | Path,
    n_bins: int = 10,
    title: str | None = "Reliability diagram",
) -> Path:
    """Calibration: observed frequency vs predicted probability, per class (one-vs-rest) and top-label,
    with a histogram of the top-label confidence below."""
    prep = _prepare(predictions, classes)
    edges = np.linspace(0, 1, n_bins + 1)

    def curve(p, hit):
        b = np.minimum((p * n_bins).astype(int), n_bins - 1)
        cnt = np.bincount(b, minlength=n_bins)
        ok = cnt > 0
        mp = np.bincount(b, weights=p, minlength=n_bins)[ok] / cnt[ok]
        fr = np.bincount(b, weights=hit.astype(float), minlength=n_bins)[ok] / cnt[ok]
        return mp, fr, cnt

    fig = _new_figure(5.6, 6.6)
    gs = fig.add_gridspec(2, 1, height_ratios=[3.2, 1], hspace=0.08)
    ax = fig.add_subplot(gs[0])
    axh = fig.add_subplot(gs[1], sharex=ax)
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="#999999", label="perfect calibration")
    for k, c in enumerate(prep.classes):
        mp, fr, _ = curve(prep.P[:, k], prep.y == k)
        ax.plot(mp, fr, marker="o", ms=4, lw=1.4, color=_COLORS[k % len(_COLORS)], alpha=0.85,
                label=f"{_short(c, 20)} (one-vs-rest)")
    conf = prep.P.max(axis=1)
    correct = prep.P.argmax(axis=1) == prep.y
    mp, fr, cnt = curve(conf, correct)
    ece = float(np.sum(np.abs(mp - fr) * cnt[cnt > 0]) / prep.n)
    ax.plot(mp, fr, marker="s", ms=5, lw=2.2, color="black", label=f"top-label (ECE {ece:.3f})")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Observed frequency")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8.5, framealpha=0.9)
    ax.tick_params(labelbottom=False)
    if title:
        ax.set_title(_short(title, 60), fontsize=11)
    axh.hist(conf, bins=edges, color="#555555", alpha=0.8)
    axh.set_xlim(-0.02, 1.02)
    axh.set_xlabel("Predicted probability")
    axh.set_ylabel("cases\n(top-label)")
    axh.grid(alpha=0.3)
    return _save(fig, path)


def attention_figure(stack_csv: Path, cases: pd.DataFrame, out: Path, title: str) -> Path | None:
    """Heat map of the mean cross-scale attention and bar chart of mean scale weights per class."""
    if not stack_csv.exists():
        return None
    sp = pd.read_csv(stack_csv, dtype={CASE_ID: str})
    mags = [c.removeprefix("scale_weight_") for c in sp.columns if c.startswith("scale_weight_")]
    if not mags:
        return None
    label = sp[CASE_ID].map(cases.set_index(CASE_ID)[LABEL])
    fig = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    M = np.array([[sp[f"attn_{a}_to_{b}"].mean() for b in mags] for a in mags])
    im = axes[0].imshow(M, cmap="viridis", vmin=0)
    axes[0].set_xticks(range(len(mags)), mags)
    axes[0].set_yticks(range(len(mags)), mags)
    axes[0].set_xlabel("attended scale (keys)")
    axes[0].set_ylabel("querying scale")
    axes[0].set_title("mean cross-scale attention")
    for i in range(len(mags)):
        for j in range(len(mags)):
            axes[0].text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    classes = sorted(label.dropna().unique())
    width = 0.8 / max(1, len(classes))
    for k, c in enumerate(classes):
        vals = [sp.loc[label == c, f"scale_weight_{m}"].mean() for m in mags]
        axes[1].bar(np.arange(len(mags)) + k * width, vals, width, label=str(c))
    axes[1].set_xticks(np.arange(len(mags)) + width * (len(classes) - 1) / 2, mags)
    axes[1].set_ylabel("mean scale weight")
    axes[1].set_title("scale pooling weights by true class")
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return out
