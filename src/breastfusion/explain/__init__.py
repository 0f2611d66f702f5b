"""Explanations for trained bundles, without retraining.

* :mod:`~breastfusion.explain.gradcam`: Grad-CAM / Grad-CAM++ of the image branch (and one map per
  magnification for the multiscale histology grader), occlusion sensitivity, overlays and figures.
* :mod:`~breastfusion.explain.tabular`: Shapley values of the tabular branch per input column (one-hot blocks
  grouped back to their column), with the image embedding fixed to the case's own; summary chart.
* :mod:`~breastfusion.explain.modality`: how far each modality moved a fusion prediction.
* :mod:`~breastfusion.explain.runner`: all of it for a bundle and an input (``breastfusion explain``).
"""

from breastfusion.explain.gradcam import (
    CamResult,
    MultiScaleCam,
    cam_maps,
    find_target_layer,
    gradcam,
    multiscale_gradcam,
    normalize_map,
    occlusion,
    overlay,
    plot_image_explanation,
    plot_stack_explanation,
)
from breastfusion.explain.modality import (
    grey_in_model_space,
    modality_contributions,
    neutral_image_like,
)
from breastfusion.explain.tabular import (
    ShapleyResult,
    decode_values,
    explain_tabular,
    feature_groups,
    missing_row,
    plot_shap_summary,
    shap_available,
    shapley_values,
    tabular_function,
    top_features,
)


def explain_bundle(*args, **kwargs):
    """See :func:`breastfusion.explain.runner.explain_bundle`."""
    from breastfusion.explain.runner import explain_bundle as run

    return run(*args, **kwargs)


__all__ = [
    "CamResult", "MultiScaleCam", "ShapleyResult", "cam_maps", "decode_values", "explain_bundle", "explain_tabular",
    "feature_groups", "find_target_layer", "gradcam", "grey_in_model_space", "missing_row", "modality_contributions",
    "multiscale_gradcam", "neutral_image_like", "normalize_map", "occlusion", "overlay", "plot_image_explanation",
    "plot_shap_summary", "plot_stack_explanation", "shap_available", "shapley_values", "tabular_function",
    "top_features",
]
