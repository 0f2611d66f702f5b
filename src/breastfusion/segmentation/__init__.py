"""Lesion segmentation of breast ultrasound: train a U-Net on expert masks, predict masks in the cases-table layout,
cross-validate on the classifier's folds, and score masks against the expert's.

    from breastfusion.segmentation import (train_lesion_segmenter, load_lesion_segmenter, segment_cases,
                                           cross_validate_segmenter)

Modules: :mod:`.unet` (network, geometry, model file), :mod:`.train`, :mod:`.predict`, :mod:`.cv`, :mod:`.metrics`.
Names are imported on first use, so ``breastfusion.segmentation.metrics`` loads without the network libraries.
"""

from __future__ import annotations

from breastfusion.utils import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
