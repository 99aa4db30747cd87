"""Running a `--target arm` library on an x86 host under qemu-user, to check its outputs (times mean nothing).

An aarch64 sysroot (Debian bookworm arm64 packages, extracted with `dpkg -x`, not installed) and the manylinux
aarch64 wheels of numpy and the TVM runtime (for the sysroot's Python 3.11) are set up once under a work folder
(default ~/.cache/rewriter/arm-qemu) and reused while their stamp matches what this module asks for. Setting up
needs root (apt-get), the Debian mirrors and PyPI; every step has a deadline. `prepare` raises QemuUnavailableError
with one line saying why when the set-up cannot be had; `Arm64Env.run` raises QemuRunError when the library
fails or hangs under qemu (the environment was checked when it was set up, so that is the library's fault).
`start_rpc_server` runs TVM's RPC server on that Python (registered at a tracker: a qemu "device" for
`--target arm --rpc`, tuning and timing); `python -m rewriter.targets.qemu_runner rpc-server` runs one until Ctrl-C.

Only the TVM runtime library is loaded under qemu (TVM_USE_RUNTIME_LIB=1): the 240 MB compiler library is not
extracted, and ml_dtypes (optional for TVM, 7 s to import under qemu) is not downloaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_WORK = Path("~/.cache/rewriter/arm-qemu").expanduser()
FORMAT = 2  # bump when the layout under the work folder changes: older set-ups are redone

# Debian bookworm arm64 packages that `import numpy, tvm` needs under qemu: the C/C++ runtime and Python 3.11.
DEBS = (
    "libc6 libgcc-s1 libstdc++6 zlib1g libexpat1 libffi8 libpython3.11-minimal libpython3.11-stdlib "
    "python3.11-minimal libssl3 libbz2-1.0 liblzma5 libcrypt1 libuuid1 libncursesw6 libtinfo6 libreadline8 "
    "libsqlite3-0 libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libcom-err2 libkrb5support0 "
    "libkeyutils1 libzstd1 libdb5.3"
).split()
DEBIAN_CODENAME = "bookworm"  # the package names above (python3.11, libssl3, libffi8) are bookworm's
PYTHON = "usr/bin/python3.11"
# The aarch64 wheels, pinned to the host's versions (the artifact is built by the host's TVM).
WHEELS = ("apache-tvm", "apache-tvm-ffi", "numpy", "typing_extensions")
PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_28_aarch64")
SKIP_MEMBERS = ("tvm/lib/libtvm_compiler.so", "tvm/lib/libtvm_runtime_cuda.so")  # not loaded runtime-only

APT_OPTIONS = ["-o", "Acquire::http::Timeout=30", "-o", "Acquire::Retries=2", "-o", "DPkg::Lock::Timeout=120"]
SETUP_TIMEOUT_S = 600.0  # the whole cold set-up (about 30 s with fast mirrors); past it, QemuUnavailableError
RUN_TIMEOUT_S = 300.0  # one library run under qemu (about 5 s warm for 8 digits samples)
LOCK_TIMEOUT_S = SETUP_TIMEOUT_S + 60.0  # another process setting up holds the lock at most its own deadline

RUNNER = """\
import sys
import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine
vm = VirtualMachine(tvm.runtime.load_module(sys.argv[1]), tvm.cpu())
outs = []
for x in np.load(sys.argv[2]):
    y = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x[None])))
    y = y if hasattr(y, "numpy") else y[0]
    outs.append(y.numpy()[0])
