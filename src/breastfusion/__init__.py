"""breastfusion: multimodal breast-cancer classifiers.

Ultrasound + clinical + biomarkers fusion, and histopathology grading. The CLI (``breastfusion``) is a thin layer
over this Python API::

    import breastfusion as bf

    cfg = bf.load_config("configs/busi.yaml", ["train.stage2_epochs=4"])
    result = bf.run_experiment(cfg, "runs/busi")            # report, metrics, bundle
    predictor = bf.Predictor.load(result.bundle)             # any bundle: ultrasound or histology
    table = predictor.predict("new_images/")                 # one row per case

``bf.tasks`` lists the tasks (``bf.tasks.names()``). Names are imported on first use, so ``import breastfusion``
stays light.
"""

from breastfusion.errors import BreastfusionError, BundleError, ConfigError, DataError
from breastfusion.utils import lazy_exports
from breastfusion.version import __version__

_LAZY = {
    "load_config": ("breastfusion.config", "load_config"),
    "Config": ("breastfusion.config", "Config"),
    "run_experiment": ("breastfusion.experiment", "run_experiment"),
    "RunResult": ("breastfusion.tasks.base", "RunResult"),
    "Predictor": ("breastfusion.inference.predictor", "Predictor"),
    "load_bundle": ("breastfusion.bundles.bundle", "load_bundle"),
    "explain_bundle": ("breastfusion.explain.runner", "explain_bundle"),
    "tasks": ("breastfusion.tasks", None),
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = ["__version__", "BreastfusionError", "BundleError", "ConfigError", "DataError", *_LAZY]
