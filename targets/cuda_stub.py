"""A stub CUDA driver (libcuda.so.1) so TVM can precompile cubins on a machine with no GPU.

`libtvm_runtime_cuda.so` links against libcuda.so.1. Without it TVM's cuda runtime does not
load and codegen keeps only CUDA C source, compiled at load time. With these stubs the
runtime loads, so codegen calls nvcc at build time and embeds a cubin.
The stubs are never called to run anything: the build only compiles and serializes.
The library is built from this source with the host C compiler into a private cache dir.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from rewriter.errors import UsageError

# The driver symbols libtvm_runtime_cuda.so imports (`nm -D --undefined-only`, TVM 0.27).
STUB_SOURCE = r"""
typedef int CUresult; /* CUDA_SUCCESS == 0 */
static const char *stub_msg = "CUDA driver stub: no GPU on the build machine";
CUresult cuGetErrorName(CUresult e, const char **s) { (void)e; *s = stub_msg; return 0; }
CUresult cuGetErrorString(CUresult e, const char **s) { (void)e; *s = stub_msg; return 0; }
CUresult cuDeviceGetName(char *name, int len, int dev) { (void)dev; if (len > 0) name[0] = 0; return 0; }
CUresult cuFuncSetAttribute(void) { return 0; }
CUresult cuLaunchKernelEx(void) { return 0; }
CUresult cuModuleGetFunction(void) { return 0; }
CUresult cuModuleLoadData(void) { return 0; }
CUresult cuModuleUnload(void) { return 0; }
CUresult cuTensorMapEncodeTiled(void) { return 0; }
"""
STUB_NAME = "libcuda.so.1"
# `-x c`: the host compiler TVM finds may be g++, which would mangle the symbol names.
STUB_FLAGS = ("-x", "c", "-shared", "-fPIC", "-O1")
CUDA_BIN_DIRS = ("/usr/local/cuda/bin",)


def find_nvcc() -> str:
    """Path of nvcc (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin); UsageError when absent."""
    dirs = [os.environ.get("PATH", "")]
    if os.environ.get("CUDA_HOME"):
        dirs.append(os.path.join(os.environ["CUDA_HOME"], "bin"))
    dirs.extend(CUDA_BIN_DIRS)
    nvcc = shutil.which("nvcc", path=os.pathsep.join(dirs))
    if nvcc is None:
        raise UsageError(
            "the cuda target needs nvcc (CUDA toolkit) to precompile kernels: "
            "put its bin directory on PATH or set CUDA_HOME"
        )
    return nvcc


def stub_dir() -> Path:
    """Directory holding the stub libcuda.so.1, built once per source version and cached."""
    digest = hashlib.sha256((STUB_SOURCE + " ".join(STUB_FLAGS)).encode()).hexdigest()[:12]
    directory = _cache_root() / f"cudastub-{digest}"
    if not (directory / STUB_NAME).is_file():
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        _compile_stub(directory)
    return directory


def _compile_stub(directory: Path) -> None:
    """Compile next to the final name then rename, so concurrent builds never see a partial file."""
    from tvm.support import cc

    compiler = cc.get_cc() or shutil.which("cc")
    if compiler is None:
        raise UsageError("no host C compiler found to build the CUDA driver stub: install the Debian package gcc")
    source = directory / "cudastub.c"
    source.write_text(STUB_SOURCE)
    fd, tmp_name = tempfile.mkstemp(prefix=".libcuda.", dir=directory)
    os.close(fd)
    try:
        cmd = [compiler, *STUB_FLAGS, "-o", tmp_name, str(source)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise UsageError(f"building the CUDA driver stub failed: {_last_line(done.stderr)}")
        os.replace(tmp_name, directory / STUB_NAME)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _cache_root() -> Path:
    """$XDG_CACHE_HOME/rewriter (or ~/.cache/rewriter); a per-user temp dir when that is read-only."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rewriter"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"rewriter-{os.getuid()}"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