np.save(sys.argv[3], np.stack(outs))
print("aarch64 runner:", len(outs), "samples, tvm", tvm.__version__)
"""
SMOKE = "import numpy, tvm; from tvm.runtime.vm import VirtualMachine; print(tvm.__version__)"


class QemuUnavailableError(RuntimeError):
    """The aarch64 set-up cannot be had here (no root, no network, not Debian bookworm, ...): one line why."""


class QemuRunError(RuntimeError):
    """The library failed, or did not finish, under qemu."""


def _tail(text: str) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _reason(text: str) -> str:
    """One line of a failed tool's output: apt's first error, pip's first error (with its last network retry
    warning, which names the unreachable host), else the last line (a Python traceback's exception)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    for mark in ("E: ", "ERROR: "):
        errors = [line for line in lines if line.startswith(mark)]
        if errors:
            retries = [line for line in lines if line.startswith("WARNING: Retrying")]
            return errors[0] + (f" ({retries[-1][:240]})" if retries else "")
    return _tail(text)


class _Deadline:
    """Seconds left of the set-up's time; QemuUnavailableError once they are spent."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self, what: str) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise QemuUnavailableError(f"the aarch64 set-up ran past its {self.seconds:.0f} s deadline before {what}")
        return left


def _run(cmd: list[str], what: str, timeout: float, error: type[RuntimeError] = QemuUnavailableError,
         **kwargs: object) -> str:
    """Run cmd in its own process group with a deadline; raise `error` with one line on failure or timeout.

    The whole group is killed on timeout, so that helpers it spawned (apt's download methods) cannot keep
    the pipes open and hang the wait.
    """
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, **kwargs)
    except OSError as exc:
        raise error(f"{what}: cannot start {cmd[0]}: {exc.strerror or exc}") from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise error(f"{what} did not finish in {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise error(f"{what} failed (rc {proc.returncode}): {_reason(err or out)}")
    return out


@contextlib.contextmanager
def _locked(work: Path) -> Iterator[None]:
    """One process sets up a work folder at a time (parallel test workers share the cache)."""
    try:
        work.mkdir(parents=True, exist_ok=True)
        handle = open(work / ".lock", "w")  # closed by the with below
    except OSError as exc:
        raise QemuUnavailableError(f"cannot use {work} for the aarch64 set-up: {exc.strerror or exc}") from None
    with handle:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    waited = f"{work} stayed locked by another set-up for {LOCK_TIMEOUT_S:.0f} s"
                    raise QemuUnavailableError(waited) from None
                time.sleep(1.0)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def wheel_pins() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]


def _spec() -> dict:
    return {"format": FORMAT, "debs": DEBS, "wheels": wheel_pins()}


def _env(site: Path) -> dict[str, str]:
    """A clean environment for the aarch64 Python: none of the host's virtualenv or Python settings."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/"),
            "LANG": "C.UTF-8", "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1", "TVM_USE_RUNTIME_LIB": "1",
            "TVM_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Arm64Env:
    """A ready aarch64 Python with numpy and the TVM runtime, run through qemu-user."""

    qemu: str
    root: Path
    site: Path

    def python(self, *args: str, what: str, timeout: float, error: type[RuntimeError]) -> str:
        cmd = [self.qemu, "-L", str(self.root), str(self.root / PYTHON), *args]
        return _run(cmd, what, timeout, error, env=_env(self.site))

    def run(self, library: Path, inputs: np.ndarray, timeout: float = RUN_TIMEOUT_S) -> np.ndarray:
        """Outputs of the library's `main` for each sample of `inputs` (one at a time, batch axis added)."""
        with tempfile.TemporaryDirectory(prefix="arm_qemu_") as name:
            tmp = Path(name)
            (tmp / "runner.py").write_text(RUNNER)
            np.save(tmp / "inputs.npy", np.ascontiguousarray(inputs))
            self.python(str(tmp / "runner.py"), str(library), str(tmp / "inputs.npy"), str(tmp / "outputs.npy"),
                        what=f"{Path(library).name} under qemu-aarch64", timeout=timeout, error=QemuRunError)
            return np.load(tmp / "outputs.npy")


def _os_release() -> dict[str, str]:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return {}
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {key: value.strip().strip('"') for key, value in pairs}


def _check_apt(why: str) -> None:
    """apt-get can fetch bookworm's arm64 packages here, or QemuUnavailableError saying what is missing."""
    if os.geteuid() != 0:
        raise QemuUnavailableError(f"{why} needs root for apt-get (run once as root to fill the cache)")
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise QemuUnavailableError(f"{why} needs apt-get and dpkg (a Debian {DEBIAN_CODENAME} host)")
    release = _os_release()
    if release.get("ID") != "debian" or release.get("VERSION_CODENAME") != DEBIAN_CODENAME:
        found = release.get("PRETTY_NAME", "an unknown system")
        raise QemuUnavailableError(f"{why} needs Debian {DEBIAN_CODENAME} apt sources for its arm64 packages; "
                              f"this is {found}")


def _apt(*args: str, what: str, deadline: _Deadline, cwd: Path | None = None) -> str:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return _run(["apt-get", *APT_OPTIONS, *args], what, deadline.left(what), env=env, cwd=cwd)


def _apt_setup(root: Path | None, need_qemu: bool, deadline: _Deadline) -> None:
    """One apt-get update; qemu-user installed if needed; the arm64 debs extracted into `root` if given.

    arm64 is added as a foreign architecture only for this, and removed again if it was not there before
    (nothing arm64 is installed, only downloaded), so later apt-get runs on the host do not fetch its lists.
    """
    foreign = _run(["dpkg", "--print-foreign-architectures"], "dpkg", 30).split()
    added = root is not None and "arm64" not in foreign
    try:
        if added:
            _run(["dpkg", "--add-architecture", "arm64"], "dpkg --add-architecture arm64", 30)
        _apt("update", "--error-on=any", what="apt-get update", deadline=deadline)
        if need_qemu:
            _apt("install", "-y", "--no-install-recommends", "qemu-user", what="apt-get install qemu-user",
                 deadline=deadline)
        if root is not None:
            with tempfile.TemporaryDirectory(prefix="arm64_debs_") as name:
                debs = Path(name)
                _apt("download", *(f"{p}:arm64" for p in DEBS), what="apt-get download (arm64 debs)",
                     deadline=deadline, cwd=debs)
                for deb in sorted(debs.glob("*.deb")):
                    _run(["dpkg", "-x", str(deb), str(root)], f"dpkg -x {deb.name}", deadline.left("dpkg -x"))
    finally:
        if added:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["dpkg", "--remove-architecture", "arm64"], capture_output=True, timeout=30)


def _setup_site(site: Path, deadline: _Deadline) -> None:
    """The aarch64 wheels for Python 3.11, downloaded (no cache copy) and unzipped into `site`."""
    plats = [arg for plat in PLATFORMS for arg in ("--platform", plat)]
    with tempfile.TemporaryDirectory(prefix="arm64_wheels_") as name:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
               "--timeout", "30", "--retries", "2", *plats, "--python-version", "3.11", "--only-binary=:all:",
               "-d", name, *wheel_pins()]
        _run(cmd, "pip download (aarch64 wheels)", deadline.left("pip download"))
        for wheel in sorted(Path(name).glob("*.whl")):
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(site, [m for m in zf.namelist() if m not in SKIP_MEMBERS])


