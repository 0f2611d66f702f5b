"""One registry of the networks a bundle can hold.

A bundle's ``meta["model"]["kind"]`` names its network (``fusion`` when absent: bundles written before kinds
existed). Each kind says, in one place, how to rebuild the network from that metadata (weights are loaded
separately), how to describe it on the model card, and what its exported ONNX graph takes and returns. Code that
loads, exports or describes a bundle asks :func:`network_kind` instead of testing the kind's name; a new network
(mammography, a whole-slide model) is one :func:`register_network` call beside its module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from breastfusion.errors import BundleError

DEFAULT_KIND = "fusion"


@dataclass(frozen=True)
class NetworkKind:
    """What the rest of the toolkit needs to know about one kind of bundle network."""

    name: str
    build: Callable[..., nn.Module]
    """``build(meta, modules=None)``: the network that bundle metadata (or the same dict made from the config at
    training) describes. ``modules``: backbone module(s) the trainer already made with pretrained weights; without
    them the backbones are built with random weights (a bundle's weights are loaded afterwards)."""
    describe: Callable[[dict], list[str]]
    """Model-card lines (Markdown bullets) for ``meta["model"]``."""
    onnx_inputs: Callable[[dict], list[dict]]
    """Names, shapes (``"batch"`` is the dynamic axis) and dtypes of the exported graph's inputs."""
    onnx_outputs: Callable[[dict], list[dict]]
    """Names and shapes of its outputs; the first is the class probabilities."""
    forward: Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, ...]]
    """The network on named inputs, returning the outputs in ``onnx_outputs`` order."""
    example_images: Callable[[dict, int, np.random.Generator], np.ndarray]
    """``n`` images shaped like the ``image`` input, as the predictor would feed them (for parity checks)."""


_KINDS: dict[str, NetworkKind] = {}


def register_network(kind: NetworkKind) -> NetworkKind:
    if kind.name in _KINDS and _KINDS[kind.name] is not kind:
        raise ValueError(f"network kind '{kind.name}' is already registered")
    _KINDS[kind.name] = kind
    return kind


def kind_name(meta: dict) -> str:
    return str((meta.get("model") or {}).get("kind") or DEFAULT_KIND)


def network_kind(meta: dict) -> NetworkKind:
    """The registered kind of the network that bundle metadata ``meta`` describes."""
    name = kind_name(meta)
    try:
        return _KINDS[name]
    except KeyError:
        raise BundleError(f"This bundle holds a network of kind '{name}', which this version of breastfusion does "
                          f"not know (it knows: {', '.join(sorted(_KINDS))}). Upgrade breastfusion, or rebuild the "
                          "bundle with this version.") from None


def network_kinds() -> list[str]:
    return sorted(_KINDS)


def build_network(meta: dict, modules=None) -> nn.Module:
    """The network described by ``meta`` (``{"classes": [...], "model": {...}}``, as a bundle stores it): rebuilt
    from a bundle (weights loaded separately), or built for training around the pretrained ``modules``."""
    return network_kind(meta).build(meta, modules)


