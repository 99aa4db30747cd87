"""Run the `--target arm` artifact under qemu-user (aarch64 Python + TVM) and compare it with onnxruntime.

    python benchmarks/arm_qemu_check.py --passes svd                      # digits_resnet, 8 samples
    python benchmarks/arm_qemu_check.py --model samples/digits_mlp.onnx --passes svd --samples 16

The aarch64 sysroot and site-packages are set up once under --work (Debian aarch64 packages and pip wheels
for manylinux aarch64; needs root for apt-get). Times under qemu mean nothing; this checks correctness only.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from common import SAMPLES, table

DEBS = (
    "libc6 libgcc-s1 libstdc++6 zlib1g libexpat1 libffi8 libpython3.11-minimal libpython3.11-stdlib "
    "python3.11-minimal libssl3 libbz2-1.0 liblzma5 libcrypt1 libuuid1 libncursesw6 libtinfo6 libreadline8 "
    "libsqlite3-0 libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libcom-err2 libkrb5support0 "
    "libkeyutils1 libzstd1 libdb5.3"
).split()
PLATFORMS = ["manylinux2014_aarch64", "manylinux_2_28_aarch64"]
RUNNER = """\
import sys
import numpy as np
import tvm
from tvm import relax
lib = tvm.runtime.load_module(sys.argv[1])
vm = relax.VirtualMachine(lib, tvm.cpu())
xs = np.load(sys.argv[2])
outs = []
for x in xs:
    y = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x[None])))
    y = y[0] if isinstance(y, (list, tuple)) or type(y).__name__ == "Array" else y
    outs.append(y.numpy()[0])
np.save(sys.argv[3], np.stack(outs))
print("aarch64 runner:", len(outs), "samples", tvm.__version__)
"""


def run(cmd: list[str], what: str, **kwargs: object) -> subprocess.CompletedProcess:
    """Run a command; on failure exit with one line naming the step and the tail of stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # noqa: S603
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        sys.exit(f"error: {what} failed (rc {proc.returncode}): {tail[0]}")
    return proc


def ensure_qemu() -> str:
    if shutil.which("qemu-aarch64") is None:
        if os.geteuid() != 0:
            sys.exit("error: qemu-aarch64 is missing and installing it needs root (apt-get install qemu-user)")
        run(["apt-get", "update"], "apt-get update")
        run(["apt-get", "install", "-y", "qemu-user"], "apt-get install qemu-user")
    return shutil.which("qemu-aarch64") or sys.exit("error: qemu-aarch64 still not found")


def setup_root(work: Path) -> Path:
    """arm64 debs extracted (not installed) into work/root."""
    root, debs = work / "root", work / "debs"
    if (root / "usr/bin/python3.11").exists():
        return root
    if os.geteuid() != 0:
        sys.exit("error: the arm64 sysroot needs root (dpkg --add-architecture arm64; apt-get update)")
    run(["dpkg", "--add-architecture", "arm64"], "dpkg --add-architecture arm64")
    run(["apt-get", "update"], "apt-get update")
    debs.mkdir(parents=True, exist_ok=True)
    run(["apt-get", "download", *(f"{p}:arm64" for p in DEBS)], "apt-get download (arm64 debs)", cwd=debs)
    for deb in sorted(debs.glob("*.deb")):
        run(["dpkg", "-x", str(deb), str(root)], f"dpkg -x {deb.name}")
    return root


def setup_site(work: Path) -> Path:
    """aarch64 wheels for Python 3.11 unzipped into work/site."""
    site, wheels = work / "site", work / "wheels"
    if (site / "tvm").is_dir() and (site / "numpy").is_dir():
        return site
    ffi = importlib.metadata.version("apache-tvm-ffi")
    pkgs = ["apache-tvm==0.27.0.post1", f"apache-tvm-ffi=={ffi}", "numpy", "ml_dtypes", "typing_extensions",
            "cloudpickle", "psutil"]
    plats = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *plats, "--python-version", "3.11",
           "--only-binary=:all:", "-d", str(wheels), *pkgs]
    run(cmd, "pip download (aarch64 wheels)")
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as zf:
            zf.extractall(site)
    return site


def build(model: Path, calib: Path, passes: list[str], out_dir: Path) -> tuple[Path, Path]:
    from rewriter import rewrite

    result = rewrite(model, passes=passes, target="arm", calib=calib, out_dir=out_dir)
    return Path(result.artifacts["library"]), Path(result.artifacts["model"])


def elf_info(path: Path) -> str:
    head = path.read_bytes()[:20]
    if head[:4] != b"\x7fELF":
        return f"{path.name}: not an ELF file"
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    name = {183: "AArch64", 62: "x86-64"}.get(machine, "?")
    bits = {1: "32", 2: "64"}.get(head[4], "?")
    return f"{path.name}: ELF {bits}-bit, e_machine {machine} ({name}), {path.stat().st_size} bytes"


def run_qemu(qemu: str, root: Path, site: Path, lib: Path, xs: Path, tmp: Path) -> np.ndarray:
    runner, out = tmp / "run_a64.py", tmp / "out_a64.npy"
    runner.write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": str(site)}
    cmd = [qemu, "-L", str(root), str(root / "usr/bin/python3.11"), str(runner), str(lib), str(xs), str(out)]
    print(run(cmd, "aarch64 runner under qemu", env=env).stdout.strip(), file=sys.stderr)
    return np.load(out)


def run_ort(model: Path, xs: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.stack([sess.run(None, {name: x[None]})[0][0] for x in xs])


def compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, str]:
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    rel = float(diff.max() / max(float(np.abs(ref).max()), 1e-12))
    agree = int((ref.reshape(len(ref), -1).argmax(1) == got.reshape(len(got), -1).argmax(1)).sum())
    return float(diff.max()), rel, f"{agree}/{len(ref)}"


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SAMPLES / "digits_resnet.onnx")
    ap.add_argument("--calib", type=Path, default=SAMPLES / "digits_calib.npz")
    ap.add_argument("--passes", nargs="*", default=[])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path("~/.cache/rewriter/arm-qemu").expanduser())
    return ap.parse_args()


def main() -> None:
    args = parse()
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    qemu, root, site = ensure_qemu(), setup_root(args.work), setup_site(args.work)
    print(f"aarch64 setup ready in {time.perf_counter() - start:.1f} s under {args.work}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="arm_qemu_") as tmp_name:
        tmp = Path(tmp_name)
        lib, onnx_model = build(args.model, args.calib, args.passes, tmp / "out")
        print(elf_info(lib))
        with np.load(args.calib) as data:
            xs = np.ascontiguousarray(data[data.files[0]][: args.samples], dtype=np.float32)
        np.save(tmp / "inputs.npy", xs)
        got = run_qemu(qemu, root, site, lib, tmp / "inputs.npy", tmp)
        ref = run_ort(onnx_model, xs)
    max_abs, max_rel, top1 = compare(ref, got)
    header = ["model", "passes", "samples", "max abs diff", "max rel diff", "top-1 agrees"]
    row = [args.model.stem, ",".join(args.passes) or "-", len(xs), f"{max_abs:.3g}", f"{max_rel:.3g}", top1]
    print(table(header, [row]))


if __name__ == "__main__":
    main()
