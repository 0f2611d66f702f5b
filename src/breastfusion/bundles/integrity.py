"""Bundle integrity: checksums sealed into ``bundle.json`` when a bundle is written, verified when it is read.

``bundle.json`` holds an ``integrity`` entry: the sha256 of the canonical JSON of every other entry (and of each
top-level entry, so a refusal can say which one changed) and of every file whose bytes decide predictions
(``model.safetensors``, the listed ``classical/*.skops``, the recorded ONNX file). A bundle that no longer
matches was modified after it was written (class names swapped in ``bundle.json`` would otherwise silently
report malignant as benign) and is refused with a :class:`BundleError` that says what changed.

It is a checksum, not a signature: it catches hand edits, tools that rewrite the metadata and corruption, not a
forger who recomputes it. Every writer of ``bundle.json`` (training, ``calibrate``, ``export``) goes through
:func:`write_bundle_meta`, which re-seals after verifying what it read. Bundles written before checksums
existed load with a logged warning. Independently of the checksum, calibration fitted for other classes than the
model's (another order included) is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from breastfusion.errors import BundleError

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
META = "bundle.json"
INTEGRITY = "integrity"


def _canonical(obj) -> bytes:
    """Key-order- and whitespace-independent JSON bytes (the form the checksum is taken over)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


#: Where a bundle trained with ``data.masks: predicted`` keeps its lesion segmenter.
SEGMENTER_FILE = "segmenter/lesion.safetensors"


def weight_files(path: str | Path, meta: dict) -> list[str]:
    """Bundle-relative names of the files whose bytes decide predictions, as the metadata describes them: the
    network's weights, each listed classical model, the lesion segmenter and the recorded ONNX file (when it lies
    in the bundle)."""
    features = meta.get("features") or {}
    classical = features.get("classical") or {}
    files = [WEIGHTS] + [f"classical/{name}.skops" for name in classical.get("models") or []]
    seg = features.get("segmenter") or {}
    if isinstance(seg.get("file"), str):
        files.append(seg["file"])
    onnx = _onnx_file(Path(path), meta)
    return list(dict.fromkeys(files + ([onnx] if onnx else [])))


def _onnx_file(path: Path, meta: dict) -> str | None:
    """The bundle-relative name of the recorded ONNX file; None without one or when it lies outside the bundle
    (its sha256 is then only in the 'onnx' entry, which the metadata checksum covers)."""
    onnx = meta.get("onnx")
    if not isinstance(onnx, dict) or not isinstance(onnx.get("file"), str):
        return None
    f = Path(onnx["file"])
    if not f.is_absolute():
        return f.as_posix()
    try:
        return f.resolve().relative_to(path.resolve()).as_posix()
    except ValueError:
        return None


def integrity_entry(path: str | Path, meta: dict) -> dict:
    """The ``integrity`` entry for ``meta`` (any existing one is ignored) and the files of bundle folder
    ``path``: sha256 of the canonical JSON of the other entries, of each top-level entry, and of each weight
    file that exists."""
    path = Path(path)
    body = {k: v for k, v in meta.items() if k != INTEGRITY}
    return {
        "algorithm": "sha256",
        "metadata": _sha256_bytes(_canonical(body)),
        "entries": {k: _sha256_bytes(_canonical(v)) for k, v in body.items()},
        "files": {f: _sha256_file(path / f) for f in weight_files(path, body) if (path / f).is_file()},
        "note": "checksums of this file (without this entry) and of the weight files when the bundle was written; "
                "a bundle that no longer matches is refused on load",
    }


def write_bundle_meta(path: str | Path, meta: dict) -> dict:
    """Seal ``meta`` (see :func:`integrity_entry`) and write it atomically as ``<path>/bundle.json``. Every writer
    of bundle.json calls this, after writing the weight files. Returns the metadata as written (JSON types)."""
    from breastfusion.utils import write_text

    path = Path(path)
    clean = json.loads(json.dumps({k: v for k, v in meta.items() if k != INTEGRITY}, default=str))
    clean[INTEGRITY] = integrity_entry(path, clean)
    write_text(json.dumps(clean, indent=2) + "\n", path / META)
    return clean


