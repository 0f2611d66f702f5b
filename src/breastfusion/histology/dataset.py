"""Torch dataset over concentric tile stacks: (S, 3, H, W) tensors in [0, 1], plus the case's tabular row.

Tiles are decoded once, optionally stain-normalised, resized to ``size`` and kept in memory as uint8
(:class:`TileCache`). Training augmentation (:class:`StackAugment`) applies the *same* rotation/flip and the
*same* HED stain jitter to every magnification of a stack: the tiles are views of one piece of tissue on one
slide, and augmenting them independently would break the correspondence cross-scale attention relies on.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from breastfusion.data.images import read_image
from breastfusion.errors import DataError
from breastfusion.training.data import tabular_item

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
        from breastfusion.histology.stain import StainAugment

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
