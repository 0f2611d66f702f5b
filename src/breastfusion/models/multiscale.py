"""Multiscale histology grader: a CNN and a vision transformer per magnification, cross-scale attention,
pathomics fusion and a nominal or ordinal head.

Input: a *stack* of concentric tiles, ``(B, S, 3, H, W)`` in [0, 1], for S magnifications (highest first); each
backbone normalises its input as its weights expect. Every backbone
(shared across scales: a magnification is a view of the same tissue, not a different modality) turns each tile
into a small grid of tokens (``grid`` x ``grid``; CNN feature maps are average-pooled to it, ViT patch tokens
likewise, prefix tokens dropped). Tokens are projected to ``dim`` and tagged with learned scale, source
(backbone) and position embeddings.

Cross-scale attention: every token of scale *s* attends only to the tokens of the *other* scales (a block mask
forbids same-scale keys), so the 40x nuclei tokens are read in the light of the 10x architecture and vice versa.
The attention matrix is summarised per sample as an S x S table (row = querying scale, columns = how its
attention is shared over the other scales). After a feed-forward block each scale's tokens are averaged and a
gated attention pooling (Ilse et al., 2018) weighs the scales; those weights (B, S) are the second inspectable
output. The pooled vector is concatenated with the pathomics embedding (MLP, 64-d) and classified.

With one scale the block mask would leave nothing to attend to, so the layer becomes plain self-attention.

Objectives: ``ce`` (softmax over grades) or ``ordinal`` (CORAL-style cumulative logits, Cao et al. 2020, with
thresholds kept ordered by construction so the implied class probabilities are never negative).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from breastfusion.models.fusion import TabularEncoder

OBJECTIVES = ("ce", "ordinal")


def backbone_tokens(backbone: nn.Module, x: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, 3, H, W) → (N, grid*grid, C) tokens from a timm model's ``forward_features``."""
    f = backbone.forward_features(x)
    if f.dim() == 3:  # ViT-like: (N, prefix + tokens, C)
        f = f[:, getattr(backbone, "num_prefix_tokens", 0):]
        n, t, c = f.shape
        side = int(math.isqrt(t))
        if side * side != t:
            raise ValueError(f"cannot arrange {t} transformer tokens on a square grid")
        f = f.transpose(1, 2).reshape(n, c, side, side)
    elif f.dim() == 4 and getattr(backbone, "output_fmt", "NCHW") == "NHWC":
        f = f.permute(0, 3, 1, 2)
    f = adaptive_avg_pool(f.float(), grid)
    return f.flatten(2).transpose(1, 2)


def _pool_matrix(n: int, g: int, device, dtype) -> torch.Tensor:
    """(g, n) matrix averaging the bins of ``adaptive_avg_pool`` along one axis: bin i covers
    [floor(i*n/g), ceil((i+1)*n/g)), exactly as PyTorch's adaptive pooling."""
    m = torch.zeros(g, n, device=device, dtype=dtype)
    for i in range(g):
        a, b = (i * n) // g, -(-((i + 1) * n) // g)
        m[i, a:b] = 1.0 / (b - a)
    return m


def adaptive_avg_pool(f: torch.Tensor, grid: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(f, grid)`` written as two small matrix products.

    Same bins and values; unlike the ATen op it exports to ONNX for any grid and feature size (the
    feature map's height and width are fixed by the bundle's image size, so the matrices are constants)."""
    h, w = int(f.shape[-2]), int(f.shape[-1])
    if h == grid and w == grid:
        return f
    return torch.einsum("gh,nchw,kw->ncgk", _pool_matrix(h, grid, f.device, f.dtype), f,
                        _pool_matrix(w, grid, f.device, f.dtype))


class CrossScaleBlock(nn.Module):
    """Pre-norm attention (tokens attend to the other scales) + feed-forward, returning head-averaged weights."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * 2, dim))

    def forward(self, tokens: torch.Tensor, scale_of_token: torch.Tensor, n_scales: int):
        # n_scales is given, not read from scale_of_token: a data-dependent value would not export to ONNX
        mask = None
        if n_scales > 1:
            mask = scale_of_token[:, None] == scale_of_token[None, :]  # True = not allowed
        h = self.norm1(tokens)
        out, weights = self.attn(h, h, h, attn_mask=mask, need_weights=True, average_attn_weights=True)
        tokens = tokens + out
        tokens = tokens + self.ffn(self.norm2(tokens))
        return tokens, weights  # weights: (B, L, L)


class GatedAttentionPool(nn.Module):
    """Gated attention pooling over a set (Ilse et al., 2018): returns the pooled vector and the weights."""

    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.v = nn.Linear(dim, hidden)
        self.u = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor):  # (B, N, D)
        a = self.w(torch.tanh(self.v(x)) * torch.sigmoid(self.u(x))).squeeze(-1)
        a = torch.softmax(a, dim=1)
        return (a.unsqueeze(-1) * x).sum(1), a


