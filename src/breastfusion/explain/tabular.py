"""Shapley values for the tabular branch: which clinical / radiomics / pathomics inputs moved a prediction.

The explained function is the probability of the target class as a function of the encoded tabular vector,
with the image part *fixed to the case's own embedding*::

    f(tab) = P(class | head(cat(image_embedding_of_this_case, tabular_encoder(tab))))

(:func:`tabular_function`; the head input is captured once with a forward pre-hook, so evaluating ``f`` on
thousands of coalitions costs only the tabular MLP and the head.)

Players are the *input columns*, not the encoded features: a categorical column's one-hot block and every
column's ``__missing`` indicator form one group (:func:`feature_groups`), and a coalition switches a whole
group between the case's value and the background's. The value of a coalition ``S`` is the mean of ``f`` over
the background rows with the columns in ``S`` taken from the case (the interventional definition that
KernelSHAP and shap's ``Independent`` masker use), so the values add up exactly to
``f(x) - mean_b f(b)`` (efficiency).

Background: a small sample of training rows when the caller has them, otherwise the preprocessor's
"missing" row (every column absent) — the input the fusion models were trained to see under tabular dropout —
so each value then says how far knowing that column moved the prediction from knowing nothing.

Estimators (``method``):

* ``"exact"``: every one of the 2^G coalitions (what ``"auto"`` uses for at most ``exact_max`` = 10 groups).
* ``"permutation"``: permutation sampling (Štrumbelj & Kononenko, 2014) with antithetic pairs (each
  permutation and its reverse), implemented here; what ``"auto"`` uses for more groups. Every permutation
  distributes ``v(all) - v(empty)`` exactly, so efficiency holds for any number of permutations; the standard
  error over permutation pairs is reported (``ShapleyResult.std_err``).
* ``"shap"``: the same estimator from the optional ``shap`` package (:class:`shap.PermutationExplainer` on
  the same coalition game; ``pip install shap``). It is not the default: it is not a dependency, and its
  first call in a process costs about 14 s on a CPU (importing shap and numba's JIT compilation) against
  well under a second for the built-in estimator, with the same results up to sampling error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

SHAP_METHODS = ("auto", "exact", "permutation", "shap")


# --------------------------------------------------------------------------------------------- feature groups

def feature_groups(pre, n_features: int | None = None) -> list[tuple[str, list[int]]]:
    """``(input column, indices into the encoded vector)`` for each column of a fitted
    :class:`~breastfusion.features.tabular.TabularPreprocessor`: a categorical column's one-hot block plus its
    ``__missing`` indicator, or a numeric/boolean column plus its indicator. Without a preprocessor every
    feature of an ``n_features`` vector is its own group (named ``x0, x1, ...``)."""
    if pre is None:
        if n_features is None:
            raise ValueError("feature_groups needs a preprocessor or n_features")
        return [(f"x{i}", [i]) for i in range(n_features)]
    groups, i = [], 0
    for c in pre.columns_:
        width = len(pre.categories_.get(c, [])) if pre.kinds_[c] in ("categorical", "multi") else 1
        groups.append((c, list(range(i, i + width + 1))))
        i += width + 1
    if i != pre.n_features_out_:
        raise ValueError(f"feature groups cover {i} features, the preprocessor writes {pre.n_features_out_}")
    return groups


def decode_values(pre, row: np.ndarray) -> dict[str, str]:
    """The input value of each source column, read back from an encoded row (``"missing"`` where the
    indicator is set; numbers unscaled; categories by name)."""
    if pre is None:
        return {f"x{i}": f"{float(v):.4g}" for i, v in enumerate(np.asarray(row).ravel())}
    out = {}
    for c, idx in feature_groups(pre):
        block = np.asarray(row, dtype=np.float64)[idx]
        if block[-1] > 0.5:
            out[c] = "missing"
        elif pre.kinds_[c] == "categorical":
            cats = pre.categories_[c]
            out[c] = cats[int(np.argmax(block[:-1]))] if len(cats) and block[:-1].max() > 0.5 else "?"
        elif pre.kinds_[c] == "multi":  # every value whose indicator is set
            on = [k for k, x in zip(pre.categories_[c], block[:-1]) if x > 0.5]
            out[c] = pre.multi_separator.join(on) if on else "?"
        elif pre.kinds_[c] == "ordinal":  # the level of the (unscaled) rank
            levels = pre.levels_.get(c, [])
            r = int(round(block[0] * pre.scales_[c] + pre.means_[c]))
            out[c] = levels[r] if 0 <= r < len(levels) else "?"
        else:
            v = block[0] * pre.scales_[c] + pre.means_[c]
            if abs(v) < 1e-5 * (abs(pre.scales_[c]) + abs(pre.means_[c])):
                v = 0.0  # float32 round-off of an encoded zero, not a measured 3e-08
            out[c] = ("yes" if v > 0.5 else "no") if pre.kinds_[c] == "bool" else f"{v:.4g}"
    return out


def missing_row(pre) -> np.ndarray:
    """The encoded row of a case without any tabular data (what tabular dropout trained on)."""
    import pandas as pd

    return pre.transform(pd.DataFrame(index=[0]))[0]


# -------------------------------------------------------------------------------------- the explained function

def _head_input(model: nn.Module, image, tabular) -> torch.Tensor:
    captured = {}

    def pre_hook(_m, args):
        captured["h"] = args[0].detach()

    handle = model.head.register_forward_pre_hook(pre_hook)
    try:
        with torch.no_grad():
            model(image, tabular)
    finally:
        handle.remove()
    return captured["h"]


def tabular_function(model: nn.Module, image: torch.Tensor | None, tabular_row, *, target_class: int,
                     batch_size: int = 8192) -> Callable[[np.ndarray], np.ndarray]:
    """``f(T) -> P(target_class)`` for encoded tabular rows ``T`` (n, F), the image part of the head input fixed
    to that of ``image`` (a FusionClassifier input, or a multiscale batch of stacks whose probabilities are
    averaged, as cases are scored). ``image`` is ignored by a tabular-only model."""
    if getattr(model, "tabular_encoder", None) is None:
        raise ValueError("this model has no tabular branch to explain")
    model.eval()
    dev = next(model.parameters()).device
    t0 = torch.as_tensor(np.asarray(tabular_row, dtype=np.float32), device=dev).reshape(1, -1)
    img = image.to(dev).float() if image is not None and getattr(model, "uses_image", False) else None
    n_items = 1
    if img is not None:
        multi = hasattr(model, "n_scales")
        if img.dim() == (4 if multi else 3):
            img = img[None]
        n_items = img.shape[0]
    h = _head_input(model, img, t0.expand(n_items, -1))
    img_part = h[:, : h.shape[1] - model.tabular_encoder.out_dim]  # (n_items, D) — empty for a tabular-only model
    probs_of = model.probabilities if hasattr(model, "probabilities") else (lambda o: torch.softmax(o.float(), 1))

    @torch.no_grad()
    def f(rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.float32)
        if rows.ndim == 1:
            rows = rows[None]
        out = np.empty(len(rows), dtype=np.float64)
        step = max(1, batch_size // n_items)
        for s in range(0, len(rows), step):
            t = torch.from_numpy(rows[s:s + step]).to(dev)
            n = t.shape[0]
            enc = model.tabular_encoder(t)  # (n, d)
            enc = enc[:, None].expand(n, n_items, -1)
            ip = img_part[None].expand(n, -1, -1)
            p = probs_of(model.head(torch.cat([ip, enc], 2).reshape(n * n_items, -1)))
            out[s:s + n] = p[:, target_class].reshape(n, n_items).double().mean(1).cpu().numpy()
        return out

    return f


# ------------------------------------------------------------------------------------------- Shapley values

@dataclass
class ShapleyResult:
    """Per-group Shapley values. ``values.sum() == fx - base_value`` (up to float error)."""

    names: list[str]
    values: np.ndarray
    base_value: float
    fx: float
    method: str
    std_err: np.ndarray | None = None
    n_evaluations: int = 0
    extra: dict = field(default_factory=dict)


class _Game:
    """Coalition values ``v(z)``: mean of ``f`` over background rows with groups in ``z`` taken from ``x``."""

    def __init__(self, f, x: np.ndarray, background: np.ndarray, groups: list[list[int]], chunk_rows: int = 65536):
        self.f, self.x, self.bg = f, np.asarray(x, np.float32).ravel(), np.asarray(background, np.float32)
        if self.bg.ndim == 1:
            self.bg = self.bg[None]
        n_feat = self.x.size
        self.member = np.zeros((len(groups), n_feat), dtype=bool)
        for g, idx in enumerate(groups):
            self.member[g, idx] = True
        covered = self.member.any(0)
        self.fixed_from_x = ~covered  # features in no group stay at the case's value
        self.chunk = max(1, chunk_rows // len(self.bg))
        self.n_evals = 0

    def __call__(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=bool)
        if z.ndim == 1:
            z = z[None]
        out = np.empty(len(z))
        nb = len(self.bg)
        for s in range(0, len(z), self.chunk):
            zz = z[s:s + self.chunk]
            take_x = (zz.astype(np.float32) @ self.member.astype(np.float32)) > 0.5  # (m, F)
            take_x |= self.fixed_from_x
            rows = np.where(take_x[:, None, :], self.x[None, None, :], self.bg[None, :, :])
            vals = np.asarray(self.f(rows.reshape(-1, self.x.size)), dtype=np.float64).reshape(len(zz), nb)
            out[s:s + len(zz)] = vals.mean(1)
        self.n_evals += len(z) * nb
        return out


def _exact(game: _Game, n_groups: int) -> tuple[np.ndarray, float, float]:
    g = n_groups
    ints = np.arange(2 ** g, dtype=np.int64)
    bits = ((ints[:, None] >> np.arange(g)) & 1).astype(bool)
    v = game(bits)
    size = bits.sum(1)
    w = np.array([math.factorial(s) * math.factorial(g - s - 1) / math.factorial(g) for s in range(g)])
    phi = np.empty(g)
    for i in range(g):
        without = ints[~bits[:, i]]
        phi[i] = np.sum(w[size[without]] * (v[without | (1 << i)] - v[without]))
    return phi, float(v[0]), float(v[-1])


def _permutation(game: _Game, n_groups: int, n_permutations: int, seed: int):
    rng = np.random.default_rng(seed)
    g = n_groups
    pairs = max(1, (n_permutations + 1) // 2)
    perms = []
    for _ in range(pairs):
        p = rng.permutation(g)
        perms += [p, p[::-1]]
    perms = np.array(perms)
    n = len(perms)
    z = np.zeros((n, g + 1, g), dtype=bool)
    for k, p in enumerate(perms):
        for j in range(g):
            z[k, j + 1:, p[j]] = True
    v = game(z.reshape(-1, g)).reshape(n, g + 1)
    contrib = np.zeros((n, g))
    for k, p in enumerate(perms):
        contrib[k, p] = np.diff(v[k])
    # antithetic pairs are averaged first: the standard error is over independent pairs
    pair_mean = contrib.reshape(pairs, 2, g).mean(1)
    se = pair_mean.std(0, ddof=1) / math.sqrt(pairs) if pairs > 1 else np.full(g, np.nan)
    return contrib.mean(0), float(v[0, 0]), float(v[0, -1]), se


def _shap_package(game: _Game, n_groups: int, n_permutations: int, seed: int):
    import shap

    g = n_groups
    explainer = shap.PermutationExplainer(lambda z: game(np.asarray(z) > 0.5), np.zeros((1, g)), seed=seed)
    max_evals = max(2 * g + 2, n_permutations * (g + 1))
    exp = explainer(np.ones((1, g)), max_evals=max_evals, silent=True)
    base = float(np.ravel(exp.base_values)[0])
    vals = np.asarray(exp.values, dtype=np.float64).reshape(-1)
    return vals, base, f"shap {shap.__version__} PermutationExplainer"


def shap_available() -> bool:
    try:
        import shap  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure (numba, llvmlite) means "not usable"
        return False
    return True


def shapley_values(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, background: np.ndarray, *,
                   groups: list[tuple[str, list[int]]] | None = None, method: str = "auto", n_permutations: int = 64,
                   exact_max: int = 10, seed: int = 0) -> ShapleyResult:
    """Shapley values of ``f`` at ``x`` against ``background`` rows, per group (see the module docstring)."""
    if method not in SHAP_METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {SHAP_METHODS}")
    x = np.asarray(x, dtype=np.float32).ravel()
    groups = groups or [(f"x{i}", [i]) for i in range(x.size)]
    names = [g[0] for g in groups]
    game = _Game(f, x, background, [g[1] for g in groups])
    n = len(groups)
    fx = float(game(np.ones((1, n), bool))[0])
    base = float(game(np.zeros((1, n), bool))[0])
    if method == "auto":
        method = "exact" if n <= exact_max else "permutation"
    se = None
    label = method
    if n == 0:
        vals = np.zeros(0)
    elif method == "exact":
        if n > 20:
            raise ValueError(f"exact Shapley values over {n} groups need 2^{n} evaluations; use 'permutation'")
        vals, _, _ = _exact(game, n)
    elif method == "shap" and not shap_available():
        raise ValueError("method 'shap' needs the shap package (pip install shap); 'permutation' is the same "
                         "estimator built in")
    elif method == "permutation":
        vals, _, _, se = _permutation(game, n, n_permutations, seed)
        label = f"permutation ({2 * max(1, (n_permutations + 1) // 2)} antithetic permutations)"
    else:
        vals, base_shap, label = _shap_package(game, n, n_permutations, seed)
        base = base_shap if np.isfinite(base_shap) else base
    return ShapleyResult(names, np.asarray(vals, dtype=np.float64), base, fx, label, se, game.n_evals)


def top_features(result: ShapleyResult, values: dict[str, str] | None = None, k: int = 10) -> list[dict]:
    """The ``k`` groups with the largest |SHAP|: ``{"feature", "value", "shap"}`` rows, largest first."""
    order = np.argsort(-np.abs(result.values), kind="stable")[:k]
    return [{"feature": result.names[i], "value": (values or {}).get(result.names[i], ""),
             "shap": float(result.values[i])} for i in order]


def explain_tabular(model: nn.Module, image: torch.Tensor | None, tabular_row: np.ndarray, *, pre=None,
                    target_class: int, background: np.ndarray | None = None, method: str = "auto",
                    n_permutations: int = 64, seed: int = 0) -> ShapleyResult:
    """SHAP of one case's tabular input for a bundle model (groups and missing-row background from ``pre``)."""
    tabular_row = np.asarray(tabular_row, dtype=np.float32).ravel()
    if background is None:
        background = missing_row(pre)[None] if pre is not None else np.zeros((1, tabular_row.size), np.float32)
    f = tabular_function(model, image, tabular_row, target_class=target_class)
    return shapley_values(f, tabular_row, background, groups=feature_groups(pre, tabular_row.size), method=method,
                          n_permutations=n_permutations, seed=seed)


# ------------------------------------------------------------------------------------------------- figures

def plot_shap_summary(names: list[str], values: np.ndarray, path: str | Path, *, top: int = 20,
                      title: str | None = None) -> Path:
    """Mean |SHAP| per input column over a set of cases (``values`` is (n_cases, n_groups)), largest at the top."""
    from breastfusion.evaluation.plots import _new_figure, _save, _short

    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    mean_abs = np.nanmean(np.abs(values), axis=0)
    order = np.argsort(-mean_abs, kind="stable")[:top][::-1]
    fig = _new_figure(7.2, 0.3 * len(order) + 1.6)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(order))
    ax.barh(y, mean_abs[order], color="#1f77b4", alpha=0.85, height=0.65)
    ax.set_yticks(y, labels=[_short(names[i], 48) for i in order], fontsize=8.5)
    ax.set_xlabel("mean |SHAP| (predicted-class probability)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(title or f"Tabular feature importance over {values.shape[0]} case(s)", fontsize=11)
    return _save(fig, path)
