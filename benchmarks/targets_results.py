"""TVM x86 artifacts against onnxruntime: latency untuned and after MetaSchedule tuning, and output agreement.

    python benchmarks/targets_results.py                                  # digits_resnet, mobilenetv3_cls; 64 trials
    python benchmarks/targets_results.py --models yolov8n --trials 32     # sample or real-model names

Both builds run first, each in a child process (tuning never overlaps timing, and its leftover threads
must not share the 2 cores); then ORT and the two artifacts are timed in alternating rounds in this one
process, and the medians are reported (2 threads each). `tuning s` = tuned build − untuned build.
"""

from __future__ import annotations

import os

os.environ["TVM_NUM_THREADS"] = "2"  # read when the TVM runtime starts: must precede any tvm import

import argparse
import contextlib
import multiprocessing
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from common import SAMPLES, real_models, table

from rewriter import rewrite
from rewriter.bench import ort_latency_ms
from rewriter.errors import RewriterError
from rewriter.loading import serialize
from rewriter.metrics import count_macs
from rewriter.targets import artifact_latency_ms, build_artifact, resolve_target

THREADS = 2


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _model_paths(names: list[str]) -> dict[str, tuple[Path, Path]]:
    paths, real = {}, None
    for name in names:
        if (SAMPLES / f"{name}.onnx").exists():
            paths[name] = (SAMPLES / f"{name}.onnx", SAMPLES / "digits_calib.npz")
        else:
            real = real if real is not None else real_models()
            if name not in real:
                raise SystemExit(f"unknown model {name!r}: use a samples/ name or one of {', '.join(real)}")
            paths[name] = real[name]
    return paths


def _inputs(model, calib: Path) -> tuple[list[str], list[np.ndarray]]:
    """The model's real inputs in ONNX order, each the first calibration sample in the model's dtype."""
    import onnx

    initializers = {init.name for init in model.graph.initializer}
    real = [v for v in model.graph.input if v.name not in initializers]
    with np.load(calib) as data:
        dtypes = [onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type) for v in real]
        arrays = [np.ascontiguousarray(data[v.name][:1], dtype) for v, dtype in zip(real, dtypes, strict=True)]
    names = [v.name for v in real]
    return names, arrays


def _flatten(value) -> list[np.ndarray]:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    return [array for item in value for array in _flatten(item)]


def _max_diff(artifact: Path, inputs: list[np.ndarray], reference: list[np.ndarray]) -> float:
    import tvm
    from tvm import relax

    device = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(artifact)), device)
    outputs = _flatten(vm["main"](*[tvm.runtime.tensor(x, device) for x in inputs]))
    return max(float(np.max(np.abs(out.astype(np.float64) - ref))) for out, ref in zip(outputs, reference, strict=True))


def _build(model, artifact: Path, trials: int, db: str | None) -> float:
    with contextlib.redirect_stdout(sys.stderr):  # MetaSchedule logs to stdout: keep it for the table
        return build_artifact(model, resolve_target("x86"), artifact, tune_trials=trials, tuning_db=db,
                              log=_log)["build_seconds"]


def _row(name: str, path: Path, calib: Path, trials: int, work: Path, rounds: int) -> list:
    import onnxruntime as ort

    _log(f"[{name}] canonicalising")
    model = rewrite(path, calib=calib).model
    names, inputs = _inputs(model, calib)
    feed = dict(zip(names, inputs, strict=True))
    blob = serialize(model)
    reference = [r.astype(np.float64) for r in ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
                 .run(None, feed)]
    spec = resolve_target("x86")
    artifacts: dict[str, Path | None] = {"untuned": work / f"{name}.untuned.so", "tuned": work / f"{name}.tuned.so"}
    seconds, notes = {}, {}
    for kind, trial_count in (("untuned", 0), ("tuned", trials)):
        db = str(work / f"{name}.db") if trial_count else None
        try:  # tune in a child process: its leftover threads must not share the cores with the timing below
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                seconds[kind] = pool.submit(_build, model, artifacts[kind], trial_count, db).result()
        except RewriterError as exc:
            _log(f"[{name}] {kind} build failed: {exc}")
            artifacts[kind], notes[kind] = None, f"failed: {exc}"
    # Tuning is over (its process is gone): now time the variants in alternating rounds.
    timings: dict[str, list[float]] = {"ort": [], "untuned": [], "tuned": []}
    for round_no in range(rounds):
        _log(f"[{name}] timing round {round_no + 1}/{rounds}")
        timings["ort"].append(ort_latency_ms(blob, feed, threads=THREADS))
        for kind in ("untuned", "tuned"):
            if artifacts[kind] is not None:
                timings[kind].append(artifact_latency_ms(artifacts[kind], spec, inputs))

    def cell(kind: str) -> str:
        return f"{statistics.median(timings[kind]):.3f}" if timings[kind] else notes.get(kind, "–")

    diffs = [f"{_max_diff(artifacts[k], inputs, reference):.1e}" if artifacts[k] else "–" for k in ("untuned", "tuned")]
    tuning = f"{seconds['tuned'] - seconds['untuned']:.0f}" if artifacts["tuned"] else "–"
    return [name, f"{count_macs(model) / 1e6:.1f}M", cell("ort"), cell("untuned"), cell("tuned"), tuning,
            " / ".join(diffs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=64, help="MetaSchedule trials per model (default 64)")
    parser.add_argument("--models", default="digits_resnet,mobilenetv3_cls", help="comma-separated model names")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (median reported)")
    parser.add_argument("--keep", help="keep the artifacts and tuning databases in this folder")
    args = parser.parse_args()
    import tvm

    _log(f"TVM threads: {tvm.runtime.num_threads()}, ORT threads: {THREADS}, timing rounds: {args.rounds}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="targets-results-") as tmp:
        tmp = args.keep or tmp
        for name, (path, calib) in _model_paths([m.strip() for m in args.models.split(",") if m.strip()]).items():
            rows.append(_row(name, path, calib, args.trials, Path(tmp), args.rounds))
    header = ["model", "MACs", "ORT ms", "TVM untuned ms", f"TVM tuned ms ({args.trials} trials)",
              "tuning s", "max \\|TVM − ORT\\| (untuned / tuned)"]
    print(table(header, rows))


if __name__ == "__main__":
    main()
