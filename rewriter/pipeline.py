"""Passes in sequence, each followed by the checks: ONNX checker, shape inference, fidelity."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from . import capture, fidelity, metrics
from .calib import Calibration
from .errors import GuardrailError, ModelError
from .layouts import OutputLayout, infer_layouts
from .loading import check_model, infer_shapes
from .pass_api import Pass, PassContext
from .progress import log

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
COLLAPSE = 0.5  # a drop this large is reported even when no --max-drop was asked for
# Without --max-drop, a pass that drops fidelity by more than this is run again at its gentler settings, if any.
FIDELITY_TARGET = 0.05


@dataclass
class Reference:
    """The original model's outputs on the held-out samples (one array per sample), kept from the start,
    and how each output is read (its feature axis and class scores)."""

    held: Calibration
    names: list[str]
    outputs: dict[str, list[np.ndarray]]
    layouts: dict[str, OutputLayout]

    @classmethod
    def build(
        cls, original: onnx.ModelProto, canonical: onnx.ModelProto, held: Calibration,
        given_axes: Mapping[str, tuple[int, bool | None]] | None = None,
    ) -> Reference:
        names = [o.name for o in original.graph.output]
        outputs = capture.collect_samples(original, held, names, desc="reference outputs")
        return cls(held, names, outputs, infer_layouts(canonical, outputs, held.labels, given_axes))

    def measure(self, model: onnx.ModelProto, desc: str | None = None) -> dict:
        new = capture.collect_samples(model, self.held, self.names, desc=desc)
        return fidelity.compare(self.names, self.outputs, new, self.layouts, self.held.labels)


def checked(model: onnx.ModelProto, who: str) -> onnx.ModelProto:
    """Full ONNX check and fresh shape inference (a new model; the one given is left as it was: a pass that
    changed nothing hands back its input); a failure here is a bug in `who`."""
    kept = list(model.graph.value_info)
    model.graph.ClearField("value_info")
    try:
        inferred = infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        check_model(inferred, full_check=True)
    except Exception as exc:
        raise ModelError(f"{who} produced an invalid model: {str(exc).strip().splitlines()[0]}") from exc
    finally:
        model.graph.value_info.extend(kept)
    return inferred


def _non_finite(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    found = {}
    for tensor in model.graph.initializer:
        if tensor.data_type in FLOAT_TYPES:
            values = numpy_helper.to_array(tensor)
            if not np.all(np.isfinite(values)):
                found[tensor.name] = values
    return found


def _check_finite(before: onnx.ModelProto, after: onnx.ModelProto, name: str) -> None:
    """A pass that writes NaN or Inf weights has failed, whatever its fidelity says. The input's own (a Clip
    bound of inf, as PyTorch exports an open bound) are not the pass's doing, wherever the pass left them."""
    written = _non_finite(after)
    given = list(_non_finite(before).values()) if written else []  # the input is read only when there is a doubt
    for tensor, values in written.items():
        if not any(v.shape == values.shape and np.array_equal(v, values, equal_nan=True) for v in given):
            raise ModelError(f"pass {name!r} produced non-finite weights in {tensor!r}")


def warn_collapse(fid: dict | None) -> None:
    """Without --max-drop nothing refuses a wrecked model; say so even under --quiet."""
    if fid is not None and fid["drop"] >= COLLAPSE:
        print(f"rewrite: warning: fidelity collapsed (drop {fid['drop']:.3f}, sample cosine {fid['cosine']:.3f}); "
              "set --max-drop to refuse such results", file=sys.stderr, flush=True)


def _guard(name: str, fid: dict | None, max_drop: float | None) -> None:
    if max_drop is None or fid is None or fid["drop"] <= max_drop:
        return
    worst = fid["channel_cosine_worst"]
    raise GuardrailError(
        f"pass {name!r} dropped fidelity by {fid['drop']:.4f} > --max-drop {max_drop} "
        f"(worst channel cosine {fid['channel_cosine_min']:.4f} at {worst['output']} channel {worst['channel']} "
        f"of axis {worst['axis']}, sample cosine {fid['cosine']:.4f}"
        + (f", top-1 agreement {fid['top1_agreement']:.4f}" if "top1_agreement" in fid else "")
        + (f", reading error {fid['reading_error']:.4f}" if "reading_error" in fid else "")
        + ")"
    )


def run_passes(
    model: onnx.ModelProto,
    passes: Sequence[tuple[Pass, dict]],
    ctx: PassContext,
    reference: Reference | None,
    max_drop: float | None,
) -> tuple[onnx.ModelProto, list[dict]]:
    """Run each (pass, options) in order; return the final model and one record per pass. A pass that loses more
    than the target (--max-drop, else FIDELITY_TARGET) runs again at its gentler settings (ctx.retries) until one
    is within it; the first within, else the most faithful, is kept, and --max-drop judges that one."""
    records = []
    target = FIDELITY_TARGET if max_drop is None else max_drop
    for rewrite, options in passes:
        new, record = _within_target(rewrite, options, model, ctx, reference, target)
        if getattr(rewrite, "keeps_graph", False) and record["fidelity"] is not None:
            new = _unless_worse(model, new, record, records, reference)
        records.append(record)
        _guard(rewrite.name, record["fidelity"], max_drop)
        model = new
    return model, records


