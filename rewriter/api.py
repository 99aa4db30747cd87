"""The Python API: `rewrite(model, passes=[...], target=..., calib=..., options={...})`."""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from . import metrics
from .bench import ort_latency_ms
from .budget import achieved, check_budget, run_to_budget, totals
from .calib import LABELS, Calibration, check_arrays, load_calibration, split, synthetic_calibration
from .canonical import canonicalize, graph_inputs, resolve_input_shapes
from .errors import ModelError, UsageError
from .inspection import layer_table
from .interface import ensure_runs, restore_dynamic_dims
from .layouts import parse_output_axis
from .loading import external_data_files, is_large, load_model, save_model
from .output import check_out_dir, staged_dir
from .pass_api import PassContext
from .pipeline import Reference, checked, run_passes, warn_collapse
from .progress import log
from .registry import make_pass, resolve_options, retry_settings
from .report_html import render as render_html
from .settings import (
    check_input_shapes,
    check_options,
    check_remote,
    check_run_settings,
    check_target_options,
    pass_names,
)

# The package that lowers models through TVM; the core reaches it by name only.
TARGETS_PACKAGE = "rewriter.targets"
SYNTHETIC_SAMPLES = 64
BENCH_THREADS = 2  # onnxruntime and the artifact are timed with the same number of threads


@dataclass
class RewriteResult:
    model: onnx.ModelProto
    report: dict
    out_dir: Path | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)


def _targets():
    return importlib.import_module(TARGETS_PACKAGE)


def _load_calib(
    calib: str | Path | Calibration | Mapping | None, model: onnx.ModelProto, given: Mapping | None, seed: int
) -> Calibration | None:
    if calib is None or isinstance(calib, Calibration):
        return calib
    if isinstance(calib, Mapping):
        arrays = {k: np.asarray(v) for k, v in calib.items() if k != LABELS}
        labels = calib.get(LABELS)
        return check_arrays(arrays, None if labels is None else np.asarray(labels), model, "arrays")
    if str(calib) == "synthetic":
        return synthetic_calibration(model, resolve_input_shapes(model, given), SYNTHETIC_SAMPLES, seed)
    return load_calibration(calib, model)


def _check_calib_shapes(calib: Calibration, shapes: Mapping[str, list[int]]) -> None:
    for name, fed in calib.feed_shapes().items():
        if list(fed) != list(shapes[name]):
            raise UsageError(
                f"calibration array {name!r} feeds samples of shape {list(fed)} but the model is "
                f"built for {shapes[name]}"
            )


def _plan(passes: Sequence[str], options: Mapping[str, Mapping[str, Any]]) -> list[tuple[Any, dict]]:
    """Instantiate every pass up front, so a bad name or option fails before any work."""
    unused = sorted(set(options) - set(passes))
    for name in unused:
        make_pass(name, options[name])  # still validated: a typo must not pass silently
        log(f"options for pass {name!r} given but the pass is not run")
    return [(make_pass(name, options.get(name, {})), resolve_options(name, options.get(name, {}))) for name in passes]


