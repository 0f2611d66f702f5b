"""Late-fusion classifier: image encoder → 256-d, tabular MLP → 64-d, concatenation, classifier head.

``variant`` selects the ablations: ``fusion`` (both branches), ``image`` (image only) and ``tabular``
(tabular only, no backbone). Fusion sees embeddings, not modalities.
"""

from __future__ import annotations

import torch
from torch import nn

VARIANTS = ("fusion", "image", "tabular")


class ImageEncoder(nn.Module):
    """A timm backbone (pooled features) projected to ``out_dim``."""

    def __init__(self, backbone: nn.Module, out_dim: int = 256, dropout: float = 0.2):
        super().__init__()
        self.backbone = backbone
        self.proj = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(backbone.num_features, out_dim), nn.LayerNorm(out_dim), nn.GELU()
        )
        self.out_dim = out_dim

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(image))


class TabularEncoder(nn.Module):
    """MLP for the encoded clinical / biomarker / radiomics vector."""

    def __init__(self, n_features: int, hidden: int = 128, out_dim: int = 64, dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_features, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, out_dim), nn.LayerNorm(out_dim), nn.GELU(),
        )
        self.out_dim = out_dim

    def forward(self, tabular: torch.Tensor) -> torch.Tensor:
        return self.net(tabular)


class FusionClassifier(nn.Module):
    def __init__(
        self,
        n_classes: int,
        *,
        variant: str = "fusion",
        backbone: nn.Module | None = None,
        n_tabular: int = 0,
        image_dim: int = 256,
        tabular_dim: int = 64,
        tabular_hidden: int = 128,
        fusion_hidden: int = 128,
        dropout: float = 0.3,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"The 'variant' parameter of FusionClassifier must be one of {VARIANTS}. Got {variant!r} instead.")
        self.variant = variant
        self.n_classes = n_classes
        self.image_encoder = None
        self.tabular_encoder = None
        dim = 0
        if variant in ("fusion", "image"):
            if backbone is None:
                raise ValueError(f"variant '{variant}' needs an image backbone")
            self.image_encoder = ImageEncoder(backbone, image_dim, dropout=dropout * 0.5)
            dim += image_dim
        if variant in ("fusion", "tabular"):
            if n_tabular <= 0:
                raise ValueError(f"variant '{variant}' needs tabular features, but there are none")
            self.tabular_encoder = TabularEncoder(n_tabular, tabular_hidden, tabular_dim, dropout=dropout * 0.5)
            dim += tabular_dim
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, fusion_hidden), nn.GELU(),
                                  nn.Dropout(dropout), nn.Linear(fusion_hidden, n_classes))

    @property
    def uses_image(self) -> bool:
        return self.image_encoder is not None

    @property
    def uses_tabular(self) -> bool:
        return self.tabular_encoder is not None

    def embed(self, image: torch.Tensor | None = None, tabular: torch.Tensor | None = None) -> torch.Tensor:
        parts = []
        if self.image_encoder is not None:
            parts.append(self.image_encoder(image))
        if self.tabular_encoder is not None:
            parts.append(self.tabular_encoder(tabular))
        return torch.cat(parts, dim=1)

    def forward(self, image: torch.Tensor | None = None, tabular: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.embed(image, tabular))

    def forward_from_backbone(self, backbone_features: torch.Tensor | None, tabular: torch.Tensor | None) -> torch.Tensor:
        """The network above the backbone, given pooled backbone features (used with a frozen backbone)."""
        parts = []
        if self.image_encoder is not None:
            parts.append(self.image_encoder.proj(backbone_features))
        if self.tabular_encoder is not None:
            parts.append(self.tabular_encoder(tabular))
        return self.head(torch.cat(parts, dim=1))

    # ------------------------------------------------ the shared trainer's model interface (see MultiScaleGrader)
    def backbone_modules(self) -> list[nn.Module]:
        return [self.image_encoder.backbone] if self.image_encoder is not None else []

    def backbone_forward(self, image: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (what stage 1 caches)."""
        return self.image_encoder.backbone(image)

    def probabilities(self, out: torch.Tensor) -> torch.Tensor:
        return torch.softmax(out.float(), dim=1)

    def make_criterion(self, weight: torch.Tensor | None, label_smoothing: float) -> nn.Module:
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)

    def backbone_parameters(self):
        return list(self.image_encoder.backbone.parameters()) if self.image_encoder is not None else []

    def head_parameters(self):
        ids = {id(p) for p in self.backbone_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]

    def set_backbone_trainable(self, trainable: bool, fraction: float = 1.0) -> None:
        """Freeze or unfreeze the backbone; with ``fraction`` < 1 only the last part of its parameter tensors
        (in network order, so the layers nearest the output) train. Gradients then stop at the first trainable
        layer, which makes fine-tuning on a CPU several times cheaper."""
        params = self.backbone_parameters()
        first = int(round(len(params) * (1.0 - fraction))) if trainable else len(params)
        for i, p in enumerate(params):
            p.requires_grad_(i >= first)
