"""The package version, in a leaf module: every module may read it without importing the API."""

__version__ = "0.1.0"  # keep equal to pyproject.toml's
