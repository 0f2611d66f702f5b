"""Image and mask I/O shared by every stage.

Real-world files arrive as 8-bit grey, 16-bit grey, RGB, RGBA, palette or 1-bit images. Everything is
normalised here, once, so the rest of the code sees either a float32 grey image in [0, 1] or a
uint8 RGB array, and a boolean mask. Every failure raises :class:`DataError` naming the file.

EXIF orientation (phones and some scanners store the pixels sideways plus a tag saying how to turn them) is
applied on reading, to images and masks alike, so both are upright and still match each other.

Grey conversion runs in strips of :data:`STRIP_PIXELS` pixels, so decoding holds the decoded image plus one
strip of float copies, not several full-size float32 copies (a 12000x12000 RGB PNG took 4.9 GB); values are
bit-identical to converting the whole image at once. The prediction path
(:func:`breastfusion.data.cleaning.load_for_scoring`, built on the decoders here) refuses images above
:data:`MAX_SCORED_PIXELS` before decoding, below :data:`MIN_IMAGE_SIDE` on a side, and blank or constant ones
(:func:`check_not_blank`), each with a :class:`DataError` naming the file.

This module imports no other module of :mod:`breastfusion.data`: cleaning and the model-input paths build on it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from breastfusion.errors import DataError

# A decompression bomb limit that still admits whole 40x tiles and large ultrasound frames.
MAX_IMAGE_PIXELS = 20_000 * 20_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
#: Largest image (width x height) that batch prediction and the service (``serve --max-pixels``) score: checked
#: on the header, before decoding. 40 MP is far above ultrasound frames (~1 MP) and bounds decoding memory.
MAX_SCORED_PIXELS = 40_000_000
#: Smallest side (pixels) of an image to score: a 1x1 image was scored "benign 1.0"; below this there is no
#: lesion to see, only an upscaled blur.
MIN_IMAGE_SIDE = 32
#: A model input whose pixel standard deviation is below this many grey levels (of 255) is blank or constant:
#: there is nothing to score, and the network would still answer with confidence.
BLANK_STD = 1.0
#: Pixels converted to float per strip when converting to grey (bounds the float copies held at once).
STRIP_PIXELS = 1 << 20
_ORIENTATION = 0x0112  # EXIF tag
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601
# Modes that _to_array converts pixel by pixel (no whole-image statistics), so strips give identical values.
_POINTWISE = {"1", "L", "P", "PA", "LA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV",
              "I;16", "I;16B", "I;16L", "I;16N"}


def _upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation tag says (a no-copy no-op without one)."""
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block does not make the pixels unreadable
        return img
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return img
    fmt = img.format
    out = ImageOps.exif_transpose(img)
    out.format = fmt  # kept for messages and the service's description of the upload
    return out


