"""Built-in passes. Importing this package registers them (the project's only import-for-registration)."""

from . import binary, exit, pq, svd

__all__ = ["binary", "exit", "pq", "svd"]
