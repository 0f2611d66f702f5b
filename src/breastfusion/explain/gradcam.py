"""Image explanations: Grad-CAM, Grad-CAM++ and occlusion sensitivity, overlays and figures.

Grad-CAM (Selvaraju et al., 2017) and Grad-CAM++ (Chattopadhay et al., 2018) are computed directly with a
forward hook on one layer of the image backbone and :func:`torch.autograd.grad` of the target score with
respect to that layer's output; nothing is patched and the model is left as it was.

The layer is found generically (:func:`find_target_layer`):

* CNNs: a probe forward pass records every sub-module whose output is a 4-D feature map; the *last* one to
  finish (with more than one spatial position when there is one) is the last convolutional stage before global
  pooling (``bn2`` of an EfficientNet, ``layer4`` of a ResNet, ``stages`` of a ConvNeXt...).
* Vision transformers (a timm model with ``blocks`` whose ``forward_features`` returns tokens): the input
  norm of the last block (``blocks[-1].norm1``). Its patch tokens still receive gradient when the model pools the
  class token (the output of the last block would not: only the class token reaches the head), and they are
  reshaped to their square grid, prefix tokens dropped.

The target score is the class logit (softmax models) or the log-probability of the class (ordinal heads,
whose outputs are cumulative logits, not per-class scores). Heatmaps are upsampled bilinearly to the input
resolution and scaled to [0, 1] per map (a map without any positive evidence is all zeros).

Occlusion sensitivity (Zeiler & Fergus, 2014) slides a grey patch over the image and records the drop of the
target-class probability; each pixel gets the mean drop of the patches that covered it. With the default coarse
grid (patch = a quarter of the side, stride = half a patch: 49 positions) it costs about 50 forward passes,
which are batched.

Inputs are what the model's ``forward`` takes: for a :class:`~breastfusion.models.fusion.FusionClassifier` a
normalised ``(3, H, W)`` / ``(B, 3, H, W)`` tensor, for a :class:`~breastfusion.models.multiscale.MultiScaleGrader`
a stack ``(S, 3, H, W)`` / ``(1, S, 3, H, W)`` in [0, 1]. Figures use the Agg canvas, never pyplot, and are
written atomically.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

METHODS = ("gradcam", "gradcam++")
METHOD_LABELS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "occlusion": "occlusion"}

_LAYER_CACHE: weakref.WeakKeyDictionary[nn.Module, TargetLayer] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class TargetLayer:
    """Where Grad-CAM reads activations: ``kind`` is ``"conv"`` (N, C, h, w) — ``"conv_nhwc"`` for a
    channels-last output format — or ``"tokens"`` (N, prefix + h*w, C) with ``prefix`` leading tokens."""

    name: str
    module: nn.Module
    kind: str
    prefix: int = 0


# ---------------------------------------------------------------------------------------------- layer search

def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def find_target_layer(backbone: nn.Module, example: torch.Tensor | None = None) -> TargetLayer:
    """The layer of a timm backbone that Grad-CAM uses (see the module docstring); cached per backbone.

    ``example`` is an input batch for the probe pass of CNNs (default: one 3 x 224 x 224 zero image)."""
    hit = _LAYER_CACHE.get(backbone)
    if hit is not None:
        return hit
    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) and hasattr(backbone, "num_prefix_tokens"):
        last = blocks[-1]
        norm1 = getattr(last, "norm1", None)
        module = norm1 if isinstance(norm1, nn.Module) else last
        name = f"blocks.{len(blocks) - 1}" + (".norm1" if module is not last else "")
        layer = TargetLayer(name, module, "tokens", int(getattr(backbone, "num_prefix_tokens", 0)))
        _LAYER_CACHE[backbone] = layer
        return layer
    if example is None:
        example = torch.zeros(1, 3, 224, 224)
    param = next(backbone.parameters(), None)
    example = example[:1].to(param.device if param is not None else "cpu")
    seen: list[tuple[str, nn.Module, tuple]] = []
    handles = []
    for name, mod in backbone.named_modules():
        if mod is backbone:
            continue

        def hook(m, _inp, out, _name=name):
            t = _first_tensor(out)
            if t is not None and t.dim() == 4:
                seen.append((_name, m, tuple(t.shape)))

        handles.append(mod.register_forward_hook(hook))
    was_training = backbone.training
    try:
        backbone.eval()
        with torch.no_grad():
            backbone(example)
    finally:
        backbone.train(was_training)
        for h in handles:
            h.remove()
    if not seen:
        raise ValueError(f"no 4-D feature map found in backbone {type(backbone).__name__}; Grad-CAM needs a CNN "
                         "or a vision transformer with a square token grid")
    nhwc = getattr(backbone, "output_fmt", "NCHW") == "NHWC"

    def spatial(shape):
        return shape[1] * shape[2] if nhwc else shape[2] * shape[3]

    wide = [s for s in seen if spatial(s[2]) > 1]
    name, module, _ = (wide or seen)[-1]
    layer = TargetLayer(name, module, "conv_nhwc" if nhwc else "conv")
    _LAYER_CACHE[backbone] = layer
    return layer


# ------------------------------------------------------------------------------------------- Grad-CAM core

def _as_grid(act: torch.Tensor, layer: TargetLayer) -> torch.Tensor:
    """Activations (or gradients) at the target layer → (N, C, h, w)."""
    if layer.kind == "tokens":
        t = act[:, layer.prefix:]
        n, length, c = t.shape
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(f"cannot arrange {length} transformer tokens on a square grid for Grad-CAM")
        return t.transpose(1, 2).reshape(n, c, side, side)
    if layer.kind == "conv_nhwc":
        return act.permute(0, 3, 1, 2)
    return act


def cam_from(act: torch.Tensor, grad: torch.Tensor, method: str) -> torch.Tensor:
    """(N, C, h, w) activations and gradients → (N, h, w) non-negative class-activation maps."""
    act, grad = act.float(), grad.float()
    if method == "gradcam":
        weights = grad.mean(dim=(2, 3))
    elif method == "gradcam++":
        g2, g3 = grad.pow(2), grad.pow(3)
        denom = 2 * g2 + act.sum(dim=(2, 3), keepdim=True) * g3
        alpha = torch.where(denom.abs() > 1e-12, g2 / torch.where(denom.abs() > 1e-12, denom, torch.ones_like(denom)),
                            torch.zeros_like(g2))
        weights = (alpha * F.relu(grad)).sum(dim=(2, 3))
    else:
        raise ValueError(f"unknown Grad-CAM method {method!r}; use one of {METHODS}")
    return F.relu((weights[:, :, None, None] * act).sum(1))


def normalize_map(m: np.ndarray | torch.Tensor, *, positive_only: bool = True) -> np.ndarray:
    """Scale each map of ``m`` (..., H, W) to [0, 1] by its maximum (negatives clipped); all-zero stays zero."""
    a = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m, dtype=np.float64)
    a = np.clip(a, 0, None) if positive_only else a - a.min(axis=(-2, -1), keepdims=True)
    top = a.max(axis=(-2, -1), keepdims=True)
    return np.divide(a, top, out=np.zeros_like(a, dtype=np.float32), where=top > 1e-12).astype(np.float32)


def _upsample(cam: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    up = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    up = up - up.amin(dim=(1, 2), keepdim=True)  # min-max per map: the weakest evidence shows as 0
    return normalize_map(up)


def _is_multiscale(model: nn.Module) -> bool:
    return hasattr(model, "backbones") and hasattr(model, "n_scales")


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def target_score(model: nn.Module, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample score that the maps explain: the logit, or log P(class) for an ordinal head."""
    if getattr(model, "objective", "ce") == "ordinal":
        p = model.probabilities(out)
        return torch.log(p.gather(1, target[:, None])[:, 0].clamp_min(1e-12))
    return out.float().gather(1, target[:, None])[:, 0]


