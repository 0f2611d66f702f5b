"""Calibrated probabilities (temperature scaling) and split-conformal prediction sets.

Two small, JSON-serialisable post-hoc calibrators that work on the probabilities a model already outputs
(bundles store softmax outputs, so everything here starts from probabilities; logits are accepted too):

* :class:`TemperatureScaler` fits one temperature ``T > 0`` by minimising the negative log-likelihood on a
  calibration set: ``softmax(log(p) / T)``. ``T > 1`` softens over-confident probabilities, ``T < 1``
  sharpens under-confident ones. The arg-max (the predicted class) never changes.
* :class:`ConformalClassifier` turns probabilities into *prediction sets* that contain the true class with
  probability at least ``1 - alpha`` (marginally, over exchangeable cases) by split-conformal calibration:
  a conformity score is computed for each calibration case's true class and the finite-sample quantile
  ``ceil((n + 1)(1 - alpha)) / n`` of those scores is the threshold. Three scores:

  - ``"lac"`` (least ambiguous set-valued classifier, Sadinle et al. 2019): ``1 - p_y``. Smallest sets on
    average, but coverage can be uneven across classes.
  - ``"aps"`` (adaptive prediction sets, Romano, Sesia & Candès 2020): the probability mass of the classes
    ranked above ``y`` plus ``p_y`` (times ``U ~ Uniform(0, 1)`` when ``randomized``). Sets grow with the
    model's uncertainty.
  - ``"raps"`` (regularised APS, Angelopoulos et al. 2021): APS plus ``lam * max(0, rank(y) - k_reg)``,
    which penalises long tails of unlikely classes.

  The default is *non-randomised* (``randomized=False``) so that the same input always gives the same
  set. Non-randomised APS/RAPS are still valid (coverage ``>= 1 - alpha``) but conservative: the whole
  mass of the last class included counts, and the top class is always included, so empirical coverage is
  usually somewhat *above* ``1 - alpha`` and sets are larger than the randomised version's. The randomised
  version is close to exact ``1 - alpha`` (still forced to hold the top class, so never empty).

Every set holds at least one class: the top class is added when the threshold would leave the set empty.

The bundle calibration fits both on a model's cross-validation out-of-fold predictions and stores them in
``bundle.json`` (:func:`fit_bundle_calibration`); :func:`apply_bundle_calibration` applies them to new
probabilities and :func:`calibration_status` says whether a bundle's probabilities are calibrated. Cross-fitted
calibration of a whole out-of-fold table and its coverage report: :mod:`breastfusion.evaluation.coverage`.

Caveat: the coverage guarantee assumes the calibration cases and the new cases are exchangeable (same
population, same scanner mix, same model). A shift in the case mix (another hospital) voids the guarantee until
the calibrators are refitted on that population.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from breastfusion.errors import DataError
from breastfusion.evaluation.metrics import SUM_TOLERANCE, _as_class_name

log = logging.getLogger(__name__)

SET_SEPARATOR = "|"
METHODS = ("aps", "raps", "lac")
#: Probabilities are clipped to this before taking logs (exact zeros occur, e.g. random forests).
LOG_EPS = 1e-12
#: Bounds of the temperature search (on log T).
T_BOUNDS = (1e-2, 1e2)
#: A fitted log T this close to log of either bound is an optimum the search did not find but ran into: the
#: likelihood was still improving at the bound (e.g. out-of-fold predictions that make no error, where it keeps
#: improving as T -> 0 and would push every probability to 0 or 1). Such a fit is refused (T stays 1).
T_BOUND_MARGIN = 0.05
CALIBRATED, UNCALIBRATED = "calibrated", "uncalibrated"
#: Slack when comparing a test score with the calibrated threshold (float round-off of cumulative sums).
_SCORE_TOL = 1e-12


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------


def _check_scores(X, name: str = "probs", *, from_logits: bool = False, n_classes: int | None = None) -> np.ndarray:
    """A finite (n, K) float array; probabilities must lie in [0, 1] and sum to 1 per row."""
    try:
        A = np.asarray(X, dtype=float)
    except (TypeError, ValueError) as e:
        raise DataError(f"{name} must be a numeric (n_cases, n_classes) array: {e}") from None
    if A.ndim != 2:
        raise DataError(f"{name} must be a 2-D (n_cases, n_classes) array; got shape {A.shape}.")
    if A.shape[0] == 0:
        raise DataError(f"{name} is empty: no cases to calibrate on or to transform.")
    if A.shape[1] < 2:
        raise DataError(f"{name} must have at least two class columns; got {A.shape[1]}.")
    if n_classes is not None and A.shape[1] != n_classes:
        raise DataError(f"{name} has {A.shape[1]} class columns but the calibrator was fitted on {n_classes}.")
    bad = ~np.isfinite(A)
    if bad.any():
        i, k = (int(v) for v in np.argwhere(bad)[0])
        rows = int(bad.any(axis=1).sum())
        raise DataError(
            f"{name}, row index {i} (0-based), class column {k}: value is {A[i, k]!r}; every "
            f"{'logit' if from_logits else 'probability'} must be a finite number ({rows} such row(s))."
        )
    if not from_logits:
        out = (A < -SUM_TOLERANCE) | (A > 1 + SUM_TOLERANCE)
        if out.any():
            i, k = (int(v) for v in np.argwhere(out)[0])
            raise DataError(
                f"{name}, row index {i} (0-based), class column {k}: probability {A[i, k]!r} is outside [0, 1]"
                " (pass from_logits=True for logits)."
            )
        sums = A.sum(axis=1)
        off = np.abs(sums - 1.0) > SUM_TOLERANCE
        if off.any():
            i = int(np.flatnonzero(off)[0])
            raise DataError(
                f"{name}, row index {i} (0-based): probabilities sum to {sums[i]:.6g}, not 1 ({int(off.sum())} "
                "such row(s)); pass softmax probabilities over all classes (or from_logits=True for logits)."
            )
        A = np.clip(A, 0.0, 1.0)
        A = A / A.sum(axis=1, keepdims=True)
    return A


def _check_labels(y, n: int, K: int, classes: list[str] | None, name: str = "y") -> np.ndarray:
    """Integer class codes 0..K-1 from integer labels, or from class names when ``classes`` is given."""
    vals = list(y.tolist() if isinstance(y, (np.ndarray, pd.Series, pd.Index)) else y)
    if len(vals) != n:
        raise DataError(f"{name} has {len(vals)} labels but there are {n} rows of probabilities.")
    code = {c: k for k, c in enumerate(classes)} if classes is not None else None
    out = np.empty(n, dtype=np.int64)
    for i, v in enumerate(vals):
        label = _as_class_name(v)
        if label is None:
            raise DataError(f"{name}, row index {i} (0-based): label is empty (NaN/None); it must name a class.")
        if code is not None:
            if label not in code:
                raise DataError(
                    f"{name}, row index {i} (0-based): unknown class '{label}'; expected one of {classes}."
                )
            out[i] = code[label]
        else:
            try:
                k = int(label)
            except ValueError:
                raise DataError(
                    f"{name}, row index {i} (0-based): label '{label}' is not an integer class index; pass "
                    "integer labels 0..K-1 or the class names with classes=[...]."
                ) from None
            if not 0 <= k < K:
                raise DataError(
                    f"{name}, row index {i} (0-based): label {k} is outside the classes 0..{K - 1}."
                )
            out[i] = k
    return out


def _check_classes(classes, K: int) -> list[str] | None:
    if classes is None:
        return None
    names = [_as_class_name(c) for c in classes]
    if any(c is None for c in names) or len(set(names)) != len(names):
        raise DataError(f"The class list {list(classes)} has an empty or repeated class name.")
    if len(names) != K:
        raise DataError(f"The class list {names} names {len(names)} classes but the probabilities have {K} columns.")
    return names


def _log_probs(P: np.ndarray) -> np.ndarray:
    return np.log(np.clip(P, LOG_EPS, 1.0))


def _softmax(Z: np.ndarray) -> np.ndarray:
    Z = Z - Z.max(axis=1, keepdims=True)
    E = np.exp(Z)
    return E / E.sum(axis=1, keepdims=True)


def _nll(Z: np.ndarray, y: np.ndarray, T: float) -> float:
    S = Z / T
    return float(np.mean(logsumexp(S, axis=1) - S[np.arange(len(y)), y]))


def _n_errors(Z: np.ndarray, y: np.ndarray) -> int:
    """Rows whose true class scores strictly below the row's best class (ties are no error: their likelihood
    stays bounded as T -> 0)."""
    return int((Z.max(axis=1) > Z[np.arange(len(y)), y] + 1e-12).sum())


# ---------------------------------------------------------------------------------------------------------
# Temperature scaling
# ---------------------------------------------------------------------------------------------------------


class TemperatureScaler:
    """One temperature ``T`` for all classes, fitted by minimum negative log-likelihood (Guo et al. 2017).

    ``fit(probs, y)`` works from probabilities (their logs are the logits up to a per-row constant, which
    softmax ignores) or, with ``from_logits=True``, from logits. The search is a bounded 1-D minimisation
    over ``log T`` in ``log(T_BOUNDS)``. ``transform(probs)`` returns ``softmax(log(probs) / T)``.

    An optimum at (or within :data:`T_BOUND_MARGIN` of) a search bound is no optimum: the likelihood was still
    improving there. That happens when the calibration predictions make no error (the likelihood improves
    without end as ``T -> 0``, pushing probabilities to 0 and 1) or are worse than chance (``T -> inf``). Then
    ``T`` stays 1, ``status_`` is ``"uncalibrated"`` and ``reason_`` says why (logged as a warning too):
    :meth:`transform` returns the probabilities unchanged.

    Attributes after fitting: ``temperature_``, ``status_`` (``"calibrated"`` or ``"uncalibrated"``),
    ``reason_`` (None when calibrated), ``n_errors_`` (calibration cases whose true class is not the top
    class), ``n_cal_``, ``nll_before_`` (at T = 1), ``nll_after_``, ``classes_`` (names, when given) and
    ``n_classes_``.
    """

    KIND = "temperature_scaling"

    def __init__(self) -> None:
        self.temperature_: float | None = None
        self.n_cal_: int = 0
        self.nll_before_: float | None = None
        self.nll_after_: float | None = None
        self.classes_: list[str] | None = None
        self.n_classes_: int | None = None
        self.status_: str = CALIBRATED
        self.reason_: str | None = None
        self.n_errors_: int | None = None

    def fit(self, probs, y, *, classes: list[str] | None = None, from_logits: bool = False) -> TemperatureScaler:
        A = _check_scores(probs, "probs", from_logits=from_logits)
        n, K = A.shape
        names = _check_classes(classes, K)
        codes = _check_labels(y, n, K, names)
        Z = A if from_logits else _log_probs(A)
        lo, hi = (math.log(b) for b in T_BOUNDS)
        res = minimize_scalar(lambda t: _nll(Z, codes, math.exp(t)), bounds=(lo, hi), method="bounded",
                              options={"xatol": 1e-6})
        T = float(math.exp(res.x))
        before, after = _nll(Z, codes, 1.0), _nll(Z, codes, T)
        n_err = _n_errors(Z, codes)
        reason = None
        if n_err == 0:
            reason = (f"the {n} calibration prediction(s) make no error (the true class is always the top class), "
                      "so the fit has no finite optimum: it would push every probability to 0 or 1")
        elif min(abs(res.x - lo), abs(res.x - hi)) < T_BOUND_MARGIN:
            bound = T_BOUNDS[0] if abs(res.x - lo) < abs(res.x - hi) else T_BOUNDS[1]
            reason = (f"the fitted temperature ran to the search bound T = {bound:g} (no finite optimum in "
                      f"[{T_BOUNDS[0]:g}, {T_BOUNDS[1]:g}]; {n_err} of {n} calibration predictions are errors)"
                      + ("; the predictions look worse than chance" if bound == T_BOUNDS[1] else ""))
        if reason is not None:
            # info here: the callers (bundle, cross-fold table) warn once with where it happened
            log.info("temperature scaling not applied (T kept at 1, probabilities uncalibrated): %s", reason)
            T, after = 1.0, before
        elif before <= after:  # T = 1 is at least as good (e.g. an already calibrated model): keep it
            T, after = 1.0, before
        self.temperature_, self.n_cal_ = T, int(n)
        self.nll_before_, self.nll_after_ = before, after
        self.classes_, self.n_classes_ = names, int(K)
        self.status_, self.reason_, self.n_errors_ = (UNCALIBRATED if reason else CALIBRATED), reason, n_err
        return self

    @property
    def calibrated(self) -> bool:
        """False when the fit was refused (T kept at 1: :meth:`transform` changes nothing)."""
        return self.status_ == CALIBRATED

    @property
    def fitted(self) -> bool:
        return self.temperature_ is not None

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise DataError("TemperatureScaler is not fitted: call fit(probs, y) first (or from_dict).")

    def transform(self, probs, *, from_logits: bool = False) -> np.ndarray:
        """Temperature-scaled probabilities, shape (n, K), rows summing to 1."""
        self._require_fitted()
        A = _check_scores(probs, "probs", from_logits=from_logits, n_classes=self.n_classes_)
        if self.temperature_ == 1.0 and not from_logits:  # identity: return the probabilities as given, exactly
            return A
        Z = A if from_logits else _log_probs(A)
        return _softmax(Z / self.temperature_)

    def fit_transform(self, probs, y, **kw) -> np.ndarray:
        from_logits = kw.get("from_logits", False)
        return self.fit(probs, y, **kw).transform(probs, from_logits=from_logits)

    def nll(self, probs, y, *, from_logits: bool = False) -> float:
        """Mean negative log-likelihood of the labels ``y`` (integer codes, or names if fitted with classes)."""
        self._require_fitted()
        A = _check_scores(probs, "probs", from_logits=from_logits, n_classes=self.n_classes_)
        codes = _check_labels(y, len(A), A.shape[1], self.classes_)
        return _nll(A if from_logits else _log_probs(A), codes, self.temperature_)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (plain floats/ints/strings) for a bundle's ``bundle.json``."""
        self._require_fitted()
        return {"kind": self.KIND, "temperature": float(self.temperature_), "n_cal": int(self.n_cal_),
                "nll_before": float(self.nll_before_), "nll_after": float(self.nll_after_),
                "classes": list(self.classes_) if self.classes_ is not None else None,
                "n_classes": int(self.n_classes_), "status": self.status_, "reason": self.reason_,
                "n_errors": self.n_errors_}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TemperatureScaler:
        if not isinstance(d, dict) or d.get("kind") != cls.KIND:
            raise DataError(f"Not a temperature-scaling description (expected kind '{cls.KIND}'): {d!r:.200}")
        try:
            T = float(d["temperature"])
            K = int(d["n_classes"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"Temperature-scaling description is missing or has a bad 'temperature'/'n_classes': {e}") from None
        if not (math.isfinite(T) and T > 0):
            raise DataError(f"Temperature-scaling description has temperature {T!r}; it must be a finite number > 0.")
        self = cls()
        self.temperature_, self.n_classes_ = T, K
        self.n_cal_ = int(d.get("n_cal", 0))
        self.nll_before_ = d.get("nll_before")
        self.nll_after_ = d.get("nll_after")
        self.classes_ = _check_classes(d.get("classes"), K)
        status = d.get("status") or CALIBRATED  # descriptions written before the status existed were fitted
        if status not in (CALIBRATED, UNCALIBRATED):
            raise DataError(f"Temperature-scaling description has status {status!r}; expected "
                            f"'{CALIBRATED}' or '{UNCALIBRATED}'.")
        if status == UNCALIBRATED and T != 1.0:
            raise DataError(f"Temperature-scaling description is '{UNCALIBRATED}' but has temperature {T!r}; an "
                            "uncalibrated description keeps T = 1.")
        self.status_, self.reason_ = status, d.get("reason")
        self.n_errors_ = d.get("n_errors")
        return self

    def __repr__(self) -> str:
        t = "unfitted" if not self.fitted else f"T={self.temperature_:.4f}, n_cal={self.n_cal_}"
        if self.fitted and not self.calibrated:
            t += ", uncalibrated"
        return f"TemperatureScaler({t})"


# ---------------------------------------------------------------------------------------------------------
# Split-conformal prediction sets
# ---------------------------------------------------------------------------------------------------------


def min_calibration_size(alpha: float) -> int:
    """Smallest calibration set for which the finite-sample quantile exists: ``ceil((n+1)(1-alpha)) <= n``."""
    _check_alpha(alpha)
    n = max(1, math.ceil((1 - alpha) / alpha - 1e-9))
    while _rank(n, alpha) > n:  # guard against float round-off in the closed form
        n += 1
    while n > 1 and _rank(n - 1, alpha) <= n - 1:
        n -= 1
    return n


def resolve_class_conditional(setting, class_counts, alpha: float, where: str = "the calibration cases") -> bool:
    """``True``/``False`` as given; ``"auto"``: per-class thresholds when every class has the
    :func:`min_calibration_size` cases they need, else one overall threshold (logged)."""
    if setting != "auto":
        return bool(setting)
    need = min_calibration_size(alpha)
    short = {str(c): int(n) for c, n in class_counts.items() if n < need}
    if short:
        log.info("conformal sets: one overall threshold, not one per class: %s hold(s) too few cases of %s "
                 "(need %d each at alpha=%g)", where, short, need, alpha)
        return False
    return True


def _rank(n: int, alpha: float) -> int:
    """1-based rank of the calibration score used as threshold: ceil((n + 1)(1 - alpha))."""
    return math.ceil((n + 1) * (1 - alpha) - 1e-9)


def _check_alpha(alpha) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise DataError(f"alpha must be a number in (0, 1); got {alpha!r}.") from None
    if not (0 < a < 1):
        raise DataError(f"alpha must be in (0, 1) (target coverage 1 - alpha); got {alpha!r}.")
    return a


class ConformalClassifier:
    """Split-conformal prediction sets over the classes (see the module docstring for the scores).

    Parameters: ``method`` ("aps", "raps" or "lac"), ``alpha`` (miscoverage; target coverage ``1 - alpha``),
    ``k_reg`` and ``lam`` (RAPS penalty ``lam * max(0, rank - k_reg)``, rank 1 = top class), ``randomized``
    (APS/RAPS tie-breaking with ``U ~ Uniform(0, 1)``; off by default for deterministic sets) and ``seed``
    (for the randomised version; fitting and prediction draw from separate streams of it) and
    ``class_conditional`` (Mondrian conformal: one threshold per true class, so that *each* class is covered
    at ``1 - alpha``, not only on average; every class then needs enough calibration cases).

    ``fit(probs_cal, y_cal)`` stores ``qhat_``, the ``ceil((n+1)(1-alpha))``-th smallest calibration
    score (and ``qhat_class_``, the same per class, when class-conditional); ``predict_sets(probs)`` returns a
    boolean (n, K) matrix, True where the class is in the set.
    """

    KIND = "split_conformal"

    def __init__(self, method: str = "aps", alpha: float = 0.1, k_reg: int = 1, lam: float = 0.01,
                 randomized: bool = False, seed: int = 0, class_conditional: bool = False) -> None:
        if method not in METHODS:
            raise DataError(f"Unknown conformal method {method!r}; expected one of {list(METHODS)}.")
        self.method = method
        self.alpha = _check_alpha(alpha)
        if int(k_reg) != k_reg or k_reg < 0:
            raise DataError(f"k_reg must be a non-negative integer; got {k_reg!r}.")
        self.k_reg = int(k_reg)
        if not (math.isfinite(float(lam)) and lam >= 0):
            raise DataError(f"lam must be a finite number >= 0; got {lam!r}.")
        self.lam = float(lam)
        self.randomized = bool(randomized)
        self.seed = int(seed)
        self.class_conditional = bool(class_conditional)
        self.qhat_: float | None = None
        self.qhat_class_: np.ndarray | None = None
        self.n_cal_: int = 0
        self.classes_: list[str] | None = None
        self.n_classes_: int | None = None

    # -- scores -----------------------------------------------------------------------------------------

    def _score_matrix(self, P: np.ndarray, U: np.ndarray | None) -> np.ndarray:
        """Conformity score of every (case, class) pair, shape (n, K); larger = less conforming."""
        if self.method == "lac":
            return 1.0 - P
        n, K = P.shape
        order = np.argsort(-P, axis=1, kind="stable")  # ties: lower class index ranks first
        rank = np.empty_like(order)
        rank[np.arange(n)[:, None], order] = np.arange(K)[None, :]  # 0-based rank of each class
        cum_sorted = np.cumsum(np.take_along_axis(P, order, axis=1), axis=1)
        cum_incl = np.take_along_axis(cum_sorted, rank, axis=1)  # mass of classes ranked at or above
        above = cum_incl - P
        S = above + (P if U is None else U[:, None] * P)
        if self.method == "raps":
            S = S + self.lam * np.maximum(0, rank + 1 - self.k_reg)
        return S

    def _uniforms(self, n: int, stream: int) -> np.ndarray | None:
        if not self.randomized or self.method == "lac":
            return None
        return np.random.default_rng([self.seed, stream]).uniform(size=n)

    def scores(self, probs, y) -> np.ndarray:
        """Conformity scores of the true classes ``y`` (those the threshold is the quantile of), shape (n,)."""
        P = _check_scores(probs, "probs_cal", n_classes=self.n_classes_)
        codes = _check_labels(y, len(P), P.shape[1], self.classes_, "y_cal")
        S = self._score_matrix(P, self._uniforms(len(P), 0))
        return S[np.arange(len(P)), codes]

    # -- fit / predict ----------------------------------------------------------------------------------

    def fit(self, probs_cal, y_cal, *, classes: list[str] | None = None) -> ConformalClassifier:
        P = _check_scores(probs_cal, "probs_cal")
        n, K = P.shape
        need = min_calibration_size(self.alpha)
        if n < need:
            raise DataError(
                f"The calibration set has {n} case(s); split-conformal sets at alpha={self.alpha:g} (coverage "
                f"{1 - self.alpha:.0%}) need at least {need} calibration cases (ceil((n+1)(1-alpha)) <= n). "
                "Use more calibration cases or a larger alpha."
            )
        self.classes_ = _check_classes(classes, K)
        codes = _check_labels(y_cal, n, K, self.classes_, "y_cal")
        S = self._score_matrix(P, self._uniforms(n, 0))[np.arange(n), codes]
        k = _rank(n, self.alpha)
        self.qhat_ = float(np.partition(S, k - 1)[k - 1])
        self.qhat_class_ = None
        if self.class_conditional:
            q = np.empty(K)
            for c in range(K):
                Sc = S[codes == c]
                if len(Sc) < need:
                    name = self.classes_[c] if self.classes_ else f"class {c}"
                    raise DataError(
                        f"Class-conditional conformal sets at alpha={self.alpha:g} need at least {need} calibration "
                        f"cases of every class; '{name}' has {len(Sc)}. Use a larger alpha, more cases of that "
                        "class, or marginal (not class-conditional) sets."
                    )
                kc = _rank(len(Sc), self.alpha)
                q[c] = np.partition(Sc, kc - 1)[kc - 1]
            self.qhat_class_ = q
        self.n_cal_, self.n_classes_ = int(n), int(K)
        return self

    @property
    def fitted(self) -> bool:
        return self.qhat_ is not None

    def predict_sets(self, probs) -> np.ndarray:
        """Boolean (n, K): True where the class is in the case's prediction set. Never an empty row."""
        if not self.fitted:
            raise DataError("ConformalClassifier is not fitted: call fit(probs_cal, y_cal) first (or from_dict).")
        P = _check_scores(probs, "probs", n_classes=self.n_classes_)
        S = self._score_matrix(P, self._uniforms(len(P), 1))
        q = self.qhat_class_[None, :] if self.qhat_class_ is not None else self.qhat_
        sets = S <= q + _SCORE_TOL
        top = np.argsort(-P, axis=1, kind="stable")[:, 0]
        sets[np.arange(len(P)), top] = True
        return sets

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (plain floats/ints/strings) for a bundle's ``bundle.json``."""
        if not self.fitted:
            raise DataError("ConformalClassifier is not fitted: nothing to serialise.")
        return {"kind": self.KIND, "method": self.method, "alpha": float(self.alpha), "k_reg": int(self.k_reg),
                "lam": float(self.lam), "randomized": bool(self.randomized), "seed": int(self.seed),
                "qhat": float(self.qhat_), "n_cal": int(self.n_cal_), "n_classes": int(self.n_classes_),
                "classes": list(self.classes_) if self.classes_ is not None else None,
                "class_conditional": self.class_conditional,
                "qhat_per_class": ([float(v) for v in self.qhat_class_] if self.qhat_class_ is not None else None)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConformalClassifier:
        if not isinstance(d, dict) or d.get("kind") != cls.KIND:
            raise DataError(f"Not a split-conformal description (expected kind '{cls.KIND}'): {d!r:.200}")
        try:
            self = cls(method=d["method"], alpha=d["alpha"], k_reg=d.get("k_reg", 1), lam=d.get("lam", 0.01),
                       randomized=d.get("randomized", False), seed=d.get("seed", 0),
                       class_conditional=d.get("class_conditional", False))
            qhat = float(d["qhat"])
            K = int(d["n_classes"])
            per_class = d.get("qhat_per_class")
            per_class = None if per_class is None else np.asarray(per_class, dtype=float)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"Split-conformal description is missing or has a bad field: {e}") from None
        if not math.isfinite(qhat):
            raise DataError(f"Split-conformal description has qhat {qhat!r}; it must be finite.")
        if self.class_conditional and (per_class is None or per_class.shape != (K,)
                                       or not np.isfinite(per_class).all()):
            raise DataError(f"Class-conditional split-conformal description needs {K} finite per-class thresholds "
                            f"(qhat_per_class); got {d.get('qhat_per_class')!r:.200}")
        self.qhat_, self.n_classes_ = qhat, K
        self.qhat_class_ = per_class if self.class_conditional else None
        self.n_cal_ = int(d.get("n_cal", 0))
        self.classes_ = _check_classes(d.get("classes"), K)
        return self

    def __repr__(self) -> str:
        q = "unfitted" if not self.fitted else f"qhat={self.qhat_:.4f}, n_cal={self.n_cal_}"
        return (f"ConformalClassifier(method={self.method!r}, alpha={self.alpha:g}, "
                f"randomized={self.randomized}, class_conditional={self.class_conditional}, {q})")


# ---------------------------------------------------------------------------------------------------------
# Bundle calibration
# ---------------------------------------------------------------------------------------------------------


def _set_strings(sets: np.ndarray, classes: list[str]) -> list[str]:
    return [SET_SEPARATOR.join(c for c, on in zip(classes, row) if on) for row in sets]


def no_error_note(n: int) -> str:
    """What conformal sets mean when their calibration predictions make no error."""
    return (f"the {n} out-of-fold predictions make no error, so the conformal threshold cannot learn when to "
            "refer: prediction sets hold a single class (almost) always, `refer` (almost) never fires, and the "
            "coverage on new cases cannot be estimated from these predictions")


def fit_bundle_calibration(preds: pd.DataFrame, classes: list[str], *, method: str = "lac",
                           alpha: float = 0.1, class_conditional: bool | str = "auto") -> dict[str, Any]:
    """Temperature + split-conformal threshold for a deployable bundle, fitted on the cross-validation
    out-of-fold predictions of the same model recipe (every case predicted by a model that did not see it).

    The bundle's final model is trained on all cases, so this is the usual cross-conformal approximation:
    it assumes the final model's scores behave like the fold models' scores. Returns a JSON-safe dict stored
    as ``bundle.json['calibration']`` and applied by :func:`apply_bundle_calibration`.

    ``status`` is ``"calibrated"``, or ``"uncalibrated"`` when no temperature could be fitted (``reason`` says
    why; the temperature stays 1 and probabilities are the model's own). ``n_errors`` counts the out-of-fold
    top-1 errors and ``warnings`` holds caveats for the model card and the web page (no errors: the sets are
    trivially single classes and referral cannot be learnt)."""
    P = preds[[f"prob_{c}" for c in classes]].to_numpy(dtype=float)
    y = preds["label"].astype(str).to_numpy()
    ts = TemperatureScaler().fit(P, y, classes=list(classes))
    Pc = ts.transform(P)
    class_conditional = resolve_class_conditional(class_conditional, {c: int((y == c).sum()) for c in classes},
                                                  alpha, "the out-of-fold predictions")
    cc = ConformalClassifier(method=method, alpha=alpha, class_conditional=class_conditional).fit(
        Pc, y, classes=list(classes))
    sets = cc.predict_sets(Pc)
    idx = np.array([list(classes).index(v) for v in y])
    n_errors = int((P.argmax(axis=1) != idx).sum())
    warnings = []
    if not ts.calibrated:
        warnings.append(f"probabilities are not calibrated: {ts.reason_}")
        log.warning("bundle calibration: temperature scaling not applied (T kept at 1): %s", ts.reason_)
    if n_errors == 0:
        warnings.append(no_error_note(len(P)))
        log.warning("bundle calibration: %s", no_error_note(len(P)))
    return {"status": ts.status_, "reason": ts.reason_, "n_errors": n_errors, "warnings": warnings,
            "temperature": ts.to_dict(), "conformal": cc.to_dict(), "target_coverage": 1 - alpha,
            "fitted_on": f"{len(P)} out-of-fold cross-validation predictions",
            "in_sample_coverage": float(sets[np.arange(len(y)), idx].mean()),
            "mean_set_size": float(sets.sum(1).mean()),
            "in_sample_refer_rate": float((sets.sum(1) > 1).mean())}


def calibration_status(calibration: dict | None) -> tuple[bool, str | None]:
    """(probabilities calibrated?, reason when not) for a bundle's ``calibration`` entry. Entries written before
    the status existed count as calibrated when they hold a temperature."""
    if not calibration:
        return False, "the bundle carries no calibration"
    temp = calibration.get("temperature") if isinstance(calibration, dict) else None
    if not isinstance(temp, dict):
        return False, "the bundle carries no temperature"
    status = calibration.get("status") or temp.get("status") or CALIBRATED
    if status != CALIBRATED:
        return False, calibration.get("reason") or temp.get("reason") or "temperature scaling was not applied"
    return True, None


def apply_bundle_calibration(probs: np.ndarray, calibration: dict, classes: list[str]):
    """(calibrated probabilities, prediction-set strings, set sizes, refer flags) for raw probabilities."""
    ts = TemperatureScaler.from_dict(calibration["temperature"])
    cc = ConformalClassifier.from_dict(calibration["conformal"])
    Pc = ts.transform(probs)
    sets = cc.predict_sets(Pc)
    return Pc, _set_strings(sets, list(classes)), sets.sum(1), sets.sum(1) > 1
