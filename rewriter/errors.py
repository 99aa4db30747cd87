"""Errors that map to the CLI's exit codes (2 usage, 3 model, 4 guardrail, 143 terminated)."""

from __future__ import annotations


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
    """SIGTERM: raised where the process is, so that every cleanup (staging folder, made parents) runs."""


_STOP_REQUESTED: list[int] = []


def request_stop(signum: int) -> None:
    """Remember a termination signal: raised in a TVM or onnxruntime call it may come back wrapped (or be
    swallowed by a fallback), so the output is refused by `check_stop` before anything is swapped in."""
    _STOP_REQUESTED.append(signum)
    raise Terminated()


def stop_requested() -> bool:
    return bool(_STOP_REQUESTED)


def check_stop() -> None:
    if _STOP_REQUESTED:
        raise Terminated()
