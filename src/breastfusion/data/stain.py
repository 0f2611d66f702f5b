"""H&E stain normalisation (Macenko, Reinhard) and stain augmentation in HED space.

Normalisation
-------------
:class:`StainNormalizer` wraps torchstain's numpy normalisers. ``fit`` learns the target's stain parameters
(Macenko: the 3x2 H&E optical-density matrix and the 99th-percentile stain concentrations; Reinhard: the
mean and standard deviation of each LAB channel); ``transform`` maps an RGB uint8 tile onto them.
``to_dict`` / ``from_dict`` store the fitted parameters as plain JSON so a model bundle can carry them.

Background tiles (documented choice)
------------------------------------
Both methods need tissue: Macenko estimates stain vectors from the pixels whose optical density exceeds
``beta`` in every channel, and fails (or returns nonsense) when there are almost none; Reinhard would map
the statistics of white glass onto the target's tissue statistics and tint the background. A tile counts
as *background* when fewer than ``min_tissue_fraction`` of its pixels (and fewer than 64 pixels) are
stained by that criterion.

* ``fit`` on a background image always raises :class:`DataError` (a target without tissue is a mistake).
* ``transform`` on a background tile follows ``on_background``: ``"passthrough"`` (default) returns the input
  unchanged and logs a warning, so a tiling pipeline never dies on an empty tile; ``"raise"`` raises
  :class:`DataError`. Any numerical failure inside torchstain on a tile with *some* tissue is handled the
  same way.

Augmentation
------------
:class:`StainAugment` follows Tellez et al. (2018, 2019): convert RGB to haematoxylin-eosin-DAB optical
densities with the Ruifrok-Johnston matrix (scikit-image's ``hed_from_rgb``), draw per-channel
``alpha ~ U(1 - sigma_alpha, 1 + sigma_alpha)`` and ``beta ~ U(-sigma_beta, sigma_beta)``, set
``hed' = alpha * hed + beta`` and convert back. Optical densities are natural-log units (``-ln(I / 255)``),
the scale of Tellez's "HED-light" (0.05) and "HED-strong" (0.2) settings, independent of the scikit-image
version (recent scikit-image rescales ``rgb2hed`` by ``-ln(1e-6)``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from breastfusion.errors import ConfigError, DataError

log = logging.getLogger(__name__)

METHODS = ("macenko", "reinhard")
_FORMAT_VERSION = 1
_MIN_TISSUE_PIXELS = 64


def _as_rgb_uint8(image: Any, what: str) -> np.ndarray:
    """Accept an (H, W, 3|4) uint8 array, a float array in [0, 1], or an image path; return (H, W, 3) uint8."""
    if isinstance(image, (str, Path)):
        from breastfusion.data.images import read_image

        arr = read_image(image, mode="rgb")
        return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise DataError(f"{what} must be an RGB image of shape (H, W, 3); got shape {arr.shape}.")
    arr = arr[..., :3]
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{what} is empty (shape {arr.shape}).")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise DataError(f"{what} contains NaN or infinite values.")
        if arr.min() < 0 or arr.max() > 1.0:
            raise DataError(f"{what} is a float image outside [0, 1]; pass uint8 RGB or floats in [0, 1].")
        return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    raise DataError(f"{what} must be uint8 RGB (or float in [0, 1]); got dtype {arr.dtype}.")


def tissue_fraction(rgb: np.ndarray, *, Io: float = 240.0, beta: float = 0.15) -> float:
    """Fraction of pixels whose optical density exceeds ``beta`` in every channel (Macenko's tissue pixels)."""
    rgb = np.asarray(rgb)[..., :3]
    od = -np.log((rgb.astype(np.float32) + 1.0) / Io)
    return float(np.mean(np.all(od >= beta, axis=-1)))


class StainNormalizer:
    """Normalise H&E tiles toward a target's stain appearance.

    Parameters
    ----------
    method: ``"macenko"`` (stain-vector based; the usual choice for H&E) or ``"reinhard"`` (LAB statistics).
    target: optional target image (array or path); when given, ``fit`` is called on it immediately.
    on_background: ``"passthrough"`` or ``"raise"``; what ``transform`` does with a background tile (see the
        module docstring).
    min_tissue_fraction: below this fraction of stained pixels a tile counts as background.
    Io, alpha, beta: Macenko's transmitted-light intensity, angle percentile and OD threshold (torchstain's
        defaults); ``beta`` and ``Io`` also define "stained pixel" for the background test of both methods.
    """

    def __init__(
        self,
        method: str = "macenko",
        target: Any = None,
        *,
        on_background: str = "passthrough",
        min_tissue_fraction: float = 0.05,
        Io: float = 240.0,
        alpha: float = 1.0,
        beta: float = 0.15,
    ) -> None:
        method = str(method).lower()
        if method not in METHODS:
            raise ConfigError(f"The stain normalisation 'method' must be one of {METHODS}. Got {method!r} instead.")
        if on_background not in ("passthrough", "raise"):
            raise ConfigError(
                f"'on_background' must be 'passthrough' or 'raise'. Got {on_background!r} instead."
            )
        if not 0.0 <= float(min_tissue_fraction) < 1.0:
            raise ConfigError(f"'min_tissue_fraction' must be in [0, 1). Got {min_tissue_fraction!r} instead.")
        self.method = method
        self.on_background = on_background
        self.min_tissue_fraction = float(min_tissue_fraction)
        self.Io, self.alpha, self.beta = float(Io), float(alpha), float(beta)
        self.params_: dict[str, Any] | None = None
        self.n_passthrough = 0  # background tiles returned unchanged by transform
        if target is not None:
            self.fit(target)

    # ------------------------------------------------------------------ helpers
    def _is_background(self, rgb: np.ndarray) -> tuple[bool, float]:
        frac = tissue_fraction(rgb, Io=self.Io, beta=self.beta)
        n = frac * rgb.shape[0] * rgb.shape[1]
        return (frac < self.min_tissue_fraction or n < _MIN_TISSUE_PIXELS), frac

    def _backend(self):
        try:
            from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("Stain normalisation needs torchstain: pip install torchstain") from exc
        if self.params_ is None:
            raise DataError("StainNormalizer is not fitted: call fit(target) first or pass target=... .")
        if self.method == "macenko":
            norm = NumpyMacenkoNormalizer()
            norm.HERef = np.asarray(self.params_["stain_matrix"], dtype=float)
            norm.maxCRef = np.asarray(self.params_["max_concentrations"], dtype=float)
        else:
            norm = NumpyReinhardNormalizer()
            norm.target_means = np.asarray(self.params_["lab_means"], dtype=np.float32)
            norm.target_stds = np.asarray(self.params_["lab_stds"], dtype=np.float32)
        return norm

    # ------------------------------------------------------------------ API
    @property
    def is_fitted(self) -> bool:
        return self.params_ is not None

    def fit(self, target: Any) -> StainNormalizer:
        """Learn the target's stain parameters. ``target``: (H, W, 3) uint8 array, float array in [0, 1], or path."""
        name = f"stain target '{target}'" if isinstance(target, (str, Path)) else "stain target image"
        rgb = _as_rgb_uint8(target, name)
        background, frac = self._is_background(rgb)
        if background:
            raise DataError(
                f"The {name} has almost no stained tissue ({frac:.1%} of pixels above OD {self.beta}); "
                "pick a target tile that shows H&E-stained tissue."
            )
        from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

        try:
            with np.errstate(all="ignore"):
                if self.method == "macenko":
                    norm = NumpyMacenkoNormalizer()
                    norm.fit(rgb, Io=self.Io, alpha=self.alpha, beta=self.beta)
                    params = {
                        "stain_matrix": np.asarray(norm.HERef, dtype=float).tolist(),
                        "max_concentrations": np.asarray(norm.maxCRef, dtype=float).tolist(),
                    }
                else:
                    norm = NumpyReinhardNormalizer()
                    norm.fit(rgb)
                    params = {
                        "lab_means": np.asarray(norm.target_means, dtype=float).tolist(),
                        "lab_stds": np.asarray(norm.target_stds, dtype=float).tolist(),
                    }
        except (np.linalg.LinAlgError, ValueError, IndexError) as exc:
            raise DataError(f"Cannot estimate stain parameters of the {name}: {exc}.") from exc
        flat = np.concatenate([np.ravel(v) for v in params.values()])
        if not np.isfinite(flat).all() or (self.method == "reinhard" and min(params["lab_stds"]) <= 0):
            raise DataError(f"Stain parameters of the {name} are degenerate ({params}); pick another target tile.")
        self.params_ = params
        return self

    def transform(self, image: Any) -> np.ndarray:
        """Return ``image`` (uint8 RGB, (H, W, 3)) with the target's stain appearance, as uint8.

        Background tiles: see ``on_background`` (returned unchanged with a warning, or DataError).
        """
        rgb = _as_rgb_uint8(image, "tile to normalise")
        norm = self._backend()
        background, frac = self._is_background(rgb)
        if background:
            return self._background(rgb, f"only {frac:.1%} of its pixels are stained (needs "
                                         f"{self.min_tissue_fraction:.1%})")
        try:
            with np.errstate(all="ignore"):
                if self.method == "macenko":
                    out, _, _ = norm.normalize(rgb, Io=self.Io, alpha=self.alpha, beta=self.beta, stains=False)
                else:
                    out = norm.normalize(rgb)
        except (np.linalg.LinAlgError, ValueError, IndexError) as exc:
            return self._background(rgb, f"stain estimation failed ({exc})")
        out = np.asarray(out)
        if out.shape != rgb.shape or out.dtype != np.uint8:
            out = np.clip(out, 0, 255).astype(np.uint8).reshape(rgb.shape)
        return out

    __call__ = transform

    def _background(self, rgb: np.ndarray, why: str) -> np.ndarray:
        if self.on_background == "raise":
            raise DataError(f"Cannot stain-normalise a background tile ({self.method}): {why}.")
        self.n_passthrough += 1
        log.warning("Stain normalisation (%s) skipped a background tile: %s; returned unchanged.", self.method, why)
        return rgb.copy()

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description of the fitted normaliser (method, settings and stain parameters)."""
        if self.params_ is None:
            raise DataError("StainNormalizer is not fitted: nothing to save.")
        return {
            "format_version": _FORMAT_VERSION,
            "method": self.method,
            "on_background": self.on_background,
            "min_tissue_fraction": self.min_tissue_fraction,
            "Io": self.Io,
            "alpha": self.alpha,
            "beta": self.beta,
            "params": {k: np.asarray(v, dtype=float).tolist() for k, v in self.params_.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StainNormalizer:
        """Rebuild a fitted normaliser from :meth:`to_dict` output."""
        if not isinstance(d, dict) or "method" not in d or "params" not in d:
            raise DataError("Stain normaliser description must be a dict with 'method' and 'params' (from to_dict).")
        if int(d.get("format_version", 1)) > _FORMAT_VERSION:
            raise DataError(
                f"Stain normaliser format_version {d['format_version']} is newer than this breastfusion "
                f"understands ({_FORMAT_VERSION})."
            )
        obj = cls(
            d["method"],
            on_background=d.get("on_background", "passthrough"),
            min_tissue_fraction=d.get("min_tissue_fraction", 0.05),
            Io=d.get("Io", 240.0),
            alpha=d.get("alpha", 1.0),
            beta=d.get("beta", 0.15),
        )
        need = ("stain_matrix", "max_concentrations") if obj.method == "macenko" else ("lab_means", "lab_stds")
        missing = [k for k in need if k not in d["params"]]
        if missing:
            raise DataError(f"Stain normaliser ({obj.method}) description lacks parameters {missing}.")
        params = {k: np.asarray(d["params"][k], dtype=float) for k in need}
        shapes = {"stain_matrix": (3, 2), "max_concentrations": (2,), "lab_means": (3,), "lab_stds": (3,)}
        for k, v in params.items():
            if v.shape != shapes[k] or not np.isfinite(v).all():
                raise DataError(f"Stain normaliser parameter '{k}' must be a finite array of shape {shapes[k]}.")
        obj.params_ = {k: v.tolist() for k, v in params.items()}
        return obj


# ---------------------------------------------------------------------- HED augmentation
# Ruifrok & Johnston H&E-DAB stain vectors, as in scikit-image (rows: H, E, DAB optical densities per RGB).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_EPS = 1.0 / 255.0


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> HED optical densities, natural-log units (float64, (H, W, 3))."""
    x = np.maximum(np.asarray(rgb, dtype=np.float64) / 255.0, _EPS / 2)
    return (-np.log(x)) @ HED_FROM_RGB


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hed`, rounded and clipped to uint8."""
    rgb = np.exp(-(np.asarray(hed, dtype=np.float64) @ RGB_FROM_HED)) * 255.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


class StainAugment:
    """Random H&E stain augmentation (Tellez et al.): ``hed' = alpha * hed + beta`` per HED channel.

    ``sigma_alpha`` / ``sigma_beta``: half-widths of the uniform ranges of the scale (around 1) and the shift
    (around 0, in optical-density units). 0.05/0.05 is Tellez's "HED-light", 0.2/0.2 "HED-strong".
    ``seed`` makes the draws reproducible; each call draws new factors. ``last_params`` holds the last draw.
    Accepts uint8 RGB (H, W, 3) and returns uint8 RGB of the same shape.
    """

    def __init__(self, sigma_alpha: float = 0.05, sigma_beta: float = 0.05, seed: int | None = None) -> None:
        if not (0.0 <= float(sigma_alpha) < 1.0):
            raise ConfigError(f"'sigma_alpha' must be in [0, 1). Got {sigma_alpha!r} instead.")
        if not (0.0 <= float(sigma_beta)):
            raise ConfigError(f"'sigma_beta' must be >= 0. Got {sigma_beta!r} instead.")
        self.sigma_alpha = float(sigma_alpha)
        self.sigma_beta = float(sigma_beta)
        self.rng = np.random.default_rng(seed)
        self.last_params: tuple[np.ndarray, np.ndarray] | None = None

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """Draw (alpha, beta), each of shape (3,), for H, E and DAB."""
        alpha = self.rng.uniform(1.0 - self.sigma_alpha, 1.0 + self.sigma_alpha, size=3)
        beta = self.rng.uniform(-self.sigma_beta, self.sigma_beta, size=3)
        return alpha, beta

    @staticmethod
    def apply(rgb: np.ndarray, alpha, beta) -> np.ndarray:
        """Deterministic augmentation with given per-channel ``alpha`` and ``beta`` (each scalar or (3,))."""
        rgb = _as_rgb_uint8(rgb, "tile to augment")
        hed = rgb_to_hed(rgb)
        hed = hed * np.asarray(alpha, dtype=np.float64) + np.asarray(beta, dtype=np.float64)
        return hed_to_rgb(hed)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        alpha, beta = self.sample()
        self.last_params = (alpha, beta)
        return self.apply(rgb, alpha, beta)