def rewrite(
    model: str | Path | onnx.ModelProto,
    passes: Sequence[str] = (),
    target: str = "none",
    calib: str | Path | Calibration | Mapping | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    out_dir: str | Path | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    max_drop: float | None = None,
    seed: int = 0,
    holdout: float = 0.25,
    force: bool = False,
    tune_trials: int = 0,
    tuning_db: str | None = None,
    bench: bool = False,
    budget: Mapping[str, float] | None = None,
    output_axes: Mapping[str, int | str] | None = None,
    target_options: Mapping[str, str] | None = None,
    rpc: str | None = None,
    device_key: str | None = None,
) -> RewriteResult:
    """Canonicalise, run the passes with their checks, and (with out_dir) write model, artifact, report."""
    start = time.perf_counter()
    if not isinstance(model, str | Path | onnx.ModelProto):
        raise UsageError(f"model must be a path or an onnx.ModelProto, got {type(model).__name__}")
    check_run_settings(target=target, calib=calib, out_dir=out_dir, max_drop=max_drop, seed=seed, holdout=holdout,
                       force=force, tune_trials=tune_trials, tuning_db=tuning_db, bench=bench)
    passes, options = pass_names(passes), check_options(options)
    input_shapes = check_input_shapes(input_shapes)
    path = None if isinstance(model, onnx.ModelProto) else Path(model)
    if out_dir is not None:
        check_out_dir(Path(out_dir), force, [path] if path is not None else [])
    target_options = check_target_options(target_options)
    check_remote(rpc, device_key, bench, tune_trials, out_dir)
    spec = _targets().resolve_target(target, target_options)
    if tuning_db is not None and spec.name != "none":
        _targets().check_db_path(tuning_db, tune_trials)  # a mistyped database fails before any pass runs
    plan = _plan(passes, options)
    budget = check_budget(budget)
    output_axes = check_output_axes(output_axes)
    original = load_model(path) if path is not None else model
    if out_dir is not None and path is not None:
        check_out_dir(Path(out_dir), force, [path, *external_data_files(path)])
    data = _load_calib(calib, original, input_shapes, seed)
    if max_drop is not None and data is None:
        raise UsageError("--max-drop needs calibration data to measure fidelity (--calib)")
    shapes = resolve_input_shapes(original, input_shapes, data.feed_shapes() if data else None)
    if data is not None:
        _check_calib_shapes(data, shapes)
    log(f"canonicalising for input shape(s) {shapes}")
    base = checked(canonicalize(original, shapes), "canonicalisation")
    log(f"outputs built for shape(s) {_output_shapes(base)}")

    fit, reference = None, None
    if data is None:
        log("no calibration data (--calib): fidelity is not measured")
    else:
        fit, held = split(data, holdout, seed)
        reference = Reference.build(original, base, held, output_axes)
        log("fidelity read along: " + "; ".join(f"{n}: axis {lay.feature_axis} ({lay.why})"
                                               for n, lay in reference.layouts.items()))
    # Under --budget the cuts are the user's choice: no pass is retried milder.
    retries = {} if budget else {name: retry_settings(name, options.get(name, {})) for name in passes}
    ctx = PassContext(fit=fit, seed=seed, budget=budget, teacher=base, channel_multiple=spec.channel_multiple,
                      output_axes=output_axes, retries=retries)
    final, records, budget_report = _run(base, plan, ctx, reference, max_drop)
    if max_drop is None and records:
        warn_collapse(records[-1]["fidelity"])

    feeds = _check_feeds(reference, shapes, original, seed)
    written, interface = restore_dynamic_dims(original, final, feeds)
    ensure_runs(written)
    report = _report(path, original, base, final, records, reference, data)
    report["output"]["bytes"] = metrics.count_bytes(written)  # MACs at the fitted shape, bytes as written
    report["layers"] = layer_table(final)
    report["interface"] = interface
    report.update(input_shapes=shapes, seed=seed, max_drop=max_drop, budget=budget_report,
                  versions=_versions())
    report["target"] = {"name": spec.name, "tvm_target": spec.tvm_target, "options": target_options,
                        "artifact": None, "tuning_trials": tune_trials, "tuning_db": tuning_db}
    result = RewriteResult(written, report)
    feed = _bench_feed(reference, shapes, original, seed) if bench else None
    if feed is not None:
        report["bench"] = _bench(base, final, feed)
    if out_dir is not None:
        remote = (rpc, device_key) if rpc is not None else None
        _write(result, final, Path(out_dir), spec, force, tune_trials, tuning_db, start, feed, remote)
    report["seconds"] = round(time.perf_counter() - start, 3)
    return result


def _report(
    path: Path | None,
    original: onnx.ModelProto,
    base: onnx.ModelProto,
    final: onnx.ModelProto,
    records: list[dict],
    reference: Reference | None,
    data: Calibration | None,
) -> dict:
    """The report's model figures and fidelity (MACs of the input measured on its canonical form)."""
    canonical_fid = reference.measure(base) if reference else None
    input_bytes = path.stat().st_size if path is not None else metrics.count_bytes(original)
    return {
        "input": {**metrics.summarize(base, str(path) if path else None), "bytes": input_bytes,
                  "params": metrics.count_params(original)},
        "output": metrics.summarize(final, None),
        "output_shapes": _output_shapes(final),  # at the fitted shape; `interface` lists the open dims
        "calibration": _calib_report(data, reference),
        "canonical_fidelity": canonical_fid,
        "passes": records,
        "fidelity": records[-1]["fidelity"] if records else canonical_fid,
    }


def _versions() -> dict[str, str]:
    """Versions of the tools whose behaviour shapes the output, for reproducing a report."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("rewriter", "onnx", "onnxruntime", "onnxslim", "numpy", "scikit-learn", "apache-tvm"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def check_output_axes(given: Mapping[str, int | str] | None) -> dict[str, tuple[int, bool | None]]:
    """{output: 1 or '2:scores'} -> {output: (axis, carries class scores or None)}."""
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        raise UsageError(f"output_axes must map output names to axes, got {type(given).__name__}")
    checked_axes = {}
    for name, axis in given.items():
        if isinstance(axis, bool) or not isinstance(axis, int | str):
            raise UsageError(f"output_axes[{name!r}] must be an axis number or 'AXIS:scores', got {axis!r}")
        _, index, scores = parse_output_axis(f"{name}={axis}")
        checked_axes[name] = (index, scores)
    return checked_axes


def _run(base, plan, ctx: PassContext, reference: Reference | None, max_drop: float | None):
    """The passes, to the --budget when one is given: per-unit settings from sensitivity curves where the
    passes allow it and data is there to measure; else each pass's own uniform choice."""
    if not ctx.budget:
        final, records = run_passes(base, plan, ctx, reference, max_drop)
        return final, records, None
    if reference is not None and any(hasattr(rw, "budget_units") for rw, _ in plan):
        return run_to_budget(base, plan, ctx, reference, max_drop)
    if set(ctx.budget) - {"macs"}:
        raise UsageError("--budget params/size is spent per layer from measured sensitivity: give --calib and "
                         "prune or svd in --passes")
    final, records = run_passes(base, plan, ctx, reference, max_drop)
    report = {"method": "uniform", **achieved(ctx.budget, totals(base), final)}
    if not report["met"]:
        log(f"warning: MACs at {report['achieved']['macs']:.3f} of the original, over --budget "
            f"macs={ctx.budget['macs']}")
    return final, records, report


