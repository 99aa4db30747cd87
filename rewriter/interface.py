"""Give the written model back the user's interface: the dynamic dims (batch, height, width…) it was exported with.

Fits and TVM builds use one static shape, so the rewritten graph carries static dims everywhere. A pipeline
that fed batches of 8 to the original must be able to do the same with the rewritten model, so the input and
output dims are restored wherever the graph is valid for them, and checked in onnxruntime:
- batch: a batch of samples must give exactly the per-sample outputs of the static model;
- other dims (height, width, sequence length): at a second size the model must run, give the original's output
  shape and answer like the original at least as well as it does at the fitted size.
Dims that fail their check stay static, and the report says why.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .canonical import declared_shape, graph_inputs
from .errors import ModelError
from .graph import (
    GraphView,
    all_nodes,
    attributes,
    node_reads,
    node_subgraphs,
    remove_initializers,
    subgraphs,
    unique_name,
)
from .loading import check_model, infer_shapes, ort_session

Dim = tuple[str, int]  # (input name, axis)
BATCH_CHECK = 2
# A non-batch dim is checked at this many positions more (a multiple of the usual stride 32 for images).
STEP = 32
COSINE_SLACK = 0.02


@dataclass
class _Check:
    """What one attempt restored, or why it could not."""

    model: onnx.ModelProto | None
    why: str = ""


def _dynamic_dims(original: onnx.ModelProto) -> dict[Dim, str]:
    """{(input, axis): dim name} for every input dim the original leaves open."""
    found = {}
    for value in graph_inputs(original):
        for axis, dim in enumerate(declared_shape(value)):
            if not isinstance(dim, int) or dim <= 0:
                name = dim if isinstance(dim, str) and dim != "?" else f"{value.name}_dim{axis}"
                found[(value.name, axis)] = name
    return found


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures are expected here and reported, not logged
    return ort_session(model, options)


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return _session(model).run(None, feed)


def _free_batch_in_reshapes(model: onnx.ModelProto) -> None:
    """Reshapes whose target copies the fitted batch (folded into a constant, e.g. [1, 4, 16, 2100]) get 0 there,
    "copy the input's dim"; those that fold a batch of 1 into the next axis or split it off again get -1 there.
    Then the batch can open again; the batch check tells whether that sufficed."""
    view = GraphView(model)
    inner_shapes = _subgraph_shapes(model.graph)
    replaced = set()
    for node in all_nodes(model.graph):  # If branches too: a tail behind an early exit holds Reshapes
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        target = view.constant(node.input[1])
        source = view.shape(node.input[0]) or inner_shapes.get(node.input[0])
        if target is None or target.ndim != 1 or not len(target) or not source or source[0] is None:
            continue
        freed = _freed_target([int(t) for t in target], source, bool(attributes(node).get("allowzero", 0)))
        if freed is not None:
            name = unique_name(model, f"{node.input[1]}_batch")
            model.graph.initializer.append(numpy_helper.from_array(np.array(freed, dtype=target.dtype), name))
            replaced.add(node.input[1])
            node.input[1] = name
    _drop_orphans(model, replaced)


def _drop_orphans(model: onnx.ModelProto, names: set[str]) -> None:
    """Remove the initializers among `names` that nothing reads any more: a written model should not make
    onnxruntime warn about unused initializers each time it is opened."""
    graph = model.graph
    read = set().union(*(node_reads(node) for node in graph.node), (v.name for v in [*graph.input, *graph.output]))
    remove_initializers(model, names - read)


def _freed_target(target: list[int], source: list[int | None], allowzero: bool) -> list[int] | None:
    """The Reshape target with the batch left open, or None where it does not carry the fitted batch."""
    if target[0] == source[0] and source[0] > 0 and not allowzero:
        return [0, *target[1:]]
    if -1 in target:
        return None
    # (1, T, C) -> (T, C) and back: onnxslim writes this pair around the Gemm it fuses from a 3-D MatMul + Add
    merges = source[0] == 1 and len(target) == len(source) - 1 and target[0] == source[1] and target[1:] == source[2:]
    splits = len(target) == len(source) + 1 and target[0] == 1 and target[1:] == source
    return [-1, *target[1:]] if merges or splits else None


def _subgraph_shapes(graph: onnx.GraphProto) -> dict[str, list[int | None]]:
    """Inferred shapes recorded inside subgraphs (the graph view reads the top level only)."""
    shapes = {}
    for _, _, sub in subgraphs(graph):
        for value in sub.value_info:
            dims = value.type.tensor_type.shape.dim
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


def _with_dims(final: onnx.ModelProto, dims: dict[Dim, str], output_dims: dict[tuple[int, int], str]):
    model = onnx.ModelProto()
    model.CopyFrom(final)
    if any(axis == 0 for _, axis in dims):
        _free_batch_in_reshapes(model)
    _clear_value_info(model.graph)  # intermediate shapes were static; let runtimes infer them again
    inputs = {v.name: v for v in model.graph.input}
    for (name, axis), label in dims.items():
        inputs[name].type.tensor_type.shape.dim[axis].dim_param = label
    for (index, axis), label in output_dims.items():
        model.graph.output[index].type.tensor_type.shape.dim[axis].dim_param = label
    try:  # intermediate shapes with the open dims, for tools that read them; best effort
        return infer_shapes(model, in_place=True, data_prop=True)  # our own copy: no second one of its weights
    except Exception:  # noqa: BLE001 - a graph that runs is still valid without value_info
        return model


def _clear_value_info(graph: onnx.GraphProto) -> None:
    """Drop inferred shapes here and in every subgraph (If branches carry their own, static ones,
    on their outputs too)."""
    graph.ClearField("value_info")
    for node in graph.node:
        for _, sub in node_subgraphs(node):
            _clear_value_info(sub)
            for output in sub.output:
                if output.type.HasField("tensor_type"):
                    output.type.tensor_type.ClearField("shape")


def _grown(feed: dict[str, np.ndarray], dims: Sequence[Dim]) -> dict[str, np.ndarray]:
    """The feed with every dynamic non-batch dim grown (by STEP where it is a multiple of it), edge-padded."""
    grown = {}
    for name, array in feed.items():
        pad = [(0, 0)] * array.ndim
        for input_name, axis in dims:
            if input_name == name and axis > 0:
                pad[axis] = (0, STEP if array.shape[axis] % STEP == 0 else max(1, array.shape[axis] // 2))
        grown[name] = np.pad(array, pad, mode="edge") if any(p != (0, 0) for p in pad) else array
    return grown


def _batched(feeds: list[dict[str, np.ndarray]], dims: Sequence[Dim]) -> dict[str, np.ndarray]:
    batched_inputs = {name for name, axis in dims if axis == 0}
    first = feeds[0]
    return {n: np.concatenate([f[n] for f in feeds]) if n in batched_inputs else first[n] for n in first}


def _short(exc: Exception) -> str:
    """onnxruntime's failures name the node: keep that, drop the source-file noise."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    found = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
    return f"{found.group(1)} node {found.group(2)!r} fails" if found else text[:200]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))


