"""A model card (``MODEL_CARD.md``) generated into every bundle from its metadata.

Sections follow Mitchell et al., "Model Cards for Model Reporting" (2019), cut to what a bundle knows: model
and inputs, training data and its audit, how it was validated (splits, metrics with confidence intervals),
calibration and prediction sets, intended use and limits, and versions. A bundle trained on any synthetic data
says so at the top, in capitals.
"""

from __future__ import annotations

from typing import Any

from breastfusion.models.registry import network_kind

CARD = "MODEL_CARD.md"

_HEADLINE = ("macro_f1", "weighted_f1", "balanced_accuracy", "macro_auc", "quadratic_weighted_kappa", "brier")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _metrics_table(cv: dict[str, Any]) -> list[str]:
    pooled, ci = cv.get("pooled", {}), cv.get("ci", {})
    rows = ["| metric | value | 95% CI |", "|---|---|---|"]
    for k in _HEADLINE:
        if k in pooled and pooled[k] is not None:
            c = ci.get(k)
            rows.append(f"| {k} | {_fmt(pooled[k])} | {_fmt(c[0]) + '–' + _fmt(c[1]) if c else '—'} |")
    m = cv.get("ci_method", {})
    if m.get("n_boot"):
        rows.append("")
        rows.append(f"Percentile bootstrap, {m['n_boot']} resamples of {m.get('n_units')} "
                    f"{'cases' if m.get('unit') == 'case' else 'groups of ' + str(m.get('unit'))}; pooled "
                    "out-of-fold predictions of cross-validation.")
    return rows


def model_card(meta: dict[str, Any]) -> str:
    training, classes = meta.get("training", {}), meta.get("classes", [])
    lines = []
    if meta.get("synthetic_data"):
        lines += ["> **SYNTHETIC DATA.** This model was trained on generated data. It demonstrates the software "
                  "only and must not be used on patients.", ""]
    lines += [f"# Model card: {meta.get('name', 'breastfusion bundle')}", "",
              f"Created {meta.get('created', '?')} by breastfusion {meta.get('versions', {}).get('breastfusion', '?')}.",
              "", "## Model", ""]
    lines += network_kind(meta).describe(meta)
    lines += [f"- Classes: {', '.join(map(str, classes))}.",
              f"- Weights initialised from: {training.get('weights_init', 'unknown')}.", "",
              "## Training data", "",
              f"- Cases: {training.get('n_cases', '?')}; per class: {training.get('class_counts', {})}."]
    data = meta.get("data") or {}
    audit = data.get("audit") or {}
    if audit:
        keep = {k: v for k, v in audit.items() if not isinstance(v, (dict, list))}
        lines.append(f"- Data audit: {keep}.")
    if data.get("splits"):
        lines.append(f"- Validation splits: {data['splits']}.")
    feats = meta.get("features") or {}
    info = feats.get("column_info") if isinstance(feats.get("column_info"), dict) else {}
    if feats.get("clinical_columns"):  # display names and units as the trainer declared them (data.column_info)
        from breastfusion.features.column_labels import humanise

        shown = []
        for c in feats["clinical_columns"]:
            e = info.get(c) if isinstance(info.get(c), dict) else {}
            unit = f", {e['unit']}" if e.get("unit") else ""
            shown.append(f"{e.get('label') or humanise(c)} (`{c}`{unit})")
        lines.append(f"- Clinical inputs: {'; '.join(shown)}.")
    if feats.get("radiomics"):
        lines.append("- Lesion radiomics come from the masks given with each image: they carry the annotator's "
                     "reading of the lesion outline.")
    cv = (meta.get("metrics") or {}).get("cross_validation")
    lines += ["", "## Performance (cross-validation of the same recipe)", ""]
    lines += _metrics_table(cv) if cv else ["No cross-validation metrics were stored with this bundle."]
    cal = meta.get("calibration")
    lines += ["", "## Calibration and deferral", ""]
    if cal:
        t = cal["temperature"].get("temperature")
        c = cal["conformal"]
        if (cal.get("status") or cal["temperature"].get("status") or "calibrated") != "calibrated":
            # the temperature fit was refused (no finite optimum): the probabilities are the network's own
            why = cal.get("reason") or cal["temperature"].get("reason") or "no finite optimum"
            lines.append(f"- **Not calibrated.** Temperature scaling was not applied (T kept at 1): {why}. "
                         "The probabilities are the network's softmax, not calibrated probabilities.")
        else:
            lines.append(f"- Temperature scaling, T = {_fmt(float(t))} (fitted on {cal.get('fitted_on')}).")
        lines += [f"- Split-conformal prediction sets ({c.get('method')}"
                  + (", one threshold per class" if c.get("class_conditional") else "")
                  + f"), target coverage {_fmt(cal.get('target_coverage'))}; mean set size "
                  f"{_fmt(cal.get('mean_set_size'))} on the calibration predictions. Predictions whose set holds "
                  "more than one class are flagged `refer`: a person should decide.",
                  ("- Coverage holds for each class, for cases exchangeable with the training cohort; it is not "
                   "guaranteed per centre, or under a change of scanner or population." if c.get("class_conditional")
                   else "- Coverage holds on average over cases exchangeable with the training cohort; it is not "
                   "guaranteed per class (too few cases of some class for per-class thresholds), per centre, or under a change "
                   "of scanner or population.")]
        lines += [f"- Caveat: {w}." for w in cal.get("warnings", [])
                  if not str(w).startswith("probabilities are not calibrated")]  # that one is said above
    else:
        lines.append("- Not calibrated: probabilities are the network's softmax; no prediction sets.")
    lines += ["", "## Intended use and limits", "",
              "- Research use: to study and compare models on a cohort like the training one. It is not a "
              "medical device and has not been validated prospectively.",
              "- Expect lower performance on other centres, scanners, stains or populations; validate locally "
              "(leave-one-centre-out where possible) before drawing conclusions.",
              "- Inputs outside the training distribution (other modalities, other magnifications, unseen "
              "categories) are rejected or flagged where detectable, not everywhere.", "",
              "## Versions", "", f"- {meta.get('versions', {})}", ""]
    return "\n".join(lines)
