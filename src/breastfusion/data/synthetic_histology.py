"""A SYNTHETIC Nottingham-grade cohort of procedural H&E-like tissue, as multi-magnification tile stacks.

:func:`make_synthetic_grading` writes, under ``out_dir``:

* ``SYNTHETIC_tiles/<case>/<case>_s<k>_<mag>x.png``: for every case ``stacks_per_case`` concentric stacks
  (see :mod:`breastfusion.data.tiles`), one RGB PNG of ``size`` x ``size`` pixels per magnification.
* ``cases.csv``: one row per case (``case_id``, ``patient_id``, ``center``, ``label`` = ``"1"``/``"2"``/``"3"``,
  clinical columns :data:`CLINICAL_COLUMNS`, ``_synthetic = True``). No ``image_path``: the images are in
  the tiles table.
* ``tiles.csv``: one row per tile (``case_id``, ``stack_id``, ``magnification``, ``image_path``, ``_mpp``,
  ``_synthetic``).
* ``README.txt``: a notice that none of it is real tissue, and the generation parameters.

How a stack is made
-------------------
Each stack (a *location* of the case) is one tissue canvas drawn at the highest magnification's
resolution and covering the lowest magnification's field of view (``size * max_mag / min_mag`` pixels a
side: 512 px for ``size=128`` and 40/20/10x). The tile at magnification ``m`` is the central
``size * max_mag / m`` square, area-averaged down to ``size`` (:func:`concentric_stack`), so the central
half of the 20x tile shows exactly the 40x tile, downsampled. (One canvas per *stack* rather than per case:
a single canvas of the lowest magnification's field would make every stack's lowest-magnification tile
identical. The stacks of a case share its grade, its tumour phenotype and its slide's staining.)

The tissue is drawn in optical-density space (a haematoxylin and an eosin map, turned into RGB by
Beer-Lambert with the centre's stain vectors): pink fibrous stroma with scattered fibroblasts and
lymphocytes, solid tumour sheets and glands (epithelial rings around white lumens), tumour nuclei with
chromatin texture, nucleoli and mitotic figures. Grade moves the three Nottingham components, each
visible at its own scale:

* tubule / gland formation (low magnification): many glands with wide lumens and polarised nuclei in grade
  1, few and smaller lumens with solid sheets in grade 3;
* nuclear pleomorphism (40x): larger nuclei with more variable size and shape, irregular outlines, darker
  (hyperchromatic) and coarser chromatin, vesicular nuclei with prominent nucleoli in grade 3;
* mitotic count and cellularity: more mitotic figures (small very dark clumps / bars) and denser nuclei.

Every grade-dependent quantity is ``middle + signal * (grade value - middle)``: ``signal=0`` makes the labels
independent of the images and the clinical columns (unlearnable; for tests), ``signal=1`` is a clear but
overlapping separation (cases also vary at random, independently of grade). Centres differ in stain
colour (haematoxylin / eosin hue and strength, background tint) and scanner blur, so leave-one-centre-out
validation measures robustness to stain shift; grades are balanced across centres.

Scale: the nominal resolution is 0.25 um/px at 40x (``_mpp`` in the tiles table), but the tissue is
compressed (nuclei ~10-16 px, glands ~100 px across at 40x) so that small tiles show something at every
magnification. Nothing here is histopathology to rely on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from breastfusion.data.cases import write_cases
from breastfusion.data.tiles import write_tiles
from breastfusion.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = [
    "SYNTHETIC_TAG",
    "SYNTHETIC_COLUMN",
    "GRADES",
    "CLINICAL_COLUMNS",
    "TILES_DIR",
    "make_synthetic_grading",
    "concentric_stack",
]

SYNTHETIC_TAG = "SYNTHETIC"
SYNTHETIC_COLUMN = "_synthetic"
GRADES = ("1", "2", "3")
CLINICAL_COLUMNS = ("age", "tumour_size_mm")
TILES_DIR = "SYNTHETIC_tiles"
NOTICE = "README.txt"
GENERATOR_VERSION = "1"
MPP_AT_40X = 0.25
_MAX_CANVAS = 4096
_MISSING_RATE = 0.1

# Grade-dependent parameters: (grade 1, grade 2, grade 3). Lengths in pixels at 40x, areas per 1e5 px^2 at 40x.
_GRADE_PARAMS: dict[str, tuple[float, float, float]] = {
    "gland_density": (4.2, 2.0, 0.45),   # glands per 1e5 px^2 (tubule formation)
    "gland_radius": (50.0, 44.0, 36.0),  # outer radius of a gland
    "lumen_ratio": (0.56, 0.45, 0.30),   # lumen radius / gland radius
    "sheet_frac": (0.12, 0.30, 0.55),    # share of the canvas in solid tumour sheets (outside glands)
    "spacing": (19.0, 17.0, 15.5),       # distance between tumour nuclei in sheets (cellularity)
    "polarity_sd": (0.25, 0.7, 1.6),     # radians of nuclear-orientation noise around a lumen
    "nuc_radius": (5.0, 6.0, 7.2),       # mean semi-major axis of a tumour nucleus
    "nuc_size_cv": (0.08, 0.17, 0.30),   # pleomorphism: size variability
    "nuc_aspect": (0.86, 0.76, 0.66),    # mean minor / major axis
    "nuc_aspect_sd": (0.05, 0.10, 0.15),
    "nuc_irregular": (0.03, 0.08, 0.16),  # outline irregularity (2nd / 3rd harmonics)
    "nuc_od": (0.95, 1.15, 1.40),        # haematoxylin optical density (hyperchromasia)
    "nuc_od_cv": (0.08, 0.14, 0.24),
    "chromatin": (0.10, 0.25, 0.45),     # chromatin texture amplitude
    "coarse": (0.10, 0.45, 0.85),        # share of coarse (clumped) vs fine texture
    "vesicular": (0.0, 0.15, 0.40),      # pale centre / dark membrane
    "nucleoli": (0.05, 0.30, 0.70),      # probability of a prominent nucleolus
    "mitoses": (0.3, 1.5, 4.5),          # mitotic figures per 1e5 px^2 of tumour
}
_BOUNDS: dict[str, tuple[float, float]] = {
    "gland_density": (0.0, 12.0), "gland_radius": (15.0, 90.0), "lumen_ratio": (0.15, 0.75),
    "sheet_frac": (0.03, 0.85), "spacing": (9.0, 30.0), "polarity_sd": (0.05, 3.0), "nuc_radius": (2.5, 14.0),
    "nuc_size_cv": (0.02, 0.6), "nuc_aspect": (0.35, 1.0), "nuc_aspect_sd": (0.01, 0.3),
    "nuc_irregular": (0.0, 0.3), "nuc_od": (0.4, 2.5), "nuc_od_cv": (0.02, 0.5), "chromatin": (0.0, 0.9),
    "coarse": (0.0, 1.0), "vesicular": (0.0, 0.7), "nucleoli": (0.0, 1.0), "mitoses": (0.0, 15.0),
}
# Clinical columns: age (years, per patient) and tumour size (mm, per case), weakly grade-related.
_AGE = (61.0, 58.0, 53.0)
_SIZE_MEDIAN = (15.0, 20.0, 26.0)

_H_REF = np.array([0.62, 0.72, 0.30])
_E_REF = np.array([0.15, 0.88, 0.45])


# ================================================================================== concentric crops
def concentric_stack(
    image: np.ndarray,
    center_xy: tuple[float, float],
    size: int,
    magnifications: Sequence[float],
    *,
    base_magnification: float | None = None,
) -> dict[float, np.ndarray]:
    """Concentric tiles of ``image`` (uint8, (H, W) or (H, W, C)) around the point ``center_xy`` = (x, y).

    ``image`` is at ``base_magnification`` (default: the highest requested). The tile at magnification ``m``
    covers ``size * base / m`` image pixels centred on the point (pixel ``(i, j)`` covers
    ``[i, i+1) x [j, j+1)``, as in :mod:`breastfusion.data.tiling`) and is area-averaged to ``size`` x
    ``size``: an exact block mean when the box falls on whole pixels and the factor is an integer, PIL
    ``BOX`` with a sub-pixel box otherwise. Returns ``{m: uint8 tile}``. A field that does not fit inside the
    image raises :class:`DataError` (no padding).
    """
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise ConfigError(f"concentric_stack needs a uint8 (H, W) or (H, W, C) image; got {arr.dtype} {arr.shape}.")
    mags = [float(m) for m in magnifications]
    if not mags or any(not math.isfinite(m) or m <= 0 for m in mags):
        raise ConfigError(f"magnifications must be positive numbers; got {magnifications!r}.")
    base = max(mags) if base_magnification is None else float(base_magnification)
    if any(m > base * (1 + 1e-9) for m in mags):
        raise ConfigError(f"magnification {max(mags):g}x exceeds the image's {base:g}x (no upsampling).")
    H, W = arr.shape[:2]
    cx, cy = float(center_xy[0]), float(center_xy[1])
    out: dict[float, np.ndarray] = {}
    for m, key in zip(mags, magnifications):
        f = size * base / m
        x0, y0 = cx - f / 2, cy - f / 2
        if x0 < -1e-6 or y0 < -1e-6 or x0 + f > W + 1e-6 or y0 + f > H + 1e-6:
            raise DataError(f"The {m:g}x field ({f:g} px) around ({cx:g}, {cy:g}) does not fit in the "
                            f"{W}x{H} image.")
        k = f / size
        ix, iy, fi, ki = round(x0), round(y0), round(f), round(k)
        if abs(x0 - ix) < 1e-6 and abs(y0 - iy) < 1e-6 and abs(f - fi) < 1e-6 and abs(k - ki) < 1e-6:
            crop = arr[iy:iy + fi, ix:ix + fi]
            if ki == 1:
                tile = crop.copy()
            else:
                blocks = crop.reshape(size, ki, size, ki, *crop.shape[2:]).astype(np.float32)
                tile = np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)
        else:
            ix0, iy0 = max(0, math.floor(x0 + 1e-9)), max(0, math.floor(y0 + 1e-9))
            ix1, iy1 = min(W, math.ceil(x0 + f - 1e-9)), min(H, math.ceil(y0 + f - 1e-9))
            region = np.ascontiguousarray(arr[iy0:iy1, ix0:ix1])
            box = (x0 - ix0, y0 - iy0, x0 - ix0 + f, y0 - iy0 + f)
            resample = Image.Resampling.BOX if k >= 1 - 1e-9 else Image.Resampling.BILINEAR
            tile = np.asarray(Image.fromarray(region).resize((size, size), resample=resample, box=box),
                              dtype=np.uint8)
        out[key] = tile
    return out


# ================================================================================== argument checks
def _int_arg(name: str, v, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer; got {v!r}.")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ConfigError(f"{name} must be {rng}; got {v!r}.")
    return int(v)


def _check_mags(magnifications, size: int) -> list[float]:
    if isinstance(magnifications, (str, bytes)) or not isinstance(magnifications, (Sequence, np.ndarray)) \
            or len(magnifications) == 0:
        raise ConfigError(f"magnifications must be a non-empty sequence of numbers such as (40, 20, 10); "
                          f"got {magnifications!r}.")
    mags = []
    for m in magnifications:
        if isinstance(m, bool) or not isinstance(m, (int, float, np.integer, np.floating)) or not math.isfinite(m) \
                or m <= 0:
            raise ConfigError(f"magnifications must be positive numbers; got {m!r} in {magnifications!r}.")
        mags.append(float(m))
    if len(set(mags)) != len(mags):
        raise ConfigError(f"magnifications must be distinct; got {magnifications!r}.")
    canvas = size * max(mags) / min(mags)
    if canvas > _MAX_CANVAS:
        raise ConfigError(f"size * max/min magnification = {canvas:g} px per side exceeds {_MAX_CANVAS}; "
                          "use a smaller size or a narrower magnification range.")
    return mags


# ================================================================================== drawing
def _blend(values: tuple[float, float, float], grade_idx: int, s: float) -> float:
    mid = float(np.mean(values))
    return mid + s * (values[grade_idx] - mid)


def _smooth_field(rng: np.random.Generator, C: int, cell: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth noise with features about ``cell`` px: Gaussian interpolation of a coarse
    random grid, as two small matrix products (no full-size filtering)."""
    n = int(math.ceil(C / cell)) + 5
    pos = (np.arange(n) - 2.0) * cell
    grid = np.arange(C, dtype=np.float64)[:, None]
    L = np.exp(-0.5 * ((grid - pos[None, :]) / (0.8 * cell)) ** 2)
    f = L @ rng.standard_normal((n, n)) @ L.T
    f -= f.mean()
    return (f / (f.std() + 1e-6)).astype(np.float32)


