"""Figures per acquiring centre, first in the report when a cohort has several (issue #11, item 5).

With ``cv.strategy: leave_one_center_out`` every case is scored by a model trained on the *other* centres only:
the figures per centre are external, cross-site figures, and the model the report recommends is the one with
the best mean AUC over held-out centres (its worst centre shown beside it), not the one that wins a same-site
cross-validation. With another strategy the same table is shown per centre but labelled what it is: every
centre was also in training, so the figures are not cross-site.
"""

from __future__ import annotations

import math

import pandas as pd

from breastfusion.data.cases import CASE_ID, CENTER, LABEL

SITES_ID = "across-sites"


def per_site_metrics(results: dict[str, dict], cases: pd.DataFrame, classes: list[str], *, n_boot: int = 500,
                     seed: int = 0, group_col: str | None = "dup_group") -> pd.DataFrame:
    """One row per (model, centre): n, AUC (macro one-vs-rest) and macro-F1 with bootstrap CIs."""
    from breastfusion.evaluation.metrics import evaluate

    centre_of = cases.set_index(CASE_ID)[CENTER].astype(str)
    rows = []
    for name, res in results.items():
        preds = res["predictions"]
        centre = preds[CASE_ID].astype(str).map(centre_of)
        for c in sorted(centre.dropna().unique()):
            sub = preds[centre == c]
            if sub["label"].nunique() < 2 if "label" in sub else True:
                rows.append({"model": name, "centre": c, "n": len(sub), "auc": math.nan, "auc_ci": [math.nan] * 2,
                             "macro_f1": math.nan, "macro_f1_ci": [math.nan] * 2})
                continue
            gc = group_col if group_col and group_col in sub.columns else None
            m = evaluate(sub, classes, n_boot=n_boot, seed=seed, group_col=gc)
            rows.append({"model": name, "centre": c, "n": int(len(sub)),
                         "auc": m["pooled"]["macro_auc"], "auc_ci": m["ci"].get("macro_auc", [math.nan] * 2),
                         "macro_f1": m["pooled"]["macro_f1"],
                         "macro_f1_ci": m["ci"].get("macro_f1", [math.nan] * 2)})
    return pd.DataFrame(rows)


def choose_on_held_out_sites(table: pd.DataFrame) -> tuple[str | None, dict]:
    """The model with the best mean AUC over centres (ties: the better worst centre); with the per-model means."""
    ok = table.dropna(subset=["auc"])
    if ok.empty:
        return None, {}
    agg = ok.groupby("model")["auc"].agg(["mean", "min"])
    best = agg.sort_values(["mean", "min"], ascending=False).index[0]
    return str(best), {m: {"mean_auc": float(r["mean"]), "worst_auc": float(r["min"])} for m, r in agg.iterrows()}


def _fmt(v, ci) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    if ci and all(isinstance(x, (int, float)) and math.isfinite(x) for x in ci):
        return f"{v:.3f} ({ci[0]:.3f}–{ci[1]:.3f})"
    return f"{v:.3f}"


def cross_site_section(results: dict[str, dict], cases: pd.DataFrame, classes: list[str], *, strategy: str,
                       n_boot: int = 500, seed: int = 0, expert_mask: dict[str, bool] | None = None):
    """The report section (or None for a single-centre cohort); see the module doc."""
    from breastfusion.evaluation.insight import ReportSection
    from breastfusion.evaluation.labels import model_label

    if CENTER not in cases.columns or cases[CENTER].nunique() < 2 or not results:
        return None
    table = per_site_metrics(results, cases, classes, n_boot=n_boot, seed=seed)
    centres = sorted(table["centre"].unique())
    loco = strategy == "leave_one_center_out"
    best, means = choose_on_held_out_sites(table)
    rows = []
    for name in results:
        t = table[table["model"] == name].set_index("centre")
        row = {"Model": model_label(name) + (" (uses the expert's mask)" if (expert_mask or {}).get(name) else "")}
        for c in centres:
            r = t.loc[c] if c in t.index else None
            row[f"{c}: AUC (95% CI)"] = _fmt(r["auc"], r["auc_ci"]) if r is not None else "—"
            row[f"{c}: macro-F1"] = _fmt(r["macro_f1"], None) if r is not None else "—"
            row[f"{c}: n"] = int(r["n"]) if r is not None else 0
        m = means.get(name)
        row["mean AUC over centres"] = f"{m['mean_auc']:.3f}" if m else "—"
        row["worst centre AUC"] = f"{m['worst_auc']:.3f}" if m else "—"
        rows.append(row)
    paras = []
    if loco:
        paras.append("Leave one centre out: each centre's cases were scored by a model trained on the OTHER "
                     "centre(s) only. These are cross-site (external) figures: what a hospital that receives the "
                     "model should expect, scanners and population included.")
        if best:
            paras.append(f"Model chosen on the held-out sites: {model_label(best)} (mean AUC over held-out centres "
                         f"{means[best]['mean_auc']:.3f}, worst centre {means[best]['worst_auc']:.3f}).")
    else:
        paras.append(f"These figures are split by centre, but the folds ({strategy}) mixed the centres: every "
                     "centre was also in training, so they are NOT cross-site figures. Set cv.strategy: "
                     "leave_one_center_out to judge the models on a hospital they never saw.")
    if expert_mask and any(expert_mask.get(n) for n in results):
        paras.append("Rows marked 'uses the expert's mask' needed the radiologist's lesion outline at prediction.")
    return ReportSection(SITES_ID, "Across sites" + (" (leave one centre out)" if loco else " (per centre)"),
                         paras, pd.DataFrame(rows), first=True,
                         data={"per_site": table.to_dict(orient="records"), "chosen": best, "means": means,
                               "loco": loco})


def per_center_table(results: dict, cases: pd.DataFrame, classes: list[str], ordinal: bool) -> pd.DataFrame:
    """Point metrics of every model on each centre's cases (the external-validation view under LOCO; used by
    the histology task's per-centre table)."""
    from breastfusion.evaluation.metrics import compute_metrics

    center_of = cases.set_index(CASE_ID)[CENTER]
    rows = []
    for name, r in results.items():
        p = r["predictions"]
        for c in sorted(center_of.unique()):
            sub = p[p[CASE_ID].map(center_of) == c]
            if len(sub) == 0:
                continue
            m = compute_metrics(sub, classes, ordinal=ordinal)
            # a centre often holds one class only: accuracy stays meaningful there, macro-F1 and AUC do not
            row = {"model": name, "centre": c, "n": len(sub), "classes_present": int(sub[LABEL].nunique()),
                   "accuracy": m.get("accuracy"), "macro_f1": m.get("macro_f1"),
                   "balanced_accuracy": m.get("balanced_accuracy"), "macro_auc": m.get("macro_auc")}
            if ordinal:
                row["qwk"] = m.get("quadratic_weighted_kappa")
            rows.append(row)
    df = pd.DataFrame(rows)
    for col in df.columns:
        if df[col].dtype == float:
            df[col] = df[col].round(3)
    return df