def prepare(work: Path = DEFAULT_WORK, log: Callable[[str], None] | None = None,
            timeout: float = SETUP_TIMEOUT_S) -> Arm64Env:
    """The aarch64 environment under `work`, set up if its stamp is missing or stale; QemuUnavailableError if it
    cannot be, or not within `timeout` seconds. `log(text)` hears about the steps that take time."""
    say = log or (lambda text: None)
    work = Path(work)
    root, site, stamp = work / "root", work / "site", work / "setup.json"
    with _locked(work):
        spec = _spec()
        try:
            ready = json.loads(stamp.read_text()) == spec and (root / PYTHON).is_file() and (site / "tvm").is_dir()
        except (OSError, ValueError):
            ready = False
        qemu = shutil.which("qemu-aarch64")
        if ready and qemu:
            return Arm64Env(qemu, root, site)
        _check_apt("the arm64 sysroot" if not ready else "qemu-aarch64 (not on PATH)")
        if not ready:
            stamp.unlink(missing_ok=True)
            for path in (root, site):
                shutil.rmtree(path, ignore_errors=True)
        start, deadline = time.perf_counter(), _Deadline(timeout)
        say("apt-get: " + " and ".join(([] if qemu else ["install qemu-user"]) + ([] if ready else ["arm64 debs"])))
        _apt_setup(None if ready else root, need_qemu=qemu is None, deadline=deadline)
        qemu = shutil.which("qemu-aarch64")
        if qemu is None:
            raise QemuUnavailableError("qemu-aarch64 is still not on PATH after apt-get install qemu-user")
        if not ready:
            say(f"pip download: {' '.join(wheel_pins())} (aarch64)")
            _setup_site(site, deadline)
        env = Arm64Env(qemu, root, site)
        # Checks the set-up (and writes the .pyc files the later runs reuse): a failure here is the environment's.
        got = _tail(env.python("-c", SMOKE, what="the aarch64 Python under qemu (import numpy, tvm)",
                               timeout=deadline.left("the smoke check"), error=QemuUnavailableError))
        want = importlib.metadata.version("apache-tvm")
        if got != want:
            raise QemuUnavailableError(f"the aarch64 TVM reports version {got}, expected {want}")
        stamp.write_text(json.dumps(spec))
        say(f"aarch64 set-up ready in {time.perf_counter() - start:.1f} s under {work}")
        return env


