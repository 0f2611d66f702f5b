"""Whole-slide images: reading a slide (OpenSlide, tiffslide or a plain image) and finding its tissue.

Readers
-------
:func:`open_slide` returns a :class:`Slide`. Whole-slide formats (SVS, NDPI, MRXS, tiled pyramidal TIFF, ...)
are read with OpenSlide (``pip install openslide-python openslide-bin``), or with tiffslide when OpenSlide is
not installed. Plain images (PNG, JPEG, BMP, untiled TIFF) are single-level (or, for a TIFF pyramid
tifffile understands, multi-level) slides decoded into memory level by level; give their scale with
``mpp=`` or ``objective=``.

Magnification
-------------
The *base magnification* is the magnification of level 0. It comes, in this order, from ``objective=``,
from ``mpp=`` (magnification = 10 / mpp: 0.25 um/px ~ 40x, 0.5 um/px ~ 20x), from the slide's
``openslide.objective-power`` / ``aperio.AppMag`` property, or from its ``openslide.mpp-x`` property. A
slide without any of these raises :class:`DataError` asking for ``objective=`` or ``mpp=``.
Magnifications derived from mpp are snapped to the nearest standard objective when within 5 %.

Coordinates
-----------
All positions are level-0 pixel coordinates, pixel ``(i, j)`` covering ``[i, i+1) x [j, j+1)``.
:meth:`Slide.read_fov` reads a level-0 box from the coarsest pyramid level that is at least as fine as needed
and resizes it with area averaging (PIL ``BOX`` with a sub-pixel source box, so the geometry is exact). Parts
of a field beyond the slide are white. :func:`tissue_mask` is a low-resolution boolean mask of the tissue.

Concentric multi-magnification stacks and resumable tiling to disk are in :mod:`breastfusion.data.tiling`.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from breastfusion.errors import ConfigError, DataError

MAG_TIMES_MPP = 10.0  # magnification ~ 10 / (microns per pixel)
STANDARD_MAGNIFICATIONS = (1.25, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 63.0, 80.0, 100.0)
PLAIN_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
INSTALL_HINT = "pip install openslide-python openslide-bin"
_MAX_READ_PIXELS = 4_000_000  # pixels per region read when building a thumbnail band (>= 256 rows)


# ====================================================================== backends
class _Backend:
    name = "base"
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height)
    level_downsamples: tuple[float, ...]
    properties: dict[str, str]

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:  # pragma: no cover - abstract
        """In-bounds region of ``level`` at level coordinates, as uint8 RGB (h, w, 3)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def _rgba_on_white(img: Image.Image) -> np.ndarray:
    """PIL image (RGBA, RGB, L, ...) -> uint8 RGB with transparent parts composited on white."""
    if img.mode == "RGBA":
        alpha = img.getchannel("A")
        lo, _ = alpha.getextrema()
        if lo == 255:  # fully opaque (the usual case inside the slide): no blending needed
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img.convert("RGB"), mask=alpha)
        return np.asarray(bg, dtype=np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


class _OpenSlideBackend(_Backend):
    name = "openslide"

    def __init__(self, path: Path, module) -> None:
        self._mod = module
        try:
            self._s = module.OpenSlide(str(path))
        except Exception as exc:  # OpenSlideError, OpenSlideUnsupportedFormatError, OSError
            raise DataError(f"Cannot read slide '{path}' with OpenSlide: {exc}") from exc
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._s.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._s.level_downsamples)
        self.properties = dict(self._s.properties)
        self.path = path

    def read(self, level, x, y, w, h):
        ds = self.level_downsamples[level]
        try:
            img = self._s.read_region((int(round(x * ds)), int(round(y * ds))), int(level), (int(w), int(h)))
        except Exception as exc:
            raise DataError(f"Cannot read region ({x}, {y}, {w}x{h}) at level {level} of slide '{self.path}': "
                            f"{exc}") from exc
        return _rgba_on_white(img)

    def close(self):
        self._s.close()


