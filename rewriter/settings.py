"""Every setting of a run checked for type and range before any work, with one message naming it.

The CLI, its TOML config and the Python API all arrive here, so `force = "no"` in a config, `seed=-1` or
`passes="svd"` from Python are caught the same way (exit 2) instead of meaning something else later.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import UsageError


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(name: str, value: Any, low: float, high: float | None = None, integer: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    if not _is_number(value) or (integer and not isinstance(value, int)):
        raise UsageError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"between {low} and {high}"
        raise UsageError(f"{name} must be {span}, got {value!r}")


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be true or false, got {value!r}")


def _path_like(name: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, str | Path) or not str(value):
        raise UsageError(f"{name} must be a path, got {value!r}")


def pass_names(passes: Any) -> list[str]:
    """A list of pass names; a string is read the CLI's way, as comma-separated names."""
    if isinstance(passes, str):
        return [p.strip() for p in passes.split(",") if p.strip()]
    if not isinstance(passes, Sequence) or not all(isinstance(p, str) and p for p in passes):
        raise UsageError(f"passes must be a list of pass names, got {passes!r}")
    return list(passes)


def check_options(options: Any) -> dict[str, dict[str, Any]]:
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not all(isinstance(v, Mapping) for v in options.values()):
        raise UsageError(f"options must map pass names to {{option: value}}, got {options!r}")
    return {str(k): dict(v) for k, v in options.items()}


def check_input_shapes(shapes: Any) -> dict[str, list[int]] | None:
    if shapes is None:
        return None
    if not isinstance(shapes, Mapping):
        raise UsageError(f"input_shapes must map input names to shapes, got {shapes!r}")
    for name, shape in shapes.items():
        if isinstance(shape, str) or not isinstance(shape, Sequence) or not shape or not all(
                isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise UsageError(f"input_shapes[{name!r}] must be a list of positive integers, got {shape!r}")
    return {k: list(v) for k, v in shapes.items()}


def check_run_settings(
    *, target: Any, calib: Any, out_dir: Any, max_drop: Any, seed: Any, holdout: Any, force: Any,
    tune_trials: Any, tuning_db: Any, bench: Any,
) -> None:
    """Types and ranges of the scalar settings (the structured ones have their own checks)."""
    if not isinstance(target, str) or not target:
        raise UsageError(f"target must be a name or a TVM target JSON string, got {target!r}")
    if calib is not None and not isinstance(calib, str | Path | Mapping) and type(calib).__name__ != "Calibration":
        raise UsageError(f"calib must be a .npz path, 'synthetic' or a mapping of arrays, got {type(calib).__name__}")
    _path_like("out_dir", out_dir)
    _path_like("tuning_db", tuning_db)
    if max_drop is not None:
        _number("max_drop", max_drop, 0.0, 1.0)
    _number("seed", seed, 0, 2**32 - 1, integer=True)
    _number("holdout", holdout, 0.0, 1.0)
    if not 0.0 < holdout < 1.0:
        raise UsageError(f"holdout must be between 0 and 1 (exclusive), got {holdout!r}")
    _number("tune_trials", tune_trials, 0, integer=True)
    _boolean("force", force)
    _boolean("bench", bench)


def check_target_options(options: Any) -> dict[str, str]:
    """--target-opt KEY=VALUE pairs for the presets (mcpu, mattr, num-cores, arch)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise UsageError(f"target_options must map option names to values, got {options!r}")
    return {k: str(v) for k, v in options.items()}


def check_remote(rpc: Any, device_key: Any, bench: bool, tune_trials: int, out_dir: Any) -> None:
    """--rpc and --device-key go together; --bench times the built artifact on the remote device and
    --tune-trials measures the tuning candidates there, and both need an artifact (--out)."""
    if rpc is None and device_key is None:
        return
    if not isinstance(rpc, str) or not isinstance(device_key, str) or not rpc or not device_key:
        raise UsageError("--rpc HOST:PORT and --device-key KEY are given together")
    if not (bench or tune_trials) or out_dir is None:
        raise UsageError("--rpc is used by --bench (time the built artifact on a remote device) and by --tune-trials "
                         "(measure the tuning candidates there) when an artifact is built: add --bench or "
                         "--tune-trials, and --out")
