"""Nuclei annotations: Aperio ImageScope XML outlines and instance-label masks.

* :func:`read_imagescope_xml` reads an ImageScope ``.xml`` (plain or gzip-compressed, told apart by the gzip
  magic bytes, not the file name) into a list of (N, 2) float arrays of ``x, y`` vertices, one per Region.
* :func:`polygons_to_instances` rasterises them into an int32 label image, label k+1 for polygon k.
* :func:`read_instance_mask` / :func:`write_instance_mask` read and write instance masks (16-bit PNG while the
  largest label is below 65536, otherwise 32-bit TIFF). Writes are atomic.

Every failure raises :class:`~breastfusion.errors.DataError` naming the file.
"""

from __future__ import annotations

import gzip
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from skimage.draw import polygon as draw_polygon

from breastfusion.errors import DataError
from breastfusion.utils import atomic_path

__all__ = ["polygons_to_instances", "read_imagescope_xml", "read_instance_mask", "write_instance_mask"]

_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DataError(f"Annotation file not found: '{path}'.")
    if not path.is_file():
        raise DataError(f"Expected an annotation file but '{path}' is not a regular file.")
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"Cannot decompress '{path}': corrupt or truncated gzip data ({exc}).") from exc
    return raw


def read_imagescope_xml(path: str | Path, *, min_vertices: int = 3) -> list[np.ndarray]:
    """Read every ``Region`` of an Aperio ImageScope XML file as an (N, 2) float64 array of (x, y) vertices.

    Regions of all ``Annotation`` layers are returned in document order. Regions with fewer than
    ``min_vertices`` vertices (points, stray clicks) are skipped. A file that is not well-formed XML, whose root
    is not ``Annotations``, or that has a vertex with a missing or non-numeric coordinate raises DataError.
    """
    path = Path(path)
    raw = _read_bytes(path)
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as exc:
        raise DataError(f"Malformed ImageScope XML in '{path}': {exc}.") from exc
    if root.tag != "Annotations":
        raise DataError(f"'{path}' is not an Aperio ImageScope annotation file (root element <{root.tag}>, expected <Annotations>).")
    polygons: list[np.ndarray] = []
    for r_idx, region in enumerate(root.iter("Region")):
        verts = region.findall("./Vertices/Vertex")
        if len(verts) < min_vertices:
            continue
        try:
            xy = np.array([(float(v.attrib["X"]), float(v.attrib["Y"])) for v in verts], dtype=np.float64)
        except (KeyError, ValueError) as exc:
            rid = region.attrib.get("Id", str(r_idx))
            raise DataError(f"Region Id={rid} in '{path}' has a vertex with a missing or non-numeric X/Y ({exc}).") from exc
        if not np.isfinite(xy).all():
            rid = region.attrib.get("Id", str(r_idx))
            raise DataError(f"Region Id={rid} in '{path}' has a non-finite vertex coordinate.")
        polygons.append(xy)
    return polygons


def polygons_to_instances(polygons: list[np.ndarray], shape: tuple[int, int], *, overlap: str = "later") -> np.ndarray:
    """Rasterise (N, 2) ``x, y`` polygons into an int32 instance label image of ``shape`` (H, W).

    Polygon k gets label k + 1 (so labels follow the input order; a polygon entirely outside the image leaves
    its label unused). A pixel is inside when its centre is inside the polygon (``skimage.draw.polygon``), and
    vertices are clipped to the image. Where polygons overlap, ``overlap='later'`` (default) lets the later
    polygon win, ``overlap='first'`` keeps the earlier one.
    """
    if overlap not in ("later", "first"):
        raise ValueError(f"overlap must be 'later' or 'first'; got {overlap!r}.")
    shape = tuple(int(s) for s in shape[:2])
    labels = np.zeros(shape, dtype=np.int32)
    for k, poly in enumerate(polygons):
        poly = np.asarray(poly, dtype=np.float64)
        if poly.ndim != 2 or poly.shape[1] != 2:
            raise DataError(f"Polygon {k} has shape {poly.shape}; expected (N, 2) x, y vertices.")
        rr, cc = draw_polygon(poly[:, 1], poly[:, 0], shape=shape)
        if overlap == "later":
            labels[rr, cc] = k + 1
        else:
            free = labels[rr, cc] == 0
            labels[rr[free], cc[free]] = k + 1
    return labels


def read_instance_mask(path: str | Path) -> np.ndarray:
    """Read an instance mask (8/16-bit PNG, 16/32-bit TIFF) as an int32 (H, W) label image.

    Colour (RGB) instance masks are refused: ids encoded as colours are ambiguous.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"Instance mask not found: '{path}'.")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except UnidentifiedImageError as exc:
        raise DataError(f"Cannot read instance mask '{path}': not a recognised image format.") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"Cannot read instance mask '{path}': corrupt or truncated ({exc}).") from exc
    if arr.ndim != 2:
        raise DataError(f"Instance mask '{path}' has mode {mode} with shape {arr.shape}; expected a single-channel label image.")
    if np.issubdtype(arr.dtype, np.floating) and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
        raise DataError(f"Instance mask '{path}' holds non-integer values; expected integer labels.")
    if arr.size and arr.min() < 0:
        raise DataError(f"Instance mask '{path}' has negative labels.")
    if arr.size and arr.max() > np.iinfo(np.int32).max:
        raise DataError(f"Instance mask '{path}' has labels beyond the int32 range.")
    return arr.astype(np.int32)


def write_instance_mask(labels: np.ndarray, path: str | Path) -> Path:
    """Write an instance label image atomically: 16-bit PNG when max label < 65536, else 32-bit TIFF.

    A ``.tif``/``.tiff`` path is always written as TIFF. When the labels need 32 bits and ``path`` is not a TIFF
    path, the file is written with a ``.tif`` suffix instead; the returned path is the file actually written.
    """
    labels = np.asarray(labels)
    path = Path(path)
    if labels.ndim != 2:
        raise DataError(f"Instance labels for '{path}' must be 2-D; got shape {labels.shape}.")
    if labels.dtype != bool and not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"Instance labels for '{path}' must be integers; got {labels.dtype}.")
    lab = labels.astype(np.int64)
    if lab.size and lab.min() < 0:
        raise DataError(f"Instance labels for '{path}' contain negative values.")
    mx = int(lab.max()) if lab.size else 0
    if mx > np.iinfo(np.int32).max:
        raise DataError(f"Instance labels for '{path}' exceed the int32 range (max {mx}).")
    tiff = path.suffix.lower() in (".tif", ".tiff")
    if mx < 65536:
        img = Image.fromarray(lab.astype(np.uint16))  # mode I;16
        fmt = "TIFF" if tiff else "PNG"
    else:
        if not tiff:
            path = path.with_suffix(".tif")
        img = Image.fromarray(lab.astype(np.int32))  # mode I (32-bit signed)
        fmt = "TIFF"
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt)
    return path

