"""pq with and without its bound on the output error the codes add (`pq.max_error`) on a real model: file size and
the pipeline's held-out fidelity, one row per setting.

    python benchmarks/pq_bound.py mobilenetv3_cls --samples 512 --bounds 0,0.15,0.2
    python benchmarks/pq_bound.py yolov8n --samples 64 --bounds 0,0.15,0.2
    python benchmarks/pq_bound.py yolov8n --bounds 0.2 --head-errors 0,0.05   # the output layers' tighter bound
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, real_models

sys.path.insert(0, str(REPO))

from rewriter import rewrite  # noqa: E402

FIGURES = ("channel_cosine_min", "cosine", "top1_agreement", "detection_agreement")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["mobilenetv3_cls", "dbnet", "yolov8n"])
    parser.add_argument("--samples", type=int, default=64, help="calibration images (25 %% held out)")
    parser.add_argument("--bounds", default="0,0.2", help="comma-separated pq.max_error values (0: no bound)")
    parser.add_argument("--head-errors", default="0.05", help="comma-separated pq.head_error values (0: max_error)")
    args = parser.parse_args()
    path, calib = real_models(args.samples, Path(tempfile.mkdtemp(prefix="pq-bound-")))[args.model]
    print("| pq.max_error | pq.head_error | file ×smaller | layers | " + " | ".join(FIGURES) + " | seconds |")
    print("|---" * (len(FIGURES) + 5) + "|")
    settings = [(float(b), float(h)) for b in args.bounds.split(",") for h in args.head_errors.split(",")]
    for bound, head in settings:
        start = time.perf_counter()
        result = rewrite(path, passes=["pq"], calib=calib, options={"pq": {"max_error": bound, "head_error": head}})
        record = result.report["passes"][0]
        forms = ", ".join(f"{n} {form}" for form, n in record["notes"]["forms"].items() if n)
        figures = " | ".join(f"{record['fidelity'][k]:.4f}" if k in record["fidelity"] else "–" for k in FIGURES)
        ratio = result.report["input"]["bytes"] / record["bytes_after"]
        seconds = time.perf_counter() - start
        print(f"| {bound:g} | {head:g} | {ratio:.2f} | {forms} | {figures} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
