"""Torch datasets over a cases table: images (resized, cached in memory) and encoded tabular rows.

Images are read as the models read them (:func:`load_resized`): grey, optionally cleaned first (``image.clean``:
cropped to the ultrasound field of view, burnt-in marks painted over, see :mod:`breastfusion.data.cleaning`), then
resized. :func:`breastfusion.data.cleaning.load_for_scoring` is the same function on the prediction path.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from breastfusion.data.images import read_image


def load_resized(path: str, side: int, clean: str = "none") -> np.ndarray:
    """Read an image as grey, clean it (``clean``: ``none``, ``fov`` or ``fov_marks``, see
    :mod:`breastfusion.data.cleaning`; cleaning crops to the field of view) and resize it to side x side (uint8,
    bicubic). Raises DataError naming the file."""
    if clean not in (None, "none"):
        from breastfusion.data.cleaning import load_cleaned

        return load_cleaned(path, side, clean)
    gray = read_image(path, mode="gray")
    img = Image.fromarray(np.clip(gray * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return np.array(img.resize((side, side), Image.Resampling.BICUBIC), dtype=np.uint8)


class ImageCache:
    """Decoded, cleaned (``clean``), resized grey images kept in memory (624 BUSI images at 256 px: ~40 MB).
    Entries are keyed by (path, cleaning mode, side): an image cleaned one way is never served for another."""

    def __init__(self, side: int, clean: str = "none"):
        from breastfusion.data.cleaning import check_mode

        self.side = side
        self.clean = check_mode(clean)
        self._store: dict[tuple[str, str, int], np.ndarray] = {}

    def get(self, path: str) -> np.ndarray:
        key = (str(path), self.clean, self.side)
        arr = self._store.get(key)
        if arr is None:
            arr = load_resized(path, self.side, self.clean)
            self._store[key] = arr
        return arr


def image_cache_for(cfg) -> ImageCache:
    """The image cache a run uses: side ``image.cache_size`` (default size x 1.15), cleaning ``image.clean``."""
    return ImageCache(cfg.image.cache_size or int(round(cfg.image.size * 1.15)), cfg.image.clean)


def augment_for(cfg, seed: int, uses_image: bool = True) -> UltrasoundAugment | None:
    """The training augmentation a config asks for (``train.augment``, ``train.scanner_augment``), or None."""
    if not (cfg.train.augment and uses_image):
        return None
    return UltrasoundAugment(cfg.image.size, seed, scanner=cfg.train.scanner_augment)


class UltrasoundAugment:
    """Augmentation that suits B-mode ultrasound.

    Random resized crop (lesions stay mostly in view), horizontal flip (left/right is arbitrary; depth is
    not, so no vertical flip), small rotation (probe tilt), gain/contrast/gamma jitter (machine settings)
    and multiplicative speckle-like noise.

    With ``scanner`` (``train.scanner_augment``), differences between scanners and their settings too, each with
    its own probability: **depth** (p 0.3: a bottom band of 0-25 % of the height is dropped and the rest stretched
    back, as if the depth setting were shallower), **resolution** (p 0.5: down-sampled by a factor 0.4-1 and
    up-sampled back, a coarser probe or a smaller export) and a **time-gain-compensation ramp** (p 0.5: a smooth
    vertical gain profile, log-gain drawn in [-0.4, 0.4] at 4 depths and interpolated, as if the TGC sliders were
    set otherwise). Every draw comes from the generator seeded with ``seed``, so a seed gives the same sequence;
    with ``scanner=False`` the sequence is the one without these steps.
    """

    def __init__(self, size: int, seed: int = 0, *, scanner: bool = True):
        self.size = size
        self.scanner = bool(scanner)
        self.rng = np.random.default_rng(seed)

    def _scanner(self, img: torch.Tensor) -> torch.Tensor:
        import torchvision.transforms.v2.functional as F

        r = self.rng
        _, h, w = img.shape
        if r.random() < 0.3:  # depth: a shallower setting shows less of the bottom, stretched over the screen
            keep = h - int(round(h * r.uniform(0.0, 0.25)))
            img = F.resize(img[:, :max(keep, 8)], [h, w], antialias=True)
        if r.random() < 0.5:  # resolution
            f = r.uniform(0.4, 1.0)
            small = [max(8, int(round(h * f))), max(8, int(round(w * f)))]
            img = F.resize(F.resize(img, small, antialias=True), [h, w], antialias=True)
        if r.random() < 0.5:  # time-gain compensation: gain varies smoothly with depth
            knots = r.uniform(-0.4, 0.4, size=4)
            ramp = np.exp(np.interp(np.linspace(0.0, 1.0, h), np.linspace(0.0, 1.0, 4), knots)).astype(np.float32)
            img = (img * torch.from_numpy(ramp).view(1, h, 1)).clamp(0, 1)
        return img

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
        if self.scanner:
            img = self._scanner(img)
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
                 tabular_dropout: float = 0.0, tabular_missing_row: np.ndarray | None = None, seed: int = 0,
                 clean: str | None = None):
        self.image_paths = image_paths
        self.tabular = tabular
        self.labels = labels
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        if cache is not None and clean is not None and cache.clean != clean:
            raise ValueError(f"CasesDataset: the image cache cleans images with '{cache.clean}' but the dataset "
                             f"was asked for '{clean}'.")
        self.cache = cache or ImageCache(int(round(size * 1.15)), clean or "none")
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