def _varying_axes(small: list[np.ndarray], large: list[np.ndarray]) -> list[list[int]]:
    pairs = zip(small, large, strict=True)
    return [[axis for axis in range(s.ndim) if s.shape[axis] != b.shape[axis]] for s, b in pairs]


def _batch_error(open_model, static_out: list[list[np.ndarray]], feed) -> tuple[str, list[np.ndarray]]:
    """A batch of samples must give exactly the per-sample outputs of the static model."""
    outputs = _run(open_model, feed)
    for i, per_sample in enumerate(static_out):
        for static, big in zip(per_sample, outputs, strict=True):
            rows = static.shape[0] if static.ndim else 1
            scale = max(float(np.abs(static).max()) if static.size else 0.0, 1.0)
            part = big[i * rows:(i + 1) * rows] if big.ndim else big
            if part.shape != static.shape or not np.allclose(part, static, rtol=1e-4, atol=1e-5 * scale):
                return "a batch does not give the per-sample outputs (the graph mixes or fixes the batch)", outputs
    return "", outputs


def _fixed_rows_error(original: onnx.ModelProto, outputs: list[np.ndarray]) -> str:
    """An output the original declares with a fixed first dim over 1 has no batch there: a batch must not grow it
    (a Reshape that folded the batch into its rows would, once freed). A declared 1 is often an exported batch."""
    for value, out in zip(original.graph.output, outputs, strict=True):
        first = declared_shape(value)[:1]
        if first and isinstance(first[0], int) and first[0] > 1 and out.ndim and out.shape[0] != first[0]:
            return f"a batch changes output {value.name!r}, whose first dim the model fixes at {first[0]}"
    return ""


