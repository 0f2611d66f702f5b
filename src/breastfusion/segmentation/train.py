"""Train the lesion segmenter on a cases table with expert masks.

    from breastfusion.config import SegmentationConfig
    from breastfusion.segmentation import train_lesion_segmenter
    path = train_lesion_segmenter(cases, SegmentationConfig(), "segmenter.safetensors", seed=0)

Which cases teach what
----------------------
The training target of a case is the union of its masks (``mask_path``, several joined with ``;``). A case whose
``mask_path`` is missing (NaN: "no mask available") is left out and counted: it is never read as "no lesion".
``''`` (or mask files that are empty) is an empty target: a normal image teaches the network to say "no lesion".
An image or mask that cannot be read, or a mask of another size than its image, is skipped with its reason logged
(and counted in the model file); the others train.

Method
------
An inner validation split (``val_fraction``, stratified by label, grouped by patient and duplicate group, via
:func:`breastfusion.training.fit.inner_validation_split`) picks the best step: the per-case Dice of the validation
cases (at the network's resolution, an image correctly left empty counting 1) is measured after every
epoch-equivalent, and the model file keeps the weights of the best one. The loss is BCE + soft Dice; AdamW;
the learning rate warms up linearly, then follows a cosine decay by step. Training length: ``steps``, or
``epochs`` passes over the training images (``ceil(epochs * n_train / batch_size)`` steps).

Augmentation (training images only; image and mask together): depth crop (a random bottom band is dropped, never
the lesion's rows), random resized crop that keeps at least 90 % of the lesion, horizontal flip (left and right
are arbitrary, depth is not: no vertical flip), rotation within ±10°, gain / contrast / gamma, multiplicative
speckle (gamma-distributed noise), resolution loss (down- then up-sampling), and finally the letterbox of inference.

Each step's batch and augmentation are drawn from a generator seeded with ``(seed, step)``, and the learning
rate is a function of the step, so a run killed and resumed from its checkpoint ends with the same weights as an
uninterrupted one. ``<out_path>.ckpt`` (safetensors: weights, optimiser moments, the best weights so far, step,
histories and a fingerprint of the data and settings) is written atomically every ``checkpoint_every`` steps and
on Ctrl-C, reused only when the fingerprint matches (otherwise training restarts, logged), and removed once the
model file is written. A finished model file whose fingerprint matches is reused as it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from breastfusion.data.cases import CASE_ID, IMAGE_PATH, LABEL, MASK_PATH, mask_list
from breastfusion.devices import select_device
from breastfusion.errors import BundleError, ConfigError, DataError
from breastfusion.segmentation.unet import (
    CKPT_KEY,
    FORMAT,
    FORMAT_VERSION,
    LIBRARY,
    MEAN,
    STD,
    build_unet,
    check_size,
    letterbox_array,
    load_encoder_weights,
    read_meta,
    resize_array,
    save_model,
)
from breastfusion.training.checkpoints import load_checkpoint, save_checkpoint
from breastfusion.utils import state_tensors

__all__ = ["read_case_arrays", "train_lesion_segmenter"]

log = logging.getLogger(__name__)

CACHE_FACTOR = 1.25  # training images are kept with their longer side at size * CACHE_FACTOR (crop headroom)


def _config(cfg):
    from breastfusion.config import SegmentationConfig

    if cfg is None:
        return SegmentationConfig()
    if not isinstance(cfg, SegmentationConfig):
        raise TypeError(f"cfg must be a SegmentationConfig; got {type(cfg).__name__}.")
    return cfg


# ------------------------------------------------------------------------------------------------ data
def read_case_arrays(image_path, mask_value) -> tuple[np.ndarray, np.ndarray]:
    """(grey uint8 image, boolean union of the case's masks); '' gives an empty mask. DataError names the file."""
    from breastfusion.data.images import float_to_u8, read_image, read_mask

    gray = float_to_u8(read_image(image_path, mode="gray"))
    paths = mask_list(mask_value)
    mask = read_mask(paths, shape=gray.shape) if paths else np.zeros(gray.shape, dtype=bool)
    return gray, mask


@dataclass
class _Item:
    image: np.ndarray  # uint8 (h, w): training, longer side size * CACHE_FACTOR; validation, letterboxed size x size
    target: np.ndarray  # float32 (h, w) in [0, 1] (validation: letterboxed, with the window below)
    window: tuple[int, int, int, int] = (0, 0, 0, 0)  # validation: top, left, inner_h, inner_w


def _train_item(gray: np.ndarray, mask: np.ndarray, side: int) -> _Item:
    h, w = gray.shape
    s = side / max(h, w)
    hw = (max(1, round(h * s)), max(1, round(w * s)))
    x = resize_array(gray.astype(np.float32), hw, "bicubic")
    t = resize_array(mask.astype(np.float32), hw)
    return _Item(np.clip(np.round(x), 0, 255).astype(np.uint8), np.clip(t, 0.0, 1.0))


def _val_item(gray: np.ndarray, mask: np.ndarray, size: int) -> _Item:
    x, box = letterbox_array(gray.astype(np.float32) / 255.0, size)
    t, _ = letterbox_array(mask.astype(np.float32), size, "bilinear")
    return _Item(np.round(x * 255.0).astype(np.uint8), (t > 0.5).astype(np.float32),
                 (box.top, box.left, box.inner_h, box.inner_w))


# ------------------------------------------------------------------------------------------------ augmentation
def _rotate(a: np.ndarray, angle: float) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32))
    return np.asarray(img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0.0), dtype=np.float32)