def _within_target(rewrite: Pass, options: dict, model: onnx.ModelProto, ctx: PassContext,
                   reference: Reference | None, target: float) -> tuple[onnx.ModelProto, dict]:
    """The pass, then while it loses more than `target` the pass again at each of its gentler settings: the first
    run within the target, else the most faithful one (its record lists every run when there was more than one)."""
    start = time.perf_counter()
    new, record = _attempt(rewrite, options, model, ctx, reference)
    tries, ladder = [(new, record)], ctx.retries.get(rewrite.name, ())
    varied = sorted({key for settings in ladder for key in settings})
    for settings in ladder:
        if not _over(record, target):
            break
        log(f"pass {rewrite.name}: drop {record['fidelity']['drop']:.4f} over the fidelity target {target}; "
            f"again with {_settings(settings)} (that run took {record['seconds']:.0f} s)")
        gentler = type(rewrite)(**{**options, **settings})
        tries.append(_attempt(gentler, {**options, **settings}, model, ctx, reference))
        new, record = tries[-1]
    if _over(record, target):
        new, record = min(tries, key=lambda t: t[1]["fidelity"]["drop"])
        if len(tries) > 1:
            log(f"warning: pass {rewrite.name} loses more than the fidelity target {target} at every setting "
                f"tried; kept {_settings(record['options'], varied)} (drop {record['fidelity']['drop']:.4f})")
    if len(tries) > 1:
        record["fidelity_target"] = target
        record["tried"] = [_tried(r, varied) for _, r in tries]
        record["seconds"] = round(time.perf_counter() - start, 3)
    return new, record


def _unless_worse(before: onnx.ModelProto, after: onnx.ModelProto, record: dict, records: list[dict],
                  reference: Reference) -> onnx.ModelProto:
    """A pass that only retrains values (distill) and reads worse on the held-out samples than its input did
    leaves the input as it was: it chose its state on its own split of the fit samples, and a few dozen of
    those can favour one that the held-out samples read as worse. The record keeps what it would have given."""
    previous = records[-1]["fidelity"] if records else reference.measure(before)
    if record["fidelity"]["drop"] <= previous["drop"]:
        return after
    log(f"pass {record['name']}: held-out drop {previous['drop']:.4f} -> {record['fidelity']['drop']:.4f}; "
        "kept the model as it was before it")
    record["not_kept"] = {"fidelity": record["fidelity"], "changed": record["changed"]}
    record.update(fidelity=previous, changed=[])
    return before


def _attempt(rewrite: Pass, options: dict, model: onnx.ModelProto, ctx: PassContext,
             reference: Reference | None) -> tuple[onnx.ModelProto, dict]:
    """One run of the pass with its checks: the checked model and its record."""
    name = rewrite.name
    log(f"pass {name} ...")
    start = time.perf_counter()
    macs_before, bytes_before = metrics.count_macs(model), metrics.count_bytes(model)
    result = rewrite.run(model, ctx)
    _check_finite(model, result.model, name)
    new = checked(result.model, f"pass {name!r}")
    fid = reference.measure(new, desc=f"fidelity after {name}") if reference else None
    effective = result.notes.pop("effective_options", None)  # e.g. a ratio --budget chose
    record = {
        "name": name,
        "options": {**options, **(effective or {})},
        **({"options_given": options} if effective else {}),
        "changed": list(result.changed),
        "macs_before": macs_before,
        "macs_after": metrics.count_macs(new),
        "bytes_before": bytes_before,
        "bytes_after": metrics.count_bytes(new),
        "fidelity": fid,
        "seconds": round(time.perf_counter() - start, 3),
        "notes": result.notes,
    }
    log(_summary(record))
    return new, record


def _over(record: dict, target: float) -> bool:
    return record["fidelity"] is not None and record["fidelity"]["drop"] > target


def _settings(options: Mapping, keys: Sequence[str] | None = None) -> str:
    return ", ".join(f"{k}={options[k]}" for k in (options if keys is None else keys))


def _tried(record: dict, varied: Sequence[str]) -> dict:
    """What one run of a retried pass gave, for the report: the settings it varied and their outcome."""
    keys = ("macs_after", "bytes_after", "seconds")
    return {"options": {k: record["options"][k] for k in varied}, "drop": record["fidelity"]["drop"],
            **{k: record[k] for k in keys}}


def _summary(record: dict) -> str:
    fid = record["fidelity"]
    quality = f", drop {fid['drop']:.4f}" if fid else ""
    ratio = record["macs_after"] / max(record["macs_before"], 1)
    return (
        f"pass {record['name']}: {len(record['changed'])} layer(s) changed, "
        f"MACs x{ratio:.3f}, bytes {record['bytes_before']} -> {record['bytes_after']}{quality} "
        f"({record['seconds']:.1f} s)"
    )
