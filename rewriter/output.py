"""The output directory, written atomically: all of it appears, or none of it does."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import UsageError, check_stop, stop_deferred
from .progress import log


def check_out_dir(out_dir: Path, force: bool, protected: Sequence[Path] = ()) -> None:
    """Refuse an OUT_DIR that holds the input (even with --force), one that cannot be made, or an existing
    non-empty one unless forced."""
    target = out_dir.resolve()
    for path in protected:
        if path.resolve().is_relative_to(target):
            raise UsageError(f"output directory {out_dir} holds the input {path}; choose another -o")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"output path {out_dir} exists and is not a directory")
    existing = next(p for p in [target, *target.parents] if p.exists())
    if not existing.is_dir():
        raise UsageError(f"output directory {out_dir} cannot be made: {existing} is a file")
    if not os.access(existing if existing != target else target.parent, os.W_OK):
        raise UsageError(f"output directory {out_dir} cannot be written: {existing} is read-only")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UsageError(f"output directory {out_dir} is not empty (use --force to replace it)")


@contextlib.contextmanager
def staged_dir(out_dir: Path, force: bool) -> Iterator[Path]:
    """Yield a staging folder beside OUT_DIR; on success swap it in, on failure delete it."""
    check_out_dir(out_dir, force)
    created = [p for p in reversed(out_dir.absolute().parents) if not p.exists()]
    stage: Path | None = None
    try:
        with stop_deferred():  # a signal between mkdir and knowing the stage's name would leave them behind
            try:
                out_dir.parent.mkdir(parents=True, exist_ok=True)
                stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
            except OSError as exc:
                raise UsageError(f"output directory {out_dir} cannot be made: {exc.strerror or exc}") from exc
        check_stop()
        yield stage
        check_stop()  # a signal swallowed on the way (a build fallback) still writes nothing
        _swap_in(stage, out_dir, force)
    except BaseException:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        for parent in reversed(created):  # folders made for OUT_DIR go too, deepest first
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def _swap_in(stage: Path, out_dir: Path, force: bool) -> None:
    """Move the stage into place, holding a lock on the parent so two runs cannot both claim OUT_DIR."""
    os.chmod(stage, 0o755)
    parent = os.open(out_dir.parent, os.O_RDONLY)
    try:
        with stop_deferred():  # never stop half-way through a --force swap; once swapped in, the run is done
            fcntl.flock(parent, fcntl.LOCK_EX)
            _swap_locked(stage, out_dir, force)
    finally:
        os.close(parent)  # closing releases the lock


def _swap_locked(stage: Path, out_dir: Path, force: bool) -> None:
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        os.replace(stage, out_dir)  # absent or empty: rename replaces it atomically
        return
    if not force:  # another run wrote it since we checked
        raise UsageError(f"output directory {out_dir} was filled by another run meanwhile; nothing written")
    replaced = sum(1 for _ in out_dir.rglob("*"))
    log(f"--force: replacing {out_dir} and the {replaced} file(s) and folder(s) it held")
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    os.rmdir(old)
    os.replace(out_dir, old)
    try:
        os.replace(stage, out_dir)
    except OSError:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