def _augment(item: _Item, size: int, rng: np.random.Generator, enabled: bool) -> tuple[np.ndarray, np.ndarray]:
    """(image (size, size) float32 in [0, 1], target (size, size)) of one training item.

    numpy and Pillow only: single-threaded per image, which keeps it fast when the CPU is shared."""
    x = item.image.astype(np.float32) / 255.0
    t = item.target
    if enabled:
        h = x.shape[0]
        if rng.random() < 0.3:  # depth crop: drop a bottom band, never the lesion's rows
            rows = np.flatnonzero(t.max(axis=1) > 0.5)
            limit = h - 1 - int(rows.max()) if rows.size else h
            band = min(int(rng.uniform(0.05, 0.3) * h), limit, h - 16)
            if band > 0:
                x, t = x[: h - band], t[: h - band]
        hh, ww = x.shape
        total = float(t.sum())
        for _ in range(10):  # random resized crop keeping >= 90 % of the lesion
            area = rng.uniform(0.5, 1.0)
            ratio = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
            ch = max(16, min(hh, round(hh * math.sqrt(area / ratio))))
            cw = max(16, min(ww, round(ww * math.sqrt(area * ratio))))
            top, left = int(rng.integers(0, hh - ch + 1)), int(rng.integers(0, ww - cw + 1))
            if total == 0 or float(t[top:top + ch, left:left + cw].sum()) >= 0.9 * total:
                x, t = x[top:top + ch, left:left + cw], t[top:top + ch, left:left + cw]
                break
        if rng.random() < 0.5:
            x, t = x[:, ::-1], t[:, ::-1]
        if rng.random() < 0.5:
            angle = float(rng.uniform(-10.0, 10.0))
            x, t = _rotate(x, angle), _rotate(t, angle)
        gain, contrast = rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2)
        gamma = math.exp(rng.uniform(-0.3, 0.3))
        mean = float(x.mean())
        x = np.clip(((x - mean) * contrast + mean) * gain, 0.0, 1.0) ** gamma
        if rng.random() < 0.3:  # speckle: multiplicative gamma noise of mean 1
            k = rng.uniform(4.0, 16.0)
            x = np.clip(x * rng.gamma(k, 1.0 / k, size=x.shape), 0.0, 1.0)
        if rng.random() < 0.25:  # resolution loss
            f = rng.uniform(1.5, 3.0)
            hw = x.shape
            x = resize_array(resize_array(x.astype(np.float32), (max(8, round(hw[0] / f)), max(8, round(hw[1] / f)))), hw)
    x, _ = letterbox_array(x.astype(np.float32), size)
    t, _ = letterbox_array(np.ascontiguousarray(t, dtype=np.float32), size, "bilinear")
    return x, t


