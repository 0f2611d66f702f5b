"""External validation: judge a trained bundle on a labelled cohort from another site, without retraining.

``breastfusion validate BUNDLE COHORT --out DIR`` scores every case with the bundle (skips logged and listed, as
``predict`` does) and writes ``DIR/report.html`` (self-contained), ``DIR/metrics.json``, ``DIR/predictions.csv``
(per case: probabilities, prediction set, out-of-distribution score) and ``DIR/figures/``:

* metrics with 95 % bootstrap intervals over patients, ROC, confusion matrix, beside the bundle's own CV figures;
* a label mapping when the cohort has fewer classes than the bundle: probabilities restricted to the cohort's
  classes and renormalised (a 3-class BUSI bundle on benign vs malignant: P(m | lesion) = P(m) / (P(b) + P(m)));
* calibration on the new site: reliability diagram, calibration slope and intercept with intervals, ECE;
* conformal coverage of the bundle's prediction sets on the new site, overall and per class;
* metrics per subgroup of any declared column (numeric columns cut into tertiles);
* input shift against what the bundle recorded about its training data (:mod:`breastfusion.data.fingerprint`);
* optionally (``adapt_fraction``) temperature and conformal thresholds re-fitted on a patient-grouped part of the
  cohort, judged on the rest, and written as a site-adapted copy of the bundle.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from breastfusion.data.cases import CASE_ID, IMAGE_PATH, LABEL, MASK_PATH, PATIENT_ID
from breastfusion.data.predictions import prediction_table
from breastfusion.errors import BundleError, ConfigError, DataError
from breastfusion.evaluation.metrics import _resample_weights, evaluate, to_jsonable
from breastfusion.utils import atomic_path, write_json

log = logging.getLogger(__name__)

#: Subgroups smaller than this are flagged: their figures move with a few cases.
SMALL_SUBGROUP = 20
#: Numeric subgroup columns are cut into this many quantile bands.
N_BANDS = 3
_EPS = 1e-6


@dataclass
class ValidationResult:
    out_dir: Path
    report: Path
    metrics_json: Path
    predictions: Path
    n_scored: int
    n_skipped: int
    summary: dict[str, Any]
    skipped: Path | None = None
    adapted_bundle: Path | None = None
    findings: list[str] = field(default_factory=list)


# -- inputs ---------------------------------------------------------------------------------------------------

def parse_mapping(text: str | None) -> dict[str, str]:
    """``"cohort_label=bundle_label,..."`` as a dict (cohort label -> bundle class)."""
    out: dict[str, str] = {}
    for part in [p.strip() for p in (text or "").split(",") if p.strip()]:
        if part.count("=") != 1 or not all(s.strip() for s in part.split("=")):
            raise ConfigError(f"--map: '{part}' is not cohort_label=bundle_label (e.g. --map cancer=malignant).")
        a, b = (s.strip() for s in part.split("="))
        out[a] = b
    return out


def load_cohort(source: str | Path, drop_labels: list[str] | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """A labelled cases table from a cases-table file or an importable folder; cases whose label is in
    ``drop_labels`` are set aside (counted per label, and reported)."""
    from breastfusion.data.importers import import_cases

    path = Path(source)
    if not path.exists():
        raise DataError(f"Cohort not found: '{path}'.")
    cases = import_cases(path)
    if LABEL not in cases.columns or cases[LABEL].isna().any():
        raise DataError(f"Cohort '{path}' needs a label for every case (column '{LABEL}') to be validated on.")
    cases = cases.copy()
    cases[LABEL] = cases[LABEL].astype(str).str.strip()
    dropped: dict[str, int] = {}
    for lab in drop_labels or []:
        m = cases[LABEL].str.lower() == lab.strip().lower()
        if m.any():
            dropped[lab] = int(m.sum())
            cases = cases[~m]
    if not len(cases):
        raise DataError(f"Cohort '{path}': no case left after setting aside labels {drop_labels}.")
    if PATIENT_ID not in cases.columns:
        cases[PATIENT_ID] = cases[CASE_ID]
    return cases.reset_index(drop=True), dropped


def map_labels(labels: pd.Series, bundle_classes: list[str], mapping: dict[str, str] | None = None, *,
               source: str = "cohort") -> tuple[pd.Series, list[str]]:
    """Cohort labels in the bundle's class names (``mapping`` renames; case-insensitive match otherwise) and the
    cohort's classes in bundle order. A cohort class the bundle lacks is refused: the bundle cannot score it."""
    mapping = dict(mapping or {})
    bad = {k: v for k, v in mapping.items() if v not in bundle_classes}
    if bad:
        k, v = next(iter(bad.items()))
        raise ConfigError(f"--map {k}={v}: '{v}' is not a class of the bundle ({bundle_classes}).")
    lower = {c.lower(): c for c in bundle_classes}
    out = labels.astype(str).map(lambda v: mapping.get(v, lower.get(v.strip().lower(), v)))
    unknown = sorted(set(out) - set(bundle_classes))
    if unknown:
        counts = {u: int((out == u).sum()) for u in unknown}
        raise DataError(f"{source}: label(s) {counts} are not classes of the bundle ({bundle_classes}); the bundle "
                        "cannot score a class it never learned. Rename with --map cohort_label=bundle_label, or set "
                        "those cases aside with --drop-labels.")
    present = [c for c in bundle_classes if (out == c).any()]
    if len(present) < 2:
        raise DataError(f"{source}: every case is labelled {present}; validation needs at least two classes.")
    return out, present


def restrict_probabilities(P: np.ndarray, bundle_classes: list[str], keep: list[str]) -> np.ndarray:
    """Probabilities over ``keep`` only, renormalised: P(c | one of keep) = P(c) / sum over keep."""
    idx = [bundle_classes.index(c) for c in keep]
    Q = np.asarray(P, dtype=float)[:, idx]
    s = Q.sum(axis=1, keepdims=True)
    return np.where(s > 0, Q / np.where(s > 0, s, 1.0), 1.0 / len(keep))


