"""Passes registered by name; the core finds them here, never by importing them."""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from .errors import UsageError
from .pass_api import Pass
from .progress import log

_passes: dict[str, type] = {}
# The package holding the built-in passes; it registers them when imported.
BUILTIN_PACKAGE = "rewriter.passes"
# Third-party packages register passes by naming a module under this entry-point group.
ENTRY_POINT_GROUP = "rewriter.passes"
_loaded = False


def register_pass(name: str):
    """Class decorator: `@register_pass("svd")`."""

    def decorate(cls: type) -> type:
        if name in _passes and _passes[name] is not cls:
            raise ValueError(f"pass {name!r} is registered twice")
        cls.name = name
        _passes[name] = cls
        return cls

    return decorate


def _load_builtin() -> None:
    """Import the built-in passes and every installed plugin once, whatever was registered before."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module(BUILTIN_PACKAGE)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as exc:  # a broken plugin must not take the built-in passes down with it
            log(f"warning: pass plugin {entry.name!r} ({entry.value}) failed to load: {exc}")


def available_passes() -> list[str]:
    _load_builtin()
    return sorted(_passes)


def get_pass(name: str) -> type:
    _load_builtin()
    if name not in _passes:
        raise UsageError(f"unknown pass {name!r}; available: {', '.join(sorted(_passes))}")
    return _passes[name]


def pass_options(name: str) -> dict[str, Any]:
    """The pass's options and their defaults, read from its __init__ signature."""
    params = inspect.signature(get_pass(name).__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self" and p.kind == p.KEYWORD_ONLY}


def _typed(pass_name: str, key: str, value: Any, default: Any) -> Any:
    """A value given typed (TOML, Python) must already have the option's type: true is not 1.0."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float) or default is None:
        ok = value is None or (number and math.isfinite(value))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        expected = "a number" if default is None else type(default).__name__
        raise UsageError(f"option {pass_name}.{key} must be {expected}, got {value!r}")
    return value


def _coerce(pass_name: str, key: str, value: Any, default: Any) -> Any:
    if isinstance(default, str):
        if not isinstance(value, str):
            raise UsageError(f"option {pass_name}.{key} must be a string, got {value!r}")
        return value
    if not isinstance(value, str):
        return _typed(pass_name, key, value, default)
    text = value.strip()
    try:
        if isinstance(default, bool):
            if text.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(text)
            return text.lower() in {"true", "1", "yes"}
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float) or default is None:
            number = float(text) if text.lower() not in {"none", ""} else None
            if number is not None and not math.isfinite(number):
                raise ValueError(text)
            return number
    except ValueError:
        raise UsageError(f"option {pass_name}.{key}={value!r} is not a valid {type(default).__name__}") from None
    return value


def resolve_options(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every option of the pass: its defaults, overridden by `options` checked and coerced to their types."""
    known = pass_options(name)
    resolved = dict(known)
    for key, value in (options or {}).items():
        if key not in known:
            raise UsageError(f"unknown option {name}.{key}; {name} takes: {', '.join(sorted(known)) or 'none'}")
        resolved[key] = _coerce(name, key, value, known[key])
    return resolved


def make_pass(name: str, options: Mapping[str, Any] | None = None) -> Pass:
    """Instantiate a pass with string or typed options checked against its signature."""
    try:
        return get_pass(name)(**resolve_options(name, options))
    except ValueError as exc:
        raise UsageError(f"bad options for pass {name!r}: {exc}") from exc


def retry_settings(name: str, given: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    """The pass's gentler settings (pass_api.Gentle) that leave every option the user set as it was."""
    return tuple(dict(s) for s in getattr(get_pass(name), "gentler", ()) if not set(s) & set(given))
