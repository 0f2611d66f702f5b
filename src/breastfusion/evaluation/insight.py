"""Report sections about the deployable bundle: calibration and deferral, and explanations of chosen cases.

Both are built after the final bundle is trained, from what the run already holds (out-of-fold predictions,
the cases and the bundle), and both are optional: when one fails the run keeps its report and bundle, the
failure is logged and the section says what went wrong.

* :func:`calibration_section` re-runs the bundle's calibration recipe *cross-fold* on the out-of-fold
  predictions (each fold's temperature and conformal threshold fitted on the other folds only), so the
  coverage, set sizes and ECE it shows are honest estimates; reliability diagrams before and after.
* :func:`select_explain_cases` picks the cases a reader wants to see: per class the most confident correct
  case, the most confident errors and the most uncertain cases, by the out-of-fold predictions.
* :func:`explanation_section` renders the explanations of those cases that the runner computed with the final
  bundle (:func:`breastfusion.explain.runner.explain_selection`: Grad-CAM, Grad-CAM++, occlusion, cross-scale
  attention for histology, SHAP, modality deltas); the report computes nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from breastfusion.data.cases import CASE_ID, LABEL
from breastfusion.errors import DataError
from breastfusion.utils import atomic_path

log = logging.getLogger(__name__)


@dataclass
class ReportSection:
    """One extra section of the HTML report: paragraphs, an optional table and figures (PNG path, caption)."""

    id: str
    title: str
    paragraphs: list[str] = field(default_factory=list)
    table: pd.DataFrame | None = None
    figures: list[tuple[Path, str]] = field(default_factory=list)
    first: bool = False  # shown before the summary (the cross-site figures of a multi-centre cohort)
    data: dict | None = None  # machine-readable content, when the run writes it out


def _fmt(v: float, digits: int = 3) -> str:
    return "—" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


# ------------------------------------------------------------------------------------------------ calibration

def calibration_section(predictions: dict[str, pd.DataFrame], classes: list[str], out_dir: str | Path, *,
                        method: str = "lac", alpha: float = 0.1, seed: int = 0,
                        class_conditional: bool | str = "auto") -> ReportSection:
    """Cross-fold temperature scaling and conformal sets for each model in ``predictions`` (out-of-fold tables
    with a ``fold`` column). Writes ``<out_dir>/<model>_calibrated.csv``, ``coverage.json`` and one reliability
    figure per model into ``out_dir``."""
    from breastfusion.evaluation.coverage import (
        calibrate_predictions,
        coverage_report,
        plot_reliability_before_after,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sec = ReportSection("calibration", "Calibration and deferral")
    sec.paragraphs.append(
        f"Temperature scaling, then split-conformal prediction sets ({method.upper()}) at a target coverage of "
        f"{100 * (1 - alpha):.0f}%; 'per class' means one threshold per class, so that every class is covered, "
        "not only the cases on average. Each fold is calibrated on the other folds' out-of-fold predictions only, so "
        "the coverage below is measured on cases whose labels the calibrator never saw. A case is referred to a "
        "human when its set holds more than one class. The bundle stores one temperature and one threshold "
        "fitted the same way on all out-of-fold predictions; coverage can never fall below top-1 accuracy, "
        "because every set holds the top class.")
    rows, reports = [], {}
    for name, preds in predictions.items():
        try:
            cal = calibrate_predictions(preds, classes, method=method, alpha=alpha, by_fold=True, seed=seed,
                                        class_conditional=class_conditional)
            rep = coverage_report(cal, classes)
        except (DataError, ValueError) as exc:
            log.warning("calibration section: %s left out: %s", name, exc)
            sec.paragraphs.append(f"{name}: not calibrated ({exc}).")
            continue
        with atomic_path(out_dir / f"{name}_calibrated.csv") as tmp:
            cal.to_csv(tmp, index=False)
        reports[name] = rep
        fold_cals = rep.get("calibrators", [])
        # folds whose temperature could not be fitted keep T = 1: their "after" is no calibration at all
        temps = [f["temperature"] for f in fold_cals if f.get("temperature_status", "calibrated") == "calibrated"]
        status = rep.get("calibration_status", "calibrated")
        not_fitted = len(fold_cals) - len(temps)
        temperature = f"{min(temps):.2f}–{max(temps):.2f}" if temps else "— (not fitted)"
        if temps and not_fitted:
            temperature += f" (not fitted in {not_fitted} of {len(fold_cals)} folds)"
        uncal = status == "not calibrated"
        for i, note in enumerate(rep.get("notes", [])):
            lead = ("not calibrated" if uncal and i == 0 else "partly calibrated" if status == "partly calibrated"
                    and i == 0 else "caveat")
            sec.paragraphs.append(f"{name}: {lead}: {note}.")
        rows.append({
            "model": name, "status": status + (f" (T kept at 1 in all {len(fold_cals)} folds)" if uncal else ""),
            "n": rep["n"], "thresholds": "per class" if rep.get("class_conditional") else "overall",
            "temperature": temperature,
            "ECE before": _fmt(rep["ece_before"]), "ECE after": "—" if uncal else _fmt(rep["ece_after"]),
            "NLL before": _fmt(rep["nll_before"]), "NLL after": "—" if uncal else _fmt(rep["nll_after"]),
            "target coverage": _fmt(1 - alpha, 2), "coverage": _fmt(rep["coverage"]),
            "top-1 accuracy": _fmt(rep["accuracy"]), "mean set size": _fmt(rep["mean_set_size"], 2),
            "refer rate": _fmt(rep["refer_rate"]), "accuracy of single-class sets": _fmt(rep["singleton_accuracy"]),
            **{f"coverage {c}": _fmt(v["coverage"]) for c, v in rep["per_class"].items()},
        })
        try:
            fig = plot_reliability_before_after(cal, classes, out_dir / f"{name}_reliability_before_after.png",
                                                title=f"{name}: reliability before / after temperature scaling")
            sec.figures.append((fig, f"{name}: reliability before and after temperature scaling (out-of-fold, "
                                     + ("NOT calibrated: no temperature could be fitted, both panels show the "
                                        "model's own probabilities)" if uncal else "cross-fold calibrated)")))
        except (DataError, ValueError) as exc:  # pragma: no cover - plotting a validated table
            log.warning("reliability figure for %s failed: %s", name, exc)
    if rows:
        sec.table = pd.DataFrame(rows)
        with atomic_path(out_dir / "coverage.json") as tmp:
            Path(tmp).write_text(json.dumps(reports, indent=2, default=float))
    return sec


# ---------------------------------------------------------------------------------------------- explanations

def select_explain_cases(preds: pd.DataFrame, classes: list[str], n: int) -> pd.DataFrame:
    """Pick up to ``n`` cases from out-of-fold predictions: per class the most confident correct case, then the
    most confident errors and the least certain cases, alternating, so that a small ``n`` still shows each kind.

    Returns columns ``case_id, label, predicted, probability, why`` (``probability`` of the predicted class)."""
    cols = [f"prob_{c}" for c in classes]
    if n <= 0 or len(preds) == 0:
        return pd.DataFrame(columns=[CASE_ID, LABEL, "predicted", "probability", "why"])
    missing = [c for c in [CASE_ID, LABEL, *cols] if c not in preds.columns]
    if missing:
        raise DataError(f"prediction table lacks column(s) {missing}")
    df = preds.drop_duplicates(CASE_ID).reset_index(drop=True)
    P = df[cols].to_numpy(dtype=float)
    ok = np.isfinite(P).all(axis=1)
    df, P = df[ok].reset_index(drop=True), P[ok]
    k = P.argmax(axis=1)
    pred = np.array(classes, dtype=object)[k]
    conf = P.max(axis=1)
    label = df[LABEL].astype(str).to_numpy()
    correct = pred == label
    per_class = []
    for c in classes:
        idx = np.flatnonzero(correct & (label == c))
        if len(idx):
            per_class.append((int(idx[np.argmax(conf[idx])]), f"most confident correct {c}"))
    wrong = np.flatnonzero(~correct)
    groups = [[(int(i), f"confident error: {label[i]} called {pred[i]}") for i in wrong[np.argsort(-conf[wrong])]],
              [(int(i), "least certain") for i in np.argsort(conf)]]
    picked: dict[int, str] = dict(per_class[:n])  # every class first, so each one gets a picture
    pos = [0] * len(groups)
    while len(picked) < min(n, len(df)) and any(pos[g] < len(groups[g]) for g in range(len(groups))):
        for g in range(len(groups)):
            while pos[g] < len(groups[g]) and groups[g][pos[g]][0] in picked:
                pos[g] += 1
            if pos[g] < len(groups[g]) and len(picked) < n:
                i, why = groups[g][pos[g]]
                picked[i] = why
                pos[g] += 1
    order = list(picked)
    return pd.DataFrame({CASE_ID: df.loc[order, CASE_ID].astype(str).to_numpy(), LABEL: label[order],
                         "predicted": pred[order], "probability": conf[order],
                         "why": [picked[i] for i in order]})


def _quoted(scored: pd.DataFrame, cid: str) -> tuple[str, str]:
    """(table cell, caption text) of a case's bundle prediction as ``predict`` returns it."""
    if cid not in scored.index:
        return "not scored", "bundle: not scored"
    r = scored.loc[cid]
    pred = str(r["predicted"])
    p = float(r[f"prob_{pred}"])
    calibrated = bool(r.get("calibrated", False)) if "calibrated" in scored.columns else False
    state = "calibrated" if calibrated else "uncalibrated"
    cell = f"{pred} {p:.2f}"
    cap = f"bundle {pred} p = {p:.2f} ({state}"
    if "prediction_set" in scored.columns and isinstance(r["prediction_set"], str):
        cell += f"; set {r['prediction_set']}" + ("; refer" if bool(r.get("refer", False)) else "")
        cap += f", set {r['prediction_set']}" + (", refer to a human" if bool(r.get("refer", False)) else "")
    return cell, cap + ")"


