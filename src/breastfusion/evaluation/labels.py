"""Human labels for the report: model names, metric keys, pipeline stages and durations.

The pipeline's identifiers (``image_only``, ``macro_f1``, ``audit_s``) name files and JSON keys; a reader of the
report sees "Image only", "Macro-F1", "Audit". Unknown snake_case keys are turned into words rather than shown raw;
any other string (a user's model or class name) is left as it is.
"""

from __future__ import annotations

import math
import re

MODEL_LABELS = {
    "fusion": "Fusion (image + tabular)",
    "image_only": "Image only",
    "tabular_only": "Tabular only",
    "logreg": "Logistic regression",
    "svm": "SVM",
    "rf": "Random forest",
    "lgbm": "LightGBM",
    "multiscale": "Multi-scale grader",
}

METRIC_LABELS = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "macro_f1": "Macro-F1",
    "weighted_f1": "Weighted-F1",
    "macro_auc": "Macro-AUC (one-vs-rest)",
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

STAGE_LABELS = {
    "audit": "Audit",
    "radiomics": "Radiomics features",
    "classical": "Classical models",
    "report_sections": "Report sections (calibration, explanations)",
    "total": "Total",
}

KEY_LABELS = {
    "timings (s)": "Time taken",
    "unreadable": "Unreadable images",
    "mask_issues": "Mask issues",
    "exact_duplicate_groups": "Exact-duplicate groups",
    "duplicate_groups": "Near-duplicate groups",
    "images_in_duplicate_groups": "Images in near-duplicate groups",
    "label_conflict_groups": "Duplicate groups with conflicting labels",
    "suspicious_groups": "Suspicious groups",
}

_SNAKE = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)+$")
_TIMING = re.compile(r"^(?P<key>\w+)_s$")


def model_label(name: str) -> str:
    """'image_only' -> 'Image only'; a name the toolkit did not choose is shown as given."""
    return MODEL_LABELS.get(str(name), str(name))


def metric_label(key: str) -> str:
    """'macro_f1' -> 'Macro-F1'; 'sensitivity[benign]' -> 'Sensitivity benign'."""
    key = str(key)
    if "[" in key and key.endswith("]"):
        base, cls = key[:-1].split("[", 1)
        return f"{METRIC_LABELS.get(base, humanize(base))} {cls}"
    return METRIC_LABELS.get(key, humanize(key))


def humanize(key: str) -> str:
    """A label for a summary key: known keys from the maps above, snake_case as words, anything else unchanged."""
    key = str(key)
    for table in (KEY_LABELS, METRIC_LABELS, MODEL_LABELS, STAGE_LABELS):
        if key in table:
            return table[key]
    if _TIMING.match(key):
        return timing_label(key)
    if _SNAKE.match(key):
        words = key.replace("_", " ")
        return words[0].upper() + words[1:]
    return key


def is_timing_key(key: str) -> bool:
    return bool(_TIMING.match(str(key)))


def timing_label(key: str) -> str:
    """'audit_s' -> 'Audit', 'image_only_s' -> 'Image only', 'final_fusion_s' -> 'Final bundle: Fusion ...'."""
    m = _TIMING.match(str(key))
    stem = m.group("key") if m else str(key)
    if stem.startswith("final_"):
        return f"Final bundle: {model_label(stem[len('final_'):])}"
    if stem in STAGE_LABELS:
        return STAGE_LABELS[stem]
    if stem in MODEL_LABELS:
        return f"{MODEL_LABELS[stem]} (cross-validation)"
    return humanize(stem)


def format_duration(seconds: float) -> str:
    """12.5 -> '12.5 s', 812 -> '13.5 min', 7300 -> '2.0 h'."""
    s = float(seconds)
    if not math.isfinite(s):
        return "n/a"
    if s < 90:
        return f"{s:.1f} s"
    if s < 90 * 60:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
