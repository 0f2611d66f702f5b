"""The toolkit's version (kept in step with pyproject.toml); recorded in every bundle, report and model file."""

__version__ = "0.1.0"
