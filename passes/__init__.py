"""Built-in passes. Importing this package registers them (the project's only import-for-registration)."""

from . import exit, svd

__all__ = ["exit", "svd"]
