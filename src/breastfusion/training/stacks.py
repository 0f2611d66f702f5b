"""Training on concentric tile stacks: the torch dataset, and fitting and scoring the multiscale grader.

Dataset: (S, 3, H, W) tensors in [0, 1], plus the case's tabular row. Tiles are decoded once, optionally
stain-normalised, resized to ``size`` and kept in memory as uint8 (:class:`TileCache`). Training augmentation
(:class:`StackAugment`) applies the *same* rotation/flip and the *same* HED stain jitter to every magnification
of a stack: the tiles are views of one piece of tissue on one slide, and augmenting them independently would
break the correspondence cross-scale attention relies on.

Grader: :func:`variant_spec` (a model variant's backbones, magnifications and use of pathomics),
:func:`build_backbones` and :func:`make_grader` build the network from the config, :func:`fit_grader` trains one
variant (:class:`FittedGrader`), :func:`score_stacks` gives per-stack probabilities and attention, and
:func:`pool_cases` pools them per case. The histology task (:mod:`breastfusion.tasks.histology`) runs them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from breastfusion.config import Config
from breastfusion.data.cases import CASE_ID, LABEL, PATIENT_ID
from breastfusion.data.images import read_image
from breastfusion.data.tiles import mag_column
from breastfusion.errors import ConfigError, DataError
from breastfusion.features.tabular import TabularPreprocessor
from breastfusion.training.data import tabular_item
from breastfusion.utils import seed_everything

log = logging.getLogger(__name__)


class TileCache:
    """path → uint8 RGB (size, size, 3), decoded once; ``normalizer`` (a fitted StainNormalizer) if given."""

    def __init__(self, size: int, normalizer=None):
        self.size = size
        self.normalizer = normalizer
        self._store: dict[str, np.ndarray] = {}

    def get(self, path: str) -> np.ndarray:
        arr = self._store.get(path)
        if arr is None:
            rgb = np.clip(read_image(path, mode="rgb") * 255.0 + 0.5, 0, 255).astype(np.uint8)
            if self.normalizer is not None:
                rgb = self.normalizer.transform(rgb)
            if rgb.shape[:2] != (self.size, self.size):
                rgb = np.asarray(Image.fromarray(rgb).resize((self.size, self.size), Image.Resampling.BILINEAR))
            arr = np.ascontiguousarray(rgb, dtype=np.uint8)
            self._store[path] = arr
        return arr

    def usable(self, stacks: list[list[str]]) -> np.ndarray:
        """Decode every tile; a stack with an unreadable tile is marked unusable and logged (never fatal here)."""
        ok = np.ones(len(stacks), dtype=bool)
        for i, paths in enumerate(stacks):
            for p in paths:
                try:
                    self.get(p)
                except DataError as exc:
                    log.warning("skipping a stack: %s", exc)
                    ok[i] = False
                    break
        return ok


class StackAugment:
    """Same random rot90/flip and the same HED stain jitter (Tellez et al.) for every tile of a stack."""

    def __init__(self, seed: int = 0, stain_sigma: float = 0.05):
        self.rng = np.random.default_rng(seed)
        self.stain_sigma = stain_sigma

    def __call__(self, tiles: list[np.ndarray]) -> list[np.ndarray]:
        from breastfusion.data.stain import StainAugment

        k = int(self.rng.integers(0, 4))
        flip = bool(self.rng.random() < 0.5)
        alpha = beta = None
        if self.stain_sigma > 0:
            alpha = self.rng.uniform(1 - self.stain_sigma, 1 + self.stain_sigma, size=3)
            beta = self.rng.uniform(-self.stain_sigma, self.stain_sigma, size=3)
        out = []
        for t in tiles:
            t = np.rot90(t, k)
            if flip:
                t = t[:, ::-1]
            t = np.ascontiguousarray(t)
            if alpha is not None:
                t = StainAugment.apply(t, alpha, beta)
            out.append(t)
        return out


class StackDataset(Dataset):
    """Returns (stack (S, 3, size, size) float in [0, 1], tabular vector, label index, row index)."""

    def __init__(self, stacks: list[list[str]], tabular: np.ndarray | None, labels: np.ndarray | None, *,
                 cache: TileCache, augment: StackAugment | None = None, tabular_dropout: float = 0.0,
                 tabular_missing_row: np.ndarray | None = None, seed: int = 0):
        self.stacks = stacks
        self.tabular = tabular
        self.labels = labels
        self.cache = cache
        self.augment = augment
        self.tabular_dropout = tabular_dropout
        self.tabular_missing_row = tabular_missing_row
        self.rng = np.random.default_rng(seed + 1)

    def __len__(self) -> int:
        return len(self.stacks)

    def __getitem__(self, i: int):
        tiles = [self.cache.get(p) for p in self.stacks[i]]
        if self.augment is not None:
            tiles = self.augment(tiles)
        # contiguous NCHW: a permuted (channels-last) view would give channels-last gradients, which DDP's
        # buckets do not expect (a warning and slower all-reduce)
        image = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
        return image, tabular_item(self, i), int(self.labels[i]) if self.labels is not None else -1, i


# -------------------------------------------------------------------------------------------------- grader
def variant_spec(variant: str, cfg: Config) -> tuple[dict[str, str], list[float], bool]:
    """(backbones, magnifications, uses pathomics) of a model variant."""
    hc = cfg.histology
    backbones = dict(hc.backbones)
    mags = [float(m) for m in hc.magnifications]
    if variant in ("cnn", "vit"):
        if variant not in backbones:
            raise ConfigError(f"variant '{variant}' needs histology.backbones to have a '{variant}' entry "
                              f"(has {sorted(backbones)}).")
        backbones = {variant: backbones[variant]}
    if variant == "single_scale":
        mags = [max(mags)]
    return backbones, mags, variant != "no_pathomics"


_WARNED: set[str] = set()


def build_backbones(backbones: dict[str, str], cfg: Config, size: int):
    """timm backbones with the configured weight policy; returns (modules, norms, weight sources)."""
    from breastfusion.models.pretrained import backbone_data_config, create_backbone

    mode = cfg.histology.pretrained
    modules, norms, sources = {}, {}, {}
    for key, name in backbones.items():
        kwargs = _backbone_kwargs(name, size)
        if mode == "none":
            m, ws = create_backbone(name, pretrained=False, **kwargs)
        else:
            try:
                m, ws = create_backbone(name, pretrained=True, **kwargs)
            except ConfigError as exc:
                if mode == "require":
                    raise
                if name not in _WARNED:
                    _WARNED.add(name)
                    log.warning("%s starts from RANDOM weights: no pretrained weights are reachable here (hub "
                                "offline or unreachable, no offline package). histology.pretrained: require makes "
                                "this an error.", name)
                    log.debug("weight resolution for %s: %s", name, exc)
                m, ws = create_backbone(name, pretrained=False, quiet=True, **kwargs)
        d = backbone_data_config(m)
        modules[key], norms[key], sources[key] = m, (d["mean"], d["std"]), f"{name}: {ws.kind}"
    return modules, norms, sources


def _backbone_kwargs(name: str, size: int) -> dict:
    """Transformers are built for the tile size (timm resamples position embeddings of pretrained weights)."""
    base = name.split(".")[0]
    return {"img_size": size} if base.startswith(("vit_", "deit_", "deit3_", "eva", "beit")) else {}


def grader_meta(cfg: Config, backbones: dict[str, str], magnifications: list[float], n_tabular: int, norms: dict,
                size: int) -> dict:
    """The multiscale network's settings, as a bundle stores them (``meta["model"]``): the one spelling that
    builds the network at training (:func:`make_grader`) and rebuilds it from a bundle
    (:mod:`breastfusion.models.registry`)."""
    hc, m = cfg.histology, cfg.model
    return {"kind": "multiscale", "backbones": backbones,
            "backbone_kwargs": {k: _backbone_kwargs(n, size) for k, n in backbones.items()},
            "magnifications": magnifications, "token_grid": hc.token_grid, "attention_dim": hc.attention_dim,
            "attention_heads": hc.attention_heads, "objective": hc.objective, "n_tabular": n_tabular,
            "tabular_dim": m.tabular_dim, "tabular_hidden": m.tabular_hidden, "fusion_hidden": m.fusion_hidden,
            "dropout": m.dropout, "norms": {k: [list(map(float, mean)), list(map(float, std))]
                                            for k, (mean, std) in norms.items()}}


def make_grader(classes: list, backbones: dict[str, str], modules: dict, norms: dict, magnifications: list[float],
                n_tabular: int, cfg: Config, size: int):
    """The multiscale grader around the pretrained backbone ``modules``, built from :func:`grader_meta`."""
    from breastfusion.models.registry import build_network

    meta = grader_meta(cfg, backbones, magnifications, n_tabular, norms, size)
    return build_network({"classes": list(classes), "model": meta}, modules=modules)


@dataclass
class FittedGrader:
    variant: str
    model: torch.nn.Module
    tabular: TabularPreprocessor | None
    magnifications: list[float]
    backbones: dict[str, str]
    weight_sources: dict[str, str]
    result: object


def _stack_paths(stacks: pd.DataFrame, mags: list[float]) -> list[list[str]]:
    cols = [mag_column(m) for m in mags]
    return stacks[cols].to_numpy().tolist()


def _tab_rows(pre: TabularPreprocessor | None, table: pd.DataFrame | None, case_ids) -> np.ndarray | None:
    if pre is None:
        return None
    rows = table.reindex([str(c) for c in case_ids])
    return pre.transform(rows, row_ids=rows.index.tolist(), source="case features")


def fit_grader(variant: str, cases: pd.DataFrame, stacks: pd.DataFrame, table: pd.DataFrame | None,
               classes: list[str], cfg: Config, out_dir: Path, *, resume: bool, progress: bool, cache,
               desc: str, seed: int | None = None) -> FittedGrader:
    """Train one variant on ``cases`` (early stopping on an inner patient-grouped validation split). ``seed``
    (default ``cfg.seed``; callers pass ``stable_seed(cfg.seed, model, fold)``) drives the initial weights, the
    inner split, augmentation and batch order, so a fold repeats itself whatever ran before it (resume)."""
    from breastfusion.training.fit import inner_validation_split
    from breastfusion.training.trainer import check_epochs, train_model

    seed = cfg.seed if seed is None else int(seed)
    check_epochs(cfg.train)
    backbones, mags, use_path = variant_spec(variant, cfg)
    cases = cases.reset_index(drop=True)
    y_case = cases[LABEL].map({c: i for i, c in enumerate(classes)}).to_numpy().astype(int)
    val = inner_validation_split(y_case, cases[PATIENT_ID].to_numpy(), cfg.train.val_fraction, seed)
    cols = [] if table is None else [c for c in table.columns if use_path or not str(c).startswith("path_")]
    pre = None
    if cols:
        pre = TabularPreprocessor.for_config(cfg.data)
        pre.fit(table.reindex(cases.loc[~val, CASE_ID].astype(str).tolist())[cols], cols, vocabulary=table[cols])
    label_of = dict(zip(cases[CASE_ID], y_case))

    def part(mask):
        ids = set(cases.loc[mask, CASE_ID])
        st = stacks[stacks[CASE_ID].isin(ids)].reset_index(drop=True)
        return st, st[CASE_ID].map(label_of).to_numpy().astype(int)

    st_tr, y_tr = part(~val)
    st_va, y_va = part(val)
    if len(st_tr) == 0 or len(st_va) == 0:
        raise DataError(f"{desc}: no usable stacks for training or validation.")
    size = cache.size
    seed_everything(seed)  # randomly initialised weights come from the global generators
    modules, norms, sources = build_backbones(backbones, cfg, size)
    model = make_grader(classes, backbones, modules, norms, mags, pre.n_features_out_ if pre else 0, cfg, size)
    missing = pre.transform(pd.DataFrame(index=[0]))[0] if pre is not None else None
    train_ds = StackDataset(_stack_paths(st_tr, mags), _tab_rows(pre, table, st_tr[CASE_ID]), y_tr, cache=cache,
                            augment=StackAugment(seed, 0.05 if cfg.histology.stain_augment else 0.0)
                            if cfg.train.augment else None,
                            tabular_dropout=cfg.model.tabular_dropout if pre is not None else 0.0,
                            tabular_missing_row=missing, seed=seed)
    val_ds = StackDataset(_stack_paths(st_va, mags), _tab_rows(pre, table, st_va[CASE_ID]), y_va, cache=cache)
    tcfg = cfg.train.model_copy(update={"channels_last": False})
    result = train_model(model, train_ds, val_ds, tcfg, n_classes=len(classes), train_labels=y_tr, ckpt_dir=out_dir,
                         resume=resume, seed=seed, desc=desc, progress=progress)
    return FittedGrader(variant, model, pre, mags, backbones, sources, result)


@torch.no_grad()
def score_stacks(fitted: FittedGrader, stacks: pd.DataFrame, table: pd.DataFrame | None, cache,
                 batch_size: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-stack probabilities (n, K), cross-scale attention (n, S, S) and scale weights (n, S)."""
    from torch.utils.data import DataLoader

    model = fitted.model
    model.eval()
    device = next(model.parameters()).device
    ds = StackDataset(_stack_paths(stacks, fitted.magnifications), _tab_rows(fitted.tabular, table, stacks[CASE_ID]),
                      None, cache=cache)
    probs, cross, scale_w = [], [], []
    for image, tab, _, _ in DataLoader(ds, batch_size=batch_size, shuffle=False):
        out, att = model(image.to(device), tab.to(device) if model.uses_tabular else None, return_attention=True)
        probs.append(model.probabilities(out).double().cpu().numpy())
        cross.append(att["cross_scale"].float().cpu().numpy())
        scale_w.append(att["scale_weights"].float().cpu().numpy())
    return np.concatenate(probs), np.concatenate(cross), np.concatenate(scale_w)


def pool_cases(stacks: pd.DataFrame, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Mean of stack probabilities per case (why the mean: see :mod:`breastfusion.tasks.histology`)."""
    df = pd.DataFrame(probs, columns=[f"prob_{c}" for c in classes])
    df[CASE_ID] = stacks[CASE_ID].to_numpy()
    return df.groupby(CASE_ID, sort=False).mean()
