"""What a bundle records about its training data, and the same statistics for another cohort.

``breastfusion validate`` compares a new site's cases with the data a bundle was trained on. At final-bundle time
training stores (``bundle.json['training']['data_fingerprint']``, made by
:func:`breastfusion.training.fit.training_fingerprint` from the functions here):

* image width / height and grey intensity mean / std quantiles (intensity of the model's input: grey, resized);
* per clinical column: missingness and the distribution (numeric quantiles, or category frequencies);
* an image-embedding reference: the mean and a low-rank covariance (PCA) of the final network's image embedding
  over the training cases, plus the training cases' own Mahalanobis-distance quantiles, so a new case's distance
  reads as a training percentile (a case past the 99th percentile looks like nothing the model was trained on);
* short content hashes of the training image files, so a "new" cohort that contains training images is caught.

Only summaries are stored: no image, no row of the clinical table.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FINGERPRINT_VERSION = 1
#: Quantiles stored for every numeric statistic.
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
#: Principal components kept for the embedding covariance (the rest is one isotropic residual variance).
MAX_COMPONENTS = 20
#: Categories listed per column (the rest are summed as "other").
MAX_CATEGORIES = 50
HASH_CHARS = 16


def _round(x: float, digits: int = 6) -> float | None:
    if x is None or not math.isfinite(float(x)):
        return None
    return float(f"{float(x):.{digits}g}")


def describe_numeric(values: Iterable[float]) -> dict[str, Any]:
    """n, mean, sd and :data:`QUANTILES` of the finite values (missing counted separately by the caller)."""
    v = np.asarray(list(values), dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"n": 0, "mean": None, "sd": None, "quantiles": {}}
    qs = np.quantile(v, QUANTILES)
    return {"n": len(v), "mean": _round(v.mean()), "sd": _round(v.std(ddof=1)) if len(v) > 1 else None,
            "quantiles": {f"{q:g}": _round(x) for q, x in zip(QUANTILES, qs)}}


def image_statistics(widths, heights, means, sds) -> dict[str, Any]:
    """Quantile summaries of image sizes (pixels) and of the grey intensity (0..1) mean and std per image."""
    return {"n": len(widths), "width": describe_numeric(widths), "height": describe_numeric(heights),
            "intensity_mean": describe_numeric(means), "intensity_std": describe_numeric(sds)}


def intensity(u8: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of a grey uint8 model input, on the 0..1 scale."""
    x = np.asarray(u8, dtype=np.float32) / 255.0
    return float(x.mean()), float(x.std())


