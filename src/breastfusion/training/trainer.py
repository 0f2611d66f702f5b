"""The training loop: two stages, early stopping, atomic checkpoints, resume.

Stage 1 trains the projection, tabular MLP and head on a frozen backbone (BatchNorm statistics frozen too).
Because the frozen backbone is a fixed function, its pooled features are computed once (un-augmented) and the
heads train on them for many cheap epochs; augmentation is used in stage 2.
Stage 2 fine-tunes end to end with AdamW (backbone at a lower learning rate) and cosine annealing, stopping
early on validation macro-F1. A tabular-only model has one stage. Every epoch writes ``last.pt`` (model,
optimiser, scheduler, counters) atomically and the best weights as ``best.safetensors``; ``resume=True``
continues from ``last.pt``. Randomness is re-seeded per epoch, so a resumed run repeats an uninterrupted one.

Any model with the small interface of :class:`~breastfusion.models.fusion.FusionClassifier` trains here
(``backbone_modules``, ``backbone_forward``, ``forward_from_backbone``, ``probabilities``, ``make_criterion``,
``backbone_parameters``/``head_parameters``/``set_backbone_trainable``): the ultrasound fusion model and the
multiscale histology grader share this loop. Under ``torchrun`` the loop runs with DDP (see
:mod:`breastfusion.distributed`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from breastfusion import devices
from breastfusion import distributed as dist_utils
from breastfusion.config import TrainConfig
from breastfusion.errors import ConfigError
from breastfusion.utils import atomic_path

log = logging.getLogger(__name__)


def _core(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _shard(dataset):
    """This rank's share of a dataset for inference (every item exactly once across ranks)."""
    w = dist_utils.world_size()
    return dataset if w == 1 else Subset(dataset, list(range(dist_utils.rank(), len(dataset), w)))


