"""Project exceptions. All derive from ValueError so callers can catch the usual type."""


class BreastfusionError(ValueError):
    """Base class of every error raised on purpose by breastfusion."""


class DataError(BreastfusionError):
    """Bad input data: a file, a row or a column that cannot be used. The message names it."""


class ConfigError(BreastfusionError):
    """An invalid configuration value. The message names the key and what was expected."""


class BundleError(BreastfusionError):
    """A model bundle that is missing, incomplete or incompatible."""