class _TiffSlideBackend(_OpenSlideBackend):
    name = "tiffslide"

    def __init__(self, path: Path, module) -> None:
        try:
            self._s = module.TiffSlide(str(path))
        except Exception as exc:
            raise DataError(f"Cannot read slide '{path}' with tiffslide: {exc}") from exc
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._s.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._s.level_downsamples)
        # tiffslide names its properties 'tiffslide.*'; expose the OpenSlide names too.
        props = {str(k): str(v) for k, v in dict(self._s.properties).items() if v is not None}
        for k, v in list(props.items()):
            if k.startswith("tiffslide."):
                props.setdefault("openslide." + k[len("tiffslide."):], v)
        self.properties = props
        self.path = path


def _to_rgb_uint8(arr: np.ndarray, axes: str, path: Path) -> np.ndarray:
    if arr.ndim == 3 and axes.startswith("S") and arr.shape[0] in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar (S, Y, X) -> (Y, X, S)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise DataError(f"Slide '{path}': unsupported image layout {arr.shape} (axes {axes!r}); expected RGB.")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return (arr >> 8).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    raise DataError(f"Slide '{path}': unsupported pixel type {arr.dtype}.")


class _ArrayBackend(_Backend):
    """Plain images held in memory: a PNG/JPEG/BMP, or each level of a TIFF that OpenSlide cannot read."""

    name = "array"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.properties = {}
        self._levels: list[np.ndarray | None] = []
        self._lock = threading.Lock()
        self._tif = None
        if path.suffix.lower() in (".tif", ".tiff"):
            self._open_tiff(path)
        else:
            from breastfusion.data.images import _open_fully  # shared decoding with DataError messages

            img = _open_fully(path)
            self._levels = [_rgba_on_white(img.convert("RGBA") if img.mode in ("P", "PA", "LA", "RGBA")
                                           else img)]
            h, w = self._levels[0].shape[:2]
            self.level_dimensions = ((w, h),)
            self.level_downsamples = (1.0,)

    def _open_tiff(self, path: Path) -> None:
        try:
            import tifffile

            self._tif = tifffile.TiffFile(str(path))
            series = self._tif.series[0]
            levels = list(series.levels) if len(series.levels) else [series]
            self._series_levels = levels
            dims = []
            for lv in levels:
                shape = dict(zip(lv.axes, lv.shape))
                dims.append((int(shape["X"]), int(shape["Y"])))
            page = self._tif.pages[0]
            tags = page.tags
            if "XResolution" in tags and "ResolutionUnit" in tags:
                num, den = tags["XResolution"].value
                unit = int(tags["ResolutionUnit"].value)
                if num and den:
                    per_unit = num / den
                    um = {2: 25400.0, 3: 10000.0}.get(unit)
                    if um:
                        self.properties["plain.mpp"] = str(um / per_unit)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"Cannot read TIFF '{path}': {exc}") from exc
        self.level_dimensions = tuple(dims)
        w0 = dims[0][0]
        self.level_downsamples = tuple(w0 / d[0] for d in dims)
        self._levels = [None] * len(dims)

    def _level(self, level: int) -> np.ndarray:
        with self._lock:
            if self._levels[level] is None:
                lv = self._series_levels[level]
                try:
                    arr = lv.asarray()
                except Exception as exc:
                    raise DataError(f"Cannot decode level {level} of TIFF '{self.path}': {exc}") from exc
                self._levels[level] = _to_rgb_uint8(np.squeeze(arr), lv.axes.replace("Q", ""), self.path)
            return self._levels[level]

    def read(self, level, x, y, w, h):
        return self._level(level)[y:y + h, x:x + w]

    def close(self):
        if self._tif is not None:
            self._tif.close()
        self._levels = [None] * len(self._levels)


def _import_openslide():
    try:
        import openslide

        return openslide
    except (ImportError, OSError):  # OSError: the python module is there but the C library is not
        return None


def _import_tiffslide():
    try:
        import tiffslide

        return tiffslide
    except ImportError:
        return None