class _Bank:
    """Periodic texture fields shared by the canvases of one cohort; each canvas takes a random roll and
    flip of them (far cheaper than drawing and filtering new full-size noise for every canvas)."""

    N_ANGLES = 12

    def __init__(self, seed: int, C: int, k: float) -> None:
        self.C, self.k, self.seed = C, k, seed
        sig = max(k, 0.6)
        self.fine = self._periodic(0, 0.7 * sig, 0.7 * sig, 0.0)
        self.coarse = self._periodic(1, 1.8 * sig, 1.8 * sig, 0.0)
        self.pixel = np.random.default_rng([seed, 0xBA4C, 2]).standard_normal((C, C, 3)).astype(np.float32)
        self._fibres: dict[int, np.ndarray] = {}

    def _periodic(self, key: int, s_along: float, s_across: float, theta: float) -> np.ndarray:
        C = self.C
        rng = np.random.default_rng([self.seed, 0xBA4C, key])
        spec = np.fft.rfft2(rng.standard_normal((C, C)))
        fy = np.fft.fftfreq(C)[:, None]
        fx = np.fft.rfftfreq(C)[None, :]
        u = fx * math.cos(theta) + fy * math.sin(theta)
        v = -fx * math.sin(theta) + fy * math.cos(theta)
        spec *= np.exp(-2 * np.pi ** 2 * ((s_along * u) ** 2 + (s_across * v) ** 2))
        f = np.fft.irfft2(spec, s=(C, C))
        f -= f.mean()
        return (f / (f.std() + 1e-9)).astype(np.float32)

    def fibres(self, rng: np.random.Generator, theta: float) -> np.ndarray:
        """Collagen-like streaks along ``theta`` (radians, image x axis towards y)."""
        b = int(round((theta % np.pi) / np.pi * self.N_ANGLES)) % self.N_ANGLES
        if b not in self._fibres:
            self._fibres[b] = self._periodic(10 + b, 7.0 * self.k, 0.9 * self.k, b * np.pi / self.N_ANGLES)
        return self.take(rng, self._fibres[b], flip=False)

    def take(self, rng: np.random.Generator, field: np.ndarray, *, flip: bool = True) -> np.ndarray:
        """``field`` rolled by a random offset (and flipped upside down half of the time)."""
        dy, dx = (int(v) for v in rng.integers(0, self.C, 2))
        out = np.roll(field, (dy, dx), axis=(0, 1))
        if flip and rng.random() < 0.5:
            out = out[::-1]
        return out


