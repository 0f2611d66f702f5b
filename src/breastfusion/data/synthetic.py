"""A synthetic multimodal breast-ultrasound cohort, for demos and tests.

BUSI (the public breast-ultrasound set) has images and masks but no clinical data. To exercise the
clinical / biomarker / fusion paths end to end, :func:`make_synthetic_cohort` writes a complete cohort:

* ``images/<case>.png``: a procedural breast-ultrasound phantom (8-bit; some saved as RGB with identical
  channels, like real exports). Layered tissue (bright skin line, subcutaneous fat with Cooper's
  ligaments, fibroglandular tissue in horizontal textured layers, retromammary fat, pectoral muscle),
  depth attenuation, Rayleigh multiplicative speckle, log compression, and a rectangular (linear probe)
  or sector (curvilinear probe) field of view on a black frame.
* Lesions. BENIGN: smooth, oval, wider-than-tall, hypoechoic, thin echogenic capsule, often posterior
  acoustic enhancement and lateral edge shadows. MALIGNANT: irregular, angular / spiculated margin,
  taller-than-wide tendency, heterogeneous very hypoechoic interior, echogenic halo, micro-calcifications,
  posterior acoustic shadowing. NORMAL: no lesion.
* ``masks/<case>_mask.png``: the lesion as 0/255 (all zero for normal cases); about 5 % of lesion cases
  have a second lesion in ``masks/<case>_mask_1.png`` (``mask_path`` joins them with ``;``).
* ``cases.csv``: the cases table (see :mod:`breastfusion.data.cases`) with 25 clinical-history columns
  (:data:`CLINICAL_COLUMNS`) and 10 laboratory biomarkers (:data:`BIOMARKER_COLUMNS`), described with
  units in :data:`FEATURE_INFO`, and ``_synthetic = True`` on every row.
* ``SYNTHETIC.md``: a notice that none of it is real patient data, and the generation parameters.

``signal`` scales how distinct the classes are, in the images and in the clinical table alike: every
class-dependent quantity is ``middle + signal * (class value - middle)``. At ``signal=0`` the labels are
independent of every feature (lesion conspicuity is ``min(signal, 1)``, so lesions fade into the tissue
as well; the masks still mark where they are); ``signal=1`` is a realistic, imperfect separation;
values above 1 exaggerate it.

Nothing here is medical knowledge to rely on: the distributions are plausible, not fitted to any cohort.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from breastfusion.data.cases import MASK_SEP, write_cases
from breastfusion.errors import ConfigError

__all__ = [
    "SYNTHETIC_TAG",
    "SYNTHETIC_COLUMN",
    "CLASSES",
    "CLINICAL_COLUMNS",
    "BIOMARKER_COLUMNS",
    "FEATURE_INFO",
    "make_synthetic_cohort",
    "is_synthetic",
]

SYNTHETIC_TAG = "SYNTHETIC"
SYNTHETIC_COLUMN = "_synthetic"
CLASSES = ("benign", "malignant", "normal")
DEFAULT_PROPORTIONS = {"benign": 0.5, "malignant": 0.3, "normal": 0.2}
GENERATOR_VERSION = "1"

# name -> (kind, unit, description). kind: "numeric" (float), "integer", "boolean", "categorical".
_CLINICAL = {
    "age": ("integer", "years", "Age at imaging (25-85)."),
    "bmi": ("numeric", "kg/m2", "Body-mass index."),
    "menopausal_status": ("categorical", "", "Menopausal status: pre / peri / post."),
    "family_history_breast_cancer": ("boolean", "", "First-degree relative with breast cancer."),
    "brca_mutation": ("categorical", "", "Germline BRCA status: negative / BRCA1 / BRCA2 / unknown (not tested)."),
    "parity": ("integer", "births", "Number of live births."),
    "age_at_menarche": ("integer", "years", "Age at first menstruation."),
    "age_first_birth": ("integer", "years", "Age at first live birth; empty when parity is 0."),
    "breastfeeding_months": ("integer", "months", "Total months of breastfeeding over all children."),
    "hormone_therapy": ("boolean", "", "Current or recent menopausal hormone therapy."),
    "oral_contraceptive_years": ("numeric", "years", "Cumulative years of oral contraceptive use."),
    "smoking_status": ("categorical", "", "Smoking: never / former / current."),
    "alcohol_units_week": ("numeric", "units/week", "Alcohol consumption (1 unit = 10 ml ethanol)."),
    "prior_biopsy": ("boolean", "", "Any previous breast biopsy."),
    "palpable_lump": ("boolean", "", "A lump palpable on clinical examination."),
    "nipple_discharge": ("boolean", "", "Spontaneous nipple discharge."),
    "skin_changes": ("boolean", "", "Skin dimpling, retraction, peau d'orange or redness."),
    "breast_pain": ("boolean", "", "Breast pain (mastalgia) reported."),
    "lesion_growth_reported": ("boolean", "", "Patient or clinician reports a growing lump."),
    "symptom_duration_weeks": ("numeric", "weeks", "Duration of the presenting symptoms; 0 when asymptomatic."),
    "breast_density": ("categorical", "", "Mammographic density, BI-RADS category a / b / c / d."),
    "previous_breast_cancer": ("boolean", "", "Personal history of breast cancer."),
    "ethnicity": ("categorical", "", "Self-reported ethnicity: white / black / asian / hispanic / other."),
    "physical_activity_hours_week": ("numeric", "hours/week", "Moderate-to-vigorous physical activity."),
    "diabetes": ("boolean", "", "Diagnosed type 2 diabetes."),
}
_BIOMARKERS = {
    "ca15_3": ("numeric", "U/mL", "Serum CA 15-3 (reference < 30 U/mL)."),
    "cea": ("numeric", "ng/mL", "Serum carcino-embryonic antigen (reference < 3-5 ng/mL; higher in smokers)."),
    "ca27_29": ("numeric", "U/mL", "Serum CA 27.29 (reference < 38 U/mL); correlated with CA 15-3."),
    "her2_serum": ("numeric", "ng/mL", "Serum HER2 extracellular domain (reference < 15 ng/mL)."),
    "ldh": ("integer", "U/L", "Lactate dehydrogenase (reference 140-280 U/L)."),
    "alkaline_phosphatase": ("integer", "U/L", "Alkaline phosphatase (reference 44-147 U/L)."),
    "crp": ("numeric", "mg/L", "C-reactive protein (reference < 5 mg/L)."),
    "hemoglobin": ("numeric", "g/dL", "Haemoglobin (reference 12-15.5 g/dL)."),
    "neutrophil_lymphocyte_ratio": ("numeric", "ratio", "Neutrophil-to-lymphocyte ratio from the blood count."),
    "vitamin_d": ("numeric", "ng/mL", "Serum 25-hydroxy vitamin D (sufficient > 30 ng/mL)."),
}
CATEGORIES = {
    "menopausal_status": ["pre", "peri", "post"],
    "brca_mutation": ["negative", "BRCA1", "BRCA2", "unknown"],
    "smoking_status": ["never", "former", "current"],
    "breast_density": ["a", "b", "c", "d"],
    "ethnicity": ["white", "black", "asian", "hispanic", "other"],
}
CLINICAL_COLUMNS: list[str] = list(_CLINICAL)
BIOMARKER_COLUMNS: list[str] = list(_BIOMARKERS)


def column_info() -> dict[str, dict[str, str | None]]:
    """Unit and description of every synthetic clinical and biomarker column, as ``data.column_info`` takes them
    (shown by the web form and the model card)."""
    return {name: {"unit": unit or None, "description": desc}
            for name, (_, unit, desc) in {**_CLINICAL, **_BIOMARKERS}.items()}


def column_types() -> dict[str, str]:
    """Declared types (``data.column_types``): the generator knows them, so nothing is left to inference (a count
    such as parity, with few integer levels, would otherwise be flagged as possibly a code)."""
    kinds = {"integer": "numeric", "numeric": "numeric", "boolean": "bool", "categorical": "categorical"}
    return {name: kinds[kind] for name, (kind, _, _) in {**_CLINICAL, **_BIOMARKERS}.items()}
FEATURE_INFO: dict[str, dict] = {
    name: {
        "group": group,
        "kind": kind,
        "unit": unit,
        "description": desc,
        **({"categories": list(CATEGORIES[name])} if name in CATEGORIES else {}),
    }
    for group, table in (("clinical", _CLINICAL), ("biomarker", _BIOMARKERS))
    for name, (kind, unit, desc) in table.items()
}


def is_synthetic(cases) -> bool:
    """True when a cases table (DataFrame) carries a truthy ``_synthetic`` value in any row."""
    if not isinstance(cases, pd.DataFrame) or SYNTHETIC_COLUMN not in cases.columns:
        return False
    for v in cases[SYNTHETIC_COLUMN]:
        if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            continue
        if isinstance(v, str):
            if v.strip().lower() in ("true", "1", "yes", "y", "t", SYNTHETIC_TAG.lower()):
                return True
        elif bool(v):
            return True
    return False


# --------------------------------------------------------------------------------------------------
# argument checks


def _check_args(n_cases, image_size, class_proportions, signal, missing_rate, n_centers,
                patients_with_two_images, seed) -> tuple[int, int, dict[str, float]]:
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        h = w = int(image_size)
    elif isinstance(image_size, Sequence) and len(image_size) == 2 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in image_size
    ):
        h, w = int(image_size[0]), int(image_size[1])
    else:
        raise ConfigError(f"image_size must be an int or a (height, width) pair of ints; got {image_size!r}.")
    if min(h, w) < 32 or max(h, w) > 4096:
        raise ConfigError(f"image_size must be between 32 and 4096 pixels per side; got {image_size!r}.")

    if class_proportions is None:
        props = dict(DEFAULT_PROPORTIONS)
    elif isinstance(class_proportions, Mapping):
        props = {str(k): v for k, v in class_proportions.items()}
    elif isinstance(class_proportions, Sequence) and not isinstance(class_proportions, str):
        if len(class_proportions) != len(CLASSES):
            raise ConfigError(
                f"class_proportions as a sequence must have {len(CLASSES)} values in the order {list(CLASSES)}; "
                f"got {len(class_proportions)}. Pass a dict such as {{'benign': 0.6, 'malignant': 0.4}} for a subset."
            )
        props = dict(zip(CLASSES, class_proportions))
    else:
        raise ConfigError(f"class_proportions must be a dict {{class: proportion}} or a sequence; got {class_proportions!r}.")
    unknown = [k for k in props if k not in CLASSES]
    if unknown:
        raise ConfigError(f"class_proportions has unknown class {unknown[0]!r}; expected classes among {list(CLASSES)}.")
    for k, v in props.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"class_proportions[{k!r}] must be a finite number >= 0; got {v!r}.")
    total = float(sum(props.values()))
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"class_proportions must sum to 1; got {total:g} ({props}).")
    props = {k: float(props[k]) for k in CLASSES if k in props and props[k] > 0}

    if isinstance(n_cases, bool) or not isinstance(n_cases, (int, np.integer)):
        raise ConfigError(f"n_cases must be an integer; got {n_cases!r}.")
    if n_cases < len(props):
        raise ConfigError(
            f"n_cases must be at least the number of classes with a positive proportion ({len(props)}) "
            f"so that every class has a case; got {n_cases}."
        )
    for name, v, ok, expected in (
        ("signal", signal, lambda x: x >= 0, ">= 0"),
        ("missing_rate", missing_rate, lambda x: 0 <= x < 1, "in [0, 1)"),
        ("patients_with_two_images", patients_with_two_images, lambda x: 0 <= x <= 1, "in [0, 1]"),
    ):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise ConfigError(f"{name} must be a finite number {expected}; got {v!r}.")
        if not ok(v):
            raise ConfigError(f"{name} must be {expected}; got {v!r}.")
    if isinstance(n_centers, bool) or not isinstance(n_centers, (int, np.integer)) or n_centers < 1:
        raise ConfigError(f"n_centers must be an integer >= 1; got {n_centers!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer; got {seed!r}.")
    return h, w, props


def _allocate(n: int, props: dict[str, float]) -> dict[str, int]:
    """Largest-remainder allocation of ``n`` over the classes, every class at least 1."""
    names = list(props)
    raw = np.array([props[k] * n for k in names])
    counts = np.maximum(np.floor(raw).astype(int), 1)
    while counts.sum() > n:  # the minimum of 1 overshot: take from the most over-allocated class above 1
        over = np.where(counts > 1, counts - raw, -np.inf)
        counts[int(np.argmax(over))] -= 1
    rem = raw - counts
    while counts.sum() < n:
        i = int(np.argmax(rem))
        counts[i] += 1
        rem[i] -= 1
    return dict(zip(names, counts.tolist()))


# --------------------------------------------------------------------------------------------------
# the clinical table


def _blend(values: dict[str, float], labels: np.ndarray, s: float) -> np.ndarray:
    """Per-row ``middle + s * (class value - middle)``; the middle is the same for every row."""
    mid = float(np.mean([values[c] for c in CLASSES]))
    out = np.array([values[c] for c in labels], dtype=float)
    return mid + s * (out - mid)


def _p(values: dict[str, float], labels, s) -> np.ndarray:
    return np.clip(_blend(values, labels, s), 0.002, 0.998)


def _choice_rows(rng, probs: np.ndarray, cats: list[str]) -> np.ndarray:
    probs = np.clip(probs, 1e-6, None)
    probs = probs / probs.sum(axis=1, keepdims=True)
    cum = np.cumsum(probs, axis=1)
    idx = (rng.random((len(probs), 1)) > cum).sum(axis=1)
    return np.asarray(cats, dtype=object)[np.minimum(idx, len(cats) - 1)]


def _clinical_table(rng: np.random.Generator, labels: np.ndarray, s: float) -> pd.DataFrame:
    n = len(labels)
    L = labels
    z = rng.standard_normal

    age = np.clip(np.round(_blend({"normal": 47, "benign": 41, "malignant": 58}, L, s) + 11 * z(n)), 25, 85)
    age_c = age + 3 * z(n)
    meno = np.where(age_c < 46, "pre", np.where(age_c < 53, "peri", "post")).astype(object)
    bmi = np.clip(_blend({"normal": 25.6, "benign": 25.2, "malignant": 27.3}, L, s) * np.exp(0.16 * z(n)), 16, 50)
    fam = rng.random(n) < _p({"normal": 0.10, "benign": 0.12, "malignant": 0.27}, L, s)
    brca_p = np.stack([
        _blend({"normal": 0.50, "benign": 0.50, "malignant": 0.46}, L, s),
        _blend({"normal": 0.01, "benign": 0.01, "malignant": 0.07}, L, s),
        _blend({"normal": 0.01, "benign": 0.01, "malignant": 0.05}, L, s),
        np.full(n, 0.45),
    ], axis=1)
    brca_p[:, 1:3] *= np.where(fam, 2.5, 1.0)[:, None]  # mutations cluster in families
    brca_p[:, 3] *= np.where(fam, 0.5, 1.0)  # and those families get tested
    brca = _choice_rows(rng, brca_p, CATEGORIES["brca_mutation"])
    parity = np.minimum(rng.poisson(np.clip(_blend({"normal": 2.0, "benign": 1.8, "malignant": 1.4}, L, s), 0.2, None)), 8)
    menarche = np.clip(np.round(_blend({"normal": 12.9, "benign": 12.8, "malignant": 12.3}, L, s) + 1.3 * z(n)), 9, 17)
    afb = np.round(_blend({"normal": 25.5, "benign": 26.0, "malignant": 28.5}, L, s) + 4.5 * z(n))
    afb = np.clip(afb, 15, np.minimum(45, age)).astype(float)
    afb[parity == 0] = np.nan
    bf_mean = np.clip(_blend({"normal": 7.0, "benign": 6.5, "malignant": 4.0}, L, s), 0.5, None)
    bf = np.where(parity > 0, np.round(rng.gamma(1.5, bf_mean / 1.5) * np.maximum(parity, 1) ** 0.8), 0)
    hrt_p = _p({"normal": 0.12, "benign": 0.13, "malignant": 0.26}, L, s)
    hrt = (meno != "pre") & (rng.random(n) < hrt_p)
    oc_years = np.where(rng.random(n) < 0.7, rng.gamma(1.6, _blend({"normal": 3.5, "benign": 3.8, "malignant": 4.8}, L, s).clip(0.3) / 1.6), 0)
    oc_years = np.round(np.minimum(oc_years, age - 15), 1)
    smoke_p = np.stack([
        _blend({"normal": 0.60, "benign": 0.60, "malignant": 0.52}, L, s),
        np.full(n, 0.25),
        _blend({"normal": 0.15, "benign": 0.15, "malignant": 0.23}, L, s),
    ], axis=1)
    smoking = _choice_rows(rng, smoke_p, CATEGORIES["smoking_status"])
    alcohol = np.where(rng.random(n) < 0.35, 0.0,
                       _blend({"normal": 3.0, "benign": 3.0, "malignant": 4.8}, L, s).clip(0.3) * np.exp(0.8 * z(n)))
    alcohol = np.round(np.clip(alcohol, 0, 60), 1)
    prior_biopsy = rng.random(n) < _p({"normal": 0.06, "benign": 0.17, "malignant": 0.15}, L, s)
    lump = rng.random(n) < _p({"normal": 0.05, "benign": 0.55, "malignant": 0.72}, L, s)
    discharge = rng.random(n) < _p({"normal": 0.03, "benign": 0.07, "malignant": 0.14}, L, s)
    skin = rng.random(n) < _p({"normal": 0.01, "benign": 0.03, "malignant": 0.20}, L, s)
    pain = rng.random(n) < _p({"normal": 0.18, "benign": 0.34, "malignant": 0.14}, L, s)
    growth = rng.random(n) < _p({"normal": 0.02, "benign": 0.12, "malignant": 0.40}, L, s)
    symptomatic = lump | discharge | skin | pain | growth
    dur = _blend({"normal": 4.0, "benign": 10.0, "malignant": 7.0}, L, s).clip(0.5) * np.exp(0.9 * z(n))
    dur = np.round(np.where(symptomatic, np.clip(dur, 0.5, 520), 0.0), 1)
    dens_score = z(n) - (age - 50) / 14 + _blend({"normal": 0.0, "benign": 0.1, "malignant": 0.4}, L, s)
    density = np.asarray(CATEGORIES["breast_density"], dtype=object)[np.digitize(dens_score, [-1.3, -0.1, 1.1])]
    prev_bc = rng.random(n) < _p({"normal": 0.03, "benign": 0.03, "malignant": 0.08}, L, s)
    ethnicity = _choice_rows(rng, np.tile([0.55, 0.15, 0.15, 0.10, 0.05], (n, 1)), CATEGORIES["ethnicity"])
    activity = np.round(rng.gamma(2.0, _blend({"normal": 3.2, "benign": 3.2, "malignant": 2.4}, L, s).clip(0.3) / 2.0), 1)
    diab_p = _p({"normal": 0.08, "benign": 0.07, "malignant": 0.12}, L, s) * np.exp(0.09 * (bmi - 26)) * np.exp(0.03 * (age - 55))
    diabetes = rng.random(n) < np.clip(diab_p, 0.002, 0.9)

    # biomarkers: log-normal tumour markers, malignant shifted up by `signal`
    z153 = z(n)
    ca153 = _blend({"normal": 13.0, "benign": 14.0, "malignant": 21.0}, L, s).clip(1) * np.exp(0.5 * z153)
    ca2729 = _blend({"normal": 17.0, "benign": 18.0, "malignant": 26.0}, L, s).clip(1) * np.exp(0.5 * (0.8 * z153 + 0.6 * z(n)))
    cea = _blend({"normal": 1.6, "benign": 1.6, "malignant": 2.5}, L, s).clip(0.1) * np.where(smoking == "current", 1.7, 1.0) * np.exp(0.55 * z(n))
    her2 = _blend({"normal": 9.0, "benign": 9.2, "malignant": 11.5}, L, s).clip(1) * np.exp(0.3 * z(n))
    ldh = np.clip(_blend({"normal": 175, "benign": 177, "malignant": 197}, L, s) + 35 * z(n), 90, 600)
    alp = np.clip(_blend({"normal": 72, "benign": 72, "malignant": 80}, L, s) + 0.3 * (age - 50) + 20 * z(n), 25, 400)
    crp = _blend({"normal": 1.8, "benign": 2.0, "malignant": 3.0}, L, s).clip(0.1) * np.exp(0.05 * (bmi - 26)) * np.exp(0.9 * z(n))
    hb = np.clip(_blend({"normal": 13.4, "benign": 13.3, "malignant": 12.9}, L, s) + 1.0 * z(n), 8, 17)
    nlr = _blend({"normal": 1.8, "benign": 1.85, "malignant": 2.4}, L, s).clip(0.2) * np.exp(0.35 * z(n))
    vitd = np.clip(_blend({"normal": 29.0, "benign": 28.0, "malignant": 24.0}, L, s) + 9 * z(n), 4, 90)

    cols = {
        "age": age, "bmi": np.round(bmi, 1), "menopausal_status": meno, "family_history_breast_cancer": fam,
        "brca_mutation": brca, "parity": parity, "age_at_menarche": menarche, "age_first_birth": afb,
        "breastfeeding_months": bf, "hormone_therapy": hrt, "oral_contraceptive_years": oc_years,
        "smoking_status": smoking, "alcohol_units_week": alcohol, "prior_biopsy": prior_biopsy,
        "palpable_lump": lump, "nipple_discharge": discharge, "skin_changes": skin, "breast_pain": pain,
        "lesion_growth_reported": growth, "symptom_duration_weeks": dur, "breast_density": density,
        "previous_breast_cancer": prev_bc, "ethnicity": ethnicity, "physical_activity_hours_week": activity,
        "diabetes": diabetes,
        "ca15_3": np.round(ca153, 1), "cea": np.round(cea, 2), "ca27_29": np.round(ca2729, 1),
        "her2_serum": np.round(her2, 1), "ldh": np.round(ldh), "alkaline_phosphatase": np.round(alp),
        "crp": np.round(crp, 2), "hemoglobin": np.round(hb, 1), "neutrophil_lymphocyte_ratio": np.round(nlr, 2),
        "vitamin_d": np.round(vitd, 1),
    }
    assert list(cols) == CLINICAL_COLUMNS + BIOMARKER_COLUMNS
    return pd.DataFrame(cols)


def _typed(df: pd.DataFrame, missing: np.ndarray) -> pd.DataFrame:
    """Apply the missing-cell mask and give every column its declared dtype."""
    out = {}
    for j, col in enumerate(df.columns):
        kind = FEATURE_INFO[col]["kind"]
        miss = missing[:, j]
        vals = df[col].to_numpy()
        if kind == "boolean":
            arr = pd.array(vals.astype(bool), dtype="boolean")
            arr[miss] = pd.NA
        elif kind == "integer":
            f = vals.astype(float)
            f[miss] = np.nan
            arr = pd.array(np.where(np.isnan(f), 0, f).astype(np.int64), dtype="Int64")
            arr[np.isnan(f)] = pd.NA
        elif kind == "categorical":
            v = vals.astype(object)
            v[miss] = np.nan
            arr = v
        else:
            arr = vals.astype(float)
            arr[miss] = np.nan
        out[col] = arr
    return pd.DataFrame(out, index=df.index)


# --------------------------------------------------------------------------------------------------
# the ultrasound phantom


@functools.lru_cache(maxsize=64)
def _noise_filter(H: int, W: int, sy: float, sx: float) -> np.ndarray:
    from scipy import fft

    fy = fft.fftfreq(H)[:, None]
    fx = fft.rfftfreq(W)[None, :]
    return np.exp(-2 * np.pi**2 * ((sy * fy) ** 2 + (sx * fx) ** 2)).astype(np.float32)


def _smooth_noise(rng, shape, sigma) -> np.ndarray:
    """Gaussian-filtered white noise, rescaled to zero mean and unit standard deviation.

    Made in the Fourier domain (white noise has a white complex Gaussian spectrum), so the cost does
    not depend on ``sigma``; on a padded grid, cropped, so the result does not wrap around.
    """
    from scipy import fft

    sy, sx = (sigma, sigma) if np.isscalar(sigma) else sigma
    h, w = shape
    H = fft.next_fast_len(h + int(math.ceil(3 * sy)), real=True)
    W = fft.next_fast_len(w + int(math.ceil(3 * sx)), real=True)
    filt = _noise_filter(H, W, round(float(sy), 4), round(float(sx), 4))
    spec = rng.standard_normal((2, H, W // 2 + 1), dtype=np.float32)
    f = fft.irfft2((spec[0] + 1j * spec[1]) * filt, s=(H, W))[:h, :w]
    return ((f - f.mean()) / (f.std() + 1e-12)).astype(np.float32)


def _curve(rng, w: int, amp: float, waves: float) -> np.ndarray:
    """A smooth random horizontal curve (for tissue interfaces), values of order ``amp``."""
    x = np.linspace(0, 1, w)
    out = np.zeros(w)
    for k in range(1, 4):
        out += rng.uniform(0.3, 1.0) / k * np.sin(2 * np.pi * (waves * k * x + rng.random()))
    return amp * out / 1.2


def _step(x, width):
    return 0.5 * (1.0 + np.tanh(x / width))


def _tissue(rng, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Echogenicity map of normal breast tissue (before speckle), and the per-column muscle depth."""
    sc = min(h, w) / 128.0
    V = ((np.arange(h) + 0.5) / h)[:, None]
    skin_top = rng.uniform(0.0, 0.025)
    skin_th = rng.uniform(0.018, 0.03)
    fat_b = rng.uniform(0.15, 0.30) + _curve(rng, w, 0.035, rng.uniform(0.6, 1.5))
    gland_b = np.minimum(fat_b + rng.uniform(0.32, 0.45) + _curve(rng, w, 0.05, rng.uniform(0.5, 1.3)), 0.86)
    muscle_t = gland_b + rng.uniform(0.03, 0.07)
    ew = 0.012  # interface softness (fraction of depth)

    # subcutaneous fat: grey lobules separated by bright Cooper's ligaments
    lob = _smooth_noise(rng, (h, w), (4 * sc, 7 * sc))
    lig_field = _smooth_noise(rng, (h, w), (5 * sc, 8 * sc))
    lig = np.exp(-(lig_field / 0.12) ** 2)
    fat = 0.17 * (1 + 0.35 * np.tanh(lob)) + 0.45 * lig
    # fibroglandular tissue: horizontal-ish bright / dark layers
    bands = _smooth_noise(rng, (h, w), (1.3 * sc, 12 * sc))
    fine = _smooth_noise(rng, (h, w), (0.8 * sc, 3 * sc))
    ducts = np.exp(-((_smooth_noise(rng, (h, w), (2.5 * sc, 10 * sc)) - 2.0) / 0.5) ** 2)
    gland = 0.55 + 0.3 * np.tanh(1.6 * bands) + 0.08 * fine - 0.2 * ducts
    # retromammary fat, fascia and striated pectoral muscle
    rfat = 0.15 * (1 + 0.2 * lob)
    U = ((np.arange(w) + 0.5) / w)[None, :]
    warp = 0.8 * _smooth_noise(rng, (h, w), (6 * sc, 20 * sc)) + rng.uniform(-3, 3) * U
    stri = np.sin(2 * np.pi * (V * rng.uniform(12, 20) + warp))
    muscle = 0.24 + 0.1 * stri * (0.6 + 0.4 * np.tanh(_smooth_noise(rng, (h, w), (2 * sc, 8 * sc)))) + 0.04 * fine

    E = np.full((h, w), 0.06, dtype=np.float32)  # coupling gel / near field
    E = E + (0.95 - E) * _step(V - skin_top, 0.004)
    E = E + (0.18 - E) * _step(V - (skin_top + skin_th), 0.004)  # thin dark dermis interface
    E = E + (fat - E) * _step(V - (skin_top + skin_th + 0.012), 0.006)
    E = E + (gland - E) * _step(V - fat_b[None, :], ew)
    E = E + (rfat - E) * _step(V - gland_b[None, :], ew)
    E = E + (0.85 - E) * _step(V - muscle_t[None, :], 0.004)  # pectoral fascia
    E = E + (muscle - E) * _step(V - (muscle_t[None, :] + 0.015), 0.004)
    return np.clip(E, 0.02, None).astype(np.float32), muscle_t