def probabilities(model: nn.Module, out: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "probabilities"):
        return model.probabilities(out)
    return torch.softmax(out.float(), dim=1)


def _targets(target_class, probs: torch.Tensor) -> torch.Tensor:
    n = probs.shape[0]
    if target_class is None:
        return probs.argmax(1)
    t = torch.as_tensor(target_class, dtype=torch.long, device=probs.device).reshape(-1)
    return t.expand(n) if t.numel() == 1 else t


@dataclass
class CamResult:
    """Everything one Grad-CAM pass gives.

    ``maps[(source, method)]``: (B, H, W) for a FusionClassifier (source ``"image"``), (B, S, H, W) for a
    multiscale grader (source = backbone name). ``probs`` (B, K), ``target`` (B,). For a multiscale grader also
    ``cross_scale`` (B, S, S) and ``scale_weights`` (B, S)."""

    maps: dict[tuple[str, str], np.ndarray]
    probs: np.ndarray
    target: np.ndarray
    cross_scale: np.ndarray | None = None
    scale_weights: np.ndarray | None = None
    layers: dict[str, str] = field(default_factory=dict)


def cam_maps(model: nn.Module, image: torch.Tensor, tabular: torch.Tensor | None = None, *, target_class=None,
             methods=METHODS, sources: list[str] | None = None) -> CamResult:
    """Grad-CAM and/or Grad-CAM++ maps from one forward and one backward pass (see :class:`CamResult`)."""
    methods = [methods] if isinstance(methods, str) else list(methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown Grad-CAM method {m!r}; use one of {METHODS}")
    multi = _is_multiscale(model)
    dev = _device(model)
    x = image.detach().to(dev).float()
    if multi:
        if x.dim() == 4:
            x = x[None]
        backbones = {k: model.backbones[k] for k in (sources or model.sources)}
        probe = x[:1, 0]
        norm = {k: (probe - getattr(model, f"mean_{k}")) / getattr(model, f"std_{k}") for k in backbones}
    else:
        if x.dim() == 3:
            x = x[None]
        if not getattr(model, "uses_image", False) or model.image_encoder is None:
            raise ValueError("this model has no image branch to explain")
        backbones = {"image": model.image_encoder.backbone}
        norm = {"image": x[:1]}
    tab = tabular.detach().to(dev).float() if tabular is not None else None
    if tab is not None and tab.dim() == 1:
        tab = tab[None]
    if tab is not None and tab.shape[0] != x.shape[0]:
        tab = tab.expand(x.shape[0], -1)
    layers = {k: find_target_layer(b, norm[k]) for k, b in backbones.items()}
    acts: dict[str, torch.Tensor] = {}
    handles = []
    for k, layer in layers.items():
        def hook(_m, _i, out, _k=k):
            acts[_k] = _first_tensor(out)

        handles.append(layer.module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x_in = x.clone().requires_grad_(True)  # makes the graph exist even with frozen weights
            if multi:
                out, att = model(x_in, tab, return_attention=True)
            else:
                out, att = model(x_in, tab), None
            probs = probabilities(model, out)
            target = _targets(target_class, probs.detach())
            score = target_score(model, out, target).sum()
            names = list(layers)
            grads = torch.autograd.grad(score, [acts[k] for k in names], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    size = tuple(x.shape[-2:])
    maps = {}
    for k, g in zip(names, grads):
        a = _as_grid(acts[k].detach(), layers[k])
        g = torch.zeros_like(a) if g is None else _as_grid(g.detach(), layers[k])
        for m in methods:
            cam = _upsample(cam_from(a, g, m), size)
            maps[(k, m)] = cam.reshape(x.shape[0], x.shape[1], *size) if multi else cam
    res = CamResult(maps=maps, probs=probs.detach().double().cpu().numpy(), target=target.cpu().numpy(),
                    layers={k: v.name for k, v in layers.items()})
    if att is not None:
        res.cross_scale = att["cross_scale"].detach().float().cpu().numpy()
        res.scale_weights = att["scale_weights"].detach().float().cpu().numpy()
    return res


def gradcam(model: nn.Module, image_tensor: torch.Tensor, tabular: torch.Tensor | None = None, *,
            target_class: int | None = None, method: str = "gradcam", source: str | None = None) -> np.ndarray:
    """Grad-CAM / Grad-CAM++ heatmap in [0, 1] at input resolution.

    FusionClassifier: ``(3, H, W)`` or ``(1, 3, H, W)`` → ``(H, W)``; ``(B, 3, H, W)`` → ``(B, H, W)``.
    MultiScaleGrader: a stack ``(S, 3, H, W)`` / ``(1, S, 3, H, W)`` → ``(S, H, W)``, one map per magnification,
    for backbone ``source`` (default: the first, the CNN); ``(B, S, 3, H, W)`` → ``(B, S, H, W)``.
    ``target_class`` defaults to the predicted class (of each item)."""
    if _is_multiscale(model):
        source = source or model.sources[0]
        res = cam_maps(model, image_tensor, tabular, target_class=target_class, methods=[method], sources=[source])
        out = res.maps[(source, method)]
    else:
        res = cam_maps(model, image_tensor, tabular, target_class=target_class, methods=[method])
        out = res.maps[("image", method)]
    return out[0] if out.shape[0] == 1 else out


@dataclass
class MultiScaleCam:
    """Grad-CAM of one stack: ``heatmaps[source][method]`` (S, H, W), ``cross_scale`` (S, S) (row = querying
    magnification), ``scale_weights`` (S,), ``probs`` (K,), ``target``."""

    heatmaps: dict[str, dict[str, np.ndarray]]
    cross_scale: np.ndarray
    scale_weights: np.ndarray
    probs: np.ndarray
    target: int


def multiscale_gradcam(model: nn.Module, stack: torch.Tensor, tabular: torch.Tensor | None = None, *,
                       target_class: int | None = None, methods=METHODS, sources: list[str] | None = None) -> MultiScaleCam:
    """One heatmap per magnification (and per backbone and method) of one stack, with the attention outputs."""
    if not _is_multiscale(model):
        raise ValueError("multiscale_gradcam needs a MultiScaleGrader")
    res = cam_maps(model, stack if stack.dim() == 5 else stack[None], tabular, target_class=target_class,
                   methods=methods, sources=sources)
    heat: dict[str, dict[str, np.ndarray]] = {}
    for (src, m), v in res.maps.items():
        heat.setdefault(src, {})[m] = v[0]
    return MultiScaleCam(heat, res.cross_scale[0], res.scale_weights[0], res.probs[0], int(res.target[0]))


# ---------------------------------------------------------------------------------------------- occlusion

def _tile_features(model: nn.Module, tiles: torch.Tensor) -> torch.Tensor:
    """Backbone features of single-magnification tiles (N, 3, H, W) in [0, 1], laid out as one scale's slice of
    :meth:`MultiScaleGrader.backbone_forward` (so they can replace that slice)."""
    from breastfusion.models.multiscale import backbone_tokens

    parts = [backbone_tokens(m, (tiles - getattr(model, f"mean_{k}")) / getattr(model, f"std_{k}"), model.grid)
             .reshape(tiles.shape[0], -1) for k, m in model.backbones.items()]
    return torch.cat(parts, dim=1)


def _positions(n: int, patch: int, stride: int) -> list[int]:
    pos = list(range(0, max(n - patch, 0) + 1, stride))
    if pos[-1] + patch < n:
        pos.append(n - patch)
    return pos


@torch.no_grad()
def occlusion(model: nn.Module, image_tensor: torch.Tensor, tabular: torch.Tensor | None = None, *,
              target_class: int | None = None, patch: int | None = None, stride: int | None = None,
              fill: float | list[float] | torch.Tensor | None = None, batch_size: int = 32,
              normalize: bool = False) -> np.ndarray:
    """Occlusion sensitivity of one image (``(3, H, W)`` → ``(H, W)``) or one stack (``(S, 3, H, W)`` →
    ``(S, H, W)``, each magnification occluded on its own; the other magnifications' backbone features are
    computed once and reused, so each occluded stack costs one tile's backbone pass).

    Each pixel holds the mean drop ``p(target | image) - p(target | image with the patch greyed)`` over the
    patches that covered it (probability units; negative where hiding a region *raises* the probability).
    ``patch`` defaults to a quarter of the side, ``stride`` to half a patch. ``fill`` is the grey in the model's
    input space: default 0 for a FusionClassifier (its input is normalised, so 0 is the normalisation mean) and
    0.5 for a multiscale stack (in [0, 1]). ``normalize=True`` returns the positive part scaled to [0, 1]."""
    multi = _is_multiscale(model)
    dev = _device(model)
    x = image_tensor.detach().to(dev).float()
    want = 5 if multi else 4
    while x.dim() < want:
        x = x[None]
    if x.shape[0] != 1:
        raise ValueError("occlusion explains one image (or one stack) at a time")
    tab = tabular.detach().to(dev).float().reshape(1, -1) if tabular is not None else None
    h, w = x.shape[-2:]
    patch = int(patch or max(1, min(h, w) // 4))
    stride = int(stride or max(1, patch // 2))
    if fill is None:
        fill = 0.5 if multi else 0.0
    fill_t = torch.as_tensor(fill, dtype=torch.float32, device=dev).reshape(-1, 1, 1)
    was_training = model.training
    model.eval()
    try:
        def prob(batch):
            t = tab.expand(batch.shape[0], -1) if tab is not None else None
            return probabilities(model, model(batch, t))

        p0 = prob(x)[0]
        target = int(p0.argmax()) if target_class is None else int(target_class)
        p0 = float(p0[target])
        ys, xs = _positions(h, patch, stride), _positions(w, patch, stride)
        boxes = [(y, xx) for y in ys for xx in xs]
        n_scales = x.shape[1] if multi else 1
        maps = np.zeros((n_scales, h, w), dtype=np.float64)
        counts = np.zeros((h, w), dtype=np.float64)
        for y, xx in boxes:
            counts[y:y + patch, xx:xx + patch] += 1
        if multi:  # the other magnifications' backbone features do not change: compute them once
            base = model.backbone_forward(x).reshape(1, n_scales, -1)
        for s in range(n_scales):
            for start in range(0, len(boxes), batch_size):
                chunk = boxes[start:start + batch_size]
                batch = (x[:, s] if multi else x).expand(len(chunk), -1, -1, -1).clone()
                for i, (y, xx) in enumerate(chunk):
                    batch[i, :, y:y + patch, xx:xx + patch] = fill_t
                if multi:
                    feats = base.expand(len(chunk), -1, -1).clone()
                    feats[:, s] = _tile_features(model, batch)
                    t = tab.expand(len(chunk), -1) if tab is not None else None
                    p = probabilities(model, model.forward_from_backbone(feats.flatten(1), t))
                else:
                    p = prob(batch)
                drops = p0 - p[:, target].double().cpu().numpy()
                for (y, xx), d in zip(chunk, drops):
                    maps[s, y:y + patch, xx:xx + patch] += d
    finally:
        model.train(was_training)
    maps = (maps / np.maximum(counts, 1)).astype(np.float32)
    if normalize:
        maps = normalize_map(maps)
    return maps if multi else maps[0]


# ---------------------------------------------------------------------------------------- overlays, figures

def _to_rgb_float(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    else:
        a = a.astype(np.float32)
        if a.max(initial=0.0) > 1.0 + 1e-6:
            a = a / 255.0
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)  # CHW → HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"overlay needs a grey (H, W) or RGB (H, W, 3) image, got shape {np.shape(image)}")
    return np.clip(a, 0, 1)


def _resize_map(heatmap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    hm = np.asarray(heatmap, dtype=np.float32)
    if hm.shape == tuple(shape):
        return hm
    t = torch.from_numpy(np.ascontiguousarray(hm))[None, None]
    return F.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


def overlay(image_gray_or_rgb: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """Blend a heatmap (values in [0, 1], any size: resized to the image) over a grey or RGB image.

    Returns RGB uint8 (H, W, 3). The colour weight grows with the heatmap value, so cold regions keep the
    image visible."""
    from matplotlib import colormaps

    base = _to_rgb_float(image_gray_or_rgb)
    hm = np.clip(np.nan_to_num(_resize_map(heatmap, base.shape[:2])), 0, 1)
    color = colormaps[cmap](hm)[..., :3].astype(np.float32)
    a = alpha * (0.35 + 0.65 * hm)[..., None]
    return (np.clip((1 - a) * base + a * color, 0, 1) * 255).round().astype(np.uint8)


def _figure(w: float, h: float):
    from breastfusion.evaluation.plots import _new_figure

    return _new_figure(w, h)


def _save(fig, path) -> Path:
    from breastfusion.evaluation.plots import _save as save

    return save(fig, path)


def _panel(ax, img: np.ndarray, title: str) -> None:
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255 if img.dtype == np.uint8 else 1,
              interpolation="bilinear")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _map_title(name: str, m: np.ndarray) -> tuple[str, np.ndarray]:
    """Occlusion maps come in probability units: show the positive part scaled, with the largest drop."""
    if name == "occlusion":
        return f"occlusion (max drop {float(np.max(m)):.3f})", normalize_map(m)
    return METHOD_LABELS.get(name, name), np.clip(m, 0, 1)


def _shap_bars(ax, top: list[dict], title: str) -> None:
    from breastfusion.evaluation.plots import _short

    if not top:
        ax.set_axis_off()
        return
    top = top[::-1]
    vals = [t["shap"] for t in top]
    labels = [f"{_short(t['feature'], 44)} = {_short(t['value'], 12)}" for t in top]
    y = np.arange(len(top))
    ax.barh(y, vals, color=["#d62728" if v > 0 else "#1f77b4" for v in vals], height=0.65)
    ax.set_yticks(y, labels=labels, fontsize=8)
    ax.axvline(0, color="#333333", lw=0.8)
    ax.set_xlabel("SHAP value (change of the predicted-class probability)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(title, fontsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def plot_image_explanation(image: np.ndarray, maps: dict[str, np.ndarray], path: str | Path, *, title: str,
                           shap_top: list[dict] | None = None, shap_title: str = "tabular features (SHAP)") -> Path:
    """original | Grad-CAM | Grad-CAM++ | occlusion (whichever ``maps`` holds, keyed by method name), and,
    with ``shap_top`` (rows of :func:`breastfusion.explain.tabular.top_features`), a SHAP bar panel below."""
    from breastfusion.evaluation.plots import _short

    n = 1 + len(maps)
    rows = 2 if shap_top else 1
    fig = _figure(2.6 * n, 2.9 + (0.28 * len(shap_top) + 1.2 if shap_top else 0))
    # two sub-figures laid out separately, so the SHAP panel's long feature names stay inside the figure
    # without pushing the image row to the right
    fig.set_layout_engine("constrained")
    top, bottom = (fig.subfigures(rows, 1, height_ratios=[2.6, 0.28 * len(shap_top) + 0.9])
                   if shap_top else (fig, None))
    axes = top.subplots(1, n, squeeze=False)[0]
    _panel(axes[0], np.asarray(image), "original")
    for ax, (name, m) in zip(axes[1:], maps.items()):
        label, shown = _map_title(name, m)
        _panel(ax, overlay(image, shown), label)
    if shap_top:
        _shap_bars(bottom.subplots(1, 1), shap_top, shap_title)
    fig.suptitle(_short(title, 140), fontsize=10)
    return _save(fig, path)


def plot_stack_explanation(tiles: list[np.ndarray], magnifications: list[float], maps: dict[str, np.ndarray],
                           path: str | Path, *, title: str, cross_scale: np.ndarray | None = None,
                           scale_weights: np.ndarray | None = None) -> Path:
    """One row per magnification: tile | each map (``maps[label]`` is (S, H, W)); on the right the cross-scale
    attention matrix and the scale-weight bars."""
    from breastfusion.evaluation.plots import _COLORS, _short

    s_n = len(tiles)
    n = 1 + len(maps)
    extra = scale_weights is not None
    rows = max(s_n, 2)
    fig = _figure(2.4 * n + (3.0 if extra else 0), 2.4 * rows + 0.5)
    gs = fig.add_gridspec(rows, n + (1 if extra else 0), width_ratios=[1] * n + ([1.35] if extra else []),
                          hspace=0.3, wspace=0.15 if not extra else 0.25)
    mag_names = [f"{m:g}x" for m in magnifications]
    for s in range(s_n):
        rs = slice(s, s + 1) if s_n > 1 else slice(0, rows)
        ax = fig.add_subplot(gs[rs, 0])
        _panel(ax, tiles[s], f"{mag_names[s]}: tile")
        for j, (name, m) in enumerate(maps.items(), start=1):
            label, shown = _map_title(name, m[s])
            _panel(fig.add_subplot(gs[rs, j]), overlay(tiles[s], shown), f"{mag_names[s]}: {label}")
    if extra:
        half = rows // 2
        ax_w = fig.add_subplot(gs[half:, n])
        ax_w.bar(range(s_n), scale_weights, color=[_COLORS[i % len(_COLORS)] for i in range(s_n)])
        ax_w.set_xticks(range(s_n), labels=mag_names)
        ax_w.set_ylim(0, 1)
        ax_w.set_title("scale weights (gated pooling)", fontsize=9)
        ax_w.grid(axis="y", alpha=0.3)
        for i, v in enumerate(scale_weights):
            ax_w.text(i, float(v) + 0.02, f"{float(v):.2f}", ha="center", fontsize=8)
        if cross_scale is not None and half > 0:
            ax_a = fig.add_subplot(gs[:half, n])
            im = ax_a.imshow(cross_scale, cmap="Blues", vmin=0, vmax=1)
            ax_a.set_xticks(range(s_n), labels=mag_names)
            ax_a.set_yticks(range(s_n), labels=mag_names)
            ax_a.set_title("cross-scale attention\n(row attends to column)", fontsize=9)
            for i in range(s_n):
                for j in range(s_n):
                    ax_a.text(j, i, f"{cross_scale[i, j]:.2f}", ha="center", va="center", fontsize=8,
                              color="white" if cross_scale[i, j] > 0.6 else "#1a1a1a")
            fig.colorbar(im, ax=ax_a, fraction=0.046, pad=0.04)
    fig.suptitle(_short(title, 140), fontsize=10)
    return _save(fig, path)
