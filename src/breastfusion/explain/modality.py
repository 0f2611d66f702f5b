"""Modality contribution: how far each input modality moved a fusion model's prediction.

For one case (an image, or a multiscale case's stacks) the probability of the explained class (default:
the predicted one) is computed

* with both inputs (``p_both``),
* with the image replaced by a neutral input: a flat grey image (``p_without_image``),
* with the tabular part replaced by the preprocessor's "missing" row (``p_without_tabular``) — the input the
  models were trained to see under tabular dropout, so this is an input they know, not an out-of-range one,
* with both replaced (``p_without_both``),

and ``delta_image = p_both - p_without_image``, ``delta_tabular = p_both - p_without_tabular``: positive where
the modality pushed the prediction *towards* the class. Deltas of a modality the model does not use are NaN.

The grey is given in the model's input space: for a FusionClassifier (normalised input) use
:func:`grey_in_model_space` with the bundle's mean and std (the grey level is the mean of the normalisation
means, so it sits at about 0 after normalisation); a multiscale stack is in [0, 1] and its default grey is 0.5.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def grey_in_model_space(mean, std, level: float | None = None) -> torch.Tensor:
    """A grey level (default: the mean of ``mean``) as the per-channel value a normalised input holds: (3,)."""
    mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
    std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
    g = float(mean.mean()) if level is None else float(level)
    return (g - mean) / std


def neutral_image_like(image: torch.Tensor, fill=None) -> torch.Tensor:
    """A flat image shaped like ``image`` (channel axis third from the end), filled per channel with ``fill``."""
    fill = 0.0 if fill is None else fill
    f = torch.as_tensor(fill, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
    return torch.zeros_like(image) + f


@torch.no_grad()
def modality_contributions(model: nn.Module, image: torch.Tensor | None, tabular, *, missing_row=None,
                           fill=None, target_class: int | None = None) -> dict:
    """Probabilities with and without each modality and their deltas (see the module docstring).

    ``image``: a FusionClassifier input ``(3, H, W)`` / ``(1, 3, H, W)``, or a multiscale case's stacks
    ``(S, 3, H, W)`` / ``(n_stacks, S, 3, H, W)`` whose probabilities are averaged. ``tabular``: the case's
    encoded row. ``missing_row``: the encoded row of a case without tabular data (required when the model
    uses tabular inputs). ``fill``: the grey in model-input space (default 0 for a FusionClassifier, 0.5
    for a multiscale grader)."""
    multi = hasattr(model, "n_scales")
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    uses_img, uses_tab = bool(getattr(model, "uses_image", False)), bool(getattr(model, "uses_tabular", False))
    x = None
    n = 1
    if uses_img:
        if image is None:
            raise ValueError("this model uses an image; pass the case's image")
        x = image.detach().to(dev).float()
        while x.dim() < (5 if multi else 4):
            x = x[None]
        n = x.shape[0]
    t = m = None
    if uses_tab:
        if tabular is None or missing_row is None:
            raise ValueError("this model uses tabular inputs; pass the case's row and the missing row")
        t = torch.as_tensor(np.asarray(tabular, dtype=np.float32), device=dev).reshape(1, -1).expand(n, -1)
        m = torch.as_tensor(np.asarray(missing_row, dtype=np.float32), device=dev).reshape(1, -1).expand(n, -1)
    grey = neutral_image_like(x, 0.5 if (fill is None and multi) else fill) if x is not None else None
    probs_of = model.probabilities if hasattr(model, "probabilities") else (lambda o: torch.softmax(o.float(), 1))

    def p(img, tab):
        return probs_of(model(img, tab)).double().mean(0).cpu().numpy()

    try:
        both = p(x, t)
        target = int(both.argmax()) if target_class is None else int(target_class)
        no_img = p(grey, t) if uses_img else None
        no_tab = p(x, m) if uses_tab else None
        neither = p(grey, m) if uses_img and uses_tab else None
    finally:
        model.train(was_training)

    def at(v):
        return float(v[target]) if v is not None else float("nan")

    out = {"target": target, "p_both": at(both), "p_without_image": at(no_img), "p_without_tabular": at(no_tab),
           "p_without_both": at(neither)}
    out["delta_image"] = out["p_both"] - out["p_without_image"]
    out["delta_tabular"] = out["p_both"] - out["p_without_tabular"]
    out["probs"] = both
    return out