# ====================================================================== Slide
def _snap(mag: float) -> float:
    for s in STANDARD_MAGNIFICATIONS:
        if abs(mag - s) <= 0.05 * s:
            return float(s)
    return float(mag)


def _positive(value, name: str, path: Path) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"'{name}' for slide '{path}' must be a positive number. Got {value!r} instead.") from exc
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(f"'{name}' for slide '{path}' must be a positive number. Got {value!r} instead.")
    return v


def _prop_float(props: dict[str, str], *keys: str) -> float | None:
    for k in keys:
        v = props.get(k)
        if v is None or str(v).strip() == "":
            continue
        try:
            f = float(v)
        except ValueError:
            continue
        if math.isfinite(f) and f > 0:
            return f
    return None


@dataclass
class Slide:
    """An open slide. Use as a context manager or call :meth:`close`.

    ``level_dimensions`` are (width, height) per pyramid level; ``level_downsamples`` their factors relative
    to level 0; ``base_magnification`` the magnification of level 0 and ``magnification_source`` where it
    came from; ``mpp`` microns per level-0 pixel (None when only the magnification is known).
    """

    path: Path
    backend: _Backend = field(repr=False)
    base_magnification: float
    magnification_source: str
    mpp: float | None

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.backend.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self.backend.level_downsamples

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def properties(self) -> dict[str, str]:
        return self.backend.properties

    def level_magnifications(self) -> list[float]:
        return [self.base_magnification / d for d in self.level_downsamples]

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (level 0 if none)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + 1e-6) and d >= self.level_downsamples[best]:
                best = i
        return best

    def check_magnifications(self, magnifications: Iterable[float], *, allow_upsample: bool = False) -> list[float]:
        mags = [float(m) for m in magnifications]
        if not mags:
            raise ConfigError("At least one magnification is needed.")
        for m in mags:
            if not math.isfinite(m) or m <= 0:
                raise ConfigError(f"Magnifications must be positive numbers. Got {m!r} instead.")
            if m > self.base_magnification * (1 + 1e-6) and not allow_upsample:
                raise DataError(
                    f"Slide '{self.path}' was scanned at {self.base_magnification:g}x "
                    f"({self.magnification_source}); {m:g}x would need upsampling. Use magnifications "
                    f"<= {self.base_magnification:g} (or allow_upsample=True)."
                )
        return mags

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """uint8 RGB (h, w, 3) of ``size`` (w, h) pixels of ``level``, top-left at level-0 ``location``.

        Like OpenSlide's, but RGB and white (not transparent) outside the slide.
        """
        if not 0 <= level < self.level_count:
            raise ConfigError(f"Level {level} does not exist in slide '{self.path}' ({self.level_count} levels).")
        d = self.level_downsamples[level]
        lx, ly = int(round(location[0] / d)), int(round(location[1] / d))
        return self._read_level_box(level, lx, ly, int(size[0]), int(size[1]))

    def _read_level_box(self, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        lw, lh = self.level_dimensions[level]
        ax0, ay0 = max(lx, 0), max(ly, 0)
        ax1, ay1 = min(lx + w, lw), min(ly + h, lh)
        if ax1 > ax0 and ay1 > ay0:
            part = self.backend.read(level, ax0, ay0, ax1 - ax0, ay1 - ay0)
            out[ay0 - ly:ay1 - ly, ax0 - lx:ax1 - lx] = part
        return out

    def read_fov(self, x0: float, y0: float, w0: float, h0: float, out_size: tuple[int, int]) -> np.ndarray:
        """The level-0 box ``[x0, x0+w0) x [y0, y0+h0)`` resampled to ``out_size`` (w, h), uint8 RGB.

        Reads from the coarsest level at least as fine as needed; area averaging when down-sampling.
        """
        ow, oh = int(out_size[0]), int(out_size[1])
        ds = min(w0 / ow, h0 / oh)
        level = self.best_level_for_downsample(ds)
        d = self.level_downsamples[level]
        fx0, fy0, fw, fh = x0 / d, y0 / d, w0 / d, h0 / d
        ix0, iy0 = math.floor(fx0 + 1e-9), math.floor(fy0 + 1e-9)
        ix1, iy1 = math.ceil(fx0 + fw - 1e-9), math.ceil(fy0 + fh - 1e-9)
        region = self._read_level_box(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
        box = (fx0 - ix0, fy0 - iy0, fx0 - ix0 + fw, fy0 - iy0 + fh)
        if region.shape[:2] == (oh, ow) and max(abs(b - r) for b, r in zip(box, (0, 0, ow, oh))) < 1e-6:
            return region
        resample = Image.Resampling.BOX if fw >= ow * (1 - 1e-6) else Image.Resampling.BILINEAR
        img = Image.fromarray(region).resize((ow, oh), resample=resample, box=box)
        return np.asarray(img, dtype=np.uint8)

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """Whole-slide thumbnail (uint8 RGB) whose longer side is ``max_size``; read in bands (bounded memory)."""
        W, H = self.dimensions
        scale = max(W, H) / float(max_size)
        if scale < 1:
            scale = 1.0
        tw, th = max(1, int(round(W / scale))), max(1, int(round(H / scale)))
        return self._resample_whole(tw, th)

    def _resample_whole(self, tw: int, th: int) -> np.ndarray:
        W, H = self.dimensions
        sx, sy = W / tw, H / th
        level = self.best_level_for_downsample(min(sx, sy))
        d = self.level_downsamples[level]
        level_w = max(1.0, W / d)
        level_rows_per_row = max(sy / d, 1.0)
        rows_per_band = max(1, int(_MAX_READ_PIXELS / (level_w * level_rows_per_row)),
                            math.ceil(256 / level_rows_per_row))
        out = np.empty((th, tw, 3), dtype=np.uint8)
        for r0 in range(0, th, rows_per_band):
            r1 = min(th, r0 + rows_per_band)
            out[r0:r1] = self.read_fov(0.0, r0 * sy, float(W), (r1 - r0) * sy, (tw, r1 - r0))
        return out

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_slide(path: str | Path, *, mpp: float | None = None, objective: float | None = None) -> Slide:
    """Open a whole-slide image or a plain large image as a :class:`Slide`.

    ``mpp`` (microns per level-0 pixel) or ``objective`` (base magnification) override the slide's own
    metadata; one of them is required when the file has none (e.g. PNG).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"Slide file not found: '{path}'.")
    if not path.is_file():
        raise DataError(f"Expected a slide file but '{path}' is not a regular file.")
    if path.stat().st_size == 0:
        raise DataError(f"Slide file '{path}' is empty (0 bytes).")
    if mpp is not None:
        mpp = _positive(mpp, "mpp", path)
    if objective is not None:
        objective = _positive(objective, "objective", path)

    suffix = path.suffix.lower()
    backend: _Backend | None = None
    osl = _import_openslide()
    if osl is not None:
        try:
            fmt = osl.OpenSlide.detect_format(str(path))
        except Exception:
            fmt = None
        if fmt is not None:
            backend = _OpenSlideBackend(path, osl)
    if backend is None and osl is None and suffix not in (".png", ".jpg", ".jpeg", ".bmp"):
        tsl = _import_tiffslide()
        if tsl is not None:
            with contextlib.suppress(DataError):
                backend = _TiffSlideBackend(path, tsl)
    if backend is None:
        if suffix in PLAIN_IMAGE_SUFFIXES:
            backend = _ArrayBackend(path)
        elif osl is None and _import_tiffslide() is None:
            raise DataError(
                f"Cannot read slide '{path}': whole-slide formats need OpenSlide ({INSTALL_HINT}) "
                "or tiffslide (pip install tiffslide)."
            )
        else:
            raise DataError(
                f"Cannot read slide '{path}': not a whole-slide format OpenSlide recognises "
                "(corrupt, truncated, or another format)."
            )

    props = backend.properties
    meta_mpp = _prop_float(props, "openslide.mpp-x", "aperio.MPP", "plain.mpp")
    if meta_mpp is not None and not 0.01 <= meta_mpp <= 20:
        meta_mpp = None  # e.g. a 72-dpi screen resolution, not a microscope scale
    meta_obj = _prop_float(props, "openslide.objective-power", "aperio.AppMag")
    if objective is not None:
        base, source = objective, "objective= argument"
    elif mpp is not None:
        base, source = _snap(MAG_TIMES_MPP / mpp), f"mpp= argument ({mpp:g} um/px)"
    elif meta_obj is not None:
        base, source = meta_obj, "slide objective-power"
    elif meta_mpp is not None:
        base, source = _snap(MAG_TIMES_MPP / meta_mpp), f"slide mpp ({meta_mpp:g} um/px)"
    else:
        backend.close()
        raise DataError(
            f"Slide '{path}': base magnification unknown (no objective-power, AppMag or microns-per-pixel "
            "metadata). Pass objective=40 (or 20, ...) or mpp=0.25 (microns per pixel) to open_slide."
        )
    slide_mpp = mpp if mpp is not None else meta_mpp
    return Slide(path=path, backend=backend, base_magnification=float(base), magnification_source=source,
                 mpp=slide_mpp)


@contextlib.contextmanager
def _as_slide(slide: Slide | str | Path, **open_kwargs):
    if isinstance(slide, Slide):
        yield slide
    else:
        s = open_slide(slide, **open_kwargs)
        try:
            yield s
        finally:
            s.close()


# ====================================================================== tissue
def tissue_mask(
    slide: Slide,
    *,
    level: int | None = None,
    size: int = 1024,
    min_area: float = 2e-4,
    saturation_bounds: tuple[float, float] = (0.05, 0.15),
    dark_threshold: float = 0.12,
) -> np.ndarray:
    """Boolean tissue mask of the whole slide at low resolution.

    The thumbnail is ``level`` (that level's full size) or, by default, ``size`` pixels on its longer side;
    either way its scale to level 0 is ``slide.dimensions[0] / mask.shape[1]``. Tissue = HSV saturation above
    Otsu's threshold (clamped to ``saturation_bounds`` so an all-tissue or all-glass slide still works) and
    not near-black (value below ``dark_threshold``: pen, folds, scanner edges); then a closing and an opening
    (radius ~ 1/256 of the thumbnail), holes smaller than ``min_area`` filled and objects smaller than
    ``min_area`` (fraction of the thumbnail area) removed.
    """
    from scipy import ndimage as ndi

    if level is not None:
        if not 0 <= level < slide.level_count:
            raise ConfigError(f"Level {level} does not exist in slide '{slide.path}' ({slide.level_count} levels).")
        lw, lh = slide.level_dimensions[level]
        thumb = slide._resample_whole(lw, lh)
    else:
        thumb = slide.thumbnail(int(size))
    rgb = thumb.astype(np.float32) / 255.0
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    lo, hi = saturation_bounds
    thr = float(np.clip(_otsu(sat), lo, hi))
    mask = (sat > thr) & (mx > dark_threshold)
    h, w = mask.shape
    r = max(1, int(round(max(h, w) / 256)))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    fp = xx**2 + yy**2 <= r * r
    # Pad so the closing does not glue tissue to the image border.
    mask = ndi.binary_closing(np.pad(mask, r + 1), structure=fp)[r + 1:-r - 1, r + 1:-r - 1]
    mask = ndi.binary_opening(mask, structure=fp)
    area = max(1, int(min_area * h * w))
    mask = ~_drop_small(~mask, area)  # fill small holes
    mask = _drop_small(mask, area)
    return mask.astype(bool)


def _drop_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Remove 8-connected components smaller than ``min_size`` pixels."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[lab]


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (histogram based); 1.0 for a constant image."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    if np.count_nonzero(hist) < 2:
        return 1.0
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1e-12)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])
