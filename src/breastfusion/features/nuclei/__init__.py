"""Nuclei: weight-free instance segmentation of H&E tiles, annotation I/O and segmentation metrics.

    from breastfusion.features.nuclei import segment_nuclei, aggregated_jaccard_index
    labels = segment_nuclei(rgb_uint8, mpp=0.25)        # int32, 0 = background
"""

from breastfusion.features.nuclei.annotations import (
    polygons_to_instances,
    read_imagescope_xml,
    read_instance_mask,
    write_instance_mask,
)
from breastfusion.features.nuclei.classical import (
    DEFAULT_PARAMS,
    NucleiParams,
    haematoxylin_od,
    segment_nuclei,
)
from breastfusion.features.nuclei.metrics import (
    aggregated_jaccard_index,
    detection_f1,
    dice,
    instance_scores,
    panoptic_quality,
)

__all__ = [
    "DEFAULT_PARAMS",
    "NucleiParams",
    "aggregated_jaccard_index",
    "detection_f1",
    "dice",
    "haematoxylin_od",
    "instance_scores",
    "panoptic_quality",
    "polygons_to_instances",
    "read_imagescope_xml",
    "read_instance_mask",
    "segment_nuclei",
    "write_instance_mask",
]
