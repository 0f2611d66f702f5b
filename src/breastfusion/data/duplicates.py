"""Exact and near-duplicate images: which cases show the same frame, grouped so that a split keeps them together.

Exact copies have identical decoded pixels (:func:`pixel_hash`, :func:`exact_groups`). Near-duplicates are found
by :func:`find_duplicates` and joined with the exact copies into groups by :func:`group_duplicates`. The audit
(:func:`breastfusion.data.audit.audit_cases`) reads the images, calls these and reports the groups.

Near-duplicates
---------------
Public ultrasound sets (BUSI in particular) hold the same frame several times: re-saved with other
caliper marks or text, slightly cropped, shifted or rescaled, sometimes under another label. Whole-file
hashes miss these. Two images are near-duplicates here when one can be *aligned* onto the other by a
scale and a shift so that their fine texture (speckle, tissue edges) correlates. After a content mask
is made for each image, the check runs in two stages so that it stays fast (624 BUSI images: about
half a minute on one core):

0. **Content mask.** Scanner exports show the scan inside a black frame: a curvilinear probe's sector
   (fan), or a rectangle, with depth ticks, rulers and text on the frame. Every export of one scanner
   has the *same* frame, and its sharp edges correlate strongly between unrelated images. So each image
   gets a content mask (the scan: not flat black, thin ticks and text opened away, holes filled, see
   :func:`_content_mask`); low-resolution comparisons use the image with the frame filled in by a smooth
   continuation of the scan, and texture is band-passed by normalised convolution inside the mask and
   compared only where both images show content, 3 px (at 160 px) away from the mask edge. Images
   without a frame (most of BUSI) are all content and are handled as before.
1. **Candidates.** Each image gives 81 small (12x12) normalised thumbnails: the whole image and
   sub-windows with 0, 6 or 12 % trimmed from each side. Every image's whole-image thumbnail is
   correlated with every other image's sub-window thumbnails (one matrix product). A pair is a
   candidate if that best correlation is high, or if it is among an image's few best matches.
   Thumbnails are resized to a fixed size, so a rescaled copy matches; sub-windows make crops match.
2. **Verification.** For each candidate pair, scale hypotheses (1, the size ratios, the ones implied by
   the matching sub-windows) are tried at 64 px: the smaller image is resized and its best shift over
   the larger one is found by masked normalised cross-correlation over all shifts (overlap >= 40 %).
   At 160 px, on band-pass (difference of Gaussians) images, the alignment is refined: a 3x3 grid of
   patches is matched by phase correlation and a scale + shift is fitted to their displacements (the
   patches of one frame move together; those of unrelated images scatter and the fit is dropped).
   The *texture score* is the median correlation over a 4x4 grid of blocks of the aligned overlap
   (blocks less than half content in either image are left out; fewer than 4 blocks left: score 0).
   Calipers, text and rulers spoil only a few blocks; the dark background and smooth anatomy that
   unrelated images share carry little band-pass energy. On BUSI unrelated candidate pairs score
   below ~0.27, copies of one frame 0.8-1, neighbouring frames of one cine sweep 0.2-0.6.

A pair is a near-duplicate when its texture score is >= ``near_dup_threshold`` (default 0.35) and the
aligned images overlap over >= 60 % of the smaller one. Pairs are joined into groups with union-find;
exact copies (identical decoded pixels) are joined too, strongest pairs first, and each group records
the weakest link it needed (``min_link``). A group whose labels differ but that hangs on a link below
0.6, or one with more than 8 images (a chain of unrelated images?), is listed as *suspicious*: true
copies of one frame score 0.8-1 (every BUSI label conflict scores >= 0.9). The rejected pairs that
scored highest are kept in the report (``borderline_pairs``) for a person to look at. Memory and time
of the candidate stage grow with the square of the number of images (fine for thousands, not 10^5).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from breastfusion.utils import UnionFind

NEAR_DUP_THRESHOLD = 0.35
MIN_OVERLAP = 0.6

_COARSE = 64      # longer side of the coarse alignment image
_MID = 160        # longer side of the texture-verification image
_BASE = 96        # square base image the sub-window thumbnails are cut from
_THUMB = 12       # thumbnail side
_TRIMS = (0.0, 0.06, 0.12)
_CAND_MIN = 0.93  # candidate if the best window correlation reaches this ...
_CAND_TOPK = 3    # ... or if it is among an image's best _CAND_TOPK matches and reaches _CAND_FLOOR
_CAND_FLOOR = 0.85
_COARSE_REJECT = 0.70  # skip the texture stage below this intensity NCC at 64 px
_BG_LEVEL = 8     # background (frame) pixels: 3x3 neighbourhood at or below this 8-bit level
_EDGE = 3         # mid pixels trimmed from the edge of the content mask before texture is compared
_BLOCK_MIN = 0.5  # a texture block counts only if this share of it is content in both images
_MIN_BLOCKS = 4   # fewer usable blocks than this: no texture score (0)
STRONG_LINK = 0.6  # a group with several labels held together by a weaker link is flagged as suspicious
LARGE_GROUP = 8    # ... as is a group with more images than this (chained unrelated images?)


# ----------------------------------------------------------------------------------------------------
# Image signatures
# ----------------------------------------------------------------------------------------------------

def _windows() -> np.ndarray:
    """Sub-windows (x0, x1, y0, y1) as fractions; row 0 is the whole image."""
    rows = [(l, 1 - r, t, 1 - b) for l in _TRIMS for r in _TRIMS for t in _TRIMS for b in _TRIMS]
    return np.array(rows, dtype=np.float64)


_WIN = _windows()


def _resize(a: np.ndarray, h: int, w: int, resample=Image.BOX) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((int(w), int(h)), resample), dtype=np.float32)


def _fit(a: np.ndarray, longer: int) -> tuple[np.ndarray, float]:
    h, w = a.shape
    f = longer / max(h, w)
    return _resize(a, max(8, round(h * f)), max(8, round(w * f))), f


def _znorm(v: np.ndarray) -> np.ndarray:
    v = v - v.mean(axis=-1, keepdims=True)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-6)


def _window_thumbs(base: np.ndarray) -> np.ndarray:
    """(n_windows, THUMB*THUMB) z-normalised block means of every sub-window of a square base image."""
    n = base.shape[0]
    integ = np.zeros((n + 1, n + 1))
    integ[1:, 1:] = base.astype(np.float64).cumsum(0).cumsum(1)
    t = np.linspace(0.0, 1.0, _THUMB + 1)
    xs = np.rint((_WIN[:, 0:1] + (_WIN[:, 1:2] - _WIN[:, 0:1]) * t) * n).astype(int)
    ys = np.rint((_WIN[:, 2:3] + (_WIN[:, 3:4] - _WIN[:, 2:3]) * t) * n).astype(int)
    y0, y1 = ys[:, :-1, None], ys[:, 1:, None]
    x0, x1 = xs[:, None, :-1], xs[:, None, 1:]
    sums = integ[y1, x1] - integ[y0, x1] - integ[y1, x0] + integ[y0, x0]
    area = np.maximum((y1 - y0) * (x1 - x0), 1)
    return _znorm((sums / area).reshape(len(_WIN), -1)).astype(np.float32)


def _dog(a: np.ndarray) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    a = a.astype(np.float32, copy=False)
    return gaussian_filter(a, 0.8, truncate=3.0) - gaussian_filter(a, 3.0, truncate=2.5)


def _content_mask(u8: np.ndarray) -> np.ndarray:
    """Pixels that show the scan (tissue), as opposed to the flat black background around a sector
    (curvilinear probe) or a rectangular field of view, and the thin ticks, rulers and text drawn on it.

    Background: pixels whose 3x3 neighbourhood stays at or below ``_BG_LEVEL``. The rest is opened with
    a 5x5 square (removes lines and text strokes thinner than 5 px, also where they touch the scan),
    components smaller than a tenth of the largest (logos, labels) are dropped and holes (dark cysts
    inside the scan) are filled. An image without such background is all content."""
    from scipy import ndimage as ndi

    fg = ndi.maximum_filter(u8, 3) > _BG_LEVEL
    if fg.all():
        return fg
    fg = ndi.binary_opening(fg, structure=np.ones((5, 5), bool))
    lab, n = ndi.label(fg)
    if n == 0:
        return np.ones(u8.shape, bool)
    sizes = np.bincount(lab.ravel())[1:]
    keep = np.concatenate([[False], sizes >= 0.1 * sizes.max()])
    fg = ndi.binary_fill_holes(keep[lab])
    if fg.mean() < 0.05:  # (nearly) all dark: no frame to find
        return np.ones(u8.shape, bool)
    return fg


def _erode(m: np.ndarray, r: int = 0) -> np.ndarray:
    """``m`` eroded by ``r`` (default ``_EDGE``) pixels away from its own edges; the image border does not erode."""
    from scipy import ndimage as ndi

    r = r or _EDGE
    if m.all():
        return m
    return ndi.binary_erosion(m, structure=np.ones((2 * r + 1, 2 * r + 1), bool), border_value=1)


def _masked_dog(a: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Band-pass (difference of Gaussians) of ``a`` computed from the pixels in ``m`` only (normalised
    convolution), zero outside ``m``: the edge of the scan against the black frame gives no response."""
    if m.all():
        return _dog(a)
    from scipy.ndimage import gaussian_filter

    a = a.astype(np.float32, copy=False)
    mf = m.astype(np.float32)
    am = a * mf
    out = np.zeros_like(a)
    for sigma, trunc, sign in ((0.8, 3.0, 1.0), (3.0, 2.5, -1.0)):
        w = gaussian_filter(mf, sigma, truncate=trunc)
        out += sign * gaussian_filter(am, sigma, truncate=trunc) / np.maximum(w, 1e-3)
    out[~m] = 0.0
    return out


