"""Lowering rewritten ONNX models through Apache TVM (x86, arm, cuda or a custom TVM target).

TVM is imported lazily inside the functions, so importing this package is cheap.
"""

from rewriter.targets.lower import build_artifact
from rewriter.targets.presets import TargetSpec, resolve_target
from rewriter.targets.remote import remote_timing
from rewriter.targets.timing import artifact_latency_ms, artifact_timing, runs_here
from rewriter.targets.tuning import check_db_path

__all__ = ["TargetSpec", "artifact_latency_ms", "artifact_timing", "build_artifact", "check_db_path",
           "remote_timing", "resolve_target", "runs_here"]
