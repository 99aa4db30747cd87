"""Built-in passes. Importing this package registers them (the project's only import-for-registration)."""

from . import binary, distill, exit, pq, prune, svd

__all__ = ["binary", "distill", "exit", "pq", "prune", "svd"]