def _batch(items: list[_Item], idx: np.ndarray, size: int, rng: np.random.Generator, augment: bool):
    xs, ts = zip(*(_augment(items[int(i)], size, rng, augment) for i in idx))
    x = (torch.from_numpy(np.stack(xs)) - MEAN) / STD
    return x[:, None].expand(-1, 3, -1, -1), torch.from_numpy(np.stack(ts))[:, None]


# ------------------------------------------------------------------------------------------------ loss, schedule
def _loss(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    dice = 1.0 - (2.0 * (p * target).sum() + 1.0) / (p.sum() + target.sum() + 1.0)
    return bce + dice, {"bce": bce.item(), "soft_dice": dice.item()}


def _lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, min(100, steps // 10))
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t))))


@torch.inference_mode()
def _val_dice(net, items: list[_Item], threshold: float, dev: torch.device, batch_size: int) -> float:
    """Mean per-case Dice at the network's resolution, inside each letterbox window (empty vs empty = 1)."""
    net.eval()
    scores = []
    try:
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            x = torch.from_numpy(np.stack([it.image for it in chunk]).astype(np.float32) / 255.0)[:, None]
            x = ((x - MEAN) / STD).expand(-1, 3, -1, -1).to(dev).contiguous(memory_format=torch.channels_last)
            pred = (torch.sigmoid(net(x)[:, 0].float()) > threshold).cpu().numpy()
            for it, p in zip(chunk, pred):
                top, left, ih, iw = it.window
                p = p[top:top + ih, left:left + iw]
                t = it.target[top:top + ih, left:left + iw] > 0.5
                s = int(p.sum()) + int(t.sum())
                scores.append(1.0 if s == 0 else 2.0 * float(np.logical_and(p, t).sum()) / s)
    finally:
        net.train()
    return float(np.mean(scores))


