"""The output directory, written atomically: all of it appears, or none of it does."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import UsageError


def check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse an existing non-empty OUT_DIR (or a file in its place) unless forced."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"output path {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UsageError(f"output directory {out_dir} is not empty (use --force to replace it)")


@contextlib.contextmanager
def staged_dir(out_dir: Path, force: bool) -> Iterator[Path]:
    """Yield a staging folder beside OUT_DIR; on success swap it in, on failure delete it."""
    check_out_dir(out_dir, force)
    created = [p for p in reversed(out_dir.absolute().parents) if not p.exists()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        yield stage
        _swap_in(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for parent in reversed(created):  # folders made for OUT_DIR go too, deepest first
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def _swap_in(stage: Path, out_dir: Path) -> None:
    os.chmod(stage, 0o755)
    if not out_dir.exists():
        os.replace(stage, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    os.rmdir(old)
    os.replace(out_dir, old)
    try:
        os.replace(stage, out_dir)
    except OSError:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