def file_hash(path: str | Path) -> str:
    """Short sha256 of a file's bytes (:data:`HASH_CHARS` hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:HASH_CHARS]


def _is_numeric(kind: str | None, values: pd.Series) -> bool:
    """Numeric as training typed it (``kind``); without a fitted kind, when (almost) every present value parses."""
    if kind is not None:
        return kind == "numeric"
    num = pd.to_numeric(values, errors="coerce")
    return bool(len(values)) and num.notna().mean() >= 0.95


def tabular_profile(table: pd.DataFrame, columns: list[str], *, kinds: dict[str, str] | None = None,
                    missing_values=None, separator: str | None = None) -> dict[str, dict]:
    """Per column: ``kind`` (numeric / categorical), ``missing`` fraction and the distribution of the present
    values (numeric quantiles, or category frequencies; a multi-valued column counts each value it names).
    ``kinds`` are the fitted preprocessor's column kinds (the typing training used); missing cells are read
    with the same tokens (``missing_values``)."""
    from breastfusion.missing import is_missing, missing_tokens

    tokens = missing_tokens(missing_values)
    kinds = kinds or {}
    out: dict[str, dict] = {}
    for c in columns:
        if c not in table.columns:
            continue
        s = table[c]
        miss = np.array([is_missing(v, tokens) for v in s], dtype=bool)
        present = s[~miss]
        entry: dict[str, Any] = {"n": len(s), "missing": _round(miss.mean()) if len(s) else None}
        kind = kinds.get(c)
        if _is_numeric(kind, present):
            num = pd.to_numeric(present, errors="coerce")
            entry.update(kind="numeric", **describe_numeric(num), non_numeric=int(num.isna().sum()))
        else:
            vals = present.astype(str).str.strip()
            if kind == "multi" and separator:
                vals = vals.str.split(separator, regex=False).explode().str.strip()
                vals = vals[vals != ""]
            freq = vals.str.lower().value_counts(normalize=True)
            top = freq.iloc[:MAX_CATEGORIES]
            entry.update(kind="categorical", frequencies={str(k): _round(v, 4) for k, v in top.items()},
                         other=_round(float(freq.iloc[MAX_CATEGORIES:].sum()), 4))
        out[str(c)] = entry
    return out


# -- image-embedding reference -------------------------------------------------------------------------------

def fit_embedding_reference(E: np.ndarray, max_components: int = MAX_COMPONENTS) -> dict[str, Any]:
    """Mean, top principal directions and their variances, the isotropic residual variance, and the training
    cases' own distances (:func:`embedding_distance`) at percentiles 0, 1, ..., 100."""
    E = np.asarray(E, dtype=np.float64)
    n, d = E.shape
    if n < 3:
        raise ValueError(f"an embedding reference needs at least 3 cases; got {n}")
    mu = E.mean(axis=0)
    X = E - mu
    _, s, Vt = np.linalg.svd(X, full_matrices=False)
    var = s ** 2 / (n - 1)
    total = float(var.sum())
    k = int(min(max_components, n - 1, d))
    lam = np.maximum(var[:k], 1e-12 * max(total, 1e-12))
    resid = (total - float(var[:k].sum())) / (d - k) if d > k else 0.0
    ref = {"dim": int(d), "n": int(n), "mean": [_round(x) for x in mu],
           "components": [[_round(x) for x in row] for row in Vt[:k]], "variances": [float(x) for x in lam],
           "residual_variance": float(max(resid, 0.0))}
    dist = embedding_distance(ref, E)
    ref["distance_percentiles"] = [float(x) for x in np.percentile(dist, np.arange(101))]
    ref["distance_note"] = ("in-sample: the training cases' distances to their own mean, so a new site's "
                            "percentiles are slightly optimistic about how unusual it is")
    return ref


def embedding_distance(ref: dict, E: np.ndarray) -> np.ndarray:
    """Mahalanobis distance under the low-rank-plus-isotropic covariance of ``ref``: the principal part scaled
    by each component's variance, the residual by the residual variance (left out when there is none)."""
    E = np.asarray(E, dtype=np.float64)
    if E.ndim != 2 or E.shape[1] != ref["dim"]:
        raise ValueError(f"embeddings of width {E.shape[-1]} do not match the reference's {ref['dim']}")
    X = E - np.asarray(ref["mean"], dtype=np.float64)
    V = np.asarray(ref["components"], dtype=np.float64)
    Z = X @ V.T
    d2 = (Z ** 2 / np.asarray(ref["variances"], dtype=np.float64)).sum(axis=1)
    rv = float(ref.get("residual_variance") or 0.0)
    if rv > 1e-12:
        R = X - Z @ V
        d2 = d2 + (R ** 2).sum(axis=1) / rv
    return np.sqrt(d2)


def distance_percentile(ref: dict, dist: np.ndarray) -> np.ndarray:
    """Where each distance falls among the training cases' distances, 0..100 (100: beyond every training case)."""
    q = np.asarray(ref["distance_percentiles"], dtype=float)
    dist = np.asarray(dist, dtype=float)
    pct = np.interp(dist, q, np.arange(101, dtype=float))
    return np.where(dist > q[-1], 100.0, pct)


# -- comparison with a new cohort --------------------------------------------------------------------------

def _q(entry: dict, q: str):
    return (entry.get("quantiles") or {}).get(q)


def _span(entry: dict | None) -> str:
    if not entry or not entry.get("n"):
        return "—"
    return f"{_q(entry, '0.5'):.4g} [{_q(entry, '0.05'):.4g}–{_q(entry, '0.95'):.4g}]"


