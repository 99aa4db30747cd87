"""rewriter: a graph-rewriting model compiler for ONNX models."""

from .api import RewriteResult, rewrite
from .calib import Calibration, load_calibration
from .errors import GuardrailError, ModelError, RewriterError, UsageError
from .pass_api import Pass, PassContext, PassResult
from .registry import available_passes, register_pass

__all__ = [
    "Calibration",
    "GuardrailError",
    "ModelError",
    "Pass",
    "PassContext",
    "PassResult",
    "RewriteResult",
    "RewriterError",
    "UsageError",
    "available_passes",
    "load_calibration",
    "register_pass",
    "rewrite",
]
__version__ = "0.1.0"