def inverse_frequency_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """w_c = N / (K * n_c); a class absent from training gets weight 0 (it cannot be learned)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


@dataclass
class TrainResult:
    best_epoch: int
    best_val_macro_f1: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


class _Autocast:
    def __init__(self, device: torch.device, amp: str):
        self.enabled = device.type == "cuda" and amp in ("auto", "on")
        self.dtype = torch.bfloat16 if self.enabled and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled and self.dtype == torch.float16)
        self.device = device

    def ctx(self):
        return torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=self.enabled)


def _to_device(batch, device, channels_last: bool):
    image, tab, label, idx = batch
    image = image.to(device, non_blocking=True)
    if channels_last and image.dim() == 4:
        image = image.contiguous(memory_format=torch.channels_last)
    return image, tab.to(device, non_blocking=True), label.to(device), idx


def _forward(model: nn.Module, image, tab):
    core = _core(model)
    return model(image if core.uses_image else None, tab if core.uses_tabular else None)


@torch.no_grad()
def predict_proba(model: nn.Module, dataset, *, batch_size: int = 32, device: torch.device | None = None,
                  channels_last: bool = True, amp: str = "auto", progress: bool = False, desc: str = "predict") -> np.ndarray:
    """Class probabilities (n, K) in dataset order (under DDP each rank scores a share; all get the whole)."""
    from tqdm.auto import tqdm

    core = _core(model)
    device = device or next(core.parameters()).device
    core.eval()
    ac = _Autocast(device, amp)
    loader = DataLoader(_shard(dataset), batch_size=batch_size, shuffle=False, num_workers=0)
    out = torch.zeros((len(dataset), core.n_classes), dtype=torch.float64, device=device)
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        image, tab, _, idx = _to_device(batch, device, channels_last)
        with ac.ctx():
            logits = _forward(core, image, tab)
        out[idx.to(device)] = core.probabilities(logits).double()
    return dist_utils.sum_rows(out).cpu().numpy()


@torch.no_grad()
def backbone_features(model: nn.Module, dataset, *, batch_size: int, device, channels_last: bool,
                      amp: str = "auto", progress: bool = False, desc: str = "features") -> torch.Tensor:
    """Features of the (frozen) backbone(s) for every item, without augmentation, in dataset order."""
    from tqdm.auto import tqdm

    core = _core(model)
    augment, dataset.augment = getattr(dataset, "augment", None), None
    for m in core.backbone_modules():
        m.eval()
    ac = _Autocast(device, amp)
    feats = None
    try:
        with torch.no_grad():  # the feature size, so every rank allocates the same table
            image0 = _to_device(next(iter(DataLoader(dataset, batch_size=1))), device, channels_last)[0]
            with ac.ctx():
                width = core.backbone_forward(image0).shape[1]
        feats = torch.zeros(len(dataset), width, device=device)
        loader = DataLoader(_shard(dataset), batch_size=batch_size, shuffle=False, num_workers=0)
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            image, _, _, idx = _to_device(batch, device, channels_last)
            with ac.ctx():
                feats[idx.to(device)] = core.backbone_forward(image).float()
    finally:
        dataset.augment = augment
    return dist_utils.sum_rows(feats)


def _tabular_tensor(dataset, device) -> torch.Tensor | None:
    tab = getattr(dataset, "tabular", None)
    return torch.from_numpy(np.asarray(tab, dtype=np.float32)).to(device) if tab is not None else None


def _make_optimizer(model: nn.Module, stage: int, cfg: TrainConfig):
    if stage == 1 or not model.uses_image:
        params = [p for p in model.head_parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=cfg.stage1_lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(
        [{"params": model.head_parameters(), "lr": cfg.stage2_lr},
         {"params": [p for p in model.backbone_parameters() if p.requires_grad],
          "lr": cfg.stage2_lr * cfg.backbone_lr_scale}],
        weight_decay=cfg.weight_decay,
    )


def _stage_plan(model: nn.Module, cfg: TrainConfig) -> list[tuple[int, int]]:
    """[(stage, n_epochs), ...]"""
    if not model.uses_image:
        return [(2, cfg.tabular_epochs)]
    return [(s, n) for s, n in ((1, cfg.stage1_epochs), (2, cfg.stage2_epochs)) if n > 0]


def check_epochs(cfg: TrainConfig, *, uses_image: bool = True) -> None:
    """Refuse a training plan with no epoch at all: the head of such a network keeps its random initial weights,
    and saving it as a bundle would give a "model" whose scores mean nothing."""
    if uses_image and cfg.stage1_epochs == 0 and cfg.stage2_epochs == 0:
        raise ConfigError("train.stage1_epochs and train.stage2_epochs are both 0: the network would never be "
                          "trained (its head keeps random weights), so it is not a model. Set at least one of them "
                          "above 0 (e.g. train.stage1_epochs=30).")
    if not uses_image and cfg.tabular_epochs < 1:
        raise ConfigError(f"train.tabular_epochs is {cfg.tabular_epochs}: the tabular-only network would never be "
                          "trained. Set it to 1 or more.")


def _save_checkpoint(path: Path, state: dict) -> None:
    if not dist_utils.is_main():
        return
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _save_weights(model: nn.Module, path: Path) -> None:
    if not dist_utils.is_main():
        return
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))


def load_weights(model: nn.Module, path: Path) -> None:
    model.load_state_dict(load_file(str(path)), strict=True)


def _freeze_batchnorm(module: nn.Module) -> None:
    """Put BatchNorm layers in eval mode (running statistics fixed); their affine weights still train."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _head_epoch(model, cached, train_ds, opt, criterion, batch_size: int, gen) -> list[float]:
    """One epoch of the layers above a frozen backbone, on cached backbone features."""
    n = cached["train"].shape[0]
    order = torch.randperm(n, generator=gen).to(cached["train"].device)
    tab = cached["train_tab"]
    missing_row = getattr(train_ds, "tabular_missing_row", None)
    p_drop = getattr(train_ds, "tabular_dropout", 0.0)
    losses = []
    for k in range(0, n, batch_size):
        idx = order[k:k + batch_size]
        t = tab[idx] if tab is not None else None
        if t is not None and p_drop > 0 and missing_row is not None:
            drop = torch.rand(len(idx), generator=gen) < p_drop
            if drop.any():
                t = t.clone()
                t[drop.to(t.device)] = torch.as_tensor(missing_row, dtype=t.dtype, device=t.device)
        opt.zero_grad(set_to_none=True)
        loss = criterion(model.forward_from_backbone(cached["train"][idx], t), cached["y"][idx])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def _head_probs(model, cached) -> np.ndarray:
    model.eval()
    logits = model.forward_from_backbone(cached["val"], cached["val_tab"])
    return model.probabilities(logits).double().cpu().numpy()