def _stamp(C: int, cy, cx, a, b, th, od, *, irr=None, harm=None, ves=None, tex=None, coarse=None,
           budget: int = 600_000) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Render ellipses (optionally irregular, vesicular, textured) additively into flat (C*C) maps.

    Objects are grouped by their reach so that each is drawn on a patch just big enough for it. Returns
    (od map, fine-texture weight, coarse-texture weight); the texture maps are None without ``tex``."""
    n = len(cy)
    base = np.zeros(C * C, np.float32)
    tf = np.zeros(C * C, np.float32) if tex is not None else None
    tc = np.zeros(C * C, np.float32) if tex is not None else None
    if n == 0:
        return base, tf, tc
    irr_all = np.zeros(n, np.float32) if irr is None else irr
    reach = np.ceil(a * (1 + 1.5 * irr_all) + 1.5).astype(np.int64)
    reach = np.maximum(2, reach + (reach % 2))  # even radii: fewer groups
    for h in np.unique(reach):
        members = np.flatnonzero(reach == h)
        d = np.arange(-h, h + 1, dtype=np.float32)
        di = d.astype(np.int64)
        step = max(1, budget // (2 * int(h) + 1) ** 2)
        for s0 in range(0, len(members), step):
            sl = members[s0:s0 + step]
            y, x = cy[sl], cx[sl]
            iy, ix = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
            Y = d[None, :, None] - (y - iy - 0.5)[:, None, None].astype(np.float32)
            X = d[None, None, :] - (x - ix - 0.5)[:, None, None].astype(np.float32)
            c, s_ = np.cos(th[sl])[:, None, None], np.sin(th[sl])[:, None, None]
            bb = b[sl][:, None, None]
            xn = (X * c + Y * s_) / a[sl][:, None, None]
            yn = (Y * c - X * s_) / bb
            rho = np.sqrt(xn * xn + yn * yn) + 1e-6
            bound = 1.0
            if harm is not None:
                cs, sn = xn / rho, yn / rho
                c2, s2 = cs * cs - sn * sn, 2 * cs * sn
                c3, s3 = cs * (4 * cs * cs - 3), sn * (3 - 4 * sn * sn)
                hm = harm[sl]
                col = lambda v: v[:, None, None]
                bound = 1.0 + col(irr[sl]) * (
                    col(hm[:, 0]) * (c2 * col(np.cos(hm[:, 1])) - s2 * col(np.sin(hm[:, 1])))
                    + col(hm[:, 2]) * (c3 * col(np.cos(hm[:, 3])) - s3 * col(np.sin(hm[:, 3]))))
            prof = np.clip((bound - rho) * bb + 0.5, 0.0, 1.0)
            if ves is not None:
                prof *= 1.0 - ves[sl][:, None, None] * np.clip(1.0 - (rho / bound) ** 2, 0.0, 1.0)
            w = prof * od[sl][:, None, None]
            py = iy[:, None, None] + di[None, :, None]
            px = ix[:, None, None] + di[None, None, :]
            ok = (py >= 0) & (py < C) & (px >= 0) & (px < C) & (w > 1e-4)
            idx = (py * C + px)[ok]
            wk = w[ok]
            base += np.bincount(idx, wk, minlength=C * C).astype(np.float32)
            if tex is not None:
                wt = wk * np.broadcast_to(tex[sl][:, None, None], w.shape)[ok]
                cw = np.broadcast_to(coarse[sl][:, None, None], w.shape)[ok]
                tf += np.bincount(idx, wt * (1 - cw), minlength=C * C).astype(np.float32)
                tc += np.bincount(idx, wt * cw, minlength=C * C).astype(np.float32)
    return base, tf, tc


def _case_params(rng: np.random.Generator, g: int, s: float) -> dict[str, float]:
    """Grade parameters blended by ``signal``, with grade-independent case-to-case variation."""
    p = {k: _blend(v, g, s) for k, v in _GRADE_PARAMS.items()}
    jitter = {"gland_density": 0.30, "sheet_frac": 0.25, "spacing": 0.06, "nuc_radius": 0.08, "nuc_od": 0.07,
              "mitoses": 0.35, "chromatin": 0.15, "lumen_ratio": 0.08}
    for k, sd in jitter.items():
        p[k] *= float(np.exp(sd * rng.standard_normal()))
    for key, (lo, hi) in _BOUNDS.items():  # signal > 1 extrapolates: keep every quantity physical
        p[key] = float(np.clip(p[key], lo, hi))
    p["lymph"] = float(rng.gamma(2.0, 0.5))  # lymphocytic infiltrate, grade-independent
    p["stroma_od"] = float(rng.uniform(0.45, 0.65))
    p["fibre_angle"] = float(rng.uniform(0, np.pi))
    return p


def _draw_canvas(rng: np.random.Generator, bank: _Bank, C: int, k: float, p: dict[str, float],
                 stain: dict) -> np.ndarray:
    """One tissue canvas (C x C, uint8 RGB); ``k`` = canvas pixels per 40x pixel."""
    area40 = (C / k) ** 2 / 1e5  # canvas area in units of 1e5 40x-px^2

    # ---------------------------------------------------------------- glands (tubule formation)
    n_target = rng.poisson(p["gland_density"] * area40)
    glands = []
    for _ in range(n_target):
        for _try in range(25):
            R = p["gland_radius"] * k * rng.uniform(0.75, 1.3)
            gy, gx = rng.uniform(-0.2 * R, C + 0.2 * R, 2)
            if all((gy - oy) ** 2 + (gx - ox) ** 2 > (R + oR + 8 * k) ** 2 for oy, ox, oR, *_ in glands):
                glands.append((gy, gx, R, rng.uniform(0, 0.10), rng.uniform(0, 2 * np.pi, 2)))
                break
    gland_w = np.zeros((C, C), np.float32)   # epithelium + lumen (the gland's disc)
    lumen_w = np.zeros((C, C), np.float32)
    g_nuc = []  # (y, x, theta) of gland nuclei
    for gy, gx, R, gir, ph in glands:
        m = int(R * 1.3) + 3
        y0, y1 = max(0, int(gy) - m), min(C, int(gy) + m + 1)
        x0, x1 = max(0, int(gx) - m), min(C, int(gx) + m + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - gy
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - gx
        phi = np.arctan2(dy, dx)
        Rphi = R * (1 + gir * (np.cos(2 * phi + ph[0]) + 0.6 * np.cos(3 * phi + ph[1])))
        rho = np.sqrt(dy * dy + dx * dx) / Rphi
        lr = p["lumen_ratio"] * rng.uniform(0.85, 1.15)
        np.maximum(gland_w[y0:y1, x0:x1], np.clip((1 - rho) * R / 1.5 + 0.5, 0, 1), out=gland_w[y0:y1, x0:x1])
        np.maximum(lumen_w[y0:y1, x0:x1], np.clip((lr - rho) * R / 1.5 + 0.5, 0, 1), out=lumen_w[y0:y1, x0:x1])
        # one (grade 1) to a few (stratified, grade 3) layers of nuclei around the lumen
        r_mid = R * (lr + 1) / 2
        n = max(6, int(2 * np.pi * r_mid / (p["spacing"] * k * 0.8)))
        ang = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi) + rng.normal(0, 0.05, n)
        rr_rel = lr + (1 - lr) * np.clip(rng.normal(0.5, 0.08 + 0.1 * p["polarity_sd"], n), 0.15, 0.85)
        rr = R * rr_rel * (1 + gir * (np.cos(2 * ang + ph[0]) + 0.6 * np.cos(3 * ang + ph[1])))
        g_nuc.append(np.stack([gy + rr * np.sin(ang), gx + rr * np.cos(ang),
                               ang + rng.normal(0, p["polarity_sd"], n)], axis=1))

    # ---------------------------------------------------------------- solid tumour sheets
    field = _smooth_field(rng, C, 70 * k)
    thr = float(np.quantile(field[::4, ::4], 1 - p["sheet_frac"]))
    sheet_w = np.clip((field - thr) * 4 + 0.5, 0, 1) * np.clip(1 - gland_w * 1.3, 0, 1)
    epi_w = np.clip(np.maximum(gland_w - lumen_w, sheet_w), 0, 1)
    stroma_w = np.clip(1 - gland_w - sheet_w, 0, 1)

    # sheet nuclei: a jittered grid thinned by the sheet weight
    sp = p["spacing"] * k
    g = np.arange(sp / 2, C, sp)
    gy_, gx_ = np.meshgrid(g, g, indexing="ij")
    py = (gy_ + rng.uniform(-0.38, 0.38, gy_.shape) * sp).ravel()
    px = (gx_ + rng.uniform(-0.38, 0.38, gx_.shape) * sp).ravel()
    inside = (py >= 0) & (py < C) & (px >= 0) & (px < C)
    py, px = py[inside], px[inside]
    keep = rng.random(len(py)) < sheet_w[py.astype(int), px.astype(int)] ** 1.5
    s_nuc = np.stack([py[keep], px[keep], rng.uniform(0, np.pi, int(keep.sum()))], axis=1)
    t_nuc = np.concatenate([s_nuc, *g_nuc], axis=0) if g_nuc else s_nuc

    # mitoses replace some tumour nuclei
    tumour_area = float(epi_w.mean()) * area40
    n_mit = min(len(t_nuc), int(rng.poisson(p["mitoses"] * tumour_area)))
    mit_idx = rng.choice(len(t_nuc), n_mit, replace=False) if n_mit else np.zeros(0, int)
    is_mit = np.zeros(len(t_nuc), bool)
    is_mit[mit_idx] = True
    mit = t_nuc[is_mit]
    t_nuc = t_nuc[~is_mit]

    # ---------------------------------------------------------------- tumour nuclei (pleomorphism)
    nt = len(t_nuc)
    a = p["nuc_radius"] * k * np.exp(p["nuc_size_cv"] * rng.standard_normal(nt))
    a = np.clip(a, 2.0 * k, 3.2 * p["nuc_radius"] * k)
    asp = np.clip(rng.normal(p["nuc_aspect"], p["nuc_aspect_sd"], nt), 0.35, 1.0)
    od = p["nuc_od"] * np.exp(p["nuc_od_cv"] * rng.standard_normal(nt))
    irr = np.full(nt, p["nuc_irregular"]) * rng.uniform(0.5, 1.5, nt)
    harm = np.stack([rng.uniform(0.3, 1.0, nt), rng.uniform(0, 2 * np.pi, nt),
                     rng.uniform(0.2, 0.8, nt), rng.uniform(0, 2 * np.pi, nt)], axis=1)
    ves = np.clip(p["vesicular"] * rng.uniform(0.3, 1.7, nt), 0, 0.7)
    tex = p["chromatin"] * rng.uniform(0.7, 1.3, nt)
    coarse = np.clip(p["coarse"] + rng.normal(0, 0.1, nt), 0, 1)
    f32 = lambda v: np.asarray(v, np.float32)
    H, Tf, Tc = _stamp(C, f32(t_nuc[:, 0]), f32(t_nuc[:, 1]), f32(a), f32(a * asp), f32(t_nuc[:, 2]), f32(od),
                       irr=f32(irr), harm=f32(harm), ves=f32(ves), tex=f32(tex), coarse=f32(coarse))

    # ---------------------------------------------------------------- small dark objects: nucleoli, mitoses,
    # stromal fibroblasts and lymphocytes
    blobs = []  # rows: y, x, a, b, theta, od
    has_nl = rng.random(nt) < p["nucleoli"]
    if has_nl.any():
        off = rng.uniform(0, 0.35, int(has_nl.sum())) * a[has_nl]
        ang = rng.uniform(0, 2 * np.pi, len(off))
        r_nl = 0.16 * a[has_nl] + 0.5 * k
        blobs.append(np.stack([t_nuc[has_nl, 0] + off * np.sin(ang), t_nuc[has_nl, 1] + off * np.cos(ang),
                               r_nl, r_nl, np.zeros_like(r_nl), np.full(len(r_nl), 0.9)], axis=1))
    for y, x, _ in mit:
        r0 = p["nuc_radius"] * k
        if rng.random() < 0.5:  # metaphase plate: a bar of clumped chromosomes
            th = rng.uniform(0, np.pi)
            t = rng.uniform(-0.9, 0.9, 7) * r0
            blobs.append(np.stack([y + t * np.sin(th) + rng.normal(0, 0.5 * k, 7),
                                   x + t * np.cos(th) + rng.normal(0, 0.5 * k, 7),
                                   np.full(7, 1.6 * k), np.full(7, 1.3 * k), np.zeros(7), np.full(7, 1.4)], axis=1))
            if rng.random() < 0.4:  # anaphase: a second, parallel bar
                sh = rng.uniform(0.8, 1.3) * r0
                blobs.append(blobs[-1] + np.array([sh * np.cos(th), -sh * np.sin(th), 0, 0, 0, 0]))
        else:  # prophase / prometaphase: a tight clump of small dark knots
            m = int(rng.integers(6, 11))
            rr, aa_ = rng.uniform(0, 0.6 * r0, m), rng.uniform(0, 2 * np.pi, m)
            blobs.append(np.stack([y + rr * np.sin(aa_), x + rr * np.cos(aa_), rng.uniform(1.2, 2.0, m) * k,
                                   rng.uniform(1.0, 1.6, m) * k, rng.uniform(0, np.pi, m), np.full(m, 1.3)], axis=1))
    stroma_frac = float(stroma_w.mean())
    n_fib = rng.poisson(55 * area40 * stroma_frac)
    n_lym = rng.poisson(40 * p["lymph"] * area40 * stroma_frac)
    for n, kind in ((n_fib, "fib"), (n_lym, "lym")):
        if n == 0:
            continue
        cand_y, cand_x = rng.uniform(0, C, 4 * n), rng.uniform(0, C, 4 * n)
        ok = rng.random(4 * n) < stroma_w[cand_y.astype(int), cand_x.astype(int)]
        cand_y, cand_x = cand_y[ok][:n], cand_x[ok][:n]
        m = len(cand_y)
        if kind == "fib":
            blobs.append(np.stack([cand_y, cand_x, rng.uniform(5, 8, m) * k, rng.uniform(1.3, 2.0, m) * k,
                                   p["fibre_angle"] + rng.normal(0, 0.25, m), rng.uniform(0.8, 1.1, m)], axis=1))
        else:
            r = rng.uniform(2.8, 3.6, m) * k
            blobs.append(np.stack([cand_y, cand_x, r, r * rng.uniform(0.85, 1.0, m), rng.uniform(0, np.pi, m),
                                   rng.uniform(1.3, 1.6, m)], axis=1))
    if blobs:
        B = np.concatenate(blobs, axis=0).astype(np.float32)
        Hb, _, _ = _stamp(C, B[:, 0], B[:, 1], np.maximum(B[:, 2], 0.6), np.maximum(B[:, 3], 0.6), B[:, 4], B[:, 5])
        H += Hb

    # ---------------------------------------------------------------- chromatin texture and stroma fibres
    H = H.reshape(C, C)
    H += Tf.reshape(C, C) * bank.take(rng, bank.fine) + Tc.reshape(C, C) * bank.take(rng, bank.coarse)
    np.clip(H, 0, None, out=H)
    nuc_cover = np.clip(H / 0.8, 0, 1)

    fib = bank.fibres(rng, p["fibre_angle"] + rng.normal(0, 0.15))
    wavy = _smooth_field(rng, C, 40 * k)
    stroma_e = p["stroma_od"] * np.clip(0.85 + 0.18 * fib + 0.12 * wavy, 0.15, 1.6)
    E = stroma_w * stroma_e + epi_w * 0.33 + lumen_w * 0.03
    E = E * (1 - 0.55 * nuc_cover)
    Hc = epi_w * 0.10 + stroma_w * 0.03  # faint basophilia of cytoplasm and ground substance

    # ---------------------------------------------------------------- Beer-Lambert to RGB, centre stain + blur
    Ht = H + Hc
    if stain["blur"] > 0.05:  # scanner blur (applied to the stain densities: two channels instead of three)
        Ht = ndi.gaussian_filter(Ht, stain["blur"] * k, truncate=3.0)
        E = ndi.gaussian_filter(E, stain["blur"] * k, truncate=3.0)
    hv, ev = stain["hs"] * stain["hv"], stain["es"] * stain["ev"]
    rgb = 1.5 * bank.take(rng, bank.pixel)
    for ch in range(3):
        rgb[..., ch] += stain["I0"][ch] * np.exp(-(Ht * hv[ch] + E * ev[ch]))
    np.rint(rgb, out=rgb)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _centre_stains(rng: np.random.Generator, n_centers: int) -> list[dict]:
    out = []
    for c in range(n_centers):
        ref = c == 0  # centre 0 is the reference stain
        hv = _H_REF + (0 if ref else rng.normal(0, 0.07, 3))
        ev = _E_REF + (0 if ref else rng.normal(0, 0.09, 3))
        hv = np.clip(hv, 0.05, None)
        ev = np.clip(ev, 0.05, None)
        out.append({
            "hv": (hv / np.linalg.norm(hv)).astype(np.float32),
            "ev": (ev / np.linalg.norm(ev)).astype(np.float32),
            "hs": 1.0 if ref else float(np.exp(rng.normal(0, 0.15))),
            "es": 1.0 if ref else float(np.exp(rng.normal(0, 0.18))),
            "I0": (np.full(3, 246.0) + (0 if ref else rng.uniform(-8, 8, 3))).astype(np.float32),
            "blur": float(rng.uniform(0.0, 0.25)) if ref else float(rng.uniform(0.2, 1.1)),
        })
    return out


def _slide_stain(rng: np.random.Generator, centre: dict) -> dict:
    """Slide-to-slide variation within a centre (small)."""
    return {**centre, "hs": centre["hs"] * float(np.exp(rng.normal(0, 0.05))),
            "es": centre["es"] * float(np.exp(rng.normal(0, 0.06)))}


# ================================================================================== the cohort
def make_synthetic_grading(
    out_dir: str | Path,
    *,
    n_patients: int = 24,
    cases_per_patient: int = 1,
    stacks_per_case: int = 4,
    magnifications: Sequence[float] = (40, 20, 10),
    size: int = 128,
    n_centers: int = 3,
    signal: float = 1.0,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write a SYNTHETIC Nottingham-grade tile cohort under ``out_dir``; return ``(cases, tiles)``.

    Parameters
    ----------
    n_patients : patients (>= 3); grades ``"1"``/``"2"``/``"3"`` are allocated as evenly as possible.
    cases_per_patient : cases (tumour blocks) per patient; they share the patient's grade, centre and age.
    stacks_per_case : concentric stacks (locations) per case.
    magnifications : e.g. (40, 20, 10); the highest is drawn at full resolution, the others are
        area-averaged fields ``max/m`` times wider.
    size : tile side in pixels (16-1024).
    n_centers : centres ``synthetic_center_0`` ... (each with its own stain colour and blur; >= 1). Patients
        are spread over centres grade by grade, so every centre has every grade when
        ``n_patients >= 3 * n_centers``.
    signal : in [0, 1] (values above 1 exaggerate): how strongly grade changes the images and the clinical
        columns; 0 = labels unlearnable.
    seed : everything is a deterministic function of the arguments.

    Paths in the returned tables are absolute; ``cases.csv`` / ``tiles.csv`` hold them relative to
    ``out_dir``. PNGs of an earlier synthetic cohort in ``out_dir/SYNTHETIC_tiles`` are removed first.
    """
    n_patients = _int_arg("n_patients", n_patients, 3)
    cases_per_patient = _int_arg("cases_per_patient", cases_per_patient, 1)
    stacks_per_case = _int_arg("stacks_per_case", stacks_per_case, 1)
    size = _int_arg("size", size, 16, 1024)
    n_centers = _int_arg("n_centers", n_centers, 1)
    seed = _int_arg("seed", seed, 0)
    if isinstance(signal, bool) or not isinstance(signal, (int, float, np.integer, np.floating)) \
            or not math.isfinite(signal) or signal < 0:
        raise ConfigError(f"signal must be a finite number >= 0 (0 = no grade signal, 1 = clear); got {signal!r}.")
    s = float(signal)
    mags = _check_mags(magnifications, size)
    m_max, m_min = max(mags), min(mags)
    C = int(round(size * m_max / m_min))
    k = m_max / 40.0  # canvas pixels per 40x pixel
    mag_order = sorted(mags, reverse=True)

    out_dir = Path(out_dir)
    tiles_root = out_dir / TILES_DIR
    if tiles_root.is_dir():
        for f in tiles_root.glob("synh_*/synh_*.png"):
            f.unlink()
    tiles_root.mkdir(parents=True, exist_ok=True)

    ss = np.random.SeedSequence([seed, 0x4E07])
    rng_cohort, rng_clin, rng_centres, rng_missing = (np.random.default_rng(x) for x in ss.spawn(4))
    case_seq = ss.spawn(1)[0]

    # grades per patient: balanced, shuffled; centres dealt out grade by grade
    base = np.arange(n_patients) % 3
    grade_idx = base[rng_cohort.permutation(n_patients)]
    centre = np.empty(n_patients, dtype=int)
    offset = int(rng_cohort.integers(0, n_centers))
    order = np.lexsort((rng_cohort.random(n_patients), grade_idx))
    centre[order] = (np.arange(n_patients) + offset) % n_centers
    stains = _centre_stains(rng_centres, n_centers)
    bank = _Bank(seed, C, k)

    n_cases = n_patients * cases_per_patient
    width = max(4, len(str(n_cases)))
    pw = max(4, len(str(n_patients)))
    pat_of_case = np.repeat(np.arange(n_patients), cases_per_patient)
    case_ids = [f"synh_{i:0{width}d}" for i in range(n_cases)]
    patient_ids = [f"synhp_{p:0{pw}d}" for p in pat_of_case]

    # clinical columns (weakly grade-related through signal)
    age = np.array([_blend(_AGE, g, s) for g in grade_idx]) + 11 * rng_clin.standard_normal(n_patients)
    age = np.clip(np.round(age), 28, 90)[pat_of_case]
    med = np.maximum(np.array([_blend(_SIZE_MEDIAN, g, s) for g in grade_idx[pat_of_case]]), 3.0)
    tsize = np.round(np.clip(med * np.exp(0.45 * rng_clin.standard_normal(n_cases)), 2, 120), 1)
    age_missing = (rng_missing.random(n_patients) < _MISSING_RATE)[pat_of_case]
    size_missing = rng_missing.random(n_cases) < _MISSING_RATE
    age_col = pd.array(np.where(age_missing, 0, age).astype(np.int64), dtype="Int64")
    age_col[age_missing] = pd.NA
    tsize[size_missing] = np.nan

    rows = []
    for i, cseq in enumerate(case_seq.spawn(n_cases)):
        p = int(pat_of_case[i])
        rng = np.random.default_rng(cseq)
        params = _case_params(rng, int(grade_idx[p]), s)
        stain = _slide_stain(rng, stains[int(centre[p])])
        case_dir = tiles_root / case_ids[i]
        case_dir.mkdir(exist_ok=True)
        for j in range(stacks_per_case):
            canvas = _draw_canvas(rng, bank, C, k, params, stain)
            stack = concentric_stack(canvas, (C / 2, C / 2), size, mag_order, base_magnification=m_max)
            for m in mag_order:
                path = case_dir / f"{case_ids[i]}_s{j}_{m:g}x.png"
                _save_png(path, stack[m])
                rows.append((case_ids[i], str(j), int(m) if float(m).is_integer() else m, str(path.resolve()),
                             MPP_AT_40X * 40.0 / m))

    cases = pd.DataFrame({
        "case_id": case_ids,
        "patient_id": patient_ids,
        "center": [f"synthetic_center_{int(centre[p])}" for p in pat_of_case],
        "label": [GRADES[int(grade_idx[p])] for p in pat_of_case],
        "age": age_col,
        "tumour_size_mm": tsize,
        SYNTHETIC_COLUMN: True,
    })
    tiles = pd.DataFrame(rows, columns=["case_id", "stack_id", "magnification", "image_path", "_mpp"])
    tiles[SYNTHETIC_COLUMN] = True
    write_cases(cases, out_dir / "cases.csv")
    write_tiles(tiles, out_dir / "tiles.csv")
    _write_notice(out_dir / NOTICE, cases, tiles, dict(
        n_patients=n_patients, cases_per_patient=cases_per_patient, stacks_per_case=stacks_per_case,
        magnifications=tuple(mags), size=size, n_centers=n_centers, signal=s, seed=seed))
    log.info("synthetic grading cohort: %d cases, %d tiles in %s", n_cases, len(tiles), out_dir)
    return cases, tiles


