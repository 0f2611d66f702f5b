"""See the tissue, not the screen: the ultrasound field of view and the marks burnt into an image.

Scanner exports carry more than tissue: black margins, the scanner's panels, depth rulers and text around the
scan, and, burnt into the scan itself, caliper crosses with dotted measurement lines, annotations ("LEFT
BREAST", "RT AXILLA"), the scanner's name, body-marker icons and coloured Doppler or region-of-interest boxes. On
BUSI, 37 % of the images carry calipers or text on the scan, and how often differs by class (benign 46 %,
malignant 32 %, normal 13 %: benchmarks/cleaning_marks.py), so a network can learn the marks instead of the
disease (Grad-CAM showed it), and a model that learns them does not transfer to another hospital. This module
finds them, so that training and scoring can crop to the scan and paint the marks over.

Method (one image, grey or RGB, float in [0, 1], uint8 or uint16; read files through :func:`read_for_cleaning`,
which goes through :mod:`breastfusion.data.images`: RGBA, 16-bit and EXIF orientation handled):

* **Field of view** (:func:`field_of_view`), on a copy whose longer side is at most :data:`FOV_SIDE` px:
  content = pixels whose 3x3 neighbourhood rises above :data:`DARK_LEVEL` grey levels (the black screen and
  margins do not); opened with a 5x5 square (drops text, rulers, ticks and lines thinner than ~5 px, also
  where they touch the scan), closed with a 9x9 square (bridges dark shadows and cysts). Components with
  texture (median local standard deviation over 5x5 >= :data:`FOV_TEXTURE` grey levels: flat panels have
  none) and at least a third of the largest one's area are kept; the box is their bounding box, mapped back to
  full resolution. A box under :data:`FOV_MIN_AREA` of the image is not believed: the whole image is used and
  the flag ``fov_refused`` says so. An image that is already cropped yields the whole image: margins thinner
  than :data:`FOV_SNAP` of a side are not cropped. A black band below the deepest echoes is a margin too.
* **Coloured marks** (RGB only): a pixel's chroma (RGB minus its luma) is compared with the image's own tint at
  that brightness: the median chroma per luma bin (32 bins, from every third row and column), smoothed by a
  running median over 7 bins so that an overlay filling its own brightness bin does not become the reference.
  So a scanner's colour tint (BrEaST-Lesions-USG images are tinted blue) is not a mark; a deviation of at least
  :data:`CHROMA_MIN` in one channel is (components of fewer than 3 pixels are JPEG noise and dropped).
* **Grey marks** (:func:`grey_marks`): marks are drawn in one flat, near-white ink with 1-3 px strokes and
  *sharp* edges; tissue reflectors are blurred by the beam and peaked. Candidates: white top-hat over a 7x7
  square >= :data:`TOPHAT_MIN` and brightness >= :data:`BRIGHT_MIN`. An 8-connected candidate component is
  *sharp* when its edge contrast (its mean minus the mean of the 1-px ring around it, the black screen left
  out of the ring unless it makes up most of it) is >= :data:`EDGE_MIN` and its brightness is flat (standard
  deviation <= :data:`FLAT_MAX`), or its edge contrast is twice that. A sharp component is a mark when it is a
  *glyph* (crosses, letters, arrows, icons: both sides >= 5 px, longer side >= 7 px, fill ratio <= 0.72,
  aspect <= 4) or a *bar* (a '1', a tick, a straight line: <= 3 px thick, >= 7 px and 2.5x longer; horizontal
  bars only when twice as sharp, since breast tissue lies in bright horizontal layers). Small sharp dots (<= 16
  px) are marks only on a *dotted line*: a dot with two neighbours within 12 px on opposite sides (within 30
  degrees of a straight line, spacings within a factor 2) links them, and chains of >= 4 linked dots spanning
  >= 20 px are lines. A candidate merged with bright tissue beside it is cut at its own ink level (its peak
  minus :data:`_INK_BAND`) and the parts judged again (edge contrast >= 0.30); sharp components within 4 px of
  a mark (the 'B' of a word, the digit beside a caliper) are marks too. Compact bright blobs (calcifications,
  bright speckle) and long curved tissue layers are never marks. Marks are grown by :data:`_GROW` px (the
  anti-aliased halo and JPEG ringing of a stroke). Thin text drawn over equally bright tissue can be missed.
* **Painting over** (``fov_marks``): OpenCV's Telea inpainting (radius 3 px, on a 16-bit copy), plus the fine
  speckle of tissue 12 px (or 24 px) away, so that a painted mark is not a smooth patch (itself a sign that a mark
  was there); only the mark pixels change.

Geometry is kept: :func:`clean_image` returns an image of the input's size, so masks and radiomics stay
aligned; consumers crop with ``fov_box``. :func:`load_cleaned` / :func:`model_input` are the one way training
(:func:`breastfusion.training.data.load_resized`) and scoring (:func:`load_for_scoring`, here: the prediction path,
which also reads uncleaned images, decoded with bounded memory) turn a file into the model's input: clean, crop to
the box, round to uint8, resize (bicubic). The mode and :data:`CLEANING_VERSION` are what a bundle records
(:func:`cleaning_meta`) and re-applies (:func:`apply_cleaning`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from breastfusion.data.images import (
    MAX_SCORED_PIXELS,
    MIN_IMAGE_SIDE,
    _open_fully,
    _to_array,
    check_not_blank,
    float_to_u8,
    resize_u8,
    to_gray,
)
from breastfusion.errors import BundleError, DataError

log = logging.getLogger(__name__)

CleanMode = Literal["none", "fov", "fov_marks"]
CLEAN_MODES: tuple[str, ...] = ("none", "fov", "fov_marks")
#: Bumped whenever detection or painting changes what a model sees; a bundle records it.
CLEANING_VERSION = 1

#: Longer side of the copy the field of view is looked for on.
FOV_SIDE = 512
#: 8-bit grey level at or under which a pixel whose 3x3 neighbourhood stays there is screen, not scan.
DARK_LEVEL = 10
#: Median local standard deviation (8-bit grey levels, 5x5) a field-of-view component needs (panels are flat).
FOV_TEXTURE = 2.0
#: A box smaller than this share of the image is refused (whole image + flag).
FOV_MIN_AREA = 0.40
#: Margins thinner than this share of a side are left in place.
FOV_SNAP = 0.02
#: Marks are looked for on a copy whose longer side is at most this (the mask is scaled back).
MARK_SIDE = 1600
#: A channel's deviation (0..1) from the image's usual chroma at that brightness that makes a coloured mark.
CHROMA_MIN = 0.06
#: White top-hat (7x7) a grey-mark candidate pixel reaches.
TOPHAT_MIN = 0.16
#: Brightness a grey-mark candidate pixel reaches.
BRIGHT_MIN = 0.55
#: Mean brightness of a component minus that of the 1-px ring around it (sharp edges of drawn marks).
EDGE_MIN = 0.22
#: Standard deviation of brightness inside a component at most this: marks are drawn in one flat ink level.
FLAT_MAX = 0.05
_TOPHAT_SIDE = 7
_STROKE_MIN_SIDE = 7
_GLYPH_MIN_SIDE = 5
_STROKE_MAX_FILL = 0.72
_STROKE_MAX_ASPECT = 4.0
_EDGE_MIN_SPLIT = 0.30  # edge contrast a part cut out of a mixed component needs
_DOT_MAX_AREA = 16
_INK_BAND = 0.10  # a mixed component is cut at its peak brightness minus this
_NEAR = 4  # px: a sharp flat component this close to a mark is part of it (letters of a word)
_DOT_LINK = 12
_DOT_MIN_N = 4
_DOT_MIN_LEN = 20
_INPAINT_RADIUS = 3
_CHROMA_BINS = 32
_TEXTURE_SHIFT = 12  # px: where a painted pixel borrows its speckle from
_EDGE_BAND = 4  # px: marks within this of the image's edge are edge marks (corner icons, frame lines)
_GROW = 2  # px a mark is grown by (anti-aliased halo, JPEG ringing)


@dataclass
class CleanResult:
    """One cleaned image. ``gray``: float32 in [0, 1], the input's size, marks painted over (mode ``fov_marks``);
    ``fov_box``: (y0, y1, x0, x1), end-exclusive, the scan's bounding box (the whole image in mode ``none``);
    ``marks_mask``: bool, the input's size, the pixels found to be marks (empty unless ``fov_marks``), grown by
    :data:`_GROW` px; ``n_colour_pixels`` / ``n_grey_pixels``: mark pixels before growing, coloured / grey;
    ``n_inner_pixels``: those of marks away from the image's edge (calipers, text on the scan; not corner icons).
    ``flags``: ``fov_cropped``, ``fov_refused``, ``fov_none``, ``colour_marks``, ``grey_marks``, ``inner_marks``."""

    gray: np.ndarray
    fov_box: tuple[int, int, int, int]
    marks_mask: np.ndarray
    mode: str = "none"
    n_colour_pixels: int = 0
    n_grey_pixels: int = 0
    n_inner_pixels: int = 0
    flags: list[str] = field(default_factory=list)

    @property
    def n_mark_pixels(self) -> int:
        return int(self.marks_mask.sum())

    @property
    def cropped(self) -> np.ndarray:
        """``gray`` cropped to the field of view (what the model is shown, before resizing)."""
        y0, y1, x0, x1 = self.fov_box
        return self.gray[y0:y1, x0:x1]

    @property
    def fov_cropped_fraction(self) -> float:
        """Share of the image's area outside the field-of-view box."""
        h, w = self.gray.shape
        y0, y1, x0, x1 = self.fov_box
        return 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)


