"""Shared pieces of the benchmark scripts: model lists, onnxruntime timing, markdown tables."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
SAMPLE_NAMES = ["digits_vgg", "digits_resnet", "digits_mobilenet", "digits_mlp"]
sys.path.insert(0, str(SAMPLES))


def real_models() -> dict[str, tuple[Path, Path]]:
    """{name: (model, calibration)} for the pretrained models, fetched into the cache if needed."""
    from fetch_real_models import build_calibration, default_cache, fetch_models

    cache = default_cache()
    models = fetch_models(cache)
    calibs = build_calibration(cache)
    return {name: (models[name], calibs[name]) for name in ("mobilenetv3_cls", "dbnet", "yolov8n")}


def ort_latency_ms(model: str | Path | bytes, feed: dict[str, np.ndarray], threads: int = 2,
                   warmup: int = 10, blocks: int = 5, runs: int = 30) -> float:
    """Median per-run latency over blocks of runs, with the same thread settings for every model."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(runs):
            sess.run(None, feed)
        times.append((time.perf_counter() - start) / runs * 1e3)
    return statistics.median(times)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