# -- calibration on the new site ----------------------------------------------------------------------------

def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def logistic_recalibration(p: np.ndarray, y: np.ndarray, W: np.ndarray | None = None,
                           iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Calibration slope and intercept of probabilities ``p`` for binary outcomes ``y``, for each row of case
    weights ``W`` (B, n) at once (one row of ones: the point estimate; bootstrap counts: the resamples).

    slope: ``b`` of ``logit P(y=1) = a + b logit(p)`` (1 = ideal; < 1 over-confident, > 1 under-confident).
    intercept: calibration-in-the-large, ``a`` of ``logit P(y=1) = a + logit(p)`` with the slope fixed at 1
    (0 = ideal; < 0 the probabilities are too high on average). NaN where the fit has no finite optimum (one
    class only, or perfect separation)."""
    x = _logit(p)
    y = np.asarray(y, dtype=float)
    W = np.ones((1, len(x))) if W is None else np.asarray(W, dtype=float)
    B = W.shape[0]
    a, b = np.zeros(B), np.ones(B)
    ok = np.ones(B, dtype=bool)
    for _ in range(iters):  # Newton-Raphson on (a, b)
        mu = 1.0 / (1.0 + np.exp(-(a[:, None] + b[:, None] * x)))
        r = W * (y - mu)
        ga, gb = r.sum(1), (r * x).sum(1)
        w = W * mu * (1 - mu)
        haa, hab, hbb = w.sum(1), (w * x).sum(1), (w * x * x).sum(1)
        det = haa * hbb - hab ** 2
        good = det > 1e-10
        da = np.where(good, (hbb * ga - hab * gb) / np.where(good, det, 1), 0.0)
        db = np.where(good, (haa * gb - hab * ga) / np.where(good, det, 1), 0.0)
        ok &= good
        a, b = a + np.clip(da, -5, 5), b + np.clip(db, -5, 5)
        if np.nanmax(np.abs(np.r_[da, db])) < 1e-9:
            break
    c = np.zeros(B)
    for _ in range(iters):  # intercept with the slope fixed at 1 (logit(p) as offset)
        mu = 1.0 / (1.0 + np.exp(-(c[:, None] + x)))
        h = (W * mu * (1 - mu)).sum(1)
        step = np.where(h > 1e-10, (W * (y - mu)).sum(1) / np.where(h > 1e-10, h, 1), 0.0)
        c = c + np.clip(step, -5, 5)
        if np.abs(step).max() < 1e-9:
            break
    both = ((W * y).sum(1) > 0) & ((W * (1 - y)).sum(1) > 0)
    slope = np.where(ok & both & (np.abs(b) < 50), b, np.nan)
    intercept = np.where(both & (np.abs(c) < 50), c, np.nan)
    return slope, intercept


def _ci(samples: np.ndarray) -> list[float | None]:
    s = samples[np.isfinite(samples)]
    if not len(s):
        return [None, None]
    lo, hi = np.percentile(s, [2.5, 97.5])
    return [float(lo), float(hi)]


def _weights(n: int, groups: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    codes, uniq = pd.factorize(pd.Series(groups).astype(str), sort=True)
    return _resample_weights(np.random.default_rng(seed), n_boot, n, codes.astype(np.int64), len(uniq))


def calibration_summary(P: np.ndarray, y: np.ndarray, classes: list[str], groups: np.ndarray, *,
                        positive: str | None, n_boot: int, seed: int) -> dict[str, Any]:
    """Slope and intercept with patient-bootstrap intervals: of P(positive) for two classes, else per class
    one-vs-rest. ``y`` holds class codes into ``classes``."""
    targets = [positive] if len(classes) == 2 and positive else list(classes)
    W = _weights(len(y), groups, n_boot, seed) if n_boot else None
    out: dict[str, Any] = {"per_class": {}, "method": "logistic recalibration of logit P(class) on the outcome; "
                           "intercept with the slope fixed at 1 (calibration-in-the-large)",
                           "ci": f"95% percentile bootstrap over patients, {n_boot} resamples" if n_boot else None}
    for c in targets:
        k = classes.index(c)
        yy = (y == k).astype(float)
        s, i = logistic_recalibration(P[:, k], yy)
        entry = {"slope": float(s[0]), "intercept": float(i[0]), "mean_predicted": float(P[:, k].mean()),
                 "observed_rate": float(yy.mean())}
        if W is not None:
            sb, ib = logistic_recalibration(P[:, k], yy, W)
            entry["slope_ci"], entry["intercept_ci"] = _ci(sb), _ci(ib)
        out["per_class"][c] = entry
    return out


def conformal_coverage(sets: np.ndarray, y: np.ndarray, classes: list[str], groups: np.ndarray, *,
                       target: float, n_boot: int, seed: int) -> dict[str, Any]:
    """Coverage of prediction sets (boolean (n, K) over the bundle's classes) for true class codes ``y``:
    overall (with a patient-bootstrap interval), per class, mean set size and refer rate."""
    idx = np.arange(len(y))
    hit = sets[idx, y].astype(float)
    size = sets.sum(1)
    out: dict[str, Any] = {"target_coverage": float(target), "n": len(y), "coverage": float(hit.mean()),
                           "mean_set_size": float(size.mean()), "refer_rate": float((size > 1).mean()),
                           "per_class": {}}
    if n_boot:
        W = _weights(len(y), groups, n_boot, seed)
        out["coverage_ci"] = _ci((W * hit).sum(1) / np.maximum(W.sum(1), 1))
    for k, c in enumerate(classes):
        m = y == k
        if m.any():
            out["per_class"][c] = {"n": int(m.sum()), "coverage": float(hit[m].mean()),
                                   "mean_set_size": float(size[m].mean())}
    return out


# -- subgroups ------------------------------------------------------------------------------------------------

def subgroup_bands(values: pd.Series, column: str) -> tuple[pd.Series, str]:
    """Group labels for one column: its values, or for a numeric column with many values its tertile bands;
    missing cells form a "(missing)" group. Returns the labels and how they were made."""
    from breastfusion.missing import is_missing

    miss = values.map(lambda v: is_missing(v))
    num = pd.to_numeric(values.where(~miss), errors="coerce")
    present = int((~miss).sum())
    if present and num.notna().sum() >= 0.95 * present and num.nunique() > 2 * N_BANDS:
        bands = pd.qcut(num, N_BANDS, duplicates="drop")
        lab = bands.map(lambda iv: f"{column} {iv.left:g} to {iv.right:g}" if pd.notna(iv) else np.nan)
        how = f"numeric: cut into {N_BANDS} quantile bands (tertiles) of this cohort"
        return lab.astype(object).where(~miss, "(missing)"), how
    return values.astype(str).str.strip().where(~miss, "(missing)"), "categorical: one group per value"


def subgroup_table(preds: pd.DataFrame, cases: pd.DataFrame, columns: list[str], classes: list[str], *,
                   positive: str | None, n_boot: int, seed: int) -> tuple[pd.DataFrame, dict[str, str]]:
    """Metrics per value of each column in ``columns`` (columns of the cohort table)."""
    missing = [c for c in columns if c not in cases.columns]
    if missing:
        raise DataError(f"--subgroups: column(s) {missing} are not in the cohort (columns: "
                        f"{[c for c in cases.columns if c not in (IMAGE_PATH, 'mask_path')]}).")
    merged = preds.merge(cases[[CASE_ID] + [c for c in columns if c not in preds.columns]], on=CASE_ID, how="left")
    rows, how = [], {}
    for col in columns:
        labels, how[col] = subgroup_bands(merged[col], col)
        for g in sorted(labels.dropna().unique(), key=str):
            sub = merged[labels == g]
            res = evaluate(sub, classes, n_boot=n_boot, seed=seed, group_col=PATIENT_ID)
            pooled, ci = res["pooled"], res["ci"]
            key = f"auc[{positive}]" if positive else "macro_auc"
            auc = pooled["per_class"][positive]["auc"] if positive else pooled["macro_auc"]
            row = {"column": col, "group": str(g), "n": len(sub),
                   **{f"n_{c}": int((sub[LABEL] == c).sum()) for c in classes},
                   "auc": auc, "auc_ci": ci.get(key), "macro_f1": pooled["macro_f1"],
                   "balanced_accuracy": pooled["balanced_accuracy"]}
            if positive:
                row["sensitivity"] = pooled["per_class"][positive]["sensitivity"]
                row["specificity"] = pooled["per_class"][positive]["specificity"]
            row["note"] = ("small group" if len(sub) < SMALL_SUBGROUP else "") + \
                ("; one class only: AUC undefined" if sub[LABEL].nunique() < 2 else "")
            rows.append(row)
    return pd.DataFrame(rows), how


# -- scoring ----------------------------------------------------------------------------------------------------

@dataclass
class _Scored:
    preds: pd.DataFrame  # case_id, image_path, label, prob_<bundle class> (raw), model
    skipped: pd.DataFrame
    embeddings: np.ndarray | None
    intensity: dict[str, tuple[float, float]]
    model_name: str
    uses_image: bool
    deep: bool
    absent: list[str]


def score_cohort(bundle, cases: pd.DataFrame, *, model: str | None, batch_size: int, progress: bool) -> _Scored:
    """Raw probabilities (before the bundle's temperature) of every case, the image embedding of each scored case
    (captured during the same forward pass) and the intensity statistics of each model input."""
    from breastfusion.data.fingerprint import intensity
    from breastfusion.inference.predictor import Predictor

    raw = dataclasses.replace(bundle, meta={**bundle.meta, "calibration": None})  # calibration applied below
    pred = Predictor(raw, model=model, batch_size=batch_size)
    stats: dict[str, tuple[float, float]] = {}
    load = pred._load_image

    def load_and_measure(path):
        u8 = load(path)
        stats[str(path)] = intensity(u8)
        return u8

    pred._load_image = load_and_measure
    chunks: list[np.ndarray] = []
    deep = pred.classical is None
    hook = None
    if deep and pred.model.uses_image:
        hook = pred.model.image_encoder.register_forward_hook(
            lambda _m, _i, out: chunks.append(out.detach().float().cpu().numpy()))
    try:
        out = pred.predict_cases(cases, progress=progress, source="cohort")
    finally:
        if hook is not None:
            hook.remove()
    E = np.concatenate(chunks) if chunks else None
    if E is not None and len(E) != len(out):  # the forward passes did not line up with the scored rows
        log.warning("image embeddings not captured (%d for %d scored cases): no OOD score", len(E), len(out))
        E = None
    return _Scored(preds=out, skipped=pred.last_skipped, embeddings=E, intensity=stats, model_name=pred.model_name,
                   uses_image=bool(pred.model.uses_image), deep=deep, absent=list(pred.last_absent))


# -- site adaptation --------------------------------------------------------------------------------------------

def split_for_adaptation(groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the cases used to re-fit: a random ``fraction`` of the patients (all their cases)."""
    if not 0 < fraction < 1:
        raise ConfigError(f"--adapt-fraction must be between 0 and 1 (exclusive); got {fraction}.")
    uniq = np.array(sorted(set(map(str, groups))))
    if len(uniq) < 4:
        raise DataError(f"--adapt-fraction needs at least 4 patients to split; the cohort has {len(uniq)}.")
    rng = np.random.default_rng(seed)
    n_fit = int(min(max(round(fraction * len(uniq)), 2), len(uniq) - 2))
    chosen = set(rng.permutation(uniq)[:n_fit])
    return np.array([str(g) in chosen for g in groups])


def _site_figures(Pr: np.ndarray, y: np.ndarray, sets: np.ndarray | None, yb: np.ndarray,
                  target: float | None) -> dict[str, Any]:
    """ECE of the cohort-class probabilities (``y``: codes into the cohort's classes) and coverage of the sets
    (over the bundle's classes, ``yb``: codes into those)."""
    from breastfusion.evaluation.metrics import _expected_calibration_error

    return {"ece": _expected_calibration_error(Pr, y),
            "coverage": float(sets[np.arange(len(yb)), yb].mean()) if sets is not None else None,
            "mean_set_size": float(sets.sum(1).mean()) if sets is not None else None, "target_coverage": target}


def write_adapted_bundle(bundle_path: Path, dest: Path, calibration: dict, adaptation: dict) -> Path:
    """A copy of the bundle with the re-fitted calibration, sealed (``write_bundle_meta``), its model card saying
    it was adapted, on what, and the held-out figures. Built beside ``dest`` and renamed into place."""
    from breastfusion.bundles.bundle import read_bundle_meta, write_bundle_meta
    from breastfusion.bundles.card import CARD, model_card

    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(bundle_path, tmp)
    try:
        meta = read_bundle_meta(tmp)  # verifies the copy before re-sealing it
        meta["calibration"] = calibration
        meta["adaptation"] = adaptation
        meta["name"] = f"{meta.get('name', bundle_path.name)}-site-adapted"
        meta = write_bundle_meta(tmp, meta)
        h = adaptation["held_out"]
        card = model_card(meta) + "\n".join([
            "## Site adaptation", "",
            (f"- This is a **site-adapted copy** of `{adaptation['source_bundle']}`: the weights are unchanged; "
             f"the temperature and the conformal thresholds were re-fitted on {adaptation['n_fit_cases']} cases "
             f"({adaptation['n_fit_patients']} patients, a random {adaptation['fraction']:g} of the patients) of "
             f"cohort `{adaptation['cohort']}` (seed {adaptation['seed']})."),
            (f"- Held-out part of that cohort ({h['n']} cases, never used to fit): coverage "
             f"{_f(h['after']['coverage'])} (before {_f(h['before']['coverage'])}; target "
             f"{_f(h['after']['target_coverage'])}), ECE {_f(h['after']['ece'])} (before {_f(h['before']['ece'])})."),
            "- Use it only at that site; the original bundle's figures no longer describe it.", ""])
        with atomic_path(tmp / CARD) as t:
            Path(t).write_text(card, encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _f(v, d: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{d}f}"


# -- the whole validation ------------------------------------------------------------------------------------

def _choose_positive(positive: str | None, classes: list[str]) -> str | None:
    if positive is not None:
        if positive not in classes:
            raise ConfigError(f"--positive '{positive}' is not one of the cohort's classes {classes}.")
        return positive
    if len(classes) != 2:
        return None
    chosen = next((c for c in classes if c.lower() == "malignant"), classes[-1])
    log.info("positive class for the binary figures: '%s' (choose with --positive)", chosen)
    return chosen


def _cohort_images(scored: _Scored, record: dict | None) -> tuple[dict, int, list[str]]:
    """Image statistics of the scored cases, and how many of their files are byte-identical to training images."""
    from breastfusion.data.fingerprint import file_hash, image_statistics
    from breastfusion.data.images import image_size

    W, H, M, S, overlap = [], [], [], [], []
    train_hashes = set((record or {}).get("image_hashes") or [])
    for cid, p in zip(scored.preds[CASE_ID], scored.preds[IMAGE_PATH].astype(str)):
        try:
            w, h = image_size(p)
            W.append(w)
            H.append(h)
            if train_hashes and file_hash(p) in train_hashes:
                overlap.append(str(cid))
        except (OSError, DataError):
            pass
        if p in scored.intensity:
            M.append(scored.intensity[p][0])
            S.append(scored.intensity[p][1])
    return image_statistics(W, H, M, S), len(overlap), overlap



def _mask_phrase(masks: dict) -> str:
    """Whether the figure needed the expert's outline: said beside the number."""
    src = masks.get("sources") or {}
    if not src:
        return ""
    n = sum(src.values())
    if src.get("expert"):
        return (f"; {src['expert']} of {n} cases scored WITH the cohort's expert lesion masks (not an images-alone "
                "figure; --masks ignore for that)")
    parts = [f"{v} {k}" for k, v in src.items()]
    return f"; scored from the images alone (lesion outlines: {', '.join(parts)})"


def _statement(cohort_name: str, n_scored: int, n_overlap: int, checked: bool) -> str:
    """What kind of figure this is. It is an external validation only as far as the toolkit can tell: images
    byte-identical to the bundle's training images are caught (re-saved or cropped copies are not)."""
    if n_overlap >= n_scored > 0:
        return (f"NOT an external validation on {cohort_name}: every scored image is byte-identical to an image "
                f"this bundle was trained on")
    if n_overlap:
        return (f"NOT a clean external validation on {cohort_name}: {n_overlap} of {n_scored} scored images are "
                f"byte-identical to images this bundle was trained on")
    if checked:
        return (f"external validation on {cohort_name}: none of these images is among the bundle's training images "
                f"(checked by file content; re-saved or cropped copies would not be caught), nothing was retrained")
    return (f"validation on {cohort_name}, nothing retrained: the bundle records no training images, so whether it "
            f"saw these cases cannot be checked")

def validate_bundle(bundle_path: str | Path, cohort: str | Path, out_dir: str | Path, *, model: str | None = None,
                    positive: str | None = None, subgroups: list[str] | None = None,
                    mapping: dict[str, str] | None = None, drop_labels: list[str] | None = None,
                    adapt_fraction: float | None = None, n_boot: int = 1000, seed: int = 0, batch_size: int = 32,
                    progress: bool = False, masks: str = "use") -> ValidationResult:
    """External validation of a bundle on a labelled cohort (see the module docstring). Nothing is retrained.

    ``masks``: "use" scores with the cohort's own lesion masks where it has them (a figure that needs the
    expert's outline); "ignore" drops them, so each case is scored from its image alone (the bundle's segmenter
    outlines the lesion, or the radiomics are unknown): what a site without outlines gets."""
    from breastfusion.bundles.bundle import load_bundle
    from breastfusion.data.fingerprint import (
        compare_images,
        compare_tabular,
        distance_percentile,
        embedding_distance,
        tabular_profile,
    )
    from breastfusion.evaluation.calibration import (
        ConformalClassifier,
        TemperatureScaler,
        fit_bundle_calibration,
    )
    from breastfusion.inference.predictor import predictor_class

    bundle_path, out_dir = Path(bundle_path), Path(out_dir)
    if n_boot < 0:
        raise ConfigError(f"--n-boot must be 0 or more; got {n_boot}.")
    bundle = load_bundle(bundle_path)
    if predictor_class(bundle.meta).inputs != "images":
        raise BundleError(f"Bundle '{bundle_path}' is a histology grading bundle; `validate` handles ultrasound "
                          "bundles only for now (score the cohort with `breastfusion predict` and evaluate the "
                          "predictions).")
    if adapt_fraction is not None and model is not None and model != bundle.meta["model"]["variant"]:
        raise ConfigError(f"--adapt-fraction re-fits the deep model's temperature and conformal thresholds; the "
                          f"classical model '{model}' has neither. Leave out --model to adapt.")
    classes = bundle.classes
    if masks not in ("use", "ignore"):
        raise ConfigError(f"--masks must be 'use' or 'ignore'; got {masks!r}.")
    cases, dropped = load_cohort(cohort, drop_labels)
    if masks == "ignore" and MASK_PATH in cases.columns:
        cases[MASK_PATH] = np.nan  # no outline given: the bundle's segmenter (if any) makes its own
    cohort_name = Path(cohort).name or str(cohort)
    original = cases[LABEL].copy()
    cases[LABEL], cohort_classes = map_labels(cases[LABEL], classes, mapping, source=f"cohort '{cohort}'")
    positive = _choose_positive(positive, cohort_classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(exist_ok=True)

    scored = score_cohort(bundle, cases, model=model, batch_size=batch_size, progress=progress)
    skipped_path = None
    if len(scored.skipped):
        skipped_path = out_dir / "skipped.csv"
        with atomic_path(skipped_path) as tmp:
            scored.skipped.to_csv(tmp, index=False)
    if not len(scored.preds):
        raise DataError(f"Nothing scored: all {len(cases)} case(s) of cohort '{cohort}' were skipped; reasons in "
                        f"'{skipped_path}'.")
    preds = scored.preds.merge(cases[[CASE_ID, PATIENT_ID]], on=CASE_ID, how="left")
    n = len(preds)
    P_raw = preds[[f"prob_{c}" for c in classes]].to_numpy(dtype=float)
    cal = bundle.meta.get("calibration") if scored.deep else None
    sets = None
    P = P_raw
    if cal:
        P = TemperatureScaler.from_dict(cal["temperature"]).transform(P_raw)
        sets = ConformalClassifier.from_dict(cal["conformal"]).predict_sets(P)
    Pr = restrict_probabilities(P, classes, cohort_classes)
    y = preds[LABEL].map({c: k for k, c in enumerate(cohort_classes)}).to_numpy().astype(int)
    yb = preds[LABEL].map({c: k for k, c in enumerate(classes)}).to_numpy().astype(int)
    groups = preds[PATIENT_ID].astype(str).to_numpy()
    ev = prediction_table(preds[CASE_ID].to_numpy(), Pr, cohort_classes, model=scored.model_name,
                          **{PATIENT_ID: groups, LABEL: preds[LABEL].to_numpy()})
    res = evaluate(ev, cohort_classes, n_boot=n_boot, seed=seed, group_col=PATIENT_ID)
    calib = calibration_summary(Pr, y, cohort_classes, groups, positive=positive, n_boot=n_boot, seed=seed)
    calib["ece"] = res["pooled"].get("ece")
    coverage = None
    if sets is not None:
        coverage = conformal_coverage(sets, yb, classes, groups, target=float(cal.get("target_coverage", 0.9)),
                                      n_boot=n_boot, seed=seed)

    sub_table, sub_how = (subgroup_table(ev, cases, subgroups, cohort_classes, positive=positive, n_boot=n_boot,
                                         seed=seed) if subgroups else (None, {}))

    # input shift
    record = (bundle.meta.get("training") or {}).get("data_fingerprint")
    img_stats, n_overlap, overlap_ids = _cohort_images(scored, record) if scored.uses_image else ({}, 0, [])
    pre = bundle.tabular
    clin = list(((bundle.meta.get("features") or {}).get("clinical_columns")) or [])
    tab_cols = list((record or {}).get("tabular") or {}) or clin
    cohort_tab = tabular_profile(cases[cases[CASE_ID].isin(preds[CASE_ID])], tab_cols,
                                 kinds=pre.kinds_ if pre is not None else None,
                                 missing_values=pre.missing_values if pre is not None else None,
                                 separator=getattr(pre, "multi_separator", None))
    img_table, img_find = compare_images((record or {}).get("images"), img_stats) if img_stats else (None, [])
    tab_table, tab_find = compare_tabular((record or {}).get("tabular"), cohort_tab, list(cases.columns))
    findings = img_find + tab_find
    ood = None
    ref = (record or {}).get("embedding")
    if ref and scored.embeddings is not None:
        dist = embedding_distance(ref, scored.embeddings)
        pct = distance_percentile(ref, dist)
        preds["ood_distance"], preds["ood_percentile"] = dist, pct
        q95, q99 = ref["distance_percentiles"][95], ref["distance_percentiles"][99]
        ood = {"median_percentile": float(np.median(pct)), "beyond_train_95th": float((dist > q95).mean()),
               "beyond_train_99th": float((dist > q99).mean()), "beyond_all_training": float((pct >= 100).mean()),
               "reference": f"{ref['n']} training cases, {len(ref['variances'])} principal components of the "
                            f"{ref['dim']}-d image embedding ({ref.get('distance_note', '')})"}
        findings.append(f"image embedding: {ood['beyond_train_95th']:.0%} of the cohort lies beyond the training "
                        f"cases' 95th distance percentile (about 5 % for cases like the training ones), "
                        f"{ood['beyond_train_99th']:.0%} beyond the 99th")
    if n_overlap:
        findings.insert(0, f"{n_overlap} cohort image(s) are byte-identical to training images of this bundle "
                           f"(e.g. {overlap_ids[:3]}): for them this is not an external validation")

    # site adaptation
    adaptation, adapted_path = None, None
    if adapt_fraction is not None:
        fit_mask = split_for_adaptation(groups, adapt_fraction, seed)
        preds["adaptation_part"] = np.where(fit_mask, "fit", "held_out")
        fit_df = pd.DataFrame({CASE_ID: preds[CASE_ID][fit_mask], LABEL: preds[LABEL][fit_mask],
                               **{f"prob_{c}": P_raw[fit_mask, k] for k, c in enumerate(classes)}})
        conf = (cal or {}).get("conformal") or {}
        new_cal = fit_bundle_calibration(fit_df, classes, method=conf.get("method", "lac"),
                                         alpha=float(conf.get("alpha", 0.1)), class_conditional="auto")
        new_cal["fitted_on"] = (f"{int(fit_mask.sum())} cases of cohort '{cohort_name}' (site adaptation: a random "
                                f"{adapt_fraction:g} of its patients, seed {seed})")
        ho = ~fit_mask
        P_new = TemperatureScaler.from_dict(new_cal["temperature"]).transform(P_raw[ho])
        sets_new = ConformalClassifier.from_dict(new_cal["conformal"]).predict_sets(P_new)
        before = _site_figures(Pr[ho], y[ho], sets[ho] if sets is not None else None, yb[ho],
                               float(cal["target_coverage"]) if cal else None)
        after = _site_figures(restrict_probabilities(P_new, classes, cohort_classes), y[ho], sets_new, yb[ho],
                              float(new_cal["target_coverage"]))
        if positive:
            k = cohort_classes.index(positive)
            yy = (y[ho] == k).astype(float)
            before["slope"], before["intercept"] = (float(v[0]) for v in logistic_recalibration(Pr[ho, k], yy))
            Pn = restrict_probabilities(P_new, classes, cohort_classes)
            after["slope"], after["intercept"] = (float(v[0]) for v in logistic_recalibration(Pn[:, k], yy))
        adaptation = {"source_bundle": str(bundle_path), "cohort": str(cohort), "fraction": float(adapt_fraction),
                      "seed": int(seed), "n_fit_cases": int(fit_mask.sum()),
                      "n_fit_patients": len(set(groups[fit_mask])),
                      "held_out": {"n": int(ho.sum()), "before": before, "after": after},
                      "temperature": new_cal["temperature"]["temperature"]}
        new_cal["warnings"] = list(new_cal.get("warnings", [])) + [
            f"site-adapted on cohort '{cohort_name}': valid for cases of that site only"]
        adapted_path = write_adapted_bundle(bundle_path, out_dir / "adapted_bundle", new_cal, adaptation)

    # outputs
    out = preds.drop(columns=[f"prob_{c}" for c in classes])
    for k, c in enumerate(classes):
        out[f"prob_{c}"] = P[:, k]
    for k, c in enumerate(cohort_classes):
        out[f"cohort_prob_{c}"] = Pr[:, k]
    out["cohort_label"] = out[CASE_ID].map(dict(zip(cases[CASE_ID], original)))  # as the cohort named it
    out["predicted"] = ev["predicted"].to_numpy()
    if sets is not None:
        out["prediction_set"] = ["|".join(c for c, s in zip(classes, row) if s) for row in sets]
    pred_path = out_dir / "predictions.csv"
    with atomic_path(pred_path) as tmp:
        out.to_csv(tmp, index=False)

    cv = _bundle_cv(bundle.meta, scored.model_name)
    summary = {
        "cohort": str(cohort), "bundle": str(bundle_path), "model": scored.model_name,
        "statement": _statement(cohort_name, n, n_overlap, bool((record or {}).get("image_hashes"))),
        "synthetic_bundle": bundle.synthetic, "bundle_classes": classes, "cohort_classes": cohort_classes,
        "label_mapping": mapping or {}, "set_aside": dropped, "positive": positive,
        "restricted": len(cohort_classes) < len(classes),
        "n_cases": len(cases), "n_scored": n, "n_skipped": len(scored.skipped),
        "absent_clinical_columns": scored.absent, "metrics": res, "bundle_cross_validation": cv,
        "calibration": calib, "conformal": coverage, "calibrated_bundle": bool(cal),
        "subgroups": sub_table.to_dict(orient="records") if sub_table is not None else None,
        "subgroup_bands": sub_how,
        "shift": {"record": bool(record), "images": img_stats, "tabular": cohort_tab, "ood": ood,
                  "training_image_overlap": n_overlap, "findings": findings},
        "adaptation": adaptation,
        "masks": {"cohort_masks": masks,
                  "sources": ({str(k): int(v) for k, v in scored.preds["mask_source"].value_counts().items()}
                              if "mask_source" in scored.preds.columns else {})},
    }
    summary["statement"] += _mask_phrase(summary["masks"])
    metrics_path = write_json(to_jsonable(summary), out_dir / "metrics.json")
    figs = _figures(ev, cohort_classes, fig_dir, cohort_name, preds, ref)
    report = _write_report(out_dir, summary, figs, img_table, tab_table, sub_table)
    return ValidationResult(out_dir=out_dir, report=report, metrics_json=metrics_path, predictions=pred_path,
                            n_scored=n, n_skipped=len(scored.skipped), summary=summary, skipped=skipped_path,
                            adapted_bundle=adapted_path, findings=findings)


def _bundle_cv(meta: dict, model_name: str) -> dict | None:
    """The bundle's own cross-validation result for the scored model (deep or classical), when stored."""
    if model_name == meta["model"].get("variant"):
        return (meta.get("metrics") or {}).get("cross_validation")
    return (((meta.get("features") or {}).get("classical") or {}).get("metrics") or {}).get(model_name)


def _figures(ev: pd.DataFrame, classes: list[str], fig_dir: Path, cohort: str, preds: pd.DataFrame,
             ref: dict | None) -> list[tuple[Path, str]]:
    from breastfusion.evaluation.plots import (
        _new_figure,
        _save,
        plot_confusion_matrix,
        plot_reliability_diagram,
        plot_roc_curves,
    )

    figs = [(plot_roc_curves(ev, classes, fig_dir / "roc.png", title=f"External: {cohort}"), "ROC curves"),
            (plot_confusion_matrix(ev, classes, fig_dir / "confusion_matrix.png", title=f"External: {cohort}"),
             "Confusion matrix (rows: true class)"),
            (plot_reliability_diagram(ev, classes, fig_dir / "reliability.png", title=f"Reliability on {cohort}"),
             "Reliability diagram on the new site")]
    if "ood_distance" in preds.columns and ref:
        fig = _new_figure(6.4, 3.8)
        ax = fig.add_subplot(1, 1, 1)
        ax.hist(preds["ood_distance"], bins=30, color="#1f5fa8", alpha=0.8, label=f"{cohort} (n={len(preds)})")
        for p, ls in ((50, ":"), (95, "--"), (99, "-")):
            ax.axvline(ref["distance_percentiles"][p], color="#c62828", ls=ls, lw=1.2, label=f"training {p}th pct")
        ax.set_xlabel("Mahalanobis distance of the image embedding to the training cases")
        ax.set_ylabel("cases")
        ax.legend(fontsize=8)
        figs.append((_save(fig, fig_dir / "ood_distance.png"), "Out-of-distribution score: embedding distance"))
    return figs


# -- report -------------------------------------------------------------------------------------------------

_SHOWN = ("macro_f1", "macro_auc", "balanced_accuracy", "accuracy", "brier")


def _ci_text(v, ci) -> str:
    from breastfusion.evaluation.metrics import format_ci

    return format_ci(v, ci) if v is not None else "n/a"


def _write_report(out_dir: Path, s: dict, figs, img_table, tab_table, sub_table) -> Path:
    """``report.html``: self-contained (inline CSS, embedded PNGs), in the style of the training report."""
    from breastfusion.evaluation.labels import metric_label
    from breastfusion.evaluation.report import (
        _CSS,
        SYNTHETIC_BANNER,
        _df_table,
        _e,
        _img,
        _table,
    )
    from breastfusion.version import __version__

    res, cv = s["metrics"], s["bundle_cross_validation"] or {}
    title = f"External validation on {Path(s['cohort']).name}"
    body = [(f"<header><h1>{_e(title)}</h1><div class=\"meta\">bundle {_e(s['bundle'])} · model {_e(s['model'])} · "
             f"breastfusion {_e(__version__)}</div></header>")]
    if s["synthetic_bundle"]:
        body.append(f'<div class="banner" role="alert">{_e(SYNTHETIC_BANNER)}<small>The bundle was trained on '
                    "generated data.</small></div>")
    lede = (f"{s['statement'][0].upper() + s['statement'][1:]}. {s['n_scored']} of {s['n_cases']} cases scored, "
            "nothing retrained; the bundle's own cross-validation figures stand beside them for contrast.")
    body.append(f'<section id="summary"><h2>Summary</h2><p class="lede">{_e(lede)}</p>')
    rows = []
    names = list(_SHOWN) + ([f"auc[{s['positive']}]"] if s["positive"] else [])
    for m in names:
        if m.startswith("auc["):
            c = s["positive"]
            ext, cv_v = res["pooled"]["per_class"][c]["auc"], (((cv.get("pooled") or {}).get("per_class") or {})
                                                              .get(c) or {}).get("auc")
            label = f"AUC, {c} vs rest"
        else:
            ext, cv_v, label = res["pooled"].get(m), (cv.get("pooled") or {}).get(m), metric_label(m)
        rows.append([_e(label), _e(_ci_text(ext, res["ci"].get(m))),
                     _e(_ci_text(cv_v, (cv.get("ci") or {}).get(m)) if cv else "not stored")])
    body.append(_table(["Metric", f"External: {s['n_scored']} cases (95% CI)",
                        "Bundle's cross-validation (95% CI)"], rows))
    notes = []
    if s["restricted"]:
        notes.append(f"The cohort has classes {s['cohort_classes']}, the bundle {s['bundle_classes']}: the bundle's "
                     "probabilities are restricted to the cohort's classes and renormalised (e.g. P(malignant | "
                     "lesion) = P(malignant) / (P(benign) + P(malignant))). The cross-validation column is over the "
                     "bundle's classes, so it is a contrast, not a like-for-like comparison.")
    if s["label_mapping"]:
        notes.append(f"Cohort labels renamed to the bundle's: {s['label_mapping']}.")
    if s["set_aside"]:
        notes.append(f"Cases set aside by label: {s['set_aside']}.")
    if s["n_skipped"]:
        notes.append(f"{s['n_skipped']} case(s) could not be scored (reasons in skipped.csv).")
    if s["absent_clinical_columns"]:
        notes.append(f"The cohort lacks clinical column(s) {s['absent_clinical_columns']}: scored as unknown.")
    notes += [f"Input shift: {f}" for f in s["shift"]["findings"]]
    if notes:
        body.append('<div class="notes"><ul>' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul></div>")
    body.append('<div class="figs">' + "".join(_img(p, cap, cap) for p, cap in figs[:2]) + "</div></section>")

    pc = res["pooled"]["per_class"]
    rows = [[_e(c), _e(pc[c]["support"])] + [_e(_ci_text(pc[c][m], res["ci"].get(f"{m}[{c}]")))
                                               for m in ("sensitivity", "specificity", "ppv", "npv", "auc")]
            for c in s["cohort_classes"]]
    body.append("<section id=\"classes\"><h2>Per class (one-vs-rest)</h2>" + _table(
        ["Class", "Cases", "Sensitivity", "Specificity", "PPV", "NPV", "AUC"], rows) + "</section>")

    cal = s["calibration"]
    rows = [[_e(c), _e(_ci_text(e["slope"], e.get("slope_ci"))), _e(_ci_text(e["intercept"], e.get("intercept_ci"))),
             _e(f"{e['mean_predicted']:.3f}"), _e(f"{e['observed_rate']:.3f}")] for c, e in cal["per_class"].items()]
    body.append('<section id="calibration"><h2>Calibration on the new site</h2>'
                f"<p>{_e(cal['method'])}; slope 1 and intercept 0 are ideal (slope &lt; 1: over-confident). "
                f"Top-label ECE {_e(_f(cal.get('ece')))}. Probabilities: the bundle's "
                f"{'temperature-scaled' if s['calibrated_bundle'] else 'uncalibrated'} output.</p>"
                + _table(["Class", "Slope (95% CI)", "Intercept (95% CI)", "Mean predicted", "Observed"], rows)
                + '<div class="figs">' + "".join(_img(p, cap, cap) for p, cap in figs[2:3]) + "</div></section>")

    cov = s["conformal"]
    if cov:
        rows = [[_e(c), _e(e["n"]), _e(f"{e['coverage']:.3f}"), _e(f"{e['mean_set_size']:.2f}")]
                for c, e in cov["per_class"].items()]
        body.append('<section id="coverage"><h2>Conformal coverage on the new site</h2>'
                    f"<p>Target {cov['target_coverage']:.2f}; observed {_e(_ci_text(cov['coverage'], cov.get('coverage_ci')))}"
                    f", mean set size {cov['mean_set_size']:.2f}, referred {cov['refer_rate']:.1%}. The guarantee "
                    "holds only for cases exchangeable with the calibration cases; a shortfall here is the site "
                    "shift.</p>" + _table(["True class", "Cases", "Coverage", "Mean set size"], rows) + "</section>")
    else:
        body.append('<section id="coverage"><h2>Conformal coverage on the new site</h2><p>The scored model '
                    "carries no conformal prediction sets.</p></section>")

    if sub_table is not None:
        how = "; ".join(f"{k}: {v}" for k, v in s["subgroup_bands"].items())
        body.append(f'<section id="subgroups"><h2>Subgroups</h2><p>{_e(how)}.</p>{_df_table(sub_table)}</section>')

    sh = s["shift"]
    part = ['<section id="shift"><h2>Input shift</h2>']
    if not sh["record"]:
        part.append("<p>The shift comparison is unavailable for this bundle: it records nothing about its "
                    "training data (trained before breastfusion recorded it). Retrain with this version to get it. "
                    "The cohort's own statistics follow.</p>")
    if img_table is not None:
        part.append("<h3>Images</h3>" + _df_table(img_table))
    if tab_table is not None and len(tab_table):
        part.append("<h3>Clinical columns</h3>" + _df_table(tab_table))
    if sh["ood"]:
        o = sh["ood"]
        part.append(f"<p>Out-of-distribution score (per case in predictions.csv): median training percentile "
                    f"{o['median_percentile']:.0f}; beyond the training 95th percentile {o['beyond_train_95th']:.1%}, "
                    f"beyond the 99th {o['beyond_train_99th']:.1%}. Reference: {_e(o['reference'])}.</p>")
        part += [_img(p, cap, cap) for p, cap in figs[3:]]
    elif sh["record"]:
        part.append("<p>No out-of-distribution score: the bundle has no image-embedding reference, or the scored "
                    "model reads no image.</p>")
    part.append("</section>")
    body.append("\n".join(part))

    ad = s["adaptation"]
    if ad:
        h = ad["held_out"]
        rows = [[_e(k), _e(_f(h["before"].get(k))), _e(_f(h["after"].get(k)))]
                for k in ("coverage", "mean_set_size", "ece", "slope", "intercept") if k in h["after"]]
        body.append(f'<section id="adaptation"><h2>Site adaptation</h2><p>Temperature (T = {ad["temperature"]:.3f}) '
                    f"and conformal thresholds re-fitted on {ad['n_fit_cases']} cases ({ad['n_fit_patients']} "
                    f"patients, a random {ad['fraction']:g} of them); judged on the other {h['n']} cases, which were "
                    "not used to fit. The adapted copy is in adapted_bundle/.</p>"
                    + _table(["On held-out cases", "Bundle as trained", "Site-adapted"], rows) + "</section>")
    cm = res["ci_method"]
    body.append("<section id=\"methods\"><h2>Methods</h2><ul>"
                f"<li>{100 * cm['level']:.0f}% percentile bootstrap over {_e(cm['n_boot'])} resamples of "
                f"{_e(cm['n_units'])} patients (column '{PATIENT_ID}').</li><li>Probabilities are those the bundle "
                "deploys (temperature-scaled when it is calibrated), restricted to the cohort's classes when it has "
                "fewer.</li></ul></section>")
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           '<meta name="viewport" content="width=device-width, initial-scale=1">'
           f"<title>{_e(('[SYNTHETIC] ' if s['synthetic_bundle'] else '') + title)}</title><style>{_CSS}</style>"
           "</head>\n<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n")
    path = out_dir / "report.html"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(doc, encoding="utf-8")
    return path