def _save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path, optimize=False, compress_level=1)


def _write_notice(path: Path, cases: pd.DataFrame, tiles: pd.DataFrame, params: dict) -> None:
    from breastfusion.utils import write_text

    counts = cases["label"].value_counts().sort_index().to_dict()
    lines = [
        f"{SYNTHETIC_TAG} DATA - not real tissue, not real patients",
        "",
        "Everything in this folder was generated by breastfusion.data.synthetic_histology.make_synthetic_grading:",
        "procedural H&E-like tissue drawn at random, with Nottingham-grade-like differences (gland formation,",
        "nuclear pleomorphism, mitoses) scaled by 'signal'. Age and tumour size are random draws. No person",
        "and no slide is described. Use it for demos, tests and pipeline checks only; results derived from it",
        f"must be labelled {SYNTHETIC_TAG} (every row of cases.csv and tiles.csv has {SYNTHETIC_COLUMN} = True).",
        "",
        "Parameters:",
        *[f"  {k}: {v}" for k, v in params.items()],
        f"  generator version: {GENERATOR_VERSION}",
        "",
        (f"Contents: {len(cases)} cases from {cases['patient_id'].nunique()} patients in "
         f"{cases['center'].nunique()} centres; {len(tiles)} tiles in {TILES_DIR}/"),
        "Grades: " + ", ".join(f"{k}: {v}" for k, v in counts.items()),
        "",
    ]
    write_text("\n".join(lines), path)
