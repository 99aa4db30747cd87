"""Built-in passes. Importing this package registers them (the project's only import-for-registration)."""

from . import exit, pq, svd

__all__ = ["exit", "pq", "svd"]
