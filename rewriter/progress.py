"""Progress on stderr: one-line step messages and bars for loops over samples."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


@contextlib.contextmanager
def muted() -> Iterator[None]:
    """Silence nested steps (e.g. many trial runs of a pass) while an outer bar already shown keeps going."""
    global _quiet
    before, _quiet = _quiet, True
    try:
        yield
    finally:
        _quiet = before


def log(message: str) -> None:
    if not _quiet:
        print(f"rewrite: {message}", file=sys.stderr, flush=True)


def progress(items: Iterable[T], total: int | None = None, desc: str | None = None) -> Iterator[T]:
    """A tqdm bar on stderr when a description is given and output is not silenced."""
    if _quiet or desc is None:
        yield from items
        return
    yield from tqdm(items, total=total, desc=f"rewrite: {desc}", file=sys.stderr, leave=False, mininterval=0.5)
