"""Errors that map to the CLI's exit codes (2 usage, 3 model, 4 guardrail)."""

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
