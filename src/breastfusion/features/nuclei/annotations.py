"""Nuclei annotations: Aperio ImageScope XML outlines and instance-label masks.

* :func:`read_imagescope_xml` reads an ImageScope ``.xml`` (plain or gzip-compressed, told apart by the gzip
  magic bytes, not the file name) into a list of (N, 2) float arrays of ``x, y`` vertices, one per Region.
* :func:`polygons_to_instances` rasterises them into an int32 label image, label k+1 for polygon k.
* :func:`read_instance_mask` / :func:`write_instance_mask` read and write instance masks (16-bit PNG while the
  largest label is below 65536, otherwise 32-bit TIFF). Writes are atomic.

Every failure raises :class:`~breastfusion.errors.DataError` naming the file.

Annotated folders (:func:`load_annotated_dir`)
----------------------------------------------
Images are the files with suffix .tif/.tiff/.png/.jpg/.jpeg/.bmp in ``DIR/images/`` or, when that folder does
not exist, directly in ``DIR``. For an image with stem ``S`` the first annotation found is used:

1. ImageScope XML outlines: ``DIR/annotations/S.xml`` or ``S.xml.gz`` (or next to the image) → instances;
2. an instance-label image (0 = background, 1..n; 8/16-bit PNG or 16/32-bit TIFF):
   ``DIR/masks/S_nuclei.png``, ``S_nuclei.tif``, ``S.png``, ``S.tif``, ``S.tiff`` → instances;
3. a binary mask: ``DIR/binary_masks/S.png``, ``S.tif``, ``S.tiff`` (non-zero = nucleus) → foreground only.

This is the MoNuSeg layout (``images/``, ``annotations/``, ``binary_masks/``) and the layout written by
``breastfusion nuclei segment`` (``<stem>_nuclei.png``) once moved into ``masks/``.
"""

from __future__ import annotations

import gzip
import logging
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from skimage.draw import polygon as draw_polygon

from breastfusion.errors import DataError
from breastfusion.utils import atomic_path

__all__ = [
    "AnnotatedSet",
    "AnnotatedTile",
    "load_annotated_dir",
    "polygons_to_instances",
    "read_imagescope_xml",
    "read_instance_mask",
    "write_instance_mask",
]

log = logging.getLogger("breastfusion.nuclei")

_GZIP_MAGIC = b"\x1f\x8b"
_IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")


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


# ------------------------------------------------------------------------------------------------ annotated folders
@dataclass
class AnnotatedTile:
    """One annotated image: uint8 RGB, int32 instance labels (None for foreground-only tiles), bool mask."""

    name: str
    image: np.ndarray
    labels: np.ndarray | None
    mask: np.ndarray
    image_path: Path
    annotation_path: Path

    @property
    def n_nuclei(self) -> int | None:
        return None if self.labels is None else len(np.unique(self.labels[self.labels > 0]))


@dataclass
class AnnotatedSet:
    """The content of an annotated folder: instance tiles, foreground-only tiles, and what was skipped (why)."""

    tiles: list[AnnotatedTile]
    foreground_only: list[AnnotatedTile]
    skipped: list[tuple[str, str]]

    def __len__(self) -> int:
        return len(self.tiles) + len(self.foreground_only)


def _first_existing(cands: list[Path]) -> Path | None:
    return next((c for c in cands if c.is_file()), None)


