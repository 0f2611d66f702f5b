"""breastfusion: multimodal breast-cancer classifiers.

Ultrasound + clinical + biomarkers fusion, and histopathology grading. The CLI
(``breastfusion``) is a thin layer over the Python API exposed here.
"""

__version__ = "0.1.0"

from breastfusion.errors import BreastfusionError, DataError, ConfigError  # noqa: E402

__all__ = ["__version__", "BreastfusionError", "DataError", "ConfigError"]
