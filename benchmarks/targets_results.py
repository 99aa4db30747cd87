"""TVM x86 artifacts against onnxruntime: latency before the CPU schedule rules, with them, and tuned from them.

    python benchmarks/targets_results.py                                  # digits_resnet, mobilenetv3_cls; 64 trials
    python benchmarks/targets_results.py --models yolov8n --trials 0      # sample or real-model names; 0: no tuning
    python benchmarks/targets_results.py --models yolov8n --profile       # also the per-kernel latency table
    python benchmarks/targets_results.py --models yolov8n --trials 0 --prune 0.3   # + the pruned model's rows
    python benchmarks/targets_results.py --models ddddocr_det,ddddocr_rec --trials 0   # another exporter's models
    python benchmarks/targets_results.py --models dbnet --trials 1500 --keep DIR --reuse  # re-time kept artifacts

Variants: `before` = the plain zero pipeline with no schedules (TVM 0.27's untuned CPU build, what
targets/ did before the rules), `rules` = the untuned build (blocked layout and rule schedules),
`tuned` = MetaSchedule from the rules for --trials trials in total. Every build runs first, each in a
child process (tuning never overlaps timing, and its leftover threads must not share the 2 cores);
then ORT and the artifacts are timed in alternating rounds, each timing in a fresh child process, and the
medians are reported (2 threads each), each also as a ratio to onnxruntime's median from the same rounds.
A fresh process per timing matters: once a TVM artifact has run in a process (its thread pool started there),
onnxruntime timed after it in that process ran YOLOv8n in 20-21 ms instead of 14-15.

With --prune R a second row per model holds the model pruned at prune.ratio=R (its calibration data, the CLI's
defaults): its ratios are to onnxruntime on the *original* model, timed in the same rounds, which is what a
user who swaps the original for the compiled pruned model gains.
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
from common import SAMPLES, at_named_strength, real_models, table

from rewriter.bench import ort_latency_ms
from rewriter.errors import RewriterError
from rewriter.loading import serialize
from rewriter.metrics import count_macs
from rewriter.targets import build_artifact, resolve_target

THREADS = 2


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


UNSEEN = ("ddddocr_det", "ddddocr_rec")  # another exporter's models, never used to write the rules


def _unseen_model(name: str, work: Path) -> tuple[Path, Path]:
    """ddddocr's YOLOX-style detector (a crop of scikit-image's photographs) or its CNN + BiLSTM recogniser (a word
    span of page.png), with a one-sample calibration file written into `work`."""
    from distill_unseen import photo_crops
    from fetch_real_models import default_cache, fetch_extra_models, recogniser_spans

    with contextlib.redirect_stdout(sys.stderr):
        path = fetch_extra_models(default_cache())[name]
    rng = np.random.default_rng(0)
    feed = {"images": photo_crops(1, rng)} if name == "ddddocr_det" else {"input1": recogniser_spans(1, rng)}
    calib = work / f"{name}_calib.npz"
    np.savez(calib, **feed)
    return path, calib


def _model_paths(names: list[str], work: Path) -> dict[str, tuple[Path, Path]]:
    paths, real = {}, None
    for name in names:
        if (SAMPLES / f"{name}.onnx").exists():
            paths[name] = (SAMPLES / f"{name}.onnx", SAMPLES / "digits_calib.npz")
        elif name in UNSEEN:
            paths[name] = _unseen_model(name, work)
        else:
            real = real if real is not None else real_models()
            if name not in real:
                raise SystemExit(f"unknown model {name!r}: use a samples/ name or one of {', '.join([*real, *UNSEEN])}")
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


def _build_before(model, artifact: Path, _trials: int, _db: str | None) -> float:
    """TVM 0.27's own untuned CPU build: zero pipeline, no layout change, no schedules."""
    import time

    import tvm
    from tvm import relax

    from rewriter.targets.lower import import_onnx
    from rewriter.targets.presets import make_tvm_target

    start = time.perf_counter()
    target = make_tvm_target(resolve_target("x86"))
    with target:
        fused = tvm.transform.Sequential([relax.transform.ConvertToDataflow(min_size=1),
                                          relax.get_pipeline("zero")])(import_onnx(model))
        tvm.compile(fused, target=target, relax_pipeline="default_build").export_library(str(artifact))
    return time.perf_counter() - start


