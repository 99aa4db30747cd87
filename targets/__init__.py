"""Lowering rewritten ONNX models through Apache TVM (x86, arm, cuda or a custom TVM target).

TVM is imported lazily inside the functions, so importing this package is cheap.
"""

from targets.lower import build_artifact
from targets.presets import TargetSpec, resolve_target

__all__ = ["TargetSpec", "build_artifact", "resolve_target"]