class OrdinalHead(nn.Module):
    """Cumulative logits ``logit P(y > k) = g(x) + b_k`` with b_0 > b_1 > ... (ordered by construction)."""

    def __init__(self, in_features: int, n_classes: int):
        super().__init__()
        if n_classes < 2:
            raise ValueError("an ordinal head needs at least two classes")
        self.fc = nn.Linear(in_features, 1, bias=False)
        self.b0 = nn.Parameter(torch.zeros(1))
        self.deltas = nn.Parameter(torch.zeros(n_classes - 2))
        self.out_features = n_classes - 1
        self.n_classes = n_classes

    def biases(self) -> torch.Tensor:
        return torch.cat([self.b0, self.b0 - torch.cumsum(F.softplus(self.deltas) + 1e-3, 0)])

    def forward(self, x):
        return self.fc(x) + self.biases()


def ordinal_probabilities(cum_logits: torch.Tensor) -> torch.Tensor:
    """(B, K-1) cumulative logits → (B, K) class probabilities."""
    s = torch.sigmoid(cum_logits.float())
    ones = torch.ones_like(s[:, :1])
    zeros = torch.zeros_like(s[:, :1])
    upper = torch.cat([ones, s], 1)
    lower = torch.cat([s, zeros], 1)
    return (upper - lower).clamp_min(0)


