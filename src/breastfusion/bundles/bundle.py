"""Model bundles: a self-describing folder that prediction needs nothing else to use.

::

    bundle/
      model.safetensors   weights of the deep model (safetensors: no code runs on load)
      bundle.json         format version, classes, variant, backbone, input contract (size, mean, std),
                          fitted tabular preprocessing, feature names, radiomics settings, versions,
                          training summary and metrics, synthetic-data flag
      config.yaml         the resolved experiment config
      classical/*.skops   classical models, when saved (skops with an allow-list; never pickle)

Nothing is unpickled on load.
``bundle.json`` also holds checksums of itself and of the weight files, verified on load: a bundle modified
after it was written is refused (see :mod:`breastfusion.bundles.integrity`).
"""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from breastfusion.bundles.integrity import (  # noqa: F401 - INTEGRITY and write_bundle_meta are re-exported
    INTEGRITY,
    META,
    WEIGHTS,
    verify_bundle,
    write_bundle_meta,
)
from breastfusion.errors import BundleError
from breastfusion.features.tabular import TabularPreprocessor
from breastfusion.models.registry import build_network
from breastfusion.utils import atomic_path
from breastfusion.version import __version__

BUNDLE_FORMAT = 1


def library_versions() -> dict[str, str]:
    import numpy
    import sklearn
    import timm

    return {"breastfusion": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "numpy": numpy.__version__, "scikit-learn": sklearn.__version__, "python": platform.python_version()}


def save_bundle(path: str | Path, model: nn.Module, *, classes: list[str], model_meta: dict, image_meta: dict,
                tabular: TabularPreprocessor | None, feature_meta: dict, config_yaml: str, synthetic: bool,
                training: dict | None = None, metrics: dict | None = None, extra_files: dict[str, Path] | None = None,
                calibration: dict | None = None, data_meta: dict | None = None, name: str | None = None) -> Path:
    """Write a bundle folder atomically (built in a temporary folder, then renamed into place), with its model
    card (``MODEL_CARD.md``). ``calibration``: temperature + conformal settings (see
    :func:`breastfusion.evaluation.calibration.fit_bundle_calibration`); ``data_meta``: audit and split summary."""
    from breastfusion.bundles.card import CARD, model_card

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
        meta = {
            "format": "breastfusion-bundle", "format_version": BUNDLE_FORMAT,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "classes": list(classes), "model": model_meta, "image": image_meta,
            "tabular": tabular.to_dict() if tabular is not None else None, "features": feature_meta,
            "synthetic_data": bool(synthetic), "versions": library_versions(),
            "training": training or {}, "metrics": metrics or {},
            "calibration": calibration, "data": data_meta or {}, "name": name or path.name,
        }
        (tmp / "config.yaml").write_text(config_yaml)
        for name, src in (extra_files or {}).items():
            dst = tmp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        meta = write_bundle_meta(tmp, meta)  # last: it seals the files written above
        (tmp / CARD).write_text(model_card(meta), encoding="utf-8")
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


@dataclass
class Bundle:
    path: Path
    meta: dict
    model: nn.Module
    tabular: TabularPreprocessor | None

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def synthetic(self) -> bool:
        return bool(self.meta.get("synthetic_data"))


def read_bundle_meta(path: str | Path, *, verify: bool = True) -> dict:
    """The parsed ``bundle.json`` of a bundle folder, after checking format, version and (``verify``) integrity:
    a :class:`BundleError` names the folder and what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"Bundle folder not found: '{path}'.")
    meta_path = path / META
    if not meta_path.is_file():
        raise BundleError(f"'{path}' is not a breastfusion bundle: '{META}' is missing.")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"Bundle metadata '{meta_path}' is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != "breastfusion-bundle":
        raise BundleError(f"'{meta_path}' is not breastfusion bundle metadata.")
    _check_format_version(meta, path)
    for key in ("classes", "model", "image"):
        if key not in meta:
            raise BundleError(f"Bundle metadata '{meta_path}' lacks '{key}'.")
    if verify:
        verify_bundle(path, meta)
    return meta


def _check_format_version(meta: dict, path: Path) -> None:
    if "format_version" not in meta:
        raise BundleError(f"Bundle '{path}': '{META}' has no 'format_version'; expected an integer from 1 to "
                          f"{BUNDLE_FORMAT}. The file is damaged or was not written by breastfusion.")
    v = meta["format_version"]
    if isinstance(v, bool) or not isinstance(v, int):  # 1.5, "1", null, true: not a version this code wrote
        raise BundleError(f"Bundle '{path}': '{META}' has format_version {v!r}; expected an integer from 1 to "
                          f"{BUNDLE_FORMAT}. The file is damaged or was edited by hand.")
    if v > BUNDLE_FORMAT:
        raise BundleError(f"Bundle '{path}' has format version {v}; this breastfusion reads up to {BUNDLE_FORMAT}. "
                          "Upgrade breastfusion.")
    if v < 1:
        raise BundleError(f"Bundle '{path}': '{META}' has format_version {v}, which no breastfusion wrote "
                          f"(versions are 1 to {BUNDLE_FORMAT}). The file is damaged or was edited by hand.")


def load_bundle(path: str | Path) -> Bundle:
    path = Path(path)
    meta = read_bundle_meta(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise BundleError(f"Bundle '{path}' has no '{WEIGHTS}'.")
    model = build_network(meta)
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except (RuntimeError, Exception) as exc:  # safetensors raises its own error type for corrupt files
        raise BundleError(f"Weights '{weights}' do not match the model described in '{META}': {exc}") from exc
    model.eval()
    tab = TabularPreprocessor.from_dict(meta["tabular"]) if meta.get("tabular") else None
    return Bundle(path=path, meta=meta, model=model, tabular=tab)


def refresh_bundle(bundle_path, *, calibration: dict | None = None) -> None:
    """Add (or replace) calibration in an existing bundle's bundle.json and regenerate its model card, atomically.
    Weights are untouched: an old bundle gains these without retraining."""
    from breastfusion.bundles.card import CARD, model_card

    path = Path(bundle_path)
    meta = read_bundle_meta(path)
    if calibration is not None:
        meta["calibration"] = calibration
    meta = write_bundle_meta(path, meta)  # re-seals the checksums (read_bundle_meta verified them)
    with atomic_path(path / CARD) as tmp:
        Path(tmp).write_text(model_card(meta), encoding="utf-8")
