"""Shared pieces of the benchmark scripts: model lists, onnxruntime timing, markdown tables."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
SAMPLE_NAMES = ["digits_vgg", "digits_resnet", "digits_mobilenet", "digits_mlp"]
sys.path.insert(0, str(SAMPLES))


def real_models(samples: int | None = None, calib_dir: Path | None = None) -> dict[str, tuple[Path, Path]]:
    """{name: (model, calibration)} for the pretrained models, fetched into the cache if needed; with `samples`,
    calibration sets of that size are made in `calib_dir` instead of the cached default sizes."""
    from fetch_real_models import build_calibration, default_cache, fetch_models

    cache = default_cache()
    with contextlib.redirect_stdout(sys.stderr):  # the fetch log must not mix into the tables
        models = fetch_models(cache)
        calibs = build_calibration(calib_dir or cache, samples) if samples else build_calibration(cache)
    return {name: (models[name], calibs[name]) for name in ("mobilenetv3_cls", "dbnet", "yolov8n")}


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