class OrdinalLoss(nn.Module):
    """Binary cross-entropy over the K-1 cumulative tasks, each sample weighted by its class weight."""

    def __init__(self, n_classes: int, weight: torch.Tensor | None = None):
        super().__init__()
        self.n_classes = n_classes
        self.register_buffer("weight", weight if weight is not None else torch.ones(n_classes))

    def forward(self, cum_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k = torch.arange(self.n_classes - 1, device=target.device)
        t = (target[:, None] > k[None, :]).float()
        per = F.binary_cross_entropy_with_logits(cum_logits.float(), t, reduction="none").sum(1)
        w = self.weight[target]
        return (per * w).sum() / w.sum().clamp_min(1e-8)


class MultiScaleGrader(nn.Module):
    """See the module docstring. ``backbones`` maps a source name ('cnn', 'vit') to a timm model."""

    def __init__(self, n_classes: int, *, backbones: dict[str, nn.Module], n_scales: int, n_tabular: int = 0,
                 dim: int = 128, heads: int = 4, grid: int = 4, objective: str = "ce", dropout: float = 0.2,
                 tabular_hidden: int = 128, tabular_dim: int = 64, fusion_hidden: int = 128,
                 norms: dict[str, tuple[list[float], list[float]]] | None = None):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if not backbones:
            raise ValueError("MultiScaleGrader needs at least one backbone")
        if n_scales < 1:
            raise ValueError("MultiScaleGrader needs at least one scale")
        self.n_classes, self.n_scales, self.grid, self.objective = n_classes, n_scales, grid, objective
        self.sources = list(backbones)
        self.backbones = nn.ModuleDict(backbones)
        self.token_proj = nn.ModuleDict({k: nn.Sequential(nn.LayerNorm(b.num_features), nn.Linear(b.num_features, dim))
                                         for k, b in backbones.items()})
        t = grid * grid
        self.scale_embed = nn.Parameter(torch.randn(n_scales, dim) * 0.02)
        self.source_embed = nn.Parameter(torch.randn(len(backbones), dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(t, dim) * 0.02)
        self.cross = CrossScaleBlock(dim, heads, dropout)
        self.norm = nn.LayerNorm(dim)
        self.scale_pool = GatedAttentionPool(dim)
        self.tabular_encoder = TabularEncoder(n_tabular, tabular_hidden, tabular_dim, dropout=dropout) if n_tabular > 0 else None
        fused = dim + (tabular_dim if n_tabular > 0 else 0)
        last = OrdinalHead(fusion_hidden, n_classes) if objective == "ordinal" else nn.Linear(fusion_hidden, n_classes)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(fused, fusion_hidden), nn.GELU(), nn.Dropout(dropout), last)
        # token bookkeeping: scale index and source index of each token position, in the order built below
        scale_idx, source_idx = [], []
        for s in range(n_scales):
            for j in range(len(self.sources)):
                scale_idx += [s] * t
                source_idx += [j] * t
        self.register_buffer("scale_of_token", torch.tensor(scale_idx), persistent=False)
        self.register_buffer("source_of_token", torch.tensor(source_idx), persistent=False)
        self._feat_dims = [t * b.num_features for b in backbones.values()]
        # Each backbone gets its own input normalisation (images arrive in [0, 1]), as its weights expect.
        for k in self.sources:
            mean, std = (norms or {}).get(k, ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]))
            self.register_buffer(f"mean_{k}", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer(f"std_{k}", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    # ------------------------------------------------------------------ the trainer's model interface
    uses_image = True

    @property
    def uses_tabular(self) -> bool:
        return self.tabular_encoder is not None

    def backbone_modules(self) -> list[nn.Module]:
        return list(self.backbones.values())

    def backbone_parameters(self):
        return [p for b in self.backbones.values() for p in b.parameters()]

    def head_parameters(self):
        ids = {id(p) for p in self.backbone_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]

    def set_backbone_trainable(self, trainable: bool, fraction: float = 1.0) -> None:
        """As FusionClassifier: the last ``fraction`` of each backbone's parameter tensors train in stage 2."""
        for b in self.backbones.values():
            params = list(b.parameters())
            first = int(round(len(params) * (1.0 - fraction))) if trainable else len(params)
            for i, p in enumerate(params):
                p.requires_grad_(i >= first)

    def backbone_forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, S, 3, H, W) → flat per-item features (B, S * sum_b T*C_b); what stage 1 caches."""
        b, s = image.shape[:2]
        if s != self.n_scales:
            raise ValueError(f"expected {self.n_scales} magnification(s) per stack, got {s}")
        x = image.flatten(0, 1)
        parts = [backbone_tokens(m, (x - getattr(self, f"mean_{k}")) / getattr(self, f"std_{k}"), self.grid).reshape(b, s, -1)
                 for k, m in self.backbones.items()]
        return torch.cat(parts, dim=2).flatten(1)

    def _tokens_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        b = feats.shape[0]
        feats = feats.reshape(b, self.n_scales, -1)
        per_scale, start = [], 0
        chunks = []
        for dim_b, name in zip(self._feat_dims, self.sources):
            c = self.backbones[name].num_features
            chunks.append((feats[:, :, start:start + dim_b].reshape(b, self.n_scales, self.grid * self.grid, c), name))
            start += dim_b
        for s in range(self.n_scales):
            for j, (chunk, name) in enumerate(chunks):
                tok = self.token_proj[name](chunk[:, s])
                per_scale.append(tok + self.pos_embed + self.scale_embed[s] + self.source_embed[j])
        return torch.cat(per_scale, dim=1)

    def forward_from_backbone(self, feats: torch.Tensor, tabular: torch.Tensor | None = None,
                              return_attention: bool = False):
        tokens = self._tokens_from_features(feats)
        tokens, weights = self.cross(tokens, self.scale_of_token, self.n_scales)
        tokens = self.norm(tokens)
        # a scale's tokens are contiguous (see __init__): (B, S * n_sources * T, D) → (B, S, D)
        scale_vecs = tokens.reshape(tokens.shape[0], self.n_scales, -1, tokens.shape[-1]).mean(2)
        pooled, scale_w = self.scale_pool(scale_vecs)
        parts = [pooled]
        if self.tabular_encoder is not None:
            parts.append(self.tabular_encoder(tabular))
        out = self.head(torch.cat(parts, 1))
        if not return_attention:
            return out
        return out, {"cross_scale": self.scale_attention(weights), "scale_weights": scale_w}

    def scale_attention(self, weights: torch.Tensor) -> torch.Tensor:
        """(B, L, L) token attention → (B, S, S): mean over a scale's query tokens of the weight on each scale."""
        s_of = self.scale_of_token
        onehot = F.one_hot(s_of, self.n_scales).to(weights.dtype)  # (L, S)
        to_scale = weights @ onehot  # (B, L, S): attention mass of each query token on each key scale
        counts = onehot.sum(0).clamp_min(1)
        return (onehot.T @ to_scale) / counts[None, :, None]

    def forward(self, image: torch.Tensor | None = None, tabular: torch.Tensor | None = None,
                return_attention: bool = False):
        return self.forward_from_backbone(self.backbone_forward(image), tabular, return_attention=return_attention)

    # outputs → probabilities and the loss, so the shared trainer handles both objectives
    def probabilities(self, out: torch.Tensor) -> torch.Tensor:
        return ordinal_probabilities(out) if self.objective == "ordinal" else torch.softmax(out.float(), dim=1)

    def make_criterion(self, weight: torch.Tensor | None, label_smoothing: float) -> nn.Module:
        if self.objective == "ordinal":
            return OrdinalLoss(self.n_classes, weight)
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