def _in_child(function, *args, **kwargs):
    """function(*args, **kwargs) in a fresh spawned process, so that no runtime's threads outlive it here."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args, **kwargs).result()


def _latency_ms(artifact: Path, inputs: list[np.ndarray], budget_s: float = 1.0) -> float:
    """Median ms per call; the number of calls per repeat adapts so a slow build is not timed for minutes."""
    import time

    import tvm
    from tvm import relax

    device = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(artifact)), device)
    args = [tvm.runtime.tensor(x, device) for x in inputs]
    start = time.perf_counter()
    vm["main"](*args)
    once = time.perf_counter() - start
    number = max(1, min(20, int(budget_s / 3 / max(once, 1e-6))))
    return float(vm.time_evaluator("main", device, number=number, repeat=3)(*args).median * 1e3)


def _static_model(path: Path, calib: Path):
    """The model canonicalised at the calibration data's shapes (batch 1), as the CLI builds it."""
    import onnx

    from rewriter.canonical import canonicalize, graph_inputs

    original = onnx.load(str(path))
    with np.load(calib) as data:
        shapes = {v.name: [1, *data[v.name].shape[1:]] for v in graph_inputs(original)}
    return canonicalize(original, shapes)


VARIANTS = ("before", "rules", "tuned")


def _pruned_model(path: Path, calib: Path, ratio: float, round_to: int):
    from rewriter import rewrite

    options = {"prune": {"ratio": ratio, "round_to": round_to}}
    pruned = rewrite(str(path), passes=["prune"], calib=str(calib), options=at_named_strength(["prune"], options)).model
    with np.load(calib) as data:  # rewrite keeps the user's dynamic batch: fix it to 1 as the builds do
        shapes = {v.name: [1, *data[v.name].shape[1:]] for v in pruned.graph.input if v.name in data.files}
    from rewriter.canonical import canonicalize

    return canonicalize(pruned, shapes)