def _check_feeds(reference: Reference | None, shapes: Mapping, model: onnx.ModelProto, seed: int) -> list[dict]:
    """Two single samples at the fitted shape, to check the restored dims with."""
    source = reference.held if reference is not None and len(reference.held) >= 2 else None
    source = source or synthetic_calibration(model, shapes, 2, seed)
    return list(source.take(np.arange(2)).samples())


def _bench_feed(reference: Reference | None, shapes: Mapping, model: onnx.ModelProto, seed: int) -> dict:
    if reference is not None:
        return next(reference.held.samples())
    return next(synthetic_calibration(model, shapes, 1, seed).samples())


def _bench(base: onnx.ModelProto, final: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict:
    """onnxruntime latency of the canonicalised original and of the rewritten model, side by side."""
    log("timing the original and rewritten models in onnxruntime")
    return {
        "onnxruntime_ms": {"input": ort_latency_ms(base, feed, threads=BENCH_THREADS),
                           "output": ort_latency_ms(final, feed, threads=BENCH_THREADS)},
        "threads": BENCH_THREADS,
        "feed": {k: list(v.shape) for k, v in feed.items()},
    }


def _output_shapes(model: onnx.ModelProto) -> dict[str, list]:
    return {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in model.graph.output}


def _calib_report(data: Calibration | None, ref: Reference | None) -> dict | None:
    if data is None or ref is None:
        return None
    return {
        "source": data.source,
        "samples": len(data),
        "fit_samples": len(data) - len(ref.held),
        "held_out_samples": len(ref.held),
        "labels": data.labels is not None,
    }


def _diff_to_onnxruntime(output: np.ndarray, model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> float:
    """Max |device - onnxruntime| of the first output on the bench feed: the remote run is checked, not only
    timed (a board with a broken runtime would otherwise report a fine latency)."""
    import onnxruntime as ort

    from .loading import ort_session

    expected = ort_session(model, ort.SessionOptions()).run(None, feed)[0]
    return float(np.max(np.abs(output.astype(np.float64) - expected)))


def _write(
    result: RewriteResult, static: onnx.ModelProto, out_dir: Path, spec, force: bool, tune_trials: int, tuning_db,
    start: float, feed: dict[str, np.ndarray] | None, remote: tuple[str, str] | None = None,
) -> None:
    """model.onnx with the user's interface, the artifact built from the `static` (fitted-shape) model, the report."""
    if spec.name != "none" and is_large(static):
        raise ModelError(f"the rewritten model is over 2 GB: TVM builds (target {spec.name}) of such models are not "
                         "supported; use --target none to write model.onnx with its weights in model.onnx.data")
    with staged_dir(out_dir, force) as stage:
        files = save_model(result.model, stage / "model.onnx")  # over 2 GB: model.onnx.data holds the weights
        result.report["output"].update(path=str(out_dir.resolve() / "model.onnx"),
                                       bytes=sum(f.stat().st_size for f in files),
                                       external_data=files[1].name if len(files) > 1 else None)
        if spec.name != "none":
            log(f"building for target {spec.name}")
        artifact = stage / f"model.{spec.artifact_suffix}.so"
        target = _targets().build_artifact(static, spec, artifact, tune_trials, tuning_db, log, remote=remote)
        result.report["target"].update(target)
        if feed is not None and target.get("artifact"):
            log("timing the artifact")
            inputs = [feed[v.name] for v in graph_inputs(static)]
            if remote is not None:
                tracker, key = remote
                log(f"timing the artifact on a {key!r} device from the tracker at {tracker}")
                timing = _targets().remote_timing(artifact, inputs, tracker, key)
                result.report["bench"].update(artifact_ms=timing["ms"], remote={
                    "tracker": tracker, "device_key": key, "devices": timing["devices"],
                    "max_abs_diff": _diff_to_onnxruntime(timing["first_output"], static, feed)})
            elif _targets().runs_here(spec):  # TVM's thread pool is sized per process: time it in a fresh one
                timing = _targets().artifact_timing(artifact, inputs, BENCH_THREADS)
                result.report["bench"].update(artifact_ms=timing["ms"], artifact_threads=timing["threads"])
            else:
                result.report["bench"]["artifact_ms"] = None
        # The report is final only after every other file is in place; write it last.
        result.report["seconds"] = round(time.perf_counter() - start, 3)
        (stage / "report.html").write_text(render_html(result.report))
        (stage / "report.json").write_text(json.dumps(result.report, indent=2) + "\n")
    result.out_dir = out_dir
    result.artifacts = {"model": out_dir / "model.onnx", "report": out_dir / "report.json",
                        "html": out_dir / "report.html"}
    if result.report["output"]["external_data"]:
        result.artifacts["model_data"] = out_dir / result.report["output"]["external_data"]
    if result.report["target"].get("artifact"):
        result.artifacts["library"] = out_dir / result.report["target"]["artifact"]
