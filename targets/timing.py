"""Timing a built artifact on this machine, when its code runs here (x86 or a host llvm target)."""

from __future__ import annotations

import os

import numpy as np

from rewriter.targets.presets import TargetSpec


def runs_here(spec: TargetSpec) -> bool:
    return spec.tvm_target is not None and not spec.is_gpu and not spec.is_aarch64


def artifact_latency_ms(path: str | os.PathLike, spec: TargetSpec, inputs: list[np.ndarray]) -> float | None:
    """Median latency of the artifact's `main` in the Relax VM (inputs in ONNX input order), or None
    when the artifact is for another machine (arm, cuda)."""
    if not runs_here(spec):
        return None
    import tvm
    from tvm import relax

    device = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), device)
    args = [tvm.runtime.tensor(x, device) for x in inputs]
    timer = vm.time_evaluator("main", device, number=20, repeat=5, min_repeat_ms=100)
    return float(timer(*args).median * 1e3)