def _lesion_params(rng, label: str, s: float, h: int, w: int, u=None, v=None, R=None) -> dict:
    """Draw one lesion's appearance; class-specific values are blended toward the middle by ``s``."""
    lab = np.array([label])

    def b(vals):
        return float(_blend(vals, lab, s)[0])

    L = min(h, w)
    if R is None:
        R = float(np.clip(0.12 * np.exp(0.3 * rng.standard_normal()), 0.06, 0.24)) * L
    log_aspect = b({"benign": math.log(1.7), "malignant": math.log(0.8), "normal": math.log(1.25)}) + 0.18 * rng.standard_normal()
    aspect = float(np.clip(math.exp(log_aspect), 0.45, 2.6))  # width / height
    lob_amp = max(0.0, b({"benign": 0.04, "malignant": 0.10, "normal": 0.07})) * rng.uniform(0.4, 1.4)
    ang_amp = max(0.0, b({"benign": 0.004, "malignant": 0.10, "normal": 0.05})) * rng.uniform(0.5, 1.5)
    n_spic = int(rng.poisson(max(0.0, b({"benign": 0.0, "malignant": 7.0, "normal": 3.5}))))
    spic_amp = max(0.0, b({"benign": 0.0, "malignant": 0.32, "normal": 0.16}))
    ks = np.arange(2, 15)
    amps = np.where(ks <= 4, lob_amp / (ks - 1), ang_amp * (5.0 / ks) ** 0.7) * rng.uniform(0.3, 1.0, len(ks))
    return {
        "u": rng.uniform(0.3, 0.7) if u is None else u,
        "v": rng.uniform(0.33, 0.52) if v is None else v,
        "R": R,
        "aspect": aspect,
        "tilt": 0.18 * rng.standard_normal(),
        "k": ks,
        "amps": amps,
        "phases": rng.uniform(0, 2 * np.pi, len(ks)),
        "spic_theta": rng.uniform(-np.pi, np.pi, n_spic),
        "spic_amp": spic_amp * rng.uniform(0.5, 1.2, n_spic),
        "spic_width": rng.uniform(0.03, 0.07, n_spic),
        "edge": max(0.02, b({"benign": 0.03, "malignant": 0.13, "normal": 0.08})),
        "level": float(np.clip(b({"benign": 0.11, "malignant": 0.05, "normal": 0.08}) * math.exp(0.2 * rng.standard_normal()), 0.015, 0.2)),
        "hetero": max(0.0, b({"benign": 0.12, "malignant": 0.6, "normal": 0.36})),
        "halo": max(0.0, b({"benign": 0.0, "malignant": 0.55, "normal": 0.27})) * rng.uniform(0.3, 1.2),
        "capsule": max(0.0, b({"benign": 0.5, "malignant": 0.0, "normal": 0.25})) * rng.uniform(0.4, 1.2),
        "post": float(np.clip(b({"benign": 1.1, "malignant": -0.75, "normal": 0.18}) + 0.25 * rng.standard_normal(), -0.92, 1.6)),
        "edge_shadow": max(0.0, b({"benign": 0.45, "malignant": 0.0, "normal": 0.22})) * rng.uniform(0.0, 1.0),
        "n_calc": int(rng.poisson(max(0.0, b({"benign": 0.2, "malignant": 3.5, "normal": 1.8})))),
        "vis": float(min(max(s, 0.0), 1.0)),
    }