# ----------------------------------------------------------------------------------------------------
# Input normalisation
# ----------------------------------------------------------------------------------------------------

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # as breastfusion.data.images


def _as_float(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise DataError(f"An image to clean must be (H, W) grey or (H, W, 3) RGB; got shape {a.shape}.")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise DataError("An image to clean contains NaN or infinite pixel values.")
    return np.clip(a, 0.0, 1.0)


def _split(image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(grey float32 (H, W), RGB float32 (H, W, 3) or None for a grey image)."""
    a = _as_float(image)
    if a.ndim == 2:
        return a, None
    return (a @ _LUMA).astype(np.float32), a


def _u8(a: np.ndarray) -> np.ndarray:
    return np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _shrink(a: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    """``a`` (uint8 or float32, 2-D) scaled so its longer side is at most ``side`` (area averaging), and the scale."""
    import cv2

    h, w = a.shape[:2]
    f = min(1.0, side / float(max(h, w)))
    if f >= 1.0:
        return a, 1.0
    return cv2.resize(a, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA), f


# ----------------------------------------------------------------------------------------------------
# Field of view
# ----------------------------------------------------------------------------------------------------

def field_of_view(gray: np.ndarray) -> tuple[tuple[int, int, int, int], list[str]]:
    """The ultrasound scan's bounding box (y0, y1, x0, x1), end-exclusive, and flags.

    Flags: ``fov_cropped`` (a margin was found), ``fov_refused`` (the box found was under
    :data:`FOV_MIN_AREA` of the image: the whole image is returned), ``fov_none`` (no scan-like region)."""
    return _fov(_split(gray)[0])


def _fov(g: np.ndarray) -> tuple[tuple[int, int, int, int], list[str]]:
    import cv2

    h, w = g.shape
    whole = (0, h, 0, w)
    small, f = _shrink(_u8(g), FOV_SIDE)
    fg = cv2.dilate(small, np.ones((3, 3), np.uint8)) > DARK_LEVEL
    if fg.all():
        return whole, []
    fg = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, np.ones((9, 9), np.uint8), borderType=cv2.BORDER_REPLICATE)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n <= 1:
        return whole, ["fov_none"]
    sf = small.astype(np.float32)
    mean = cv2.blur(sf, (5, 5))
    sd = np.sqrt(np.maximum(cv2.blur(sf * sf, (5, 5)) - mean * mean, 0.0))
    areas = stats[1:, cv2.CC_STAT_AREA]
    # median local deviation >= FOV_TEXTURE  <=>  at least half the component's pixels reach it
    textured = np.bincount(lab.ravel(), weights=(sd >= FOV_TEXTURE).ravel().astype(np.float64), minlength=n)[1:]
    ok = textured >= 0.5 * areas
    if not ok.any():
        return whole, ["fov_none"]
    big = areas[ok].max()
    keep = np.nonzero(ok & (areas >= big / 3.0))[0] + 1
    x0 = int(stats[keep, cv2.CC_STAT_LEFT].min())
    y0 = int(stats[keep, cv2.CC_STAT_TOP].min())
    x1 = int((stats[keep, cv2.CC_STAT_LEFT] + stats[keep, cv2.CC_STAT_WIDTH]).max())
    y1 = int((stats[keep, cv2.CC_STAT_TOP] + stats[keep, cv2.CC_STAT_HEIGHT]).max())
    # back to full resolution, rounding outwards
    Y0, X0 = int(np.floor(y0 / f)), int(np.floor(x0 / f))
    Y1, X1 = min(h, int(np.ceil(y1 / f))), min(w, int(np.ceil(x1 / f)))
    snap_y, snap_x = FOV_SNAP * h, FOV_SNAP * w
    Y0 = 0 if Y0 <= snap_y else Y0
    X0 = 0 if X0 <= snap_x else X0
    Y1 = h if h - Y1 <= snap_y else Y1
    X1 = w if w - X1 <= snap_x else X1
    box = (Y0, Y1, X0, X1)
    if box == whole:
        return whole, []
    if (Y1 - Y0) * (X1 - X0) < FOV_MIN_AREA * h * w:
        return whole, ["fov_refused"]
    return box, ["fov_cropped"]


# ----------------------------------------------------------------------------------------------------
# Marks
# ----------------------------------------------------------------------------------------------------

def colour_marks(rgb: np.ndarray) -> np.ndarray:
    """Pixels of an RGB image (float in [0, 1]) whose colour departs from the image's own tint: overlays."""
    rgb = _as_float(rgb)
    if rgb.ndim != 3:
        return np.zeros(rgb.shape[:2], bool)
    return _colour(rgb)


def _colour(rgb: np.ndarray) -> np.ndarray:
    import cv2

    luma = rgb @ _LUMA
    chroma = rgb - luma[..., None]
    if float(np.abs(chroma).max()) < CHROMA_MIN:
        return np.zeros(luma.shape, bool)
    nb = _CHROMA_BINS
    bins = np.minimum((luma * nb).astype(np.int32), nb - 1)
    # the tint curve from every third row and column (a smooth curve: a ninth of the sorting)
    sub_bins = bins[::3, ::3].ravel()
    order = np.argsort(sub_bins, kind="stable")
    starts = np.searchsorted(sub_bins[order], np.arange(nb + 1))
    flat = chroma[::3, ::3].reshape(-1, 3)[order]
    med = np.zeros((nb, 3), np.float32)
    valid = (starts[1:] - starts[:-1]) >= max(20, 0.001 * sub_bins.size)
    for b in np.nonzero(valid)[0]:
        med[b] = np.median(flat[starts[b]:starts[b + 1]], axis=0)
    # the tint is a smooth function of brightness: a running median over 7 bins, so an overlay that fills its
    # own brightness bin (a large yellow box) does not become the reference for that bin
    ref = np.zeros((nb, 3), np.float32)
    vi = np.nonzero(valid)[0]
    if len(vi):
        for b in range(nb):
            near = vi[np.abs(vi - b) <= 3]
            ref[b] = np.median(med[near], axis=0) if len(near) else med[vi[np.argmin(np.abs(vi - b))]]
    dev = np.abs(chroma[..., 0] - ref[:, 0][bins])
    for c in (1, 2):
        np.maximum(dev, np.abs(chroma[..., c] - ref[:, c][bins]), out=dev)
    m = (dev >= CHROMA_MIN).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 1:
        return np.zeros(luma.shape, bool)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= 3
    return keep[lab]


def _ring_contrast(g: np.ndarray, lab: np.ndarray, n: int, inside: np.ndarray) -> np.ndarray:
    """Per component 1..n-1: mean brightness inside (``inside``) minus mean of the 1-px ring around it. Ring pixels of the
    black screen (a sector's edge, a cyst's black) count only when they make up most of the ring (a mark drawn
    on black), so tissue at the edge of a sector is not 'sharp' because of the black beside it."""
    import cv2

    # ring: pixels next to a component, labelled with that component (grey dilation of the labels; where two
    # components touch one ring pixel, the larger label wins, which is fine for a contrast estimate)
    grown = cv2.dilate(lab.astype(np.float32), np.ones((3, 3), np.uint8))
    at = np.flatnonzero((grown.ravel() > 0) & (lab.ravel() == 0))  # ring pixels only: few
    ring = grown.ravel()[at].astype(np.int64)
    gv = g.ravel()[at].astype(np.float64)
    lit = gv > DARK_LEVEL / 255.0
    counts = np.bincount(ring, minlength=n)[1:]
    sums = np.bincount(ring, weights=gv, minlength=n)[1:]
    lit_counts = np.bincount(ring, weights=lit.astype(np.float64), minlength=n)[1:]
    lit_sums = np.bincount(ring, weights=gv * lit, minlength=n)[1:]
    use_lit = lit_counts >= 0.25 * counts
    outside = np.where(use_lit, lit_sums / np.maximum(lit_counts, 1), sums / np.maximum(counts, 1))
    return np.where(counts > 0, inside - outside, 0.0)


def _dotted_lines(centres: np.ndarray) -> np.ndarray:
    """Which of the dots (centres (n, 2)) belong to a dotted line: a dot with two neighbours within
    :data:`_DOT_LINK` px on opposite sides (angle >= 150 degrees, spacings within a factor 2) links the three;
    chains of linked dots with at least :data:`_DOT_MIN_N` dots spanning :data:`_DOT_MIN_LEN` px are lines
    (two dotted lines that cross stay lines; a scatter of bright speckle rarely lines up)."""
    from scipy.spatial import cKDTree

    from breastfusion.utils import UnionFind

    n = len(centres)
    out = np.zeros(n, bool)
    if n < _DOT_MIN_N:
        return out
    tree = cKDTree(centres)
    uf = UnionFind(n)
    linked = np.zeros(n, bool)
    for i, nb in enumerate(tree.query_ball_point(centres, _DOT_LINK)):
        nb = [j for j in nb if j != i]
        if len(nb) < 2:
            continue
        v = centres[nb] - centres[i]
        d = np.hypot(v[:, 0], v[:, 1])
        u = v / np.maximum(d, 1e-6)[:, None]
        cos = u @ u.T
        ratio = np.maximum(d[:, None], d[None, :]) / np.maximum(np.minimum(d[:, None], d[None, :]), 1e-6)
        a, b = np.nonzero((cos <= -0.866) & (ratio <= 2.0))
        for ka, kb in zip(a, b):
            if ka < kb:
                uf.union(i, nb[ka])
                uf.union(i, nb[kb])
                linked[[i, nb[ka], nb[kb]]] = True
    groups: dict[int, list[int]] = {}
    for i in np.nonzero(linked)[0]:
        groups.setdefault(uf.find(int(i)), []).append(int(i))
    for members in groups.values():
        if len(members) < _DOT_MIN_N:
            continue
        p = centres[members]
        if float(np.hypot(*np.ptp(p, axis=0))) >= _DOT_MIN_LEN:
            out[members] = True
    return out


def _components(g: np.ndarray, cand: np.ndarray, edge_min: float = EDGE_MIN) -> dict:
    """Candidate components of ``cand`` and what :func:`grey_marks` judges them by."""
    import cv2

    n, lab, stats, cents = cv2.connectedComponentsWithStats(cand.astype(np.uint8), connectivity=8)
    area = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    bw = stats[1:, cv2.CC_STAT_WIDTH].astype(np.float64)
    bh = stats[1:, cv2.CC_STAT_HEIGHT].astype(np.float64)
    # per-component statistics over the (few) candidate pixels only
    at = np.flatnonzero(lab)
    li = lab.ravel()[at]
    gv = g.ravel()[at].astype(np.float64)
    cnt = np.maximum(np.bincount(li, minlength=n)[1:], 1)
    mean = np.bincount(li, weights=gv, minlength=n)[1:] / cnt
    spread = np.sqrt(np.maximum(np.bincount(li, weights=gv * gv, minlength=n)[1:] / cnt - mean * mean, 0.0))
    peak = np.zeros(n)
    np.maximum.at(peak, li, gv)
    peak = peak[1:]
    edge = _ring_contrast(g, lab, n, mean) if n > 1 else np.zeros(0)
    long_side, short_side = np.maximum(bw, bh), np.minimum(bw, bh)
    # drawn: sharp edges, and one flat ink level (tissue ridges are peaked) unless the edge is very sharp
    very_sharp = edge >= 2 * EDGE_MIN
    sharp = (edge >= edge_min) & ((spread <= FLAT_MAX) | very_sharp)
    # glyphs, crosses, arrows, icons: two-dimensional and not much longer than wide (tissue layers are long)
    stroke = (sharp & (short_side >= _GLYPH_MIN_SIDE) & (long_side >= _STROKE_MIN_SIDE)
              & (area / (bw * bh) <= _STROKE_MAX_FILL) & (long_side <= _STROKE_MAX_ASPECT * short_side))
    # a bar ('1', 'l', a tick, a straight line) fills its thin bounding box; a horizontal one only when very
    # sharp, since breast tissue is layered parallel to the skin and its bright layers are horizontal bars too
    bar = sharp & (long_side >= _STROKE_MIN_SIDE) & (short_side <= 3) & (long_side >= 2.5 * short_side)
    stroke |= bar & ((bh > bw) | very_sharp)
    dots = sharp & ~stroke & (area <= _DOT_MAX_AREA)
    return {"n": n, "lab": lab, "centres": cents[1:], "sharp": sharp, "stroke": stroke, "dots": dots,
            "peak": peak, "area": area}


def grey_marks(gray: np.ndarray) -> np.ndarray:
    """Burnt-in near-white marks of a grey image (float in [0, 1]): calipers, dotted lines, text, icons.

    Three passes: (1) candidate components judged as strokes; (2) a candidate that failed because it merged
    with bright tissue next to it is cut at its own ink level (its brightest :data:`_INK_BAND`) and the parts
    judged again; (3) sharp flat components within :data:`_NEAR` px of a mark (the letter 'B' of a word, the
    digit beside a caliper) are marks too. Dots of dotted lines are judged together (:func:`_dotted_lines`)."""
    return _grey(_split(gray)[0])


def _grey(g: np.ndarray) -> np.ndarray:
    import cv2

    th = cv2.morphologyEx(g, cv2.MORPH_TOPHAT, np.ones((_TOPHAT_SIDE, _TOPHAT_SIDE), np.uint8))
    cand = (th >= TOPHAT_MIN) & (g >= BRIGHT_MIN)
    c1 = _components(g, cand)
    if c1["n"] <= 1:
        return np.zeros(g.shape, bool)
    lab1 = c1["lab"]
    failed = np.zeros(c1["n"], bool)
    failed[1:] = ~c1["sharp"] & (c1["area"] >= 8)
    peak = np.concatenate([[2.0], c1["peak"]])
    c2 = _components(g, failed[lab1] & (g >= peak[lab1] - _INK_BAND), edge_min=_EDGE_MIN_SPLIT)
    parts = [c for c in (c1, c2) if c["n"] > 1]
    keeps = [np.concatenate([[False], c["stroke"]]) for c in parts]
    dots = [np.nonzero(c["dots"])[0] for c in parts]
    if sum(map(len, dots)):
        on_line = _dotted_lines(np.concatenate([c["centres"][d] for c, d in zip(parts, dots)]))
        start = 0
        for keep, d in zip(keeps, dots):
            keep[1 + d] |= on_line[start:start + len(d)]
            start += len(d)
    marks = np.zeros(g.shape, bool)
    sharp = np.zeros(g.shape, bool)
    for c, keep in zip(parts, keeps):
        marks |= keep[c["lab"]]
        sharp |= np.concatenate([[False], c["sharp"]])[c["lab"]]
    if marks.any():
        near = cv2.dilate(marks.astype(np.uint8), np.ones((2 * _NEAR + 1, 2 * _NEAR + 1), np.uint8)) > 0
        n, lab = cv2.connectedComponents((sharp & ~marks).astype(np.uint8), connectivity=8)
        if n > 1:
            touch = np.zeros(n, bool)
            touch[np.unique(lab[near & (lab > 0)])] = True
            touch[0] = False
            marks |= touch[lab]
    return marks


def _away_from_edge(marks: np.ndarray) -> np.ndarray:
    """The marks whose component keeps more than :data:`_EDGE_BAND` px from every side of the image: calipers,
    lines and text on the scan, as opposed to corner icons and frame lines along the image's edge."""
    import cv2

    n, lab, st, _ = cv2.connectedComponentsWithStats(marks.astype(np.uint8), connectivity=8)
    h, w = marks.shape
    x, y, bw, bh = (st[1:, k] for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
    inner = (x > _EDGE_BAND) & (y > _EDGE_BAND) & (x + bw < w - _EDGE_BAND) & (y + bh < h - _EDGE_BAND)
    return np.concatenate([[False], inner])[lab]


def burnt_in_marks(image: np.ndarray) -> tuple[np.ndarray, dict]:
    """Marks burnt into an image (grey (H, W) or RGB (H, W, 3)) as a bool mask of its size, grown by
    :data:`_GROW` px, and counts ``{"colour": pixels, "grey": pixels, "inner": pixels of marks away from the image's
    edge}`` before growing. Works on a copy of at most :data:`MARK_SIDE` px."""
    return _marks(*_split(image))


def _marks(g: np.ndarray, rgb: np.ndarray | None) -> tuple[np.ndarray, dict]:
    import cv2

    h, w = g.shape
    gs, f = _shrink(g, MARK_SIDE)
    grey = _grey(gs)
    colour = np.zeros_like(grey)
    if rgb is not None:
        rs = rgb if f >= 1.0 else cv2.resize(rgb, (gs.shape[1], gs.shape[0]), interpolation=cv2.INTER_AREA)
        colour = _colour(rs)
    both = grey | colour
    counts = {"colour": int(colour.sum()), "grey": int((grey & ~colour).sum()),
              "inner": int(_away_from_edge(both).sum()) if both.any() else 0}
    if f < 1.0:
        counts = {k: round(v / (f * f)) for k, v in counts.items()}
    m = (grey | colour).astype(np.uint8)
    if not m.any():
        return np.zeros((h, w), bool), counts
    m = cv2.dilate(m, np.ones((2 * _GROW + 1, 2 * _GROW + 1), np.uint8))
    if f < 1.0:
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
        m = cv2.dilate(m, np.ones((3, 3), np.uint8))
    return m.astype(bool), counts


def inpaint(gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``gray`` (float32 in [0, 1]) with the ``mask`` pixels painted over from their surroundings (Telea); every
    other pixel unchanged."""
    import cv2

    g = np.ascontiguousarray(gray, dtype=np.float32)
    if not mask.any():
        return g.copy()
    # on 16-bit integers: OpenCV's Telea on float32 images returns values far outside the input's range
    u16 = np.clip(g * 65535.0 + 0.5, 0, 65535).astype(np.uint16)
    out = cv2.inpaint(u16, mask.astype(np.uint8), _INPAINT_RADIUS, cv2.INPAINT_TELEA).astype(np.float32) / 65535.0
    out = np.clip(out + _borrowed_texture(g, mask), 0.0, 1.0)
    return np.where(mask, out, g).astype(np.float32)


def _borrowed_texture(g: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Speckle for the painted pixels: the fine texture (image minus a 1.5 px Gaussian blur) of the pixel
    :data:`_TEXTURE_SHIFT` px away (below, above, right, left, then twice as far: the first that is clear of every
    mark), so that a painted mark is not a smooth patch, itself a sign that a mark was there. Zero elsewhere."""
    import cv2

    fine = g - cv2.GaussianBlur(g, (0, 0), 1.5)
    # the blur reaches ~4 px: texture next to a mark still carries its ink
    dirty = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    h, w = g.shape
    ys, xs = np.nonzero(mask)
    tex = np.zeros(len(ys), np.float32)
    todo = np.ones(len(ys), bool)
    d = _TEXTURE_SHIFT
    for dy, dx in ((d, 0), (-d, 0), (0, d), (0, -d), (2 * d, 0), (-2 * d, 0), (0, 2 * d), (0, -2 * d)):
        sy, sx = ys + dy, xs + dx
        ok = todo & (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
        ok[ok] = ~dirty[sy[ok], sx[ok]]
        tex[ok] = fine[sy[ok], sx[ok]]
        todo &= ~ok
        if not todo.any():
            break
    out = np.zeros_like(g)
    out[ys, xs] = tex
    return out


# ----------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------

def check_mode(mode) -> str:
    if mode is None:
        return "none"
    if mode not in CLEAN_MODES:
        raise ValueError(f"The cleaning mode must be one of {', '.join(CLEAN_MODES)}. Got {mode!r} instead.")
    return str(mode)


def clean_image(image: np.ndarray, mode: CleanMode = "fov_marks") -> CleanResult:
    """Clean one image (grey (H, W) or RGB (H, W, 3); float in [0, 1], uint8 or uint16).

    ``none``: grey as is, whole-image box; ``fov``: the field-of-view box, pixels unchanged; ``fov_marks``: the box,
    and the marks painted over. The geometry is kept (no crop here); crop with ``fov_box`` (:attr:`CleanResult.cropped`).
    """
    mode = check_mode(mode)
    g, rgb = _split(image)
    h, w = g.shape
    empty = np.zeros((h, w), bool)
    if mode == "none":
        return CleanResult(g, (0, h, 0, w), empty, mode)
    box, flags = _fov(g)
    if mode == "fov":
        return CleanResult(g, box, empty, mode, flags=flags)
    marks, counts = _marks(g, rgb)
    if counts["colour"]:
        flags.append("colour_marks")
    if counts["grey"]:
        flags.append("grey_marks")
    if counts["inner"]:
        flags.append("inner_marks")
    return CleanResult(inpaint(g, marks), box, marks, mode, counts["colour"], counts["grey"], counts["inner"], flags)


def cleaning_meta(mode: str) -> dict:
    """What a bundle records about the cleaning its model was trained with (``apply_cleaning`` reads it back)."""
    return {"mode": check_mode(mode), "version": CLEANING_VERSION}


def meta_mode(meta: dict | None) -> str:
    """The cleaning mode a bundle's record asks for; a bundle without one was trained on uncleaned images.
    Raises :class:`BundleError` for a record this version cannot reproduce."""
    if not meta:
        return "none"
    mode = meta.get("mode", "none")
    if mode not in CLEAN_MODES:
        raise BundleError(f"The bundle's image cleaning mode {mode!r} is unknown to this version "
                          f"(known: {', '.join(CLEAN_MODES)}); upgrade breastfusion.")
    version = int(meta.get("version", CLEANING_VERSION))
    if mode != "none" and version != CLEANING_VERSION:
        raise BundleError(f"The bundle was trained with image cleaning version {version}; this breastfusion "
                          f"implements version {CLEANING_VERSION}, which would show the model other pixels. "
                          "Use the breastfusion version the bundle was made with, or retrain.")
    return mode


def model_input(image: np.ndarray, side: int, mode: str = "none") -> np.ndarray:
    """The model's input from a decoded image (grey or RGB): cleaned, cropped to the field of view, rounded to
    uint8 and resized to side x side (bicubic), exactly as training reads it."""
    res = clean_image(image, mode)
    return resize_u8(float_to_u8(np.ascontiguousarray(res.cropped)), side)


def apply_cleaning(image: np.ndarray, side: int, meta: dict | None) -> np.ndarray:
    """:func:`model_input` with the mode a bundle recorded (:func:`cleaning_meta`): the bundle's and the
    service's scoring path for an image already decoded (keep its colour: coloured marks are found on RGB)."""
    return model_input(image, side, meta_mode(meta))


def read_for_cleaning(path: str | Path, mode: str, *, max_pixels: int | None = None,
                      min_side: int | None = None) -> np.ndarray:
    """An image file decoded as cleaning needs it: RGB float when its colour can hold marks (mode ``fov_marks``
    on a colour file), else grey float; through :mod:`breastfusion.data.images` (RGBA, 16-bit, EXIF; ``max_pixels``
    and ``min_side`` checked on the header)."""
    img = _open_fully(Path(path), max_pixels=max_pixels, min_side=min_side)
    try:
        if mode == "fov_marks" and img.mode not in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            arr = _to_array(img)
            if arr.ndim == 3:
                if not np.isfinite(arr).all():
                    raise DataError(f"Image '{path}' contains NaN or infinite pixel values.")
                return arr
        return to_gray(img, source=path)[0]
    finally:
        img.close()


def load_cleaned(path: str | Path, side: int, mode: str, *, max_pixels: int | None = None) -> np.ndarray:
    """The model's input (uint8, side x side) of an image file cleaned with ``mode``; :class:`DataError` names
    the file."""
    mode = check_mode(mode)
    arr = read_for_cleaning(path, mode, max_pixels=max_pixels)
    try:
        return model_input(arr, side, mode)
    except DataError as exc:
        raise DataError(f"Image '{path}': {exc}") from exc


def load_for_scoring(path: str | Path, side: int, *, max_pixels: int | None = MAX_SCORED_PIXELS,
                     check_content: bool = True, clean: str | None = None) -> np.ndarray:
    """An image file as the models read it (grey uint8, side x side, bicubic), identical to training's
    :func:`breastfusion.training.data.load_resized`, decoded with bounded memory.

    ``clean`` (``none``, ``fov``, ``fov_marks``: the bundle's ``image.clean``, see the module docstring) crops to
    the field of view and paints over burnt-in marks before resizing, as training did.
    Raises :class:`DataError` naming the file for more than ``max_pixels`` pixels (checked before decoding)
    and, with ``check_content``, for a side below :data:`breastfusion.data.images.MIN_IMAGE_SIDE` or a blank or
    constant image (:func:`breastfusion.data.images.check_not_blank`)."""
    path = Path(path)
    min_side = MIN_IMAGE_SIDE if check_content else None
    if clean not in (None, "none"):
        arr = read_for_cleaning(path, check_mode(clean), max_pixels=max_pixels, min_side=min_side)
        out = model_input(arr, side, clean)
        del arr
        if check_content:
            check_not_blank(out, path)
        return out
    img = _open_fully(path, max_pixels=max_pixels, min_side=min_side)
    try:
        gray, _ = to_gray(img, uint8=True, source=path)
    finally:
        img.close()
    del img  # the decoded image (4 bytes a pixel for RGB) is freed before resizing
    out = resize_u8(gray, side)
    if check_content:
        check_not_blank(out, path)
    return out
