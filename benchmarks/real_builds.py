"""Every real model built for x86, arm and cuda with no pass: build seconds, artifact bytes, and the x86
artifact's outputs against onnxruntime on the first calibration samples.

    python benchmarks/real_builds.py                        # yolov8n, mobilenetv3_cls, dbnet
    python benchmarks/real_builds.py --models dbnet --targets x86,cuda

Each build is the CLI's own path (`rewrite MODEL --target T -o DIR`), so canonicalisation, the restored
interface and the report are those a user gets; the report's `target.build_seconds` is the build alone.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import library_vs_onnxruntime, real_models, table

from rewriter import rewrite
from rewriter.errors import RewriterError

SAMPLES_CHECKED = 4


def build(name: str, model: Path, calib: Path, target: str, work: Path) -> list:
    out = work / f"{name}-{target}"
    try:
        rewrite(model, target=target, calib=calib, out_dir=out)
    except RewriterError as exc:
        return [name, target, "failed", "", "", str(exc)[:80]]
    report = json.loads((out / "report.json").read_text())["target"]
    artifact = out / report["artifact"]
    diff = f"{library_vs_onnxruntime(artifact, model, calib, SAMPLES_CHECKED):.1e}" if target == "x86" else "–"
    extra = report.get("device_code") or ""
    return [name, target, f"{report['build_seconds']:.1f}", f"{artifact.stat().st_size / 1024:.0f} KiB", diff, extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="yolov8n,mobilenetv3_cls,dbnet")
    parser.add_argument("--targets", default="x86,arm,cuda")
    args = parser.parse_args()
    models = real_models()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model, calib = models[name]
            for target in args.targets.split(","):
                rows.append(build(name, model, calib, target, Path(tmp)))
    print(table(["model", "target", "build s", "artifact", f"max \\|x86 − ORT\\| ({SAMPLES_CHECKED} samples)",
                 "device code"], rows))


if __name__ == "__main__":
    main()
