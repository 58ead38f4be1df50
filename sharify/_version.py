"""The package version (read by the recipe writer and :func:`sharify.load`'s version check)."""

__version__ = "0.1.0"