def _jitter_view(rng, lesions: list[dict]) -> list[dict]:
    """The same lesion(s) in another image of the same patient: moved, slightly changed shape, new speckle."""
    du = rng.uniform(0.3, 0.7) - lesions[0]["u"]
    dv = rng.uniform(0.33, 0.52) - lesions[0]["v"]
    out = []
    for p in lesions:
        q = dict(p)
        q["u"] = float(np.clip(p["u"] + du, 0.12, 0.88))
        q["v"] = float(np.clip(p["v"] + dv, 0.25, 0.6))
        q["R"] = p["R"] * math.exp(0.08 * rng.standard_normal())
        q["aspect"] = float(np.clip(p["aspect"] * math.exp(0.1 * rng.standard_normal()), 0.45, 2.6))
        q["tilt"] = p["tilt"] + 0.15 * rng.standard_normal()
        q["phases"] = p["phases"] + 0.3 * rng.standard_normal(len(p["phases"]))
        q["spic_theta"] = p["spic_theta"] + 0.1 * rng.standard_normal(len(p["spic_theta"]))
        out.append(q)
    return out


def _draw_lesion(rng, E: np.ndarray, p: dict) -> np.ndarray:
    """Composite one lesion into the echogenicity map ``E`` (in place); return its boolean mask."""
    h, w = E.shape
    sc = min(h, w) / 128.0
    Y, X = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = Y - p["v"] * h, X - p["u"] * w
    c, s_ = math.cos(p["tilt"]), math.sin(p["tilt"])
    xr, yr = c * dx + s_ * dy, -s_ * dx + c * dy
    rho = np.hypot(xr, yr)
    th = np.arctan2(yr, xr)
    a = p["R"] * math.sqrt(p["aspect"])
    b = p["R"] / math.sqrt(p["aspect"])
    # the boundary radius depends on the angle only: tabulate it, then interpolate per pixel
    tt = np.linspace(-np.pi, np.pi, 1441)
    r_t = a * b / np.sqrt((b * np.cos(tt)) ** 2 + (a * np.sin(tt)) ** 2)
    mod = np.zeros_like(tt)
    for k, amp, ph in zip(p["k"], p["amps"], p["phases"]):
        mod += amp * np.cos(k * tt + ph)
    for t0, amp, wd in zip(p["spic_theta"], p["spic_amp"], p["spic_width"]):
        dd = np.angle(np.exp(1j * (tt - t0)))
        mod += amp * np.exp(-0.5 * (dd / wd) ** 2)
    r = np.interp(th, tt, r_t * np.clip(1.0 + mod, 0.55, None)).astype(np.float32)
    d = rho / np.maximum(r, 1e-3)
    mask = d <= 1.0
    if not mask.any():  # a tiny lesion on a small image: keep at least its centre pixel
        mask[min(int(p["v"] * h), h - 1), min(int(p["u"] * w), w - 1)] = True
    inside = 0.5 * (1.0 - np.tanh((d - 1.0) / p["edge"]))
    vis = p["vis"]

    # interior: hypoechoic, heterogeneous for malignant, with a few bright micro-calcifications
    tex = _smooth_noise(rng, (h, w), 2.0 * sc)
    interior = p["level"] * np.exp(p["hetero"] * tex)
    if p["n_calc"]:
        idx = np.flatnonzero(mask.ravel())
        if idx.size:
            pts = rng.choice(idx, size=min(p["n_calc"], idx.size), replace=False)
            calc = np.zeros(h * w, dtype=np.float32)
            calc[pts] = 1.0
            calc = ndi.gaussian_filter(calc.reshape(h, w), 0.6 * sc) * (2 * np.pi * (0.6 * sc) ** 2)
            interior = interior + 0.9 * np.clip(calc, 0, 1)
    E_orig = E.copy()
    # blend in the log (dB) domain, so the displayed contrast scales linearly with the conspicuity
    wgt = vis * inside
    E[:] = np.exp((1.0 - wgt) * np.log(np.maximum(E, 1e-4)) + wgt * np.log(np.maximum(interior, 1e-4)))

    # margin: thin bright capsule (benign) or thick echogenic halo (malignant)
    cap = np.exp(-(((d - 1.0) / 0.06) ** 2))
    halo = np.exp(-(((d - 1.18) / 0.18) ** 2)) * (d > 1.0)
    E *= (1.0 + p["capsule"] * cap + p["halo"] * halo) ** vis

    # posterior acoustic enhancement (> 0) or shadowing (< 0) along the beam (columns), below the lesion
    col = inside.sum(axis=0)
    frac = np.cumsum(inside, axis=0) / (col[None, :] + 1e-6)
    colw = np.clip(col / (0.6 * col.max() + 1e-6), 0, 1)
    colw = ndi.gaussian_filter1d(colw, 1.0 * sc)
    depth_below = np.clip((Y / h) - p["v"], 0, None)
    fade = np.exp(-depth_below / 0.6)
    post = p["post"] * frac * colw[None, :] * fade * (1.0 - inside)
    # lateral edge (refractive) shadows: narrow dark columns at the lesion's sides
    edge = 4 * colw * (1 - colw)
    E *= np.clip(1.0 + post - p["edge_shadow"] * edge[None, :] * frac * fade, 0.04, None) ** vis
    # keep the background tissue untouched where the lesion has no influence (numerical hygiene)
    np.copyto(E, E_orig, where=(inside < 1e-4) & (col[None, :] < 1e-4))
    return mask


