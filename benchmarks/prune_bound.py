"""prune with and without its bound on the error a group's cut leaves in its consumers' outputs (`prune.max_error`)
on a real model: MACs, how many groups the bound held back, and the pipeline's held-out fidelity, one row per
setting. The recognisers take the calibration sets of `distill_unseen.py` (64 lines / word spans, 16 held out).

    python benchmarks/prune_bound.py ppocr_rec --bounds 0,0.4,0.2
    python benchmarks/prune_bound.py yolov8n --bounds 0,0.2
    python benchmarks/prune_bound.py ddddocr_rec --ratio 0.3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, real_models

sys.path.insert(0, str(REPO))

from fetch_real_models import default_cache, fetch_extra_models, rec_lines, recogniser_spans  # noqa: E402

from rewriter import rewrite  # noqa: E402

FIGURES = ("channel_cosine_min", "cosine", "top1_agreement", "detection_agreement")
RECOGNISERS = ("ppocr_rec", "ddddocr_rec")


def _model(name: str, samples: int):
    """(model, calibration, output axes) as the other benchmarks feed it."""
    if name in RECOGNISERS:
        models = fetch_extra_models(default_cache())
        if name == "ppocr_rec":
            return models[name], {"x": rec_lines(samples, np.random.default_rng(0))}, None
        # ddddocr's [T, N, 8210] output is raw CTC logits: read per step, as distill_unseen.py says
        return models[name], {"input1": recogniser_spans(samples, np.random.default_rng(0))}, {"387": "2:scores"}
    path, calib = real_models(samples, Path(tempfile.mkdtemp(prefix="prune-bound-")))[name]
    return path, calib, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["mobilenetv3_cls", "yolov8n", *RECOGNISERS])
    parser.add_argument("--samples", type=int, default=64, help="calibration samples (25 %% held out)")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--bounds", default="0,0.2", help="comma-separated prune.max_error values (0: no bound)")
    args = parser.parse_args()
    path, calib, axes = _model(args.model, args.samples)
    print("| prune.max_error | MACs × | groups held back | groups left whole | " + " | ".join(FIGURES) + " | seconds |")
    print("|---" * (len(FIGURES) + 5) + "|")
    for bound in (float(b) for b in args.bounds.split(",")):
        start = time.perf_counter()
        result = rewrite(path, passes=["prune"], calib=calib, output_axes=axes,
                         options={"prune": {"ratio": args.ratio, "max_error": bound}})
        record = result.report["passes"][0]
        groups = [g for g in record["notes"].get("groups", {}).values() if "bounded" in g]
        whole = sum(g["size_after"] == g["size_before"] for g in groups)
        figures = " | ".join(f"{record['fidelity'][k]:.4f}" if k in record["fidelity"] else "–" for k in FIGURES)
        macs = record["macs_after"] / record["macs_before"]
        seconds = time.perf_counter() - start
        print(f"| {bound:g} | {macs:.3f} | {len(groups) - whole} | {whole} | {figures} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
