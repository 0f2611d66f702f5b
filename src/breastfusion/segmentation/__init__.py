"""Lesion segmentation of breast ultrasound: train a U-Net on expert masks, predict masks in the cases-table layout,
cross-validate on the classifier's folds, and score masks against the expert's.

    from breastfusion.segmentation import (train_lesion_segmenter, load_lesion_segmenter, segment_cases,
                                           cross_validate_segmenter)

Modules: :mod:`.unet` (network, geometry, model file), :mod:`.train`, :mod:`.predict`, :mod:`.cv`, :mod:`.metrics`.
Names are imported on first use, so ``breastfusion.segmentation.metrics`` loads without the network libraries.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LesionSegmenter": "unet",
    "SegmentationResult": "unet",
    "load_lesion_segmenter": "unet",
    "train_lesion_segmenter": "train",
    "SEGMENTATION_COLUMNS": "predict",
    "segment_cases": "predict",
    "cross_validate_segmenter": "cv",
    "segmentation_scores": "metrics",
    "summarise_scores": "metrics",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