def _size_error(original, open_model, static_out: list[np.ndarray], feed, grown) -> tuple[str, list[np.ndarray]]:
    """At a second size the model must give the original's output shapes and answer like it as well as before."""
    outputs, reference = _run(open_model, grown), _run(original, grown)
    fitted = [_cosine(a, b) for a, b in zip(_run(original, feed), static_out, strict=True)]
    for ref, got, base in zip(reference, outputs, fitted, strict=True):
        if ref.shape != got.shape:
            return f"at a second size the output is {list(got.shape)}, the original's {list(ref.shape)}", outputs
        if _cosine(ref, got) < base - COSINE_SLACK:
            return "at a second size the outputs no longer answer like the original's (sizes folded into constants)", \
                outputs
    return "", outputs


def _attempt(original, final, dims: dict[Dim, str], feeds: list[dict[str, np.ndarray]]) -> _Check:
    """Restore `dims` and check them in onnxruntime; return the model or why it failed."""
    batch = [d for d in dims if d[1] == 0]
    other = [d for d in dims if d[1] > 0]
    count = min(BATCH_CHECK, len(feeds)) if batch else 1
    varied: list[list[np.ndarray]] = []
    try:
        static_out = [_run(final, f) for f in feeds[:count]]
        open_model = _with_dims(final, dims, {})
        check_model(open_model, full_check=True)
        if batch:
            error, outputs = _batch_error(open_model, static_out, _batched(feeds[:count], batch))
            error = error or _fixed_rows_error(original, outputs)
            if error:
                return _Check(None, error)
            varied.append(outputs)
        if other:
            error, outputs = _size_error(original, open_model, static_out[0], feeds[0], _grown(feeds[0], other))
            if error:
                return _Check(None, error)
            varied.append(outputs)
    except Exception as exc:  # onnx and onnxruntime raise many kinds; each only means "not valid here"
        return _Check(None, f"the rewritten graph does not run with these dims open: {_short(exc)}")
    out_dims = {}
    for outputs in varied:
        for index, axes in enumerate(_varying_axes(static_out[0], outputs)):
            declared = declared_shape(original.graph.output[index])
            for axis in axes:
                label = declared[axis] if isinstance(declared[axis], str) and declared[axis] != "?" else None
                out_dims[(index, axis)] = label or f"{original.graph.output[index].name}_dim{axis}"
    return _Check(_with_dims(final, dims, out_dims))


def restore_dynamic_dims(
    original: onnx.ModelProto, final: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]
) -> tuple[onnx.ModelProto, dict | None]:
    """`final` with the original's open input dims restored where valid, and a report of what was done.

    `feeds` are single samples at the fitted shape; two of them check the batch dim."""
    dynamic = _dynamic_dims(original)
    if not dynamic:
        return final, None
    batch_only = {d: n for d, n in dynamic.items() if d[1] == 0}
    attempts = [dynamic] + ([batch_only] if batch_only and batch_only != dynamic else [])
    reasons = {}
    for dims in attempts:
        check = _attempt(original, final, dims, feeds)
        if check.model is not None:
            kept = {f"{n}[{a}]": reasons.get("all", "") for (n, a) in dynamic if (n, a) not in dims}
            return check.model, {"restored": {f"{n}[{a}]": label for (n, a), label in dims.items()},
                                 "kept_static": kept}
        reasons["all" if dims is dynamic else "batch"] = check.why
    why = "; ".join(dict.fromkeys(reasons.values()))
    return final, {"restored": {}, "kept_static": {f"{n}[{a}]": why for (n, a) in dynamic}}


def ensure_runs(model: onnx.ModelProto) -> None:
    """The written model must load in onnxruntime."""
    try:
        _session(model)
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the rewritten model: {str(exc).splitlines()[0]}") from exc