def train_model(model: nn.Module, train_ds, val_ds, cfg: TrainConfig, *, n_classes: int,
                train_labels: np.ndarray, ckpt_dir: str | Path, resume: bool = False, seed: int = 0,
                desc: str = "train", progress: bool = True) -> TrainResult:
    """Train ``model`` in place and leave the best-validation weights loaded."""
    from tqdm.auto import tqdm

    check_epochs(cfg, uses_image=model.uses_image)
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    distributed = dist_utils.init_distributed()
    device = devices.select_device()
    devices.configure_threads(cfg.threads)
    channels_last = cfg.channels_last and model.uses_image
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    weights = inverse_frequency_weights(train_labels, n_classes) if cfg.class_weights == "inverse_frequency" else None
    criterion = model.make_criterion(weights.to(device) if weights is not None else None,
                                     cfg.label_smoothing).to(device)
    ac = _Autocast(device, cfg.amp)
    plan = _stage_plan(model, cfg)
    patience = cfg.patience if model.uses_image else max(cfg.patience, 10)
    val_y = np.asarray(val_ds.labels)

    state = {"stage_index": 0, "epoch_in_stage": 0, "global_epoch": 0, "best_f1": -1.0, "best_loss": float("inf"),
             "stage1_best_loss": float("inf"), "stage1_bad": 0,
             "best_epoch": -1, "bad_epochs": 0, "history": [], "done": False}
    opt = sched = None
    last = ckpt_dir / "last.pt"
    best_path = ckpt_dir / "best.safetensors"
    stage1_path = ckpt_dir / "stage1_best.safetensors"
    ckpt = None
    if resume and last.exists():
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        state.update(ckpt["state"])
        log.info("%s: resuming at global epoch %d", desc, state["global_epoch"])
    t0 = time.perf_counter()
    while not state["done"] and state["stage_index"] < len(plan):
        stage, n_epochs = plan[state["stage_index"]]
        if model.uses_image:
            model.set_backbone_trainable(stage == 2, cfg.finetune_fraction)
        opt = _make_optimizer(model, stage, cfg)
        base_lrs = [g["lr"] for g in opt.param_groups]
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, n_epochs), eta_min=1e-6) if stage == 2 else None
        if ckpt is not None and ckpt.get("optimizer") is not None and ckpt["state"]["stage_index"] == state["stage_index"]:
            opt.load_state_dict(ckpt["optimizer"])
            if sched is not None and ckpt.get("scheduler") is not None:
                sched.load_state_dict(ckpt["scheduler"])
        ckpt = None
        cached = None
        if stage == 1 and model.uses_image and state["epoch_in_stage"] < n_epochs:
            bs = cfg.batch_size * 2
            cached = {
                "train": backbone_features(model, train_ds, batch_size=bs, device=device, channels_last=channels_last,
                                           amp=cfg.amp, progress=progress, desc=f"{desc} features"),
                "val": backbone_features(model, val_ds, batch_size=bs, device=device, channels_last=channels_last,
                                         amp=cfg.amp, progress=progress, desc=f"{desc} features"),
                "train_tab": _tabular_tensor(train_ds, device), "val_tab": _tabular_tensor(val_ds, device),
                "y": torch.as_tensor(np.asarray(train_ds.labels), device=device).long(),
            }
        while state["epoch_in_stage"] < n_epochs:
            epoch = state["global_epoch"]
            torch.manual_seed(seed * 1000 + epoch)
            if getattr(train_ds, "augment", None) is not None:
                train_ds.augment.rng = np.random.default_rng(seed * 1000 + epoch)
            train_ds.rng = np.random.default_rng(seed * 1000 + epoch + 7)
            model.train()
            if model.uses_image and (stage == 1 or cfg.freeze_bn):
                for m in model.backbone_modules():
                    _freeze_batchnorm(m)
            gen = torch.Generator().manual_seed(seed * 1000 + epoch)
            if cached is not None:
                losses = _head_epoch(model, cached, train_ds, opt, criterion, cfg.batch_size, gen)
                probs = _head_probs(model, cached)
            else:
                if distributed:
                    sampler = DistributedSampler(train_ds, shuffle=True, seed=seed * 1000 + epoch)
                    loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=0,
                                        drop_last=len(sampler) > cfg.batch_size)
                else:
                    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, num_workers=0, generator=gen,
                                        drop_last=len(train_ds) > cfg.batch_size)
                net = (nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
                       if distributed else model)
                losses = []
                bar = tqdm(loader, desc=f"{desc} s{stage} e{epoch + 1}", disable=not progress, leave=False)
                for step, batch in enumerate(bar):
                    if stage == 2 and model.uses_image and state["epoch_in_stage"] == 0:
                        # Linear warm-up over the first fine-tuning epoch: full learning rates on a backbone
                        # that has never seen these images disturb the features the heads were fitted on.
                        frac = (step + 1) / max(1, len(loader))
                        for group, base in zip(opt.param_groups, base_lrs):
                            group["lr"] = base * frac
                    image, tab, label, _ = _to_device(batch, device, channels_last)
                    opt.zero_grad(set_to_none=True)
                    with ac.ctx():
                        loss = criterion(_forward(net, image, tab), label)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"{desc}: loss became {loss.item()} at epoch {epoch + 1}; "
                                                 "lower the learning rate or check the inputs for extreme values.")
                    ac.scaler.scale(loss).backward()
                    ac.scaler.step(opt)
                    ac.scaler.update()
                    losses.append(float(loss.detach()))
                    bar.set_postfix(loss=f"{np.mean(losses):.3f}")
                if sched is not None:
                    sched.step()
                probs = predict_proba(model, val_ds, batch_size=cfg.batch_size * 2, device=device,
                                      channels_last=channels_last, amp=cfg.amp)
            pred = probs.argmax(1)
            val_f1 = float(f1_score(val_y, pred, average="macro", labels=list(range(n_classes)), zero_division=0))
            val_loss = float(nn.functional.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-8)).float(),
                                                    torch.from_numpy(val_y).long()))
            rec = {"epoch": epoch + 1, "stage": stage, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                   "val_loss": val_loss, "val_macro_f1": val_f1, "elapsed_s": round(time.perf_counter() - t0, 1)}
            state["history"].append(rec)
            if progress and (stage == 2 or state["epoch_in_stage"] + 1 == n_epochs):
                tqdm.write(f"{desc} stage {stage} epoch {epoch + 1}: train loss {rec['train_loss']:.3f}, "
                           f"val loss {val_loss:.3f}, val macro-F1 {val_f1:.3f}")
            improved = val_f1 > state["best_f1"] + 1e-6 or (abs(val_f1 - state["best_f1"]) <= 1e-6 and val_loss < state["best_loss"])
            if improved:
                state.update(best_f1=val_f1, best_loss=val_loss, best_epoch=epoch + 1, bad_epochs=0)
                _save_weights(model, best_path)
            elif stage == 2:
                state["bad_epochs"] += 1
            if stage == 1:
                # Stage 1 keeps the heads with the lowest validation loss: heads that have overfitted the
                # cached features are a poor start for fine-tuning.
                if val_loss < state["stage1_best_loss"] - 1e-6:
                    state.update(stage1_best_loss=val_loss, stage1_bad=0)
                    _save_weights(model, stage1_path)
                else:
                    state["stage1_bad"] += 1
            state["epoch_in_stage"] += 1
            state["global_epoch"] += 1
            if distributed:
                # every rank follows rank 0's bookkeeping (best epoch, patience counters, stop decisions)
                state = dist_utils.broadcast_object(state)
            if stage == 2 and state["bad_epochs"] >= patience:
                log.info("%s: early stop at epoch %d (best %d, val macro-F1 %.3f)", desc, epoch + 1,
                         state["best_epoch"], state["best_f1"])
                state["done"] = True
            if stage == 1 and state["stage1_bad"] >= patience:
                state["epoch_in_stage"] = n_epochs  # stage 1 ends early; fine-tuning starts from its best heads
            _save_checkpoint(last, {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched else None,
                                    "state": dict(state)})
            if state["done"]:
                break
        dist_utils.barrier()
        if stage == 1 and stage1_path.exists():
            load_weights(model, stage1_path)
        if not state["done"]:
            state["stage_index"] += 1
            state["epoch_in_stage"] = 0
            state["bad_epochs"] = 0
    dist_utils.barrier()  # rank 0 has written the best weights
    if best_path.exists():
        load_weights(model, best_path)
    model.set_backbone_trainable(True)
    return TrainResult(best_epoch=state["best_epoch"], best_val_macro_f1=state["best_f1"], history=state["history"],
                       seconds=time.perf_counter() - t0)
