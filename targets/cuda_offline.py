"""Precompile cuda artifacts on a machine with no GPU: a child process against a stub libcuda.

TVM decides at load time whether its cuda runtime is usable (libcuda.so.1 must load), so the
stub must be on LD_LIBRARY_PATH before TVM is imported: hence a fresh Python process.
Child argv: MODEL.onnx OUT.so SPEC_NAME TARGET_JSON [TUNING_DB] (see `child_main`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import onnx

import rewriter
from rewriter.errors import ModelError, RewriterError, UsageError
from rewriter.targets.cuda_stub import find_nvcc, stub_dir
from rewriter.targets.presets import TargetSpec, one_line

ERROR_PREFIX = "rewriter-error:"
USAGE_PREFIX = "rewriter-usage-error:"
LOG_PREFIX = "rewriter-log:"
TUNING_PREFIX = "rewriter-tuning:"  # the child's tuning summary (JSON) for the report
EM_CUDA = 190  # ELF e_machine of a cubin
# The folder holding the `rewriter` package, for the child process (installed or in a checkout).
PACKAGE_ROOT = Path(rewriter.__file__).resolve().parent.parent
# `-c`, not `-m`: the package imports this module, so runpy would warn about running it twice;
# `-P` keeps the working directory off the child's path, so a stray module there cannot shadow ours.
CHILD_CODE = "import sys; from rewriter.targets.cuda_offline import child_main; sys.exit(child_main(sys.argv[1:]))"


def needs_child(spec: TargetSpec, tune_trials: int = 0) -> bool:
    """True for every cuda build except tuning on a present GPU: the artifact is built the same way with or
    without a GPU (nvcc against the stub driver, no NVRTC and its cuda-bindings); tuning must measure on the
    real device, in this process."""
    import tvm

    if (spec.tvm_target or {}).get("kind") != "cuda":
        return False
    return tune_trials == 0 or not tvm.cuda(0).exist


def compile_with_ptx(code: str) -> bytearray:
    """nvcc fatbin holding the target arch's machine code (SASS) and its PTX, uncompressed: a GPU newer than
    the arch (sm_90 for an sm_80 build) cannot run the SASS but its driver JIT-compiles the PTX."""
    from tvm.support import nvcc
    from tvm.target import Target

    target = Target.current(allow_none=True)
    arch = str(getattr(target, "arch", "") or "sm_80")
    suffix = arch.removeprefix("sm_")
    gencode = ["-gencode", f"arch=compute_{suffix},code=sm_{suffix}",
               "-gencode", f"arch=compute_{suffix},code=compute_{suffix}"]
    return nvcc.compile_cuda(code, target_format="fatbin", arch=gencode, options=["-Xfatbin=-compress=false"],
                             compiler="nvcc")


def use_ptx_compile() -> None:
    """Route TVM's CUDA compile callback through `compile_with_ptx` (replacing its NVRTC/nvcc choice)."""
    import tvm_ffi

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_with_ptx, override=True)


def build_in_child(model: onnx.ModelProto, spec: TargetSpec, out_path: Path, tuning_db: str | None,
                   log: Any = None) -> dict[str, Any] | None:
    """Lower, compile (nvcc -> cubin) and export `model` in a child process using the stub driver;
    returns the tuning summary when a tuning database was applied."""
    nvcc = find_nvcc()
    stubs = stub_dir()
    with tempfile.TemporaryDirectory(prefix="rewriter-cuda-") as tmp:
        model_path = os.path.join(tmp, "model.onnx")
        try:
            onnx.save_model(model, model_path)
        except (ValueError, OSError) as exc:
            raise ModelError(f"cannot hand the model to the cuda build process: {one_line(exc)}") from None
        args = [model_path, str(out_path), spec.name, json.dumps(spec.tvm_target)]
        cmd = [sys.executable, "-P", "-c", CHILD_CODE, *args, *([tuning_db] if tuning_db else [])]
        done = subprocess.run(cmd, env=_child_env(stubs, nvcc), capture_output=True, text=True, check=False)
    tuned = None
    for line in done.stdout.splitlines():
        if line.startswith(LOG_PREFIX) and log is not None:
            log(line[len(LOG_PREFIX):].strip())
        if line.startswith(TUNING_PREFIX):
            tuned = json.loads(line[len(TUNING_PREFIX):])
    if done.returncode != 0:
        raise _child_error(done.returncode, done.stderr)
    return tuned


def ptx_version(path: str | os.PathLike) -> str | None:
    """The PTX ISA version embedded (e.g. '9.0' from CUDA 13's nvcc): a driver must support at least that
    CUDA release to JIT it (PTX ISA 9.0: CUDA 13.0, driver R580 or newer)."""
    found = re.search(rb"\.version (\d+\.\d+)", Path(path).read_bytes())
    return found.group(1).decode() if found else None


def device_code(path: str | os.PathLike) -> str | None:
    """What device code an exported library embeds: 'cubin+ptx', 'cubin', 'ptx', 'cuda-source' or None."""
    data = Path(path).read_bytes()
    ptx = b".target sm_" in data
    start = data.find(b"\x7fELF", 1)  # offset 0 is the host library itself
    while start != -1:
        if int.from_bytes(data[start + 18:start + 20], "little") == EM_CUDA:
            return "cubin+ptx" if ptx else "cubin"
        start = data.find(b"\x7fELF", start + 1)
    if b"__global__" in data:
        return "cuda-source"
    return "ptx" if ptx else None


def _child_env(stubs: Path, nvcc: str) -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(stubs), env.get("LD_LIBRARY_PATH")]))
    env["PATH"] = os.pathsep.join(filter(None, [os.path.dirname(nvcc), env.get("PATH")]))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    env["TVM_CUDA_COMPILE_MODE"] = "nvcc"  # NVRTC would need cuda-bindings and a real driver
    return env


def _child_error(returncode: int, stderr: str) -> RewriterError:
    """The child's one-line error, or its last stderr line when it died without one."""
    for line in reversed(stderr.splitlines()):
        if line.startswith(USAGE_PREFIX):
            return UsageError(line[len(USAGE_PREFIX):].strip())
        if line.startswith(ERROR_PREFIX):
            return ModelError(line[len(ERROR_PREFIX):].strip())
    last = [line.strip() for line in stderr.splitlines() if line.strip()]
    return ModelError(f"the cuda build process failed (exit {returncode}): {last[-1] if last else 'no output'}")


def child_main(argv: list[str]) -> int:
    from rewriter.targets.lower import lower_and_export
    from rewriter.targets.presets import export_compiler

    model_path, out_path, name, target_json, *rest = argv
    spec = TargetSpec(name, json.loads(target_json), name)
    try:
        _check_cuda_runtime()
        use_ptx_compile()
        model = onnx.load_model(model_path)
        tuned = lower_and_export(model, spec, Path(out_path), 0, rest[0] if rest else None,
                                 lambda msg: print(LOG_PREFIX, msg, flush=True), export_compiler(spec))
        if tuned is not None:
            print(TUNING_PREFIX, json.dumps(tuned), flush=True)
    except UsageError as exc:
        print(USAGE_PREFIX, one_line(exc), file=sys.stderr)
        return 2
    except Exception as exc:  # any failure must reach the parent as one line
        print(ERROR_PREFIX, one_line(exc), file=sys.stderr)
        return 3
    return 0


def _check_cuda_runtime() -> None:
    """Without a loaded cuda runtime TVM silently falls back to CUDA C source: refuse that."""
    import tvm

    if not tvm.runtime.enabled("cuda"):
        raise ModelError("TVM's cuda runtime did not load against the CUDA driver stub: cannot precompile a cubin")