def phantom_grey(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Ultrasound-like grey images in [0, 1]: a dark blob on a speckled, depth-darkening background."""
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    out = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.08, 0.25)
        base = 0.6 - 0.3 * yy + 0.15 * rng.standard_normal((size, size))
        blob = np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
        out[i] = np.clip(base * (1 - 0.8 * blob), 0, 1)
    return out


# --------------------------------------------------------------------- fusion: ultrasound image + tabular


def _build_fusion(meta: dict, modules: nn.Module | None = None) -> nn.Module:
    import timm

    from breastfusion.models.fusion import FusionClassifier

    m = meta["model"]
    backbone = None
    if m["variant"] in ("fusion", "image"):
        backbone = modules if modules is not None else timm.create_model(m["backbone"], pretrained=False,
                                                                         num_classes=0)
    return FusionClassifier(
        len(meta["classes"]), variant=m["variant"], backbone=backbone, n_tabular=m["n_tabular"],
        image_dim=m["image_dim"], tabular_dim=m["tabular_dim"], tabular_hidden=m["tabular_hidden"],
        fusion_hidden=m["fusion_hidden"], dropout=m["dropout"],
    )


def _describe_fusion(meta: dict) -> list[str]:
    m = meta.get("model", {})
    return [(f"- Variant `{m.get('variant')}`: image backbone `{m.get('backbone')}` → {m.get('image_dim')}-d, "
             f"tabular MLP → {m.get('tabular_dim')}-d ({m.get('n_tabular', 0)} encoded features), late fusion.")]


def _fusion_inputs(meta: dict) -> list[dict]:
    m, size = meta["model"], int(meta["image"]["size"])
    specs = []
    if m["variant"] in ("fusion", "image"):
        specs.append({"name": "image", "shape": ["batch", 3, size, size], "dtype": "float32"})
    if m["variant"] in ("fusion", "tabular"):
        specs.append({"name": "tabular", "shape": ["batch", int(m["n_tabular"])], "dtype": "float32"})
    return specs


def _fusion_outputs(meta: dict) -> list[dict]:
    k = len(meta["classes"])
    return [{"name": "probabilities", "shape": ["batch", k]}, {"name": "logits", "shape": ["batch", k]}]


def _fusion_forward(model: nn.Module, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    out = model(x.get("image"), x.get("tabular"))
    return torch.softmax(out.float(), dim=1), out


def _fusion_images(meta: dict, n: int, rng: np.random.Generator) -> np.ndarray:
    """As the ultrasound Predictor feeds them: grey → 3 channels, 8-bit levels, (x - mean) / std."""
    size = int(meta["image"]["size"])
    mean = np.asarray(meta["image"]["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(meta["image"]["std"], dtype=np.float32).reshape(1, 3, 1, 1)
    grey = np.round(phantom_grey(n, size, rng) * 255) / 255.0
    return np.ascontiguousarray((grey[:, None] - mean) / std, dtype=np.float32)


FUSION = register_network(NetworkKind("fusion", _build_fusion, _describe_fusion, _fusion_inputs, _fusion_outputs,
                                      _fusion_forward, _fusion_images))


# ------------------------------------------------------------- multiscale: H&E stacks, cross-scale attention


def _build_multiscale(meta: dict, modules: dict[str, nn.Module] | None = None) -> nn.Module:
    import timm

    from breastfusion.models.multiscale import MultiScaleGrader

    m = meta["model"]
    if modules is None:
        modules = {k: timm.create_model(name, pretrained=False, num_classes=0,
                                        **m.get("backbone_kwargs", {}).get(k, {}))
                   for k, name in m["backbones"].items()}
    return MultiScaleGrader(len(meta["classes"]), backbones=modules, n_scales=len(m["magnifications"]),
                            n_tabular=m["n_tabular"], dim=m["attention_dim"], heads=m["attention_heads"],
                            grid=m["token_grid"], objective=m["objective"], dropout=m["dropout"],
                            tabular_hidden=m["tabular_hidden"], tabular_dim=m["tabular_dim"],
                            fusion_hidden=m["fusion_hidden"], norms={k: tuple(v) for k, v in m["norms"].items()})


def _describe_multiscale(meta: dict) -> list[str]:
    m = meta.get("model", {})
    return [(f"- Multiscale histology grader: backbones {m.get('backbones')}, magnifications "
             f"{[f'{x:g}x' for x in m.get('magnifications', [])]}, cross-scale attention, objective "
             f"`{m.get('objective')}`; case prediction = mean of its stacks' probabilities."),
            f"- Tabular inputs (pathomics + clinical): {m.get('n_tabular', 0)} encoded features."]


def _multiscale_inputs(meta: dict) -> list[dict]:
    m, size = meta["model"], int(meta["image"]["size"])
    specs = [{"name": "image", "shape": ["batch", len(m["magnifications"]), 3, size, size], "dtype": "float32"}]
    if int(m.get("n_tabular") or 0) > 0:
        specs.append({"name": "tabular", "shape": ["batch", int(m["n_tabular"])], "dtype": "float32"})
    return specs


def _multiscale_outputs(meta: dict) -> list[dict]:
    k, s = len(meta["classes"]), len(meta["model"]["magnifications"])
    n_logits = k - 1 if meta["model"].get("objective") == "ordinal" else k
    return [{"name": "probabilities", "shape": ["batch", k]}, {"name": "logits", "shape": ["batch", n_logits]},
            {"name": "cross_scale", "shape": ["batch", s, s]}, {"name": "scale_weights", "shape": ["batch", s]}]


def _multiscale_forward(model: nn.Module, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    out, att = model(x["image"], x.get("tabular"), return_attention=True)
    return model.probabilities(out), out, att["cross_scale"], att["scale_weights"]


def _multiscale_images(meta: dict, n: int, rng: np.random.Generator) -> np.ndarray:
    """RGB tiles in [0, 1], one per magnification."""
    size, n_scales = int(meta["image"]["size"]), len(meta["model"]["magnifications"])
    grey = phantom_grey(n * n_scales, size, rng).reshape(n, n_scales, 1, size, size)
    tint = rng.uniform(0.6, 1.0, (n, n_scales, 3, 1, 1)).astype(np.float32)
    return np.ascontiguousarray(grey * tint, dtype=np.float32)


MULTISCALE = register_network(NetworkKind("multiscale", _build_multiscale, _describe_multiscale, _multiscale_inputs,
                                          _multiscale_outputs, _multiscale_forward, _multiscale_images))
