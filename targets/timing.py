"""Timing a built artifact on this machine, when its code runs here (x86 or a host llvm target)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from rewriter.errors import ModelError
from rewriter.targets.presets import TargetSpec


def runs_here(spec: TargetSpec) -> bool:
    return spec.tvm_target is not None and not spec.is_gpu and not spec.is_aarch64


def artifact_latency_ms(
    path: str | os.PathLike, spec: TargetSpec, inputs: list[np.ndarray], threads: int | None = None
) -> float | None:
    """Median latency of the artifact's `main` in the Relax VM (inputs in ONNX input order), or None
    when the artifact is for another machine (arm, cuda).

    With `threads`, the timing runs in a fresh process started with TVM_NUM_THREADS=threads: TVM sizes its
    thread pool once per process, so that is the only way to time it with as many threads as onnxruntime."""
    if not runs_here(spec):
        return None
    if threads is not None:
        return artifact_timing(path, inputs, threads)["ms"]
    import tvm
    from tvm import relax

    device = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), device)
    args = [tvm.runtime.tensor(x, device) for x in inputs]
    timer = vm.time_evaluator("main", device, number=20, repeat=5, min_repeat_ms=100)
    return float(timer(*args).median * 1e3)


CHILD = ("import sys, numpy as np; from rewriter.targets.timing import artifact_latency_ms; "
         "from rewriter.targets.presets import resolve_target; "
         "data = np.load(sys.argv[2]); inputs = [data[f'a{i}'] for i in range(len(data.files))]; "
         "import tvm; print(artifact_latency_ms(sys.argv[1], resolve_target('x86'), inputs), "
         "tvm.runtime.num_threads())")


def artifact_timing(path: str | os.PathLike, inputs: list[np.ndarray], threads: int) -> dict:
    """{"ms": median latency, "threads": TVM's thread count} measured in a process started with
    TVM_NUM_THREADS=threads (the artifact must run on this machine)."""
    with tempfile.TemporaryDirectory() as tmp:
        feed = Path(tmp) / "inputs.npz"
        np.savez(feed, **{f"a{i}": x for i, x in enumerate(inputs)})
        env = dict(os.environ, TVM_NUM_THREADS=str(threads))
        done = subprocess.run([sys.executable, "-P", "-c", CHILD, str(path), str(feed)], env=env,
                              capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelError(f"timing the artifact failed: {last}")
    ms, used = done.stdout.strip().splitlines()[-1].split()
    return {"ms": float(ms), "threads": int(used)}