def _fill_background(a: np.ndarray, m: np.ndarray, sigma: float = 6.0) -> np.ndarray:
    """``a`` with the pixels outside ``m`` replaced by a smooth continuation of the content nearby, so
    that the outline of the field of view (the same for every image of one scanner) does not dominate
    low-resolution comparisons."""
    if m.all():
        return a
    from scipy.ndimage import gaussian_filter

    a = a.astype(np.float32)
    mf = m.astype(np.float32)
    fill = float(a[m].mean()) if m.any() else float(a.mean())
    for s in (sigma, 4 * sigma):
        w = gaussian_filter(mf, s)
        est = gaussian_filter(a * mf, s) / np.maximum(w, 1e-6)
        ok = w > 0.05
        fill = np.where(ok, est, fill)
    return np.where(m, a, fill)


@dataclass
class Signature:
    shape: tuple[int, int]
    coarse: np.ndarray      # background-filled image at _COARSE px
    fc: float
    mid_u8: np.ndarray      # image at _MID px
    mid_fill: np.ndarray    # background-filled image at _MID px (uint8)
    mid_mask: np.ndarray    # content mask at _MID px
    mid_dog: np.ndarray     # masked band-pass at _MID px
    mid_valid: np.ndarray   # content mask eroded by _EDGE: where texture is compared
    fm: float
    thumbs: np.ndarray


