"""Training the learned nuclei segmenter (:mod:`breastfusion.features.nuclei.learned`) on annotated H&E tiles.

    from breastfusion.features.nuclei.annotations import load_annotated_dir
    from breastfusion.training.nuclei import train_nuclei_model
    data = load_annotated_dir("my_annotations/")
    path = train_nuclei_model([t.image for t in data.tiles], [t.labels for t in data.tiles],
                              out_path="nuclei.safetensors", steps=1500,
                              extra_foreground=[(t.image, t.mask) for t in data.foreground_only])

Targets (:func:`instance_targets`): the foreground and each nucleus's normalised distance to its own outline.
Training draws random crops (``crop`` pixels at the working resolution) with flips, 90° rotations and HED stain
augmentation (the transform of :class:`~breastfusion.data.stain.StainAugment`, batched in torch); the loss
is BCE + soft Dice on the foreground and BCE on the distance map. Tiles with only a binary foreground mask
(``extra_foreground``) supervise the foreground output only. Each step's crops are drawn from a generator seeded
with ``(seed, step)`` and the learning rate is a function of the step, so a run killed and resumed from its
checkpoint continues exactly as an uninterrupted run would. During training ``<out_path>.ckpt`` (safetensors too:
weights, optimiser moments, step and a fingerprint of the data and settings) is written atomically every
``checkpoint_every`` steps and removed once the model is saved.
The model file it writes is described in :mod:`breastfusion.features.nuclei.learned`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from breastfusion.data.stain import HED_FROM_RGB, RGB_FROM_HED, _as_rgb_uint8
from breastfusion.devices import select_device
from breastfusion.errors import ConfigError, DataError
from breastfusion.features.nuclei.learned import (
    _CKPT_KEY,
    DEFAULT_CHANNELS,
    DEFAULT_POSTPROCESS,
    DEFAULT_WINDOW,
    FORMAT,
    FORMAT_VERSION,
    OUTPUTS,
    NucleiUNet,
    _check_channels,
    _positive,
    _resize,
    _save_model,
    _work_shape,
    log,
)
from breastfusion.training.checkpoints import load_checkpoint, save_checkpoint

__all__ = ["instance_targets", "train_nuclei_model"]


# ------------------------------------------------------------------------------------------------ targets
def instance_targets(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training targets of an instance label image: (foreground float32 0/1, normalised distance float32).

    The distance of a nucleus pixel is its Euclidean distance to the nearest pixel outside the same nucleus
    (another nucleus, background or the image border), divided by the nucleus's maximum; 0 outside nuclei.
    """
    labels = np.asarray(labels)
    fg = (labels > 0).astype(np.float32)
    dist = np.zeros(labels.shape, dtype=np.float32)
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        m = labels[sl] == i
        d = ndi.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        mx = float(d.max())
        if mx > 0:
            dist[sl][m] = (d[m] / mx).astype(np.float32)
    return fg, dist


# ------------------------------------------------------------------------------------------------ training
@dataclass
class _Tile:
    image: np.ndarray  # uint8 (h, w, 3) at the working resolution, padded to at least crop
    fg: np.ndarray  # float32 (h, w)
    dist: np.ndarray  # float32 (h, w)
    valid: np.ndarray  # float32 (h, w): 0 in padding
    has_dist: bool