def _speckle(rng, E: np.ndarray) -> np.ndarray:
    """Multiplicative Rayleigh speckle (magnitude of smoothed complex Gaussian noise, mean 1)."""
    h, w = E.shape
    sc = min(h, w) / 128.0
    g = rng.standard_normal((2, h, w)).astype(np.float32)
    g = ndi.gaussian_filter(g, (0, 0.45 * sc + 0.25, 1.0 * sc + 0.3))
    amp = np.hypot(g[0], g[1])
    I = E * amp / amp.mean()
    return ndi.gaussian_filter(I, (0.4 * sc + 0.2, 0.6 * sc + 0.2))


def _to_display(I: np.ndarray, gain: float, gamma: float, rng) -> np.ndarray:
    dr = 40.0  # dynamic range, dB
    db = 20 * np.log10(np.maximum(I, 1e-6) / 2.2)
    out = np.clip((db + dr) / dr, 0, 1)
    out = np.clip(gain * out ** gamma + 0.01 * rng.standard_normal(out.shape), 0, 1)
    return out.astype(np.float32)


def _fan(img: np.ndarray, masks: list[np.ndarray], h: int, w: int, rng) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Scan-convert a rectangular (lateral x depth) frame to a curvilinear sector on an h x w canvas."""
    hc, wc = img.shape
    half = rng.uniform(0.45, 0.62)  # half opening angle, radians
    r1 = h - 1.0
    r0 = rng.uniform(0.3, 0.5) * h
    # apex above the image so the far arc spans most of the width
    apex_y = -r0 * 0.9
    r0_eff = r0 * 0.9
    r1_eff = r1 - apex_y
    Y, X = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = X - (w - 1) / 2.0, Y - apex_y
    rad = np.hypot(dx, dy)
    ang = np.arctan2(dx, dy)
    # fit the lateral extent to the canvas width
    half = min(half, math.asin(min(0.999, (w / 2.0 - 1) / r1_eff)))
    uu = (ang / half + 1.0) / 2.0 * (wc - 1)
    vv = (rad - r0_eff) / (r1_eff - r0_eff) * (hc - 1)
    fov = (uu >= 0) & (uu <= wc - 1) & (vv >= 0) & (vv <= hc - 1)
    coords = np.stack([vv, uu])
    out = ndi.map_coordinates(img, coords, order=1, mode="constant", cval=0.0) * fov
    outm = []
    for m in masks:
        mf = ndi.map_coordinates(m.astype(np.float32), coords, order=1, mode="constant") * fov
        outm.append(mf >= 0.5 if (mf >= 0.5).any() else (mf > 0) & (mf == mf.max()))
    return out, outm, fov


def _render(rng, h: int, w: int, lesions: list[dict], gain: float, gamma: float, fan: bool):
    """One phantom image (float [0, 1], h x w) and one boolean mask per lesion."""
    if fan:
        hc, wc = h, w
    else:  # rectangular field of view inside a black frame
        top = int(round(rng.uniform(0.0, 0.07) * h))
        bot = int(round(rng.uniform(0.0, 0.05) * h))
        left = int(round(rng.uniform(0.0, 0.09) * w))
        right = int(round(rng.uniform(0.0, 0.09) * w))
        hc, wc = h - top - bot, w - left - right
    E, _ = _tissue(rng, hc, wc)
    masks = [_draw_lesion(rng, E, p) for p in lesions]
    depth = ((np.arange(hc) + 0.5) / hc)[:, None]
    att = rng.uniform(1.0, 1.8)
    E = E * np.exp(-att * depth) * (1.0 + 0.6 * att * depth)  # attenuation, partly compensated by TGC
    lateral = ((np.arange(wc) + 0.5) / wc)[None, :]
    E = E * (1.0 - 0.15 * (2 * lateral - 1) ** 4)  # mild lateral fall-off
    img = _to_display(_speckle(rng, E), gain, gamma, rng)
    if fan:
        img, masks, fov = _fan(img, masks, h, w, rng)
    else:
        canvas = np.zeros((h, w), dtype=np.float32)
        canvas[top:top + hc, left:left + wc] = img
        img = canvas
        full = []
        for m in masks:
            mm = np.zeros((h, w), dtype=bool)
            mm[top:top + hc, left:left + wc] = m
            full.append(mm)
        masks = full
        fov = np.zeros((h, w), dtype=bool)
        fov[top:top + hc, left:left + wc] = True
    # depth-scale ticks in the frame, as on real scanner exports
    if (~fov[:, -2]).all() and w >= 48:
        ticks = np.arange(int(0.1 * h), h, max(4, h // 8))
        img[ticks, -3:-1] = 0.8
    return np.clip(img, 0, 1), masks


# --------------------------------------------------------------------------------------------------
# the cohort


def _patients(rng, labels_by_case: np.ndarray, frac_two: float) -> np.ndarray:
    """Group cases into patients: pairs of same-label cases share a patient. Returns patient index per case."""
    n = len(labels_by_case)
    n_pairs_target = int(round(n * frac_two / (1.0 + frac_two)))
    classes, counts = np.unique(labels_by_case, return_counts=True)
    max_pairs = {c: k // 2 for c, k in zip(classes, counts)}
    alloc = {c: 0 for c in classes}
    # spread the pairs over classes in proportion to their size
    for _ in range(n_pairs_target):
        free = [c for c in classes if alloc[c] < max_pairs[c]]
        if not free:
            break
        c = max(free, key=lambda c: counts[list(classes).index(c)] / (1 + 2 * alloc[c]) - 1e-9 * list(classes).index(c))
        alloc[c] += 1
    patient = np.full(n, -1)
    pid = 0
    order = rng.permutation(n)
    pending = dict(alloc)
    first_of = {}
    for i in order:
        c = labels_by_case[i]
        if pending[c] > 0:
            if c in first_of:
                patient[i] = patient[first_of.pop(c)]
                pending[c] -= 1
                continue
            first_of[c] = i
        patient[i] = pid
        pid += 1
    return patient


def make_synthetic_cohort(
    out_dir: str | Path,
    *,
    n_cases: int = 120,
    image_size: int | tuple[int, int] = 128,
    class_proportions: Mapping[str, float] | Sequence[float] | None = None,
    signal: float = 1.0,
    missing_rate: float = 0.1,
    n_centers: int = 2,
    patients_with_two_images: float = 0.1,
    seed: int = 0,
) -> pd.DataFrame:
    """Write a synthetic cohort under ``out_dir`` and return its cases table (absolute paths).

    Parameters
    ----------
    n_cases : number of images (rows), at least the number of classes.
    image_size : side in pixels, or ``(height, width)``.
    class_proportions : ``{class: proportion}`` over ``benign`` / ``malignant`` / ``normal`` (a subset is
        allowed, e.g. a binary cohort), or three numbers in that order; must sum to 1.
        Default 0.5 / 0.3 / 0.2. Counts are allocated exactly (largest remainder), each class >= 1.
    signal : >= 0. How distinct the classes are, in images and clinical data alike: 0 = labels
        independent of every feature, 1 = realistic, > 1 = exaggerated.
    missing_rate : in [0, 1); fraction of clinical / biomarker cells emptied completely at random
        (``age_first_birth`` is also empty for nulliparous patients).
    n_centers : centres ``synthetic_center_0`` ...; each has its own mild gain / contrast and probe mix.
    patients_with_two_images : fraction of patients with two images (same label, same clinical row,
        another view of the same lesion).
    seed : everything is a deterministic function of the arguments.

    Writes ``images/``, ``masks/``, ``cases.csv`` and ``SYNTHETIC.md``. Files of an earlier synthetic
    cohort in the same folder (``syn_*``) are removed first; other files are left alone.
    """
    h, w, props = _check_args(n_cases, image_size, class_proportions, signal, missing_rate, n_centers,
                              patients_with_two_images, seed)
    n_cases = int(n_cases)
    s = float(signal)
    out_dir = Path(out_dir)
    img_dir, mask_dir = out_dir / "images", out_dir / "masks"
    if (out_dir / "SYNTHETIC.md").is_file():
        for d in (img_dir, mask_dir):
            for f in d.glob("syn_*.png") if d.is_dir() else ():
                f.unlink()
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)

    ss = np.random.SeedSequence([int(seed), 0x5B05])
    rng_cohort, rng_clin, rng_missing, rng_centers = (np.random.default_rng(x) for x in ss.spawn(4))
    case_seeds = ss.spawn(1)[0]

    counts = _allocate(n_cases, props)
    labels = np.concatenate([[c] * k for c, k in counts.items()]).astype(object)
    labels = labels[rng_cohort.permutation(n_cases)]
    patient = _patients(rng_cohort, labels, float(patients_with_two_images))
    n_pat = int(patient.max()) + 1
    pat_label = np.empty(n_pat, dtype=object)
    pat_label[patient] = labels
    pat_center = rng_cohort.integers(0, n_centers, n_pat)
    if n_pat >= n_centers:  # every centre gets at least one patient
        pat_center[rng_cohort.permutation(n_pat)[:n_centers]] = np.arange(n_centers)

    # centre effects: gain, display gamma, share of sector (curvilinear) probes
    c_gain = 1.0 + 0.08 * rng_centers.standard_normal(n_centers)
    c_gamma = np.exp(0.08 * rng_centers.standard_normal(n_centers))
    c_fan = rng_centers.uniform(0.0, 0.5, n_centers)
    c_gain[0], c_gamma[0] = 1.0, 1.0  # centre 0 is the reference

    clin = _clinical_table(rng_clin, pat_label, s)
    missing = rng_missing.random(clin.shape) < float(missing_rate)
    clin = _typed(clin, missing)

    width = max(4, len(str(n_cases)))
    case_ids = [f"syn_{i:0{width}d}" for i in range(n_cases)]
    patient_ids = [f"synp_{p:0{width}d}" for p in patient]
    crng = [np.random.default_rng(x) for x in case_seeds.spawn(n_cases)]
    # lesion parameters are drawn per patient so that a second image shows the same lesion
    lesion_of_patient: dict[int, list[dict]] = {}
    image_paths, mask_paths = [], []
    for i in range(n_cases):
        r = crng[i]
        lab, p = labels[i], int(patient[i])
        k = int(pat_center[p])
        if lab == "normal":
            lesions = []
        elif p in lesion_of_patient:
            lesions = _jitter_view(r, lesion_of_patient[p])
        else:
            first = _lesion_params(r, lab, s, h, w)
            lesions = [first]
            if r.random() < 0.05:  # a second, smaller lesion on the other side
                u2 = float(np.clip(1.0 - first["u"] + r.uniform(-0.08, 0.08), 0.2, 0.8))
                if abs(u2 - first["u"]) * w < 1.5 * first["R"] + 0.1 * w:
                    u2 = 0.2 if first["u"] > 0.5 else 0.8
                lesions.append(_lesion_params(r, lab, s, h, w, u=u2, R=first["R"] * r.uniform(0.45, 0.7)))
            lesion_of_patient[p] = lesions
        img, masks = _render(r, h, w, lesions, float(c_gain[k]), float(c_gamma[k]), bool(r.random() < c_fan[k]))
        u8 = np.round(img * 255).astype(np.uint8)
        ip = img_dir / f"{case_ids[i]}.png"
        _save_png(ip, np.repeat(u8[..., None], 3, axis=2) if r.random() < 0.15 else u8)
        if not masks:
            masks = [np.zeros((h, w), dtype=bool)]
        mps = []
        for j, m in enumerate(masks):
            mp = mask_dir / (f"{case_ids[i]}_mask.png" if j == 0 else f"{case_ids[i]}_mask_{j}.png")
            _save_png(mp, m.astype(np.uint8) * 255)
            mps.append(str(mp.resolve()))
        image_paths.append(str(ip.resolve()))
        mask_paths.append(MASK_SEP.join(mps))

    cases = pd.DataFrame({
        "case_id": case_ids,
        "patient_id": patient_ids,
        "center": [f"synthetic_center_{int(pat_center[p])}" for p in patient],
        "label": labels.astype(str),
        "image_path": image_paths,
        "mask_path": mask_paths,
    })
    cases = pd.concat([cases, clin.iloc[patient].reset_index(drop=True)], axis=1)
    cases[SYNTHETIC_COLUMN] = True
    write_cases(cases, out_dir / "cases.csv")
    _write_notice(out_dir / "SYNTHETIC.md", cases, dict(
        n_cases=n_cases, image_size=(h, w), class_proportions=props, signal=s, missing_rate=float(missing_rate),
        n_centers=int(n_centers), patients_with_two_images=float(patients_with_two_images), seed=int(seed),
    ))
    return cases


def _save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path, optimize=False, compress_level=1)


def _write_notice(path: Path, cases: pd.DataFrame, params: dict) -> None:
    from breastfusion.utils import write_text

    counts = cases["label"].value_counts().to_dict()
    n_masks2 = int(cases["mask_path"].str.contains(MASK_SEP, regex=False).sum())
    lines = [
        f"# {SYNTHETIC_TAG} DATA - not real patients",
        "",
        "Everything in this folder was generated by `breastfusion.data.synthetic.make_synthetic_cohort`.",
        "The images are procedural ultrasound phantoms, the masks mark the drawn lesions, and the clinical",
        "and biomarker values are random draws from plausible, made-up distributions. No person is described.",
        "",
        "Use it for demos, tests and pipeline checks only. A model trained or evaluated on it says nothing",
        "about real patients; results, reports and model bundles derived from it must be labelled "
        f"`{SYNTHETIC_TAG}` (every row carries `{SYNTHETIC_COLUMN} = True`).",
        "",
        "## Parameters",
        "",
        *[f"- `{k}`: {v}" for k, v in params.items()],
        f"- generator version: {GENERATOR_VERSION}",
        "",
        "## Contents",
        "",
        f"- {len(cases)} images from {cases['patient_id'].nunique()} patients in {cases['center'].nunique()} centres",
        "- labels: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        f"- {n_masks2} images with a second lesion mask",
        f"- {len(CLINICAL_COLUMNS)} clinical-history and {len(BIOMARKER_COLUMNS)} biomarker columns "
        "(see `FEATURE_INFO` for units)",
        "",
        "`signal` scales every class difference (images and table): 0 = labels independent of the features.",
        "",
    ]
    write_text("\n".join(lines), path)
