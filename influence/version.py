"""The library's version (recorded in every feature store manifest)."""

__version__ = "0.1.0"