# A TVM RPC server under qemu (`start_rpc_server`) -------------------------------------------------------------

RPC_START_TIMEOUT_S = 120.0  # until the server is registered at the tracker (about 12 s: two `import tvm` under qemu)
RPC_EXTRA_LIBRARY = "tvm/lib/libtvm_runtime_extra.so"  # MetaSchedule's random_fill_for_measure lives in it
SITECUSTOMIZE = """\
# Written by rewriter.targets.qemu_runner: without binfmt_misc the kernel cannot exec the aarch64 python, so the
# processes TVM starts with sys.executable (its PopenWorker, multiprocessing's spawn) go through qemu's wrapper.
import sys
sys.executable = {wrapper!r}
"""


class RpcServer:
    """`python -m tvm.exec.rpc_server` on the aarch64 Python under qemu, in its own process group (the server,
    its PopenWorker and the per-session forks): `stop()`, or leaving the `with` block, kills the whole group.

    `log` has the server's output (TVM logs each `load_module`); `folder` the wrapper files, removed on stop."""

    def __init__(self, proc: subprocess.Popen, log: Path, folder: Path) -> None:
        self.proc, self.log, self.folder = proc, log, folder

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> RpcServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _rpc_folder(env: Arm64Env) -> Path:
    """What the aarch64 RPC server needs beyond the set-up, in a fresh folder put on its PYTHONPATH: a host
    wrapper that runs the aarch64 python through qemu, a sitecustomize that makes it `sys.executable`, and
    cloudpickle (pure Python; TVM's PopenWorker pickles with it), copied from this host's install."""
    import importlib.util

    found = importlib.util.find_spec("cloudpickle")
    if found is None or not found.submodule_search_locations:
        raise QemuUnavailableError("the aarch64 RPC server needs cloudpickle on this host (pip install cloudpickle)")
    folder = Path(tempfile.mkdtemp(prefix="arm_rpc_"))
    try:
        shutil.copytree(list(found.submodule_search_locations)[0], folder / "cloudpickle",
                        ignore=shutil.ignore_patterns("__pycache__"))
        wrapper = folder / "python-aarch64"
        args = " ".join(shlex.quote(str(a)) for a in (env.qemu, "-L", env.root, env.root / PYTHON))
        wrapper.write_text(f'#!/bin/sh\nexec {args} "$@"\n')
        wrapper.chmod(0o755)
        (folder / "sitecustomize.py").write_text(SITECUSTOMIZE.format(wrapper=str(wrapper)))
    except OSError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise QemuUnavailableError(f"cannot write the aarch64 RPC server's files: {exc.strerror or exc}") from None
    return folder


def _registered(tracker: str, key: str) -> bool:
    import socket

    from tvm import rpc

    host, _, port = tracker.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return key in rpc.connect_tracker(host, int(port)).summary().get("queue_info", {})
    except OSError:
        return False


