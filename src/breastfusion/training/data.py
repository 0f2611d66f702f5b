"""Torch datasets over a cases table: images (resized, cached in memory) and encoded tabular rows."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from breastfusion.data.images import read_image


def load_resized(path: str, side: int) -> np.ndarray:
    """Read an image as grey and resize it to side x side (uint8). Raises DataError naming the file."""
    gray = read_image(path, mode="gray")
    img = Image.fromarray(np.clip(gray * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return np.array(img.resize((side, side), Image.Resampling.BICUBIC), dtype=np.uint8)


class ImageCache:
    """Decoded, resized grey images kept in memory (624 BUSI images at 256 px: ~40 MB)."""

    def __init__(self, side: int):
        self.side = side
        self._store: dict[str, np.ndarray] = {}

    def get(self, path: str) -> np.ndarray:
        arr = self._store.get(path)
        if arr is None:
            arr = load_resized(path, self.side)
            self._store[path] = arr
        return arr


class UltrasoundAugment:
    """Augmentation that suits B-mode ultrasound.

    Random resized crop (lesions stay mostly in view), horizontal flip (left/right is arbitrary; depth is
    not, so no vertical flip), small rotation (probe tilt), gain/contrast/gamma jitter (machine settings)
    and multiplicative speckle-like noise.
    """

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.rng = np.random.default_rng(seed)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:  # (1, H, W) float in [0, 1]
        import torchvision.transforms.v2.functional as F

        r = self.rng
        _, h, w = img.shape
        scale = r.uniform(0.75, 1.0)
        ratio = math.exp(r.uniform(math.log(0.85), math.log(1.18)))
        ch = int(min(h, round(h * math.sqrt(scale / ratio))))
        cw = int(min(w, round(w * math.sqrt(scale * ratio))))
        top = int(r.integers(0, h - ch + 1))
        left = int(r.integers(0, w - cw + 1))
        img = F.resized_crop(img, top, left, ch, cw, [self.size, self.size], antialias=True)
        if r.random() < 0.5:
            img = torch.flip(img, dims=[2])
        if r.random() < 0.5:
            img = F.rotate(img, float(r.uniform(-10, 10)))
        gain = r.uniform(0.8, 1.2)
        contrast = r.uniform(0.8, 1.2)
        gamma = math.exp(r.uniform(-0.25, 0.25))
        mean = img.mean()
        img = ((img - mean) * contrast + mean) * gain
        img = img.clamp(0, 1) ** gamma
        if r.random() < 0.3:
            noise = torch.from_numpy(r.gamma(8.0, 1 / 8.0, size=img.shape).astype(np.float32))
            img = (img * noise).clamp(0, 1)
        return img


class CasesDataset(Dataset):
    """Returns (image (3, S, S) normalised, tabular vector, label index, row index)."""

    def __init__(self, image_paths: list[str] | None, tabular: np.ndarray | None, labels: np.ndarray | None,
                 *, size: int, mean, std, cache: ImageCache | None = None, augment: UltrasoundAugment | None = None,
                 tabular_dropout: float = 0.0, tabular_missing_row: np.ndarray | None = None, seed: int = 0):
        self.image_paths = image_paths
        self.tabular = tabular
        self.labels = labels
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.cache = cache or ImageCache(int(round(size * 1.15)))
        self.augment = augment
        self.tabular_dropout = tabular_dropout
        self.tabular_missing_row = tabular_missing_row
        self.rng = np.random.default_rng(seed + 1)
        n = len(image_paths) if image_paths is not None else len(tabular)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def image_tensor(self, i: int) -> torch.Tensor:
        arr = self.cache.get(self.image_paths[i])
        img = torch.from_numpy(arr).float().div_(255.0).unsqueeze(0)
        if self.augment is not None:
            img = self.augment(img)
        else:
            import torchvision.transforms.v2.functional as F

            img = F.resize(img, [self.size, self.size], antialias=True)
        return (img.expand(3, -1, -1) - self.mean) / self.std

    def __getitem__(self, i: int):
        image = self.image_tensor(i) if self.image_paths is not None else torch.zeros(0)
        return image, tabular_item(self, i), int(self.labels[i]) if self.labels is not None else -1, i


def tabular_item(ds, i: int) -> torch.Tensor:
    """Row ``i`` of a dataset's encoded tabular matrix as a tensor (empty when there is none). In training,
    with probability ``ds.tabular_dropout`` the row is replaced by the "all missing" row, so the model learns
    to score cases whose tabular part is absent."""
    if ds.tabular is None:
        return torch.zeros(0)
    tab = ds.tabular[i]
    if ds.tabular_dropout > 0 and ds.tabular_missing_row is not None and ds.rng.random() < ds.tabular_dropout:
        tab = ds.tabular_missing_row
    return torch.from_numpy(np.asarray(tab, dtype=np.float32))