def _row(name: str, path: Path, calib: Path, trials: int, work: Path, rounds: int, profile: bool,
         prune: float | None = None, round_to: int = 1, reuse: bool = False) -> list:
    import onnxruntime as ort

    _log(f"[{name}] canonicalising")
    original = _static_model(path, calib)
    model = original
    if prune is not None:
        _log(f"[{name}] pruning at ratio {prune}")
        model = _pruned_model(path, calib, prune, round_to)
        name = f"{name} pruned {prune}, round_to {round_to} ({count_macs(model) / count_macs(original):.2f} MACs)"
    names, inputs = _inputs(model, calib)
    feed = dict(zip(names, inputs, strict=True))
    blob = serialize(original)  # ORT times the original: a pruned row's ratios are to the model it replaces
    session = ort.InferenceSession(serialize(model), providers=["CPUExecutionProvider"])
    reference = [r.astype(np.float64) for r in session.run(None, feed)]
    stem = name.split(" ")[0] + (f".pruned{prune}r{round_to}" if prune is not None else "")
    artifacts: dict[str, Path | None] = {kind: work / f"{stem}.{kind}.so" for kind in VARIANTS}
    builders = {"before": (_build_before, 0), "rules": (_build, 0), "tuned": (_build, trials)}
    seconds, notes = {}, {}
    for kind in VARIANTS:
        builder, trial_count = builders[kind]
        if kind == "tuned" and trials == 0:
            artifacts[kind], notes[kind] = None, "–"
            continue
        db = str(work / f"{stem}.db") if trial_count else None
        if reuse and artifacts[kind].exists():  # re-time a kept artifact in a quieter spell without rebuilding it
            _log(f"[{name}] reusing {artifacts[kind]}")
            notes[kind] = "kept"
            continue
        _log(f"[{name}] building {kind}")
        try:  # build in a child process: its leftover threads must not share the cores with the timing below
            seconds[kind] = _in_child(builder, model, artifacts[kind], trial_count, db)
        except RewriterError as exc:
            _log(f"[{name}] {kind} build failed: {exc}")
            artifacts[kind], notes[kind] = None, f"failed: {exc}"
    if profile:
        _print_profile(name, model)
    # Building is over (its processes are gone): now time the variants in alternating rounds.
    timings: dict[str, list[float]] = {"ort": [], **{kind: [] for kind in VARIANTS}}
    for round_no in range(rounds):
        _log(f"[{name}] timing round {round_no + 1}/{rounds}")
        timings["ort"].append(_in_child(ort_latency_ms, blob, feed, threads=THREADS))
        for kind in VARIANTS:
            if artifacts[kind] is not None:
                timings[kind].append(_in_child(_latency_ms, artifacts[kind], inputs))
        _log(f"[{name}] round {round_no + 1} ms: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in timings.items() if v))
    ort_ms = statistics.median(timings["ort"])

    def cell(kind: str) -> str:
        if not timings[kind]:
            return notes.get(kind, "–")
        ms = statistics.median(timings[kind])
        return f"{ms:.3f} ({ms / ort_ms:.2f}×)"

    diffs = [f"{_max_diff(artifacts[k], inputs, reference):.1e}" if artifacts[k] else "–" for k in ("rules", "tuned")]
    tuning = f"{(seconds['tuned'] - seconds['rules']) / 60:.1f}" if {"tuned", "rules"} <= seconds.keys() else "–"
    return [name, f"{count_macs(model) / 1e6:.1f}M", f"{ort_ms:.3f}", cell("before"), cell("rules"), cell("tuned"),
            tuning, " / ".join(diffs)]


def _print_profile(name: str, model) -> None:
    """Per-kernel latency of the rules build (each fused kernel compiled and timed on its own)."""
    text = _in_child(_profile_text, model)
    print(f"\n{name}: slowest kernels of the untuned build with the rules\n\n{text}\n", flush=True)


def _profile_text(model) -> str:
    from rewriter.targets.lower import fuse_pipeline, import_onnx, schedule_pipeline
    from rewriter.targets.presets import make_tvm_target
    from rewriter.targets.profile import kernel_profile, profile_table

    target = make_tvm_target(resolve_target("x86"))
    with target:
        scheduled = schedule_pipeline(target)(fuse_pipeline()(import_onnx(model)))
    return profile_table(kernel_profile(scheduled, target), limit=12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=64, help="MetaSchedule trials per model (default 64)")
    parser.add_argument("--models", default="digits_resnet,mobilenetv3_cls", help="comma-separated model names")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (median reported)")
    parser.add_argument("--keep", help="keep the artifacts and tuning databases in this folder")
    parser.add_argument("--reuse", action="store_true",
                        help="re-time the artifacts already in the --keep folder instead of building them again")
    parser.add_argument("--profile", action="store_true", help="print each model's slowest kernels (rules build)")
    parser.add_argument("--prune", type=float,
                        help="also each model pruned at this prune.ratio, timed against ORT on the original")
    parser.add_argument("--round-to", type=int, nargs="+", default=[8],
                        help="prune.round_to values for --prune (default 8: what --target x86 prunes to)")
    args = parser.parse_args()
    import tvm

    _log(f"TVM threads: {tvm.runtime.num_threads()}, ORT threads: {THREADS}, timing rounds: {args.rounds}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="targets-results-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name, (path, calib) in _model_paths([m.strip() for m in args.models.split(",") if m.strip()], work).items():
            rows.append(_row(name, path, calib, args.trials, work, args.rounds, args.profile, reuse=args.reuse))
            if args.prune is not None:
                for round_to in args.round_to:
                    rows.append(_row(name, path, calib, args.trials, work, args.rounds, False, args.prune, round_to,
                                     reuse=args.reuse))
    header = ["model", "MACs", "ORT ms (original model)", "TVM before rules ms (×ORT)", "TVM rules, untuned ms (×ORT)",
              f"TVM tuned from rules, {args.trials} trials ms (×ORT)", "tuning min",
              "max \\|TVM − ORT\\| (rules / tuned)"]
    print(table(header, rows))


if __name__ == "__main__":
    main()
