"""Shared pieces of the benchmark scripts: model lists, onnxruntime timing, markdown tables."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
SAMPLE_NAMES = ["digits_vgg", "digits_resnet", "digits_mobilenet", "digits_mlp"]
sys.path.insert(0, str(SAMPLES))
# The tables measure each pass at the strength they name: with these pinned, the pipeline does not retry a pass
# at milder settings (an option the user sets is never retried), so the rows stay what they say.
DEFAULT_STRENGTHS = {"prune": {"max_error": 0.2}, "pq": {"max_error": 0.2}, "binary": {"bases": 1}}


def at_named_strength(passes, options: dict | None) -> dict:
    """`options` ({pass: {key: value}}) with each of `passes`' default strength pinned where it sets none."""
    options = dict(options or {})
    for name in passes:
        if name in DEFAULT_STRENGTHS:
            options[name] = {**DEFAULT_STRENGTHS[name], **options.get(name, {})}
    return options


def real_models(samples: int | None = None, calib_dir: Path | None = None) -> dict[str, tuple[Path, Path]]:
    """{name: (model, calibration)} for the pretrained models, fetched into the cache if needed; with `samples`,
    calibration sets of that size are made in `calib_dir` instead of the cached default sizes."""
    from fetch_real_models import build_calibration, default_cache, fetch_models

    cache = default_cache()
    with contextlib.redirect_stdout(sys.stderr):  # the fetch log must not mix into the tables
        models = fetch_models(cache)
        calibs = build_calibration(calib_dir or cache, samples) if samples else build_calibration(cache)
    return {name: (models[name], calibs[name]) for name in ("mobilenetv3_cls", "dbnet", "yolov8n")}


def library_vs_onnxruntime(artifact: Path, model: Path, calib: Path, samples: int = 1,
                           relative: bool = False) -> float:
    """Max |x86 library - onnxruntime on model| over every output and the first `samples` calibration samples (one
    at a time); with `relative`, each output's difference is divided by its largest |value|."""
    import numpy as np
    import onnxruntime as ort
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(artifact)), tvm.cpu())
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    worst = 0.0
    with np.load(calib) as data:
        for i in range(samples):
            feed = {n: np.ascontiguousarray(data[n][i:i + 1]) for n in names}
            got = vm["main"](*(tvm.runtime.tensor(feed[n]) for n in names))
            got = [got.numpy()] if hasattr(got, "numpy") else [g.numpy() for g in got]
            for g, e in zip(got, session.run(None, feed), strict=True):
                scale = max(float(np.max(np.abs(e))), 1e-12) if relative else 1.0
                worst = max(worst, float(np.max(np.abs(g - e))) / scale)
    return worst


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