def signature(gray: np.ndarray) -> Signature:
    u8 = np.clip(np.rint(gray * 255.0), 0, 255).astype(np.uint8)
    mid, fm = _fit(u8, _MID)
    mid_u8 = np.clip(np.rint(mid), 0, 255).astype(np.uint8)
    mask = _content_mask(mid_u8)
    fill_u8 = np.clip(np.rint(_fill_background(mid_u8, mask)), 0, 255).astype(np.uint8)
    coarse, _ = _fit(fill_u8, _COARSE)
    fc = fm * coarse.shape[1] / mid_u8.shape[1]
    base = _resize(fill_u8, _BASE, _BASE)
    return Signature(u8.shape, coarse, fc, mid_u8, fill_u8, mask, _masked_dog(mid, mask), _erode(mask), fm,
                      _window_thumbs(base))


def pixel_hash(gray: np.ndarray) -> str:
    u8 = np.clip(np.rint(gray * 255.0), 0, 255).astype(np.uint8)
    h = hashlib.sha1(f"{u8.shape}".encode())
    h.update(np.ascontiguousarray(u8).tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Alignment and verification
# ----------------------------------------------------------------------------------------------------

def _box_sums(x: np.ndarray, hb: int, wb: int) -> np.ndarray:
    """Sums of x (..., H, W) under an hb x wb window whose top-left is at every shift
    (-(hb-1) .. H-1, -(wb-1) .. W-1); the result has shape (..., H+hb-1, W+wb-1)."""
    *lead, h, w = x.shape
    c = np.zeros((*lead, h + 2 * hb, w))
    np.cumsum(x, axis=-2, out=c[..., hb + 1:hb + h + 1, :])
    c[..., hb + h + 1:, :] = c[..., hb + h:hb + h + 1, :]
    rows = c[..., hb + 1:, :] - c[..., 1:-hb, :]
    c = np.zeros((*lead, h + hb - 1, w + 2 * wb))
    np.cumsum(rows, axis=-1, out=c[..., :, wb + 1:wb + w + 1])
    c[..., :, wb + w + 1:] = c[..., :, wb + w:wb + w + 1]
    return c[..., :, wb + 1:] - c[..., :, 1:-wb]


def _masked_ncc(a: np.ndarray, b: np.ndarray, min_frac: float) -> tuple[float, int, int]:
    """Best normalised cross-correlation of ``b`` placed over ``a`` at any integer shift whose overlap
    covers >= ``min_frac`` of the smaller image. Returns (ncc, dy, dx), (dy, dx) = b's top-left in a."""
    from scipy import fft as sfft

    a = a.astype(np.float64)
    b = b.astype(np.float64)
    ha, wa = a.shape
    hb, wb = b.shape
    fs = (sfft.next_fast_len(ha + hb - 1, real=True), sfft.next_fast_len(wa + wb - 1, real=True))
    s_ab = sfft.irfft2(sfft.rfft2(a, fs) * sfft.rfft2(b[::-1, ::-1], fs), fs)[: ha + hb - 1, : wa + wb - 1]
    dy = np.arange(-(hb - 1), ha)
    dx = np.arange(-(wb - 1), wa)
    oy = np.minimum(dy + hb, ha) - np.maximum(dy, 0)
    ox = np.minimum(dx + wb, wa) - np.maximum(dx, 0)
    n = np.maximum(oy[:, None] * ox[None, :], 1).astype(np.float64)
    s_a, s_a2 = _box_sums(np.stack([a, a * a]), hb, wb)
    s_b, s_b2 = _box_sums(np.stack([b, b * b]), ha, wa)[:, ::-1, ::-1]
    v_a = np.maximum(s_a2 - s_a * s_a / n, 0.0)
    v_b = np.maximum(s_b2 - s_b * s_b / n, 0.0)
    ok = (n >= min_frac * min(a.size, b.size)) & (v_a > 1e-6 * n) & (v_b > 1e-6 * n)
    ncc = np.where(ok, (s_ab - s_a * s_b / n) / np.maximum(np.sqrt(v_a * v_b), 1e-12), -1.0)
    k = int(np.argmax(ncc))
    py, px = np.unravel_index(k, ncc.shape)
    return float(ncc[py, px]), int(dy[py]), int(dx[px])


def _place(sig: Signature, k: float, fill: bool = False) -> np.ndarray:
    """The image of ``sig`` (background-filled if ``fill``) resampled by ``k`` (target pixels per native pixel)."""
    h, w = sig.shape
    src = sig.mid_fill if fill else sig.mid_u8
    return _resize(src, max(6, round(h * k)), max(6, round(w * k)), Image.BILINEAR)


def _place_dog(sig: Signature, k: float) -> tuple[np.ndarray, np.ndarray]:
    """Masked band-pass of ``sig`` resampled by ``k``, and where its texture may be compared."""
    img = _place(sig, k)
    if sig.mid_mask.all():
        return _dog(img), np.ones(img.shape, bool)
    h, w = img.shape
    m = _resize(sig.mid_mask.astype(np.uint8) * 255, h, w, Image.BILINEAR) >= 128
    return _masked_dog(img, m), _erode(m)


def _overlap(a_shape, b_shape, y: int, x: int):
    h, w = a_shape
    hb, wb = b_shape
    return max(0, y), max(0, x), min(h, y + hb), min(w, x + wb)


def _block_scores(da: np.ndarray, db: np.ndarray, valid: np.ndarray | None = None, grid: int = 4) -> np.ndarray:
    """NCC of each block of a grid over two aligned band-pass images, over the pixels where both show
    content (``valid``). Blocks with too little content, or without texture, are left out."""
    h, w = da.shape
    ys = np.linspace(0, h, grid + 1).astype(int)
    xs = np.linspace(0, w, grid + 1).astype(int)
    vals, energy = [], []
    for i in range(grid):
        for j in range(grid):
            a = da[ys[i]:ys[i + 1], xs[j]:xs[j + 1]]
            b = db[ys[i]:ys[i + 1], xs[j]:xs[j + 1]]
            if a.size < 16:
                continue
            if valid is not None:
                v = valid[ys[i]:ys[i + 1], xs[j]:xs[j + 1]]
                nv = int(v.sum())
                if nv < max(16, _BLOCK_MIN * v.size):
                    continue
                if nv < v.size:
                    a, b = a[v], b[v]
            a = a - a.mean()
            b = b - b.mean()
            ea, eb = float(np.vdot(a, a)), float(np.vdot(b, b))
            energy.append(min(ea, eb) / a.size)
            vals.append(float(np.vdot(a, b)) / math.sqrt(ea * eb) if ea > 0 and eb > 0 else 0.0)
    if not vals:
        return np.zeros(0)
    energy = np.asarray(energy)
    return np.asarray(vals)[energy >= 0.1 * np.median(energy)]


_HANN: dict = {}


def _hann(h: int, w: int) -> np.ndarray:
    win = _HANN.get((h, w))
    if win is None:
        win = _HANN[(h, w)] = np.outer(np.hanning(h), np.hanning(w))
    return win


def _phase_shift(pa: np.ndarray, pb: np.ndarray) -> tuple[float, float, float]:
    """Shift d (dy, dx) with pa(x) ~ pb(x - d) by windowed phase correlation, and the peak height."""
    from scipy import fft as sfft

    h, w = pa.shape
    win = _hann(h, w)
    fa = sfft.rfft2((pa - pa.mean()) * win)
    fb = sfft.rfft2((pb - pb.mean()) * win)
    cross = fa * np.conj(fb)
    r = sfft.irfft2(cross / np.maximum(np.abs(cross), 1e-9), s=(h, w))
    k = int(np.argmax(r))
    py, px = np.unravel_index(k, r.shape)
    dy = py - h if py > h // 2 else py
    dx = px - w if px > w // 2 else px
    return float(dy), float(dx), float(r[py, px])


_FIT_RMS_MAX = 1.0  # mid pixels
_PEAK_MIN = 0.12  # phase-correlation peak of a patch that really matches (noise peaks stay below ~0.09)


def _fit_scale(da: np.ndarray, db: np.ndarray, ty: int, tx: int, grid: int = 3):
    """Scale correction e and translation from patch displacements (b placed at ty, tx in a).

    Returns (e, ty, tx, n_patches_used) or None when the patches do not move together."""
    y0, x0, y1, x1 = _overlap(da.shape, db.shape, ty, tx)
    if y1 - y0 < 16 * grid or x1 - x0 < 16 * grid:
        return None
    ys = np.linspace(y0, y1, grid + 1).astype(int)
    xs = np.linspace(x0, x1, grid + 1).astype(int)
    cs, ds = [], []
    for i in range(grid):
        for j in range(grid):
            pa = da[ys[i]:ys[i + 1], xs[j]:xs[j + 1]]
            pb = db[ys[i] - ty:ys[i + 1] - ty, xs[j] - tx:xs[j + 1] - tx]
            dy, dx, peak = _phase_shift(pa, pb)
            if peak >= _PEAK_MIN:
                cs.append(((ys[i] + ys[i + 1]) / 2.0, (xs[j] + xs[j + 1]) / 2.0))
                ds.append((dy, dx))
    c = np.asarray(cs)
    d = np.asarray(ds)
    # Displacement model: d_y = e*c_y + k_y, d_x = e*c_x + k_x (b needs rescaling by 1+e). Patches of one
    # frame move together (residual well under a pixel); unrelated images scatter. One bad patch may go.
    for _ in range(3):
        if len(c) < 4:
            return None
        m = np.zeros((2 * len(c), 3))
        m[0::2, 0], m[0::2, 1] = c[:, 0], 1.0
        m[1::2, 0], m[1::2, 2] = c[:, 1], 1.0
        sol, *_ = np.linalg.lstsq(m, d.ravel(), rcond=None)
        res = np.hypot(*(m @ sol - d.ravel()).reshape(-1, 2).T)
        if float(np.sqrt(np.mean(res ** 2))) <= _FIT_RMS_MAX:
            break
        worst = int(np.argmax(res))
        c, d = np.delete(c, worst, axis=0), np.delete(d, worst, axis=0)
    else:
        return None
    e, ky, kx = (float(v) for v in sol)
    if not -0.2 < e < 0.2:
        return None
    return e, ty * (1 + e) + ky, tx * (1 + e) + kx, len(c)


def _local_best(da: np.ndarray, db: np.ndarray, ty: int, tx: int, rad: int = 1):
    """The shift within +-rad of (ty, tx) with the highest NCC of the overlap."""
    best = (-2.0, ty, tx)
    for oy in range(-rad, rad + 1):
        for ox in range(-rad, rad + 1):
            y, x = ty + oy, tx + ox
            y0, x0, y1, x1 = _overlap(da.shape, db.shape, y, x)
            if y1 - y0 < 8 or x1 - x0 < 8:
                continue
            a = da[y0:y1, x0:x1]
            b = db[y0 - y:y1 - y, x0 - x:x1 - x]
            a = a - a.mean()
            b = b - b.mean()
            den = math.sqrt(float(np.vdot(a, a)) * float(np.vdot(b, b)))
            c = float(np.vdot(a, b)) / den if den > 0 else 0.0
            if c > best[0]:
                best = (c, y, x)
    return best


def _verify(a: Signature, b: Signature, hyps: list[float]) -> dict:
    """Align b onto a (scale = a pixels per b pixel) and score the texture agreement."""
    best = None
    for s in hyps:
        v, dy, dx = _masked_ncc(a.coarse, _place(b, s * a.fc, fill=True), min_frac=0.4)
        if best is None or v > best[0]:
            best = (v, s, dy, dx)
    coarse, s, dy, dx = best
    out = {"coarse": round(coarse, 4), "scale": round(s, 4), "texture": float("nan"), "overlap": 0.0}
    if coarse < _COARSE_REJECT:
        return out
    ratio = a.fm / a.fc
    ty, tx = round(dy * ratio), round(dx * ratio)
    db, vb = _place_dog(b, s * a.fm)
    c, ty, tx = _local_best(a.mid_dog, db, ty, tx, 1)
    if c < 0.9:  # not an identical frame at this scale: fit scale and shift from patch displacements
        for _ in range(3):
            fit = _fit_scale(a.mid_dog, db, ty, tx)
            if fit is None:
                break
            e, fy, fx, _n = fit
            s *= 1 + e
            ty, tx = round(fy), round(fx)
            if abs(e) > 0.002:
                db, vb = _place_dog(b, s * a.fm)
            if abs(e) < 0.01:
                break
        c, ty, tx = _local_best(a.mid_dog, db, ty, tx, 1)
    y0, x0, y1, x1 = _overlap(a.mid_dog.shape, db.shape, ty, tx)
    if y1 - y0 < 8 or x1 - x0 < 8:
        return out
    overlap = (y1 - y0) * (x1 - x0) / min(a.mid_dog.size, db.size)
    valid = a.mid_valid[y0:y1, x0:x1] & vb[y0 - ty:y1 - ty, x0 - tx:x1 - tx]
    blocks = _block_scores(a.mid_dog[y0:y1, x0:x1], db[y0 - ty:y1 - ty, x0 - tx:x1 - tx],
                           None if valid.all() else valid)
    texture = float(np.median(blocks)) if len(blocks) >= _MIN_BLOCKS else 0.0
    out.update(scale=round(s, 4), texture=round(texture, 4), overlap=round(overlap, 4), ncc=round(c, 4),
               content=round(float(valid.mean()), 4), blocks=int(len(blocks)),
               q75=round(float(np.quantile(blocks, 0.75)) if len(blocks) else 0.0, 4))
    return out


def _hypotheses(a: Signature, b: Signature, win_ab: int, win_ba: int) -> list[float]:
    """Candidate scales (a pixels per b pixel): 1, the size ratios, and those implied by matching windows."""
    (ha, wa), (hb, wb) = a.shape, b.shape
    hyps = [1.0, wa / wb, ha / hb]
    x0, x1, y0, y1 = _WIN[win_ab]  # b whole ~ window of a
    hyps.append(math.sqrt((x1 - x0) * wa / wb * (y1 - y0) * ha / hb))
    x0, x1, y0, y1 = _WIN[win_ba]  # a whole ~ window of b
    hyps.append(1.0 / math.sqrt((x1 - x0) * wb / wa * (y1 - y0) * hb / ha))
    out: list[float] = []
    for s in sorted(h for h in hyps if 0.25 < h < 4.0):
        if not out or s / out[-1] > 1.03:
            out.append(s)
    return out


def _candidates(sigs: list[Signature | None]):
    """Candidate pairs (i, j, window_ij, window_ji, score) from sub-window thumbnail correlation."""
    idx = [i for i, s in enumerate(sigs) if s is not None]
    if len(idx) < 2:
        return []
    thumbs = np.stack([sigs[i].thumbs for i in idx])  # n x n_win x d
    full = thumbs[:, 0]
    n = len(idx)
    best = np.empty((n, n), dtype=np.float32)
    arg = np.empty((n, n), dtype=np.int16)
    for i in range(n):
        r = thumbs[i] @ full.T  # window w of i vs whole j
        arg[i] = r.argmax(axis=0)
        best[i] = r.max(axis=0)
    sym = np.maximum(best, best.T)
    np.fill_diagonal(sym, -1.0)
    keep = sym >= _CAND_MIN
    k = min(_CAND_TOPK, n - 1)
    top = np.argpartition(-sym, k - 1, axis=1)[:, :k] if k > 0 else np.zeros((n, 0), int)
    rows = np.repeat(np.arange(n), top.shape[1])
    cols = top.ravel()
    floor = sym[rows, cols] >= _CAND_FLOOR
    keep[rows[floor], cols[floor]] = True
    keep = keep | keep.T
    ii, jj = np.nonzero(np.triu(keep, 1))
    return [(idx[i], idx[j], int(arg[i, j]), int(arg[j, i]), float(sym[i, j])) for i, j in zip(ii, jj)]


def progress_bar(iterable, total: int, desc: str, enabled: bool):
    """``iterable`` with a tqdm progress bar when ``enabled`` (and tqdm is installed)."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


def exact_groups(hashes: list[str | None]) -> list[list[int]]:
    """Indices of images with identical decoded pixels (same :func:`pixel_hash`), groups of two or more."""
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        if h is not None:
            by_hash.setdefault(h, []).append(i)
    return [g for g in by_hash.values() if len(g) > 1]


def find_duplicates(sigs, hashes, *, threshold: float, progress: bool):
    """Exact groups (lists of indices) and verified near-duplicate pairs (dicts with i, j and scores)."""
    exact = exact_groups(hashes)
    # One representative per exact group takes part in near-duplicate search.
    rep_sigs = list(sigs)
    for g in exact:
        for m in g[1:]:
            rep_sigs[m] = None
    cands = _candidates(rep_sigs)
    pairs = []
    for i, j, w_ij, w_ji, cand in progress_bar(cands, len(cands), "near-duplicate check", progress):
        a, b = sigs[i], sigs[j]
        if a.shape[0] * a.shape[1] < b.shape[0] * b.shape[1]:  # align the smaller onto the larger
            i, j, w_ij, w_ji = j, i, w_ji, w_ij
            a, b = b, a
        r = _verify(a, b, _hypotheses(a, b, w_ij, w_ji))
        r.update(i=i, j=j, candidate=round(cand, 4))
        r["near"] = bool(r["texture"] >= threshold and r["overlap"] >= MIN_OVERLAP)
        pairs.append(r)
    return exact, pairs, len(cands)


@dataclass
class DuplicateGroups:
    """What :func:`group_duplicates` found (the fields of :class:`~breastfusion.data.audit.AuditResult` it fills)."""

    dup_group: dict          # case_id -> group id (``dupNNNN``, or ``solo:<case_id>``), in case order
    dup_groups: list         # {group, case_ids, paths, labels, exact, min_link, suspicious}
    label_conflicts: list    # dup groups holding several labels
    suspicious: list         # dup groups to check by eye
    exact_groups: list       # [case_id, ...] with identical pixels
    pairs: list              # verified near-duplicate pairs with scores
    borderline: list         # rejected pairs closest to the threshold


def group_duplicates(ids: list[str], labels: list, paths: dict, exact: list[list[int]], pairs: list[dict]
                     ) -> DuplicateGroups:
    """Duplicate groups of the cases ``ids`` (``labels``: each case's label or None; ``paths``: case_id -> image
    path as reported) from the :func:`find_duplicates` results: exact copies first, then the verified pairs.

    A group whose labels differ but that hangs on a link below :data:`STRONG_LINK`, or one with more than
    :data:`LARGE_GROUP` images, is *suspicious*. Cases without a duplicate get a group of their own
    (``solo:<case_id>``)."""
    dup_group: dict[str, str] = {}
    groups: list[dict] = []
    conflicts: list[dict] = []
    suspicious: list[dict] = []
    # Groups: exact copies first, then verified pairs from the strongest down (Kruskal), so that the
    # weakest link a group needed (its "min_link") is known: a chain of weak links is worth a look.
    uf = UnionFind(len(ids))
    link: dict[int, float] = {}  # root -> weakest link used inside its group
    for g in exact:
        for m in g[1:]:
            uf.union(g[0], m)
    near = [p for p in pairs if p["near"]]
    for p in sorted(near, key=lambda p: -p["texture"]):
        ra, rb = uf.find(p["i"]), uf.find(p["j"])
        if ra == rb:
            continue
        w = min(link.pop(ra, 1.0), link.pop(rb, 1.0), float(p["texture"]))
        uf.union(ra, rb)
        link[uf.find(ra)] = w
    members: dict[int, list[int]] = {}
    for i in range(len(ids)):
        members.setdefault(uf.find(i), []).append(i)
    exact_sets = [set(g) for g in exact]
    n_dup = 0
    for root_i in sorted(members, key=lambda r: members[r][0]):
        m = members[root_i]
        if len(m) == 1:
            dup_group[ids[m[0]]] = f"solo:{ids[m[0]]}"
            continue
        n_dup += 1
        gid = f"dup{n_dup:04d}"
        for i in m:
            dup_group[ids[i]] = gid
        glabels = [labels[i] for i in m]
        entry = {
            "group": gid,
            "case_ids": [ids[i] for i in m],
            "paths": [paths[ids[i]] for i in m],
            "labels": glabels,
            "exact": any(set(m) <= s for s in exact_sets),
            "min_link": round(link.get(root_i, 1.0), 4),
        }
        distinct = sorted({lab for lab in glabels if lab is not None})
        why = []
        if len(m) > LARGE_GROUP:
            why.append(f"{len(m)} images in one group")
        if len(distinct) > 1 and entry["min_link"] < STRONG_LINK:
            why.append(f"labels differ and the weakest link scores only {entry['min_link']:.2f}")
        entry["suspicious"] = "; ".join(why)
        groups.append(entry)
        if len(distinct) > 1:
            conflicts.append({**entry, "distinct_labels": distinct})
        if why:
            suspicious.append(entry)
    dup_group = {c: dup_group[c] for c in ids}

    def _pair_row(p):
        a, b = ids[p["i"]], ids[p["j"]]
        row = {"a": paths[a], "b": paths[b], "case_a": a, "case_b": b,
               "label_a": labels[p["i"]], "label_b": labels[p["j"]]}
        row.update({k: v for k, v in p.items() if k not in ("i", "j", "near")})
        return row

    rejected = [p for p in pairs if not p["near"] and not math.isnan(p["texture"])]
    rejected.sort(key=lambda p: -p["texture"])
    return DuplicateGroups(dup_group=dup_group, dup_groups=groups, label_conflicts=conflicts, suspicious=suspicious,
                           exact_groups=[[ids[i] for i in g] for g in exact], pairs=[_pair_row(p) for p in near],
                           borderline=[_pair_row(p) for p in rejected[:20]])