def _open_fully(path: Path, *, max_pixels: int | None = None, min_side: int | None = None) -> Image.Image:
    """Open and decode a file completely so truncation is caught here, not later, and turn it upright (EXIF).

    ``max_pixels`` and ``min_side`` are checked on the header, before any pixel is decoded."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"Image file not found: '{path}'.")
    if not path.is_file():
        raise DataError(f"Expected an image file but '{path}' is not a regular file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            _check_size(img.width, img.height, path, max_pixels, min_side)
            img.load()
    except DataError:
        raise
    except UnidentifiedImageError as exc:
        raise DataError(f"Cannot read '{path}': not a recognised image format.") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL reports truncated or corrupt data as OSError ("image file is truncated").
        raise DataError(f"Cannot read '{path}': corrupt or truncated image ({exc}).") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"Refusing '{path}': too many pixels (limit {MAX_IMAGE_PIXELS}).") from exc
    if img.width == 0 or img.height == 0:
        raise DataError(f"Image '{path}' is empty (size {img.width}x{img.height}).")
    return _upright(img)


def _check_size(w: int, h: int, path: Path, max_pixels: int | None, min_side: int | None) -> None:
    if max_pixels is not None and w * h > max_pixels:
        raise DataError(f"Refusing '{path}': it is {w}x{h} = {w * h} pixels; the limit is {max_pixels} pixels "
                        "(decoding it would take too much memory). Downscale it, or raise the limit.")
    if min_side is not None and min(w, h) < min_side:
        raise DataError(f"Image '{path}' is {w}x{h} pixels, smaller than {min_side} px on a side: too small to "
                        "score (there is no lesion to see).")


def _to_array(img: Image.Image) -> np.ndarray:
    """Decode any PIL mode into float32 in [0, 1], shape (H, W) or (H, W, 3)."""
    mode = img.mode
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA"):
        # Composite transparent pixels on black: ultrasound background is black.
        rgba = img.convert("RGBA")
        arr = np.asarray(rgba, dtype=np.float32) / 255.0
        rgb = arr[..., :3] * arr[..., 3:4]
        return rgb if mode == "RGBA" else rgb[..., 0]
    if mode == "1":
        return np.asarray(img, dtype=np.float32)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float32)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        return np.clip(arr / hi, 0.0, 1.0)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if mode == "L":
        return np.asarray(img, dtype=np.float32) / 255.0
    # RGB, CMYK, YCbCr, ...
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def read_image(path: str | Path, mode: str = "gray") -> np.ndarray:
    """Read an image file as float32 in [0, 1].

    ``mode='gray'`` returns (H, W) (colour averaged with ITU-R 601 luma weights);
    ``mode='rgb'`` returns (H, W, 3) (grey replicated).
    """
    path = Path(path)
    if mode == "gray":
        return to_gray(_open_fully(path), source=path)[0]
    arr = _to_array(_open_fully(path))
    if not np.isfinite(arr).all():
        raise DataError(f"Image '{path}' contains NaN or infinite pixel values.")
    if mode == "rgb":
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        return arr.astype(np.float32, copy=False)
    raise ValueError(f"The 'mode' parameter of read_image must be 'gray' or 'rgb'. Got {mode!r} instead.")


def _gray_part(img: Image.Image, source, want_colour: bool) -> tuple[np.ndarray, bool]:
    arr = _to_array(img)
    if img.mode not in _POINTWISE and not np.isfinite(arr).all():  # integer modes are always finite
        raise DataError(f"Image '{source}' contains NaN or infinite pixel values.")
    if arr.ndim == 3:
        # colour = some pixel's channels differ by more than one grey level (pairwise differences: np.ptp over
        # the last axis is 40x slower)
        colour = want_colour and any(float(np.abs(arr[..., i] - arr[..., j]).max()) > 1.0 / 255.0
                                     for i, j in ((0, 1), (0, 2), (1, 2)))
        return arr @ _LUMA, colour
    return arr, False


def _as_u8(gray: np.ndarray) -> np.ndarray:
    return np.clip(gray * 255.0 + 0.5, 0, 255).astype(np.uint8)


def to_gray(img: Image.Image, *, uint8: bool = False, source="image",
            colour: bool = False) -> tuple[np.ndarray, bool]:
    """(grey (H, W), whether the image has colour (only computed with ``colour``)) of a decoded image: float32
    in [0, 1] as :func:`read_image` returns it, or (``uint8``) rounded to 0..255 as the models read it.
    Converted in strips of :data:`STRIP_PIXELS` pixels, with values identical to converting the whole image."""
    w, h = img.size
    want = colour
    if img.mode not in _POINTWISE:  # 32-bit int / float images are scaled by their own range: whole image
        gray, colour = _gray_part(img, source, want)
        return (_as_u8(gray) if uint8 else gray.astype(np.float32, copy=False)), colour
    out = np.empty((h, w), dtype=np.uint8 if uint8 else np.float32)
    rows = max(1, STRIP_PIXELS // max(w, 1))
    colour = False
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        part, c = _gray_part(img.crop((0, y0, w, y1)), source, want and not colour)
        colour |= c
        out[y0:y1] = _as_u8(part) if uint8 else part
    return out, colour


def float_to_u8(gray: np.ndarray) -> np.ndarray:
    """``round(gray * 255)`` as uint8, in strips (no full-size float temporaries)."""
    gray = np.asarray(gray)
    out = np.empty(gray.shape, dtype=np.uint8)
    rows = max(1, STRIP_PIXELS // max(gray.shape[1] if gray.ndim > 1 else 1, 1))
    for y0 in range(0, gray.shape[0], rows):
        out[y0:y0 + rows] = _as_u8(gray[y0:y0 + rows])
    return out


def resize_u8(gray_u8: np.ndarray, side: int) -> np.ndarray:
    """A uint8 grey image resized to side x side, bicubic: the models' input contract."""
    return np.array(Image.fromarray(gray_u8).resize((side, side), Image.Resampling.BICUBIC), dtype=np.uint8)


def check_not_blank(model_input: np.ndarray, source) -> None:
    """Refuse a blank or constant model input (uint8 grey) with a :class:`DataError` naming ``source``."""
    sd = float(np.std(model_input))
    if sd < BLANK_STD:
        lo, hi = int(model_input.min()), int(model_input.max())
        raise DataError(f"Image '{source}' is blank or constant (grey levels {lo}..{hi}, standard deviation "
                        f"{sd:.2f} < {BLANK_STD:g} after resizing to the model's input): nothing to score.")


def read_mask(paths: str | Path | list, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read one or several lesion masks and return their union as a boolean (H, W) array.

    Several masks (BUSI's ``_mask``, ``_mask_1``, ...) are OR-ed. When ``shape`` is given, every mask
    must have exactly that (H, W) size, otherwise :class:`DataError` names the mask and both sizes.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        if shape is None:
            raise DataError("read_mask needs at least one mask path or a shape for an empty mask.")
        return np.zeros(shape, dtype=bool)
    union = None
    for p in paths:
        m = _to_array(_open_fully(p))
        if m.ndim == 3:
            m = m.max(axis=2)
        m = m > 0.5 * max(float(m.max()), 1e-6) if m.max() > 0 else np.zeros(m.shape, dtype=bool)
        if shape is not None and m.shape != tuple(shape):
            raise DataError(
                f"Mask '{p}' has size {m.shape[1]}x{m.shape[0]} (WxH) but its image is "
                f"{shape[1]}x{shape[0]}; the mask does not belong to this image or was resized."
            )
        union = m if union is None else (union | m) if union.shape == m.shape else _size_clash(paths, union, m)
    return union


def _size_clash(paths, a, b):
    raise DataError(f"Masks {', '.join(map(str, paths))} do not all have the same size ({a.shape} vs {b.shape}).")


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image without decoding all pixels."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"Image file not found: '{path}'.")
    try:
        with Image.open(path) as img:
            # A PNG may keep EXIF after the pixels, where reading it would decode them all: only a tag in the
            # header is seen there (Pillow writes it there). Orientations 5-8 swap width and height.
            exif = img.getexif() if img.format != "PNG" or "exif" in img.info else {}
            if exif.get(_ORIENTATION, 1) in (5, 6, 7, 8):
                return img.width, img.height
            return img.height, img.width
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"Cannot read '{path}': {exc}.") from exc