def verify_bundle(path: str | Path, meta: dict) -> None:
    """Refuse (:class:`BundleError`) a bundle whose metadata or weight files differ from the checksums recorded
    when it was written, and calibration whose classes are not the model's. A bundle written before checksums
    existed is accepted with a logged warning."""
    path = Path(path)
    entry = meta.get(INTEGRITY)
    if entry is None:
        log.warning("Bundle '%s' has no integrity checksum (written by an older breastfusion): a later edit of "
                    "its metadata or weights cannot be detected. Re-save it (e.g. 'breastfusion calibrate') to add "
                    "one.", path)
    else:
        _verify_entry(path, meta, entry)
    _check_calibration_classes(path, meta)


def _modified(path: Path, what: str) -> BundleError:
    return BundleError(f"Bundle '{path}' was modified after it was written: {what}. It is refused, because its "
                       "predictions can no longer be trusted (e.g. swapped class names). Use the bundle as "
                       "training wrote it, or retrain.")


def _verify_entry(path: Path, meta: dict, entry) -> None:
    if not isinstance(entry, dict) or entry.get("algorithm") != "sha256" or not isinstance(entry.get("files"), dict):
        raise _modified(path, f"its '{INTEGRITY}' entry in {META} is damaged")
    body = {k: v for k, v in meta.items() if k != INTEGRITY}
    if _sha256_bytes(_canonical(body)) != entry.get("metadata"):
        recorded = entry.get("entries") if isinstance(entry.get("entries"), dict) else {}
        changed = sorted(k for k in set(body) | set(recorded)
                         if k not in body or k not in recorded or _sha256_bytes(_canonical(body[k])) != recorded[k])
        where = ", ".join(f"'{k}'" for k in changed) if changed else "its content"
        raise _modified(path, f"{META} does not match its recorded sha256 (changed: {where})")
    files = entry["files"]
    for name in weight_files(path, body):
        if name not in files:
            raise _modified(path, f"'{name}' is listed in {META} but no checksum was recorded for it")
    optional = _onnx_file(path, body)  # deleting the ONNX export is legitimate: the torch backend needs none
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            if name == optional:
                continue
            raise _modified(path, f"'{name}' is missing")
        if _sha256_file(f) != digest:
            raise _modified(path, f"'{name}' does not match its sha256 recorded in {META}")


def _class_claims(entry, where: str = "calibration"):
    """(location, class names or None, class count or None) of every calibrator description inside a bundle's
    calibration entry (any nesting: the entry is a dict of calibrators, possibly with a status around them)."""
    if isinstance(entry, dict):
        names = entry.get("classes") if isinstance(entry.get("classes"), list) else None
        n = entry.get("n_classes") if isinstance(entry.get("n_classes"), int) else None
        if names is not None or n is not None:
            yield where, names, n
        for k, v in entry.items():
            yield from _class_claims(v, f"{where}.{k}")
    elif isinstance(entry, list):
        for i, v in enumerate(entry):
            yield from _class_claims(v, f"{where}[{i}]")


def _check_calibration_classes(path: Path, meta: dict) -> None:
    classes = [str(c) for c in meta.get("classes") or []]
    for where, names, n in _class_claims(meta.get("calibration")):
        if names is not None and [str(c) for c in names] != classes:
            raise BundleError(f"Bundle '{path}': the {where} was fitted for classes {[str(c) for c in names]} but "
                              f"the model's classes are {classes}; applying it would mislabel the probabilities. "
                              "Calibrate the bundle again ('breastfusion calibrate').")
        if n is not None and n != len(classes):
            raise BundleError(f"Bundle '{path}': the {where} was fitted for {n} classes but the model has "
                              f"{len(classes)} ({classes}). Calibrate the bundle again ('breastfusion calibrate').")


