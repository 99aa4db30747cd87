"""The README's pq/binary table: file size, bits per weight and fidelity, next to onnxsim 0.8.1's weight-only
k-means codebook quantisation at the same bits per weight.

    pip install onnxsim==0.8.1                  # the baseline only; rewriter does not depend on it
    python benchmarks/pq_binary_results.py            # the digits ResNet sample
    python benchmarks/pq_binary_results.py --real     # also YOLOv8n, MobileNetV3, DBNet
    python benchmarks/pq_binary_results.py --real --samples 24 --build   # fewer samples; x86 library sizes
    python benchmarks/pq_binary_results.py --real --only yolov8n,dbnet --configs pq --samples 16

onnxsim's `quantize_weight_only_kmeans` is fixed at 4 bits and touches only MatMul/Gemm weights (these models
are convolutional), so the baseline row runs its own per-layer scalar k-means routine (Deep Compression's
weight sharing) on every Conv/Gemm/MatMul weight with 2**b centroids, b = the pq row's bits per weight rounded
down, and measures fidelity on the same held-out samples. Its file size is not a row of its own: onnxsim stores
one uint8 code per weight, so b is its nominal (entropy-coded) rate, not its file's.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from common import SAMPLES, at_named_strength, library_vs_onnxruntime, real_models, table
from onnx import numpy_helper

from rewriter import rewrite
from rewriter.calib import load_calibration, split
from rewriter.canonical import canonicalize, resolve_input_shapes
from rewriter.loading import load_model
from rewriter.pipeline import Reference

CONFIGS = {"pq": ("pq", {}), "binary": ("binary", {}), "binary3": ("binary", {"bases": 3})}


def _fmt(fid: dict, key: str) -> str:
    return f"{fid[key]:.3f}" if key in fid else "–"


def _fidelity_cells(fid: dict) -> list[str]:
    accuracy = f"{fid['accuracy_before']:.1%} → {fid['accuracy_after']:.1%}" if "accuracy_after" in fid else "–"
    return [_fmt(fid, "top1_agreement"), _fmt(fid, "cosine"), _fmt(fid, "channel_cosine_min"), accuracy]


def _subset(calib: Path, n: int | None, folder: Path) -> Path:
    if n is None:
        return calib
    with np.load(calib) as data:
        arrays = {k: data[k][:n] for k in data.files}
    path = folder / f"{calib.stem}_{n}.npz"
    np.savez(path, **arrays)
    return path


def _ours(name: str, path: Path, calib: Path, pass_name: str, options: dict, build: bool, folder: Path) -> tuple:
    start = time.perf_counter()
    out = folder / f"{name}_{pass_name}_{len(options)}"
    pinned = at_named_strength([pass_name], {pass_name: options})
    result = rewrite(path, passes=[pass_name], calib=calib, options=pinned, out_dir=out,
                     target="x86" if build else "none", force=True)
    seconds = time.perf_counter() - start
    report, notes = result.report, result.report["passes"][0]["notes"]
    file_bytes = result.artifacts["model"].stat().st_size
    if pass_name == "pq":
        bits = notes["bits_per_weight"]
        layers = f"{notes['forms']['pq']} pq, {notes['forms']['dense_fp16']} fp16"
    else:
        bits = 8 * notes["binarised_bytes_after"] / (notes["binarised_bytes_before"] / 4)
        layers = f"{len(report['passes'][0]['changed'])} binary, ×{notes['binarised_ratio']:.1f} on them"
    library = result.artifacts.get("library")
    so = "–"
    if library:
        diff = library_vs_onnxruntime(library, result.artifacts["model"], calib, relative=True)
        so = f"{library.stat().st_size / 1e6:.2f} MB, {diff:.1e}"
    label = pass_name + "".join(f" {k}={v}" for k, v in options.items())
    row = [name, label, f"{path.stat().st_size / file_bytes:.1f}×", f"{bits:.2f}", layers,
           *_fidelity_cells(report["fidelity"]), so, f"{seconds:.0f}"]
    return row, bits


def _onnxsim_kmeans(name: str, path: Path, calib: Path, bits: float) -> list:
    """onnxsim's per-layer scalar k-means at 2**floor(bits) centroids on every Conv/Gemm/MatMul weight."""
    from onnxsim.kmeans_quantization import _kmeans_1d

    b = max(1, math.floor(bits))
    original = load_model(path)
    data = load_calibration(calib, original)
    shapes = resolve_input_shapes(original, None, data.feed_shapes())
    canonical = canonicalize(original, shapes)
    _, held = split(data, 0.25, 0)
    reference = Reference.build(original, canonical, held)
    model = onnx.ModelProto()
    model.CopyFrom(canonical)
    weights = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1}
    count = 0
    for i, tensor in enumerate(model.graph.initializer):
        w = numpy_helper.to_array(tensor)
        if tensor.name in weights and w.dtype == np.float32 and w.size > 2**b:
            centroids, codes = _kmeans_1d(w.ravel().astype(np.float64), 2**b, 20, 0)
            quantised = centroids[codes].reshape(w.shape).astype(np.float32)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(quantised, tensor.name))
            count += 1
    fid = reference.measure(model)
    return [name, f"onnxsim 0.8.1 k-means, {2**b} values/layer", "–", f"{b} (nominal)", f"{count} layers",
            *_fidelity_cells(fid), "–", "–"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="include the pretrained real models")
    parser.add_argument("--samples", type=int, default=None, help="use the first N calibration samples")
    parser.add_argument("--build", action="store_true", help="also build the x86 library and report its size")
    parser.add_argument("--only", default="", help="comma-separated model names to run")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    args = parser.parse_args()
    configs = [CONFIGS[c] for c in args.configs.split(",")]
    models = {"digits_resnet": (SAMPLES / "digits_resnet.onnx", SAMPLES / "digits_calib.npz")}
    if args.real:
        models.update(real_models())
    if args.only:
        models = {k: v for k, v in models.items() if k in args.only.split(",")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="pq-bench-") as tmp:
        folder = Path(tmp)
        for name, (path, calib) in models.items():
            calib = _subset(calib, None if name.startswith("digits") else args.samples, folder)
            pq_bits = None
            for pass_name, options in configs:
                row, bits = _ours(name, path, calib, pass_name, options, args.build, folder)
                rows.append(row)
                pq_bits = bits if pass_name == "pq" else pq_bits
            if pq_bits is not None:  # the peer runs at the pq row's bits
                rows.append(_onnxsim_kmeans(name, path, calib, pq_bits))
            print(table(HEADER, rows[-len(configs) - 1 :]), flush=True)
    print()
    print(table(HEADER, rows))


HEADER = ["model", "pass", "file ×smaller", "bits/weight (coded layers)", "layers", "top-1 agree", "cosine",
          "worst channel cos", "accuracy", "x86 .so, max rel. diff to ORT", "seconds"]

if __name__ == "__main__":
    main()
