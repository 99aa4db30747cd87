"""Target presets: map a `--target` spec to a TVM target dict and the toolchain that links it.

TVM is imported lazily inside functions so that `import targets` stays cheap.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rewriter.errors import UsageError

PRESET_NAMES = ("none", "x86", "arm", "cuda")
SUPPORTED_KINDS = ("llvm", "cuda")
ARM_CROSS_CC = "aarch64-linux-gnu-gcc"
ARM_CROSS_PACKAGE = "gcc-aarch64-linux-gnu"
ARM_TARGET = {
    "kind": "llvm",
    "mtriple": "aarch64-linux-gnu",
    "mcpu": "cortex-a72",
    "mattr": ["+neon"],
}
# The host part of the cuda target is generic x86-64 so the artifact runs on any GPU machine.
CUDA_TARGET = {"kind": "cuda", "arch": "sm_80", "host": {"kind": "llvm"}}


@dataclass(frozen=True)
class TargetSpec:
    """A resolved `--target`: its name, the JSON-able TVM target dict and the artifact suffix."""

    name: str
    tvm_target: dict[str, Any] | None
    artifact_suffix: str | None

    @property
    def is_gpu(self) -> bool:
        return self.tvm_target is not None and self.tvm_target.get("kind") != "llvm"

    @property
    def is_aarch64(self) -> bool:
        """True when the host code is cross-compiled for aarch64 (arm, or a custom llvm aarch64 triple)."""
        target = self.tvm_target or {}
        return target.get("kind") == "llvm" and str(target.get("mtriple", "")).startswith("aarch64")


def resolve_target(spec: str) -> TargetSpec:
    """Resolve 'none', 'x86', 'arm', 'cuda' or a TVM target JSON string; UsageError otherwise."""
    text = spec.strip()
    if text == "none":
        return TargetSpec("none", None, None)
    if text == "x86":
        return TargetSpec("x86", _checked(x86_target()), "x86")
    if text == "arm":
        return TargetSpec("arm", _checked(dict(ARM_TARGET)), "arm")
    if text == "cuda":
        return TargetSpec("cuda", _checked(json.loads(json.dumps(CUDA_TARGET))), "cuda")
    if text.startswith("{"):
        return TargetSpec("custom", _checked(_parse_json(text)), "custom")
    raise UsageError(
        f"unknown target {spec!r}: use one of {', '.join(PRESET_NAMES)} or a TVM target JSON object"
    )


def x86_target() -> dict[str, Any]:
    """The host CPU as LLVM names it ("native" is silently ignored by TVM 0.27, so ask LLVM)."""
    from tvm.target import codegen

    return {
        "kind": "llvm",
        "mcpu": str(codegen.llvm_get_system_cpu()),
        "num-cores": os.cpu_count() or 1,
    }


def make_tvm_target(spec: TargetSpec) -> Any:
    """Build the `tvm.target.Target`; a GPU target without a host gets a generic llvm host."""
    import tvm

    if spec.tvm_target is None:
        raise UsageError("target 'none' has no TVM target")
    config = dict(spec.tvm_target)
    if config.get("kind") != "llvm" and "host" not in config:
        config["host"] = {"kind": "llvm"}
    if config.get("kind") == "llvm" and not spec.is_aarch64:
        # MetaSchedule refuses an llvm target without it; one target serves tuning and compiling alike.
        config.setdefault("num-cores", os.cpu_count() or 1)
    return tvm.target.Target(config)


def describe(spec: TargetSpec) -> str:
    """One-line human description, e.g. 'x86 (llvm -mcpu=rocketlake -num-cores=2)'."""
    if spec.tvm_target is None:
        return spec.name
    target = spec.tvm_target
    opts = " ".join(f"-{key}={_flat(value)}" for key, value in target.items() if key != "kind")
    return f"{spec.name} ({' '.join(filter(None, [str(target.get('kind')), opts]))})"


def export_compiler(spec: TargetSpec) -> Callable[..., Any] | None:
    """The `fcompile` for `export_library`: a cross compiler for aarch64, else the host default.

    Raises UsageError naming the Debian package when the toolchain is missing.
    """
    from tvm.support import cc

    if spec.is_aarch64:
        if shutil.which(ARM_CROSS_CC) is None:
            raise UsageError(
                f"{ARM_CROSS_CC} not found: install the Debian package {ARM_CROSS_PACKAGE} "
                f"(apt-get install {ARM_CROSS_PACKAGE}) to link aarch64 artifacts"
            )
        return cc.cross_compiler(ARM_CROSS_CC)
    if cc.get_cc() is None:
        raise UsageError("no host C/C++ compiler found to link the artifact: install the Debian package g++")
    return None


def _parse_json(text: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"target is not valid JSON: {exc.msg} at char {exc.pos}") from None
    if not isinstance(config, dict) or "kind" not in config:
        raise UsageError('target JSON must be an object with a "kind", e.g. {"kind":"llvm","mcpu":"znver3"}')
    if config["kind"] not in SUPPORTED_KINDS:
        raise UsageError(
            f"target kind {config['kind']!r} is not supported: use one of {', '.join(SUPPORTED_KINDS)}"
        )
    return config


def _checked(config: dict[str, Any]) -> dict[str, Any]:
    """Let TVM validate the dict now, so a bad target fails before any pass runs."""
    import tvm

    try:
        tvm.target.Target(config)
    except Exception as exc:  # TVM raises ValueError/TVMError with multi-line text
        raise UsageError(f"TVM rejects target {json.dumps(config)}: {one_line(exc)}") from None
    return config


def _flat(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's text (TVM errors span many lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