# ------------------------------------------------------------------------------------------------ checkpoint
def _fingerprint(settings: dict, ids: list[str], items: list[_Item]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update("\x1f".join(ids).encode())
    for it in items:
        for a in (it.image, it.target):
            a = np.ascontiguousarray(a)
            h.update(str((a.shape, a.dtype.str)).encode())
            h.update(a.tobytes())
        h.update(str(it.window).encode())
    return h.hexdigest()[:32]


# ------------------------------------------------------------------------------------------------ split
def _stratum(cases: pd.DataFrame, masks_nonempty: np.ndarray) -> np.ndarray:
    if LABEL in cases.columns and cases[LABEL].notna().all() and cases[LABEL].nunique() >= 1:
        return pd.factorize(cases[LABEL].astype(str))[0]
    return masks_nonempty.astype(int)


def _validation_rows(cases: pd.DataFrame, nonempty: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    from breastfusion.data.splits import split_groups
    from breastfusion.training.fit import inner_validation_split

    n = len(cases)
    none = np.zeros(n, dtype=bool)
    if fraction <= 0 or n < 8:
        if fraction > 0:
            log.warning("only %d training case(s): no inner validation, the last step's weights are kept", n)
        return none
    dup = cases.set_index(cases[CASE_ID].astype(str))["dup_group"] if "dup_group" in cases.columns else None
    groups = split_groups(cases, dup).to_numpy()
    if len(np.unique(groups)) < 4:
        log.warning("only %d independent group(s): no inner validation, the last step's weights are kept",
                    len(np.unique(groups)))
        return none
    try:
        val = inner_validation_split(_stratum(cases, nonempty), groups, fraction, seed)
    except ValueError as exc:  # too few groups per class for a stratified grouped split
        log.warning("no inner validation split (%s); the last step's weights are kept", exc)
        return none
    if val.all() or not val.any():
        return none
    return val


# ------------------------------------------------------------------------------------------------ training
def train_lesion_segmenter(cases: pd.DataFrame, cfg=None, out_path: str | Path = "segmenter.safetensors", *,
                           seed: int = 0, progress: bool = True, val_fraction: float | None = None,
                           resume: bool = True, callback: Callable[[int, dict], None] | None = None) -> Path:
    """Train a lesion segmenter on the cases' expert masks and write one safetensors model file; return its path.

    ``cases``: a cases table (``case_id``, ``image_path``, ``mask_path``; ``label``, ``patient_id`` and
    ``dup_group`` are used for the inner validation split when present). ``cfg``: a
    :class:`~breastfusion.config.SegmentationConfig` (default settings when None). ``val_fraction`` overrides
    ``cfg.val_fraction``. ``resume``: continue from ``<out_path>.ckpt``, or keep a finished ``out_path``, when
    they were made from the same data and settings. ``callback(step, info)`` runs after each step (``info``: loss,
    learning rate; and ``val_dice`` after an evaluation)."""
    cfg = _config(cfg)
    out_path = Path(out_path)
    ckpt_path = out_path.with_name(out_path.name + ".ckpt")
    size = check_size(cfg.size)
    fraction = cfg.val_fraction if val_fraction is None else float(val_fraction)
    if not 0.0 <= fraction < 0.5:
        raise ConfigError(f"'val_fraction' must lie in [0, 0.5); got {val_fraction!r}.")
    if not isinstance(cases, pd.DataFrame):
        raise TypeError(f"cases must be a pandas DataFrame; got {type(cases).__name__}.")
    for col in (CASE_ID, IMAGE_PATH, MASK_PATH):
        if col not in cases.columns:
            raise DataError(f"The cases table has no '{col}' column; the lesion segmenter trains on expert masks.")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    dev = select_device(cfg.device)

    cases = cases.reset_index(drop=True)
    unknown = cases[MASK_PATH].isna()
    if unknown.any():
        log.info("lesion segmenter: %d case(s) without a mask (mask_path empty/NaN: mask not available) are left "
                 "out of training, never read as 'no lesion': %s", int(unknown.sum()),
                 ", ".join(cases.loc[unknown, CASE_ID].astype(str).head(5)) + (" ..." if unknown.sum() > 5 else ""))
    usable = cases[~unknown].reset_index(drop=True)
    t_prep = time.perf_counter()
    grays, masks, keep, skipped = [], [], [], []
    from tqdm import tqdm

    rows = tqdm(usable.itertuples(index=False), total=len(usable), desc="segmenter: reading", unit="img",
                disable=not progress, dynamic_ncols=True, leave=False)
    for i, row in enumerate(rows):
        try:
            g, m = read_case_arrays(getattr(row, IMAGE_PATH), getattr(row, MASK_PATH))
        except DataError as exc:
            skipped.append({"case_id": str(getattr(row, CASE_ID)), "reason": str(exc)})
            log.warning("lesion segmenter: skipped case '%s': %s", getattr(row, CASE_ID), exc)
            continue
        grays.append(g)
        masks.append(m)
        keep.append(i)
    usable = usable.iloc[keep].reset_index(drop=True)
    if len(usable) == 0:
        raise DataError(f"No case with a readable image and an expert mask to train the lesion segmenter on "
                        f"({int(unknown.sum())} without mask, {len(skipped)} unreadable).")
    nonempty = np.array([m.any() for m in masks])
    val = _validation_rows(usable, nonempty, fraction, seed)
    side = round(size * CACHE_FACTOR)
    train_items = [_train_item(g, m, side) for g, m, v in zip(grays, masks, val) if not v]
    val_items = [_val_item(g, m, size) for g, m, v in zip(grays, masks, val) if v]
    del grays, masks
    ids = usable[CASE_ID].astype(str).tolist()
    n_train, n_val = len(train_items), len(val_items)
    batch_size = int(cfg.batch_size)
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))
    steps = int(cfg.steps) if cfg.steps else max(1, math.ceil(cfg.epochs * n_train / batch_size))
    settings = {"format": FORMAT, "encoder": cfg.encoder, "decoder_channels": list(cfg.decoder_channels),
                "pretrained": cfg.pretrained, "weights_path": cfg.weights_path, "size": size,
                "batch_size": batch_size, "steps": steps, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                "val_fraction": fraction, "augment": cfg.augment, "threshold": cfg.threshold,
                "min_area_fraction": cfg.min_area_fraction, "seed": int(seed), "val": val.tolist()}
    fingerprint = _fingerprint(settings, ids, train_items + val_items)
    log.info("lesion segmenter: %d training + %d validation case(s) (%d with a lesion, %d empty), %d left out "
             "without mask, %d skipped; %d steps of %d at %d px on %s (data ready in %.1f s)", n_train, n_val,
             int(nonempty.sum()), int((~nonempty).sum()), int(unknown.sum()), len(skipped), steps, batch_size, size,
             dev, time.perf_counter() - t_prep)

    if resume and out_path.exists():
        try:
            done = read_meta(out_path)
        except BundleError as exc:
            log.warning("existing '%s' is not a usable lesion segmenter (%s); training it again", out_path, exc)
        else:
            if done["training"].get("fingerprint") == fingerprint:
                log.info("lesion segmenter '%s' was already trained on these data and settings: reused", out_path)
                return out_path

    torch.manual_seed(int(seed))
    net = build_unet(cfg.encoder, cfg.decoder_channels)
    weights_init = load_encoder_weights(net, cfg.encoder, pretrained=cfg.pretrained, weights_path=cfg.weights_path)
    net.to(dev, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, elapsed, history, val_history = 0, 0.0, [], []
    best: dict | None = None
    best_step, best_dice = None, -1.0
    if resume and ckpt_path.exists():
        restored = load_checkpoint(ckpt_path, net, opt, fingerprint, key=CKPT_KEY)
        if restored is not None:
            info, extra = restored
            best = extra.get("best")
            start, elapsed = int(info["step"]), float(info.get("elapsed_s", 0.0))
            history, val_history = list(info.get("history", [])), list(info.get("val_history", []))
            best_step, best_dice = info.get("best_step"), float(info.get("best_val_dice", -1.0))
            log.info("resuming lesion segmenter training from step %d/%d ('%s')", start, steps, ckpt_path)
    elif ckpt_path.exists():
        ckpt_path.unlink()

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt_path, net, opt, key=CKPT_KEY, extra={"best": best}, info={
            "format": FORMAT + ".checkpoint", "fingerprint": fingerprint, "step": step, "steps": steps,
            "elapsed_s": elapsed, "history": history[-500:], "val_history": val_history,
            "best_step": best_step, "best_val_dice": best_dice})

    bar = None
    if progress:
        bar = tqdm(total=steps, initial=start, desc="segmenter training", unit="step", dynamic_ncols=True)
    net.train()
    step = start
    running = None
    t_last = time.perf_counter()
    try:
        for step in range(start, steps):
            rng = np.random.default_rng([int(seed), step])
            idx = rng.choice(n_train, size=batch_size, replace=n_train < batch_size)
            x, t = _batch(train_items, idx, size, rng, cfg.augment)
            x = x.to(dev).contiguous(memory_format=torch.channels_last)
            t = t.to(dev)
            cur_lr = _lr_at(step, steps, cfg.lr)
            for g in opt.param_groups:
                g["lr"] = cur_lr
            loss, parts = _loss(net(x), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lv = loss.item()
            if not math.isfinite(lv):
                raise DataError(f"Lesion segmenter training diverged at step {step + 1} (loss {lv}); lower 'lr'.")
            running = lv if running is None else 0.95 * running + 0.05 * lv
            info = {"loss": lv, "lr": cur_lr, **parts}
            if (step + 1) % 10 == 0 or step + 1 == steps:
                history.append({"step": step + 1, "loss": round(running, 5)})
            if val_items and ((step + 1) % steps_per_epoch == 0 or step + 1 == steps):
                d = _val_dice(net, val_items, cfg.threshold, dev, max(batch_size, 8))
                val_history.append({"step": step + 1, "dice": round(d, 5)})
                info["val_dice"] = d
                if d > best_dice:
                    best_dice, best_step, best = d, step + 1, state_tensors(net)
            now = time.perf_counter()
            elapsed += now - t_last
            t_last = now
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running:.3f}",
                                **({"val_dice": f"{val_history[-1]['dice']:.3f}"} if val_history else {}))
            if callback is not None:
                callback(step + 1, info)
            if (step + 1) % int(cfg.checkpoint_every) == 0 and step + 1 < steps:
                checkpoint(step + 1)
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            checkpoint(step)  # steps before `step` are complete; `step` itself is redone
        raise
    finally:
        if bar is not None:
            bar.close()

    tensors = best if best is not None else state_tensors(net)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "breastfusion_version": _version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "architecture": {"name": "unet", "library": LIBRARY, "library_version": _smp_version(),
                         "encoder": cfg.encoder, "decoder_channels": list(cfg.decoder_channels), "classes": 1,
                         "output": "lesion logit"},
        "preprocessing": {"size": size, "resize": "letterbox", "interpolation": "bicubic, anti-aliased",
                          "pad_value": 0, "color": "grey uint8 replicated to 3 channels", "mean": [MEAN] * 3,
                          "std": [STD] * 3},
        "postprocessing": {"threshold": cfg.threshold, "min_area_fraction": cfg.min_area_fraction,
                           "connectivity": 8, "resize_back": "logits, bilinear, then sigmoid"},
        "weights_init": weights_init,
        "training": {
            "n_cases": len(cases), "n_train": n_train, "n_val": n_val, "n_with_lesion": int(nonempty.sum()),
            "n_empty": int((~nonempty).sum()), "n_without_mask": int(unknown.sum()), "n_skipped": len(skipped),
            "skipped": skipped[:20], "steps": steps, "steps_per_epoch": steps_per_epoch,
            "epochs": round(steps / steps_per_epoch, 2), "batch_size": batch_size, "lr": cfg.lr,
            "weight_decay": cfg.weight_decay, "augment": cfg.augment, "val_fraction": fraction, "seed": int(seed),
            "best_step": best_step if best is not None else steps,
            "best_val_dice": round(best_dice, 5) if best is not None else None,
            "val_history": val_history, "loss_history": history[:: max(1, math.ceil(len(history) / 50))],
            "final_loss": history[-1]["loss"] if history else None, "seconds": round(elapsed, 1),
            "device": str(dev), "fingerprint": fingerprint},
    }
    save_model(tensors, meta, out_path)
    with contextlib.suppress(FileNotFoundError):
        ckpt_path.unlink()
    log.info("lesion segmenter written to '%s' (%d steps, best inner-validation Dice %s at step %s, %.0f s)",
             out_path, steps, f"{best_dice:.3f}" if best is not None else "n/a",
             best_step if best is not None else steps, elapsed)
    return out_path


def _version() -> str:
    from breastfusion.version import __version__

    return __version__


def _smp_version() -> str:
    import segmentation_models_pytorch as smp

    return str(getattr(smp, "__version__", "unknown"))
