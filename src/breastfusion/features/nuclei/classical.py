"""Weight-free nuclei instance segmentation for H&E tiles.

Pipeline (every length is given in microns and converted with ``mpp``, microns per pixel):

1. colour deconvolution (Ruifrok & Johnston, ``skimage.color.rgb2hed``) → haematoxylin optical density ``h``;
2. Gaussian smoothing (``smooth_sigma_um``) → ``hs``;
3. foreground: ``hs`` above the tile's Otsu threshold T (times ``threshold_scale``, at least
   ``min_threshold_od``) AND above its local Gaussian-weighted mean over ``local_block_um`` windows plus
   ``local_offset``·T. The local test separates nuclei in dense clusters from the lighter gaps between them;
   ``local_block_um = 0`` disables it;
4. cleanup: binary opening (``opening_radius_um``), holes up to ``max_hole_um2`` filled, objects below
   ``min_area_um2`` removed;
5. splitting of touching nuclei: Euclidean distance transform smoothed by ``dist_sigma_um``, plus
   ``intensity_weight_um`` µm times the normalised haematoxylin (0 at T, 1 at the 95th percentile inside the
   foreground), so that dark chromatin centres help separate nuclei whose outline alone has no neck. Markers are
   the h-maxima of that surface (``h_um``: a dip of at least this many µm between two centres is needed to split
   them); marker-controlled watershed on the negated distance transform inside the foreground;
6. objects below ``min_area_um2`` after splitting are dropped; labels are made consecutive.

Defaults were tuned for AJI on MoNuSeg 40x tiles (0.25 µm/px), see ``benchmarks/nuclei_segmentation.py``.
Typical results there: Dice ≈ 0.74, AJI ≈ 0.47 — well below trained networks (HoVer-Net AJI ≈ 0.62); merges
in crowded clusters and over-segmentation of vesicular (pale, textured) nuclei are the main errors.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, morphology, segmentation
from skimage.color import rgb2hed

from breastfusion.errors import DataError

__all__ = ["DEFAULT_PARAMS", "NucleiParams", "foreground_mask", "haematoxylin_od", "segment_nuclei"]


@dataclass(frozen=True)
class NucleiParams:
    """Parameters of :func:`segment_nuclei`; lengths in µm, areas in µm²."""

    smooth_sigma_um: float = 0.5
    threshold_scale: float = 1.0
    min_threshold_od: float = 0.02  # floor of the global threshold, so blank or pale tiles give no nuclei
    local_block_um: float = 10.0  # 0 disables the local threshold
    local_offset: float = -0.05  # in units of the Otsu threshold
    opening_radius_um: float = 0.5
    max_hole_um2: float = 15.0
    min_area_um2: float = 8.0
    dist_sigma_um: float = 0.5
    intensity_weight_um: float = 3.0
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


def foreground_mask(h: np.ndarray, p: NucleiParams, mpp: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Nuclear foreground from a haematoxylin OD image (steps 2–4 of the pipeline).

    Returns (foreground bool mask, smoothed haematoxylin, global threshold).
    """
    px = 1.0 / mpp
    hs = filters.gaussian(h, sigma=p.smooth_sigma_um * px, preserve_range=True) if p.smooth_sigma_um > 0 else h
    if float(hs.max() - hs.min()) < 1e-3:  # blank or uniform tile: nothing to separate
        return np.zeros(h.shape, dtype=bool), hs, float("inf")
    otsu = float(filters.threshold_otsu(hs))
    thr = max(otsu * p.threshold_scale, p.min_threshold_od)
    fg = hs > thr
    if p.local_block_um > 0:
        block = max(3, round(p.local_block_um * px) | 1)
        loc = filters.threshold_local(hs, block_size=block, method="gaussian", offset=-p.local_offset * otsu)
        fg &= hs > loc
    if p.opening_radius_um > 0:
        r = round(p.opening_radius_um * px)
        if r >= 1:
            fg = ndi.binary_opening(fg, structure=morphology.disk(r))
    if p.max_hole_um2 > 0:
        fg = _fill_small_holes(fg, round(p.max_hole_um2 * px * px))
    return _drop_small(fg, round(p.min_area_um2 * px * px)) > 0, hs, thr


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
    if not (isinstance(mpp, numbers.Real) and math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of microns per pixel; got {mpp!r}.")
    p = _params(params, overrides)
    h = haematoxylin_od(rgb_uint8)
    fg, hs, thr = foreground_mask(h, p, mpp)
    if not fg.any():
        return np.zeros(h.shape, dtype=np.int32)
    px = 1.0 / mpp
    dist = ndi.distance_transform_edt(fg)
    if p.dist_sigma_um > 0:
        dist = ndi.gaussian_filter(dist, sigma=p.dist_sigma_um * px)
    surface = dist
    if p.intensity_weight_um > 0:
        hi = float(np.percentile(hs[fg], 95))
        inten = np.clip((hs - thr) / max(hi - thr, 1e-6), 0.0, 1.0)
        surface = dist + p.intensity_weight_um * px * inten
    h_px = max(p.h_um * px, 1e-3)
    markers = ndi.label(morphology.h_maxima(surface, h_px) & fg)[0]
    labels = segmentation.watershed(-dist, markers, mask=fg)
    # Foreground components that got no marker (flat, tiny) keep their own label.
    missed = fg & (labels == 0)
    if missed.any():
        extra = ndi.label(missed)[0]
        labels = np.where(missed, extra + labels.max(), labels)
    labels = _drop_small(labels, round(p.min_area_um2 * px * px))
    labels, _, _ = segmentation.relabel_sequential(labels)
    return labels.astype(np.int32)
