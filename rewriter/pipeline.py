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


def _check_finite(model: onnx.ModelProto, name: str) -> None:
    """A pass that writes NaN or Inf weights has failed, whatever its fidelity says."""
    for tensor in model.graph.initializer:
        if tensor.data_type in FLOAT_TYPES:
            values = numpy_helper.to_array(tensor)
            if not np.all(np.isfinite(values)):
                raise ModelError(f"pass {name!r} produced non-finite weights in {tensor.name!r}")


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
        + ")"
    )


def run_passes(
    model: onnx.ModelProto,
    passes: Sequence[tuple[Pass, dict]],
    ctx: PassContext,
    reference: Reference | None,
    max_drop: float | None,
) -> tuple[onnx.ModelProto, list[dict]]:
    """Run each (pass, options) in order; return the final model and one record per pass."""
    records = []
    for rewrite, options in passes:
        name = rewrite.name
        log(f"pass {name} ...")
        start = time.perf_counter()
        macs_before, bytes_before = metrics.count_macs(model), metrics.count_bytes(model)
        result = rewrite.run(model, ctx)
        _check_finite(result.model, name)
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
        records.append(record)
        log(_summary(record))
        _guard(name, fid, max_drop)
        model = new
    return model, records


def _summary(record: dict) -> str:
    fid = record["fidelity"]
    quality = f", drop {fid['drop']:.4f}" if fid else ""
    ratio = record["macs_after"] / max(record["macs_before"], 1)
    return (
        f"pass {record['name']}: {len(record['changed'])} layer(s) changed, "
        f"MACs x{ratio:.3f}, bytes {record['bytes_before']} -> {record['bytes_after']}{quality} "
        f"({record['seconds']:.1f} s)"
    )
