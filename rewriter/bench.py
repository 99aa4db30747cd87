"""Latency of a model in onnxruntime, measured the same way for the original and the rewritten one."""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort

from .loading import ort_session


def ort_latency_ms(
    model: bytes | str | onnx.ModelProto,
    feed: dict[str, np.ndarray],
    threads: int = 2,
    warmup: int = 10,
    blocks: int = 5,
    runs: int = 20,
) -> float:
    """Median over blocks of the mean per-run time, with full graph optimisation, sequential execution."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if isinstance(model, onnx.ModelProto):  # a model over 2 GB cannot be bytes: ort_session opens it by path
        sess = ort_session(model, options, prepack=True)
    else:
        sess = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(runs):
            sess.run(None, feed)
        times.append((time.perf_counter() - start) / runs * 1e3)
    return statistics.median(times)