def start_rpc_server(env: Arm64Env, tracker: str, key: str, host: str = "127.0.0.1", port: int = 9090,
                     port_end: int = 9199, log: Path | None = None,
                     timeout: float = RPC_START_TIMEOUT_S) -> RpcServer:
    """Start TVM's RPC server on the aarch64 Python under qemu-user, registered at the tracker (HOST:PORT) with
    `key`; returns once the tracker lists the key. The server binds `host` on the first free port in
    [port, port_end) and serves until stopped (use it as a context manager). It loads the runtime's extra
    library (`--load-library`), which holds what MetaSchedule's RPCRunner calls on the device.

    QemuRunError (with the last line of its log) when the server exits or is not registered within `timeout`.
    """
    folder = _rpc_folder(env)
    log = Path(log) if log is not None else folder / "server.log"
    cmd = [env.qemu, "-L", str(env.root), str(env.root / PYTHON), "-m", "tvm.exec.rpc_server", "--host", host,
           "--port", str(port), "--port-end", str(port_end), "--tracker", tracker, "--key", key]
    if (env.site / RPC_EXTRA_LIBRARY).is_file():
        cmd += ["--load-library", str(env.site / RPC_EXTRA_LIBRARY)]
    environ = {**_env(env.site), "PYTHONPATH": f"{env.site}{os.pathsep}{folder}"}
    try:
        with open(log, "wb") as sink:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                    env=environ, start_new_session=True)
    except OSError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise QemuRunError(f"cannot start the aarch64 RPC server: {exc.strerror or exc}") from None
    server = RpcServer(proc, log, folder)
    deadline = time.monotonic() + timeout
    try:
        while not _registered(tracker, key):
            if proc.poll() is not None:
                raise QemuRunError(f"the aarch64 RPC server exited (rc {proc.returncode}): "
                                   f"{_tail(log.read_text(errors='replace'))}")
            if time.monotonic() > deadline:
                raise QemuRunError(f"the aarch64 RPC server was not registered at {tracker} within {timeout:.0f} s: "
                                   f"{_tail(log.read_text(errors='replace'))}")
            time.sleep(0.5)
    except BaseException:
        server.stop()
        raise
    return server


def elf_info(path: Path) -> str:
    """One line: the ELF class and machine of a library (an arm artifact must be 64-bit AArch64)."""
    head = Path(path).read_bytes()[:20]
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return f"{Path(path).name}: not an ELF file"
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    name = {183: "AArch64", 62: "x86-64"}.get(machine, "?")
    bits = {1: "32", 2: "64"}.get(head[4], "?")
    return f"{Path(path).name}: ELF {bits}-bit, e_machine {machine} ({name}), {Path(path).stat().st_size} bytes"


def onnxruntime_outputs(model: Path, inputs: np.ndarray) -> np.ndarray:
    """The reference: the model's first output in onnxruntime on this host, one sample at a time."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.stack([sess.run(None, {name: x[None]})[0][0] for x in inputs])


def compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, int]:
    """(max abs diff, max diff relative to max |ref|, samples whose top-1 class agrees)."""
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    rel = float(diff.max() / max(float(np.abs(ref).max()), 1e-12))
    agree = int((ref.reshape(len(ref), -1).argmax(1) == got.reshape(len(got), -1).argmax(1)).sum())
    return float(diff.max()), rel, agree


def main(argv: list[str] | None = None) -> int:
    """`python -m rewriter.targets.qemu_runner rpc-server --tracker HOST:PORT [--key KEY]`: an aarch64 TVM RPC
    server under qemu until Ctrl-C or SIGTERM, for `--target arm --rpc HOST:PORT --device-key KEY` without a board."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rewriter.targets.qemu_runner")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("rpc-server", help="TVM's RPC server on the aarch64 Python under qemu-user")
    serve.add_argument("--tracker", required=True, help="HOST:PORT of a running `python -m tvm.exec.rpc_tracker`")
    serve.add_argument("--key", default="qemu-aarch64", help="device key to register (default qemu-aarch64)")
    serve.add_argument("--host", default="127.0.0.1", help="address the server binds (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=9090, help="first port tried (default 9090)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        env = prepare(log=lambda text: print(text, file=sys.stderr))
        server = start_rpc_server(env, args.tracker, args.key, host=args.host, port=args.port,
                                  port_end=args.port + 100)
    except (QemuUnavailableError, QemuRunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with server:
        print(f"aarch64 RPC server under qemu registered at {args.tracker} with key {args.key!r} "
              f"(log {server.log}); Ctrl-C stops it", file=sys.stderr)
        try:
            while server.proc.poll() is None:
                time.sleep(1.0)
        except KeyboardInterrupt:
            return 130
        last = _tail(server.log.read_text(errors="replace"))
        print(f"error: the server exited (rc {server.proc.returncode}): {last}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