def _prepare_tile(image: np.ndarray, fg: np.ndarray, dist: np.ndarray | None, scale: float, crop: int) -> _Tile:
    h, w = image.shape[:2]
    hw = _work_shape(h, w, scale)
    img = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    img = _resize(img, hw)[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    tg = [fg] + ([dist] if dist is not None else [])
    tg = _resize(torch.from_numpy(np.stack(tg).astype(np.float32))[None], hw)[0].clamp_(0, 1).numpy()
    fg_w = tg[0]
    dist_w = tg[1] if dist is not None else np.zeros(hw, dtype=np.float32)
    valid = np.ones(hw, dtype=np.float32)
    ph, pw = max(0, crop - hw[0]), max(0, crop - hw[1])
    if ph or pw:
        pads = ((0, ph), (0, pw))
        img = np.pad(img, (*pads, (0, 0)), mode="symmetric")
        fg_w, dist_w, valid = (np.pad(a, pads) for a in (fg_w, dist_w, valid))
    return _Tile(np.ascontiguousarray(img), fg_w, dist_w, valid, dist is not None)


def _hed_augment(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """StainAugment's transform on a batch: x (N, 3, H, W) in [0, 1]; alpha, beta (N, 3). Returns [0, 1] floats."""
    hed_from_rgb = torch.as_tensor(HED_FROM_RGB, dtype=x.dtype, device=x.device)
    rgb_from_hed = torch.as_tensor(RGB_FROM_HED, dtype=x.dtype, device=x.device)
    od = -torch.log(x.clamp_min(0.5 / 255.0))
    hed = torch.einsum("nchw,cd->ndhw", od, hed_from_rgb)
    hed = hed * alpha[:, :, None, None] + beta[:, :, None, None]
    return torch.exp(-torch.einsum("ndhw,dc->nchw", hed, rgb_from_hed)).clamp_(0.0, 1.0)


def _sample_batch(tiles: list[_Tile], probs: np.ndarray, crop: int, batch_size: int, rng: np.random.Generator,
                  stain: tuple[float, float]):
    imgs, tgs = [], []
    for _ in range(batch_size):
        t = tiles[int(rng.choice(len(tiles), p=probs))]
        h, w = t.fg.shape
        y = int(rng.integers(0, h - crop + 1))
        x = int(rng.integers(0, w - crop + 1))
        sl = (slice(y, y + crop), slice(x, x + crop))
        img = t.image[sl]
        tg = np.stack([t.fg[sl], t.dist[sl], t.valid[sl], t.valid[sl] * float(t.has_dist)])
        k = int(rng.integers(4))
        img, tg = np.rot90(img, k, axes=(0, 1)), np.rot90(tg, k, axes=(1, 2))
        if rng.integers(2):
            img, tg = img[:, ::-1], tg[:, :, ::-1]
        imgs.append(np.ascontiguousarray(img))
        tgs.append(np.ascontiguousarray(tg))
    sa, sb = stain
    alpha = rng.uniform(1.0 - sa, 1.0 + sa, size=(batch_size, 3))
    beta = rng.uniform(-sb, sb, size=(batch_size, 3))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div_(255.0)
    return x, torch.from_numpy(np.stack(tgs)), torch.from_numpy(alpha).float(), torch.from_numpy(beta).float()


def _loss(logits: torch.Tensor, tg: torch.Tensor, dist_weight: float) -> tuple[torch.Tensor, dict]:
    fg_t, d_t, valid, dvalid = tg[:, 0], tg[:, 1], tg[:, 2], tg[:, 3]
    fg_l, d_l = logits[:, 0], logits[:, 1]
    bce = (F.binary_cross_entropy_with_logits(fg_l, fg_t, reduction="none") * valid).sum() / valid.sum().clamp_min(1.0)
    p = torch.sigmoid(fg_l) * valid
    soft_dice = 1.0 - (2.0 * (p * fg_t).sum() + 1.0) / (p.sum() + (fg_t * valid).sum() + 1.0)
    dl = (F.binary_cross_entropy_with_logits(d_l, d_t, reduction="none") * dvalid).sum() / dvalid.sum().clamp_min(1.0)
    total = bce + soft_dice + dist_weight * dl
    return total, {"fg_bce": bce.item(), "fg_dice": soft_dice.item(), "dist": dl.item()}


def _lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, min(100, steps // 10))
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t))))


def _fingerprint(settings: dict, arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:32]