def explanation_section(explained, selection: pd.DataFrame, *, cases: pd.DataFrame | None = None) -> ReportSection:
    """Render the explanations of the ``selection`` (from :func:`select_explain_cases`) that the runner computed
    with the final bundle (:func:`breastfusion.explain.runner.explain_selection`); nothing is computed here.

    The bundle's prediction quoted in the table and captions is what ``predict`` returns for the case (the
    bundle's calibrated probability and prediction set, labelled calibrated or uncalibrated), so the report
    and ``predict`` never show two numbers for one case. ``cases``: the cases table of a histology run."""
    sec = ReportSection("explanations", "Explanations (final bundle)")
    if explained is None or selection is None or len(selection) == 0:
        sec.paragraphs.append("No case was selected for explanation.")
        return sec
    res, scored, out_dir = explained.result, explained.scored, explained.out_dir
    calibrated = bool(len(scored)) and "calibrated" in scored.columns and bool(scored["calibrated"].all())
    pred_col = f"bundle prediction ({'calibrated' if calibrated else 'uncalibrated'})"
    sec.paragraphs.append(
        "Cases chosen from the out-of-fold predictions: per class the most confident correct case, the most "
        "confident errors and the least certain cases. The maps come from the final bundle, which was trained on "
        "all cases, these included: they show what the deployed model attends to, while the out-of-fold "
        "prediction in each caption comes from a model that had not seen the case (its probability is the "
        "uncalibrated network output). The bundle's prediction is quoted as 'breastfusion predict' returns it: "
        + ("its calibrated probability and prediction set. " if calibrated else
           "the bundle holds no usable calibration, so its probability is the network's uncalibrated output. ")
        + "Grad-CAM and Grad-CAM++ "
        "highlight regions that raise the predicted class; occlusion shows how much hiding each patch lowers it"
        + ("; for histology, the cross-scale attention matrix and scale weights show how magnifications were "
           "combined" if cases is not None else "")
        + ". Modality deltas: the change in the predicted class's (uncalibrated) probability when a modality is "
          "replaced by a neutral input. SHAP values: the tabular features' share of the prediction.")
    table = res.table
    sel = selection.set_index(CASE_ID)
    rows = []
    for _, r in table.iterrows():
        cid = str(r[CASE_ID])
        s = sel.loc[cid] if cid in sel.index else None
        cell, quote = _quoted(scored, cid)
        row = {"case": cid, "why chosen": s["why"] if s is not None else "",
               "true": s[LABEL] if s is not None else r.get(LABEL, ""),
               "out-of-fold prediction": f"{s['predicted']} ({s['probability']:.2f})" if s is not None else "",
               pred_col: cell,
               "image Δ": _fmt(r.get("delta_image", np.nan)), "tabular Δ": _fmt(r.get("delta_tabular", np.nan))}
        if "top1_feature" in r and isinstance(r["top1_feature"], str) and r["top1_feature"]:
            row["top tabular feature (SHAP)"] = f"{r['top1_feature']} ({r['top1_shap']:+.3f})"
        rows.append(row)
        fig = r.get("figure")
        if isinstance(fig, str) and fig:
            cap = (f"{cid}: true {row['true']}, out-of-fold {row['out-of-fold prediction']}, {quote} "
                   f"\u2014 {row['why chosen']}")
            sec.figures.append((Path(out_dir) / fig, cap))
    sec.table = pd.DataFrame(rows) if rows else None
    if res.shap_summary is not None:
        sec.figures.append((res.shap_summary, f"Global tabular importance: mean |SHAP| over the {len(rows)} "
                                              "explained case(s)"))
    if len(res.skipped):
        sec.paragraphs.append("Not explained: " + "; ".join(f"{c} ({why})" for c, why in
                                                            res.skipped[[CASE_ID, "reason"]].itertuples(index=False)))
    return sec


def failed_section(id: str, title: str, exc: BaseException) -> ReportSection:
    log.warning("%s left out of the report: %s: %s", title, type(exc).__name__, exc)
    return ReportSection(id, title, [f"This section could not be built: {type(exc).__name__}: {exc}. The metrics "
                                     "and the bundle are unaffected."])
