"""Run the `--target arm` artifact under qemu-user (aarch64 Python + TVM) and compare it with onnxruntime.

    python benchmarks/arm_qemu_check.py --passes svd                      # digits_resnet, 8 samples
    python benchmarks/arm_qemu_check.py --model samples/digits_mlp.onnx --passes svd --samples 16

The aarch64 sysroot and site-packages are set up once under --work (Debian aarch64 packages and pip wheels
for manylinux aarch64; needs root for apt-get) by rewriter.targets.qemu_runner, which the slow test
tests/targets/test_arm_qemu.py shares. Times under qemu mean nothing; this checks correctness only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import SAMPLES, table

from rewriter.targets.qemu_runner import (
    DEFAULT_WORK,
    QemuRunError,
    QemuUnavailableError,
    compare,
    elf_info,
    onnxruntime_outputs,
    prepare,
)


def build(model: Path, calib: Path, passes: list[str], out_dir: Path) -> tuple[Path, Path]:
    from rewriter import rewrite

    result = rewrite(model, passes=passes, target="arm", calib=calib, out_dir=out_dir)
    return Path(result.artifacts["library"]), Path(result.artifacts["model"])


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SAMPLES / "digits_resnet.onnx")
    ap.add_argument("--calib", type=Path, default=SAMPLES / "digits_calib.npz")
    ap.add_argument("--passes", nargs="*", default=[])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    return ap.parse_args()


def main() -> None:
    args = parse()
    try:
        env = prepare(args.work, log=lambda text: print(text, file=sys.stderr))
    except QemuUnavailableError as exc:
        sys.exit(f"error: {exc}")
    with tempfile.TemporaryDirectory(prefix="arm_qemu_") as tmp_name:
        lib, onnx_model = build(args.model, args.calib, args.passes, Path(tmp_name) / "out")
        print(elf_info(lib))
        with np.load(args.calib) as data:
            xs = np.ascontiguousarray(data[data.files[0]][: args.samples], dtype=np.float32)
        try:
            got = env.run(lib, xs)
        except QemuRunError as exc:
            sys.exit(f"error: {exc}")
        ref = onnxruntime_outputs(onnx_model, xs)
    max_abs, max_rel, agree = compare(ref, got)
    header = ["model", "passes", "samples", "max abs diff", "max rel diff", "top-1 agrees"]
    row = [args.model.stem, ",".join(args.passes) or "-", len(xs), f"{max_abs:.3g}", f"{max_rel:.3g}",
           f"{agree}/{len(xs)}"]
    print(table(header, [row]))


if __name__ == "__main__":
    main()