def load_annotated_dir(directory: str | Path, *, strict: bool = True) -> AnnotatedSet:
    """Read a folder of H&E images with nuclei annotations (layouts in the module docstring).

    Unreadable images or annotation files are skipped and logged (reasons in ``.skipped``). With ``strict``
    (default) an image without any annotation, or an annotation whose size differs from its image, raises
    DataError naming the files; with ``strict=False`` those are skipped and logged too. DataError when nothing
    usable remains.
    """
    from breastfusion.data.images import read_image, read_mask
    from breastfusion.data.stain import _as_rgb_uint8

    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"Annotated folder not found or not a folder: '{root}'.")
    img_dir = root / "images" if (root / "images").is_dir() else root
    images = sorted(p for p in img_dir.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if img_dir == root:  # label images written next to the images are not images to train on
        images = [p for p in images if not p.stem.endswith("_nuclei")]
    if not images:
        raise DataError(f"No images (.tif/.tiff/.png/.jpg/.jpeg/.bmp) in '{img_dir}'.")
    ann_dir, mask_dir, bin_dir = root / "annotations", root / "masks", root / "binary_masks"

    tiles, fg_only, skipped, missing, mismatched = [], [], [], [], []
    for img_path in images:
        s = img_path.stem
        xml = _first_existing([d / f"{s}{e}" for d in (ann_dir, img_dir) for e in (".xml", ".xml.gz")])
        inst = _first_existing([mask_dir / f"{s}{e}" for e in ("_nuclei.png", "_nuclei.tif", ".png", ".tif", ".tiff")])
        binary = _first_existing([bin_dir / f"{s}{e}" for e in (".png", ".tif", ".tiff")])
        ann = xml or inst or binary
        if ann is None:
            missing.append(img_path)
            continue
        try:
            rgb = _as_rgb_uint8(read_image(img_path, mode="rgb"), f"Image '{img_path}'")
        except DataError as exc:
            skipped.append((str(img_path), str(exc)))
            log.warning("skipped unreadable image '%s': %s", img_path, exc)
            continue
        shape = rgb.shape[:2]
        try:
            if xml is not None:
                labels = polygons_to_instances(read_imagescope_xml(xml), shape)
            elif inst is not None:
                labels = read_instance_mask(inst)
            else:
                labels = None
                mask = read_mask(binary)
        except DataError as exc:
            skipped.append((str(ann), str(exc)))
            log.warning("skipped '%s': unreadable annotation '%s': %s", img_path.name, ann, exc)
            continue
        ann_shape = (labels if labels is not None else mask).shape
        if ann_shape != shape:
            msg = f"annotation '{ann}' is {ann_shape[1]}x{ann_shape[0]} but image '{img_path}' is {shape[1]}x{shape[0]}"
            mismatched.append(msg)
            skipped.append((str(ann), msg))
            continue
        if labels is not None:
            if not labels.any():
                log.warning("'%s' has no nuclei in '%s'; it is used as an all-background tile", img_path.name, ann)
            tiles.append(AnnotatedTile(s, rgb, labels, labels > 0, img_path, ann))
        else:
            fg_only.append(AnnotatedTile(s, rgb, None, mask, img_path, binary))

    if missing:
        hint = (f"expected annotations/<stem>.xml(.gz), masks/<stem>_nuclei.png or masks/<stem>.png, "
                f"or binary_masks/<stem>.png under '{root}'")
        names = ", ".join(f"'{p}'" for p in missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        if strict:
            raise DataError(f"{len(missing)} image(s) have no annotation: {names}; {hint}.")
        for p in missing:
            skipped.append((str(p), "no annotation"))
        log.warning("skipped %d image(s) without annotation: %s", len(missing), names)
    if mismatched:
        if strict:
            raise DataError("Annotation size differs from its image: " + "; ".join(mismatched[:10]) + ".")
        log.warning("skipped %d image(s) whose annotation size differs: %s", len(mismatched), "; ".join(mismatched[:10]))
    known = {p.stem for p in images}
    orphans = [p for d in (ann_dir, mask_dir, bin_dir) if d.is_dir() for p in sorted(d.iterdir())
               if p.is_file() and p.name.split(".")[0].removesuffix("_nuclei") not in known]
    if orphans:
        log.warning("%d annotation file(s) match no image, e.g. '%s'", len(orphans), orphans[0])
    if not tiles:
        why = f" ({len(fg_only)} tile(s) have only binary masks, which cannot teach instance separation)" if fg_only else ""
        raise DataError(f"No usable image with nuclei instance annotations in '{root}'{why}.")
    return AnnotatedSet(tiles, fg_only, skipped)