def _as_label_image(mask: Any, shape: tuple[int, int], what: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise DataError(f"{what} must be a 2-D label image; got shape {m.shape}.")
    if m.shape != tuple(shape):
        raise DataError(f"{what} has shape {m.shape} but its image is {tuple(shape)}; they must match.")
    if m.dtype != bool and not np.issubdtype(m.dtype, np.integer):
        raise DataError(f"{what} must hold integer labels (0 = background); got dtype {m.dtype}.")
    if m.size and m.dtype != bool and m.min() < 0:
        raise DataError(f"{what} has negative labels.")
    return m


def train_nuclei_model(
    images: Sequence[np.ndarray],
    instance_masks: Sequence[np.ndarray],
    *,
    out_path: str | Path,
    steps: int | None = None,
    epochs: float | None = None,
    crop: int = 256,
    batch_size: int = 8,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    mpp: float = 0.25,
    work_mpp: float = 0.5,
    channels: Sequence[int] = DEFAULT_CHANNELS,
    stain_sigma: tuple[float, float] = (0.05, 0.05),
    dist_weight: float = 1.0,
    extra_foreground: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    extra_weight: float = 0.3,
    postprocess: dict | None = None,
    device: str | torch.device | None = "cpu",
    progress: bool = True,
    resume: bool = True,
    checkpoint_every: int = 25,
    callback: Callable[[int, dict], None] | None = None,
) -> Path:
    """Train a nuclei segmenter on H&E tiles with instance labels; write the model file; return its path.

    ``images``: uint8 (or [0, 1] float) RGB arrays at ``mpp`` µm/px; ``instance_masks``: int label images of the
    same (H, W) (0 = background, 1..n nuclei). ``extra_foreground``: (image, binary mask) pairs that supervise only
    the foreground output; ``extra_weight`` is the share of crops drawn from them (default 0.3, at most their
    share of the pixels), so that the distance output, which only the instance tiles teach, keeps most of the
    crops. Within each group crops are drawn from tiles in proportion to their area. Length of training: ``steps`` optimiser steps, or ``epochs`` passes over the training
    pixels (at the working resolution, ``batch_size`` crops of ``crop`` x ``crop`` per step); default 1500 steps.
    ``crop`` is in pixels at the working resolution ``work_mpp`` (multiple of 8 for the default 4 levels).
    ``resume``: continue from ``<out_path>.ckpt`` when it was made with the same data and settings.
    ``callback(step, info)`` is called after each step (``info`` holds the losses and the learning rate).
    """
    out_path = Path(out_path)
    ckpt_path = out_path.with_name(out_path.name + ".ckpt")
    mpp = _positive("mpp", mpp)
    work_mpp = _positive("work_mpp", work_mpp)
    lr = _positive("lr", lr)
    channels = _check_channels(channels)
    multiple = 2 ** (len(channels) - 1)
    if isinstance(crop, bool) or not isinstance(crop, numbers.Integral) or crop < 2 * multiple or crop % multiple:
        raise ConfigError(f"'crop' must be an integer multiple of {multiple} and at least {2 * multiple}; got {crop!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ConfigError(f"'batch_size' must be a positive integer; got {batch_size!r}.")
    if steps is not None and epochs is not None:
        raise ConfigError("Give 'steps' or 'epochs', not both.")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1):
        raise ConfigError(f"'steps' must be a positive integer; got {steps!r}.")
    if epochs is not None:
        _positive("epochs", epochs)
    if isinstance(extra_weight, bool) or not (isinstance(extra_weight, numbers.Real) and 0.0 <= extra_weight < 1.0):
        raise ConfigError(f"'extra_weight' must be in [0, 1); got {extra_weight!r}.")
    sa, sb = (float(s) for s in stain_sigma)
    if not (0.0 <= sa < 1.0 and sb >= 0.0):
        raise ConfigError(f"'stain_sigma' must be (alpha half-width in [0, 1), beta half-width >= 0); got {stain_sigma!r}.")
    pp = {**DEFAULT_POSTPROCESS, **(postprocess or {})}
    if set(pp) != set(DEFAULT_POSTPROCESS):
        raise ConfigError(f"Unknown postprocess key(s) {sorted(set(pp) - set(DEFAULT_POSTPROCESS))}.")
    images, instance_masks = list(images), list(instance_masks)
    if len(images) != len(instance_masks):
        raise DataError(f"Got {len(images)} image(s) but {len(instance_masks)} instance mask(s); they must pair up.")
    if not images:
        raise DataError("train_nuclei_model needs at least one image with instance labels.")
    dev = select_device(device)

    scale = mpp / work_mpp
    rgbs, labels_list, extra = [], [], []
    for i, (im, lab) in enumerate(zip(images, instance_masks)):
        rgb = _as_rgb_uint8(im, f"Training image #{i}")
        labels_list.append(_as_label_image(lab, rgb.shape[:2], f"Instance mask #{i}"))
        rgbs.append(rgb)
    for i, pair in enumerate(extra_foreground or []):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise DataError(f"extra_foreground item #{i} must be an (image, mask) pair.")
        rgb = _as_rgb_uint8(pair[0], f"Foreground-only image #{i}")
        extra.append((rgb, _as_label_image(pair[1], rgb.shape[:2], f"Foreground-only mask #{i}") > 0))

    settings = {"format": FORMAT, "channels": list(channels), "crop": int(crop), "batch_size": int(batch_size),
                "lr": lr, "weight_decay": float(weight_decay), "seed": int(seed), "mpp": mpp, "work_mpp": work_mpp,
                "stain_sigma": [sa, sb], "dist_weight": float(dist_weight), "steps": steps, "epochs": epochs,
                "extra_weight": extra_weight}
    fingerprint = _fingerprint(settings, [a for pair in zip(rgbs, labels_list) for a in pair]
                               + [a for pair in extra for a in pair])

    t_prep = time.perf_counter()
    tiles = []
    n_nuclei = 0
    for rgb, lab in zip(rgbs, labels_list):
        fg, dist = instance_targets(lab)
        n_nuclei += len(np.unique(lab)) - (1 if (lab == 0).any() else 0)
        tiles.append(_prepare_tile(rgb, fg, dist, scale, crop))
    for rgb, m in extra:
        tiles.append(_prepare_tile(rgb, m.astype(np.float32), None, scale, crop))
    area = np.array([t.valid.sum() for t in tiles], dtype=np.float64)
    probs = area / area.sum()
    n = len(rgbs)
    share = min(float(extra_weight), float(probs[n:].sum()))
    if extra:
        probs[:n] = area[:n] / area[:n].sum() * (1.0 - share)
        probs[n:] = area[n:] / area[n:].sum() * share
    if steps is None:
        steps = max(1, math.ceil((epochs or 0) * area.sum() / (batch_size * crop * crop))) if epochs else 1500
    log.info("nuclei training: %d instance tile(s) (%d nuclei), %d foreground-only tile(s), %d steps of %d x %d² "
             "crops at %.3g µm/px on %s (targets ready in %.1f s)", len(rgbs), n_nuclei, len(extra), steps,
             batch_size, crop, work_mpp, dev, time.perf_counter() - t_prep)

    torch.manual_seed(seed)
    net = NucleiUNet(channels).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    start, elapsed, history = 0, 0.0, []
    if resume and ckpt_path.exists():
        restored = load_checkpoint(ckpt_path, net, opt, fingerprint, key=_CKPT_KEY)
        info = restored[0] if restored is not None else None
        if info is not None:
            start, elapsed, history = int(info["step"]), float(info.get("elapsed_s", 0.0)), list(info.get("history", []))
            log.info("resuming nuclei training from step %d/%d ('%s')", start, steps, ckpt_path)
    elif ckpt_path.exists():
        ckpt_path.unlink()

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt_path, net, opt, key=_CKPT_KEY,
                        info={"format": FORMAT + ".checkpoint", "fingerprint": fingerprint, "step": step,
                              "steps": steps, "elapsed_s": elapsed, "history": history[-200:]})

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc="nuclei training", unit="step", dynamic_ncols=True)
    net.train()
    step = start
    t_last = time.perf_counter()
    running = None
    try:
        for step in range(start, steps):
            rng = np.random.default_rng([int(seed), step])
            x, tg, alpha, beta = _sample_batch(tiles, probs, crop, batch_size, rng, (sa, sb))
            x, tg = x.to(dev, non_blocking=True), tg.to(dev, non_blocking=True)
            if sa > 0 or sb > 0:
                x = _hed_augment(x, alpha.to(dev), beta.to(dev))
            x = x.contiguous(memory_format=torch.channels_last)
            cur_lr = _lr_at(step, steps, lr)
            for g in opt.param_groups:
                g["lr"] = cur_lr
            loss, parts = _loss(net(x), tg, dist_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lv = loss.item()
            if not math.isfinite(lv):
                raise DataError(f"Nuclei training diverged at step {step + 1} (loss {lv}); lower 'lr'.")
            running = lv if running is None else 0.95 * running + 0.05 * lv
            now = time.perf_counter()
            elapsed += now - t_last
            t_last = now
            if (step + 1) % 10 == 0 or step + 1 == steps:
                history.append({"step": step + 1, "loss": round(running, 5), **{k: round(v, 5) for k, v in parts.items()}})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running:.3f}")
            if callback is not None:
                callback(step + 1, {"loss": lv, "lr": cur_lr, **parts})
            if checkpoint_every and (step + 1) % int(checkpoint_every) == 0 and step + 1 < steps:
                checkpoint(step + 1)
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            checkpoint(step)  # steps before `step` are complete; `step` itself is redone
        raise
    finally:
        if bar is not None:
            bar.close()

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "breastfusion_version": _version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "architecture": {"name": "unet", "channels": list(channels), "outputs": list(OUTPUTS),
                         "input": "RGB in [0, 1], ImageNet mean/std normalisation"},
        "mpp": mpp,
        "magnification": round(10.0 / mpp, 1),
        "work_mpp": work_mpp,
        "postprocess": pp,
        "inference": dict(DEFAULT_WINDOW),
        "training": {"steps": steps, "crop": int(crop), "batch_size": int(batch_size), "lr": lr,
                     "weight_decay": float(weight_decay), "seed": int(seed), "stain_sigma": [sa, sb],
                     "dist_weight": float(dist_weight), "extra_weight": extra_weight,
                     "instance_tiles": len(rgbs), "nuclei": int(n_nuclei),
                     "foreground_only_tiles": len(extra), "seconds": round(elapsed, 1), "device": str(dev),
                     "final_loss": history[-1]["loss"] if history else None, "fingerprint": fingerprint,
                     "loss_history": history[:: max(1, math.ceil(len(history) / 50))]},
    }
    net.eval()
    _save_model(net, meta, out_path)
    with contextlib.suppress(FileNotFoundError):
        ckpt_path.unlink()
    log.info("nuclei model written to '%s' (%d steps, %.0f s of training)", out_path, steps, elapsed)
    return out_path


def _version() -> str:
    from breastfusion.version import __version__

    return __version__
