"""Weight-free nuclei instance segmentation for H&E tiles.

Pipeline (every length is given in microns and converted with ``mpp``, microns per pixel):

1. colour deconvolution (Ruifrok & Johnston, ``skimage.color.rgb2hed``) → haematoxylin optical density;
2. Gaussian smoothing (``smooth_sigma_um``);
3. foreground threshold: Otsu on the tile's smoothed haematoxylin, scaled by ``threshold_scale``, optionally
   AND-ed with a local (adaptive) threshold over ``local_block_um`` windows so that faint nuclei next to dark
   ones and nuclei in dense clusters separate from their halo;
4. cleanup: binary opening (``opening_radius_um``), holes up to ``max_hole_um2`` filled, objects below
   ``min_area_um2`` removed;
5. splitting of touching nuclei: Euclidean distance transform, smoothed (``dist_sigma_um``), markers at its
   h-maxima (``h_um``: a dip of at least this depth, in microns, between two centres is needed to split them),
   marker-controlled watershed on the negated distance restricted to the foreground;
6. objects below ``min_area_um2`` after splitting are dropped and labels are made consecutive.

Defaults are tuned for 40x (0.25 µm/px) MoNuSeg H&E tiles; see ``benchmarks/nuclei_segmentation.py``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, morphology, segmentation
from skimage.color import rgb2hed

from breastfusion.errors import DataError

__all__ = ["NucleiParams", "DEFAULT_PARAMS", "haematoxylin_od", "segment_nuclei", "foreground_mask"]


@dataclass(frozen=True)
class NucleiParams:
    """Parameters of :func:`segment_nuclei`; lengths in µm, areas in µm²."""

    smooth_sigma_um: float = 0.5
    threshold_scale: float = 1.0
    local_block_um: float = 0.0  # 0 disables the local threshold
    local_offset: float = 0.0
    opening_radius_um: float = 0.5
    max_hole_um2: float = 15.0
    min_area_um2: float = 8.0
    dist_sigma_um: float = 0.5
    h_um: float = 0.75

    def as_dict(self) -> dict:
        return asdict(self)


DEFAULT_PARAMS = NucleiParams()


def _as_uint8_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise DataError(f"segment_nuclei needs an (H, W, 3) RGB image; got shape {rgb.shape}.")
    rgb = rgb[..., :3]
    if rgb.dtype == np.uint8:
        return rgb
    if np.issubdtype(rgb.dtype, np.floating):
        if not np.isfinite(rgb).all():
            raise DataError("RGB image contains NaN or infinite values.")
        if rgb.size and (rgb.min() < 0 or rgb.max() > 1.0 + 1e-6):
            raise DataError(f"Float RGB images must lie in [0, 1]; got range [{rgb.min():.3g}, {rgb.max():.3g}].")
        return np.round(rgb * 255.0).astype(np.uint8)
    raise DataError(f"RGB image must be uint8 or float in [0, 1]; got dtype {rgb.dtype}.")


def haematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density (float32, (H, W)) by Ruifrok–Johnston colour deconvolution.

    Accepts uint8 RGB or float RGB in [0, 1].
    """
    rgb8 = _as_uint8_rgb(rgb)
    return rgb2hed(rgb8)[..., 0].astype(np.float32)


def _params(params: NucleiParams | None, overrides: dict) -> NucleiParams:
    p = params or DEFAULT_PARAMS
    if overrides:
        known = {f.name for f in fields(NucleiParams)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"Unknown segment_nuclei parameter(s) {bad}; known: {sorted(known)}.")
        p = replace(p, **overrides)
    return p


def foreground_mask(h: np.ndarray, p: NucleiParams, mpp: float) -> np.ndarray:
    """Nuclear foreground from a haematoxylin OD image (steps 2–4 of the pipeline)."""
    px = 1.0 / mpp
    hs = filters.gaussian(h, sigma=p.smooth_sigma_um * px, preserve_range=True) if p.smooth_sigma_um > 0 else h
    finite = hs[np.isfinite(hs)]
    if finite.size == 0 or float(finite.max() - finite.min()) < 1e-6:
        return np.zeros(h.shape, dtype=bool)
    thr = filters.threshold_otsu(hs) * p.threshold_scale
    fg = hs > thr
    if p.local_block_um > 0:
        block = max(3, int(round(p.local_block_um * px)) | 1)
        loc = filters.threshold_local(hs, block_size=block, method="gaussian", offset=-p.local_offset)
        fg &= hs > loc
    if p.opening_radius_um > 0:
        r = int(round(p.opening_radius_um * px))
        if r >= 1:
            fg = ndi.binary_opening(fg, structure=morphology.disk(r))
    if p.max_hole_um2 > 0:
        fg = _fill_small_holes(fg, int(round(p.max_hole_um2 * px * px)))
    return _drop_small(fg, int(round(p.min_area_um2 * px * px))) > 0


def _drop_small(labels: np.ndarray, min_px: int) -> np.ndarray:
    """Remove connected components (bool input) or labelled objects (int input) with fewer than min_px pixels."""
    if labels.dtype == bool:
        labels = ndi.label(labels)[0]
    if min_px <= 1 or not labels.any():
        return labels
    area = np.bincount(labels.ravel())
    small = area < min_px
    small[0] = False
    return np.where(small[labels], 0, labels)


def _fill_small_holes(fg: np.ndarray, max_px: int) -> np.ndarray:
    """Fill background components of at most max_px pixels that do not touch the image border."""
    holes, n = ndi.label(~fg)
    if n == 0:
        return fg
    area = np.bincount(holes.ravel())
    fill = area <= max_px
    fill[0] = False
    border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    fill[border] = False
    return fg | fill[holes]


def segment_nuclei(rgb_uint8: np.ndarray, *, mpp: float = 0.25, params: NucleiParams | None = None, **overrides) -> np.ndarray:
    """Segment nuclei in an H&E RGB tile; return an int32 instance label image (0 = background, 1..n nuclei).

    ``mpp`` is the pixel size in microns (0.25 ≈ 40x, 0.5 ≈ 20x). Parameters come from ``params`` (a
    :class:`NucleiParams`, default :data:`DEFAULT_PARAMS`) with keyword overrides, e.g. ``h_um=1.0``.
    """
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of microns per pixel; got {mpp!r}.")
    p = _params(params, overrides)
    h = haematoxylin_od(rgb_uint8)
    fg = foreground_mask(h, p, mpp)
    if not fg.any():
        return np.zeros(h.shape, dtype=np.int32)
    px = 1.0 / mpp
    dist = ndi.distance_transform_edt(fg)
    if p.dist_sigma_um > 0:
        dist = ndi.gaussian_filter(dist, sigma=p.dist_sigma_um * px)
    h_px = max(p.h_um * px, 1e-3)
    markers = ndi.label(morphology.h_maxima(dist, h_px) & fg)[0]
    labels = segmentation.watershed(-dist, markers, mask=fg)
    # Foreground components that got no marker (flat, tiny) keep their own label.
    missed = fg & (labels == 0)
    if missed.any():
        extra, n_extra = ndi.label(missed)
        labels = np.where(missed, extra + labels.max(), labels)
    labels = _drop_small(labels, int(round(p.min_area_um2 * px * px)))
    labels, _, _ = segmentation.relabel_sequential(labels)
    return labels.astype(np.int32)