def _outside(train: dict, value) -> bool:
    lo, hi = _q(train, "0.05"), _q(train, "0.95")
    return value is not None and lo is not None and hi is not None and not lo <= value <= hi


def compare_images(train: dict | None, cohort: dict) -> tuple[pd.DataFrame, list[str]]:
    """Image size and intensity, median [5th–95th percentile], training beside the cohort. A finding when the
    cohort's median falls outside the training 5–95 % range."""
    rows, findings = [], []
    names = {"width": "width (px)", "height": "height (px)", "intensity_mean": "grey mean (0–1)",
             "intensity_std": "grey std (0–1)"}
    for key, label in names.items():
        c = cohort.get(key) or {}
        t = (train or {}).get(key)
        shifted = bool(t) and _outside(t, _q(c, "0.5"))
        rows.append({"statistic": label, "training median [5–95%]": _span(t) if train else "not recorded",
                     "cohort median [5–95%]": _span(c), "shifted": "yes" if shifted else ("—" if not t else "no")})
        if shifted:
            findings.append(f"image {label}: cohort median {_q(c, '0.5'):.4g} is outside the training 5–95 % range "
                            f"{_q(t, '0.05'):.4g}–{_q(t, '0.95'):.4g}")
    return pd.DataFrame(rows), findings


def _tv_distance(a: dict, b: dict) -> float:
    keys = set(a) | set(b)
    return 0.5 * sum(abs(float(a.get(k) or 0) - float(b.get(k) or 0)) for k in keys)


def compare_tabular(train: dict | None, cohort: dict, cohort_columns: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Per clinical column recorded in training: missingness and distribution side by side, columns the cohort
    lacks, categories never seen in training, and the total-variation distance of category frequencies."""
    rows, findings = [], []
    if not train:
        for col, c in cohort.items():
            dist = _span(c) if c.get("kind") == "numeric" else ", ".join(
                f"{k} {v:.2f}" for k, v in list((c.get("frequencies") or {}).items())[:6])
            rows.append({"column": col, "training": "not recorded", "cohort": dist,
                         "missing (train → cohort)": f"— → {c.get('missing') or 0:.2f}", "finding": ""})
        return pd.DataFrame(rows), findings
    present = set(map(str, cohort_columns))
    for col, t in train.items():
        if col not in present:
            rows.append({"column": col, "training": "", "cohort": "ABSENT", "missing (train → cohort)": "",
                         "finding": "column absent: the model scores it as unknown for every case"})
            findings.append(f"clinical column '{col}' is absent from the cohort (scored as unknown for every case)")
            continue
        c = cohort.get(col, {})
        notes = []
        mt, mc = float(t.get("missing") or 0), float(c.get("missing") or 0)
        if abs(mc - mt) > 0.2:
            notes.append(f"missingness {mt:.0%} → {mc:.0%}")
        if t.get("kind") == "numeric":
            tr, co = _span(t), _span(c) if c.get("kind") == "numeric" else "not numeric"
            if c.get("kind") == "numeric" and _outside(t, _q(c, "0.5")):
                notes.append("median outside the training 5–95 % range")
            if c.get("kind") != "numeric" or c.get("non_numeric"):
                notes.append("text where training had numbers")
        else:
            tf, cf = t.get("frequencies") or {}, c.get("frequencies") or {}
            tr = ", ".join(f"{k} {v:.2f}" for k, v in list(tf.items())[:6])
            co = ", ".join(f"{k} {v:.2f}" for k, v in list(cf.items())[:6])
            unseen = [k for k in cf if k not in tf]
            if unseen and not t.get("other"):
                notes.append(f"never seen in training: {unseen[:8]}")
            tv = _tv_distance(tf, cf)
            if tv > 0.2:
                notes.append(f"category mix differs (total variation {tv:.2f})")
        rows.append({"column": col, "training": tr, "cohort": co, "missing (train → cohort)": f"{mt:.2f} → {mc:.2f}",
                     "finding": "; ".join(notes)})
        findings += [f"clinical column '{col}': {n}" for n in notes]
    return pd.DataFrame(rows), findings
