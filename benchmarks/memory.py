"""Peak memory (RSS) of rewriting YOLOv8n with 64, 256 and 512 calibration images.

    python benchmarks/memory.py                       # svd, 64/256/512 images
    python benchmarks/memory.py --passes prune --sizes 64,512

Each run is a fresh child process (`rewrite` CLI, target none); its peak RSS is read from the kernel's
accounting of that child. The calibration file itself is loaded whole (N x 3 x 320 x 320 float32), so it is
listed beside the peak: everything above it is what the passes and the capture hold.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import real_models, table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "samples"))
from fetch_real_models import load_images, yolo_calib  # noqa: E402

CHILD = ("import resource, sys; from rewriter.cli import main; code = main(sys.argv[1:]); "
         "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(code)")


def _peak_mib(model: Path, calib: Path, passes: str, out: Path) -> tuple[float, float, int]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, str(model), "--passes", passes, "--calib", str(calib),
                           "-o", str(out), "--quiet"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"rewrite failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    peak_kib = int(done.stderr.strip().splitlines()[-1])
    return peak_kib / 1024, time.perf_counter() - start, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default="svd")
    parser.add_argument("--sizes", default="64,256,512")
    args = parser.parse_args()
    model, _ = real_models()["yolov8n"]
    images = load_images()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            calib = Path(tmp) / f"calib{n}.npz"
            np.savez(calib, **yolo_calib(images, n, np.random.default_rng(0)))
            data_mib = calib.stat().st_size / 2**20
            peak, seconds, _ = _peak_mib(model, calib, args.passes, Path(tmp) / f"out{n}")
            rows.append([n, f"{data_mib:.0f}", f"{peak:.0f}", f"{peak - data_mib:.0f}", f"{seconds:.0f}"])
            print(table(["images", "calibration MiB", "peak RSS MiB", "peak minus calibration", "seconds"], rows[-1:]),
                  file=sys.stderr)
            os.remove(calib)
    print(f"YOLOv8n, --passes {args.passes}, target none, {os.cpu_count()} cores, "
          "ru_maxrss of each child")
    print(table(["images", "calibration MiB", "peak RSS MiB", "peak minus calibration", "seconds"], rows))


if __name__ == "__main__":
    main()
