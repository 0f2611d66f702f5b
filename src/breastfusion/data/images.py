"""Image and mask I/O shared by every stage.

Real-world files arrive as 8-bit grey, 16-bit grey, RGB, RGBA, palette or 1-bit images. Everything is
normalised here, once, so the rest of the code sees either a float32 grey image in [0, 1] or a
uint8 RGB array, and a boolean mask. Every failure raises :class:`DataError` naming the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from breastfusion.errors import DataError

# A decompression bomb limit that still admits whole 40x tiles and large ultrasound frames.
MAX_IMAGE_PIXELS = 20_000 * 20_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def _open_fully(path: Path) -> Image.Image:
    """Open and decode a file completely so truncation is caught here, not later."""
    if not path.exists():
        raise DataError(f"Image file not found: '{path}'.")
    if not path.is_file():
        raise DataError(f"Expected an image file but '{path}' is not a regular file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
    except UnidentifiedImageError as exc:
        raise DataError(f"Cannot read '{path}': not a recognised image format.") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL reports truncated or corrupt data as OSError ("image file is truncated").
        raise DataError(f"Cannot read '{path}': corrupt or truncated image ({exc}).") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"Refusing '{path}': too many pixels (limit {MAX_IMAGE_PIXELS}).") from exc
    if img.width == 0 or img.height == 0:
        raise DataError(f"Image '{path}' is empty (size {img.width}x{img.height}).")
    return img


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
    arr = _to_array(_open_fully(path))
    if not np.isfinite(arr).all():
        raise DataError(f"Image '{path}' contains NaN or infinite pixel values.")
    if mode == "gray":
        if arr.ndim == 3:
            arr = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return arr.astype(np.float32, copy=False)
    if mode == "rgb":
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        return arr.astype(np.float32, copy=False)
    raise ValueError(f"The 'mode' parameter of read_image must be 'gray' or 'rgb'. Got {mode!r} instead.")


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
            return img.height, img.width
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"Cannot read '{path}': {exc}.") from exc
