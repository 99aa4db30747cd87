"""Errors that map to the CLI's exit codes (2 usage, 3 model, 4 guardrail, 128 + signal when stopped)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


class RewriterError(Exception):
    """Base error: carries the process exit code and a one-line message."""

    exit_code = 1


class UsageError(RewriterError):
    """Bad arguments: unknown pass or target, malformed option, calibration that does not fit."""

    exit_code = 2


class ModelError(RewriterError):
    """The model cannot be read, is invalid, or uses something we do not support."""

    exit_code = 3


class GuardrailError(RewriterError):
    """A pass pushed the fidelity drop over --max-drop."""

    exit_code = 4


class Terminated(BaseException):
    """SIGTERM or SIGINT: raised where the process is, so that every cleanup (staging folder, made parents)
    runs. A BaseException, so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_STOP_REQUESTED: list[int] = []
_DEFERRED: list[bool] = []


def request_stop(signum: int) -> None:
    """Remember a termination signal: raised in a TVM or onnxruntime call it may come back wrapped (or be
    swallowed by a fallback), so the output is refused by `check_stop` before anything is swapped in.
    Inside `stop_deferred` it is only remembered."""
    _STOP_REQUESTED.append(signum)
    if not _DEFERRED:
        raise Terminated(signum)


def stop_requested() -> bool:
    return bool(_STOP_REQUESTED)


def stop_signal() -> int:
    """The first termination signal received (call only when `stop_requested`)."""
    return _STOP_REQUESTED[0]


def check_stop() -> None:
    if _STOP_REQUESTED:
        raise Terminated(stop_signal())


@contextlib.contextmanager
def stop_deferred() -> Iterator[None]:
    """Steps that must not be cut half-way (making the stage, swapping it in): a signal that arrives meanwhile
    is raised by the next `check_stop`. Signal handlers run in the main thread only, so a flag is enough,
    where a signal mask would not be (another thread would take the signal)."""
    _DEFERRED.append(True)
    try:
        yield
    finally:
        _DEFERRED.pop()
